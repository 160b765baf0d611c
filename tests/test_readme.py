"""The README's library example runs as written and trains."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    m = re.search(re.escape(marker) + r".*?\n```python\n(.*?)```", text, re.S)
    assert m, f"README block after {marker!r} not found"
    return m.group(1)


def test_library_example_runs_and_loss_falls():
    code = _block("<!-- example:library")
    assert len(code.strip().splitlines()) < 45
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    losses = ns["losses"]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
