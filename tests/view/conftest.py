"""What the viewer's tests share, made once: the tiny runs (tests/view/tiny_runs.py; once per
test session even across pytest-xdist workers, which wait on a file lock for the first to
build them), the LM run loaded once (its compiled forwards and graphs shared by the graph API
tests and the browser), a live server per run, and one headless browser per worker."""

import os

import filelock
import pytest

import spdjax
from spdjax.view import server

from view import tiny_runs

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DEFAULT_RUNS = ("tms", "lm")


@pytest.fixture(scope="session")
def view_runs(tmp_path_factory):
    """``{label: workdir}``: a TMS run (SPD: figures, harvest, clustering) and the committed tiny
    LM run, harvested. Read-only for the tests (copy one to change it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    done = root / "view_runs" / "done"
    with filelock.FileLock(str(root / "view_runs.lock")):
        if not done.exists():
            tiny_runs.make(root / "view_runs", labels=DEFAULT_RUNS)
            done.touch()
    return {label: root / "view_runs" / label for label in DEFAULT_RUNS}


@pytest.fixture(scope="session")
def lm_run(view_runs):
    """The tiny LM run, loaded once (``spdjax.load``)."""
    return spdjax.load(view_runs["lm"])


@pytest.fixture(scope="session")
def served(view_runs, lm_run):
    """``{label: base URL}`` of a live viewer server per tiny run (a thread each); the LM's
    graph API uses :func:`lm_run`."""
    loaders = {"lm": lambda _wd: lm_run}
    servers = {k: server.make_server(wd, loader=loaders.get(k)) for k, wd in view_runs.items()}
    for s in servers.values():
        server.start_in_thread(s)
    yield {k: server.url(s) for k, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium through its chromedriver (.ci/run installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install -y chromium chromium-driver "
                        "(.ci/run does).")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()

