"""Tiny hostile or broken safetensors files, built byte by byte: each reproduces one way a file
once crashed the reader (issue 14's table) or one found by the fuzzer (tests/fuzz_bundles.py).

Each builder writes into a folder and returns the path; ``CRASH_FILES`` maps a short id to it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save


def raw_safetensors(path: Path, header: bytes | str | dict, data: bytes = b"") -> Path:
    """A file with exactly this header text (a dict is JSON-encoded) and data section."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def good_lora_tensors() -> dict[str, torch.Tensor]:
    """One kohya SD1 LoRA module and one SD1 embedding: what a real small bundle holds."""
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
            "bundle_emb.pvtchar.string_to_param.*": torch.randn(2, 16, generator=g)}


def good_bundle_bytes(meta: dict[str, str] | None = None) -> bytes:
    return save(good_lora_tensors(), meta)


def split_file(blob: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors blob."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _nested(folder: Path) -> Path:
    return raw_safetensors(folder / "nested.safetensors", '{"a": ' + "[" * 5000 + "]" * 5000 + "}")


def _big_int(folder: Path) -> Path:
    return raw_safetensors(folder / "bigint.safetensors",
                           '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "9" * 4301 + "]}}")


def _meta_nested(folder: Path) -> Path:
    blob = good_bundle_bytes({"pivotal.embeddings": "[" * 5000 + "]" * 5000})
    (folder / "metanested.safetensors").write_bytes(blob)
    return folder / "metanested.safetensors"


def _meta_big_int(folder: Path) -> Path:
    blob = good_bundle_bytes({"pivotal.embeddings": '[{"name": "pvtchar", "vectors": ' + "7" * 4301 + "}]"})
    (folder / "metabigint.safetensors").write_bytes(blob)
    return folder / "metabigint.safetensors"


def _dims65(folder: Path) -> Path:
    return raw_safetensors(folder / "dims65.safetensors",
                           {"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4)


def _dtype_list(folder: Path) -> Path:
    return raw_safetensors(folder / "dtypelist.safetensors",
                           {"w": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)


def _zero_dim_huge(folder: Path) -> Path:
    # 0 elements fit in 0 bytes whatever the other sizes: torch cannot make a 10**19-sized dimension
    return raw_safetensors(folder / "zerohuge.safetensors",
                           {"w": {"dtype": "F32", "shape": [0, 10**19], "data_offsets": [0, 0]}})


def _control_key(folder: Path) -> Path:
    # an embedding name with a line break and a terminal escape sequence: one line, no escape codes
    header, data = split_file(good_bundle_bytes())
    header["bundle_emb.x\n\x1b[2J.string_to_param.*"] = header.pop("bundle_emb.pvtchar.string_to_param.*")
    return raw_safetensors(folder / "controlkey.safetensors", json.dumps(header), data)


def _control_unknown_key(folder: Path) -> Path:
    # the same in a key nobody claims: reported (escaped) in inspect's warnings
    header, data = split_file(good_bundle_bytes())
    header["x\n\x1b[2J"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    return raw_safetensors(folder / "controlunknown.safetensors", json.dumps(header), data + b"\0" * 4)


def _lone_surrogate(folder: Path) -> Path:
    # JSON can spell one; Python's json accepts it, safetensors refuses the file, printing it fails
    header, data = split_file(good_bundle_bytes())
    header["lora_unet_\ud800.alpha"] = {"dtype": "F32", "shape": [], "data_offsets": [len(data), len(data) + 4]}
    return raw_safetensors(folder / "surrogate.safetensors", json.dumps(header), data + b"\0" * 4)


def _duplicate_key(folder: Path) -> Path:
    return raw_safetensors(folder / "dupkey.safetensors",
                           '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                           '"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)


def _bool_shape(folder: Path) -> Path:
    return raw_safetensors(folder / "boolshape.safetensors",
                           {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4)


CRASH_FILES: dict[str, Callable[[Path], Path]] = {
    "nested-header": _nested, "bigint-header": _big_int, "nested-metadata": _meta_nested,
    "bigint-metadata": _meta_big_int, "65-dims": _dims65, "dtype-list": _dtype_list,
    "zero-dim-huge": _zero_dim_huge, "control-chars-key": _control_key, "duplicate-key": _duplicate_key,
    "bool-shape": _bool_shape, "control-chars-unknown-key": _control_unknown_key,
    "lone-surrogate": _lone_surrogate,
}
#: Files that are valid bundles once their hostile parts are ignored: inspect reports them.
READABLE = {"nested-metadata", "bigint-metadata", "control-chars-unknown-key", "control-chars-key"}
