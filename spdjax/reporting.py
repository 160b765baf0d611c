"""Metric writing (one JSON line per log step) and a human progress line with steps/s and ETA.

The writer follows the clu vocabulary (``write_scalars(step, dict)``, ``flush``, ``close``).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Mapping, TextIO


class JsonlWriter:
    """Appends ``{"step": s, **scalars}`` lines to ``path``; drops lines past ``resume_step``."""

    def __init__(self, path: str | pathlib.Path, *, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        if resume_step is not None and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Prints ``step i/N | loss | steps/s | ETA`` lines; measures rate since the last report."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stdout,
                 *, label: str = ""):
        self.total, self.start = total_steps, start_step
        self.stream = stream
        self.prefix = f"{label}: " if label else ""
        self._last_step, self._last_time = start_step, time.perf_counter()
        self.steps_per_sec = float("nan")

    def mark(self, step: int) -> float:
        """Updates the rate estimate at ``step`` and returns steps/s since the last mark."""
        now = time.perf_counter()
        if step > self._last_step:
            self.steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return self.steps_per_sec

    def report(self, step: int, loss: float) -> None:
        eta = (self.total - step) / self.steps_per_sec if self.steps_per_sec > 0 else float("nan")
        print(
            f"{self.prefix}step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4e} | "
            f"{self.steps_per_sec:7.1f} steps/s | ETA {format_duration(eta)}",
            file=self.stream,
            flush=True,
        )
