"""The viewer's local web server: the static page (``static/``), the run's JSON views
(:mod:`spdjax.view.data`), its figures, and the attribution-graph API.

Standard library only (:class:`http.server.ThreadingHTTPServer`): the viewer serves one user on
their own machine or into a notebook, which needs no framework. Every URL is relative to the
page, so the same page works behind Colab's port proxy.

Routes (``GET`` unless marked):

* ``/`` (``index.html``), ``/static/<file>``;
* ``/api/run.json``: :func:`~spdjax.view.data.run_view`;
* ``/api/sites/<i>.json``: :func:`~spdjax.view.data.site_view` of the run's ``i``-th site;
* ``/figures/<name>.png``: the run's figures;
* ``POST /api/graph`` and ``POST /api/intervene``: ``graph_api.graph_json`` /
  ``graph_api.intervene_json`` with the run loaded once (:func:`spdjax.load`, on first use) and
  the request's JSON body. A ``ValueError`` (bad input) is HTTP 400 with ``{"error": message}``.
"""

from __future__ import annotations

import errno
import functools
import http.server
import importlib
import json
import mimetypes
import pathlib
import threading
import traceback
import urllib.parse
from typing import Any, Callable

from spdjax.view import data, pages

MAX_BODY = 1 << 20  # bytes of a POST body (a prompt and node ids)


class PortInUseError(OSError):
    """The port asked for is taken."""


class RunState:
    """What the server holds for one workdir: the site views computed so far (recomputed when
    the harvest or clustering changes on disk) and the run for the graph API, loaded once."""

    def __init__(self, workdir: pathlib.Path, *, loader: Callable[[pathlib.Path], Any] | None
                 = None):
        self.workdir = data.check_workdir(workdir)
        self._loader = loader
        self._run = None
        self._lock = threading.Lock()
        self._sites: dict[tuple, dict] = {}

    def run_view(self) -> dict:
        return data.run_view(self.workdir)

    def site_view(self, i: int) -> dict:
        sites = self.run_view()["sites"]
        if not 0 <= i < len(sites):
            raise LookupError(f"No site {i}: the run has {len(sites)} sites.")
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (
            self.workdir / "analysis" / "harvest" / "harvest.npz",
            self.workdir / "analysis" / "clustering" / "clustering.json"))
        key = (sites[i]["name"], stamp)
        with self._lock:
            if key not in self._sites:
                self._sites[key] = data.site_view(self.workdir, sites[i]["name"])
            return self._sites[key]

    def loaded_run(self):
        """The run for the graph API (:func:`spdjax.load`, once)."""
        with self._lock:
            if self._run is None:
                if self._loader is None:
                    from spdjax.config import runs
                    self._run = runs.load(self.workdir)
                else:
                    self._run = self._loader(self.workdir)
            return self._run


def graph_module():
    """``spdjax.view.graph_api``, imported on first use (it brings in the model code)."""
    return importlib.import_module("spdjax.view.graph_api")


class Handler(http.server.BaseHTTPRequestHandler):
    """One request against ``self.server.state`` (a :class:`RunState`)."""

    server_version = "spdjax-view"
    quiet = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)

    # responses
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(data.jsonable(obj), allow_nan=False).encode()
        self._send(status, body, "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # routes
    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        state: RunState = self.server.state
        try:
            if path in ("/", "/index.html"):
                html = pages.index_html(static=False, title=state.workdir.name)
                return self._send(200, html.encode(), "text/html; charset=utf-8")
            if path.startswith("/static/"):
                return self._file(pages.STATIC, path[len("/static/"):])
            if path.startswith("/figures/"):
                return self._file(state.workdir / data.FIGURES_DIR, path[len("/figures/"):])
            if path == "/api/run.json":
                return self._json(200, state.run_view())
            if path.startswith("/api/sites/") and path.endswith(".json"):
                i = path[len("/api/sites/"):-len(".json")]
                if not i.isdigit():
                    return self._error(404, f"No site {i!r}: sites are numbered 0, 1, ...")
                return self._json(200, state.site_view(int(i)))
            return self._error(404, f"No page {path}.")
        except LookupError as e:
            return self._error(404, str(e.args[0]) if e.args else str(e))
        except Exception as e:  # noqa: BLE001 - shown on the page, not a dead socket
            traceback.print_exc()
            return self._error(500, f"{type(e).__name__}: {e}")

    def do_POST(self):  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        names = {"/api/graph": "graph_json", "/api/intervene": "intervene_json"}
        if path not in names:
            return self._error(404, f"No API {path}.")
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                return self._error(413, f"The request body is {n} bytes; at most {MAX_BODY}.")
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except json.JSONDecodeError as e:
                return self._error(400, f"The request body is not JSON: {e}.")
            if not isinstance(body, dict):
                return self._error(400, "The request body must be a JSON object, got "
                                        f"{type(body).__name__}.")
            state: RunState = self.server.state
            if not state.run_view()["is_lm"]:
                return self._error(400, "Attribution graphs are for language-model runs; this "
                                        f"run is {state.run_view()['family']}.")
            fn = getattr(graph_module(), names[path])
            return self._json(200, fn(state.loaded_run(), body))
        except ValueError as e:
            return self._error(400, str(e))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            return self._error(500, f"{type(e).__name__}: {e}")

    def _file(self, root: pathlib.Path, rel: str) -> None:
        rel = urllib.parse.unquote(rel)
        root = root.resolve()
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            return self._error(404, f"No file {rel!r}.")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return self._send(200, path.read_bytes(), ctype)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, state: RunState):
        self.state = state
        super().__init__(address, Handler)


def make_server(workdir: str | pathlib.Path, *, host: str = "127.0.0.1", port: int = 0,
                loader: Callable | None = None) -> Server:
    """The viewer's server for ``workdir``, bound (``port=0``: a free port; ``server.port``
    says which) but not yet serving: call ``serve_forever()``. ``loader``: how the graph API's
    run is read (default :func:`spdjax.load`)."""
    state = RunState(workdir, loader=loader)
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int in [0, 65535]; got {port!r}.")
    try:
        server = Server((host, port), state)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(errno.EADDRINUSE, f"port {port} on {host} is in use: pick "
                                 "another with --port (or --port=0 for any free one).") from e
        raise
    return server


def url(server: Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"


def start_in_thread(server: Server) -> threading.Thread:
    """Serves ``server`` from a daemon thread; returns it (``server.shutdown()`` stops it)."""
    t = threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.2),
                         daemon=True, name="spdjax-view")
    t.start()
    return t
