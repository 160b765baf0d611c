"""The import layers (pyproject.toml's import-linter contracts, which .ci/run checks too):
``core < losses < methods < analysis < training < families < config < cli < view``, each importing
only from the layers below it."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# lint-imports, with the interpreter running the tests (its console script may not be on PATH)
LINT_IMPORTS = [sys.executable, "-c",
                "import sys; from importlinter.cli import lint_imports_command; "
                "sys.exit(lint_imports_command())", "--no-cache"]


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under ``root`` (found first on the path) with ``root``'s
    pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run(LINT_IMPORTS, cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    shutil.copytree(ROOT / "spdjax", tmp_path / "spdjax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    masks = tmp_path / "spdjax" / "core" / "masks.py"
    masks.write_text(masks.read_text() + "\nimport spdjax.training.loop  # noqa: E402,F401\n")

    result = lint_imports(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "spdjax layers" in out and "BROKEN" in out, out
    assert "spdjax.core is not allowed to import spdjax.training" in out, out
    assert "spdjax.core.masks -> spdjax.training.loop" in out, out


def test_no_module_of_the_package_is_in_an_import_cycle():
    """No two modules import each other, even indirectly and within one layer (grimp builds
    the graph import-linter checks; imports under ``TYPE_CHECKING`` count too)."""
    import grimp

    graph = grimp.build_graph("spdjax")
    cycles = [(a, b) for a in sorted(graph.modules) if a.startswith("spdjax.")
              for b in graph.find_modules_directly_imported_by(a)
              if b.startswith("spdjax.") and b != a and graph.chain_exists(importer=b, imported=a)]
    assert not cycles, f"import cycles: {cycles}"
