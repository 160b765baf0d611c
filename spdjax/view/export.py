"""A static copy of the viewer for a run: the same page and the same data, as files that open
from ``file://`` or any static host, without the live attribution-graph API (the page says so).

Layout of the export directory::

    index.html            the page (static mode)
    static/               app.js, app.css, the graph explorer's scripts and their licenses
    data/run.js           the run view
    data/sites/<i>.js     each site's view
    figures/*.png         the run's figures
    .spdjax-view-export   the marker (below)

Each ``data/*.js`` is one call ``spdjaxData("<name>", {...})``: a browser loads a script from
``file://`` where it refuses ``fetch``.

The export writes a marker file, ``.spdjax-view-export``, into the directory. A later export
replaces ``static/``, ``data/`` and ``figures/`` only where that marker is; any other non-empty
directory is refused, as is one that holds the run itself (``--export=.`` inside a project must
not delete the project's ``data/``).
"""

from __future__ import annotations

import json
import pathlib
import shutil

from spdjax.view import data, pages

MARKER = ".spdjax-view-export"  # written by export(); names a directory it may overwrite


def _script(name: str, obj) -> str:
    body = json.dumps(data.jsonable(obj), allow_nan=False, separators=(",", ":"))
    # "</" inside a string would end an inline script: escaped, the JSON means the same.
    body = body.replace("</", "<\\/")
    return f"spdjaxData({json.dumps(name)}, {body});\n"


def _check_out(workdir: pathlib.Path, out_dir, out: pathlib.Path) -> None:
    """Raises ``ValueError`` unless ``out`` may receive the export of ``workdir``."""
    run, dest = workdir.resolve(), out.resolve()
    if dest == run or run in dest.parents:
        raise ValueError(f"--export={out_dir} is inside the run's workdir {workdir}: export "
                         "elsewhere (the run's directory is the source).")
    if dest in run.parents:
        raise ValueError(f"--export={out_dir} contains the run's workdir {workdir}: export "
                         "into a new directory outside it.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--export={out_dir} is a file; expected a directory.")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise ValueError(f"--export={out_dir} is a non-empty directory that holds no earlier "
                         f"export (no {MARKER} file): export into a new or empty directory.")


def export(workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes the static viewer of ``workdir`` into ``out_dir`` (created, or empty, or an
    earlier export's directory, whose files are replaced); returns ``out_dir/index.html``.

    ``ValueError`` when ``out_dir`` is a file, is or contains the run's directory, or is a
    non-empty directory without an earlier export's marker."""
    workdir = data.check_workdir(workdir)
    out = pathlib.Path(out_dir).expanduser()
    _check_out(workdir, out_dir, out)
    run = data.run_view(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("A static copy of the spdjax viewer (python -m spdjax.view "
                              "--export); a later export replaces static/, data/ and figures/ "
                              "here.\n", encoding="utf-8")
    for sub in ("static", "data", "figures"):
        if (out / sub).is_symlink() or (out / sub).is_file():
            (out / sub).unlink()
        elif (out / sub).exists():
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
