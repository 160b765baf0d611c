"""Several processes (hosts) as one run: ``jax.distributed`` when the environment sets it up.

The CLI calls :func:`initialize` before anything touches JAX's devices. It connects the processes
when ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` are set (cluster launchers set them, or set them yourself), or when
``SPDJAX_DISTRIBUTED=auto`` asks JAX to detect a cluster (TPU pods, SLURM, ...). On CPUs the
processes' collectives go through gloo. A malformed variable is refused with one line naming it;
while the processes connect, each prints that it waits (``SPDJAX_CONNECT_TIMEOUT`` seconds, 300 by
default), and one that is not joined in time stops with one line.

What changes in a multi-process run: the mesh spans every process's devices; each step's batch
is drawn from the step's key inside the compiled program, so every process computes its own
shard of the global batch (no data loading to coordinate); checkpoints are written by all
processes together (orbax); the workdir lock, ``config.json``, metric lines, summary and figures
are written by process 0 alone (:func:`is_primary`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable

import jax

log = logging.getLogger("spdjax")
_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TIMEOUT_S = 300  # how long the processes wait for each other to connect (JAX's default)


def _timeout_s() -> int:
    """``SPDJAX_CONNECT_TIMEOUT`` (seconds) if set, else :data:`TIMEOUT_S`."""
    raw = os.environ.get("SPDJAX_CONNECT_TIMEOUT", "").strip()
    if not raw:
        return TIMEOUT_S
    if not (raw.isdigit() and int(raw) >= 1):
        raise ValueError(f"SPDJAX_CONNECT_TIMEOUT must be a number of seconds >= 1, got {raw!r}.")
    return int(raw)


def settings(environ=None) -> tuple[str, int, int] | None:
    """``(coordinator address, number of processes, this process's id)`` from the environment's
    ``JAX_*`` variables; None when none is set. Raises a one-line ``ValueError`` naming the
    variable for a missing or malformed value."""
    environ = os.environ if environ is None else environ
    set_ = [name for name in _ENV if environ.get(name)]
    if not set_:
        return None
    if len(set_) < len(_ENV):
        missing = sorted(set(_ENV) - set(set_))
        raise ValueError(f"A multi-process run needs {', '.join(_ENV)}; {', '.join(missing)} "
                         "not set.")
    address = environ["JAX_COORDINATOR_ADDRESS"].strip()
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port of process 0 (e.g. "
                         f"10.0.0.1:1234), got {address!r}.")
    raw_n = environ["JAX_NUM_PROCESSES"].strip()
    if not (raw_n.isdigit() and int(raw_n) >= 1):
        raise ValueError(f"JAX_NUM_PROCESSES must be the number of processes, an integer >= 1, "
                         f"got {raw_n!r}.")
    n = int(raw_n)
    raw_id = environ["JAX_PROCESS_ID"].strip()
    if not (raw_id.isdigit() and int(raw_id) < n):
        raise ValueError(f"JAX_PROCESS_ID must be this process's index, an integer in [0, {n - 1}]"
                         f" (JAX_NUM_PROCESSES={n}), got {raw_id!r}.")
    return address, n, int(raw_id)


def waiting_line(address: str, num_processes: int, process_id: int,
                 timeout_s: int = TIMEOUT_S) -> str:
    """The line a process prints while it waits for the others to connect."""
    role = "coordinator" if process_id == 0 else "connecting to the coordinator"
    return (f"Process {process_id} of {num_processes} ({role} at {address}): waiting for all "
            f"{num_processes} processes to connect (up to {timeout_s} s)...")


def not_connected_line(address: str, num_processes: int, process_id: int, timeout_s: int) -> str:
    """The line of a process whose peers did not all connect in time."""
    return (f"Process {process_id} of {num_processes}: the {num_processes} processes did not all "
            f"connect at {address} within {timeout_s} s; start every process with the same "
            f"JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES (SPDJAX_CONNECT_TIMEOUT sets how long "
            f"they wait).")


def _exit_not_connected(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def initialize(on_timeout: Callable[[str], None] = _exit_not_connected) -> bool:
    """Connects this process to the others if the environment says so; returns whether it did.

    Logs a line while it waits for them; raises ``ValueError`` for a malformed environment. When
    they do not all connect in time, ``on_timeout(message)`` is called (default: the message as
    one ``error:`` line on stderr) and the process exits with code 2: JAX would otherwise abort
    it from C++ with a stack dump, which Python cannot catch."""
    found = settings()
    auto = os.environ.get("SPDJAX_DISTRIBUTED") == "auto"
    if found is None and not auto:
        return False
    timeout = _timeout_s()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    if found is None:
        log.info("Detecting the cluster's processes (SPDJAX_DISTRIBUTED=auto)...")
        jax.distributed.initialize()
    else:
        address, n, process_id = found
        log.info(waiting_line(address, n, process_id, timeout))

        def give_up():
            try:
                on_timeout(not_connected_line(address, n, process_id, timeout))
            finally:
                os._exit(2)

        watchdog = threading.Timer(timeout, give_up)
        watchdog.daemon = True
        watchdog.start()
        try:  # JAX's own deadline comes later: the watchdog ends the wait with one line first
            jax.distributed.initialize(address, num_processes=n, process_id=process_id,
                                       initialization_timeout=timeout + 60)
        finally:
            watchdog.cancel()
    log.info("process %d of %d, %d of %d devices local", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in one process)."""
    return jax.process_index() == 0
