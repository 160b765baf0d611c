"""Where a pytest run's time goes: tracing, lowering and XLA's backend compile, per worker.

    COMPILE_SHARE_DIR=/tmp/cs python -m pytest -q -p benchmarks.compile_share tests/core
    python -m benchmarks.compile_share /tmp/cs

As a pytest plugin (``-p benchmarks.compile_share``) every process that loads it (the controller
and each pytest-xdist worker) sums JAX's compile-time monitoring events and, at exit, writes them
with its process CPU time to ``$COMPILE_SHARE_DIR/compile_<pid>.json``. Run as a module it adds
the files up and prints each event's total seconds (wall time spent inside it, summed over the
processes) and the processes' CPU seconds. The suite's time is mostly compiles when the backend
compile's share is large; measured in benchmarks/README.md.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import pathlib
import sys
import time

EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "tracing",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowering",
    "/jax/core/compile/backend_compile_duration": "backend compile",
    "/jax/compilation_cache/compile_time_saved_sec": "saved by the persistent cache",
}


class Totals:
    """Seconds per event of :data:`EVENTS`, summed from JAX's monitoring listener."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.cpu0 = time.process_time()

    def listener(self, event: str, duration: float, **_) -> None:
        if event in EVENTS:
            self.seconds[EVENTS[event]] += duration

    def record(self) -> dict:
        return {"process_cpu_s": time.process_time() - self.cpu0, **self.seconds}

    def write(self, directory) -> pathlib.Path:
        path = pathlib.Path(directory) / f"compile_{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record()))
        return path


def pytest_configure(config):  # noqa: ARG001 - pytest's hook signature
    import jax.monitoring

    directory = os.environ.get("COMPILE_SHARE_DIR")
    if not directory:
        raise SystemExit("benchmarks.compile_share: set COMPILE_SHARE_DIR to the folder for the "
                         "per-process files.")
    totals = Totals()
    jax.monitoring.register_event_duration_secs_listener(totals.listener)
    atexit.register(totals.write, directory)


def summarize(directory) -> dict:
    """The files' totals: ``{"processes": n, "process_cpu_s": s, <event>: s, ...}``."""
    files = sorted(pathlib.Path(directory).glob("compile_*.json"))
    if not files:
        raise SystemExit(f"No compile_*.json files in {directory}.")
    out = collections.Counter()
    for f in files:
        out.update(json.loads(f.read_text()))
    return {"processes": len(files), **{k: round(v, 1) for k, v in out.items()}}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m benchmarks.compile_share DIR")
    print(json.dumps(summarize(sys.argv[1]), indent=1))
