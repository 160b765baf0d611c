"""Test configuration: 8 fake CPU devices for the sharding tests.

Not strict dtype promotion: optax's own Adam computes ``decay ** count`` with an int32 count,
which strict promotion rejects.
"""

import os
import shutil
import tempfile

# One target cache for the whole session, seeded with the TMS 5-2 and 5-2-id targets that the
# regression fixtures recorded (what `python -m spdjax.cli.target --family=tms` trains for seed 0),
# so that no test pays for the paper's 10k-step recipe x several seeds; other targets are trained
# once.
# pytest-xdist workers inherit the cache the controller made (targets are written atomically, so
# two workers training the same one is safe).
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("SPDJAX_TEST_CACHE_SHARED")):
    os.environ["SPDJAX_CACHE"] = tempfile.mkdtemp(prefix="spdjax_test_cache_")
    os.environ["SPDJAX_TEST_CACHE_SHARED"] = "1"
    shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                                 "regression", "targets"),
                    os.path.join(os.environ["SPDJAX_CACHE"], "targets"))
# One persistent XLA compilation cache for the session and the processes it starts: the CLI
# processes and the many small runs of one config compile the same steps (halves e.g. the
# kill-and-resume test). Results are the same executables, so nothing numerical changes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="spdjax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Little XLA optimisation: the suite is mostly compiling many small programs and running each for
# a few steps, and LLVM's optimisation is most of that compile time (the suite's CPU time falls by
# ~1/4). The regression runs, which train for hundreds of steps and compare against numbers
# recorded with the default, turn it back off (tests/test_regression.py).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

# tests/helpers.py is importable from every test directory (they mirror the package's packages).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import collections.abc  # noqa: E402
import pathlib  # noqa: E402

import filelock  # noqa: E402
import pytest  # noqa: E402

import tiny_runs  # noqa: E402


class _Runs(collections.abc.Mapping):
    """``{label: workdir}`` of the tiny finished runs (tests/tiny_runs.py), each made on first
    use under its own file lock, so once per session even across pytest-xdist workers (a
    worker that needs only the LM run does not wait for the TMS one)."""

    def __init__(self, root: pathlib.Path, labels):
        self.root, self.labels = root, tuple(labels)

    def __getitem__(self, label):
        if label not in self.labels:
            raise KeyError(f"{label!r}: the tiny runs are {', '.join(self.labels)}")
        wd, done = self.root / label, self.root / f"{label}.done"
        with filelock.FileLock(str(self.root / f"{label}.lock")):
            if not done.exists():
                tiny_runs.make(self.root, labels=(label,))
                done.touch()
        return wd

    def __iter__(self):
        return iter(self.labels)

    def __len__(self):
        return len(self.labels)


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory):
    """``{label: workdir}`` of finished tiny runs (tests/tiny_runs.py: ``tms``, ``tms_apd``,
    ``tms_vpd``, ``resid_mlp``, ``l3d``, ``lm``), each made when first read. Read-only for the
    tests: copy one (``shutil.copytree``) to change or resume it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    (root / "finished_runs").mkdir(exist_ok=True)
    return _Runs(root / "finished_runs", tiny_runs.LABELS)
