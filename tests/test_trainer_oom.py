"""Out of memory at any point of a run (reliability checklist 26), forced by the fault-injection
hook (:mod:`pivotal.training.faults`): at the first step, mid-run, during a preview, during a save. Each
ends in a TrainingError that says where and what to change; the host is exactly as before; no
LoRA network, optimizer or embedding of the run is left alive; a generation works afterwards; a
save that failed left no file or temp file behind."""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # six runs with faults injected, each followed by a generation

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.errors import TrainingError  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from pivotal.training.faults import ENV  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402
from test_trainer import config, host_state  # noqa: E402

CASES = {  # fault spec -> where the error says it happened, the saves (every 2 steps) kept
    "first step": ({"point": "step", "step": 0}, "at step 1 of 6", []),
    "mid-run": ({"point": "step", "step": 3}, "at step 4 of 6", ["t-step000002"]),
    "preview": ({"point": "preview", "step": 2}, "during the preview after step 2", ["t-step000002"]),
    "mid-run save": ({"point": "save", "step": 4}, "while saving t-step000004.safetensors after step 4",
                     ["t-step000002"]),
    "final save": ({"point": "save", "step": 6}, "while saving t.safetensors after step 6",
                   ["t-step000002", "t-step000004"]),
}


def _live_networks() -> int:
    gc.collect()
    return sum(isinstance(o, LoraNetwork) for o in gc.get_objects())


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_memory_stops_cleanly(case: str, host, data_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec, where, kept = CASES[case]
    fault_file = tmp_path / "fault.json"
    fault_file.write_text(json.dumps({**spec, "error": "oom"}), encoding="utf-8")
    monkeypatch.setenv(ENV, str(fault_file))
    before = host_state(host)
    networks = _live_networks()
    import pivotal.training.trainer as trainer_module

    at_release: list[int] = []
    original = trainer_module.release_memory
    # By the time the CUDA cache is emptied, nothing of the run may be alive (the traceback of an
    # OOM holds the run's frames: emptying the cache while it lives would free nothing).
    monkeypatch.setattr(trainer_module, "release_memory", lambda: (at_release.append(_live_networks()), original()))
    out = tmp_path / "out"
    cfg = config(data_dir, out, save_every=2, preview_every=2, preview_steps=2)
    with pytest.raises(TrainingError) as caught:
        train(cfg, host, None, threading.Event())
    message = str(caught.value)
    assert message.startswith(f"out of GPU memory {where}: CUDA out of memory"), message
    assert "gradient_checkpointing" in message and "batch_size" in message
    assert ("saved before it" in message) == bool(kept), message
    assert at_release == [networks]
    assert host_state(host) == before
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(f for stem in kept for f in (f"{stem}.safetensors", f"{stem}.resume.safetensors")), files
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    monkeypatch.delenv(ENV)
    image = host.generate("mychar", "", EmbeddingSet(), 2, 0, 64, 64, 4.0)  # the model works afterwards
    assert image.size == (64, 64)


def test_no_fault_file_means_no_fault(host, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "absent.json"))
    result = train(config(data_dir, tmp_path / "out", steps=2), host, None, threading.Event())
    assert result.status == "completed"
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    monkeypatch.setenv(ENV, str(tmp_path / "bad.json"))
    assert train(config(data_dir, tmp_path / "out2", steps=2), host, None, threading.Event()).status == "completed"
    (tmp_path / "other.json").write_text(json.dumps({"point": "step", "step": 1, "error": "runtime"}), "utf-8")
    monkeypatch.setenv(ENV, str(tmp_path / "other.json"))
    with pytest.raises(RuntimeError, match="fault injected"):  # not an OOM: passed on as it is
        train(config(data_dir, tmp_path / "out3", steps=2), host, None, threading.Event())
