"""The app's page builds, and its handlers behave, in both gradio versions (3.41 and current).

Nothing is launched: the Blocks is built and the tabs' handlers are called directly, with a
TrainingJob whose trainer is a small fake (the real run is in test_app_browser.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from setting_samples import VARIANTS, sample_config

gr = pytest.importorskip("gradio")
torch = pytest.importorskip("torch")

from pivotal.errors import ConfigError  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.job import TrainingJob  # noqa: E402
from pivotal.training.progress import ProgressEvent, TrainResult  # noqa: E402
from pivotal.training.settings import declared  # noqa: E402
from pivotal.ui.app import build_app, cached_host_provider  # noqa: E402
from pivotal.ui.bundle_list import find_bundles  # noqa: E402
from pivotal.ui.generate_tab import NO_BUNDLE, _with_lora_tag, build_generate_tab  # noqa: E402
from pivotal.ui.loss_chart import render_loss_chart  # noqa: E402
from pivotal.ui.progress_view import format_duration, message_html, progress_html  # noqa: E402
from pivotal.ui.train_form import (  # noqa: E402
    config_from_form,
    form_field_names,
    form_settings,
    form_values_from_config,
)
from pivotal.ui.train_tab import build_train_tab  # noqa: E402

LIB = Path(__file__).resolve().parent.parent / "lib"


def base_config(**kw: Any) -> TrainConfig:
    values = dict(data_dir="/data", out_dir="/out", embeddings=[EmbeddingSpec("mychar", 2, "person")], steps=4,
                  resolution=64)
    values.update(kw)
    return TrainConfig(**values)


def fake_trainer(cfg: TrainConfig, host: Any, on_event: Any, stop: threading.Event, resume: Any = None) -> TrainResult:
    for step in range(1, cfg.steps + 1):
        if stop.is_set():
            return TrainResult("interrupted", step - 1, cfg.steps)
        on_event(ProgressEvent("step", step=step, total=cfg.steps, loss=1.0 / step, smoothed_loss=1.0 / step,
                               eta_s=0.0, phase="together"))
    return TrainResult("completed", cfg.steps, cfg.steps, bundle_path=f"{cfg.out_dir}/x.safetensors",
                       message="completed")


def form_values(cfg: TrainConfig, **changes: Any) -> list[Any]:
    values = form_values_from_config(cfg)
    values.update(changes)
    return [values[n] for n in form_field_names()]


def write_fake_bundle(path: Path, names: list[str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"bundle_emb.{n}.string_to_param.*": torch.zeros(2, 8) for n in names}
    tensors["lora_unet_x.alpha"] = torch.tensor(1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


# -- the page -----------------------------------------------------------------------------------
def test_app_builds_without_launching(tmp_path: Path) -> None:
    calls: list[int] = []
    blocks = build_app(lambda: calls.append(1), str(tmp_path), str(tmp_path / "data"), host_label="demo sd1",
                       base=base_config(out_dir=str(tmp_path)), demo=True, generate_size=64)
    assert isinstance(blocks, gr.Blocks)
    assert calls == []  # the host is not loaded to build the page
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"pivotal-start", "pivotal-interrupt", "pivotal-progress", "pivotal-chart", "pivotal-previews",
            "pivotal-gen-bundle", "pivotal-gen-go", "pivotal-gen-image", "pivotal-data-dir"} <= ids
    text = str(config)
    assert "RANDOM weights" in text and "demo sd1" in text
    # The pre-trained sd1 demo says what it is, and the Generate tab starts from a prompt it knows.
    blocks = build_app(lambda: None, str(tmp_path), str(tmp_path / "data"), host_label="tiny-world sd1",
                       base=base_config(out_dir=str(tmp_path)), demo=True, generate_size=64, pretrained_demo=True)
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    text = str(config)
    assert "RANDOM" not in text and "pre-trained on a synthetic world" in text
    assert "mychar on a blue background, top left" in text


def test_app_header_names_the_pretrained_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pivotal app --demo sd1`` (up to the launch, which is skipped) heads its page with the
    pre-trained tiny-world model's label, not the random-weights one."""
    pytest.importorskip("diffusers", reason="the demo model's UNet and VAE are diffusers modules")
    import argparse

    import pivotal.ui.app as app
    from pivotal.demo.host import DEMO_LABELS

    built: list[Any] = []
    monkeypatch.setattr(app, "launch", lambda blocks, **kw: built.append(blocks) or "")
    monkeypatch.setattr(app, "serve_until_ctrl_c", lambda blocks, job: 0)
    args = argparse.Namespace(demo="sd1", model=None, out=str(tmp_path), device="cpu", port=0, no_browser=True)
    assert app.run_app(args) == 0
    config = built[0].get_config_file() if hasattr(built[0], "get_config_file") else built[0].config
    text = str(config)
    assert f'<b id="pivotal-host-label">{DEMO_LABELS["sd1"]}</b>' in text
    assert "random weights" not in text.lower() and "pre-trained on a synthetic world" in text


