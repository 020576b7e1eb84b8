"""Pivotal in real Forge and reForge webuis (opt-in, like every test here).

Configured per webui, by environment variables (unset: that webui's tests skip with the reason):

* ``PIVOTAL_FORGE_URL``: a running Forge with this checkout in ``extensions/`` and ``--api``; or
  ``PIVOTAL_FORGE_DIR`` + ``PIVOTAL_FORGE_PYTHON`` (+ ``PIVOTAL_FORGE_ARGS``, ``PIVOTAL_FORGE_PORT``,
  default 7881): the tests start ``launch.py`` there and stop it afterwards. ``PIVOTAL_FORGE_LOG``
  names the log of a webui reached by URL (the no-traceback check needs it).
* the same with ``PIVOTAL_REFORGE_*`` for reForge (default port 7882).

Forge and reForge refuse tiny checkpoints: the webui must have a full-size SD1 checkpoint loaded
(or, Forge, selected: it loads on the first generation). One webui runs at a time (module-scoped,
one per parameter); each needs ~7 GB of memory on a CPU.

Proves, per webui: training through the API and from the Pivotal tab (headless Chromium); the bundle
with ``<lora:NAME:1>`` and its embedding name changing the image, with the embedding in the infotext;
the image without the LoRA equal to the one before; ``/pivotal/v1/host`` identical before and after a
run (also after a generation that merged a LoRA); the ablation grid and the X/Y/Z plot's Pivotal
axis rendering through the webui's txt2img; the webui's Interrupt and queue; a bundle with 13
embeddings applying its LoRA (Forge skips a LoRA with more than 12 keys it does not know); two
bundles defining one name resolved by the prompt's tags; LoHa, LoKr and DoRA bundles drawn by the
webui's loader as Pivotal's ΔW predicts; a textcraftor run (reward through the VAE); and no
traceback in the webui's log.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from webui_server import Webui, start_webui, untrained_parts

from conftest import EMBEDDING

KINDS = {"forge": ("PIVOTAL_FORGE", 7881), "reforge": ("PIVOTAL_REFORGE", 7882)}
PROMPT = "a photo of a cat"
SETTINGS = {"resolution": 64, "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "preview_steps": 2,
            "seed": 3}
#: Forge-family startup is slower than A1111's (and waits for the model on reForge)
STARTUP_S = 900.0
#: what the webuis log when a loader skips a LoRA whole (Forge's >12 unknown keys rule)
SKIPPED_LORA = "LoRA version mismatch"


@dataclass
class FamilyWebui:
    kind: str
    server: Webui
    log_file: Optional[str] = None  # for a webui reached by URL

    def log_text(self) -> Optional[str]:
        if self.server.process is not None:
            return "\n".join(self.server.log)
        if self.log_file and os.path.exists(self.log_file):
            return Path(self.log_file).read_text(encoding="utf-8", errors="replace")
        return None


def family_problem(kind: str) -> Optional[str]:
    prefix, _ = KINDS[kind]
    if os.environ.get(f"{prefix}_URL"):
        return None
    missing = [v for v in (f"{prefix}_DIR", f"{prefix}_PYTHON") if not os.environ.get(v)]
    if missing:
        return (f"no {kind} configured: set {prefix}_URL (a running {kind} with this extension and --api), or "
                f"{prefix}_DIR + {prefix}_PYTHON (+ {prefix}_ARGS) to start one")
    for v in (f"{prefix}_DIR", f"{prefix}_PYTHON"):
        if not os.path.exists(os.environ[v]):
            return f"{v}={os.environ[v]} does not exist"
    return None


@pytest.fixture(scope="module", params=sorted(KINDS))
def fwebui(request: pytest.FixtureRequest) -> Iterator[FamilyWebui]:
    kind = request.param
    problem = family_problem(kind)
    if problem:
        pytest.skip(problem)
    prefix, port = KINDS[kind]
    if os.environ.get(f"{prefix}_URL"):
        server = Webui(os.environ[f"{prefix}_URL"].rstrip("/"))
    else:
        server = start_webui(int(os.environ.get(f"{prefix}_PORT", port)), prefix=prefix, startup_timeout=STARTUP_S)
    try:
        server.txt2img(PROMPT)  # Forge loads its model on the first generation; reForge's waits for it
        yield FamilyWebui(kind, server, os.environ.get(f"{prefix}_LOG"))
    finally:
        server.stop()


def _config(dataset: Path, name: str, steps: int, **extra: object) -> dict:
    return {"config": {"data_dir": str(dataset), "output_name": name, "steps": steps,
                       "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}],
                       **SETTINGS, **extra}}


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def _train(w: FamilyWebui, dataset: Path, name: str, steps: int, **extra: object) -> dict:
    code, body = w.server.status_of("POST", "/pivotal/v1/train", _config(dataset, name, steps, **extra))
    assert code == 200, body
    snap = w.server.wait_run()
    assert snap["result_status"] == "completed", snap["message"]
    return snap


def _lora_dir(w: FamilyWebui) -> Path:
    return Path(w.server.request("GET", "/pivotal/v1/bundles")["lora_dir"])


def _shows_embedding(kind: str, info: str, name: str) -> bool:
    """The infotext names the embedding as used: Forge's engines write ``TI: names``, reForge's
    A1111 encoder ``TI hashes: "name: bundle"``."""
    if kind == "forge":
        return re.search(rf"TI: [^\n]*\b{re.escape(name)}\b", info) is not None
    return f'TI hashes: "{name}: ' in info


def _without_cache_stats(host: dict) -> dict:
    """The host state minus what the webui's own LoRA generations change: Forge's LoRA-file cache
    size, and on reForge the count of weights that require grad (its Lora patcher turns the 192 UNet
    weights a LoRA patches into inference tensors at the first generation naming a LoRA, Pivotal or
    not, and they stay so; a Pivotal run restores whatever it found, as the other tests check)."""
    return {k: v for k, v in host.items() if k not in ("lora_state_dicts_cached", "requires_grad")}


@pytest.fixture(scope="module")
def trained(fwebui: FamilyWebui, dataset: Path) -> dict[str, Any]:
    """One API run (text-encoder LoRA too, two previews through the webui's txt2img), with the
    baseline image and host state from just before it."""
    w = fwebui
    before_image, _ = w.server.txt2img(PROMPT)
    before_host = w.server.request("GET", "/pivotal/v1/host")
    name = _unique("pvt")
    snap = _train(w, dataset, name, 6, preview_every=3, te_lora=True)
    after_host = w.server.request("GET", "/pivotal/v1/host")
    after_image, _ = w.server.txt2img(PROMPT)
    return {"name": name, "snap": snap, "before_image": before_image, "before_host": before_host,
            "after_host": after_host, "after_image": after_image}


def test_api_run_trains_everything_and_leaves_the_host_as_it_was(fwebui: FamilyWebui,
                                                                  trained: dict[str, Any]) -> None:
    snap = trained["snap"]
    assert snap["step"] == 6 and snap["preview_count"] == 2, snap
    assert untrained_parts(snap["bundle_path"]) == []  # every LoRA module and the embedding got gradients
    assert len(sorted(Path(snap["settings"]["out_dir"], "previews").glob("*.png"))) == 2
    assert trained["after_host"] == trained["before_host"]
    assert trained["after_image"] == trained["before_image"]


def test_the_bundle_and_its_embedding_work_in_prompts(fwebui: FamilyWebui, trained: dict[str, Any]) -> None:
    w, name = fwebui.server, trained["name"]
    lora_only, _ = w.txt2img(f"{PROMPT} <lora:{name}:1>")
    image, info = w.txt2img(f"{PROMPT}, {EMBEDDING} <lora:{name}:1>")
    assert image != trained["before_image"] and lora_only != trained["before_image"]
    assert image != lora_only  # the embedding name means the trained vectors
    assert _shows_embedding(fwebui.kind, info, EMBEDDING), info
    assert f"Pivotal bundle embeddings: \"{EMBEDDING}: {name}\"" in info, info
    # the embedding leaves with its LoRA: the next plain prompt is the baseline again
    plain, info = w.txt2img(f"{PROMPT}, {EMBEDDING}")
    assert "Pivotal bundle embeddings" not in info and not _shows_embedding(fwebui.kind, info, EMBEDDING)
    assert w.txt2img(PROMPT)[0] == trained["before_image"]
    assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == _without_cache_stats(trained["before_host"])


def test_a_run_after_a_lora_generation(fwebui: FamilyWebui, trained: dict[str, Any], dataset: Path) -> None:
    """A LoRA merged into the weights by the last generation: the run un-merges it for training
    (reForge: otherwise backward meets its merged inference tensors), and the LoRA's images after
    the run are the ones before it. Forge: its LoRA state is restored as it was (merged)."""
    w, name = fwebui.server, trained["name"]
    prompt = f"{PROMPT}, {EMBEDDING} <lora:{name}:1>"
    with_lora, _ = w.txt2img(prompt)
    merged_host = w.request("GET", "/pivotal/v1/host")
    _train(fwebui, dataset, _unique("pvtm"), 2)
    if fwebui.kind == "forge":
        assert w.request("GET", "/pivotal/v1/host") == merged_host
    assert w.txt2img(prompt)[0] == with_lora
    assert w.txt2img(PROMPT)[0] == trained["before_image"]


def test_interrupt_and_the_queue(fwebui: FamilyWebui, trained: dict[str, Any], dataset: Path) -> None:
    w = fwebui.server
    code, body = w.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvtint"), 300))
    assert code == 200, body
    assert w.wait_step(1)["state"] == "running"
    code, refused = w.status_of("POST", "/pivotal/v1/train", _config(dataset, _unique("pvt"), 3))
    assert code == 409, refused
    done: dict[str, Any] = {}

    def generate() -> None:
        done["image"] = w.txt2img(PROMPT)[0]
        done["run_state"] = w.request("GET", "/pivotal/v1/status")["state"]

    waiter = threading.Thread(target=generate)
    waiter.start()
    time.sleep(3.0)
    assert waiter.is_alive(), "txt2img ran while the training run held the webui's queue"
    w.request("POST", "/sdapi/v1/interrupt")
    snap = w.wait_run()
    waiter.join(300)
    assert snap["result_status"] == "interrupted" and 1 <= snap["step"] < 300, snap["message"]
    assert done["run_state"] != "running" and done["image"] == trained["before_image"]
    assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == _without_cache_stats(trained["before_host"])


def _copy_bundle(src: str, dst: Path, embeddings: dict[str, float]) -> Path:
    """``src``'s LoRA with the embeddings named in ``embeddings`` (``src``'s first embedding's
    vectors times the factor), written as a Pivotal bundle."""
    import torch

    from pivotal.formats.bundle import BundleEmbedding, write_bundle
    from pivotal.formats.bundle_metadata import TrainingInfo
    from pivotal.formats.safetensors_io import load_tensors, read_header

    header = read_header(src)
    tensors = load_tensors(header, list(header.tensors))
    lora = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    vec = next(v for k, v in tensors.items() if k.startswith("bundle_emb."))
    embs = [BundleEmbedding(n, {"clip_l": (vec.float() * f).to(torch.float32)}) for n, f in embeddings.items()]
    write_bundle(dst, "sd1", lora, embs, TrainingInfo(dst.stem))
    return dst


def test_a_bundle_with_13_embeddings_keeps_its_lora(fwebui: FamilyWebui, trained: dict[str, Any]) -> None:
    w = fwebui.server
    name = _unique("pvtbig")
    names = {f"pvtmany{i}": 1.0 + i / 10 for i in range(13)}
    path = _copy_bundle(trained["snap"]["bundle_path"], _lora_dir(fwebui) / f"{name}.safetensors", names)
    try:
        w.request("POST", "/sdapi/v1/refresh-loras")
        lora_only, _ = w.txt2img(f"{PROMPT} <lora:{name}:1>")
        assert lora_only != trained["before_image"], "the LoRA of a bundle with 13 embeddings was not applied"
        image, info = w.txt2img(f"{PROMPT}, pvtmany7 <lora:{name}:1>")
        assert image != lora_only and f'Pivotal bundle embeddings: "pvtmany7: {name}"' in info, info
        log = fwebui.log_text()
        if log is not None:
            assert SKIPPED_LORA not in log
    finally:
        path.unlink(missing_ok=True)


def test_two_bundles_with_one_name_follow_the_prompt(fwebui: FamilyWebui, trained: dict[str, Any]) -> None:
    w = fwebui.server
    first, second = _unique("pvtaa"), _unique("pvtzz")
    src = trained["snap"]["bundle_path"]
    paths = [_copy_bundle(src, _lora_dir(fwebui) / f"{first}.safetensors", {EMBEDDING: 1.0}),
             _copy_bundle(src, _lora_dir(fwebui) / f"{second}.safetensors", {EMBEDDING: -1.0})]
    try:
        w.request("POST", "/sdapi/v1/refresh-loras")
        for a, b in ((first, second), (second, first)):
            _, info = w.txt2img(f"{PROMPT}, {EMBEDDING} <lora:{a}:0.5> <lora:{b}:0.5>")
            assert f"Pivotal bundle embeddings: \"{EMBEDDING}: {a}\"" in info, info
        log = fwebui.log_text()
        if log is not None:
            assert f"'{EMBEDDING}' is in bundles {first} and {second} of this prompt; {first}'s is used" in log
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def test_the_grid_and_the_xyz_part_axis_render_through_the_webui(fwebui: FamilyWebui,
                                                                 trained: dict[str, Any]) -> None:
    """``POST /pivotal/v1/grid`` and the webui's own X/Y/Z plot on the "Pivotal: bundle part" axis
    (found by label): the whole bundle changes the picture, the base cell is the plain txt2img of
    the prompt (the baseline image), the X/Y/Z full cell is the grid's full cell, and the host is as
    it was."""
    import io

    from PIL import Image
    from xyz_plot import sheet_cell, xyz_txt2img

    from pivotal.webui.xyz_axes import PART_AXIS

    w, name = fwebui.server, trained["name"]
    # the host at rest: an earlier test's LoRA generation leaves its LoRA clones loaded (Forge) until
    # the next plain one, which this test's last check makes
    w.txt2img(PROMPT)
    before = _without_cache_stats(w.request("GET", "/pivotal/v1/host"))
    baseline = Image.open(io.BytesIO(trained["before_image"])).convert("RGB").tobytes()
    settings = {"steps": 4, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler", "cfg_scale": 7.0}
    out = w.request("POST", "/pivotal/v1/grid", {"bundle": name, "prompts": [PROMPT], "auto_prompts": 0,
                                                 "columns": ["full", "base"], **settings})
    record = out["record"]
    assert record["complete"] and not out["interrupted"], out
    cells = {c["column"]: c for c in record["cells"]}
    assert cells["full"]["prompt"] == f"{PROMPT} <lora:{name}:1>" and cells["base"]["prompt"] == PROMPT
    with Image.open(out["png"]) as sheet:
        grid_full, grid_base = (sheet_cell(sheet, cells[c]).tobytes() for c in ("full", "base"))
    assert grid_full != grid_base, "the whole bundle did not change the grid's picture"
    assert grid_base == baseline, "the grid's base cell is not the webui's plain txt2img"

    _grid, xyz = xyz_txt2img(w, {**settings, "prompt": f"{PROMPT} <lora:{name}:1>"}, (PART_AXIS, ["full", "base"]))
    assert {c.x: c.prompt for c in xyz} == {"full": f"{PROMPT} <lora:{name}:1>", "base": PROMPT}
    by_part = {c.x: c.image().tobytes() for c in xyz}
    assert by_part["base"] == baseline, "the X/Y/Z base cell is not the webui's plain txt2img"
    assert by_part["full"] == grid_full, "the X/Y/Z full cell is not the grid's"
    assert w.txt2img(PROMPT)[0] == trained["before_image"]
    assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == before


#: LyCORIS algorithms and DoRA, as the A1111 lab's test_webui_algorithms.py trains them
ALGORITHMS = {"loha": {"unet_algorithm": "loha", "te_algorithm": "loha"},
              "lokr": {"unet_algorithm": "lokr", "te_algorithm": "lokr"},
              "dora": {"dora": True}}


@pytest.fixture(scope="module")
def model_targets(fwebui: FamilyWebui) -> list:
    """The LoRA targets of the webui's loaded SD1 checkpoint, loaded by Pivotal's standalone host
    from the same file (host-independent keys): the model weights Pivotal's DoRA math needs."""
    from pivotal.hosts.diffusers.single_file import load_single_file
    from pivotal.inference.generate import WIDEST_PRESET

    # reForge's options may hold no sd_model_checkpoint: the loaded model's own title, from Pivotal's host state
    title = (fwebui.server.request("GET", "/pivotal/v1/host").get("checkpoint")
             or fwebui.server.request("GET", "/sdapi/v1/options").get("sd_model_checkpoint") or "")
    stem = title.split(" [")[0]  # "name.safetensors [hash]"
    found = [m for m in fwebui.server.request("GET", "/sdapi/v1/sd-models")
             if title == m["title"] or stem in (m["title"].split(" [")[0], m["model_name"], Path(m["filename"]).name)]
    assert found, f"the loaded checkpoint {title!r} is not in /sdapi/v1/sd-models"
    host = load_single_file(found[0]["filename"], device="cpu")
    return host.lora_targets("unet", WIDEST_PRESET) + host.lora_targets("te", WIDEST_PRESET)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_the_webui_draws_each_algorithm_as_pivotal_computes_it(algorithm: str, fwebui: FamilyWebui, dataset: Path,
                                                               model_targets: list) -> None:
    """LoHa, LoKr and DoRA bundles (UNet and text encoder) trained in the webui, drawn by its
    built-in loader from their own keys and from Pivotal's ΔW as plain LoRA (:mod:`lora_delta`):
    the two pictures agree far more closely than either agrees with the base picture, and the
    loader skipped nothing."""
    from lora_delta import pivotal_delta_as_lora, png_array

    from pivotal.formats.bundle import read_bundle

    w = fwebui.server
    before_image, _ = w.txt2img(PROMPT)
    before_host = _without_cache_stats(w.request("GET", "/pivotal/v1/host"))
    name = _unique(f"pvt{algorithm}")
    # attention only: DoRA's ΔW is full rank, and its prediction file holds it whole
    snap = _train(fwebui, dataset, name, 8, te_lora=True, lora_preset="attn", **ALGORITHMS[algorithm])
    assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == before_host
    keys = set(read_bundle(snap["bundle_path"]).lora)
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[algorithm]
    for part in ("lora_unet_", "lora_te_"):
        assert any(marker in k and k.startswith(part) for k in keys), (part, sorted(keys)[:8])
    import torch

    reference = pivotal_delta_as_lora(snap["bundle_path"], model_targets,
                                      Path(snap["bundle_path"]).with_name(f"{name}-delta.safetensors"),
                                      full_dtype=torch.float16)  # DoRA's full-rank ΔW: ~300 MB, not 600
    log_before = len(fwebui.log_text() or "")
    try:
        w.request("POST", "/sdapi/v1/refresh-loras")
        drawn, info = w.txt2img(f"{PROMPT} <lora:{name}:1>")
        predicted, _ = w.txt2img(f"{PROMPT} <lora:{reference.stem}:1>")
    finally:
        reference.unlink(missing_ok=True)
    a, p, base = png_array(drawn), png_array(predicted), png_array(before_image)
    agree, change = abs(a - p).mean(), abs(a - base).mean()
    print(f"{fwebui.kind} {algorithm}: |webui - pivotal| mean {agree:.3f} max {abs(a - p).max()}; "
          f"|webui - base| mean {change:.2f}")
    # LoKr moves least in 8 steps (Forge lab: LoHa 10.9, DoRA 4.0, LoKr 0.74 levels, each drawn as
    # predicted to 0.001): a skipped LoRA would show as 0 here and as a large |webui - pivotal|
    assert change > 0.25, f"the {algorithm} bundle did not change the picture"
    assert agree < 0.1 * change, f"the webui's {algorithm} differs from Pivotal's ΔW: {agree:.2f} vs {change:.2f}"
    log = (fwebui.log_text() or "")[log_before:]
    # reForge's loader names every key it did not take ("lora key not loaded: KEY"), the bundle's
    # embeddings among them (they are no LoRA keys); a LoRA key there is one it skipped
    skipped = [k for k in re.findall(r"lora key not loaded: (\S+)", log) if not k.startswith("bundle_emb.")]
    assert SKIPPED_LORA not in log and not skipped, (skipped[:8], log[-2000:])
    assert w.txt2img(PROMPT)[0] == before_image
    assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == before_host


