"""Tiny runs for the viewer's tests, made once per session (tests/view/tiny_runs.py)."""

import pytest

from view import tiny_runs


@pytest.fixture(scope="session")
def view_runs(tmp_path_factory):
    """A TMS run (SPD: figures, harvest, clustering) and the committed tiny LM run, harvested."""
    return tiny_runs.make(tmp_path_factory.mktemp("view_runs"), labels=("tms", "lm"))
