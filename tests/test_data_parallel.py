"""Data-parallel training through the standard launchers, on CPU (gloo), 2 processes.

``torchrun -m pivotal train`` and ``accelerate launch -m pivotal train`` train the sd1 demo model with
a global batch of 3 split over 2 processes (shards of 2 and 1, and 1 and 0 on the 7-image dataset's
last batch of each epoch); their per-step losses equal a single process's with the same global
batch within a relative 1e-5 (measured: ~2e-7; the shards' sums are added in another order), their
bundles within fp16 rounding, only rank 0 reports and writes, and a resumed 2-process run continues
the uninterrupted one's losses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the standalone diffusers host is not used in the webui environment")

from pivotal.errors import ConfigError  # noqa: E402
from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.training import distributed  # noqa: E402
from pivotal.training.distributed import DataParallel  # noqa: E402
from pivotal.training.state import META_KEY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
BIN = Path(sys.executable).parent
TRAIN = ["-m", "pivotal", "train", "--demo", "sd1", "--steps", "6", "--batch-size", "3", "--save-every", "3",
         "--embedding", "mychar:2:person", "--device", "cpu", "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT / "lib") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], cwd: Path) -> list[dict]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _losses(resume_file: Path) -> list[float]:
    return json.loads(read_header(resume_file).metadata[META_KEY])["losses"]


def _bundle(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed here")
def test_two_processes_match_one(tmp_path: Path) -> None:
    from pivotal.demo.data import make_demo_dataset

    data = tmp_path / "data"
    make_demo_dataset(data, ["mychar"], count=7, size=64, seed=0)  # batches of 3, 3, 1 per epoch
    train = TRAIN + ["--data", str(data)]
    single = _run([sys.executable, *train, "--out", str(tmp_path / "one")], tmp_path)
    torchrun = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_free_port())]
    events = _run([*torchrun, *train, "--out", str(tmp_path / "two")], tmp_path)

    want = _losses(tmp_path / "one" / "pivotal.resume.safetensors")
    got = _losses(tmp_path / "two" / "pivotal.resume.safetensors")
    assert len(want) == len(got) == 6
    assert got == pytest.approx(want, rel=LOSS_RTOL)
    # one process reports: each step once, one summary; and the same events as the single run
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert sum(e["event"] == "summary" for e in events) == 1
    assert [e["event"] for e in events] == [e["event"] for e in single]
    # the bundles agree to fp16 rounding (they are saved in fp16)
    a, b = _bundle(tmp_path / "one" / "pivotal.safetensors"), _bundle(tmp_path / "two" / "pivotal.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=2e-3, atol=2e-4)
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "one").glob("*.safetensors"))

    # resume: 2 processes from the step-3 save continue the uninterrupted run's losses
    resume = tmp_path / "two" / "pivotal-step000003.resume.safetensors"
    _run([*torchrun[:-1], str(_free_port()), *train, "--out", str(tmp_path / "resumed"), "--resume", str(resume)],
         tmp_path)
    assert _losses(tmp_path / "resumed" / "pivotal.resume.safetensors") == pytest.approx(want, rel=LOSS_RTOL)

    # accelerate's launcher starts the same 2-process group (--multi_gpu selects its torchrun
    # launcher; on a machine without GPUs the processes use gloo on the CPU)
    accelerate = BIN / "accelerate"
    if accelerate.exists():
        _run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              *train, "--out", str(tmp_path / "acc")], tmp_path)
        assert _losses(tmp_path / "acc" / "pivotal.resume.safetensors") == pytest.approx(want, rel=LOSS_RTOL)


@pytest.mark.parametrize("count, world", [(3, 2), (1, 2), (7, 3), (0, 2), (4, 4)])
def test_shards_cover_the_batch_once(count: int, world: int) -> None:
    parts = [DataParallel(rank, world).shard(count) for rank in range(world)]
    covered = [i for p in parts for i in range(count)[p]]
    assert covered == list(range(count))
    sizes = [len(range(count)[p]) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # rank 0 has the most


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.from_environment() is None and distributed.local_device() is None
    assert distributed.launched_rank() == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        distributed.from_environment()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not a number"):
        distributed.from_environment()
