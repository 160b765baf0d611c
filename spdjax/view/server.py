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
  the request's JSON body (``Content-Type: application/json``, else 415). Their
  :class:`~spdjax.view.errors.BadRequest` (bad input) is HTTP 400 with ``{"error": message}``;
  any other exception (a ``ValueError`` from NumPy or JAX included) is a bug, a 500.

Errors are JSON ``{"error": message}``: 404 for an unknown path, site or file
(:class:`NotFound`), 400 for a bad request, 500 (one line; the traceback goes to stderr) for
anything unexpected.

Requests from other web pages: a page the user visits elsewhere can make their browser send
requests here. Under DNS rebinding its own domain name resolves to this machine, so its script
could read the responses; the browser then sends that name as ``Host``, and a ``Host`` that is not
this server's name is refused (403; see :func:`host_allowed`). A cross-site ``POST`` that needs
no CORS preflight carries a form or text content type, and the graph API accepts only
``application/json`` (415), so another page cannot make the server compile graphs.
"""

from __future__ import annotations

import errno
import functools
import http.server
import importlib
import ipaddress
import json
import mimetypes
import pathlib
import socket
import sys
import threading
import traceback
import urllib.parse
from typing import Any, Callable, Iterable

from spdjax.view import data, pages
from spdjax.view.errors import BadRequest

MAX_BODY = 1 << 20  # bytes of a POST body (a prompt and node ids)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # Host names always accepted
ANY_HOST = "*"  # in ``allowed_hosts``: accept every Host (a proxy in front renames the server)


class PortInUseError(OSError):
    """The port asked for is taken."""


class NotFound(Exception):  # noqa: N818 - reads as the HTTP status it becomes
    """No such page, site or file: HTTP 404 with the message."""


def host_name(host_header: str) -> str:
    """The name part of a ``Host`` header, lower case: ``"[::1]:8000"`` -> ``"::1"``,
    ``"Example.org.:80"`` -> ``"example.org"``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    else:
        h = h.partition(":")[0]
    return h.rstrip(".")


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request with this ``Host`` header is served.

    Accepted: no header (not a browser: browsers always send one), ``ANY_HOST`` in
    ``allowed``, a name in ``allowed``, and an IP address literal. DNS rebinding needs a domain
    name the attacker controls, so a literal address in ``Host`` means the page's own origin is
    that address: the user typed it (e.g. a machine's LAN address with ``--host=0.0.0.0``)."""
    if host_header is None or ANY_HOST in allowed:
        return True
    name = host_name(host_header)
    if name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RunState:
    """What the server holds for one workdir: the site views computed so far (recomputed when
    the harvest or clustering changes on disk) and the run for the graph API, loaded once."""

    def __init__(self, workdir: pathlib.Path, *, loader: Callable[[pathlib.Path], Any] | None
                 = None):
        self.workdir = data.check_workdir(workdir)
        self._loader = loader
        self._run = None
        self._run_lock = threading.Lock()  # held while the model loads (once)
        # Each site view is computed once per (site, files on disk), under its own lock: a slow
        # view (or the model loading) does not hold up the other sites' pages.
        self._locks_lock = threading.Lock()
        self._site_locks: dict[tuple, threading.Lock] = {}
        self._sites: dict[tuple, dict] = {}

    def run_view(self) -> dict:
        return data.run_view(self.workdir)

    def site_view(self, i: int) -> dict:
        """The view of the run's ``i``-th site (:class:`NotFound` when there is none)."""
        sites = self.run_view()["sites"]
        if not 0 <= i < len(sites):
            raise NotFound(f"No site {i}: the run has {len(sites)} sites.")
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (
            self.workdir / "analysis" / "harvest" / "harvest.npz",
            self.workdir / "analysis" / "clustering" / "clustering.json"))
        name = sites[i]["name"]
        key = (name, stamp)
        with self._locks_lock:
            lock = self._site_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._sites:
                view = data.site_view(self.workdir, name)
                with self._locks_lock:  # views of older files of this site are not served again
                    for old in [k for k in self._sites if k[0] == name]:
                        del self._sites[old]
                        self._site_locks.pop(old, None)
                    self._sites[key] = view
            return self._sites[key]

    def loaded_run(self):
        """The run for the graph API (:func:`spdjax.load`, once)."""
        with self._run_lock:
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
    timeout = 60  # seconds a client may stall mid-request before its thread gives up

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

    def _unexpected(self, e: Exception) -> None:
        """A bug or a broken run: 500 with one line; the traceback goes to stderr."""
        traceback.print_exc(file=sys.stderr)
        first = str(e).strip().splitlines()
        self._error(500, f"{type(e).__name__}: {first[0] if first else ''}".rstrip(": "))

    def _host_refused(self) -> bool:
        """Sends 403 (and says True) when the ``Host`` header names another server."""
        host = self.headers.get("Host")
        if host_allowed(host, self.server.allowed_hosts):
            return False
        self._error(403, f"Host {host!r} is not this server's name: open it as "
                         f"{url(self.server)} (or start it with --allowed_hosts="
                         f"{host_name(host)} to accept that name).")
        return True

    # routes
    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802
        if self._host_refused():
            return None
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
                    raise NotFound(f"No site {i!r}: sites are numbered 0, 1, ...")
                return self._json(200, state.site_view(int(i)))
            raise NotFound(f"No page {path}.")
        except NotFound as e:
            return self._error(404, str(e))
        except Exception as e:  # noqa: BLE001 - shown on the page, not a dead socket
            return self._unexpected(e)

    def do_POST(self):  # noqa: N802
        if self._host_refused():
            return None
        path = urllib.parse.urlsplit(self.path).path
        names = {"/api/graph": "graph_json", "/api/intervene": "intervene_json"}
        if path not in names:
            return self._error(404, f"No API {path}.")
        if self.headers.get_content_type() != "application/json":
            return self._error(415, "The request's Content-Type is "
                                    f"{self.headers.get('Content-Type')!r}; the graph API "
                                    "takes application/json.")
        length = self.headers.get("Content-Length") or "0"
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            return self._error(400, f"Content-Length {length!r} is not a byte count (an "
                                    "integer >= 0).")
        if n > MAX_BODY:
            return self._error(413, f"The request body is {n} bytes; at most {MAX_BODY}.")
        try:
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        except BadRequest as e:
            return self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback on stderr
            return self._unexpected(e)

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

    def __init__(self, address, state: RunState, *, allowed_hosts: Iterable[str] = ()):
        self.state = state
        if ":" in address[0]:  # an IPv6 address ("::", "::1")
            self.address_family = socket.AF_INET6
        self.allowed_hosts = frozenset(
            [*LOCAL_HOSTS, host_name(address[0]), *(host_name(h) for h in allowed_hosts)]) - {""}
        super().__init__(address, Handler)


