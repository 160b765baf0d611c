"""The viewer in a real browser (headless chromium, one per worker: conftest): the run page
loads with its summary and curves, the site lists fill, an LM site shows harvest examples with
every token shaded by its CI, a toy's family figures appear, the graph tab says why a toy has
none, and a static export works from file://."""

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from spdjax.view import export

from view.browser import WAIT_S as WAIT  # a site's first view reads the harvest on a shared CPU


def wait_for(driver, css, n=1):
    """The elements matching ``css`` once there are at least ``n`` (else the page's error)."""
    def found(d):
        if d.find_element(By.ID, "error").is_displayed():
            raise AssertionError("the page shows an error: "
                                 + d.find_element(By.ID, "error").text)
        els = d.find_elements(By.CSS_SELECTOR, css)
        return els if len(els) >= n else False
    return WebDriverWait(driver, WAIT).until(
        found, message=f"{n} of {css!r} did not appear within {WAIT} s")


def open_page(driver, url):
    driver.get("about:blank")  # a new document: no state from the last test
    driver.get(url)


def test_toy_run_page_figures_and_graph_tab(browser, served):
    """The TMS run: its summary, curves and sites; its family's figures; the graph tab says why
    a toy has no graph explorer."""
    open_page(browser, served["tms"] + "#run")
    rows = wait_for(browser, "#eval-table tr", 5)
    assert "mmcs" in [r.text.split(" ")[0] for r in rows]
    assert wait_for(browser, "#curves svg path")
    titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#curves .title")]
    assert "loss/total" in titles
    sites = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#run-sites a")]
    assert sites == ["linear1 (C=6)", "linear2 (C=6)"]
    assert browser.find_element(By.ID, "run-title").text.endswith("· TMS · SPD")

    browser.find_element(By.CSS_SELECTOR, "#tabs a[data-view=figures]").click()
    imgs = wait_for(browser, ".figs img", 2)
    WebDriverWait(browser, WAIT).until(lambda d: all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
        for i in imgs))
    heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#view-figures h2")]
    assert heads[0] == "The TMS family's figures"
    browser.find_element(By.CSS_SELECTOR, "#tabs a[data-view=graph]").click()
    note = wait_for(browser, "#graph-note")[0]
    WebDriverWait(browser, WAIT).until(lambda d: note.is_displayed())
    assert "for language-model runs; this run is a TMS" in note.text


def test_lm_site_lists_fill_and_examples_are_shaded_by_ci(browser, served):
    open_page(browser, served["lm"] + "#sites/0")
    rows = wait_for(browser, "#sub-list tr[data-c]", 4)
    assert len(rows) == 4  # C = 4, every subcomponent listed
    toks = wait_for(browser, "#examples .tok")
    shades = [t.get_attribute("style") for t in toks]
    assert all("background: rgba(255, 160, 0" in s for s in shades), shades[:3]
    assert len(set(shades)) > 1  # shaded by the CI at each token, not one colour
    assert browser.find_elements(By.CSS_SELECTOR, "#examples .tok.center")
    assert len(wait_for(browser, "#site-hists svg rect", 3)) >= 3
    # another subcomponent: the URL and the detail follow the click
    c = rows[1].get_attribute("data-c")
    rows[1].click()
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url.endswith(f"#sites/0/{c}"))
    wait_for(browser, f"#sub-list tr.selected[data-c='{c}']")
    detail = wait_for(browser, "#sub-detail h3")[0].text
    assert detail == wait_for(browser, "#sub-list tr.selected td")[1].text


def test_a_static_export_opens_from_file(browser, view_runs, tmp_path):
    index = export.export(view_runs["lm"], tmp_path / "lm_view")
    open_page(browser, index.as_uri() + "#sites/1")
    assert wait_for(browser, "#examples .tok")
    browser.find_element(By.CSS_SELECTOR, "#tabs a[data-view=graph]").click()
    note = wait_for(browser, "#graph-note")[0]
    WebDriverWait(browser, WAIT).until(lambda d: note.is_displayed())
    assert "static copy" in note.text and "python -m spdjax.view --workdir=" in note.text
