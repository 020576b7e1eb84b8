"""``pivotal sweep``: one config per combination of the varied values (checked against the setting
declarations before anything is written), named after the values, run as a queue and ranked by
validation loss; the bundles record the swept values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pivotal.errors import ConfigError
from pivotal.training.queue import QueueRun, queue_config
from pivotal.training.sweep import ranked, value_text, write_sweep


def write_base(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "mychar.toml"
    base.write_text('data_dir = "data"\nsteps = 2\nembeddings = ["mychar:1"]\n' + extra)
    return base


def test_one_config_per_combination_named_after_its_values(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base", 'output_name = "hero"\n')
    paths = write_sweep(base, ["te_lr=1e-6,1e-5", "unet_rank=2"], tmp_path / "sweep")
    assert [p.name for p in paths] == ["hero-te_lr1e-06-unet_rank2.json", "hero-te_lr1e-05-unet_rank2.json"]
    run = json.loads(paths[1].read_text())
    assert run["output_name"] == "hero-te_lr1e-05-unet_rank2" and run["sweep"] == ["te_lr=1e-05", "unet_rank=2"]
    assert run["te_lr"] == 1e-5 and run["unet_rank"] == 2 and run["steps"] == 2
    assert run["data_dir"] == str((tmp_path / "base" / "data").resolve())  # still the base's data, from anywhere
    cfg = queue_config(paths[1])
    assert cfg.te_lr == 1e-5 and cfg.sweep == ["te_lr=1e-05", "unet_rank=2"]
    assert cfg.out_dir == str(tmp_path / "sweep" / "output")
    assert "sweep" not in cfg.fingerprint()  # the record does not change what trains


def test_values_in_names() -> None:
    assert [value_text(v) for v in (1e-5, 0.5, 3e6, True, 8, "attn-mlp")] == [
        "1e-05", "0p5", "3e06", "true", "8", "attn-mlp"]


@pytest.mark.parametrize("varies, match", [
    (["te_lrr=1e-5"], r"'te_lrr' is not a setting"),
    (["te_lr=1e-5,-1"], r"--vary te_lr: must be 0 or more, got -1"),
    (["te_lr=fast"], r"--vary te_lr: 'fast' is not a float"),
    (["optimizer=adamw,sgd"], r"--vary optimizer: 'sgd' is not one of adamw"),
    (["output_name=a,b"], r"--vary output_name: this setting cannot be swept"),
    (["te_lr=1e-5", "unet_rank=2", "seed=1"], r"--vary: give 1 to 2 settings"),
    (["te_lr=1e-5", "te_lr=1e-4"], r"--vary te_lr: the same setting is varied twice"),
    (["te_lr=1e-5,1e-5"], r"--vary te_lr: a value is listed twice"),
    (["te_lr"], r"write NAME=VALUE,VALUE"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path: Path, varies: list[str], match: str) -> None:
    base = write_base(tmp_path / "base")
    with pytest.raises(ConfigError, match=match):
        write_sweep(base, varies, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_ranked_by_validation_loss() -> None:
    runs = [QueueRun("a", validation_loss=0.3), QueueRun("b"), QueueRun("c", validation_loss=0.1)]
    assert [r.config for r in ranked(runs)] == ["c", "a", "b"]
    assert [r.config for r in ranked([QueueRun("x"), QueueRun("y")])] == ["x", "y"]


@pytest.mark.slow
def test_sweep_trains_ranks_and_records_the_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers", reason="the standalone diffusers host is not used in the webui environment")
    from pivotal.cli.main import main
    from pivotal.demo.data import make_demo_dataset
    from pivotal.formats.safetensors_io import read_header

    base = write_base(tmp_path / "base", "te_lora = true\nvalidation_count = 1\nvalidation_timesteps = 2\n")
    make_demo_dataset(tmp_path / "base" / "data", ["mychar"], count=3, size=64, seed=0)
    sweep = tmp_path / "sweep"
    args = ["sweep", str(base), "--vary", "te_lr=1e-6,1e-2", "--out", str(sweep), "--demo", "sd1", "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    summary = json.loads((sweep / "queue-summary.json").read_text())["runs"]
    assert [(r["config"], r["status"]) for r in summary] == [("mychar-te_lr0p01.json", "completed"),
                                                             ("mychar-te_lr1e-06.json", "completed")]
    losses = {r["config"]: r["validation_loss"] for r in summary}
    assert all(isinstance(v, float) for v in losses.values())
    table = [line.split()[0] for line in text.splitlines() if line.startswith("mychar-te_lr") and "completed" in line]
    assert table == sorted(losses, key=losses.__getitem__)  # best validation loss first
    for r in summary:
        meta = read_header(r["bundle"]).metadata
        swept = r["config"].removeprefix("mychar-te_lr").removesuffix(".json").replace("p", ".")
        assert json.loads(meta["pivotal.sweep"]) == {"te_lr": repr(float(swept))}
        assert float(meta["pivotal.validation_loss"]) == r["validation_loss"]
    # again: nothing trains twice; then the variants x parts grid, next to the sweep
    assert main(args + ["--grid", "mychar on a blue background", "--grid-steps", "2", "--grid-seed", "3"]) == 0
    assert capsys.readouterr().out.count("(earlier)") == 2
    record = json.loads((sweep / "sweep-grid.json").read_text())
    assert record["row_bundles"] == [Path(r).stem for r in sorted(
        (r["bundle"] for r in summary), key=lambda b: losses[Path(b).stem + ".json"])]
    assert record["columns"] == ["full", "unet", "te", "emb", "base"] and record["complete"]
    assert {c["seed"] for c in record["cells"]} == {3} and (sweep / "sweep-grid.png").is_file()


def test_queue_takes_a_relative_validation_folder_from_the_config_folder(tmp_path: Path) -> None:
    base = write_base(tmp_path / "q", 'validation_dir = "val"\n')
    assert queue_config(base).validation_dir == str(tmp_path / "q" / "val")
    swept = write_sweep(base, ["te_lr=1e-5"], tmp_path / "sweep")  # the sweep folder is elsewhere
    assert queue_config(swept[0]).validation_dir == str((tmp_path / "q" / "val").resolve())
