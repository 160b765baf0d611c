"""The viewer's screenshots in the docs (docs/images/viewer_<view>.png), one per view, from
live servers in headless chromium::

    python tests/view/screenshots.py --toy=workdir/resid_mlp_1_3k --lm=RUN --out=docs/images

``--toy``: a finished toy run with figures (the run and figures views); ``--lm``: a harvested
language-model run (the site view and the graph explorer, on ``--prompt``)."""

import argparse
import pathlib
import sys
import time

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from spdjax.view import server  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--toy", required=True)
    p.add_argument("--lm", required=True)
    p.add_argument("--prompt", default="BOS 5 9 2 S 5 9 2 S")
    p.add_argument("--out", default="docs/images")
    p.add_argument("--views", default="run,site,figures,graph")
    args = p.parse_args()
    from view import conftest

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = conftest.browser.__wrapped__()
    driver = next(gen)
    driver.set_window_size(1400, 900)
    urls = {}
    for key in ("toy", "lm"):
        s = server.make_server(getattr(args, key))
        server.start_in_thread(s)
        urls[key] = server.url(s)

    def shot(url, name, ready_css, action=None, height=900):
        if name not in args.views.split(","):
            return
        driver.set_window_size(1400, height)
        driver.get("about:blank")
        driver.get(url)
        WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready_css))
        if action:
            action()
        time.sleep(1.0)
        driver.save_screenshot(str(out / f"viewer_{name}.png"))
        print(out / f"viewer_{name}.png")

    shot(urls["toy"] + "#run", "run", "#curves svg path")
    shot(urls["lm"] + "#sites/0", "site", "#examples .tok", height=1250)
    shot(urls["toy"] + "#figures", "figures", ".figs img")

    def build_graph():
        box = driver.find_element(By.CSS_SELECTOR, ".sg-prompt")
        box.clear()
        box.send_keys(args.prompt)
        driver.find_element(By.CSS_SELECTOR, ".sg-build").click()
        WebDriverWait(driver, 300).until(lambda d: d.execute_script(
            "const g = window.spdjaxGraph.instances[0]; return g.cy && g.cy.nodes().length > 0"))

    shot(urls["lm"] + "#graph", "graph", ".sg-prompt", build_graph)
    next(gen, None)


if __name__ == "__main__":
    main()
