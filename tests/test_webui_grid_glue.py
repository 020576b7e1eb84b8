"""Glue tests of the webui ablation grid (:mod:`pivotal.webui.grid_render`, ``grid_api``, the
``/pivotal/v1/grid`` route) with a fake of the webui's processing, state and queue; the real webui
renders it in tests/integration/test_webui_grid.py."""

from __future__ import annotations

import json
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from pivotal.errors import ConfigError, NotFoundError
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.inference.grid import COLUMNS
from pivotal.training.job import JobBusyError
from pivotal.webui.grid_api import make_grid


class FakeState:
    def __init__(self) -> None:
        self.interrupted = self.stopping_generation = False
        self.calls: list[str] = []

    def begin(self, job: str) -> None:
        self.interrupted = False  # as the webui's State.begin
        self.calls.append(f"begin {job}")

    def end(self) -> None:
        self.calls.append("end")


class FakeProcessing:
    """``modules.processing``: records every generation; ``interrupt_at`` = the call (1-based) during
    which the user presses Interrupt."""

    def __init__(self, state: FakeState, lock: Any, interrupt_at: int = 0) -> None:
        self.state, self.lock, self.interrupt_at = state, lock, interrupt_at
        self.interrupt_empty = False
        self.made: list[Any] = []
        outer = self

        class Txt2Img:
            __dataclass_fields__ = {"scheduler": None}

            def __init__(self, **kw: Any) -> None:
                self.kw, self.closed, self.locked = kw, False, False
                outer.made.append(self)

            def close(self) -> None:
                self.closed = True

        self.StableDiffusionProcessingTxt2Img = Txt2Img

    def process_images(self, p: Any) -> Any:
        from PIL import Image

        p.locked = self.lock.locked()
        p.seen_args = (p.is_api, getattr(p, "scripts", None), getattr(p, "script_args", None))
        if len(self.made) == self.interrupt_at:
            self.state.interrupted = True
            if self.interrupt_empty:  # pressed before sampling began: the webui returns no image
                return types.SimpleNamespace(images=[], infotexts=[])
        shade = (len(self.made) * 20) % 256
        image = Image.new("RGB", (p.kw["width"], p.kw["height"]), (shade, 0, 0))
        return types.SimpleNamespace(images=[image], infotexts=[f"{p.kw['prompt']}\nSteps: {p.kw['steps']}"])


class FakeScript:
    args_from, args_to, is_img2img = 1, 3, False

    def ui(self, is_img2img: bool) -> list[Any]:
        return [types.SimpleNamespace(value=-1), types.SimpleNamespace(value="Euler")]


def _webui(interrupt_at: int = 0) -> Any:
    state, lock = FakeState(), threading.Lock()
    return types.SimpleNamespace(shared=types.SimpleNamespace(state=state, sd_model="the model"),
                                 processing=FakeProcessing(state, lock, interrupt_at),
                                 call_queue=types.SimpleNamespace(queue_lock=lock))


def _bundle(lora_dir: Path, stem: str = "pvtgrid", names: tuple[str, ...] = ("pvtchar",)) -> Path:
    lora_dir.mkdir(parents=True, exist_ok=True)
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_x.alpha": torch.tensor(2.0),
            "lora_te_x.lora_down.weight": torch.zeros(2, 4), "lora_te_x.lora_up.weight": torch.zeros(4, 2),
            "lora_te_x.alpha": torch.tensor(2.0)}
    path = lora_dir / f"{stem}.safetensors"
    write_bundle(path, "sd1", lora, [BundleEmbedding(n, {"clip_l": torch.randn(2, 32)}, "person") for n in names],
                 TrainingInfo(stem))
    return path


BODY = {"bundle": "pvtgrid", "prompts": ["a photo of pvtchar"], "auto_prompts": 1, "steps": 4, "cfg_scale": 5,
        "sampler_name": "Euler", "width": 64, "height": 64, "seed": 7, "negative_prompt": "blurry"}


def _paths(tmp_path: Path) -> dict[str, str]:
    return {"lora_dir": str(tmp_path / "Lora"), "outputs": str(tmp_path / "outputs" / "pivotal")}


def test_each_cell_is_one_webui_txt2img_under_the_queue_lock(tmp_path: Path) -> None:
    _bundle(tmp_path / "Lora")
    webui = _webui()
    out = make_grid(BODY, webui, _paths(tmp_path), lambda: False, runner=types.SimpleNamespace(scripts=[FakeScript()]))
    made = webui.processing.made
    record = out["record"]
    assert len(made) == 2 * len(COLUMNS) and len(record["cells"]) == 10 and not out["interrupted"]
    assert [p.kw["prompt"] for p in made] == [c["prompt"] for c in record["cells"]]
    assert made[0].kw["prompt"] == "a photo of pvtchar <lora:pvtgrid:1>"
    assert made[4].kw["prompt"] == "a photo of pvtchar"  # base: no tag
    assert [p.kw["seed"] for p in made] == [7] * 5 + [8] * 5
    for p in made:
        assert (p.kw["width"], p.kw["height"], p.kw["steps"], p.kw["cfg_scale"]) == (64, 64, 4, 5.0)
        assert p.kw["sampler_name"] == "Euler" and p.kw["negative_prompt"] == "blurry"
        assert p.kw["do_not_save_samples"] and p.kw["do_not_save_grid"] and p.kw["sd_model"] == "the model"
        assert p.locked and p.closed
        assert p.seen_args[0] is True and p.seen_args[2] == (0, -1, "Euler")
    assert webui.shared.state.calls == ["begin pivotal-grid", "end"] * 10
    assert not webui.call_queue.queue_lock.locked()
    png, js = Path(out["png"]), Path(out["json"])
    assert png.parent == tmp_path / "outputs" / "pivotal" / "grids" and png.name.startswith("pvtgrid-")
    assert png.is_file() and json.loads(js.read_text()) == record and record["complete"]


