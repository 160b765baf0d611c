"""The graph explorer in a real browser (the session's headless Debian chromium, conftest)
against the viewer's server on the tiny induction-toy run: a bad prompt's error is shown on the
page, a graph renders, and clicking a subcomponent keeps or ablates it (visibly) and changes the
predictions shown.

Also the screenshots' script (docs/images/viewer_graph*.png, docs/guides/viewer.md)::

    python tests/view/test_graph_browser.py --workdir=RUN --prompt="..." --out=docs/images
"""

import argparse
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "BOS 1 2 3 S 1 2 3 S"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTANCE = "window.spdjaxGraph.instances[0]"


def chrome(width: int = 1500, height: int = 950):
    """A headless chromium driven by chromedriver (a clear failure when they are missing)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not pathlib.Path(p).exists()]
    if missing:
        pytest.fail(f"{missing} missing: the browser tests need Debian's chromium and its driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them).")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait(driver, script: str, timeout: float = 120.0, *args):
    """Polls ``script`` (JavaScript returning a value) until it is truthy; its value. A timeout
    fails with the page's error box, so a broken API shows its message."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = driver.execute_script(script, *args)
        if v:
            return v
        time.sleep(0.1)
    err = driver.execute_script("const e = document.querySelector('.sg-error, #error');"
                                "return e ? e.textContent : ''")
    raise AssertionError(f"Timed out after {timeout} s waiting for: {script} (page error: "
                         f"{err!r})")


def open_explorer(driver, url: str) -> None:
    """A fresh page (a changed hash alone would not reload it) on the Graph tab."""
    driver.get(url + "#graph")
    driver.refresh()
    wait(driver, "return window.spdjaxGraph && window.spdjaxGraph.instances.length", 60)


def build(driver, prompt: str, *, prune: bool = True) -> dict:
    """Types ``prompt``, builds its graph and waits for it; the graph's JSON as the page holds
    it (an error shown instead is returned as ``{"error": text}``)."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, "#graph-view input.sg-prompt")
    box.clear()
    box.send_keys(prompt)
    prune_box = driver.find_element(By.CSS_SELECTOR, "#graph-view input.sg-prune")
    if prune_box.is_selected() != prune:
        if not driver.execute_script("return document.querySelector('#graph-view details')"
                                     ".open"):
            driver.find_element(By.CSS_SELECTOR, "#graph-view details summary").click()
        prune_box.click()
    driver.execute_script(f"{INSTANCE}.graph = null; {INSTANCE}.error.hidden = true;")
    driver.find_element(By.CSS_SELECTOR, "#graph-view button.sg-build").click()
    wait(driver, f"const e = {INSTANCE}; return !!(e.graph && e.cy) || !e.error.hidden", 300)
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


def cells(driver) -> list[list[str]]:
    """The predictions table's rows as shown: ``[rank, target, p, right-hand token, p]``."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#graph-view .sg-table tr')].slice(1).map("
        "tr => [...tr.children].map(td => td.textContent))")


def shown_as_answered(driver, rows) -> None:
    """The table shows the last intervention's answer: tokens, and probabilities to their four
    digits."""
    last = driver.execute_script(f"return {INSTANCE}.last")
    assert [r[3] for r in rows] == [t["text"] for t in last["intervened"][0]]
    assert [r[1] for r in rows] == [t["text"] for t in last["target"][0]]
    for r, t in zip(rows, last["intervened"][0]):
        assert float(r[4]) == pytest.approx(t["prob"], rel=1e-3)
    kl = driver.execute_script("return document.querySelector('#graph-view .sg-kl')"
                               ".textContent").split("intervened) ")[1].split(" ")[0]
    assert float(kl) == pytest.approx(last["kl"], rel=1e-3)


def intervene_by_click(driver, node_id: str, state: str) -> str:
    """Clicks ``node_id`` (cycling none -> keep -> ablate) and waits for the intervention's
    table with ``state`` on that node; the table's text."""
    click_node(driver, node_id)
    wait(driver, f"const e = {INSTANCE}; return e.cy.getElementById(arguments[0])"
                 ".hasClass(arguments[1]) && document.querySelector('#graph-view .sg-preds')"
                 f".dataset.kind === 'intervened' && e.ids(arguments[1]).includes(arguments[0])"
                 " && e.interveneButton.disabled === false && document.querySelector("
                 "'#graph-view .sg-kl').textContent.includes(arguments[1] + ' 1')", 120,
         node_id, state)
    return predictions(driver)[1]


