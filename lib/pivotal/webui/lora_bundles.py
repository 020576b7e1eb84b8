"""The bundles in the webui's Lora folder (``GET /pivotal/v1/bundles``, the grid's bundle choices)."""

from __future__ import annotations

from typing import Any

from pivotal.errors import PivotalError


def list_bundles(lora_dir: str) -> list[dict[str, Any]]:
    """Every ``.safetensors`` in ``lora_dir`` (recursively) that carries ``bundle_emb.*`` tensors or
    Pivotal metadata: name, path, base model and embedding names. Unreadable files are listed
    with their error instead of being skipped silently."""
    from pivotal.formats.embedding_keys import embedding_names
    from pivotal.formats.folder_scan import safetensors_files
    from pivotal.formats.safetensors_io import read_header

    out: list[dict[str, Any]] = []
    paths, _skipped = safetensors_files(lora_dir)  # folders and non-files: nothing to list
    for path in paths:
        entry: dict[str, Any] = {"name": path.stem, "path": str(path)}
        try:
            header = read_header(path)
        except (PivotalError, OSError) as e:
            entry["error"] = str(e)
            out.append(entry)
            continue
        names = sorted(embedding_names(header.tensors))
        meta = header.metadata
        if not names and "pivotal.format" not in meta:
            continue
        entry.update({"embeddings": names, "base_model": meta.get("ss_base_model_version", ""),
                      "output_name": meta.get("ss_output_name", path.stem),
                      "made_by_pivotal": "pivotal.format" in meta})
        out.append(entry)
    return out