def test_the_webui_interrupt_stops_the_grid_between_cells(tmp_path: Path) -> None:
    _bundle(tmp_path / "Lora")
    webui = _webui(interrupt_at=3)
    webui.shared.state.interrupted = True  # left over from an earlier generation: not this grid's
    out = make_grid(BODY, webui, _paths(tmp_path), lambda: False, runner=types.SimpleNamespace(scripts=[]))
    assert len(webui.processing.made) == 3  # no cell started after the Interrupt
    assert out["interrupted"] and not out["record"]["complete"]
    # the cell sampled while Interrupt was pressed is unfinished: left out
    assert [c["column"] for c in out["record"]["cells"]] == ["full", "unet"]


def test_an_interrupt_before_sampling_began_ends_the_grid_without_error(tmp_path: Path) -> None:
    _bundle(tmp_path / "Lora")
    webui = _webui(interrupt_at=2)
    webui.processing.interrupt_empty = True
    out = make_grid(BODY, webui, _paths(tmp_path), lambda: False, runner=types.SimpleNamespace(scripts=[]))
    assert out["interrupted"] and [c["column"] for c in out["record"]["cells"]] == ["full"]


@pytest.mark.parametrize("change, error, field", [
    ({"bundle": "nosuch"}, NotFoundError, "bundle"),
    ({"bundle": ""}, ConfigError, "bundle"),
    ({"columns": ["full", "lora"]}, ConfigError, "columns"),
    ({"width": 60}, ConfigError, "width"),
    ({"steps": "many"}, ConfigError, "steps"),
    ({"auto_prompts": 9}, ConfigError, "auto_prompts"),
    ({"colour": 1}, ConfigError, "colour"),
])
def test_bad_requests_name_the_field(tmp_path: Path, change: dict, error: type, field: str) -> None:
    _bundle(tmp_path / "Lora")
    webui = _webui()
    with pytest.raises(error, match=field):
        make_grid({**BODY, **change}, webui, _paths(tmp_path), lambda: False, runner=types.SimpleNamespace(scripts=[]))
    assert webui.processing.made == []


def test_no_grid_while_a_run_is_going(tmp_path: Path) -> None:
    _bundle(tmp_path / "Lora")
    webui = _webui()
    with pytest.raises(JobBusyError):
        make_grid(BODY, webui, _paths(tmp_path), lambda: True, runner=types.SimpleNamespace(scripts=[]))
    assert webui.processing.made == []


def test_the_route_maps_errors_to_http_statuses(tmp_path: Path) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pivotal.webui.api import add_routes

    _bundle(tmp_path / "Lora")
    _bundle(tmp_path / "Lora", "noemb", names=())
    app = fastapi.FastAPI()
    job = types.SimpleNamespace(running=False)  # the route only asks whether a run is going
    add_routes(app, job, lambda **kw: None, lambda: _paths(tmp_path), webui_provider=_webui)
    client = TestClient(app)
    schema = app.openapi()  # /docs: the body's fields are described
    assert "/pivotal/v1/grid" in schema["paths"]
    assert "bundle" in schema["components"]["schemas"]["PivotalGridRequest"]["properties"]
    assert client.post("/pivotal/v1/grid", json={**BODY, "bundle": "nosuch"}).status_code == 404
    bad = client.post("/pivotal/v1/grid", json={**BODY, "columns": ["lora"]})
    assert bad.status_code == 400 and "columns" in bad.json()["detail"]
    empty = client.post("/pivotal/v1/grid", json={**BODY, "bundle": "noemb", "prompts": [], "auto_prompts": 0})
    assert empty.status_code == 400 and "prompt" in empty.json()["detail"]
    job.running = True
    assert client.post("/pivotal/v1/grid", json=BODY).status_code == 409


def test_the_tab_section_builds_and_its_button_renders_the_grid(tmp_path: Path) -> None:
    import gradio as gr

    from pivotal.webui.grid_tab import build_grid_section, grid_click

    _bundle(tmp_path / "Lora", "older")
    _bundle(tmp_path / "Lora")
    last = {"bundle_path": str(tmp_path / "Lora" / "pvtgrid.safetensors")}
    job: Any = types.SimpleNamespace(running=False, status=lambda: last)
    with gr.Blocks():
        parts = build_grid_section(job, lambda: _paths(tmp_path), _webui)
    assert parts["bundle"].value == "pvtgrid"  # the last run's bundle, not the first by name
    webui = _webui()
    click = grid_click(job, lambda: _paths(tmp_path), lambda: webui)
    sheet, info = click("pvtgrid", "a photo of pvtchar\n\n", 0, 4, 7, "Euler", 64, 64, 3, "")
    assert sheet is not None and "grids/pvtgrid-" in info and ".json" in info
    assert [p.kw["prompt"] for p in webui.processing.made][:1] == ["a photo of pvtchar <lora:pvtgrid:1>"]
    assert len(webui.processing.made) == 5 and webui.processing.made[0].kw["seed"] == 3
    sheet, info = click("nosuch", "x", 0, 4, 7, "Euler", 64, 64, 3, "")
    assert sheet is None and "nosuch" in info and "bundle" in info
    job.running = True
    sheet, info = click("pvtgrid", "x", 0, 4, 7, "Euler", 64, 64, 3, "")
    assert sheet is None and "training run" in info
