"""Validation history across a resume: the resume file keeps the evaluations so far, the resumed
run starts from them (its "start" event hands them on), and the job's snapshot, hence the chart,
goes on from the earlier points instead of restarting. (The whole resumed run on the demo host:
test_validation.py::test_resume_with_validation_equals_the_uninterrupted_run, slow.)"""

from __future__ import annotations

from pathlib import Path

import torch

from pivotal.errors import TrainingError
from pivotal.training.job import TrainingJob
from pivotal.training.job_state import RunState as JobRun
from pivotal.training.progress import LossSmoother, ProgressEvent
from pivotal.training.state import RunState, load_state, save_state


def _parts() -> tuple[list, torch.optim.Optimizer, torch.Generator]:
    p = torch.nn.Parameter(torch.ones(3))
    return [("w", p)], torch.optim.AdamW([p], lr=0.1), torch.Generator().manual_seed(1)


def test_the_resume_file_keeps_the_validation_points(tmp_path: Path) -> None:
    params, opt, gen = _parts()
    state = RunState(4, {"steps": 8}, "model", losses=[0.4, 0.3, 0.2, 0.1], validation=[[2, 0.5], [4, 0.45]],
                     drifts=[[2, 1.5], [4, 2.5]])
    save_state(tmp_path / "r.resume.safetensors", state, params, opt, gen)
    back = load_state(tmp_path / "r.resume.safetensors", {"steps": 8}, "model", *_parts())
    assert back.validation == [[2, 0.5], [4, 0.45]] and back.drifts == [[2, 1.5], [4, 2.5]]
    assert back.losses == [0.4, 0.3, 0.2, 0.1]


def test_a_file_from_before_validation_history_loads_with_none(tmp_path: Path) -> None:
    import json

    from pivotal.formats.safetensors_io import atomic_save, load_tensors, read_header
    from pivotal.training.state import META_KEY

    params, opt, gen = _parts()
    path = tmp_path / "old.resume.safetensors"
    save_state(path, RunState(2, {}, "model", validation=[[2, 0.5]]), params, opt, gen)
    header = read_header(path)
    record = json.loads(header.metadata[META_KEY])
    del record["validation"], record["drifts"]  # as files written before this record existed
    atomic_save(path, load_tensors(header), {META_KEY: json.dumps(record)})
    back = load_state(path, {}, "model", *_parts())
    assert back.validation == [] and back.drifts == []
    try:
        load_state(path, {}, "another model", *_parts())
    except TrainingError as e:
        assert "another model" in str(e)


def test_the_job_goes_on_from_the_resumed_history() -> None:
    job = TrainingJob()
    run = JobRun(run_id=1)
    job._run = run
    history = {"losses": [0.5, 0.4, 0.3], "validation_losses": [[2, 0.6], [3, 0.55]], "validation_drifts": [[3, 1.0]]}
    job._on_event(run, ProgressEvent("start", step=3, total=6, data={"history": history}))
    job._on_event(run, ProgressEvent("step", step=4, total=6, loss=0.2, smoothed_loss=0.3))
    job._on_event(run, ProgressEvent("validation", step=4, total=6, data={"validation_loss": 0.5}))
    snap = job.status()
    assert snap["losses"] == [0.5, 0.4, 0.3, 0.2]
    smoother = LossSmoother()
    assert snap["smoothed_losses"][:3] == [smoother.update(v) for v in (0.5, 0.4, 0.3)]
    assert snap["validation_losses"] == [[2, 0.6], [3, 0.55], [4, 0.5]]
    assert snap["validation_drifts"] == [[3, 1.0]]
