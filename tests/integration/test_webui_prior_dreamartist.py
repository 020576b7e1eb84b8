"""Prior preservation and DreamArtist++ in a real A1111 webui, over HTTP only (opt-in: see
webui_server.py).

Prior preservation: the class images are drawn by the webui's own txt2img before training, cached
in the class folder and reused by the next run (the status's pre-flight report says which), and the
host is as before afterwards. DreamArtist++: the bundle carries ``NAME-neg`` and the webui's
loader makes it usable in the negative prompt (it changes the picture, and the infotext's TI hashes
name it).
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

from webui_server import Webui

from conftest import EMBEDDING

SETTINGS = {"resolution": 64, "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "seed": 3}


def _config(dataset: Path, name: str, steps: int, **extra: object) -> dict:
    return {"config": {"data_dir": str(dataset), "output_name": name, "steps": steps,
                       "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}],
                       **SETTINGS, **extra}}


def _txt2img(webui: Webui, prompt: str, negative: str) -> tuple[bytes, str]:
    """(PNG bytes, infotext) of one image with a negative prompt."""
    d = webui.request("POST", "/sdapi/v1/txt2img", {"prompt": prompt, "negative_prompt": negative, "steps": 4,
                                                   "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler",
                                                   "cfg_scale": 7.0})
    return base64.b64decode(d["images"][0]), json.loads(d["info"])["infotexts"][0]


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def test_class_images_come_from_the_webui_and_are_reused(webui: Webui, dataset: Path, tmp_path: Path) -> None:
    before_host = webui.request("GET", "/pivotal/v1/host")
    classes = tmp_path / "classes"
    prior = {"class_prompt": "a photo of a person", "class_count": 2, "class_steps": 4, "class_dir": str(classes)}
    for run, (generated, reused) in enumerate(((2, 0), (0, 2))):
        code, started = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvp"), 4, **prior))
        assert code == 200, started
        snap = webui.wait_run()
        assert snap["result_status"] == "completed", snap["message"]
        report = snap["preflight"]["class_images"]
        assert (report["generated"], report["reused"], report["used"]) == (generated, reused, 2), (run, report)
    assert len(list(classes.glob("pivotal-class-*.png"))) == 2
    assert webui.request("GET", "/pivotal/v1/host") == before_host


def test_the_dreamartist_negative_works_in_the_negative_prompt(webui: Webui, dataset: Path) -> None:
    name = _unique("pvd")
    code, started = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, name, 6, dreamartist=True))
    assert code == 200, started
    snap = webui.wait_run()
    assert snap["result_status"] == "completed", snap["message"]
    bundles = {b["name"]: b for b in webui.request("GET", "/pivotal/v1/bundles")["bundles"]}
    assert sorted(bundles[name]["embeddings"]) == sorted([EMBEDDING, f"{EMBEDDING}-neg"])
    prompt = f"a photo of {EMBEDDING} <lora:{name}:1>"
    plain, _ = _txt2img(webui, prompt, "")
    with_negative, info = _txt2img(webui, prompt, f"{EMBEDDING}-neg")
    assert f"{EMBEDDING}-neg: " in info  # the webui resolved it as an embedding (TI hashes)
    assert with_negative != plain
