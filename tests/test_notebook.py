"""The Colab quickstart runs headless, top to bottom, on a small step count."""

import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tms_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_NOTEBOOK_STEPS", "100")
    monkeypatch.setenv("SPDJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(ROOT / "colab" / "tms_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "MMCS = " in text and "ML2R = " in text
    assert "params of" in text and "at step 100" in text  # the finished run reopened by spdjax.load
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert (tmp_path / "run" / "summary.json").exists()


def test_decompose_your_transformer_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_NOTEBOOK_STEPS", "20")
    monkeypatch.setenv("SPDJAX_NOTEBOOK_TARGET_STEPS", "50")
    monkeypatch.setenv("SPDJAX_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(ROOT / "colab" / "decompose_your_transformer.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "blocks_1/attn/out" in text and "step    19" in text
    assert "KL(target || CI-masked model)" in text
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 1 and (tmp_path / "ci_per_token.png").exists()