def make_server(workdir: str | pathlib.Path, *, host: str = "127.0.0.1", port: int = 0,
                loader: Callable | None = None, allowed_hosts: Iterable[str] = ()) -> Server:
    """The viewer's server for ``workdir``, bound (``port=0``: a free port; ``server.port``
    says which) but not yet serving: call ``serve_forever()``. ``loader``: how the graph API's
    run is read (default :func:`spdjax.load`). ``allowed_hosts``: names besides ``localhost``,
    ``host`` and IP addresses that a request's ``Host`` header may give (``"*"``: any, for a
    server behind a proxy that renames it, such as Colab's); see :func:`host_allowed`."""
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int in [0, 65535]; got {port!r}.")
    if isinstance(allowed_hosts, str):
        raise ValueError(f"allowed_hosts must be a list of names; got the string "
                         f"{allowed_hosts!r} (write [{allowed_hosts!r}]).")
    allowed_hosts = list(allowed_hosts)
    bad = [h for h in allowed_hosts if not isinstance(h, str) or not host_name(h)]
    if bad:
        raise ValueError(f"allowed_hosts must be non-empty host names (or '*'); got {bad!r}.")
    state = RunState(workdir, loader=loader)
    try:
        server = Server((host, port), state, allowed_hosts=allowed_hosts)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(errno.EADDRINUSE, f"port {port} on {host} is in use: pick "
                                 "another with --port (or --port=0 for any free one).") from e
        raise
    return server


def url(server: Server) -> str:
    """The URL to open: a wildcard bind address reads as this machine's loopback address."""
    host, port = server.server_address[:2]
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def start_in_thread(server: Server) -> threading.Thread:
    """Serves ``server`` from a daemon thread; returns it (``server.shutdown()`` stops it)."""
    t = threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.2),
                         daemon=True, name="spdjax-view")
    t.start()
    return t