def test_tabs_embed_in_an_existing_blocks(tmp_path: Path) -> None:
    """The webui builds its own Blocks and asks for the tab inside it; the tab offers the demo's
    tiny-world reward (a webui may have the exported demo model loaded)."""
    from pivotal.training.rewards import reward_names, unregister_reward

    unregister_reward("tiny_world")
    job = TrainingJob(trainer=fake_trainer)
    with gr.Blocks() as outer:
        gr.Markdown("the webui's own content")
        with gr.Tab("Pivotal"):
            tab = build_train_tab(job, lambda: object(), data_dir="/d", out_dir=str(tmp_path),
                                  base=base_config(), elem_prefix="pv")
        with gr.Tab("Try"):
            gen = build_generate_tab(job, lambda: object(), out_dir=str(tmp_path), elem_prefix="pv")
    assert isinstance(outer, gr.Blocks)
    assert tab.fields["data_dir"].value == "/d" and tab.fields["emb0_name"].value == "mychar"
    assert gen.bundle.value == NO_BUNDLE
    assert "tiny_world" in reward_names()


def test_the_form_has_an_input_per_setting_with_unique_ids(tmp_path: Path) -> None:
    job = TrainingJob(trainer=fake_trainer)
    with gr.Blocks() as blocks:
        tab = build_train_tab(job, lambda: object(), data_dir="/d", out_dir=str(tmp_path), base=sample_config())
    assert set(tab.fields) == set(form_field_names())
    assert tab.fields["unet_lr"].value == sample_config().unet_lr  # each input starts from the base config
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    ids = [c.get("props", {}).get("elem_id") for c in config["components"]]
    ids = [i for i in ids if i]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    # the ids the browser tests use, the sections, and one per input
    assert {"pivotal-data-dir", "pivotal-output-name", "pivotal-emb0-name", "pivotal-emb0-init", "pivotal-steps",
            "pivotal-resolution", "pivotal-preview-every", "pivotal-saving", "pivotal-optimizer", "pivotal-lora",
            "pivotal-data", "pivotal-advanced"} <= set(ids)
    assert sum(i.startswith("pivotal-") for i in ids) >= len(tab.fields)