def test_graph_errors_then_renders_and_clicks_change_the_predictions(browser, served):
    driver = browser
    open_explorer(driver, served["lm"])
    res = build(driver, "BOS x S")  # a bad prompt: its error is shown on the page
    assert "token 'x' is not an id" in res["error"]
    assert driver.execute_script(f"return {INSTANCE}.error.hidden") is False

    graph = build(driver, PROMPT, prune=False)  # the barely trained fixture prunes to no node
    assert "error" not in graph, graph
    assert driver.execute_script(f"return {INSTANCE}.error.hidden") is True
    comps = [n for n in graph["nodes"] if n["kind"] == "component"]
    assert len(comps) == graph["unpruned"]["n_nodes"] > 10
    drawn = driver.execute_script(f"return {INSTANCE}.cy.nodes('.component, .input, .output')"
                                  ".length")
    assert drawn == len(graph["nodes"]) == int(driver.execute_script(
        "return document.querySelector('#graph-view').dataset.nodes"))
    assert driver.execute_script(f"return {INSTANCE}.cy.edges().length") == len(graph["edges"])
    assert driver.execute_script("return document.querySelectorAll('#graph-view .sg-canvas "
                                 "canvas').length") > 0
    assert "subcomponent nodes" in driver.execute_script(
        f"return {INSTANCE}.status.textContent")
    kind, text = predictions(driver)
    assert kind == "graph" and "all components" in text
    before = cells(driver)
    assert len(before) == 3 and all(len(r) == 5 for r in before)

    top = max(comps, key=lambda n: n["influence"])["id"]
    text = intervene_by_click(driver, top, "keep")  # the others at 0: only this node
    assert "KL(target ‖ intervened)" in text and "others at zeros" in text
    kept = cells(driver)
    assert [r[1:3] for r in kept[:3]] == [r[1:3] for r in before]  # the target's column
    assert [r[3:] for r in kept[:3]] != [r[3:] for r in before]  # the intervened column
    shown_as_answered(driver, kept)
    assert driver.execute_script(f"return {INSTANCE}.selection.textContent").count(top) == 1
    text = intervene_by_click(driver, top, "ablate")  # the others at 1: all but this node
    assert "others at ones" in text
    assert [r[3:] for r in cells(driver)] != [r[3:] for r in kept]
    shown_as_answered(driver, cells(driver))
    click_node(driver, top)  # back to none
    wait(driver, f"return !{INSTANCE}.cy.getElementById(arguments[0]).hasClass('keep') && "
                 f"!{INSTANCE}.cy.getElementById(arguments[0]).hasClass('ablate') && "
                 "document.querySelector('#graph-view .sg-kl').textContent.includes('keep 0, "
                 "ablate 0')", 60, top)


# -- the screenshots ----------------------------------------------------------------------


def screenshots(workdir: str, prompt: str, out: pathlib.Path, clicks: int = 2) -> list:
    """The explorer on ``workdir`` with ``prompt``: ``viewer_graph.png`` (the graph), then
    ``viewer_graph_ablate.png`` with the ``clicks`` most influential subcomponents ablated."""
    from spdjax.view import server as view_server

    srv = view_server.make_server(workdir)
    view_server.start_in_thread(srv)
    driver = chrome()
    paths = [out / "viewer_graph.png", out / "viewer_graph_ablate.png"]
    try:
        open_explorer(driver, view_server.url(srv))
        graph = build(driver, prompt)
        if "error" in graph:
            raise SystemExit(f"error: {graph['error']}")
        time.sleep(0.5)
        driver.save_screenshot(str(paths[0]))
        comps = sorted((n for n in graph["nodes"] if n["kind"] == "component"),
                       key=lambda n: -n["influence"])
        for n in comps[:clicks]:
            intervene_by_click(driver, n["id"], "keep")
            click_node(driver, n["id"])
            wait(driver, f"return {INSTANCE}.ids('ablate').includes(arguments[0]) && "
                         f"!{INSTANCE}.interveneButton.disabled && document.querySelector("
                         "'#graph-view .sg-kl').textContent.includes('keep 0')", 120, n["id"])
        time.sleep(0.5)
        driver.save_screenshot(str(paths[1]))
        print(predictions(driver)[1])
    finally:
        driver.quit()
        srv.shutdown()
    return paths


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--clicks", type=int, default=2)
    a = ap.parse_args()
    for p in screenshots(a.workdir, a.prompt, pathlib.Path(a.out), a.clicks):
        print(p)
