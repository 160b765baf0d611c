"""Test configuration: 8 fake CPU devices for the sharding tests.

Not strict dtype promotion: optax's own Adam computes ``decay ** count`` with an int32 count,
which strict promotion rejects.
"""

import os
import tempfile

# One target cache for the whole session: the CLI and notebook tests train the TMS target once.
os.environ["SPDJAX_CACHE"] = tempfile.mkdtemp(prefix="spdjax_test_cache_")
# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

# tests/helpers.py is importable from every test directory (they mirror the package's packages).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
