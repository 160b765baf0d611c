"""Tiny finished runs of every family and method, shared by the tests that only read a finished
run (the viewer, plots, loading, analysis tools; the ``finished_runs`` fixture of
tests/conftest.py makes each once per test session): a few training steps each, harvested on a
few small batches, the TMS one clustered too.

``make(root)`` -> ``{label: workdir}`` with labels ``tms`` (SPD, figures, harvest, clustering),
``tms_apd``, ``tms_vpd``, ``resid_mlp`` (SPD; harvest), ``l3d`` (L3D on TMS 5-2: no CI, so no
harvest) and ``lm`` (the committed tests/fixtures/lm_ih_tiny, harvested)."""

import pathlib
import shutil
import time

import spdjax
from spdjax.analysis import clustering, harvest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LM_FIXTURE = ROOT / "tests" / "fixtures" / "lm_ih_tiny"
TINY = {"steps": 2, "log_every": 1, "checkpoint_every": 2, "batch_size": 32,
        "eval_batch_size": 64}
CONFIGS = {
    "tms": ("tms:5-2", dict(TINY, C=6)),
    "tms_apd": ("tms:5-2", dict(TINY, C=6, method="apd", figures=False)),
    # VPD's per-example PGD sources are shaped by its own batch size: kept
    "tms_vpd": ("tms:5-2+vpd", dict({k: v for k, v in TINY.items() if k != "batch_size"},
                                    C=6, figures=False)),
    "resid_mlp": ("resid_mlp:1", dict(TINY, C=20, target_steps=20)),
    # L3D on the TMS target SPD decomposes: a fixed set of 64 samples, one dense step
    "l3d": ("l3d:5-2", dict({k: v for k, v in TINY.items() if k != "batch_size"},
                            **{"l3d.dense_steps": 1, "l3d.n_samples": 64})),
}
LABELS = ("tms", "tms_apd", "tms_vpd", "resid_mlp", "l3d", "lm")


def make(root: pathlib.Path, labels=LABELS) -> dict[str, pathlib.Path]:
    out = {}
    for label in labels:
        t0 = time.perf_counter()
        wd = root / label
        if label == "lm":
            shutil.copytree(LM_FIXTURE, wd)
        else:
            name, changes = CONFIGS[label]
            spdjax.train_and_evaluate(spdjax.configs.load(name, changes), wd)
        if label in ("tms", "resid_mlp", "lm"):
            run = spdjax.load(wd)
            harvest.harvest(run, n_batches=2, batch_size=16, examples=3, window=3,
                            out_dir=wd / "analysis" / "harvest")
            if label == "tms":
                clustering.cluster(run, seeds=(0,), n_batches=2, batch_size=32,
                                   out_dir=wd / "analysis" / "clustering")
        out[label] = wd
        print(f"tiny run {label}: {time.perf_counter() - t0:.1f} s")
    return out
