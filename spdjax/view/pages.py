"""The viewer's page: ``static/index.html`` with the scripts it loads filled in, for the live
server or a static export. The graph explorer's code (``static/graph_draw.js``, its drawing;
``static/graph_panel.js``, its form and intervention panel; the drawing library under
``static/vendor/``) is loaded when it is there."""

from __future__ import annotations

import html
import pathlib

STATIC = pathlib.Path(__file__).resolve().parent / "static"
VENDOR = "vendor"
GRAPH_JS = ("graph_draw.js", "graph_panel.js")  # in this order: the panel uses the drawing


def scripts() -> list[str]:
    """The page's extra scripts, relative to ``static/``: the vendored libraries (sorted), then
    the graph explorer."""
    vendor = sorted(f"{VENDOR}/{p.name}" for p in (STATIC / VENDOR).glob("*.js"))
    return vendor + (list(GRAPH_JS) if all((STATIC / f).is_file() for f in GRAPH_JS) else [])


def index_html(*, static: bool, title: str) -> str:
    """``index.html`` for the live server (``static=False``: data from ``api/``) or an export
    (data from ``data/*.js`` scripts, which a browser also reads from ``file://``)."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    tags = "\n".join(f'<script src="static/{s}"></script>' for s in scripts())
    mode = f"<script>window.SPDJAX_STATIC = {'true' if static else 'false'};</script>"
    return (page.replace("{{TITLE}}", html.escape(title))
            .replace("<!--SCRIPTS-->", mode + "\n" + tags))
