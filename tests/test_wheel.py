"""What the wheel needs, checked fast: config files found by name from any directory (configs/ is
installed as the package ``spdjax.presets``), and pyproject.toml's package list naming every
package. Building and installing the wheel itself is .ci/wheel_check's (slow, needs pip)."""

import pathlib
import shutil
import tomllib

import pytest

from spdjax.config import files, load

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_configs_load_by_name_from_an_empty_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load("tms")
    assert (config.experiment, config.variant) == ("tms", "5-2")
    assert load("tms:40-10-id").variant == "40-10-id"
    assert load("resid_mlp:2").experiment == "resid_mlp"
    assert files.known_configs() == ["l3d", "lm", "resid_mlp", "tms"]
    # the files found by name are the checkout's configs/ (editable) or their copy (wheel)
    for name in files.known_configs():
        assert ((files.config_dir() / f"{name}.py").read_bytes()
                == (ROOT / "configs" / f"{name}.py").read_bytes())


def test_an_unknown_config_name_lists_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError,
                       match=r"Unknown config 'tmz'.*\['l3d', 'lm', 'resid_mlp', 'tms'\]"):
        load("tmz:5-2")


def test_a_name_ending_in_py_is_a_path(tmp_path, monkeypatch):
    shutil.copy(ROOT / "configs" / "tms.py", tmp_path / "my_tms.py")
    monkeypatch.chdir(tmp_path)
    assert load("my_tms.py:5-2-id").variant == "5-2-id"
    with pytest.raises(FileNotFoundError):
        load("tms.py")  # a path, relative to the working directory: not the config named tms


def test_pyproject_lists_every_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "spdjax").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))}
    on_disk.add("spdjax")
    assert set(setuptools["packages"]) == on_disk | {"spdjax.presets"}
    assert setuptools["package-dir"] == {"spdjax.presets": "configs"}