def test_the_tab_trains_and_its_bundle_works(fwebui: FamilyWebui, dataset: Path, tmp_path: Path) -> None:
    """A person trains from the Pivotal tab in headless Chromium (as the A1111 tab test does)."""
    import test_webui_tab as tab

    missing = tab._browser_missing()
    if missing:
        pytest.skip(missing)
    w = fwebui.server
    before_image, _ = w.txt2img(PROMPT)
    shots = Path(os.environ.get("PIVOTAL_SCREENSHOTS") or tmp_path) / fwebui.kind
    with tab.chromium() as driver:
        try:
            name = tab._train_from_the_tab(w, dataset, driver, shots)
        except BaseException:
            shots.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(shots / "webui-failed.png"))
            console = [e.get("message", "") for e in driver.get_log("browser")][-10:]
            print(f"tab test failed; screenshot {shots / 'webui-failed.png'}; status "
                  f"{w.request('GET', '/pivotal/v1/status').get('state')}; browser console: {console}")
            raise
    image, info = w.txt2img(f"{PROMPT}, {EMBEDDING} <lora:{name}:1>")
    assert image != before_image
    assert _shows_embedding(fwebui.kind, info, EMBEDDING), info
    assert w.txt2img(PROMPT)[0] == before_image


def test_a_textcraftor_run_trains_the_text_encoder_through_the_vae(fwebui: FamilyWebui) -> None:
    """The textcraftor mode on Forge and reForge: pictures sampled by the webui's UNet, decoded with the
    gradient on through the VAE module (their patchers decode under inference mode), a reward on them trains
    a text-encoder LoRA only; the host is as before, and the LoRA at te = 0 draws the base picture
    while at te = 1 it changes it. (Mechanics on a full-size SD1 model: 2 steps, 64 px; whether the
    reward is raised is measured on the tiny world, test_webui_textcraftor.py.)"""
    from pivotal.formats.bundle import read_bundle

    w = fwebui.server
    before_image, _ = w.txt2img(PROMPT)
    before_host = _without_cache_stats(w.request("GET", "/pivotal/v1/host"))
    name = _unique("pvttc")
    config = {"output_name": name, "mode": "textcraftor", "steps": 2, "resolution": 64, "batch_size": 1,
              "reward": ["tiny_world_rules"], "reward_prompts": ["a red circle on a blue background, top left",
                                                               "a white square on a black background, bottom right"],
              "textcraftor_sample_steps": 2, "textcraftor_grad_steps": 1, "te_lr": 1e-2, "seed": 3}
    code, body = w.status_of("POST", "/pivotal/v1/train", {"config": config})
    assert code == 200, body
    snap = w.wait_run()
    assert snap["result_status"] == "completed" and snap["step"] == 2, snap["message"]
    bundle = read_bundle(snap["bundle_path"])
    assert bundle.lora and all(k.startswith("lora_te_") for k in bundle.lora) and not bundle.embeddings
    assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == before_host
    assert w.txt2img(PROMPT)[0] == before_image
    # pixels, not PNG bytes: a tag in the prompt changes the infotext the PNG carries
    base = _pixels(before_image)
    assert (_pixels(w.txt2img(f"{PROMPT} <lora:{name}:te=0:unet=1>")[0]) == base).all()
    assert abs(_pixels(w.txt2img(f"{PROMPT} <lora:{name}:te=1:unet=1>")[0]) - base).mean() > 1.0
    assert w.txt2img(PROMPT)[0] == before_image


