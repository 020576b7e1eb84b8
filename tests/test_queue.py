"""``pivotal queue``: three tiny configs on the sd1 demo model run one after another, a stopped queue
resumes where it stopped (finished runs skipped, the interrupted run from its resume file, with the
losses an uninterrupted run has), and the summary table / JSON say what happened."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the standalone diffusers host is not used in the webui environment")

from pivotal.cli.main import main  # noqa: E402
from pivotal.demo.data import make_demo_dataset  # noqa: E402
from pivotal.demo.host import build_demo_host  # noqa: E402
from pivotal.demo.settings import DEMO_SETTINGS  # noqa: E402
from pivotal.errors import ConfigError  # noqa: E402
from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.training.config import EmbeddingSpec  # noqa: E402
from pivotal.training.progress import ProgressEvent  # noqa: E402
from pivotal.training.queue import SUMMARY_FILE, queue_config, run_queue  # noqa: E402
from pivotal.training.state import META_KEY  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402

STEPS = 4


def write_queue(folder: Path) -> None:
    """Three configs as a user writes them: TOML and JSON, paths relative to the queue folder."""
    folder.mkdir()
    make_demo_dataset(folder / "data", ["mychar"], count=4, size=64, seed=0)
    common = f'data_dir = "data"\nsteps = {STEPS}\nsave_every = 2\nembeddings = ["mychar:1"]\n'
    (folder / "a-first.toml").write_text(common + "seed = 1\n")
    (folder / "b-second.toml").write_text(common + 'seed = 2\noutput_name = "second"\n')
    (folder / "c-third.json").write_text(json.dumps({"data_dir": "data", "steps": STEPS, "seed": 3,
                                                     "embeddings": ["mychar:1"]}))


def build(path: Path):
    return queue_config(path, dict(DEMO_SETTINGS))


@pytest.mark.slow
def test_queue_runs_stops_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "queue"
    write_queue(folder)
    host = build_demo_host("sd1", device="cpu")
    stop = threading.Event()

    def stop_second_run_at_step_2(config: str, e: ProgressEvent) -> None:
        if config == "b-second.toml" and e.kind == "step" and e.step == 2:
            stop.set()  # as Ctrl-C would: the run saves at its next step boundary and the queue stops

    runs = run_queue(folder, host, build, stop_second_run_at_step_2, stop)
    assert [(r.config, r.status, r.steps) for r in runs] == [
        ("a-first.toml", "completed", STEPS), ("b-second.toml", "interrupted", 2), ("c-third.json", "pending", 0)]
    out = folder / "output"
    assert runs[0].bundle == str(out / "a-first.safetensors")
    assert (out / "second-step000002.resume.safetensors").is_file()
    recorded = json.loads((folder / SUMMARY_FILE).read_text())
    assert [r["status"] for r in recorded["runs"]] == ["completed", "interrupted", "pending"]
    first_bundle = (out / "a-first.safetensors").stat().st_mtime_ns

    # Again, from the command line: the first run is skipped, the second resumes, the third runs.
    code = main(["queue", str(folder), "--demo", "sd1", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    recorded = json.loads((folder / SUMMARY_FILE).read_text())["runs"]
    assert [(r["config"], r["status"], r["steps"], r["skipped"]) for r in recorded] == [
        ("a-first.toml", "completed", STEPS, True), ("b-second.toml", "completed", STEPS, False),
        ("c-third.json", "completed", STEPS, False)]
    assert recorded[1]["resumed_from"] == str(out / "second-step000002.resume.safetensors")
    assert (out / "a-first.safetensors").stat().st_mtime_ns == first_bundle  # not trained again
    assert all(isinstance(r["loss"], float) for r in recorded)
    for r in recorded:
        assert r["config"] in text and r["bundle"] in text
    assert "val loss" in text and "(resumed)" in text and "(earlier)" in text

    # The resumed run is the run an uninterrupted one is: the same losses, step for step (the
    # final resume file records every step's loss).
    cfg = build(folder / "b-second.toml")
    cfg.out_dir = str(tmp_path / "straight")
    straight = train(cfg, host)
    record = json.loads(read_header(out / "second.resume.safetensors").metadata[META_KEY])
    assert record["losses"] == pytest.approx(straight.losses, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_queue_failures_do_not_stop_it_and_are_retried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "queue"
    write_queue(folder)
    (folder / "b-second.toml").write_text('data_dir = "nowhere"\nsteps = 2\nembeddings = ["mychar:1"]\n')
    (folder / "c-third.json").unlink()
    code = main(["queue", str(folder), "--demo", "sd1", "--device", "cpu", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 1
    runs = [e for e in lines if e["event"] == "run"]
    assert [(r["config"], r["status"]) for r in runs] == [("a-first.toml", "completed"), ("b-second.toml", "failed")]
    assert "nowhere" in runs[1]["message"]
    assert lines[-1]["event"] == "summary" and len(lines[-1]["runs"]) == 2
    # fixed, and run again: only the failed one trains
    (folder / "b-second.toml").write_text('data_dir = "data"\nsteps = 2\nembeddings = ["mychar:1"]\n')
    assert main(["queue", str(folder), "--demo", "sd1", "--device", "cpu", "--json"]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"event": "run"')]
    assert [(r["config"], r["status"], r["skipped"]) for r in runs] == [
        ("a-first.toml", "completed", True), ("b-second.toml", "completed", False)]


def test_queue_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such queue folder"):
        run_queue(tmp_path / "absent", None, build)  # type: ignore[arg-type]
    (tmp_path / "empty").mkdir()
    assert main(["queue", str(tmp_path / "empty"), "--demo", "sd1"]) == 2
    cfg = queue_config(_write(tmp_path / "x.toml", 'data_dir = "d"\nembeddings = ["mychar"]\n'))
    assert cfg.output_name == "x" and Path(cfg.out_dir) == tmp_path / "output"
    assert Path(cfg.data_dir) == tmp_path / "d" and cfg.embeddings == [EmbeddingSpec("mychar")]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
