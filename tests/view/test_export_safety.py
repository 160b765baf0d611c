"""The static export refuses directories it could damage (spdjax/view/export.py): a
non-empty directory it did not write, the run's own directory, one inside it and one holding it;
an empty directory or an earlier export's is (re)written."""

import json
import re

import pytest

from spdjax.view import export


def _fake_run(path):
    """A directory that passes ``check_workdir`` (the checks come before any view is read)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_project_directory_is_refused_and_left_as_it_was(tmp_path, view_runs):
    project = tmp_path / "project"  # `--export=.` in a project with its own data/
    (project / "data").mkdir(parents=True)
    (project / "data" / "corpus.txt").write_text("keep me")
    (project / "notes.md").write_text("keep me too")
    before = _tree(project)
    with pytest.raises(ValueError, match=(
            rf"^--export={re.escape(str(project))} is a non-empty directory that holds no "
            r"earlier export \(no \.spdjax-view-export file\): export into a new or empty "
            r"directory\.$")):
        export.export(view_runs["tms"], project)
    assert _tree(project) == before and (project / "data" / "corpus.txt").read_text() == "keep me"


def test_the_runs_directory_inside_or_around_it_is_refused(tmp_path):
    run = _fake_run(tmp_path / "project" / "runs" / "tms")
    (run / "data").mkdir()  # a run whose own data/ the old export deleted
    before = _tree(tmp_path)
    for out, message in ((run, "is inside the run's workdir"),
                         (run / "view", "is inside the run's workdir"),
                         (tmp_path / "project", "contains the run's workdir"),
                         (tmp_path / "project" / "runs", "contains the run's workdir")):
        with pytest.raises(ValueError, match=f"^--export={re.escape(str(out))} {message}"):
            export.export(run, out)
    marked = tmp_path / "project"  # even an earlier export's directory, if it holds the run
    (marked / export.MARKER).write_text("")
    with pytest.raises(ValueError, match="contains the run's workdir"):
        export.export(run, marked)
    (marked / export.MARKER).unlink()
    assert _tree(tmp_path) == before
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match=f"^--export={re.escape(str(file))} is a file"):
        export.export(run, file)


def test_an_empty_or_earlier_export_directory_is_written(tmp_path, view_runs):
    out = tmp_path / "empty"
    out.mkdir()
    index = export.export(view_runs["tms"], out)
    assert index == out / "index.html" and (out / export.MARKER).is_file()
    (out / "data" / "stale.js").write_text("old")  # a file of the earlier export: replaced
    (out / "README.md").write_text("mine")  # the user's: kept
    export.export(view_runs["tms"], out)
    assert not (out / "data" / "stale.js").exists() and (out / "README.md").read_text() == "mine"
    run = (out / "data" / "run.js").read_text()
    assert json.loads(run[run.index("{"):run.rindex(")")])["name"] == "tms"