def _pixels(png: bytes) -> Any:
    """(H, W, 3) float32 of a PNG."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_sdxl_trains_every_part_and_the_host_is_restored(fwebui: FamilyWebui, dataset: Path) -> None:
    """SDXL on this webui (opt-in: ``PIVOTAL_FORGE_SDXL_CHECKPOINT`` / ``PIVOTAL_REFORGE_SDXL_CHECKPOINT``
    names an SDXL checkpoint the webui lists, e.g. ``tools/make_random_sdxl.py``'s full-size random one;
    the test switches to it and back): both encoders and the UNet get gradients, the bundle is SDXL
    with clip_l and clip_g vectors, it changes the image, and the host is restored."""
    from conftest import checkpoint

    prefix = KINDS[fwebui.kind][0]
    name_of_checkpoint = os.environ.get(f"{prefix}_SDXL_CHECKPOINT")
    if not name_of_checkpoint:
        pytest.skip(f"set {prefix}_SDXL_CHECKPOINT to an SDXL checkpoint this {fwebui.kind} lists")
    w = fwebui.server
    with checkpoint(w, name_of_checkpoint):
        before_image, _ = w.txt2img(PROMPT)  # Forge loads the model on the first generation
        before_host = _without_cache_stats(w.request("GET", "/pivotal/v1/host"))
        name = _unique("pvtxl")
        snap = _train(fwebui, dataset, name, 4, te_lora=True, te_lr=1e-4)
        assert untrained_parts(snap["bundle_path"]) == []
        bundle = {b["name"]: b for b in w.request("GET", "/pivotal/v1/bundles")["bundles"]}[name]
        assert bundle["base_model"].startswith("sdxl") and bundle["embeddings"] == [EMBEDDING], bundle
        assert _without_cache_stats(w.request("GET", "/pivotal/v1/host")) == before_host
        assert w.txt2img(PROMPT)[0] == before_image
        image, info = w.txt2img(f"{PROMPT}, {EMBEDDING} <lora:{name}:1>")
        assert image != before_image
        assert _shows_embedding(fwebui.kind, info, EMBEDDING), info
        assert w.txt2img(PROMPT)[0] == before_image


def test_zz_no_traceback_in_the_webui_log(fwebui: FamilyWebui) -> None:
    """Last in the file: from the start of the webui to here, nothing printed a traceback."""
    log = fwebui.log_text()
    if log is None:
        pytest.skip(f"no log: set {KINDS[fwebui.kind][0]}_LOG for a webui reached by URL")
    tracebacks = [m.start() for m in re.finditer("Traceback", log)]
    context = "\n---\n".join(log[max(0, i - 200):i + 1500] for i in tracebacks[:3])
    assert not tracebacks, f"{len(tracebacks)} traceback(s) in the {fwebui.kind} log:\n{context}"
