"""Each algorithm trains on ``--demo sd1`` through the CLI: the loss falls, the bundle is written
in the algorithm's keys, ``pivotal inspect`` names it and ``pivotal generate`` applies it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.cli.main import main  # noqa: E402

#: settings file -> (the algorithm labels inspect shows for the UNet, a tensor name the bundle must hold)
CASES = {
    "loha-tucker": ({"unet_algorithm": "loha", "conv_tucker": True}, ["loha"], "hada_t1"),
    "lokr": ({"unet_algorithm": "lokr", "lokr_factor": 4}, ["lokr"], "lokr_w1"),
    "dora": ({"dora": True}, ["lora+dora"], "dora_scale"),
    "locon-tucker": ({"conv_tucker": True, "te_lora": True, "te_algorithm": "loha", "te_lr": 1e-3},
                     ["lora"], "lora_mid.weight"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_demo_trains_saves_inspects_and_generates(case: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    settings, labels, tensor = CASES[case]
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps(settings))
    out = tmp_path / "out"
    assert main(["train", "--demo", "sd1", "--config", str(cfg), "--steps", "60", "--json", "--out", str(out)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = events[-1]
    assert summary["status"] == "completed"
    assert summary["last_smoothed_loss"] < summary["first_smoothed_loss"]
    assert main(["inspect", summary["bundle"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lora"]["unet"]["algorithms"] == labels and report["warnings"] == []
    if settings.get("te_lora"):
        assert report["lora"]["te"]["algorithms"] == ["loha"]
    from pivotal.formats.bundle import read_bundle

    assert any(k.endswith("." + tensor) for k in read_bundle(summary["bundle"]).lora)
    images = {}
    for weight in ("0", "1"):
        png = tmp_path / f"w{weight}.png"
        assert main(["generate", "--demo", "sd1", "--lora-dir", str(out), "--prompt",
                     f"mychar on a blue background <lora:pivotal:{weight}>", "--steps", "4", "--out", str(png)]) == 0
        images[weight] = np.asarray(Image.open(png), dtype=np.float32)
    # the bundle's LoRA changes the picture (its embedding is in both)
    assert np.abs(images["1"] - images["0"]).mean() > 0.5
