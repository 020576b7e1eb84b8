"""The grid after a sweep: rows = the finished variants (best validation loss first), columns = the
bundle's parts, one prompt and one seed; each row's cells tag that row's bundle; saved as PNG +
JSON next to the sweep. Rendered here by a renderer that draws the cell's bundle and column as a
colour (the hosts' own txt2img renderers are tested with the ablation grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pivotal.errors import NotFoundError
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.inference.grid import COLUMNS, GridCell, render_grid
from pivotal.inference.sweep_grid import finished_variants, save_sweep_grid, sweep_grid_plan
from pivotal.training.queue import QueueRun, write_summary


def bundle(folder: Path, stem: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_x.alpha": torch.tensor(2.0)}
    path = folder / f"{stem}.safetensors"
    write_bundle(path, "sd1", lora, [BundleEmbedding("pvtchar", {"clip_l": torch.randn(2, 32)}, "person")],
                 TrainingInfo(stem))
    return str(path)


def sweep(folder: Path) -> None:
    out = folder / "output"
    runs = [QueueRun("hero-te_lr1e-06.json", status="completed", values=["te_lr=1e-06"], validation_loss=0.3,
                     bundle=bundle(out, "hero-te_lr1e-06")),
            QueueRun("hero-te_lr1e-05.json", status="completed", values=["te_lr=1e-05"], validation_loss=0.1,
                     validation_drift=2.5, bundle=bundle(out, "hero-te_lr1e-05")),
            QueueRun("hero-te_lr1e-04.json", status="interrupted", values=["te_lr=0.0001"],
                     bundle=str(out / "hero-te_lr1e-04-step000002.safetensors"))]
    write_summary(folder, runs, "sd1")


def colour_render(cell: GridCell) -> tuple[Any, str]:
    from PIL import Image

    shade = 40 * (1 + list(COLUMNS).index(cell.column)) + (100 if "1e-05" in cell.prompt else 0)
    return Image.new("RGB", (32, 32), (shade % 256, cell.seed % 256, 0)), f"{cell.prompt}\nSeed: {cell.seed}"


def test_rows_are_the_finished_variants_ranked_columns_the_parts(tmp_path: Path) -> None:
    sweep(tmp_path)
    runs = finished_variants(tmp_path)
    assert [r.values for r in runs] == [["te_lr=1e-05"], ["te_lr=1e-06"]]  # ranked; the interrupted run is out
    plan = sweep_grid_plan(runs, "", seed=5)
    assert plan.rows == ["pvtchar", "pvtchar"] and plan.seeds == [5, 5]  # default prompt: the embedding names
    assert plan.row_labels == ["te_lr=1e-05 (val 0.1000, drift +2.5%)", "te_lr=1e-06 (val 0.3000)"]
    cells = {(c.row, c.column): c.prompt for c in plan.cells()}
    assert cells[(0, "full")] == "pvtchar <lora:hero-te_lr1e-05:1>"
    assert cells[(1, "unet")] == "pvtchar <lora:hero-te_lr1e-06:te=0:unet=1>"
    assert cells[(1, "emb")] == "pvtchar <lora:hero-te_lr1e-06:0>" and cells[(0, "base")] == "pvtchar"
    png, record_path = save_sweep_grid(tmp_path, render_grid(plan, colour_render))
    assert png == tmp_path / "sweep-grid.png" and record_path == tmp_path / "sweep-grid.json"
    import json

    record = json.loads(record_path.read_text())
    assert record["complete"] and record["row_bundles"] == ["hero-te_lr1e-05", "hero-te_lr1e-06"]
    assert [c["bundle"] for c in record["cells"] if c["column"] == "full"] == record["row_bundles"]
    from PIL import Image

    with Image.open(png) as sheet:
        assert "Pivotal sweep grid" in sheet.info["parameters"]
        box = next(c["box"] for c in record["cells"] if (c["row"], c["column"]) == (0, "te"))
        assert sheet.getpixel((box["x"] + 2, box["y"] + 2))[0] == (40 * 3 + 100) % 256


def test_no_grid_before_a_run_finished(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no sweep record"):
        finished_variants(tmp_path)
    write_summary(tmp_path, [QueueRun("a.json", status="interrupted")], "sd1")
    with pytest.raises(NotFoundError, match="no run of the sweep has finished"):
        finished_variants(tmp_path)