def test_parser_and_package_do_not_import_gradio() -> None:
    code = ("import sys; import pivotal.ui, pivotal.training.job; from pivotal.cli.main import build_parser; "
            "build_parser(); print('gradio' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(LIB), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# -- Train tab handlers ---------------------------------------------------------------------------
def build_tab(job: TrainingJob, tmp_path: Path) -> Any:
    with gr.Blocks():
        return build_train_tab(job, lambda: object(), data_dir="/data", out_dir=str(tmp_path), base=base_config())


def test_start_follows_the_run_to_its_end(tmp_path: Path) -> None:
    job = TrainingJob(trainer=fake_trainer)
    tab = build_tab(job, tmp_path)
    updates = list(tab.handlers["start"](*form_values(base_config(out_dir=str(tmp_path)))))
    assert job.wait(10)
    progress, chart, _gallery, start, interrupt = updates[-1]
    assert 'data-state="finished"' in progress and "completed" in progress and "step 4/4" in progress
    assert chart.size == (640, 260)
    assert start["interactive"] is True and interrupt["interactive"] is False


def test_second_start_is_refused_with_a_message(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(cfg: TrainConfig, host: Any, on_event: Any, stop: threading.Event, resume: Any = None) -> TrainResult:
        release.wait(10)
        return fake_trainer(cfg, host, on_event, stop, resume)

    job = TrainingJob(trainer=slow)
    tab = build_tab(job, tmp_path)
    values = form_values(base_config(out_dir=str(tmp_path)))
    first = tab.handlers["start"](*values)
    assert 'data-state="running"' in next(first)[0]
    second = tab.handlers["start"](*values)  # a second tab, or a double click
    progress = next(second)[0]
    assert "already going" in progress and "only one run at a time" in progress
    release.set()
    list(first)
    list(second)
    assert job.wait(10) and job.status()["run_id"] == 1


def test_config_error_is_shown_escaped(tmp_path: Path) -> None:
    job = TrainingJob(trainer=fake_trainer)
    tab = build_tab(job, tmp_path)
    bad = form_values(base_config(), emb0_name="<b>x</b>")
    (progress, *_rest), = list(tab.handlers["start"](*bad))
    assert "&lt;b&gt;x&lt;/b&gt;" in progress and "<b>x</b>" not in progress
    assert job.status()["state"] == "idle"
    (progress, *_rest), = list(tab.handlers["start"](*form_values(base_config(), steps=None)))
    assert "steps: enter a number" in progress


def test_dataset_refusal_during_a_run_is_shown_escaped(tmp_path: Path) -> None:
    from pivotal.errors import DatasetError

    def refusing(cfg: TrainConfig, host: Any, on_event: Any, stop: Any, resume: Any = None) -> TrainResult:
        raise DatasetError("dataset /data/<odd> refused:\n2 image(s) cannot be used:\n  a.png: truncated")

    job = TrainingJob(trainer=refusing)
    tab = build_tab(job, tmp_path)
    progress = list(tab.handlers["start"](*form_values(base_config(out_dir=str(tmp_path)))))[-1][0]
    assert 'data-state="failed"' in progress and "Traceback" not in progress
    assert "dataset /data/&lt;odd&gt; refused:\n2 image(s) cannot be used:\n  a.png: truncated" in progress


def test_interrupt_handler(tmp_path: Path) -> None:
    job = TrainingJob(trainer=fake_trainer)
    tab = build_tab(job, tmp_path)
    html, button = tab.handlers["interrupt"]()
    assert "no run is going" in html and button["interactive"] is False


def test_check_dataset_reports_a_missing_folder(tmp_path: Path) -> None:
    pytest.importorskip("pivotal.data.dataset")
    job = TrainingJob(trainer=fake_trainer)
    with gr.Blocks():  # a host without a tokenizer: token counts are left out of the report
        tab = build_train_tab(job, lambda: None, data_dir="/data", out_dir=str(tmp_path), base=base_config())
    out = tab.handlers["check"](*form_values(base_config(), data_dir=str(tmp_path / "nope<x>")))
    assert "nope&lt;x&gt;" in out and "Traceback" not in out


# -- Generate tab ---------------------------------------------------------------------------------
def test_bundles_listed_newest_first_without_resume_files(tmp_path: Path) -> None:
    import os

    write_fake_bundle(tmp_path / "old.safetensors", ["alpha"])
    write_fake_bundle(tmp_path / "sub" / "new.safetensors", ["mychar", "other"])
    write_fake_bundle(tmp_path / "new.resume.safetensors", [])
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    os.utime(tmp_path / "old.safetensors", (1, 1))
    entries, warnings = find_bundles(tmp_path)
    assert [(e.label, e.names) for e in entries] == [("sub/new.safetensors", ["mychar", "other"]),
                                                     ("old.safetensors", ["alpha"])]
    assert len(warnings) == 1 and "broken.safetensors" in warnings[0]
    assert find_bundles(tmp_path / "missing") == ([], [])

    job = TrainingJob(trainer=fake_trainer)
    with gr.Blocks():
        gen = build_generate_tab(job, lambda: object(), out_dir=str(tmp_path))
    update, names = gen.handlers["refresh"](str(tmp_path))
    assert update["choices"] == [NO_BUNDLE, "sub/new.safetensors", "old.safetensors"]
    assert update["value"] == "sub/new.safetensors"
    assert "&lt;lora:new:1&gt;" in names and "mychar, other" in names
    assert "broken.safetensors" in names


def test_generate_refused_while_training(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(cfg: TrainConfig, host: Any, on_event: Any, stop: threading.Event, resume: Any = None) -> TrainResult:
        release.wait(10)
        return TrainResult("completed", 1, 1)

    job = TrainingJob(trainer=slow)
    with gr.Blocks():
        gen = build_generate_tab(job, lambda: object(), out_dir=str(tmp_path))
    job.start(base_config(), object())
    _, info = gen.handlers["generate"](str(tmp_path), NO_BUNDLE, 1.0, "a photo", "", 4, 0, 64, 64, 7.0)
    assert "training run is going" in info
    release.set()
    assert job.wait(10)


def test_generate_bad_number_shown(tmp_path: Path) -> None:
    job = TrainingJob(trainer=fake_trainer)
    with gr.Blocks():
        gen = build_generate_tab(job, lambda: object(), out_dir=str(tmp_path))
    _, info = gen.handlers["generate"](str(tmp_path), NO_BUNDLE, 1.0, "a photo", "", 4.5, 0, 64, 64, 7.0)
    assert "steps: must be a whole number" in info
    _, info = gen.handlers["generate"](str(tmp_path), NO_BUNDLE, 1.0, "a photo", "", 4, 0, 64, 64, "nan")
    assert "guidance: &#x27;nan&#x27; is not a finite number" in info


def test_grid_of_the_chosen_bundle(tmp_path: Path) -> None:
    from test_generate import FakeHost, write_test_bundle

    host = FakeHost()
    write_test_bundle(tmp_path / "mine.safetensors", host.lora_targets("unet", "attn"),
                      {"clip_l": host.vocabulary("clip_l")})
    job = TrainingJob(trainer=fake_trainer)
    with gr.Blocks():
        gen = build_generate_tab(job, lambda: host, out_dir=str(tmp_path), grid_contexts=("{names} on the moon",))
    _, info = gen.handlers["grid"](str(tmp_path), NO_BUNDLE, 1.0, "a photo", "", 2, 0, 32, 32, 7.0)
    assert "choose a bundle for the grid" in info
    image, info = gen.handlers["grid"](str(tmp_path), "mine.safetensors", 0.5, "mychar <lora:mine:1>", "", 2, 3,
                                       32, 32, 7.0)
    assert "gen-grid-done" in info and "no text-encoder LoRA" in info
    (png,) = (tmp_path / "grids").glob("mine-*.png")
    record = __import__("json").loads(png.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["rows"] == ["mychar", "mychar on the moon"] and record["seeds"] == [3, 4]
    assert record["strength"] == 0.5 and len(record["cells"]) == 10 and image.size[0] > 5 * 32
    assert [c["prompt"] for c in record["cells"][:2]] == ["mychar <lora:mine:0.5>", "mychar <lora:mine:te=0:unet=0.5>"]


def test_lora_tag_added_once() -> None:
    from pivotal.ui.bundle_list import BundleEntry

    e = BundleEntry("b.safetensors", "/o/b.safetensors", ["mychar"], 0.0)
    assert _with_lora_tag("a photo of mychar", e, 1.0) == "a photo of mychar <lora:b:1>"
    assert _with_lora_tag("mychar <lora:B:0.5>", e, 1.0) == "mychar <lora:B:0.5>"
    assert _with_lora_tag("mychar", None, 1.0) == "mychar"


# -- pure helpers -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_form_round_trip_and_errors(variant: int) -> None:
    # every setting the form shows, away from its default in one variant or the other: the form must
    # carry each one
    cfg = sample_config(variant)
    shown = {n for n in form_field_names() if n in cfg.to_dict()} | {"embeddings"}
    assert shown == {s.name for s in form_settings()}
    moved = {n for v in VARIANTS for n in shown if getattr(sample_config(v), n) != getattr(TrainConfig(), n)}
    assert moved == shown
    names = form_field_names()
    values = dict(zip(names, form_values(cfg)))
    values["steps"] = float(cfg.steps)  # number boxes hand back floats
    got, resume = config_from_form(base_config(), values)
    # a setting declared form-less (the sweep record) keeps the base's value
    hidden = {s.name for s in declared(TrainConfig) if not s.in_form}
    assert {k: v for k, v in got.to_dict().items() if k not in hidden} == \
        {k: v for k, v in cfg.to_dict().items() if k not in hidden} and resume == ""
    with pytest.raises(ConfigError, match="steps: must be a whole number"):
        config_from_form(base_config(), {**values, "steps": 2.5})
    with pytest.raises(ConfigError, match="unet_lr: 'x' is not a number"):
        config_from_form(base_config(), {**values, "unet_lr": "x"})
    with pytest.raises(ConfigError, match="at least one embedding"):  # in the pivotal mode (textcraftor needs none)
        config_from_form(base_config(), {**values, "mode": "pivotal", "emb0_name": " ", "emb1_name": ""})


def test_progress_html_escapes_everything() -> None:
    snap = {"state": "failed", "result_status": "failed", "run_id": 2, "step": 3, "total": 10, "loss": 0.5,
            "smoothed_loss": 0.4, "eta_s": None, "phase": "<p>", "message": "bad <file>.png",
            "warnings": ["<script>alert(1)</script>"], "bundle_path": "/o/<x>.safetensors", "elapsed_s": 65}
    out = progress_html(snap)
    assert "<script>" not in out and "&lt;script&gt;" in out and "bad &lt;file&gt;.png" in out
    assert 'data-state="failed"' in out and "step 3/10" in out and "1:05" in out
    assert "&lt;x&gt;" in message_html("<x>")
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "--"


def test_loss_chart_images() -> None:
    assert render_loss_chart([], [], 10).size == (640, 260)
    assert render_loss_chart([0.5], [0.5], 10).size == (640, 260)
    long = [1.0 / (1 + i) for i in range(5000)] + [float("nan")]
    img = render_loss_chart(long, long, 6000, first_step=100)
    assert img.mode == "RGB" and img.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_cached_host_provider_loads_once() -> None:
    calls: list[int] = []
    provider = cached_host_provider(lambda: calls.append(1) or "host")
    threads = [threading.Thread(target=provider) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert provider() == "host" and calls == [1]


def test_demo_setup_writes_the_dataset_once(tmp_path: Path) -> None:
    from pivotal.ui.app import demo_setup

    base, data_dir = demo_setup(tmp_path / "out")
    assert Path(data_dir) == tmp_path / "out" / "demo_data"
    images = sorted(Path(data_dir).glob("*.png"))
    assert len(images) == 8 and all(p.with_suffix(".txt").read_text().startswith("[mychar]") for p in images)
    assert (base.steps, base.resolution, [e.name for e in base.embeddings]) == (300, 64, ["mychar"])
    assert base.out_dir == str(tmp_path / "out") and base.validate() is base
    (Path(data_dir) / "mine.txt").write_text("kept")
    demo_setup(tmp_path / "out")  # an existing dataset is left as it is
    assert (Path(data_dir) / "mine.txt").read_text() == "kept"


def test_picking_textcraftor_in_the_demo_app_fills_in_its_measured_recipe(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-trained demo app hands the tab the CLI demo's TextCraftor recipe; picking the mode
    fills the form with it (the new-word prompts too), picking pivotal again gives the form's own
    values back, and a form so filled starts a run with exactly that recipe."""
    import pivotal.ui.app as app
    from pivotal.demo.reward import DEMO_PROMPT_COUNT, DEMO_TEXTCRAFTOR, NEW_COLOUR_WORDS

    given: list[Any] = []
    real = app.build_train_tab
    monkeypatch.setattr(app, "build_train_tab", lambda *a, **kw: given.append(kw.get("mode_presets")) or real(*a, **kw))
    build_app(lambda: None, str(tmp_path), str(tmp_path / "data"), base=base_config(out_dir=str(tmp_path)),
              demo=True, generate_size=64, pretrained_demo=False)
    build_app(lambda: None, str(tmp_path), str(tmp_path / "data"), base=base_config(out_dir=str(tmp_path)),
              demo=True, generate_size=64, pretrained_demo=True)
    assert given[0] is None and given[1] == app.demo_mode_presets()

    base = base_config(out_dir=str(tmp_path))
    with gr.Blocks():
        tab = build_train_tab(TrainingJob(trainer=fake_trainer), lambda: object(), data_dir="/data",
                              out_dir=str(tmp_path), base=base, mode_presets=app.demo_mode_presets())
    names = form_field_names()
    set_by_mode = [n for n in names if n in DEMO_TEXTCRAFTOR or n == "reward_prompts"]
    assert len(set_by_mode) == len(DEMO_TEXTCRAFTOR) + 1
    picked = dict(zip(sorted(set_by_mode), (u["value"] for u in tab.handlers["mode"]("textcraftor"))))
    prompts = picked["reward_prompts"].splitlines()
    assert len(prompts) == DEMO_PROMPT_COUNT and all(any(w in p for w in NEW_COLOUR_WORDS) for p in prompts)
    form = dict(zip(names, form_values(base)))
    form.update(picked, mode="textcraftor")
    config, _ = config_from_form(base, form)
    assert {k: getattr(config, k) for k in DEMO_TEXTCRAFTOR} == DEMO_TEXTCRAFTOR
    back = dict(zip(sorted(set_by_mode), (u["value"] for u in tab.handlers["mode"]("pivotal"))))
    assert back == {k: form_values_from_config(base)[k] for k in set_by_mode}
