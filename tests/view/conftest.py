"""Tiny runs for the viewer's tests, made once per session (tests/view/tiny_runs.py)."""

import pytest

from view import tiny_runs


@pytest.fixture(scope="session")
def view_runs(tmp_path_factory):
    """A TMS run (SPD: figures, harvest, clustering) and the committed tiny LM run, harvested."""
    return tiny_runs.make(tmp_path_factory.mktemp("view_runs"), labels=("tms", "lm"))


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium through its chromedriver (.ci/run installs both)."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install -y chromium chromium-driver "
                        "(.ci/run does).")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
