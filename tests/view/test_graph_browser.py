"""The graph explorer in a real browser (the session's headless Debian chromium, conftest;
the page helpers: tests/view/browser.py) against the viewer's server on the tiny induction-toy
run: a bad prompt's error is shown on the page, a graph renders, and clicking a subcomponent
keeps or ablates it (visibly) and changes the predictions shown. Its screenshots are taken by
tests/view/screenshots.py."""

import pytest

from view.browser import INSTANCE, build, click_node, intervene_by_click, open_explorer, \
    predictions, wait

PROMPT = "BOS 1 2 3 S 1 2 3 S"


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
                 "ablate 0')", f"{top} back to neither kept nor ablated", 60, top)

    ig = build(driver, PROMPT, prune=False, attribution="integrated")  # settings: edges
    assert "error" not in ig, ig
    assert ig["settings"]["attribution"] == "integrated"
    assert graph["settings"]["attribution"] == "gradient"
    assert {n["id"] for n in ig["nodes"]} == {n["id"] for n in graph["nodes"]}
    assert ig["edges"] != graph["edges"]
