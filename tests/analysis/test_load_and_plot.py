"""A finished run reopened from its workdir: ``python -m spdjax.cli.plot`` redraws every figure."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import spdjax

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_format1"
TMS_FIGURES = {"target.png", "combined_diagram.png", "ci_lower_leaky.png", "ci_upper_leaky.png",
               "max_cosine.png", "training_curves.png"}


def test_plot_cli_redraws_every_figure_of_a_finished_run(tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(FIXTURE, wd)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "spdjax.cli.plot", f"--workdir={wd}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    drawn = {pathlib.Path(line).name for line in p.stdout.split()}
    assert drawn == TMS_FIGURES
    assert all((wd / "figures" / name).stat().st_size > 1000 for name in TMS_FIGURES)


def test_load_plots_into_another_directory(tmp_path):
    run = spdjax.load(FIXTURE)
    paths = run.plot(tmp_path / "figs")
    assert {p.name for p in paths} == TMS_FIGURES
    assert all(p.parent == tmp_path / "figs" for p in paths)


def test_load_of_a_directory_without_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        spdjax.load(tmp_path)
