"""The Colab notebooks run headless, top to bottom, on a small step count."""

import importlib.util
import pathlib
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(name: str, monkeypatch, **env) -> tuple[str, list]:
    """Runs ``colab/<name>`` headless with ``env`` set; returns (printed text, image outputs)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(ROOT / "colab" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") for o in outputs)
    return text, [o for o in outputs if "image/png" in o.get("data", {})]


def test_tms_quickstart_notebook_runs(tmp_path, monkeypatch):
    # 4 steps: each of SPD's and APD's steps is a batch of 4096 / 2048; nothing here reads how
    # far they trained, only that every cell ran on a finished run
    text, images = execute("tms_quickstart.ipynb", monkeypatch, SPDJAX_NOTEBOOK_STEPS="4",
                           SPDJAX_NOTEBOOK_WORKDIR=str(tmp_path / "run"))
    assert "MMCS = " in text and "ML2R = " in text
    assert "params of" in text and "at step 4\n" in text  # the finished run reopened by spdjax.load
    assert "SPD: MMCS" in text and "APD: MMCS" in text  # the same target decomposed by APD
    assert "viewer of" in text and " at http://127.0.0.1:" in text  # served, cell returned
    assert len(images) == 3
    assert (tmp_path / "run" / "summary.json").exists()
    assert (tmp_path / "run_apd" / "summary.json").exists()


@pytest.mark.slow  # ~40-70 s; the TMS quickstart notebook runs in the default suite
def test_decompose_your_transformer_notebook_runs(tmp_path, monkeypatch):
    text, images = execute("decompose_your_transformer.ipynb", monkeypatch,
                           SPDJAX_NOTEBOOK_STEPS="20", SPDJAX_NOTEBOOK_TARGET_STEPS="50",
                           SPDJAX_NOTEBOOK_WORKDIR=str(tmp_path))
    assert "blocks_1/attn/out" in text and "step    19" in text
    assert "KL(target || CI-masked model)" in text
    assert len(images) == 1 and (tmp_path / "ci_per_token.png").exists()


@pytest.mark.parametrize("name", ["tms_quickstart.ipynb", "decompose_your_transformer.ipynb"])
def test_install_cell_installs_from_what_there_is(name, tmp_path, monkeypatch):
    """The first code cell (what a fresh Colab runtime runs) installs from the checkout, else an
    uploaded wheel, else SPDJAX_REPO, else says what to do; nothing hard-coded."""
    source = nbformat.read(ROOT / "colab" / name, as_version=4).cells[1].source
    find_spec, calls = importlib.util.find_spec, []
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "spdjax" else find_spec(n, *a))
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.delenv("SPDJAX_REPO", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="nothing to install it from: .* upload a wheel"):
        exec(source, {})
    wheel = tmp_path / "spdjax-0.2.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    exec(source, {})
    assert calls[-1][-1] == wheel.name and "-e" not in calls[-1]
    wheel.unlink()
    monkeypatch.setenv("SPDJAX_REPO", "https://example.org/spdjax.git")
    exec(source, {})
    assert calls[-1][-1] == "git+https://example.org/spdjax.git"
    monkeypatch.chdir(ROOT / "colab")  # inside a checkout: an editable install of it
    exec(source, {})
    assert calls[-1][-2:] == ["-e", str(ROOT)]
