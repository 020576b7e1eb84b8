"""Sweeps in a real A1111 webui (opt-in like every test here, see webui_server.py).

* From the tab, in headless Chromium, as a person would: fill in the form, open "Sweep", vary
  te_lr over three values, Start sweep; the progress block shows one bar for the queue and the
  runs' table; at the end the table is ranked by validation loss and the loss chart shows the
  validation loss (its colour in the plot and the legend), "Sweep grid" renders the variants
  x parts grid through the webui's own txt2img and saves it next to the sweep; every variant's
  bundle is in the Lora folder and records its value (``pivotal.sweep``); the loaded model is as
  it was (``/pivotal/v1/host``). Needs Debian's chromium + chromium-driver and pip's selenium.
* Over HTTP: ``POST /pivotal/v1/sweep`` refuses a bad value (400, named) and a second sweep while
  one goes (409); Interrupt stops the sweep (the third run never starts); the same request again
  resumes it (finished runs skipped); ``POST /pivotal/v1/sweep/grid`` renders its grid.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_webui_tab import _browser_missing, _state, _type, _wait, chromium
from webui_server import Webui

from conftest import EMBEDDING

TE_LRS = "1e-6, 1e-5, 1e-4"
STEPS = 8
#: the grid's sampling steps: 15 cells through txt2img on a CPU
GRID_STEPS = 4
TRAIN = {"resolution": 64, "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "seed": 3, "steps": STEPS,
         "te_lora": True, "validation_count": 1, "validation_timesteps": 2, "preview_every": 0}


def _check_sweep(webui: Webui, snap: dict[str, Any], count: int) -> list[dict[str, Any]]:
    queue = snap["queue"]
    assert queue["kind"] == "sweep" and queue["count"] == count and queue["step"] == queue["total"] == count * STEPS
    runs = queue["runs"]
    assert {r["state"] for r in runs} == {"completed"}, runs
    assert all(isinstance(r["validation_loss"], float) for r in runs), runs
    published = {b["name"]: b for b in webui.request("GET", "/pivotal/v1/bundles")["bundles"]}
    for r in runs:
        assert r["name"] in published and Path(r["bundle"]).parent == Path(webui.request(
            "GET", "/pivotal/v1/bundles")["lora_dir"])
        from safetensors import safe_open

        with safe_open(r["bundle"], "pt") as f:
            meta = f.metadata()
        name, _, value = r["values"][0].partition("=")
        assert json.loads(meta["pivotal.sweep"]) == {name: value}
    return runs


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "ready")
def test_a_three_value_te_lr_sweep_from_the_tab_gives_its_table_and_grid(webui: Webui, dataset: Path,
                                                                         tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()
    before_host = webui.request("GET", "/pivotal/v1/host")
    name = f"pvtsweep{uuid.uuid4().hex[:6]}"
    with chromium() as d:
        d.get(webui.url + "/")
        tab = "//div[contains(@class,'tab-nav')]//button[normalize-space()='Pivotal']"
        _wait(d, "the Pivotal tab button", lambda d: d.find_elements(By.XPATH, tab), 120)[0].click()
        _wait(d, "the Start button", lambda d: d.find_element(By.ID, "pivotal-start").is_displayed(), 30)
        for elem_id, value in (("pivotal-data-dir", str(dataset)), ("pivotal-output-name", name),
                               ("pivotal-emb0-name", EMBEDDING), ("pivotal-emb0-init", "person"),
                               ("pivotal-steps", str(STEPS)), ("pivotal-resolution", "64")):
            _type(d, elem_id, value)
        for section, elem_id, value in (("pivotal-lora", "pivotal-te-lora", None),
                                        ("pivotal-validation", "pivotal-validation-count", "1"),
                                        ("pivotal-sweep", "pivotal-sweep-values0", TE_LRS)):
            d.find_element(By.CSS_SELECTOR, f"#{section} .label-wrap, #{section} > button").click()
            _wait(d, elem_id, lambda d, e=elem_id: d.find_element(By.ID, e).is_displayed(), 10)
            if value is None:
                d.find_element(By.ID, elem_id).find_element(By.CSS_SELECTOR, "input").click()
            else:
                _type(d, elem_id, value)
        d.find_element(By.ID, "pivotal-sweep-start").click()
        _wait(d, "the sweep to show as running", lambda d: _state(d) in ("running", "finished", "failed"), 120)
        _wait(d, "the queue line", lambda d: d.find_elements(By.CSS_SELECTOR, ".pivotal-queue-line"), 60)
        d.save_screenshot(str(shots / "sweep-01-running.png"))
        _wait(d, "the sweep to end", lambda d: _state(d) in ("finished", "failed"), 1800)
        d.save_screenshot(str(shots / "sweep-02-finished.png"))
        chart = [i.get_attribute("src") for i in d.find_elements(By.CSS_SELECTOR, "#pivotal-chart img")]
        assert chart and chart[0], "no loss chart in the tab"
        in_plot, in_legend = validation_pixels(_image_of(webui.url, chart[0]))
        assert in_plot >= 9 and in_legend >= 16, f"no validation loss in the chart ({in_plot}, {in_legend} px)"
        snap = webui.request("GET", "/pivotal/v1/status")
        assert snap["result_status"] == "completed", snap["message"]
        runs = _check_sweep(webui, snap, 3)
        table = d.find_element(By.ID, "pivotal-queue-table").get_attribute("outerHTML")
        order = re.findall(r'data-run="([^"]+)"', table)
        best_first = sorted(runs, key=lambda r: r["validation_loss"])
        assert order == [r["name"] for r in best_first] and "ranked by validation loss" in table
        _type(d, "pivotal-sweep-prompt", f"a photo of {EMBEDDING}")
        _type(d, "pivotal-sweep-steps", str(GRID_STEPS))  # size stays 0: the variants' 64 px
        d.find_element(By.ID, "pivotal-sweep-grid").click()
        _wait(d, "the sweep grid", lambda d: d.find_elements(By.ID, "pivotal-sweep-grid-done"), 600)
        d.save_screenshot(str(shots / "sweep-03-grid.png"))
    folder = Path(snap["queue"]["folder"])
    record = json.loads((folder / "sweep-grid.json").read_text(encoding="utf-8"))
    assert (folder / "sweep-grid.png").is_file() and record["complete"]
    assert record["row_bundles"] == [r["name"] for r in best_first]
    assert record["columns"] == ["full", "unet", "te", "emb", "base"] and len(record["cells"]) == 15
    assert all(f"Lora hashes: \"{c['bundle']}: " in c["infotext"] for c in record["cells"] if c["column"] == "full")
    assert all(c["size"] == [64, 64] and f"Steps: {GRID_STEPS}," in c["infotext"] for c in record["cells"])
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    print(f"screenshots: {shots}")


def _image_of(base: str, src: str) -> Any:
    """The picture an ``<img src>`` shows: a data: URL (gradio 3) or a file URL of the webui."""
    import base64
    import io
    import urllib.parse
    import urllib.request

    from PIL import Image

    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.parse.urljoin(base + "/", src), timeout=30) as resp:
        return Image.open(io.BytesIO(resp.read()))


def validation_pixels(chart: Any) -> tuple[int, int]:
    """Pixels of the loss chart's validation colour in its plot area and in its legend."""
    from pivotal.ui.loss_chart import MARGIN_T, VALIDATION_COLOUR

    rgb = chart.convert("RGB")
    pixels = list(rgb.getdata())
    width = rgb.size[0]
    # near the colour, not equal: a gradio 4+ webui sends the image as WebP (lossy)
    hits = [i // width for i, p in enumerate(pixels) if max(abs(a - b) for a, b in zip(p, VALIDATION_COLOUR)) <= 40]
    return sum(y >= MARGIN_T for y in hits), sum(y < MARGIN_T for y in hits)


def test_the_sweep_api_refuses_interrupts_resumes_and_renders_its_grid(webui: Webui, dataset: Path) -> None:
    name = f"pvtsweepapi{uuid.uuid4().hex[:6]}"
    config = {"data_dir": str(dataset), "output_name": name,
              "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}], **TRAIN}
    body = {"config": config, "vary": ["te_lr=1e-6,1e-5,1e-4"]}
    code, out = webui.status_of("POST", "/pivotal/v1/sweep", {**body, "vary": ["te_lr=1e-6,fast"]})
    assert code == 400 and "te_lr" in out["detail"]
    code, started = webui.status_of("POST", "/pivotal/v1/sweep", body)
    assert code == 200 and len(started["runs"]) == 3, started
    assert webui.status_of("POST", "/pivotal/v1/sweep", body)[0] == 409
    webui.wait_step(2)  # the first run is going
    webui.request("POST", "/pivotal/v1/interrupt")
    snap = webui.wait_run()
    assert snap["result_status"] == "interrupted"
    assert [r["state"] for r in snap["queue"]["runs"]][1:] == ["pending", "pending"], snap["queue"]
    code, again = webui.status_of("POST", "/pivotal/v1/sweep", body)
    assert code == 200 and again["folder"] == started["folder"]
    snap = webui.wait_run(timeout=1800)
    assert snap["result_status"] == "completed", snap["message"]
    _check_sweep(webui, snap, 3)
    grid = webui.request("POST", "/pivotal/v1/sweep/grid", {"prompt": f"a photo of {EMBEDDING}", "steps": 4,
                                                             "width": 64, "height": 64, "sampler_name": "Euler",
                                                             "seed": 5})
    assert grid["record"]["complete"] and Path(grid["png"]).parent == Path(started["folder"])
