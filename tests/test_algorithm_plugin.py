"""Adding an algorithm is one class: this file alone defines a toy one ("outer": ΔW = scale ·
col ⊗ row, under tensor names of its own), and it trains through the real trainer on the demo
host, is saved in the bundle, shows in ``pivotal inspect`` and loads back with equal outputs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.adapters.algorithms import Algorithm, register_algorithm, unregister_algorithm  # noqa: E402
from pivotal.adapters.algorithms.base import ModuleLayout, read_alpha  # noqa: E402
from pivotal.formats.bundle import read_bundle  # noqa: E402
from pivotal.formats.inspect_report import inspect_bundle  # noqa: E402
from pivotal.inference.bundle_load import load_bundle_for_model  # noqa: E402
from pivotal.training.trainer import _Run  # noqa: E402
from test_trainer import config  # noqa: E402


class Outer(Algorithm):
    """Rank-1 outer product, ``toy_col`` (out, 1) and ``toy_row`` (1, in·kh·kw)."""

    name = "outer"
    tensor_names = ("toy_col", "toy_row")

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(shape, 1, alpha, dropout)
        in_numel = 1
        for s in self.shape[1:]:
            in_numel *= s
        self.col = nn.Parameter(torch.zeros(self.shape[0], 1))
        self.row = nn.Parameter(torch.randn(1, in_numel) / in_numel ** 0.5)

    def own_tensors(self) -> dict[str, torch.Tensor]:
        return {"toy_col": self.col, "toy_row": self.row}

    def raw_delta(self) -> torch.Tensor:
        return self.col @ self.row

    @classmethod
    def detect(cls, names: set[str]) -> bool:
        return "toy_col" in names

    @classmethod
    def layout(cls, tensors: Mapping[str, torch.Tensor]) -> ModuleLayout:
        col, row = tensors["toy_col"], tensors["toy_row"]
        alpha = read_alpha(tensors)
        return ModuleLayout(cls.name, 1, alpha, alpha if alpha is not None else 1.0, int(col.shape[0]),
                            int(row.numel()))


@pytest.fixture()
def outer_registered():
    register_algorithm(Outer)
    try:
        yield
    finally:
        unregister_algorithm("outer")


def unet_output(host, net=None) -> torch.Tensor:
    cfg = host.unet.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        if net is None:
            return host.unet(x, 10, encoder_hidden_states=ctx).sample
        with net.attached():
            return host.unet(x, 10, encoder_hidden_states=ctx).sample


@pytest.mark.slow
def test_toy_algorithm_trains_saves_and_reloads(outer_registered, host, data_dir: Path, tmp_path: Path) -> None:
    plain = unet_output(host)
    cfg = config(data_dir, tmp_path, unet_algorithm="outer", unet_alpha=1.0, lora_preset="attn-mlp-conv", steps=4)
    run = _Run(cfg, host, lambda e: None, threading.Event())
    result = run.execute(None, None)
    assert result.status == "completed"
    trained = unet_output(host, run.net)
    assert not torch.allclose(trained, plain)  # it learned something
    bundle = read_bundle(result.bundle_path)
    assert bundle.unknown_keys == [] and bundle.lora
    assert {k.partition(".")[2] for k in bundle.lora} == {"toy_col", "toy_row", "alpha"}
    assert bundle.metadata["ss_network_module"] == "lycoris.kohya"
    assert inspect_bundle(result.bundle_path)["lora"]["unet"]["algorithms"] == ["outer"]
    targets = host.lora_targets("unet", "attn-mlp-conv")
    dims = {k: int(host.vocabulary(k).shape[1]) for k in host.encoder_keys()}
    loaded = load_bundle_for_model(result.bundle_path, "sd1", targets, dims)
    assert loaded.report is not None and not loaded.report.unmatched and not loaded.report.missing
    assert all(m.algorithm.name == "outer" for m in loaded.network.modules_of())
    torch.testing.assert_close(unet_output(host, loaded.network), trained, rtol=0, atol=0)
    assert torch.equal(unet_output(host), plain)


def test_without_registration_the_name_is_refused(host, data_dir: Path, tmp_path: Path) -> None:
    from pivotal.errors import ConfigError

    with pytest.raises(ConfigError, match="unet_algorithm: 'outer' is not one of .*lora"):
        config(data_dir, tmp_path, unet_algorithm="outer").validate()
