"""Standalone embedding files from a bundle, and the opt-in conversion of pickle files.

Exported form (one ``<name>.safetensors`` per embedding):

* SD1: ``{"emb_params": (N, 768)}`` — the webui's embeddings folder and ComfyUI load a file with one
  tensor; diffusers' ``load_textual_inversion(path, token=name)`` does too;
* SDXL: ``{"clip_l": (N, 768), "clip_g": (N, 1280)}`` — the webui and ComfyUI read both keys;
  diffusers loads each key into its own encoder (``state_dict["clip_g"]`` with ``text_encoder_2``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pivotal.errors import BundleError, SaveError
from pivotal.formats.bundle import read_bundle
from pivotal.formats.safetensors_io import atomic_save

#: CVE-2026-24747 (weights_only unpickler memory corruption) is fixed in torch 2.10.
MIN_TORCH_FOR_PICKLE = (2, 10)


def safe_output_path(out_dir: Path, file_name: str) -> Path:
    """``out_dir/file_name``, refusing anything that would land outside ``out_dir``."""
    root = out_dir.resolve()
    target = (root / file_name).resolve()
    if os.path.commonpath([root, target]) != str(root) or target.parent != root:
        raise SaveError(f"refusing to write {file_name!r}: it would land outside {root}")
    return target


def export_embeddings(bundle_path: str | os.PathLike, out_dir: str | os.PathLike,
                      force: bool = False) -> list[Path]:
    """Write one embedding file per bundled embedding into ``out_dir``; return the paths."""
    bundle = read_bundle(bundle_path)
    if not bundle.embeddings:
        raise BundleError(bundle_path, "has no bundled embeddings to export")
    out = Path(out_dir)
    if not out.is_dir():
        raise SaveError(f"output folder {out} does not exist; create it first")
    planned = []
    for emb in bundle.embeddings.values():
        target = safe_output_path(out, f"{emb.name}.safetensors")
        if target.exists() and not force:
            raise SaveError(f"{target} already exists; pass --force to overwrite it")
        if bundle.base_model == "sd1":
            tensors = {"emb_params": emb.vectors["clip_l"]}
        else:
            tensors = {"clip_l": emb.vectors["clip_l"], "clip_g": emb.vectors["clip_g"]}
        planned.append((target, tensors, emb.name))
    written = []
    for target, tensors, name in planned:
        meta = {"pivotal.source_bundle": Path(bundle_path).name, "pivotal.embedding": name,
                "pivotal.base_model": bundle.base_model}
        atomic_save(target, {k: t.contiguous() for k, t in tensors.items()}, meta)
        written.append(target)
    return written


def convert_pickle(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Convert a trusted pickle LoRA/embedding to safetensors; return the keys written.

    Uses ``torch.load(weights_only=True)`` and refuses torch older than 2.10, whose restricted
    unpickler has known memory-corruption bugs. Embedding layouts are normalised to the export
    form above; a flat dict of tensors (a LoRA) is kept as is.
    """
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH_FOR_PICKLE:
        raise BundleError(src, f"converting pickle files needs torch >= 2.10 (this is {torch.__version__}); "
                               "run the conversion in another environment with a newer torch")
    if Path(dst).suffix.lower() != ".safetensors":
        raise SaveError(f"output {dst} must end in .safetensors")
    try:
        data = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types; all mean "not a safe weights file"
        raise BundleError(src, f"cannot be loaded as plain weights ({type(e).__name__}: {e})") from e
    tensors = _flatten_weights(src, data)
    atomic_save(dst, tensors, {"pivotal.converted_from": Path(src).name})
    return sorted(tensors)


def _flatten_weights(src: str | os.PathLike, data: object) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise BundleError(src, f"top level is a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" in data:  # the webui's TI .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise BundleError(src, "string_to_param must hold exactly one tensor")
        return {"emb_params": next(iter(params.values())).detach().contiguous()}
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise BundleError(src, "holds values that are not tensors; not a LoRA or embedding file")
    if len(data) == 1:  # diffusers {"<token>": t} or kohya {"emb_params": t}
        return {"emb_params": next(iter(data.values())).detach().contiguous()}
    return {str(k): v.detach().contiguous() for k, v in data.items()}
