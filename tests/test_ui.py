"""The MLflow UI as people use it: a real `mlflow server`, opened in headless Chromium."""

import os
import shutil
import time
from pathlib import Path

import pytest

from servers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def server(cooked, tmp_path):
    srv = MlflowServer(cooked["uri"], None, tmp_path / "server.log", env=cooked["env"]).start()
    yield srv.uri
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


UI_WAIT_S = 300  # generous: the UI's JavaScript bundle loads slowly in Chromium on a loaded machine


def _wait_for(driver, texts, timeout=UI_WAIT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        page = driver.page_source
        if all(t in page for t in texts):
            return page
        time.sleep(0.5)
    raise AssertionError(f"never showed {[t for t in texts if t not in driver.page_source]}")


def _click_first(driver, css, timeout=UI_WAIT_S):
    """Click the first element matching `css` once the page has rendered it; React may re-render
    the table between finding the element and clicking it, so a stale element is looked up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        try:
            if found:
                found[0].click()
                return
        except StaleElementReferenceException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"never showed an element matching {css}")


def _shots_dir(tmp_path) -> Path:
    out = Path(os.environ.get("SOUP_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_experiment_page_lists_sweep_trials_and_soups(cooked, server, browser, tmp_path):
    sweep = cooked["sweep"]
    browser.get(f"{server}/#/experiments/{sweep.experiment_id}/runs")
    _wait_for(browser, [">c4<", "matching runs"])
    # the expander of the sweep's nested runs may render after the run's name: wait for it too
    _click_first(browser, "button[data-component-id*='runnamecellrenderer']")
    trials = cooked["client"].search_runs([sweep.experiment_id], "tags.`soup.role` = 'trial'")
    page = _wait_for(browser, ["uniform-soup", "greedy-soup", "learned-soup"]
                     + [t.info.run_name for t in trials])
    assert "c4" in page
    browser.save_screenshot(str(_shots_dir(tmp_path) / "experiment.png"))


def test_registered_model_page_lists_versions_with_tags(cooked, server, browser, tmp_path):
    browser.get(f"{server}/#/models/tiny4-soup")
    _wait_for(browser, ["Version 1", "Version 2", "Version 3"])
    page = _wait_for(browser, ["uniform", "greedy", "learned"])
    assert "tiny4-soup" in page
    browser.save_screenshot(str(_shots_dir(tmp_path) / "registered-model.png"))
    version = cooked["client"].search_model_versions("name = 'tiny4-soup'")[0].version
    browser.get(f"{server}/#/models/tiny4-soup/versions/{version}")
    _wait_for(browser, ["heldout_acc", "sweep_id", "ingredients", "recipe"])
    browser.save_screenshot(str(_shots_dir(tmp_path) / "model-version.png"))
