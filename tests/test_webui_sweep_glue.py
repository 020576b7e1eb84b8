"""Glue tests of a sweep's grid in the webui (:mod:`pivotal.webui.sweep_grid_api`, the
``/pivotal/v1/sweep/grid`` route, the tab's renderer) with the fake webui processing of
test_webui_grid_glue: rows = the published variants, best validation loss first, each cell one
webui txt2img under the queue lock; saved next to the sweep. The real webui runs a sweep in
tests/integration/test_webui_sweep.py."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from pivotal.errors import ConfigError, NotFoundError
from pivotal.inference.grid import COLUMNS
from pivotal.training.job import JobBusyError
from pivotal.training.queue import QueueRun, write_summary
from pivotal.webui.sweep_grid_api import render_sweep_grid_in_webui, sweep_folder, tab_sweep_grid
from test_webui_grid_glue import FakeScript, _bundle, _webui

RUNNER = types.SimpleNamespace(scripts=[FakeScript()])
BODY = {"prompt": "a photo of pvtchar", "seed": 3, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}


def write_sweep(tmp_path: Path) -> Path:
    """A sweep folder under the outputs whose two finished runs published their bundles."""
    lora = tmp_path / "Lora"
    folder = tmp_path / "outputs" / "sweeps" / "hero-te_lr-0123abcd"
    folder.mkdir(parents=True)
    runs = [QueueRun("hero-te_lr1e-05.json", status="completed", values=["te_lr=1e-05"], validation_loss=0.4,
                     bundle=str(_bundle(lora, "hero-te_lr1e-05"))),
            QueueRun("hero-te_lr1e-06.json", status="completed", values=["te_lr=1e-06"], validation_loss=0.2,
                     bundle=str(_bundle(lora, "hero-te_lr1e-06")))]
    write_summary(folder, runs, "sd1")
    for run in runs:  # the configs the sweep wrote (the grid reads their training size)
        (folder / run.config).write_text(json.dumps({"resolution": 96}), encoding="utf-8")
    return folder


def test_each_cell_is_one_webui_txt2img_of_its_rows_variant(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path)
    webui = _webui()
    out = render_sweep_grid_in_webui(folder, BODY, webui, lambda: False, runner=RUNNER)
    made = webui.processing.made
    assert len(made) == 2 * len(COLUMNS) and not out["interrupted"]
    prompts = [p.kw["prompt"] for p in made]
    assert prompts[0] == "a photo of pvtchar <lora:hero-te_lr1e-06:1>"  # the best validation loss first
    assert prompts[5] == "a photo of pvtchar <lora:hero-te_lr1e-05:1>" and prompts[9] == "a photo of pvtchar"
    assert {p.kw["seed"] for p in made} == {3} and all(p.locked and p.closed for p in made)
    assert Path(out["png"]) == folder / "sweep-grid.png" and Path(out["json"]) == folder / "sweep-grid.json"
    assert out["record"]["row_labels"] == ["te_lr=1e-06 (val 0.2000)", "te_lr=1e-05 (val 0.4000)"]
    assert json.loads((folder / "sweep-grid.json").read_text()) == out["record"]


def test_refusals_name_the_field(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path)
    outputs = str(tmp_path / "outputs")
    assert sweep_folder({"sweep": folder.name}, outputs) == folder
    assert sweep_folder({}, outputs, str(folder)) == folder  # the job's last sweep
    with pytest.raises(NotFoundError, match="no sweep has run yet"):
        sweep_folder({}, outputs)
    with pytest.raises(NotFoundError, match="field: sweep"):
        sweep_folder({"sweep": "nosuch"}, outputs)
    with pytest.raises(ConfigError, match="field: sweep"):
        sweep_folder({"sweep": "../Lora"}, outputs)
    with pytest.raises(ConfigError, match="unknown field"):
        render_sweep_grid_in_webui(folder, {**BODY, "prompts": ["x"]}, _webui(), lambda: False, runner=RUNNER)
    with pytest.raises(ConfigError, match="field: prompt"):
        render_sweep_grid_in_webui(folder, {"prompt": "x <lora:a:1>"}, _webui(), lambda: False, runner=RUNNER)
    webui = _webui()
    with pytest.raises(JobBusyError):
        render_sweep_grid_in_webui(folder, BODY, webui, lambda: True, runner=RUNNER)
    assert webui.processing.made == []


def test_the_tab_renderer_and_the_route(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path)
    webui = _webui()
    png, record = tab_sweep_grid(lambda: webui, lambda: False, runner=RUNNER)(str(folder), "pvtchar", 2, 6, 0)
    assert png == str(folder / "sweep-grid.png") and len(webui.processing.made) == 10
    # size 0: the cells are drawn at the variants' training resolution, not the grid's 512 px;
    # the section's steps reach the webui
    assert {(p.kw["width"], p.kw["height"], p.kw["steps"]) for p in webui.processing.made} == {(96, 96, 6)}
    webui = _webui()
    tab_sweep_grid(lambda: webui, lambda: False, runner=RUNNER)(str(folder), "pvtchar", 2, 3, 128)
    assert {(p.kw["width"], p.kw["height"], p.kw["steps"]) for p in webui.processing.made} == {(128, 128, 3)}
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pivotal.webui.api import add_routes

    app = fastapi.FastAPI()
    job = types.SimpleNamespace(running=False, status=lambda: {"queue": {"kind": "sweep", "folder": str(folder)}})
    paths = {"outputs": str(tmp_path / "outputs"), "lora_dir": str(tmp_path / "Lora")}
    add_routes(app, job, lambda **kw: None, lambda: paths, webui_provider=_webui)
    client = TestClient(app)
    assert client.post("/pivotal/v1/sweep/grid", json={**BODY, "sweep": "nosuch"}).status_code == 404
    bad = client.post("/pivotal/v1/sweep/grid", json={**BODY, "columns": ["lora"]})
    assert bad.status_code == 400 and "columns" in bad.json()["detail"]
    job.running = True
    assert client.post("/pivotal/v1/sweep/grid", json=BODY).status_code == 409
