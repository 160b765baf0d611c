"""The README's examples run as written (the run example with fewer, smaller steps)."""

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


def test_runs_example_trains_resumes_loads_and_plots(tmp_path, monkeypatch):
    code = _block("<!-- example:runs")
    small = code.replace('{"steps": 2000}', '{"steps": 4, "batch_size": 64, "log_every": 1, '
                                            '"checkpoint_every": 2, "eval_batch_size": 256}')
    small = small.replace("until_step=1000", "until_step=2")
    assert small != code and "until_step=2" in small
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(small, str(README), "exec"), ns)
    assert ns["summary"]["steps"] == 4
    assert (tmp_path / "workdir" / "quick" / "figures" / "combined_diagram.png").exists()
    assert ns["run"].step == 4  # spdjax.load read the finished run back
