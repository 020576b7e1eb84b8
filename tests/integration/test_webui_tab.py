"""The Pivotal tab in a real A1111 webui, driven in headless Chromium as a person would: open the
tab, fill in the dataset and the embedding, Start, watch progress, see the run finish; screenshots
before, during and after go to ``$PIVOTAL_SCREENSHOTS`` (or a pytest tmp folder).

Opt-in like every test here (see webui_server.py); also needs Debian's chromium + chromium-driver
and pip's selenium.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from webui_server import Webui

from conftest import EMBEDDING, SDXL_CHECKPOINT, SDXL_MISSING, checkpoint

CHROMIUM = os.environ.get("PIVOTAL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PIVOTAL_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1600")


def _browser_missing() -> str:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return ""


pytestmark = pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "ready")


@pytest.fixture()
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium driven by selenium (also used by test_forge_family.py)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pivotal-webui-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PIVOTAL_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


WATCH_WEBUI_PROGRESS = """
window.pivotalWatch = {bar: false, texts: [], preview: false};
var root = gradioApp().getElementById("pivotal-webui-live");
new MutationObserver(function() {
    var img = root.querySelector("#pivotal-webui-preview img");
    if (img && img.getAttribute("src")) window.pivotalWatch.preview = true;
    var bar = root.querySelector(".progressDiv .progress");
    if (!bar) return;
    window.pivotalWatch.bar = true;
    var text = bar.textContent;
    if (text && window.pivotalWatch.texts.indexOf(text) < 0) window.pivotalWatch.texts.push(text);
}).observe(root, {subtree: true, childList: true, characterData: true});
"""


def _wait(driver: Any, what: str, cond: Callable[[Any], Any], timeout: float) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(cond)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _type(driver: Any, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, elem_id).find_element(By.CSS_SELECTOR, "textarea, input")
    box.clear()
    box.send_keys(text)


def open_pivotal_tab(driver: Any, url: str) -> None:
    """Load the webui's page and switch to the Pivotal tab, as a person does; returns once the
    Start button shows."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    button = "//div[contains(@class,'tab-nav')]//button[normalize-space()='Pivotal']"
    _wait(driver, "the Pivotal tab button", lambda d: d.find_elements(By.XPATH, button), 120)[0].click()
    _wait(driver, "the Start button", lambda d: d.find_element(By.ID, "pivotal-start").is_displayed(), 30)


def start_and_follow(driver: Any, shots: Any, timeout: float) -> None:
    """Screenshot the filled form, press Start, wait for the run to show and to end, screenshot
    the end (``shots``: a folder)."""
    from selenium.webdriver.common.by import By

    driver.save_screenshot(str(shots / "01-filled.png"))
    driver.find_element(By.ID, "pivotal-start").click()
    _wait(driver, "the run to show as running", lambda d: _state(d) in ("running", "finished", "failed"), 120)
    _wait(driver, "the run to end", lambda d: _state(d) in ("finished", "failed"), timeout)
    driver.save_screenshot(str(shots / "02-finished.png"))


def _state(driver: Any) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:  # the progress block is re-rendered on every update
        found = driver.find_elements(By.ID, "pivotal-progress-state")
        return (found[0].get_attribute("data-state") or "") if found else ""
    except StaleElementReferenceException:
        return ""


@pytest.mark.parametrize("base", ["sd1", pytest.param("sdxl", marks=pytest.mark.skipif(
    not SDXL_CHECKPOINT, reason=SDXL_MISSING))])
def test_the_tab_trains_with_progress_and_publishes(base: str, webui: Webui, dataset: Path, browser: Any,
                                                   shots: Path) -> None:
    """A person trains from the tab, then prompts with the embedding name and the bundle's tag:
    the webui registers the bundle's embedding at generation time and the image changes."""
    with contextlib.ExitStack() as stack:
        if base == "sdxl":
            stack.enter_context(checkpoint(webui, SDXL_CHECKPOINT))
        prompt = "a photo of a cat"
        before_image, _ = webui.txt2img(prompt)
        name = _train_from_the_tab(webui, dataset, browser, shots / base)
        image, info = webui.txt2img(f"{prompt}, {EMBEDDING} <lora:{name}:1>")
        assert f'Lora hashes: "{name}: ' in info and f'TI hashes: "{EMBEDDING}: ' in info, info
        assert image != before_image
        assert webui.txt2img(prompt)[0] == before_image  # and nothing stays behind


def _train_from_the_tab(webui: Webui, dataset: Path, d: Any, shots: Path) -> str:
    from selenium.webdriver.common.by import By

    shots.mkdir(parents=True, exist_ok=True)
    before_host = webui.request("GET", "/pivotal/v1/host")
    d.get(webui.url + "/")
    tab = "//div[contains(@class,'tab-nav')]//button[normalize-space()='Pivotal']"
    _wait(d, "the Pivotal tab button", lambda d: d.find_elements(By.XPATH, tab), 120)[0].click()
    _wait(d, "the Start button", lambda d: d.find_element(By.ID, "pivotal-start").is_displayed(), 30)
    d.save_screenshot(str(shots / "webui-01-tab.png"))
    name = f"pvttab{uuid.uuid4().hex[:6]}"
    for elem_id, value in (("pivotal-data-dir", str(dataset)), ("pivotal-output-name", name),
                           ("pivotal-emb0-name", EMBEDDING), ("pivotal-emb0-init", "person"),
                           ("pivotal-steps", "24"), ("pivotal-resolution", "64")):
        _type(d, elem_id, value)
    d.find_element(By.CSS_SELECTOR, "#pivotal-saving .label-wrap, #pivotal-saving > button").click()
    _wait(d, "the previews setting", lambda d: d.find_element(By.ID, "pivotal-preview-every").is_displayed(), 10)
    _type(d, "pivotal-preview-every", "4")
    # Record whether the webui's own progress bar (its requestProgress, started by
    # javascript/pivotal.js) ever shows up in the tab, and its text: a short run may come and go
    # between two polls of this test.
    d.execute_script(WATCH_WEBUI_PROGRESS)
    d.find_element(By.ID, "pivotal-start").click()
    _wait(d, "the run to show as running", lambda d: _state(d) in ("running", "finished", "failed"), 120)
    d.save_screenshot(str(shots / "webui-02-running.png"))
    _wait(d, "the run to end", lambda d: _state(d) in ("finished", "failed"), 600)
    d.save_screenshot(str(shots / "webui-03-finished.png"))
    snap = webui.request("GET", "/pivotal/v1/status")
    assert snap["result_status"] == "completed" and snap["step"] == 24, snap["message"]
    assert snap["preview_count"] == 6, snap
    seen = d.execute_script("return window.pivotalWatch;")
    assert seen["bar"], "the webui's progress bar never appeared in the Pivotal tab"
    assert seen["preview"], "the webui's live preview never showed a picture in the Pivotal tab"
    assert any("Pivotal: step" in t or "%" in t for t in seen["texts"]), seen["texts"]
    assert name in {b["name"] for b in webui.request("GET", "/pivotal/v1/bundles")["bundles"]}
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    print(f"screenshots: {shots}")
    return name
