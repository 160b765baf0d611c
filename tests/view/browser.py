"""The one headless browser the viewer's tests and screenshots drive (Debian's chromium through
its chromedriver; .ci/run installs both), with bounded waits, and the graph explorer's page
helpers the browser test and tests/view/screenshots.py share.

Every wait is bounded: a page load by :data:`PAGE_LOAD_S`, a script by :data:`SCRIPT_S`, a
polled condition by its ``timeout`` (:data:`WAIT_S` unless a call says otherwise), and a timeout
says what did not appear (with the page's error box, so a broken API shows its message)."""

import os
import time

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAGE_LOAD_S = 60  # a page and its scripts (the graph explorer's vendored Cytoscape.js)
SCRIPT_S = 30  # one execute_script
WAIT_S = 60  # a polled condition (a graph's first build compiles on a shared CPU)
INSTANCE = "window.spdjaxGraph.instances[0]"


class BrowserMissing(RuntimeError):
    """chromium or chromedriver is not installed."""


def chrome(width: int = 1500, height: int = 1000):
    """A headless chromium with the page-load and script timeouts set; :class:`BrowserMissing`
    (one line naming the path and the apt command) at once when chromium or its driver is
    not there."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            raise BrowserMissing(f"{path} is missing: apt-get install -y chromium "
                                 "chromium-driver (.ci/run does).")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    driver.set_page_load_timeout(PAGE_LOAD_S)
    driver.set_script_timeout(SCRIPT_S)
    return driver


def page_error(driver) -> str:
    """The text of the page's error box (the viewer's or the graph explorer's), or ``''``."""
    return driver.execute_script(
        "const e = [...document.querySelectorAll('.sg-error, #error')].find(x => !x.hidden "
        "&& x.textContent); return e ? e.textContent : ''")


def wait(driver, script: str, what: str, timeout: float = WAIT_S, *args):
    """Polls ``script`` (JavaScript returning a value, given ``args``) until it is truthy; its
    value. After ``timeout`` seconds an ``AssertionError`` saying ``what`` did not appear."""
    t0 = time.monotonic()
    while True:
        v = driver.execute_script(script, *args)
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} did not appear within {timeout:g} s (page error: "
                                 f"{page_error(driver)!r}; waited on: {script})")
        time.sleep(0.1)


# -- the graph explorer -------------------------------------------------------------------


def open_explorer(driver, url: str) -> None:
    """A fresh page (a changed hash alone would not reload it) on the Graph tab."""
    driver.get("about:blank")
    driver.get(url + "#graph")
    wait(driver, "return window.spdjaxGraph && window.spdjaxGraph.instances.length",
         "the graph explorer")


def build(driver, prompt: str, *, prune: bool = True, attribution: str = "gradient") -> dict:
    """Types ``prompt``, sets *prune* and the edge weights in *settings*, builds its graph and
    waits for it; the graph's JSON as the page holds it (an error shown instead is returned as
    ``{"error": text}``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    box = driver.find_element(By.CSS_SELECTOR, "#graph-view input.sg-prompt")
    box.clear()
    box.send_keys(prompt)
    prune_box = driver.find_element(By.CSS_SELECTOR, "#graph-view input.sg-prune")
    edges = Select(driver.find_element(By.CSS_SELECTOR, "#graph-view select.sg-attribution"))
    if prune_box.is_selected() != prune or edges.first_selected_option.get_attribute(
            "value") != attribution:
        if not driver.execute_script("return document.querySelector('#graph-view details')"
                                     ".open"):
            driver.find_element(By.CSS_SELECTOR, "#graph-view details summary").click()
        if prune_box.is_selected() != prune:
            prune_box.click()
        edges.select_by_value(attribution)
    driver.execute_script(f"{INSTANCE}.graph = null; {INSTANCE}.error.hidden = true;")
    driver.find_element(By.CSS_SELECTOR, "#graph-view button.sg-build").click()
    wait(driver, f"const e = {INSTANCE}; return !!(e.graph && e.cy) || !e.error.hidden",
         f"the graph of {prompt!r} (or its error)")
    return driver.execute_script(
        f"const e = {INSTANCE}; return e.graph || {{error: e.error.textContent}}")


def click_node(driver, node_id: str) -> None:
    """A real mouse click on the node's place in the canvas (scrolled into view first; the
    pointer moves in viewport coordinates)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    where = (f"const e = {INSTANCE}; const p = e.cy.getElementById(arguments[0])"
             ".renderedPosition(); const r = e.canvas.getBoundingClientRect();")
    driver.execute_script(where + "window.scrollBy(0, r.top + p.y - window.innerHeight / 2);",
                          node_id)
    x, y = driver.execute_script(where + "return [r.left + p.x, r.top + p.y];", node_id)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(round(x), round(y))
    actions.pointer_action.click()
    actions.perform()


def predictions(driver) -> tuple[str, str]:
    """``(what the table shows: "graph" or "intervened", its text)``."""
    return tuple(driver.execute_script(
        "const p = document.querySelector('#graph-view .sg-preds');"
        "return [p.dataset.kind || '', p.innerText];"))


def intervene_by_click(driver, node_id: str, state: str) -> str:
    """Clicks ``node_id`` (cycling none -> keep -> ablate) and waits for the intervention's
    table with ``state`` on that node; the table's text."""
    click_node(driver, node_id)
    wait(driver, f"const e = {INSTANCE}; return e.cy.getElementById(arguments[0])"
                 ".hasClass(arguments[1]) && document.querySelector('#graph-view .sg-preds')"
                 f".dataset.kind === 'intervened' && e.ids(arguments[1]).includes(arguments[0])"
                 " && e.interveneButton.disabled === false && document.querySelector("
                 "'#graph-view .sg-kl').textContent.includes(arguments[1] + ' 1')",
         f"the intervention with {node_id} set to {state}", WAIT_S, node_id, state)
    return predictions(driver)[1]
