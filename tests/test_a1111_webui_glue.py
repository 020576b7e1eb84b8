"""Glue tests of the webui runner and API helpers with fakes of the webui's state, queue and Lora
extension (the real webui is exercised in tests/integration)."""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from pivotal.errors import ConfigError
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.formats.safetensors_io import atomic_save
from pivotal.training.config import TrainConfig
from pivotal.training.progress import ProgressEvent, TrainResult
from pivotal.webui import runner
from pivotal.webui.api import config_from_request, list_bundles, preview_options


class FakeState:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.interrupted = False
        self.stopping_generation = False
        self.job_no = self.job_count = 0
        self.textinfo = ""
        self.image: Any = None

    def begin(self, job: str) -> None:
        self.calls.append(f"begin {job}")

    def end(self) -> None:
        self.calls.append("end")

    def assign_current_image(self, image: Any) -> None:
        self.image = image


def _bundle(path: Path, name: str = "pvtchar") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_x.alpha": torch.tensor(2.0)}
    write_bundle(path, "sd1", lora, [BundleEmbedding(name, {"clip_l": torch.randn(2, 32)}, "person")],
                 TrainingInfo(path.stem))
    return path


def _host(state: FakeState, lock: Any, rescans: list[int]) -> Any:
    db = types.SimpleNamespace(word_embeddings={"Folder": types.SimpleNamespace(filename="folder.pt")},
                               skipped_embeddings={})
    networks = types.SimpleNamespace(list_available_networks=lambda: rescans.append(1))
    webui = types.SimpleNamespace(embedding_db=db, networks=networks, shared=types.SimpleNamespace(state=state),
                                  call_queue=types.SimpleNamespace(queue_lock=lock))
    return types.SimpleNamespace(webui=webui)


def test_a_run_holds_the_queue_mirrors_progress_and_publishes(tmp_path: Path) -> None:
    state, lock, rescans = FakeState(), threading.Lock(), []
    host = _host(state, lock, rescans)
    lora_dir = tmp_path / "Lora"
    config = TrainConfig(out_dir=str(tmp_path / "out"), output_name="mybundle", steps=3)
    seen: dict[str, Any] = {}
    events: list[ProgressEvent] = []

    def fake_train(cfg: TrainConfig, h: Any, on_event: Any, stop: threading.Event, resume: Any,
                   taken_names: dict[str, str], variants: Any = ()) -> TrainResult:
        seen["locked"] = lock.locked()
        seen["taken"] = taken_names
        seen["task"] = runner.current_task_id()
        on_event(ProgressEvent("step", step=2, total=3, loss=0.5))
        seen["job_no"], seen["text"] = state.job_no, state.textinfo
        path = _bundle(tmp_path / "out" / "mybundle.safetensors")
        return TrainResult("completed", 3, 3, str(path))

    result = runner.run_in_webui(config, host, events.append, threading.Event(), train_fn=fake_train,
                                 lora_dir=str(lora_dir))
    assert seen["locked"] and not lock.locked()
    assert seen["taken"] == {"folder": "folder.pt"}
    assert seen["job_no"] == 2 and "step 2/3" in seen["text"] and "0.5" in seen["text"]
    # a task id of its own per run (the webui remembers finished ids), gone once the run ends
    assert seen["task"].startswith(runner.task_id(config)[:-1] + "-") and runner.current_task_id() == ""
    assert state.calls == [f"begin {seen['task']}", "end"] and rescans == [1]
    assert result.bundle_path == str(lora_dir / "mybundle.safetensors")
    assert Path(result.bundle_path).read_bytes() == (tmp_path / "out" / "mybundle.safetensors").read_bytes()


