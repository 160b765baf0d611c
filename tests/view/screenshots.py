"""The viewer's screenshots in the docs (docs/images/viewer_<view>.png), one per view, from
live servers in headless chromium (tests/view/browser.py)::

    python tests/view/screenshots.py --toy=workdir/resid_mlp_1_3k --lm=RUN \\
        --prompt="BOS 5 17 S 42 9 3 S" --out=docs/images

``--toy``: a finished toy run with figures (``viewer_run.png``, ``viewer_figures.png``);
``--lm``: a harvested language-model run (``viewer_site.png``; the graph explorer on
``--prompt``: ``viewer_graph.png``, then ``viewer_graph_ablate.png`` with its ``--clicks`` most
influential subcomponents ablated, whose predictions are printed). ``--views`` picks some.
The servers are shut down and the browser closed on the way out, an error included."""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from spdjax.view import server  # noqa: E402
from view import browser  # noqa: E402

VIEWS = ("run", "site", "figures", "graph", "graph_ablate")


def take(driver, urls: dict, args, out: pathlib.Path) -> list[pathlib.Path]:
    """The screenshots of ``args.views``; their paths."""
    views = args.views.split(",")
    bad = sorted(set(views) - set(VIEWS))
    if bad:
        raise SystemExit(f"error: --views {bad} unknown; the views are {list(VIEWS)}.")
    paths = []

    def save(name):
        time.sleep(1.0)  # the last layout and fade-ins
        paths.append(out / f"viewer_{name}.png")
        driver.save_screenshot(str(paths[-1]))

    def page(url, name, ready, what, height=900):
        if name in views:
            driver.set_window_size(1400, height)
            driver.get("about:blank")
            driver.get(url)
            browser.wait(driver, f"return document.querySelector({ready!r})", what)
            save(name)

    page(urls["toy"] + "#run", "run", "#curves svg path", "the run page's curves")
    page(urls["lm"] + "#sites/0", "site", "#examples .tok", "the site's examples", 1250)
    page(urls["toy"] + "#figures", "figures", ".figs img", "the figures")
    if "graph" in views or "graph_ablate" in views:
        driver.set_window_size(1500, 950)
        browser.open_explorer(driver, urls["lm"])
        graph = browser.build(driver, args.prompt)
        if "error" in graph:
            raise SystemExit(f"error: the graph of {args.prompt!r}: {graph['error']}")
        if "graph" in views:
            save("graph")
        if "graph_ablate" in views:
            comps = sorted((n for n in graph["nodes"] if n["kind"] == "component"),
                           key=lambda n: -n["influence"])
            for n in comps[:args.clicks]:  # none -> keep -> ablate
                browser.intervene_by_click(driver, n["id"], "keep")
                browser.click_node(driver, n["id"])
                browser.wait(driver, f"return {browser.INSTANCE}.ids('ablate').includes("
                                     f"arguments[0]) && !{browser.INSTANCE}.interveneButton"
                                     ".disabled && document.querySelector('#graph-view "
                                     ".sg-kl').textContent.includes('keep 0')",
                             f"{n['id']} ablated", browser.WAIT_S, n["id"])
            save("graph_ablate")
            print(browser.predictions(driver)[1])
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", required=True)
    p.add_argument("--lm", required=True)
    p.add_argument("--prompt", default="BOS 5 17 S 42 9 3 S")
    p.add_argument("--clicks", type=int, default=2)
    p.add_argument("--out", default="docs/images")
    p.add_argument("--views", default=",".join(VIEWS))
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        driver = browser.chrome()
    except browser.BrowserMissing as e:
        raise SystemExit(f"error: {e}") from None
    try:
        urls = {}
        for key in ("toy", "lm"):
            servers.append(server.make_server(getattr(args, key)))
            server.start_in_thread(servers[-1])
            urls[key] = server.url(servers[-1])
        for path in take(driver, urls, args, out):
            print(path)
    finally:
        driver.quit()
        for s in servers:
            s.shutdown()
            s.server_close()


if __name__ == "__main__":
    main()
