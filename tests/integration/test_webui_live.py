"""Pivotal in a real A1111 webui, over HTTP only (opt-in: see webui_server.py).

Proves on the real host: training through the API, the bundle published into the Lora folder,
``<lora:NAME:1>`` plus the embedding name changing the image with Lora and TI hashes in the
infotext, the host restored bit for bit (weights fingerprint, flags, attention optimization,
embedding database, and the same txt2img image as before), the webui's own Interrupt stopping a
run, generations waiting in the webui's queue while a run holds it, a second start refused, and a
fault in the middle of a run leaving the host restored and usable, and out of memory forced at a
step and during a preview (checklist 26) doing the same with a message that says what to change,
and settings changed mid-run (checklist 34: clip skip applies at once, an attention-optimization
change waits for the run).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from webui_server import Webui, untrained_parts

from conftest import EMBEDDING

BASELINE_PROMPT = "a photo of a cat"
SETTINGS = {"resolution": 64, "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "preview_steps": 4,
            "seed": 3}


def _config(dataset: Path, name: str, steps: int, **extra: object) -> dict:
    return {"config": {"data_dir": str(dataset), "output_name": name, "steps": steps,
                       "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}],
                       **SETTINGS, **extra}}


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def baseline(webui: Webui) -> tuple[bytes, dict]:
    """The txt2img image and host state before any test trained."""
    image, _ = webui.txt2img(BASELINE_PROMPT)
    return image, webui.request("GET", "/pivotal/v1/host")


def test_train_10_steps_then_generate_with_the_bundle(webui: Webui, dataset: Path,
                                                      baseline: tuple[bytes, dict]) -> None:
    before_image, before_host = baseline
    name = _unique("pvt")
    body = {**_config(dataset, name, 10, preview_every=5), "preview_sampler": "DPM++ 2M", "preview_cfg": 5.0}
    code, started = webui.status_of("POST", "/pivotal/v1/train", body)
    assert code == 200, started
    code, refused = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvt"), 10))
    assert code == 409 and "already going" in refused["detail"]
    snap = webui.wait_run()
    assert snap["result_status"] == "completed", snap["message"]
    assert snap["step"] == 10 and len(snap["losses"]) == 10 and snap["preview_count"] == 2
    assert untrained_parts(snap["bundle_path"]) == []
    previews = sorted(Path(snap["settings"]["out_dir"], "previews").glob("*.png"))
    assert len(previews) == 2  # rendered by the webui's txt2img with the run's sampler and CFG

    # the host is exactly as before: weights, flags, attention, embedding database, and its images
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    assert webui.txt2img(BASELINE_PROMPT)[0] == before_image

    bundles = {b["name"]: b for b in webui.request("GET", "/pivotal/v1/bundles")["bundles"]}
    assert bundles[name]["embeddings"] == [EMBEDDING] and bundles[name]["made_by_pivotal"]

    image, info = webui.txt2img(f"{BASELINE_PROMPT}, {EMBEDDING} <lora:{name}:1>")
    assert f'Lora hashes: "{name}: ' in info
    assert f"TI hashes: \"{EMBEDDING}: " in info
    assert image != before_image
    # the bundle's embeddings leave with the LoRA: the host is back to its baseline
    assert webui.txt2img(BASELINE_PROMPT)[0] == before_image
    assert webui.request("GET", "/pivotal/v1/host") == before_host


def test_webui_interrupt_stops_a_run_and_queued_generation_waits(webui: Webui, dataset: Path,
                                                                 baseline: tuple[bytes, dict]) -> None:
    before_image, before_host = baseline
    name = _unique("pvtint")
    code, body = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, name, 500))
    assert code == 200, body
    assert webui.wait_step(1)["state"] == "running"
    done: dict[str, object] = {}

    def generate() -> None:
        done["image"] = webui.txt2img(BASELINE_PROMPT)[0]
        done["run_state"] = webui.request("GET", "/pivotal/v1/status")["state"]

    waiter = threading.Thread(target=generate)
    waiter.start()
    time.sleep(3.0)
    assert waiter.is_alive(), "txt2img ran while the training run held the webui's queue"
    webui.request("POST", "/sdapi/v1/interrupt")  # the webui's own Interrupt button does this
    snap = webui.wait_run()
    waiter.join(120)
    assert snap["result_status"] == "interrupted" and 1 <= snap["step"] < 500, snap["message"]
    # on_interrupt = save: the partial bundle is published under its own -stepNNNNNN name
    assert snap["bundle_path"].endswith(f"Lora/{name}-step{snap['step']:06d}.safetensors")
    assert done["run_state"] != "running" and done["image"] == before_image
    assert webui.request("GET", "/pivotal/v1/host") == before_host


def test_fault_mid_run_leaves_the_host_restored(webui: Webui, dataset: Path, baseline: tuple[bytes, dict],
                                                tmp_path: Path) -> None:
    before_image, before_host = baseline
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    code, body = webui.status_of("POST", "/pivotal/v1/train",
                                 _config(data, _unique("pvtfault"), 500, latent_cache="off"))
    assert code == 200, body
    assert webui.wait_step(1)["state"] == "running"
    for image in data.glob("*.png"):  # the next batch cannot be read: an error inside the session
        image.unlink()
    snap = webui.wait_run()
    assert snap["state"] == "failed" and snap["step"] < 500, snap
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    assert webui.txt2img(BASELINE_PROMPT)[0] == before_image


def test_bad_config_is_refused_before_anything_runs(webui: Webui, dataset: Path) -> None:
    code, body = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvt"), 0))
    assert code == 422 and "steps" in body["detail"]
    code, body = webui.status_of("POST", "/pivotal/v1/train", {"steps": 3})
    assert code == 422 and "config" in body["detail"]


def test_option_lends_bundle_embeddings_without_the_lora_tag(webui: Webui, dataset: Path) -> None:
    name = _unique("pvtopt")
    assert webui.status_of("POST", "/pivotal/v1/train", _config(dataset, name, 4))[0] == 200
    assert webui.wait_run()["result_status"] == "completed"
    prompt = f"a photo of {EMBEDDING}"
    plain, info = webui.txt2img(prompt)
    assert "Pivotal bundle embeddings" not in info
    webui.request("POST", "/sdapi/v1/options", {"pivotal_bundle_embeddings_always": True})
    try:
        lent, info = webui.txt2img(prompt)
        assert f"Pivotal bundle embeddings: \"{EMBEDDING}: " in info and lent != plain
    finally:
        webui.request("POST", "/sdapi/v1/options", {"pivotal_bundle_embeddings_always": False})
    # switched off: the conds cached with the lent vectors are not reused
    assert webui.txt2img(prompt) == (plain, webui.txt2img(prompt)[1])


@pytest.mark.parametrize("point", ["step", "preview"])
def test_out_of_memory_stops_cleanly(webui: Webui, dataset: Path, baseline: tuple[bytes, dict], point: str) -> None:
    if not webui.fault_file:
        pytest.skip("set PIVOTAL_WEBUI_FAULT_FILE to the PIVOTAL_FAULT_FILE the webui at PIVOTAL_WEBUI_URL runs with")
    before_image, before_host = baseline
    with open(webui.fault_file, "w", encoding="utf-8") as f:
        json.dump({"point": point, "step": 2, "error": "oom"}, f)
    try:
        code, body = webui.status_of("POST", "/pivotal/v1/train",
                                     _config(dataset, _unique("pvtoom"), 6, preview_every=2))
        assert code == 200, body
        snap = webui.wait_run()
    finally:
        os.unlink(webui.fault_file)
    assert snap["state"] == "failed" and snap["step"] == 2, snap
    assert "out of GPU memory" in snap["message"] and "gradient_checkpointing" in snap["message"], snap["message"]
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    assert webui.txt2img(BASELINE_PROMPT)[0] == before_image
    # the next run trains normally
    code, body = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvtok"), 2))
    assert code == 200, body
    assert webui.wait_run()["result_status"] == "completed"


def test_settings_changed_mid_run(webui: Webui, dataset: Path, baseline: tuple[bytes, dict]) -> None:
    """Checklist 34, settings: the clip skip changed mid-run applies at once (the run's cached
    conditioning follows it); a change of the attention optimization, which re-hijacks the model,
    waits in the webui's queue until the run ends and is then applied; both put back, the host is
    exactly as the same two changes leave it without a run."""
    options = webui.request("GET", "/sdapi/v1/options")
    old = {k: options[k] for k in ("CLIP_stop_at_last_layers", "cross_attention_optimization")}
    other = "sub-quadratic" if baseline[1]["attention"] != "sub-quadratic" else "Doggettx"
    # The webui's own re-hijack leaves one more module in training mode than a fresh load (seen
    # without any run): the reference is the host after the same switch and back, with no run.
    webui.request("POST", "/sdapi/v1/options", {"cross_attention_optimization": other})
    webui.request("POST", "/sdapi/v1/options", old)
    before_host = webui.request("GET", "/pivotal/v1/host")
    before_image, _ = webui.txt2img(BASELINE_PROMPT)
    code, body = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvtopts"), 200,
                                                                      phase_plan="embeddings_first", embedding_steps=2))
    assert code == 200, body
    try:
        assert webui.wait_step(4)["state"] == "running"
        webui.request("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2})
        assert webui.request("GET", "/pivotal/v1/status")["state"] == "running"  # applied without waiting
        done: dict = {}

        def switch() -> None:
            webui.request("POST", "/sdapi/v1/options", {"cross_attention_optimization": other})
            done["run_state"] = webui.request("GET", "/pivotal/v1/status")["state"]

        waiter = threading.Thread(target=switch)
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive(), "the attention optimization was swapped while the run held the model"
        snap = webui.wait_run()
        waiter.join(120)
        assert snap["result_status"] == "completed", snap["message"]
        assert done["run_state"] != "running"
        assert webui.request("GET", "/pivotal/v1/host")["attention"] == other  # the user's choice, applied after
    finally:
        webui.request("POST", "/sdapi/v1/options", old)
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    assert webui.txt2img(BASELINE_PROMPT)[0] == before_image
