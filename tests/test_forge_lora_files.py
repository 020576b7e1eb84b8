"""Forge's Lora loader reads bundles without their embeddings, and re-reads a rewritten file.

Forge's ``networks.load_lora_state_dict`` is an ``lru_cache`` over a file reader; the stand-in here
is the same shape (a reader wrapped in ``functools.lru_cache``) over real safetensors files.
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.hosts.forge import lora_files

LORA = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
        "lora_unet_x.alpha": torch.tensor(2.0)}


def _bundle(path: Path, names: int, up: float = 1.0) -> Path:
    lora = dict(LORA, **{"lora_unet_x.lora_up.weight": torch.full((4, 2), up)})
    embs = [BundleEmbedding(f"emb{i}", {"clip_l": torch.randn(2, 768)}) for i in range(names)]
    write_bundle(path, "sd1", lora, embs, TrainingInfo(path.stem))
    return path


def _forge_networks() -> types.SimpleNamespace:
    reads: list[str] = []

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename: str) -> dict:
        reads.append(filename)
        return load_file(filename)

    return types.SimpleNamespace(load_lora_state_dict=load_lora_state_dict, reads=reads)


def test_bundle_embeddings_never_reach_forges_loader(tmp_path: Path) -> None:
    path = str(_bundle(tmp_path / "big.safetensors", 13))
    networks = _forge_networks()
    assert sum(k.startswith("bundle_emb.") for k in networks.load_lora_state_dict(path)) == 13  # Forge's >12 rule
    assert lora_files.install(networks) and not lora_files.install(networks)  # idempotent
    sd = networks.load_lora_state_dict(path)
    assert sorted(sd) == sorted(LORA)  # every LoRA key, no embedding
    assert networks.load_lora_state_dict.cache_info().currsize == 1
    assert lora_files.uninstall(networks) and not lora_files.uninstall(networks)
    assert sum(k.startswith("bundle_emb.") for k in networks.load_lora_state_dict(path)) == 13


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    _bundle(path, 1, up=1.0)
    networks = _forge_networks()
    lora_files.install(networks)
    first = networks.load_lora_state_dict(str(path))
    assert networks.load_lora_state_dict(str(path)) is first  # cached while unchanged
    _bundle(path, 1, up=3.0)  # a training run published the same name again
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a clock with coarse mtimes
    again = networks.load_lora_state_dict(str(path))
    assert float(again["lora_unet_x.lora_up.weight"][0, 0]) == 3.0
