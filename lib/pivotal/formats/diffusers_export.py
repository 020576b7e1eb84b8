"""A bundle as a folder that diffusers loads: ``pivotal export-diffusers BUNDLE OUT``.

diffusers' ``load_lora_weights`` refuses a bundle as it is ("Invalid LoRA checkpoint"): its
``bundle_emb.*`` keys are not LoRA keys. Without them the kohya keys load, every module of them.
So the export splits the bundle::

    OUT/pytorch_lora_weights.safetensors   the LoRA keys exactly as bundled (kohya names, alphas)
    OUT/embeddings/NAME.safetensors        one per embedding, in the form of pivotal export-embeddings
    OUT/pivotal_bundle.json                base model, the files, each embedding's vector count
    OUT/README.md                          the diffusers calls that load this folder

``pipe.load_lora_weights(OUT)`` picks ``pytorch_lora_weights.safetensors`` by its name, and each
embedding loads with ``pipe.load_textual_inversion`` (SDXL: once per encoder). The one-call
helper :func:`pivotal.inference.diffusers_pipeline.load_bundle_into_pipeline` does all of it from
a bundle or from such a folder. Nothing here imports diffusers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pivotal.errors import SaveError
from pivotal.formats.bundle import read_bundle
from pivotal.formats.export import export_embeddings
from pivotal.formats.safetensors_io import atomic_save

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FOLDER = "embeddings"
MANIFEST_FILE = "pivotal_bundle.json"
README_FILE = "README.md"
#: metadata carried over to the LoRA file: what tools show about a LoRA (not Pivotal's embeddings)
KEPT_METADATA = ("ss_output_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                 "ss_network_alpha", "modelspec.architecture", "modelspec.title")


def _readme(name: str, base: str, embeddings: dict[str, int]) -> str:
    lines = [f"# {name}: a Pivotal bundle for diffusers", "",
             "Exported by `pivotal export-diffusers`. Load it into a Stable Diffusion "
             f"{'XL ' if base == 'sdxl' else '1.x '}pipeline `pipe`:", "", "```python"]
    lines.append("pipe.load_lora_weights(FOLDER)  # pytorch_lora_weights.safetensors")
    if base == "sdxl":
        lines.append("from safetensors.torch import load_file")
    for emb, count in embeddings.items():
        path = f"FOLDER + '/{EMBEDDINGS_FOLDER}/{emb}.safetensors'"
        if base == "sd1":
            lines.append(f"pipe.load_textual_inversion({path}, token={emb!r})  # {count} vector(s)")
        else:
            lines += [f"state = load_file({path})  # {count} vector(s) per encoder",
                      f"pipe.load_textual_inversion(state['clip_l'], token={emb!r}, text_encoder=pipe.text_encoder, "
                      "tokenizer=pipe.tokenizer)",
                      f"pipe.load_textual_inversion(state['clip_g'], token={emb!r}, "
                      "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    lines += ["```", "", "or, with Pivotal installed, all of it in one call:", "", "```python",
              "from pivotal.inference.diffusers_pipeline import load_bundle_into_pipeline",
              "load_bundle_into_pipeline(pipe, FOLDER)  # or the bundle .safetensors itself", "```", "",
              "Then write the embedding names in prompts as they are (diffusers expands each to its vectors).", ""]
    return "\n".join(lines)


def export_for_diffusers(bundle_path: str | os.PathLike, out_dir: str | os.PathLike,
                         force: bool = False) -> list[Path]:
    """Write the folder described above; returns the files written.

    ``out_dir`` is created (its parent must exist). SaveError when it already holds an export and
    ``force`` is not given, or when the bundle has neither LoRA nor embeddings.
    """
    bundle = read_bundle(bundle_path)
    if not bundle.lora and not bundle.embeddings:
        raise SaveError(f"{bundle_path}: has neither LoRA weights nor embeddings; nothing to export")
    out = Path(out_dir)
    if not out.parent.is_dir():
        raise SaveError(f"output folder {out}: its parent {out.parent} does not exist")
    ours = [out / n for n in (LORA_FILE, MANIFEST_FILE, README_FILE)]
    if any(p.exists() for p in ours) and not force:
        raise SaveError(f"{out} already holds an export ({', '.join(p.name for p in ours if p.exists())}); "
                        "pass --force to overwrite it")
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    if bundle.lora:
        meta = {k: v for k, v in bundle.metadata.items() if k in KEPT_METADATA}
        meta["pivotal.source_bundle"] = Path(bundle_path).name
        atomic_save(out / LORA_FILE, {k: t.contiguous() for k, t in bundle.lora.items()}, meta)
        written.append(out / LORA_FILE)
    elif (out / LORA_FILE).exists():
        (out / LORA_FILE).unlink()  # a stale LoRA from an earlier export would load with this one
    if bundle.embeddings:
        (out / EMBEDDINGS_FOLDER).mkdir(exist_ok=True)
        written += export_embeddings(bundle_path, out / EMBEDDINGS_FOLDER, force=force)
    counts = {name: emb.num_vectors for name, emb in bundle.embeddings.items()}
    manifest = {"format": 1, "base_model": bundle.base_model, "lora": LORA_FILE if bundle.lora else None,
                "embeddings": {name: {"file": f"{EMBEDDINGS_FOLDER}/{name}.safetensors", "vectors": n}
                               for name, n in counts.items()},
                "source_bundle": Path(bundle_path).name}
    for name, text in ((MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n"),
                       (README_FILE, _readme(Path(bundle_path).stem, bundle.base_model, counts))):
        tmp = out / f".{name}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)
        except OSError as e:
            raise SaveError(f"cannot write {out / name}: {e.strerror or e}") from e
        written.append(out / name)
    return written
