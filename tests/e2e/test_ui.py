"""The MLflow UI as people use it: a real `mlflow server`, opened in headless Chromium.

The walkthrough (`test_pick_a_soup_in_the_ui_and_load_it_by_alias`) does what a person does to
pick a soup: rank the experiment's logged models (trials and soups) by held-out accuracy, read
each registered version's recipe and accuracies, set the `champion` alias in the UI on the version
the promotion gate allows, and load `models:/<name>@champion`. Each step leaves a screenshot in
``$SOUP_SCREENSHOT_DIR`` (docs/screenshots/ when regenerating the README's pictures).

The server runs on a copy of the shared `cooked` store, so the alias set here is seen by no other
test (tests/e2e/test_serving.py and tests/e2e/test_bad_input.py read and move `champion` themselves).
"""

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MODEL, ALIAS = "tiny4-soup", "champion"
HELDOUT = "heldout_acc"
UI_WAIT_S = 300  # generous: the UI's JavaScript bundle loads slowly in Chromium on a loaded machine

# UI preferences set before the page's own scripts run: the "Model training" workflow (its
# sidebar names the Runs and Models tabs) and the MLflow Assistant panel closed (it opens itself
# on a first visit and would take a third of every screenshot). A person clicks the same toggles.
UI_PREFS = """try {
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
} catch (e) {}"""


