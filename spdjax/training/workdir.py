"""A run's directory and what the loop writes and says: config check, metric lines, progress.

    workdir/config.json         the resolved config (a resume must match it)
    workdir/metrics.jsonl       one JSON line per log step (writer: the clu vocabulary,
                                ``write_scalars(step, dict)``, ``flush``, ``close``)
    workdir/target_params.npz   the trained target the run decomposes (``spdjax.load`` reads it)
    workdir/checkpoints/        self-describing checkpoints (:mod:`spdjax.training.checkpoints`)
    workdir/summary.json        the final evaluation;  workdir/figures/*.png

Progress and notes go to the ``"spdjax"`` logger; :func:`log_to` attaches a plain handler for
scripts and notebooks (the CLI does this too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import shutil
import sys
import time
from typing import Any, Iterator, Mapping, TextIO

log = logging.getLogger("spdjax")
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "init_selection.json",
             "target_params.npz")
RUN_DIRS = ("checkpoints", "figures")


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``["a.b: old -> new", ...]`` for every field that differs (``<absent>`` when missing)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def prepare(workdir: pathlib.Path, resolved: dict, *, fresh: bool) -> None:
    """Refuses to resume a run whose config differs, unless ``fresh`` (which wipes the run);
    then writes ``config.json``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    if fresh:
        for name in RUN_DIRS:
            shutil.rmtree(workdir / name, ignore_errors=True)
        for name in RUN_FILES:
            (workdir / name).unlink(missing_ok=True)
    elif config_path.exists() and (workdir / "checkpoints").exists():
        diff = config_diff(json.loads(config_path.read_text()), resolved)
        if diff:
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config ({'; '.join(diff)}). Use another "
                "--workdir, or pass --fresh to discard that run and start over."
            )
    config_path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def flatten_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"loss": {"total": x}}`` -> ``{"loss/total": float(x)}``."""
    flat: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = float(v)
    return flat


def last_wall_time(metrics_path: pathlib.Path) -> float:
    """``wall_time_s`` of the last metric line (0 if there is none)."""
    if not metrics_path.exists():
        return 0.0
    lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
    return float(json.loads(lines[-1]).get("wall_time_s", 0.0)) if lines else 0.0


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


class MemoryWriter:
    """The writer of a run without a workdir: keeps the metric lines in ``rows``."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.rows.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Logs ``step i/N | loss | steps/s | ETA`` lines; measures rate since the last mark."""

    def __init__(self, total_steps: int, start_step: int = 0, *, label: str = ""):
        self.total, self.start = total_steps, start_step
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

    def line(self, step: int, loss: float) -> str:
        eta = (self.total - step) / self.steps_per_sec if self.steps_per_sec > 0 else float("nan")
        return (f"{self.prefix}step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4e} "
                f"| {self.steps_per_sec:7.1f} steps/s | ETA {format_duration(eta)}")

    def report(self, step: int, loss: float) -> None:
        log.info(self.line(step, loss))


class _Formatter(logging.Formatter):
    """The message alone; ``WARNING: message`` from warnings up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return f"{record.levelname}: {msg}" if record.levelno >= logging.WARNING else msg


@contextlib.contextmanager
def log_to(stream: TextIO | None = None, level: int = logging.INFO) -> Iterator[None]:
    """Prints the ``"spdjax"`` logger's records to ``stream`` (default stdout) while active.

    Does nothing if the logger already has a handler (an application configured it).
    """
    if log.handlers:
        yield
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter("%(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        handler.flush()
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
