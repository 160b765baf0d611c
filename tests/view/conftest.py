"""What the viewer's tests share, made once: the tiny runs (tests/tiny_runs.py through
tests/conftest.py's ``finished_runs``: each once per test session even across pytest-xdist
workers), the LM run loaded once (its compiled forwards and graphs shared by the graph API
tests and the browser), a live server per run, and one headless browser per worker."""

import collections.abc
import pathlib
import threading

import pytest

import spdjax
from spdjax.view import server

from view import browser as browser_lib


@pytest.fixture(scope="session")
def view_runs(finished_runs):
    """``{label: workdir}``: the session's tiny finished runs (tests/conftest.py), e.g. ``tms``
    (SPD: figures, harvest, clustering) and ``lm`` (the committed tiny LM run, harvested).
    Read-only for the tests (copy one to change it)."""
    return finished_runs


_LOADED: dict = {}
_LOAD_LOCK = threading.Lock()


def _load_once(workdir: pathlib.Path):
    """``spdjax.load(workdir)``, once per process (the tests' and the server's threads)."""
    with _LOAD_LOCK:
        if workdir not in _LOADED:
            _LOADED[workdir] = spdjax.load(workdir)
        return _LOADED[workdir]


@pytest.fixture(scope="session")
def lm_run(view_runs):
    """The tiny LM run, loaded once (the same object the LM server's graph API uses)."""
    return _load_once(view_runs["lm"])


class _Servers(collections.abc.Mapping):
    """``{label: base URL}`` of a live viewer server per tiny run, each started on first use
    (a thread each); the LM's graph API uses the session's loaded run."""

    def __init__(self, runs, lm_loader):
        self.runs, self.lm_loader, self.servers = runs, lm_loader, {}

    def __getitem__(self, label):
        if label not in self.servers:
            loader = self.lm_loader if label == "lm" else None
            s = server.make_server(self.runs[label], loader=loader)
            server.start_in_thread(s)
            self.servers[label] = s
        return server.url(self.servers[label])

    def __iter__(self):
        return iter(self.runs)

    def __len__(self):
        return len(self.runs)

    def close(self):
        for s in self.servers.values():
            s.shutdown()
            s.server_close()


@pytest.fixture(scope="session")
def served(view_runs):
    """``{label: base URL}`` (:class:`_Servers`); the LM's graph API loads the run as
    :func:`lm_run` does (the same object)."""
    servers = _Servers(view_runs, _load_once)
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium through its chromedriver, its waits bounded
    (tests/view/browser.py); a one-line failure at once when either is not installed."""
    try:
        driver = browser_lib.chrome()
    except browser_lib.BrowserMissing as e:
        pytest.fail(str(e), pytrace=False)
    yield driver
    driver.quit()
