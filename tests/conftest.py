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
