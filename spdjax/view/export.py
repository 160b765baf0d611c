"""A static copy of the viewer for a run: the same page and the same data, as files that open
from ``file://`` or any static host, without the live attribution-graph API (the page says so).

Layout of the export directory::

    index.html            the page (static mode)
    static/               app.js, app.css, the graph explorer's scripts and their licenses
    data/run.js           the run view
    data/sites/<i>.js     each site's view
    figures/*.png         the run's figures

Each ``data/*.js`` is one call ``spdjaxData("<name>", {...})``: a browser loads a script from
``file://`` where it refuses ``fetch``.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from spdjax.view import data, pages


def _script(name: str, obj) -> str:
    body = json.dumps(data.jsonable(obj), allow_nan=False, separators=(",", ":"))
    # "</" inside a string would end an inline script: escaped, the JSON means the same.
    body = body.replace("</", "<\\/")
    return f"spdjaxData({json.dumps(name)}, {body});\n"


def export(workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes the static viewer of ``workdir`` into ``out_dir`` (created; files of an earlier
    export there are replaced); returns ``out_dir/index.html``."""
    workdir = data.check_workdir(workdir)
    out = pathlib.Path(out_dir).expanduser()
    if out.resolve() == workdir.resolve() or workdir.resolve() in out.resolve().parents:
        raise ValueError(f"--export={out_dir} is inside the run's workdir {workdir}: export "
                         "elsewhere (the run's directory is the source).")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--export={out_dir} is a file; expected a directory.")
    run = data.run_view(workdir)
    for sub in ("static", "data", "figures"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    shutil.copytree(pages.STATIC, out / "static",
                    ignore=shutil.ignore_patterns("index.html", "__pycache__"))
    (out / "data" / "sites").mkdir(parents=True)
    (out / "data" / "run.js").write_text(_script("run", run), encoding="utf-8")
    for i, site in enumerate(run["sites"]):
        view = data.site_view(workdir, site["name"])
        (out / "data" / "sites" / f"{i}.js").write_text(_script(f"sites/{i}", view),
                                                        encoding="utf-8")
    (out / "figures").mkdir()
    for fig in run["figures"]:
        shutil.copy2(workdir / data.FIGURES_DIR / fig["file"], out / "figures" / fig["file"])
    index = out / "index.html"
    index.write_text(pages.index_html(static=True, title=workdir.name), encoding="utf-8")
    return index
