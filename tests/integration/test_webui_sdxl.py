"""Pivotal on an SDXL checkpoint in a real A1111 webui (opt-in: PIVOTAL_WEBUI_SDXL_CHECKPOINT names
an SDXL checkpoint the webui lists, e.g. a tiny random one; the test switches to it and back).

Proves: both text encoders and the UNet get gradients through the webui's SDXL objects (every LoRA
up weight of te1, te2 and the UNet moved, clip_l and clip_g embedding rows moved apart), the bundle
is an SDXL bundle, ``<lora:NAME:1>`` plus the embedding changes the image, and the host is restored
bit for bit. Also checklist 31: a checkpoint switch requested mid-run (SD1 -> this SDXL one) waits
for the run, and the bundle is stamped with the model it trained on.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest
from webui_server import Webui, untrained_parts

from conftest import EMBEDDING, SDXL_CHECKPOINT, SDXL_MISSING, checkpoint

CHECKPOINT = SDXL_CHECKPOINT
pytestmark = pytest.mark.skipif(not CHECKPOINT, reason=SDXL_MISSING)
PROMPT = "a photo of a cat"


@pytest.fixture()
def sdxl(webui: Webui) -> Iterator[Webui]:
    with checkpoint(webui, CHECKPOINT):
        yield webui


def test_sdxl_bundle_trains_every_part_and_the_host_is_restored(sdxl: Webui, dataset: Path) -> None:
    before_image, _ = sdxl.txt2img(PROMPT)
    before_host = sdxl.request("GET", "/pivotal/v1/host")
    assert "sdxl" in before_host["checkpoint"].lower() or CHECKPOINT in before_host["checkpoint"]
    name = f"pvtxl{uuid.uuid4().hex[:6]}"
    config = {"data_dir": str(dataset), "output_name": name, "steps": 10, "resolution": 64, "bucket_step": 16,
              "unet_lr": 5e-4, "embedding_lr": 5e-3, "te_lora": True, "te_lr": 1e-4, "preview_every": 5,
              "preview_steps": 4, "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}]}
    code, body = sdxl.status_of("POST", "/pivotal/v1/train", {"config": config})
    assert code == 200, body
    snap = sdxl.wait_run()
    assert snap["result_status"] == "completed", snap["message"]
    from safetensors import safe_open

    with safe_open(snap["bundle_path"], "pt") as f:
        keys = list(f.keys())
    # SDXL reads clip_l's penultimate hidden state: its last layer never feeds the output, so no
    # LoRA is put there (it could not train); every LoRA the bundle does hold must have moved
    assert untrained_parts(snap["bundle_path"]) == []
    bundle = {b["name"]: b for b in sdxl.request("GET", "/pivotal/v1/bundles")["bundles"]}[name]
    assert bundle["base_model"].startswith("sdxl_") and bundle["embeddings"] == [EMBEDDING]
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert {f"bundle_emb.{EMBEDDING}.clip_l", f"bundle_emb.{EMBEDDING}.clip_g"} <= set(keys)

    assert sdxl.request("GET", "/pivotal/v1/host") == before_host
    assert sdxl.txt2img(PROMPT)[0] == before_image
    image, info = sdxl.txt2img(f"{PROMPT}, {EMBEDDING} <lora:{name}:1>")
    assert f'Lora hashes: "{name}: ' in info and f"{EMBEDDING}: " in info
    assert image != before_image
    assert sdxl.txt2img(PROMPT)[0] == before_image


def test_switching_the_checkpoint_waits_for_the_run(webui: Webui, dataset: Path) -> None:
    """Checklist 31: a checkpoint switch requested mid-run waits for the run (the webui's queue),
    the bundle is stamped with the model it really trained on, and the switch happens after."""
    import threading
    import time

    from safetensors import safe_open

    previous = webui.request("GET", "/sdapi/v1/options")["sd_model_checkpoint"]
    webui.request("POST", "/sdapi/v1/refresh-checkpoints")
    name = f"pvtsw{uuid.uuid4().hex[:6]}"
    config = {"data_dir": str(dataset), "output_name": name, "steps": 400, "resolution": 64, "bucket_step": 16,
              "embeddings": [{"name": EMBEDDING, "vectors": 1, "init_text": "person"}]}
    code, body = webui.status_of("POST", "/pivotal/v1/train", {"config": config})
    assert code == 200, body
    assert webui.wait_step(1)["state"] == "running"
    switched: dict[str, object] = {}

    def switch() -> None:
        switched["reply"] = webui.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT})

    thread = threading.Thread(target=switch)
    thread.start()
    try:
        time.sleep(2.0)
        assert webui.request("GET", "/pivotal/v1/status")["state"] == "running"
        assert thread.is_alive(), "the checkpoint switch went ahead while the run held the model"
        webui.request("POST", "/pivotal/v1/interrupt")
        snap = webui.wait_run()
        thread.join(300)
        assert snap["result_status"] == "interrupted" and snap["bundle_path"], snap["message"]
        with safe_open(snap["bundle_path"], "pt") as f:
            meta = f.metadata()
        assert meta["ss_base_model_version"].startswith("sd_v1"), meta["ss_base_model_version"]
        assert "sdxl" not in meta["ss_sd_model_name"].lower(), meta["ss_sd_model_name"]
        # and the switch did happen, after the run
        assert not thread.is_alive() and "reply" in switched
        assert CHECKPOINT in webui.request("GET", "/pivotal/v1/host")["checkpoint"]
    finally:
        thread.join(300)
        webui.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": previous})
