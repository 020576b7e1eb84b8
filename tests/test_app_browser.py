"""End to end, as a person uses it: ``pivotal app --demo sd1`` in a real process, driven in
headless Chromium — Start a run, watch it complete, pick the new bundle in the Generate tab,
generate with the embedding's name in the prompt, and see an image.

Needs Debian's ``chromium`` and ``chromium-driver`` and pip's ``selenium`` (nothing downloads a
browser or a driver), plus diffusers for the demo model; skipped, with the reason, without them.
Screenshots go to ``$PIVOTAL_SCREENSHOTS`` (or a pytest tmp folder, printed at the end).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
CHROMIUM = os.environ.get("PIVOTAL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PIVOTAL_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1800")
STARTUP_S = 240   # building the demo model and importing gradio/torch on a 2-core machine
RUN_S = 300       # the 300-step demo run (~40 s on a laptop CPU; generous for a busy CI machine)


def _missing() -> str:
    """Why the test cannot run here, or "" when it can."""
    for module, why in (("diffusers", "the demo model needs diffusers"), ("gradio", "the app needs gradio"),
                        ("selenium", "pip install selenium")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({why})"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {package})"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.browser,
              pytest.mark.skipif(bool(_missing()), reason=_missing() or "ready")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"pivotal app exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with opener.open(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"pivotal app did not answer on {url} in {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``pivotal app --demo sd1`` on a free 127.0.0.1 port, stopped (by its own pid) afterwards."""
    root = tmp_path_factory.mktemp("app")
    out, log = root / "out", root / "server.log"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(LIB), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pivotal", "app", "--demo", "sd1", "--out", str(out), "--port", str(port),
           "--no-browser", "--device", "cpu"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http(url, proc, log, STARTUP_S)
        yield {"url": url, "out": out, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["PIVOTAL_SCREENSHOTS"]) if os.environ.get("PIVOTAL_SCREENSHOTS") \
        else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture()
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pivotal-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -- page helpers (work with gradio 3.41's and 6's markup) ---------------------------------------
def _wait(driver: Any, what: str, cond: Callable[[Any], Any], timeout: float, extra: Callable[[], str] = str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(cond)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{extra()}")


def _by_id(driver: Any, elem_id: str, timeout: float = 30) -> Any:
    """The element ``elem_id``, waiting for it (a loaded page may still be building its blocks)."""
    from selenium.webdriver.common.by import By

    return _wait(driver, f"#{elem_id}", lambda d: d.find_elements(By.ID, elem_id), timeout)[0]


def _open_tab(driver: Any, label: str) -> None:
    from selenium.webdriver.common.by import By

    xpath = f"//*[@role='tablist' or contains(@class,'tab-nav')]//button[normalize-space()='{label}']"
    _wait(driver, f"the {label} tab", lambda d: d.find_elements(By.XPATH, xpath), 20)[0].click()


def _pick(driver: Any, dropdown_id: str, value: str) -> None:
    """Choose ``value`` in a gradio dropdown the way a user does: open it, click the option."""
    from selenium.webdriver.common.by import By

    _by_id(driver, dropdown_id).find_element(By.CSS_SELECTOR, "input").click()

    def option(d: Any) -> Any:
        for o in d.find_elements(By.CSS_SELECTOR, "[role=option], ul.options li"):
            if value in (o.get_attribute("aria-label"), o.get_attribute("data-value"), o.text.strip()):
                return o
        return None

    _wait(driver, f"option {value!r} in #{dropdown_id}", option, 20).click()


def _type(driver: Any, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = _by_id(driver, elem_id).find_element(By.CSS_SELECTOR, "textarea, input")
    box.clear()
    box.send_keys(text)


def _progress(driver: Any) -> tuple[str, str, str]:
    """(state, result, text) of the progress block."""
    el = _by_id(driver, "pivotal-progress-state")
    return el.get_attribute("data-state") or "", el.get_attribute("data-result") or "", el.text


# -- the test ----------------------------------------------------------------------------------
def test_train_then_generate_in_the_browser(app_server: dict[str, Any], browser: Any, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    d, out, log = browser, app_server["out"], app_server["log"]

    def server_log() -> str:
        return "server log (tail):\n" + log.read_text(errors="replace")[-3000:]

    d.get(app_server["url"])
    _wait(d, "the Start button", lambda d: d.find_elements(By.ID, "pivotal-start"), 60, server_log)
    header = _by_id(d, "pivotal-header").text
    assert "pre-trained on a synthetic world" in header, header  # the demo model says what it is
    data_dir = _by_id(d, "pivotal-data-dir").find_element(By.CSS_SELECTOR, "textarea, input").get_attribute("value")
    assert Path(data_dir) == out / "demo_data" and any((out / "demo_data").glob("*.png"))
    d.save_screenshot(str(shots / "01-loaded.png"))

    _by_id(d, "pivotal-check").click()
    _wait(d, "the dataset report", lambda d: "Ready" in _by_id(d, "pivotal-report").text
          or "ERROR" in _by_id(d, "pivotal-report").text, 120, server_log)
    assert "training can start" in _by_id(d, "pivotal-report").text, _by_id(d, "pivotal-report").text

    _by_id(d, "pivotal-start").click()
    _wait(d, "the run to start", lambda d: _progress(d)[0] in ("running", "finished", "failed"), 60, server_log)
    d.save_screenshot(str(shots / "02-running.png"))
    _wait(d, "the run to end", lambda d: _progress(d)[0] in ("finished", "failed"), RUN_S,
          lambda: f"progress: {_progress(d)[2]}\n{server_log()}")
    d.save_screenshot(str(shots / "03-finished.png"))
    state, result, text = _progress(d)
    assert (state, result) == ("finished", "completed"), f"{text}\n{server_log()}"
    from pivotal.demo.settings import DEMO_SETTINGS  # the app's demo runs these steps

    assert f"step {DEMO_SETTINGS['steps']}/{DEMO_SETTINGS['steps']}" in text
    assert (out / "pivotal.safetensors").is_file()
    chart = _by_id(d, "pivotal-chart").find_elements(By.CSS_SELECTOR, "img")
    assert chart and chart[0].get_attribute("src"), "the loss chart is shown"

    _open_tab(d, "Generate")
    _by_id(d, "pivotal-gen-refresh").click()
    _pick(d, "pivotal-gen-bundle", "pivotal.safetensors")
    _wait(d, "the bundle's embedding names", lambda d: "mychar" in _by_id(d, "pivotal-gen-names").text, 20)
    # green: a background none of the character's training pictures had (demo_data.CHARACTER_BACKGROUNDS)
    _type(d, "pivotal-gen-prompt", "mychar on a green background, top left")
    d.save_screenshot(str(shots / "04-generate-form.png"))
    _by_id(d, "pivotal-gen-go").click()
    _wait(d, "the generated image", lambda d: d.find_elements(By.ID, "pivotal-gen-done")
          or d.find_elements(By.CSS_SELECTOR, "#pivotal-gen-info .pivotal-message"), 180,
          lambda: f"info: {_by_id(d, 'pivotal-gen-info').text}\n{server_log()}")
    info = _by_id(d, "pivotal-gen-info").text
    assert d.find_elements(By.ID, "pivotal-gen-done"), info
    assert "mychar on a green background, top left <lora:pivotal:1>" in info
    imgs = _wait(d, "the image element", lambda d: [i for i in d.find_elements(By.CSS_SELECTOR,
                                                                                  "#pivotal-gen-image img")
                                                    if i.get_attribute("src")], 30)
    assert imgs[0].get_attribute("naturalWidth") not in (None, "0")
    d.save_screenshot(str(shots / "05-generated.png"))
    # The picture shown is the character (its orange / purple) on the asked-for, new background.
    from pivotal.demo.world import EXAMPLE_CHARACTER
    from pivotal.demo.world_read import read_picture

    reading = read_picture(_image_of(imgs[0].get_attribute("src")))
    assert reading.background == "green", reading
    assert reading.colour in (EXAMPLE_CHARACTER.colour, EXAMPLE_CHARACTER.accent), reading
    print(f"screenshots: {shots}")


def _image_of(src: str) -> Any:
    """The PIL image an ``<img src>`` shows: a data: URL, or a file URL of the app (loopback)."""
    import base64
    import io

    from PIL import Image

    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(src, timeout=30) as resp:
        return Image.open(io.BytesIO(resp.read()))


def test_second_tab_follows_the_run_and_interrupts_it(app_server: dict[str, Any], browser: Any, shots: Path) -> None:
    """Checklist 33: while a run goes, a second tab shows that run and offers no second Start
    (the job itself refuses one too: test_ui_build / test_job). Checklist 28: Interrupt, here from
    the second tab, stops at the next step, and on_interrupt=save keeps a bundle of the steps done."""
    from selenium.webdriver.common.by import By

    d, out = browser, app_server["out"]
    d.get(app_server["url"])
    _wait(d, "the Start button", lambda d: d.find_elements(By.ID, "pivotal-start"), 60)
    _type(d, "pivotal-steps", "100000")
    _by_id(d, "pivotal-start").click()
    _wait(d, "a few steps", lambda d: _progress(d)[0] == "running" and "step 0/" not in _progress(d)[2]
          and "step " in _progress(d)[2], 120)
    assert not _by_id(d, "pivotal-start").is_enabled()  # no double start from this tab
    first = d.current_window_handle
    d.switch_to.new_window("tab")
    d.get(app_server["url"])
    _wait(d, "the second tab to show the run", lambda d: d.find_elements(By.ID, "pivotal-progress-state")
          and _progress(d)[0] == "running", 60)
    _wait(d, "Start to be disabled in the second tab", lambda d: not _by_id(d, "pivotal-start").is_enabled(), 30)
    d.save_screenshot(str(shots / "06-second-tab.png"))
    _wait(d, "Interrupt to be enabled", lambda d: _by_id(d, "pivotal-interrupt").is_enabled(), 30)
    _by_id(d, "pivotal-interrupt").click()
    d.switch_to.window(first)
    _wait(d, "the run to stop", lambda d: _progress(d)[0] != "running", 120)
    state, result, text = _progress(d)
    d.save_screenshot(str(shots / "07-interrupted.png"))
    assert (state, result) == ("finished", "interrupted"), text
    saved = [p for p in out.glob("pivotal-step*.safetensors") if not p.name.endswith(".resume.safetensors")]
    assert len(saved) == 1, saved
    assert saved[0].name in text  # the progress names the bundle it saved
    _wait(d, "Start to be enabled again", lambda d: _by_id(d, "pivotal-start").is_enabled(), 30)


def _train_short(d: Any, out: Path, steps: int = 10) -> None:
    """A short run from the Train tab when no bundle is there yet (a test run on its own)."""
    from selenium.webdriver.common.by import By

    if (out / "pivotal.safetensors").is_file():
        return
    _type(d, "pivotal-steps", str(steps))
    _by_id(d, "pivotal-start").click()
    _wait(d, "the run to end", lambda d: d.find_elements(By.ID, "pivotal-progress-state")
          and _progress(d)[0] in ("finished", "failed") and f"step {steps}/{steps}" in _progress(d)[2], RUN_S)
    assert (out / "pivotal.safetensors").is_file(), _progress(d)[2]


def test_the_ablation_grid_button_in_the_browser(app_server: dict[str, Any], browser: Any, shots: Path) -> None:
    """The Generate tab's "Ablation grid of this bundle": the chosen bundle's five columns for the
    prompt and a row in a new context, rendered by Pivotal's own sampler, shown and saved."""
    import json

    from selenium.webdriver.common.by import By

    d, out = browser, app_server["out"]
    d.get(app_server["url"])
    _wait(d, "the Start button", lambda d: d.find_elements(By.ID, "pivotal-start"), 60)
    _train_short(d, out)
    _open_tab(d, "Generate")
    _by_id(d, "pivotal-gen-refresh").click()
    _pick(d, "pivotal-gen-bundle", "pivotal.safetensors")
    _type(d, "pivotal-gen-prompt", "mychar on a green background, top left")
    before = set((out / "grids").glob("*.png")) if (out / "grids").is_dir() else set()
    _by_id(d, "pivotal-gen-grid").click()
    _wait(d, "the grid", lambda d: d.find_elements(By.ID, "pivotal-gen-grid-done")
          or d.find_elements(By.CSS_SELECTOR, "#pivotal-gen-info .pivotal-message"), 300,
          lambda: f"info: {_by_id(d, 'pivotal-gen-info').text}")
    assert d.find_elements(By.ID, "pivotal-gen-grid-done"), _by_id(d, "pivotal-gen-info").text
    d.save_screenshot(str(shots / "08-grid.png"))
    (png,) = set((out / "grids").glob("*.png")) - before
    record = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["columns"] == ["full", "unet", "te", "emb", "base"] and record["complete"]
    assert record["rows"][0] == "mychar on a green background, top left" and len(record["rows"]) == 3
    assert str(png) in _by_id(d, "pivotal-gen-info").text
    imgs = _wait(d, "the sheet", lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "#pivotal-gen-image img")
                                            if i.get_attribute("src")], 30)
    sheet = _image_of(imgs[0].get_attribute("src"))
    from PIL import Image

    with Image.open(png) as saved:
        assert sheet.size == saved.size  # the page shows the saved sheet


def test_a_sweep_and_its_grid_in_the_browser(app_server: dict[str, Any], browser: Any, shots: Path) -> None:
    """The Train tab's Sweep section: two embedding LRs from the form's settings with one image held
    out for validation, one bar for the queue and the runs' table ranked by validation loss, the
    validation loss in the loss chart, then the variants x parts grid saved next to the sweep."""
    import json

    from selenium.webdriver.common.by import By

    d, out = browser, app_server["out"]
    d.get(app_server["url"])
    _wait(d, "the Start button", lambda d: d.find_elements(By.ID, "pivotal-start"), 60)
    _type(d, "pivotal-steps", "10")
    _type(d, "pivotal-output-name", "swept")
    d.find_element(By.CSS_SELECTOR, "#pivotal-validation .label-wrap, #pivotal-validation > button").click()
    _wait(d, "the validation section", lambda d: _by_id(d, "pivotal-validation-count").is_displayed(), 10)
    _type(d, "pivotal-validation-count", "1")
    d.find_element(By.CSS_SELECTOR, "#pivotal-sweep .label-wrap, #pivotal-sweep > button").click()
    _wait(d, "the sweep section", lambda d: _by_id(d, "pivotal-sweep-values0").is_displayed(), 10)
    _pick(d, "pivotal-sweep-name0", "embedding_lr")
    _type(d, "pivotal-sweep-values0", "1e-3, 1e-2")
    _by_id(d, "pivotal-sweep-start").click()
    _wait(d, "the queue line", lambda d: d.find_elements(By.CSS_SELECTOR, ".pivotal-queue-line"), 60)
    d.save_screenshot(str(shots / "09-sweep-running.png"))
    _wait(d, "the sweep to end", lambda d: _progress(d)[0] in ("finished", "failed")
          and d.find_elements(By.CSS_SELECTOR, ".pivotal-queue-line"), 2 * RUN_S)
    state, result, text = _progress(d)
    assert (state, result) == ("finished", "completed"), text
    assert "step 20/20 overall" in text and "2 runs" in text
    rows = d.find_elements(By.CSS_SELECTOR, "#pivotal-queue-table tr[data-run]")
    assert sorted(r.get_attribute("data-run") for r in rows) == ["swept-embedding_lr0p001", "swept-embedding_lr0p01"]
    assert {r.get_attribute("data-state") for r in rows} == {"completed"}
    assert "ranked by validation loss" in _by_id(d, "pivotal-queue-table").get_attribute("outerHTML")
    d.save_screenshot(str(shots / "10-sweep-finished.png"))
    # the loss chart plots the held-out validation loss: its colour in the plot area and the legend
    from pivotal.ui.loss_chart import MARGIN_T, VALIDATION_COLOUR

    srcs = [i.get_attribute("src") for i in d.find_elements(By.CSS_SELECTOR, "#pivotal-chart img")]
    assert srcs and srcs[0], "no loss chart"
    chart = _image_of(srcs[0]).convert("RGB")
    chart.save(shots / "10-sweep-chart.png")
    # near the colour, not equal: gradio 4+ sends the image as WebP (lossy)
    rows_hit = [i // chart.size[0] for i, p in enumerate(chart.getdata())
                if max(abs(a - b) for a, b in zip(p, VALIDATION_COLOUR)) <= 40]
    assert sum(y >= MARGIN_T for y in rows_hit) >= 9 and sum(y < MARGIN_T for y in rows_hit) >= 16, rows_hit[:20]
    _type(d, "pivotal-sweep-prompt", "mychar on a green background, top left")
    _by_id(d, "pivotal-sweep-grid").click()
    _wait(d, "the sweep grid", lambda d: d.find_elements(By.ID, "pivotal-sweep-grid-done")
          or d.find_elements(By.CSS_SELECTOR, "#pivotal-sweep-info .pivotal-message"), 300)
    assert d.find_elements(By.ID, "pivotal-sweep-grid-done"), _by_id(d, "pivotal-sweep-info").text
    d.save_screenshot(str(shots / "11-sweep-grid.png"))
    (record_path,) = (out / "sweeps").glob("swept-embedding_lr-*/sweep-grid.json")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    assert sorted(record["row_bundles"]) == ["swept-embedding_lr0p001", "swept-embedding_lr0p01"]
    assert record["complete"] and len(record["cells"]) == 10


def test_picking_textcraftor_fills_in_the_demos_recipe(app_server: dict[str, Any], browser: Any, shots: Path) -> None:
    """In the demo app, picking the textcraftor mode fills the form with the measured recipe (its
    reward, the new-word prompts, the text-encoder LR), and picking pivotal again restores the form."""
    from selenium.webdriver.common.by import By

    browser.get(app_server["url"])
    _open_tab(browser, "Train")
    for section in ("pivotal-textcraftor", "pivotal-lora"):  # closed accordions may not render their fields
        _by_id(browser, section).find_element(By.CSS_SELECTOR, ".label-wrap, :scope > button").click()

    def value(elem_id: str) -> str:
        return _by_id(browser, elem_id).find_element(By.CSS_SELECTOR, "textarea, input").get_attribute("value") or ""

    plain_lr = value("pivotal-te-lr")

    def pick(mode: str) -> None:
        _by_id(browser, "pivotal-mode").find_element(By.XPATH, f".//label[normalize-space()='{mode}']").click()

    pick("textcraftor")
    _wait(browser, "the textcraftor recipe in the form", lambda d: value("pivotal-reward") == "tiny_world_rules", 20)
    prompts = value("pivotal-reward-prompts").splitlines()
    assert len(prompts) == 256 and "crimson" in " ".join(prompts)
    assert float(value("pivotal-te-lr")) == 5e-3 and value("pivotal-textcraftor-grad-steps") == "10"
    browser.save_screenshot(str(shots / "app-textcraftor-recipe.png"))
    pick("pivotal")
    _wait(browser, "the form's own values back", lambda d: value("pivotal-reward") == "", 20)
    assert value("pivotal-te-lr") == plain_lr
