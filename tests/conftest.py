"""Test configuration: 8 fake CPU devices for the sharding tests.

Not strict dtype promotion: optax's own Adam computes ``decay ** count`` with an int32 count,
which strict promotion rejects.
"""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