@pytest.fixture(scope="module")
def store(cooked, tmp_path_factory):
    """A copy of the cooked store's database (SQLite's backup API: consistent even if another
    connection is writing). Runs and models keep their absolute artifact locations, so the copy
    reads the cooked artifacts in place and writes none: an alias is a database row."""
    tmp = tmp_path_factory.mktemp("ui-store")
    src = sqlite3.connect(cooked["uri"][len("sqlite:///"):])
    dst = sqlite3.connect(tmp / "mlflow.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)  # tests run before this one (test_serving) may have set champion
    if ALIAS in client.get_registered_model(MODEL).aliases:  # search results carry no aliases
        client.delete_registered_model_alias(MODEL, ALIAS)
    assert ALIAS not in client.get_registered_model(MODEL).aliases
    return {"tmp": tmp, "uri": uri, "env": {**cooked["env"], "MLFLOW_TRACKING_URI": uri}}


@pytest.fixture(scope="module")
def server(store):
    srv = MlflowServer(store["uri"], None, store["tmp"] / "server.log", env=store["env"]).start()
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
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": UI_PREFS})
    yield driver
    driver.quit()


# --- waiting on the page ---------------------------------------------------------------------

def _until(driver, what, check, timeout=UI_WAIT_S):
    """`check()` until it returns something true. An element that React re-rendered between
    finding and using it (stale), or that is not clickable yet (covered by a closing menu or
    modal, still hidden), counts as not yet. At the deadline the page's HTML and a screenshot
    are kept for the failure message."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        StaleElementReferenceException,
    )

    deadline = time.time() + timeout
    while True:
        try:
            result = check()
        except (StaleElementReferenceException, ElementClickInterceptedException,
                ElementNotInteractableException):
            result = None
        if result:
            return result
        if time.time() > deadline:
            raise AssertionError(f"the page never showed {what} in {timeout} s ({_keep_page(driver)})")
        time.sleep(0.5)


def _keep_page(driver) -> str:
    out = Path(tempfile.mkdtemp(prefix="soup-ui-"))
    try:
        (out / "page.html").write_text(driver.page_source)
        driver.save_screenshot(str(out / "page.png"))
        return f"at {driver.current_url}; its HTML and a screenshot are in {out}"
    except Exception as err:  # the browser itself is gone: say so, keep the first failure
        return f"the page could not be saved: {err!r}"


def _wait_for(driver, texts, timeout=UI_WAIT_S):
    """The page's HTML once it holds every one of `texts`."""
    missing = list(texts)

    def shown():
        page = driver.page_source
        missing[:] = [t for t in texts if t not in page]
        return page if not missing else None

    try:
        return _until(driver, "every text", shown, timeout)
    except AssertionError as err:
        raise AssertionError(f"never showed {missing}: {err}") from None


def _click_first(driver, css, timeout=UI_WAIT_S):
    """Click the first element matching `css` once the page has rendered it; React may re-render
    the table between finding the element and clicking it, so a stale element is looked up again."""
    from selenium.webdriver.common.by import By

    def click():
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            found[0].click()
            return True

    _until(driver, f"an element matching {css}", click, timeout)


def _rendered(driver, css, timeout=UI_WAIT_S):
    from selenium.webdriver.common.by import By

    return _until(driver, f"an element matching {css}", lambda: driver.find_elements(By.CSS_SELECTOR, css),
                  timeout)


_TREE_NODE_CHECKED = """
const title = [...document.querySelectorAll(arguments[0] + ' span[title]')]
  .find(e => e.getAttribute('title') === arguments[1]);
if (!title) return null;
const box = title.parentElement.querySelector('[class$="-tree-checkbox"], [class*="-tree-checkbox "]');
return box ? box.className.includes('-tree-checkbox-checked') : null;"""


def _set_tree_check(driver, tree_css, title, checked):
    """Tick or untick the node `title` of a column picker's tree (`tree_css`): click its label
    until the page shows the state asked for (a click on a node being re-rendered can be lost)."""
    from selenium.webdriver.common.by import By

    def state():
        return driver.execute_script(_TREE_NODE_CHECKED, tree_css, title)

    def settled():
        if state() is None:
            return False
        if state() == checked:
            return True
        for el in driver.find_elements(By.CSS_SELECTOR, f"{tree_css} span[title]"):
            if el.get_attribute("title") == title:
                el.click()
                break
        wait_until = time.time() + 30  # a slow re-render is not a lost click: clicking again would undo it
        while time.time() < wait_until:
            time.sleep(0.5)
            if state() == checked:
                return True
        return False

    _until(driver, f"column {title!r} {'shown' if checked else 'hidden'}", settled)


def _close_menus(driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    driver.execute_script("document.activeElement && document.activeElement.blur()")  # no focus ring


# ag-grid draws a table's row as one element per pinned part, each with the row's index and id
# (the run id in the runs table, the model id in the logged models table): read them by index.
_GRID_ROWS = """
const rows = {};
for (const r of document.querySelectorAll('[role=row][row-id][row-index]')) {
  const i = Number(r.getAttribute('row-index')), row = rows[i] || (rows[i] = {id: r.getAttribute('row-id'), cells: {}});
  for (const c of r.querySelectorAll('[col-id]')) {
    const text = c.innerText.trim();
    // a metric column's id is JSON that the page escapes twice: its quotes read &quot;
    if (text) row.cells[c.getAttribute('col-id').replaceAll('&quot;', '"')] = text;
  }
}
return Object.keys(rows).map(Number).sort((a, b) => a - b).map(i => rows[i]);"""


def _grid_rows(driver):
    return driver.execute_script(_GRID_ROWS)


def _shots_dir(tmp_path) -> Path:
    out = Path(os.environ.get("SOUP_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- what MLflow says, to compare the page with -----------------------------------------------

def _latest(model, key):
    """The model's last logged value of metric `key` (None if it has none)."""
    found = sorted((m for m in model.metrics or [] if m.key == key), key=lambda m: (m.timestamp, m.step))
    return found[-1].value if found else None


def _ranked_models(client, experiment_id):
    models, token = [], None
    while True:
        page = client.search_logged_models(
            [experiment_id], order_by=[{"field_name": f"metrics.{HELDOUT}", "ascending": False}],
            page_token=token)
        models += page
        token = page.token
        if not token:
            return models


def _same_ranking(page_models, api_models):
    """Same models, and the same held-out accuracy at every place: the same order up to ties
    (a greedy soup of one ingredient scores exactly as that trial; ties may come in either order)."""
    assert sorted(m.model_id for m in page_models) == sorted(m.model_id for m in api_models)
    assert [_latest(m, HELDOUT) for m in page_models] == [_latest(m, HELDOUT) for m in api_models], (
        [m.name for m in page_models], [m.name for m in api_models])


# --- the tests --------------------------------------------------------------------------------

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


def test_pick_a_soup_in_the_ui_and_load_it_by_alias(cooked, store, server, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    client, shots = MlflowClient(server), _shots_dir(tmp_path)
    experiment_id = cooked["sweep"].experiment_id
    ranked = _ranked_models(client, experiment_id)
    _models_view_lists_every_model_with_its_accuracy(browser, server, experiment_id, ranked, shots)
    _runs_sorted_by_heldout_rank_the_models(browser, server, experiment_id, ranked, shots)
    version = _registered_model_page_shows_each_version(browser, server, client, shots)
    _set_alias_in_the_ui(browser, server, version, shots)
    _alias_resolves_and_loads(client, server, store, version)


def _models_view_lists_every_model_with_its_accuracy(browser, server, experiment_id, ranked, shots):
    """Step 1a: the experiment's Models tab lists every trial and soup with its accuracies.

    MLflow 3.17's Models tab sorts by creation time only (sorting and search by metric sit behind
    a feature flag that the open-source UI ships off), so the ranking is step 1b's; here a person
    hides the columns they do not need and reads each model's held-out accuracy."""
    names = {m.name for m in ranked}
    assert {"greedy-soup", "uniform-soup", "learned-soup"} <= names, (
        f"every soup should be a logged model named after its run; the experiment has {sorted(names)}")
    no_figure = [m.name for m in ranked if _latest(m, HELDOUT) is None]
    assert not no_figure, f"logged models without a {HELDOUT} metric: {no_figure}"
    browser.get(f"{server}/#/experiments/{experiment_id}/models")
    _wait_for(browser, [f">{n}<" for n in names])
    _click_first(browser, "[data-component-id='mlflow.logged_model.list.columns']")
    tree = ".du-bois-light-tree"
    _rendered(browser, f"{tree} span[title='Model attributes']")
    titles = browser.execute_script(f"return [...document.querySelectorAll(\"{tree} span[title]\")].map(e => e.title)")
    for title in ("Model attributes", "Parameters"):
        if title in titles:
            _set_tree_check(browser, tree, title, False)
    # a person keeps the held-out and test columns; the five shift sets' own columns go
    keep = {x.dataset_name for m in ranked for x in m.metrics or [] if x.key in (HELDOUT, "test_acc")}
    for title in titles:
        if title.startswith("Dataset: ") and not any(f"Dataset: {name} (" in title for name in keep):
            _set_tree_check(browser, tree, title, False)
    _close_menus(browser)

    def figures():
        rows = {r["id"]: r["cells"] for r in _grid_rows(browser)}
        shown = {mid: next((v for k, v in cells.items() if f'"metricKey":"{HELDOUT}"' in k), None)
                 for mid, cells in rows.items()}
        return shown if all(shown.get(m.model_id) for m in ranked) else None

    shown = _until(browser, f"a {HELDOUT} figure beside every logged model", figures)
    for m in ranked:
        assert math.isclose(float(shown[m.model_id]), _latest(m, HELDOUT), abs_tol=1e-6), (m.name, shown[m.model_id])
    browser.save_screenshot(str(shots / "models.png"))


def _runs_sorted_by_heldout_rank_the_models(browser, server, experiment_id, ranked, shots):
    """Step 1b: the Runs tab sorted by held-out accuracy, best first (the UI keeps the sort in the
    URL), with each run's logged model beside it: the page's order of models is MLflow's
    `search_logged_models(order_by=heldout_acc desc)` order."""
    browser.get(f"{server}/#/experiments/{experiment_id}/runs"
                f"?orderByKey=metrics.%60{HELDOUT}%60&orderByAsc=false")
    _rendered(browser, f"button[data-testid='sort-select-dropdown'][aria-label='Sort: {HELDOUT}']")
    _wait_for(browser, ["matching runs", "greedy-soup"])
    _click_first(browser, "button[data-testid='column-selection-dropdown']")
    tree = "[data-testid='column-selector-tree']"
    _rendered(browser, f"{tree} span[title='{HELDOUT}']")
    for title, checked in (("Dataset", False), ("Source", False), (HELDOUT, True), ("test_acc", True),
                           ("shift_mean_acc", True)):
        _set_tree_check(browser, tree, title, checked)
    _close_menus(browser)
    by_run = {}
    for m in ranked:
        by_run.setdefault(m.source_run_id, []).append(m)

    def page_order():
        rows = _grid_rows(browser)
        runs = [r["id"] for r in rows]
        if not set(by_run) <= set(runs) or not all(f"metrics.`{HELDOUT}`" in r["cells"]
                                                     for r in rows if r["id"] in by_run):
            return None
        return [m for run in runs for m in sorted(by_run.get(run, []), key=lambda m: -_latest(m, HELDOUT))]

    _same_ranking(_until(browser, "every model's run, sorted by held-out accuracy", page_order), ranked)
    browser.save_screenshot(str(shots / "ranking.png"))


def _registered_model_page_shows_each_version(browser, server, client, shots):
    """Step 2: the registered model lists each soup version with its recipe and accuracies (tags
    and description); returns the version a person following the promotion gate picks."""
    from orchestrator.record.promotion import list_versions
    from orchestrator.record.tracking import Tracker

    rows = list_versions(Tracker(server), MODEL)  # the CLI's `soup models`: figures, aliases
    assert len(rows) >= 3
    browser.get(f"{server}/#/models/{MODEL}")
    _wait_for(browser, [f"Version {r['version']}<" for r in rows] + [MODEL])
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    # each tag is drawn as `key: value`, the value's text also its title
    _wait_for(browser, [f'title="{r["recipe"]}"' for r in rows]
              + [f'title="{versions[str(r["version"])].tags[HELDOUT]}"' for r in rows])
    browser.save_screenshot(str(shots / "registered-model.png"))
    # The gate (orchestrator/promotion.py): held-out accuracy a number, and at least that of the
    # version holding the alias now, if any. A person picks the best held-out figure; among ties,
    # the first registered.
    holder = next((r for r in rows if ALIAS in r["aliases"].split(",")), None)
    best = max(rows, key=lambda r: (r["held-out"] if isinstance(r["held-out"], float) else -1, -int(r["version"])))
    assert isinstance(best["held-out"], float), f"no version has a numeric {HELDOUT} tag: {rows}"
    assert holder is None or best["held-out"] >= holder["held-out"], (best, holder)
    return str(best["version"])


def _set_alias_in_the_ui(browser, server, version, shots):
    """Step 3: on the version's page, Aliases "Add" opens a modal; type the alias, Enter, save."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{server}/#/models/{MODEL}/versions/{version}")
    _wait_for(browser, [f"Version {version}<", HELDOUT, "recipe", "Lineage"])  # tags, description
    browser.save_screenshot(str(shots / "model-version.png"))
    _click_first(browser, "button[title='Add aliases'], button[title='Edit aliases']")
    field = "[role=dialog] input[role=combobox]"

    def typed():  # the alias becomes a chip in the field on Enter; retype if the field re-rendered
        chips = browser.find_elements(By.CSS_SELECTOR, f"[role=dialog] [title='{ALIAS}']")
        if chips:
            return True
        inp = browser.find_elements(By.CSS_SELECTOR, field)
        if inp:
            inp[0].send_keys(Keys.CONTROL, "a")
            inp[0].send_keys(ALIAS, Keys.ENTER)
        return False

    _rendered(browser, field)
    _until(browser, f"the alias {ALIAS!r} entered in the modal", typed)
    save = "[data-component-id='mlflow.edit-aliases-modal.save-button']"
    _until(browser, "the modal's save button enabled",
           lambda: any(b.is_enabled() for b in browser.find_elements(By.CSS_SELECTOR, save)))
    browser.save_screenshot(str(shots / "champion-alias.png"))
    _click_first(browser, save)
    _until(browser, "the modal closed", lambda: not browser.find_elements(By.CSS_SELECTOR, "[role=dialog]"))
    _rendered(browser, f"[data-component-type='tag'][title='{ALIAS}']")  # the alias beside "Aliases:"
    browser.save_screenshot(str(shots / "champion.png"))


def _alias_resolves_and_loads(client, server, store, version):
    """Step 4: `models:/<name>@champion` is the version picked in the UI; the gate now guards it;
    a fresh process loads it by alias from the server and classifies an image."""
    import base64

    from orchestrator import data
    from orchestrator.config import DataConfig
    from orchestrator.record.promotion import PromotionError, promote
    from orchestrator.record.tracking import Tracker
    from orchestrator.data.images import encode_image

    mv = client.get_model_version_by_alias(MODEL, ALIAS)  # the page showed it once the server had it
    assert str(mv.version) == version
    worse = [v for v in client.search_model_versions(f"name = '{MODEL}'")
             if float(v.tags[HELDOUT]) < float(mv.tags[HELDOUT])]
    if worse:  # the alias set in the UI is what the CLI's gate compares with
        with pytest.raises(PromotionError, match="refused"):
            promote(Tracker(server), MODEL, worse[0].version, ALIAS)
        assert str(client.get_model_version_by_alias(MODEL, ALIAS).version) == version
    test = data.load_task(DataConfig()).test
    code = (
        "import sys, json, base64, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{MODEL}@{ALIAS}')\n"
        "out = m.predict(pd.DataFrame({'image': [base64.b64decode(sys.stdin.read())]}))\n"
        "print(json.dumps({'label': str(out['label'][0]), 'index': int(out['label_index'][0]),\n"
        "  'probs': [float(p) for p in out['probabilities'][0]], 'run_id': m.metadata.run_id}))\n")
    res = subprocess.run([sys.executable, "-c", code], input=base64.b64encode(encode_image(test.images[0])).decode(),
                         env={**store["env"], "MLFLOW_TRACKING_URI": server}, text=True,
                         capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{MODEL}@{ALIAS} (version {version}) says {out['label']} for a test digit {int(test.labels[0])}")
    assert out["run_id"] == mv.run_id, "the alias loaded another soup than the version picked"
    assert len(out["probs"]) == 10 and abs(sum(out["probs"]) - 1) < 1e-4
    assert out["index"] == max(range(10), key=out["probs"].__getitem__) and out["label"] == str(out["index"])