def test_a_sweep_variant_may_share_the_embedding_names_of_the_other_variants(tmp_path: Path) -> None:
    state, lock = FakeState(), threading.Lock()
    host = _host(state, lock, [])
    lora_dir = tmp_path / "Lora"
    _bundle(lora_dir / "hero-te_lr1e-06.safetensors", "pvtchar")  # the sweep's first variant, published
    host.webui.embedding_db.word_embeddings["pvtchar"] = types.SimpleNamespace(
        filename=str(lora_dir / "hero-te_lr1e-06.safetensors" / "pvtchar"))  # and used in a generation
    config = TrainConfig(out_dir=str(tmp_path / "out"), output_name="hero-te_lr1e-05", steps=3)
    assert "pvtchar" in runner.taken_names(host.webui, config, str(lora_dir))
    seen: dict[str, Any] = {}

    def fake_train(cfg: TrainConfig, h: Any, on_event: Any, stop: threading.Event, resume: Any,
                   taken_names: dict[str, str], variants: Any = ()) -> TrainResult:
        seen["taken"], seen["variants"] = taken_names, variants
        return TrainResult("failed", 0, 3)

    runner.run_in_webui(config, host, lambda e: None, threading.Event(), train_fn=fake_train, lora_dir=str(lora_dir),
                        variants=["hero-te_lr1e-06"])
    assert "pvtchar" not in seen["taken"] and seen["variants"] == ["hero-te_lr1e-06"]


def test_the_webui_interrupt_stops_the_trainer() -> None:
    state, stop = FakeState(), threading.Event()
    bridge = runner._StateBridge(state, lambda e: None, stop, 10)
    bridge(ProgressEvent("step", step=1, total=10))
    assert not stop.is_set()
    state.interrupted = True
    bridge(ProgressEvent("step", step=2, total=10))
    assert stop.is_set()


def test_a_lora_pivotal_did_not_write_is_never_overwritten(tmp_path: Path) -> None:
    config = TrainConfig(out_dir=str(tmp_path), output_name="theirs")
    atomic_save(tmp_path / "theirs.safetensors", {"x": torch.zeros(1)}, {"ss_output_name": "theirs"})
    with pytest.raises(ConfigError, match="not written by Pivotal"):
        runner.check_publishable(config, str(tmp_path))
    _bundle(tmp_path / "ours.safetensors")
    runner.check_publishable(TrainConfig(out_dir=str(tmp_path), output_name="ours"), str(tmp_path))


def test_api_config_defaults_and_refusals(tmp_path: Path) -> None:
    emb = [{"name": "pvtchar", "vectors": 1}]
    cfg = config_from_request({"config": {"data_dir": "d", "output_name": "abc", "steps": 5, "embeddings": emb}},
                              str(tmp_path))
    assert cfg.out_dir == str(tmp_path / "abc") and cfg.steps == 5
    with pytest.raises(ConfigError, match="config"):
        config_from_request({"steps": 5}, str(tmp_path))
    with pytest.raises(ConfigError):
        config_from_request({"config": {"steps": 0, "embeddings": emb}}, str(tmp_path))


def test_bundle_listing_names_embeddings_and_reports_broken_files(tmp_path: Path) -> None:
    _bundle(tmp_path / "sub" / "mine.safetensors")
    atomic_save(tmp_path / "plain.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)}, {})
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    listed = {b["name"]: b for b in list_bundles(str(tmp_path))}
    assert listed["mine"]["embeddings"] == ["pvtchar"] and listed["mine"]["made_by_pivotal"]
    assert "plain" not in listed
    assert "error" in listed["broken"]
    assert list_bundles(str(tmp_path / "missing")) == []


def test_preview_options_are_checked() -> None:
    assert preview_options({"preview_sampler": " DPM++ 2M ", "preview_cfg": "5"}) == {"preview_sampler": "DPM++ 2M",
                                                                                   "preview_cfg": 5.0}
    assert preview_options({}) == {}
    with pytest.raises(ConfigError, match="preview_cfg"):
        preview_options({"preview_cfg": "lots"})
    with pytest.raises(ConfigError, match="preview_sampler"):
        preview_options({"preview_sampler": ""})


def test_a_partial_bundle_never_replaces_a_foreign_file(tmp_path: Path) -> None:
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    atomic_save(lora_dir / "x-step000003.safetensors", {"x": torch.zeros(1)}, {})
    partial = _bundle(tmp_path / "out" / "x-step000003.safetensors")
    events: list[ProgressEvent] = []
    result = runner._published(TrainResult("interrupted", 3, 10, str(partial)), str(lora_dir), events.append)
    assert result.bundle_path == str(partial) and "not published" in result.warnings[-1]
    assert events[-1].kind == "warning"
