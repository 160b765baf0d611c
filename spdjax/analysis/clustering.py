"""Clustering subcomponents into mechanisms by co-activation: greedy agglomerative merging under a
minimum-description-length (MDL) cost, over several data seeds, with a distance between seeds.

The method is the PyTorch reference's (goodfire-ai/spd, ``spd/clustering``: the merge cost of
``compute_costs.compute_merge_costs``, the iteration of ``merge.merge_iteration``, its "range"
merge-pair sampler, and the permutation-invariant Hamming distance between an ensemble's
clusterings of ``math/perm_invariant_hamming.py``), written here from its equations.

**Merging** (:mod:`spdjax.analysis.mdl_merge`): from the singletons, each iteration merges the
pair of groups whose merge most lowers the description length ``L = sum_g s_g (log2 k + alpha
r_g)`` of the firings (``k`` groups, ``s_g`` a group's firing frequency, ``r_g`` its rank), until
one group is left; the merge history is read at its MDL minimum by default.

**Seeds and distance.** Each data seed draws other batches (batch ``i`` of seed ``s`` is the
harvest's batch ``i`` of seed ``s``); two clusterings are compared by the reference's
permutation-invariant Hamming distance, normalised: the fraction of subcomponents outside the
best one-to-one matching of the two clusterings' groups (Hungarian algorithm), 0 for identical
partitions whatever the labels. It is chosen because it reads directly ("this fraction of the
subcomponents would have to move") and is comparable with the reference; the variation of
information (``method="vi"``, in bits) is offered as a metric that needs no matching.

Library: :func:`cluster` (a loaded run in, a :class:`Clustering` out), :func:`merge` (a firing
matrix in, a :class:`MergeHistory` out), :func:`partition_distance`, :func:`load_clustering`.
Command: ``python -m spdjax.cluster --workdir=DIR`` (docs/guides/analysis.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import harvest as harvest_lib
from spdjax.analysis import streaming
from spdjax.analysis.mdl_merge import (  # noqa: F401 (re-exported: the clustering's vocabulary)
    MergeHistory, check_alpha, description_length, load_history, merge, merge_costs)

SUMMARY_FILE = "clustering.json"


# -- distances between clusterings -----------------------------------------------------------
def _singletons(labels: np.ndarray) -> np.ndarray:
    """Dead subcomponents (-1) as singleton clusters of their own."""
    out = np.asarray(labels).copy()
    dead = out < 0
    out[dead] = out.max(initial=-1) + 1 + np.arange(dead.sum())
    return out


def partition_distance(a, b, *, method: str = "hamming") -> float:
    """A distance between two clusterings of the same subcomponents (label vectors ``[C]``,
    -1 for dead: a singleton each), invariant to relabelling. ``"hamming"``: the fraction of
    subcomponents outside the best one-to-one matching of the clusters (the reference's
    permutation-invariant Hamming distance over ``C``), in ``[0, 1)``; ``"vi"``: the variation
    of information ``H(A|B) + H(B|A)`` in bits."""
    a, b = _singletons(a), _singletons(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"Two label vectors of one shape expected; got {a.shape}, {b.shape}.")
    n = len(a)
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
    np.add.at(table, (a, b), 1)
    if method == "hamming":
        from scipy.optimize import linear_sum_assignment  # here: a 0.5 s import

        rows, cols = linear_sum_assignment(-table)
        return float(1.0 - table[rows, cols].sum() / n)
    if method == "vi":
        p = table / n
        pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        nz = p > 0
        return max(0.0, float(-np.sum(p[nz] * (np.log2((p / pa)[nz]) + np.log2((p / pb)[nz])))))
    raise ValueError(f"method must be 'hamming' or 'vi'; got {method!r}.")


def distance_matrix(labels: Sequence[np.ndarray], *, method: str = "hamming") -> np.ndarray:
    """``[S, S]`` pairwise :func:`partition_distance` of ``S`` label vectors."""
    S = len(labels)
    D = np.zeros((S, S))
    for i in range(S):
        for j in range(i):
            D[i, j] = D[j, i] = partition_distance(labels[i], labels[j], method=method)
    return D


# -- a run's firings and the ensemble over seeds ---------------------------------------------
def firings(run, *, seed: int, n_batches: int, batch_size: int, threshold: float,
            max_examples: int, report: Callable[[int, int, float], None] | None = None
            ) -> np.ndarray:
    """``[N, C_total]`` bool: CI (lower) ``> threshold`` on ``n_batches`` batches of the run's
    data (batch ``i`` from the harvest's key ``fold_in(batch_key(seed, i), 0)``); a batch of
    more than ``max_examples / n_batches`` examples (tokens) keeps that many, uniformly."""
    d, params, target_params = run.decomposition, run.params, run.target_params
    sample = harvest_lib.sampler(run, batch_size)
    rows = max(1, max_examples // n_batches)

    @jax.jit
    def fire(key):
        _, site_inputs = d.clean_forward(target_params, sample(jax.random.fold_in(key, 0)))
        ci = d.causal_importance(params, site_inputs)
        g = jnp.concatenate([ci[s].lower.astype(jnp.float32) for s in d.site_names], axis=-1)
        g = g.reshape(-1, g.shape[-1]) > threshold
        if g.shape[0] > rows:
            g = g[jax.random.choice(jax.random.fold_in(key, 2), g.shape[0], (rows,), False)]
        return g

    # the state is the tuple of the batches' firings so far (accumulate's loop and progress)
    parts = streaming.accumulate(lambda state, i, key: state + (fire(key),), (), seed=seed,
                                 n_batches=n_batches, report=report)
    return np.concatenate([np.asarray(x) for x in parts])


def _labels_at(history: MergeHistory, iterations: Sequence[int]) -> list[np.ndarray]:
    """:meth:`MergeHistory.labels` at several (sorted) iterations in one replay."""
    group, out, t = np.arange(len(history.names)), [], 0
    for target in iterations:
        for i, j in history.pairs[t:target]:
            group[group == j] = i
        t = target
        lab = np.full(len(group), -1, np.int64)
        lab[history.live] = np.searchsorted(np.unique(group[history.live]), group[history.live])
        out.append(lab)
    return out


@dataclasses.dataclass(eq=False)
class Clustering:
    """An ensemble of clusterings, one :class:`MergeHistory` per data seed, read at
    ``iteration`` merges (None: each seed's own MDL minimum). One ``iteration`` is applied to
    every seed (each seed then has its live count minus ``iteration`` clusters: comparable
    counts, not each seed's own best); it must be at most the smallest seed's number of
    merges."""

    histories: dict[int, MergeHistory]
    iteration: int | None = None

    @property
    def seeds(self) -> list[int]:
        return list(self.histories)

    def labels(self) -> list[np.ndarray]:
        """Per seed, the ``[C]`` cluster ids at the chosen iteration."""
        return [h.labels(self.iteration) for h in self.histories.values()]

    def distances(self, method: str = "hamming") -> np.ndarray:
        """``[S, S]`` distances between the seeds' clusterings (:func:`partition_distance`)."""
        return distance_matrix(self.labels(), method=method)

    def distance_curve(self, points: int = 30) -> tuple[np.ndarray, np.ndarray]:
        """``(iterations, mean pairwise Hamming distance)`` with every seed read at the same
        iteration, at up to ``points`` iterations (empty with one seed)."""
        T = min(h.n_iters for h in self.histories.values())
        its = np.unique(np.linspace(0, T, min(points, T + 1)).astype(int))
        if len(self.histories) < 2:
            return its[:0], np.zeros(0)
        per_seed = [_labels_at(h, its) for h in self.histories.values()]
        D = [distance_matrix([p[t] for p in per_seed]) for t in range(len(its))]
        mask = ~np.eye(len(per_seed), dtype=bool)
        return its, np.array([d[mask].mean() for d in D])

    def summary(self) -> dict:
        """JSON-able: settings, per seed the chosen iteration, cluster count and clusters, the
        distance matrices between seeds and their mean / max."""
        seeds = {}
        for s, h in self.histories.items():
            t = h.resolve(self.iteration)
            sizes = np.bincount(h.labels(t)[h.live])
            seeds[str(s)] = {
                "examples": h.n, "live": int(h.live.sum()), "iteration": t,
                "best_iteration": h.best_iteration, "clusters": h.k(t),
                "multi_member_clusters": int(np.sum(sizes > 1)),
                "largest_cluster": int(sizes.max(initial=0)),
                "mdl_bits_start": float(h.mdl[0]), "mdl_bits": float(h.mdl[t]),
                "members": [c for c in h.clusters(t) if len(c) > 1]}
        out = {"settings": next(iter(self.histories.values())).meta,
               "iteration": self.iteration, "seed_list": self.seeds, "seeds": seeds}
        mask = ~np.eye(len(seeds), dtype=bool)
        for method in ("hamming", "vi"):
            D = self.distances(method)
            out[f"distance_{method}"] = D.tolist()
            out[f"distance_{method}_mean"] = float(D[mask].mean()) if mask.any() else 0.0
            out[f"distance_{method}_max"] = float(D[mask].max()) if mask.any() else 0.0
        its, curve = self.distance_curve()
        out["distance_curve"] = {"iterations": its.tolist(), "hamming_mean": curve.tolist()}
        return out

    def save(self, out_dir: str | pathlib.Path) -> pathlib.Path:
        """Writes ``clustering.json`` (:meth:`summary`) next to the seeds' histories."""
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1))
        return out_dir


def settings(spec: harvest_lib.HarvestSpec, *, seed: int, n_batches: int, batch_size: int,
             max_examples: int, alpha: float, pair_threshold: float, step) -> dict:
    """What a saved seed must have been made with to be reused."""
    return {"tool": "clustering", "seed": seed, "batches": n_batches, "batch_size": batch_size,
            "max_examples": max_examples, "threshold": spec.threshold, "alpha": alpha,
            "pair_threshold": pair_threshold, "sites": list(spec.sites),
            "sizes": list(spec.sizes), "step": step}


def _seed_file(out_dir: pathlib.Path, seed: int) -> pathlib.Path:
    return out_dir / f"seed_{seed}.npz"


def cluster(run, *, seeds: Sequence[int] = (0, 1, 2), n_batches: int = 10,
            batch_size: int = 256, alpha: float = 1.0, threshold: float | None = None,
            max_examples: int = 16384, pair_threshold: float = 0.0,
            iteration: int | None = None, out_dir: str | pathlib.Path | None = None,
            resume: bool = True,
            progress: Callable[[int], Callable[[int, int, float], None] | None] | None = None,
            log: Callable[[str], None] | None = None) -> Clustering:
    """Clusters a loaded run's subcomponents (:func:`spdjax.load`) once per data seed.

    Per seed: the firings (CI > ``threshold``, default the run's ``l0_threshold``) on
    ``n_batches`` batches of ``batch_size`` (:func:`firings`), then :func:`merge`. With
    ``out_dir`` each finished seed is saved (``seed_<s>.npz``) and, with ``resume``, a seed
    saved with the same settings is read back instead of recomputed; ``clustering.json`` is
    written at the end, listing the seeds (``seed_list``: what :func:`load_clustering` reads).
    Without ``resume`` the ``seed_<s>.npz`` files already in ``out_dir`` are deleted first,
    so no stale seed is mixed in. ``iteration``: one merge count for every seed (None: each
    seed's MDL minimum; :class:`Clustering`). ``progress(seed)`` gives the per-batch callback
    of that seed's pass (called only for seeds that are computed); ``log(line)`` hears what
    happened per seed."""
    log = log or (lambda line: None)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: give at least one data seed, e.g. seeds=(0, 1, 2).")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds) or len(
            set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints; got {seeds!r}.")
    for name, v in (("n_batches", n_batches), ("batch_size", batch_size),
                    ("max_examples", max_examples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}.")
    alpha = check_alpha(alpha)
    spec = harvest_lib.spec_for(run, threshold=threshold, batch_size=batch_size)
    names = [f"{s}:{c}" for s, n in zip(spec.sites, spec.sizes) for c in range(n)]
    out_dir = pathlib.Path(out_dir) if out_dir is not None else None
    if out_dir is not None and not resume:
        for stale in out_dir.glob("seed_*.npz"):
            stale.unlink()
    histories = {}
    for seed in seeds:
        meta = settings(spec, seed=int(seed), n_batches=n_batches, batch_size=batch_size,
                        max_examples=max_examples, alpha=alpha, pair_threshold=pair_threshold,
                        step=getattr(run, "step", None))
        path = _seed_file(out_dir, seed) if out_dir is not None else None
        if resume and path is not None and path.exists():
            streaming.check_resumable(streaming.read_meta(path), meta, path)
            histories[int(seed)] = load_history(path)
            log(f"seed {seed}: finished earlier, read from {path}")
            continue
        t0 = time.perf_counter()
        fires = firings(run, seed=int(seed), n_batches=n_batches, batch_size=batch_size,
                        threshold=spec.threshold, max_examples=max_examples,
                        report=progress(seed) if progress is not None else None)
        h = merge(fires, names, alpha=alpha, pair_threshold=pair_threshold, seed=int(seed),
                  meta=meta)
        if path is not None:
            h.save(path)
        histories[int(seed)] = h
        log(f"seed {seed}: {h.n} examples, {int(h.live.sum())} of {len(names)} subcomponents "
            f"fired; {h.k()} clusters at the MDL minimum (iteration {h.best_iteration}); "
            f"{time.perf_counter() - t0:.1f} s")
    result = Clustering(histories, iteration)
    result.labels()  # a bad iteration fails here, before anything is written
    if out_dir is not None:
        result.save(out_dir)
    return result


def load_clustering(path: str | pathlib.Path, iteration: int | None = None) -> Clustering:
    """A saved :class:`Clustering`: ``path`` is a run's workdir (reads
    ``analysis/clustering/``) or that directory; the seeds its ``clustering.json`` lists
    (other ``seed_<s>.npz`` there, e.g. from an earlier call with more seeds, are not read)."""
    path = pathlib.Path(path)
    for d in (path / "analysis" / "clustering", path):
        if (d / SUMMARY_FILE).is_file():
            break
    else:
        raise FileNotFoundError(f"No clustering in {path} (no {SUMMARY_FILE}): run `python -m "
                                f"spdjax.cluster --workdir={path}` first, or again if it was "
                                "interrupted.")
    summary = json.loads((d / SUMMARY_FILE).read_text())
    seeds = summary.get("seed_list", [int(s) for s in summary["seeds"]])
    missing = [s for s in seeds if not _seed_file(d, s).is_file()]
    if missing:
        raise FileNotFoundError(f"{d / SUMMARY_FILE} lists seeds {missing} whose seed_<s>.npz "
                                "is missing: run the clustering again.")
    return Clustering({int(s): load_history(_seed_file(d, s)) for s in seeds}, iteration)
