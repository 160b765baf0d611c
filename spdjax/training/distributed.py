"""Several processes (hosts) as one run: ``jax.distributed`` when the environment sets it up.

The CLI calls :func:`initialize` before anything touches JAX's devices. It connects the processes
when ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` are set (cluster launchers set them, or set them yourself), or when
``SPDJAX_DISTRIBUTED=auto`` asks JAX to detect a cluster (TPU pods, SLURM, ...). On CPUs the
processes' collectives go through gloo.

What changes in a multi-process run: the mesh spans every process's devices; each step's batch
is drawn from the step's key inside the compiled program, so every process computes its own
shard of the global batch (no data loading to coordinate); checkpoints are written by all
processes together (orbax); the workdir lock, ``config.json``, metric lines, summary and figures
are written by process 0 alone (:func:`is_primary`).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("spdjax")
_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> bool:
    """Connects this process to the others if the environment says so; returns whether it did."""
    set_ = [name for name in _ENV if os.environ.get(name)]
    auto = os.environ.get("SPDJAX_DISTRIBUTED") == "auto"
    if not set_ and not auto:
        return False
    if set_ and len(set_) < len(_ENV):
        missing = sorted(set(_ENV) - set(set_))
        raise ValueError(f"A multi-process run needs {', '.join(_ENV)}; {', '.join(missing)} "
                         "not set.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    if auto and not set_:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    log.info("process %d of %d, %d of %d devices local", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in one process)."""
    return jax.process_index() == 0
