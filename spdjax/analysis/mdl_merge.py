"""Greedy agglomerative merging of subcomponents under a minimum-description-length (MDL)
cost on their binary firings: the engine of :mod:`spdjax.analysis.clustering`.

The method is the PyTorch reference's (goodfire-ai/spd, ``spd/clustering``: the merge cost of
``compute_costs.compute_merge_costs``, the iteration of ``merge.merge_iteration`` and its
"range" merge-pair sampler), written here from its equations.

**Description length.** A grouping of the live subcomponents into ``k`` groups ``g`` (group
``g`` fires on an example when any member fires; ``s_g`` its firing frequency, ``r_g`` its rank,
the member count for rank-one subcomponents) describes an example with, per firing group, its
index (``log2 k`` bits) and its weights (``alpha r_g``)::

    L = sum_g s_g (log2 k + alpha r_g)            (bits per example)

Merging groups ``i`` and ``j`` (union frequency ``s_ij = s_i + s_j - co_ij``, ``co_ij`` the
frequency of both firing) changes it by exactly::

    dL = (S - s_i - s_j) log2((k-1)/k) + s_ij log2(k-1) - (s_i + s_j) log2 k
         + alpha (s_ij (r_i + r_j) - s_i r_i - s_j r_j),        S = sum_g s_g

(the other groups' indices get shorter; the pair sends one index where it sent up to two, and
the union sends both groups' weights whenever either fires). ``alpha`` weighs the weights' bits
against the indices': larger ``alpha`` keeps groups apart that do not fire together.

**Merging.** From the singletons (subcomponents that never fired in the sample are left out,
"dead"), each iteration merges the pair of smallest ``dL`` (``pair_threshold > 0``: the
reference's range sampler, a pair drawn uniformly among those within ``pair_threshold`` of the
cost range above the minimum) until one group is left. The union's co-activations with the
other groups need the examples, not just pairwise counts (``|(A or B) and C|`` needs the triple
counts), so the merge runs on a bounded sample of the binary firings ``[N, C]`` (at most
``max_examples`` rows) rather than on the harvest's co-occurrence matrix. The merge is one
``lax.scan`` with fixed shapes (a group lives in the column of its smallest member). The
**merge history** keeps, per iteration, the merged pair (by smallest members), its cost and
``L`` after it; the clustering at iteration ``t`` is the singletons after ``t`` merges. The
chosen iteration is, by default, the one of smallest ``L`` (the MDL stopping point).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import streaming

Array = jax.Array
COOC_MAX_C = 2048  # a history keeps the sample's co-occurrence matrix up to this C (figure)


# -- the cost --------------------------------------------------------------------------------
def description_length(s: Array, ranks: Array, alive: Array, alpha: float) -> Array:
    """``L = sum_g s_g (log2 k + alpha r_g)`` over the ``alive`` groups (``s``, ``ranks``,
    ``alive``: ``[C]``; ``k`` = number alive). Bits per example."""
    k = jnp.sum(alive).astype(jnp.float32)
    return jnp.sum(jnp.where(alive, s * (jnp.log2(k) + alpha * ranks), 0.0))


def merge_costs(co: Array, ranks: Array, alive: Array, alpha: float) -> Array:
    """``[C, C]``: the change ``dL`` of :func:`description_length` when groups ``i`` and ``j``
    merge (module docstring). ``co``: ``[C, C]`` co-firing frequencies (diagonal: ``s``);
    entries of dead groups and the diagonal are meaningless (mask them)."""
    s = jnp.diagonal(co)
    k = jnp.sum(alive).astype(jnp.float32)
    S = jnp.sum(jnp.where(alive, s, 0.0))
    si, sj = s[:, None], s[None, :]
    ri, rj = ranks[:, None], ranks[None, :]
    union = si + sj - co
    return ((S - si - sj) * jnp.log2((k - 1) / k) + union * jnp.log2(k - 1)
            - (si + sj) * jnp.log2(k)
            + alpha * (union * (ri + rj) - si * ri - sj * rj))


def _merge_scan(A: Array, key: Array, *, alpha: float, pair_threshold: float, n_iters: int):
    """The merge on firings ``A`` ``[N, C]`` (0/1 float32): ``(pairs [T, 2], costs [T],
    L [T])`` with ``L`` after each merge. Pure; jit with static options."""
    N, C = A.shape
    co = jnp.einsum("nc,nd->cd", A, A)  # exact counts while N < 2**24
    idx = jnp.arange(C)
    upper = idx[:, None] < idx[None, :]

    def step(state, k_t):
        A, co, ranks, alive = state
        cost = merge_costs(co / N, ranks, alive, alpha)
        valid = upper & alive[:, None] & alive[None, :]
        lo = jnp.min(jnp.where(valid, cost, jnp.inf))
        if pair_threshold > 0:
            hi = jnp.max(jnp.where(valid, cost, -jnp.inf))
            near = valid & (cost <= lo + pair_threshold * (hi - lo))
            flat = jax.random.categorical(k_t, jnp.where(near, 0.0, -jnp.inf).ravel())
        else:
            flat = jnp.argmin(jnp.where(valid, cost, jnp.inf).ravel())
        i, j = flat // C, flat % C
        a = jnp.maximum(A[:, i], A[:, j])
        A = A.at[:, i].set(a).at[:, j].set(0.0)
        row = a @ A  # the union's co-firing counts (row[i] its count, row[j] 0)
        co = co.at[i, :].set(row).at[:, i].set(row).at[j, :].set(0.0).at[:, j].set(0.0)
        ranks = ranks.at[i].add(ranks[j]).at[j].set(0.0)
        alive = alive.at[j].set(False)
        L = description_length(jnp.diagonal(co) / N, ranks, alive, alpha)
        return (A, co, ranks, alive), (jnp.stack([i, j]), cost[i, j], L)

    init = (A, co, jnp.ones((C,), jnp.float32), jnp.ones((C,), bool))
    L0 = description_length(jnp.diagonal(co) / N, init[2], init[3], alpha)
    _, (pairs, costs, L) = jax.lax.scan(step, init, jax.random.split(key, n_iters))
    return pairs, costs, jnp.concatenate([L0[None], L])


_merge_jit = jax.jit(_merge_scan, static_argnames=("alpha", "pair_threshold", "n_iters"))


# -- the merge history -----------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class MergeHistory:
    """One clustering's merges. ``names``: every subcomponent (``"site:c"``, all sites in the
    decomposition's order); ``live`` ``[C]``: fired in the sample (dead ones are never merged);
    ``pairs`` ``[T, 2]``: the groups merged at each iteration, by their smallest members'
    global indices; ``costs`` ``[T]``: their ``dL``; ``mdl`` ``[T + 1]``: ``L`` after ``t``
    merges (bits per example); ``n``: examples in the sample."""

    names: tuple[str, ...]
    live: np.ndarray
    pairs: np.ndarray
    costs: np.ndarray
    mdl: np.ndarray
    n: int
    meta: dict = dataclasses.field(default_factory=dict)
    cooc: np.ndarray | None = None  # the sample's co-firing counts [C, C], when C <= COOC_MAX_C

    @property
    def n_iters(self) -> int:
        return len(self.costs)

    @property
    def best_iteration(self) -> int:
        """The iteration of smallest description length (0: no merge pays)."""
        return int(np.argmin(self.mdl))

    def k(self, iteration: int | None = None) -> int:
        """Live groups after ``iteration`` merges (default: the best)."""
        return int(self.live.sum()) - self.resolve(iteration)

    def resolve(self, iteration: int | None) -> int:
        """``iteration`` checked against the history; None: :attr:`best_iteration`."""
        t = self.best_iteration if iteration is None else int(iteration)
        if not 0 <= t <= self.n_iters:
            raise ValueError(f"iteration must be in [0, {self.n_iters}] (the merges this history "
                             f"holds), or None for the MDL minimum; got {iteration!r}.")
        return t

    def labels(self, iteration: int | None = None) -> np.ndarray:
        """``[C]`` cluster ids after ``iteration`` merges (default: the best): live
        subcomponents ``0 .. k-1`` in the order of their clusters' smallest members, dead -1."""
        group = np.arange(len(self.names))
        for i, j in self.pairs[:self.resolve(iteration)]:
            group[group == j] = i
        out = np.full(len(self.names), -1, np.int64)
        roots = np.unique(group[self.live])
        out[self.live] = np.searchsorted(roots, group[self.live])
        return out

    def clusters(self, iteration: int | None = None) -> list[list[str]]:
        """The clusters (names) after ``iteration`` merges, largest first."""
        lab = self.labels(iteration)
        groups = [[self.names[c] for c in np.flatnonzero(lab == g)] for g in range(lab.max() + 1)]
        return sorted(groups, key=len, reverse=True)

    def state(self) -> dict:
        out = {"live": self.live, "pairs": self.pairs, "costs": self.costs, "mdl": self.mdl}
        return out if self.cooc is None else dict(out, cooc=self.cooc)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """One ``.npz`` (atomic) with the settings in its header."""
        meta = dict(self.meta, names=list(self.names), n=self.n, has_cooc=self.cooc is not None)
        return streaming.save_state(path, self.state(), meta)


def load_history(path: str | pathlib.Path) -> MergeHistory:
    """A :class:`MergeHistory` saved by :meth:`MergeHistory.save`."""
    meta = streaming.read_meta(path)
    C, T = len(meta["names"]), int(meta["n_iters"])
    template = {"live": np.zeros(C, bool), "pairs": np.zeros((T, 2), np.int64),
                "costs": np.zeros(T, np.float32), "mdl": np.zeros(T + 1, np.float32)}
    if meta.get("has_cooc"):
        template["cooc"] = np.zeros((C, C), np.int32)
    state, _ = streaming.load_state(path, template)
    names, n = tuple(meta.pop("names")), int(meta.pop("n"))
    meta.pop("has_cooc", None)
    return MergeHistory(names, state["live"], state["pairs"], state["costs"], state["mdl"], n,
                        meta, state.get("cooc"))


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0 (the weight of a group's rank "
                         f"bits against its index bits; the reference uses 1); got {alpha!r}.")
    return float(alpha)


def merge(fires, names: Sequence[str] | None = None, *, alpha: float = 1.0,
          pair_threshold: float = 0.0, seed: int = 0, meta: dict | None = None) -> MergeHistory:
    """Merges the subcomponents of a binary firing matrix ``fires`` ``[N, C]`` to one group
    (module docstring); ``pair_threshold`` 0 is the greedy merge, ``> 0`` the reference's range
    sampler with draws from ``seed``."""
    alpha = check_alpha(alpha)
    if not 0.0 <= pair_threshold <= 1.0:
        raise ValueError(f"pair_threshold must be in [0, 1] (0: always the cheapest pair); got "
                         f"{pair_threshold!r}.")
    fires = np.asarray(fires).astype(bool)
    if fires.ndim != 2 or fires.shape[0] == 0:
        raise ValueError(f"fires must be [examples, C] with examples > 0; got {fires.shape}.")
    N, C = fires.shape
    if N >= 2 ** 24:
        raise ValueError(f"{N} examples: float32 counts are exact below 2**24; sample fewer.")
    names = tuple(names) if names is not None else tuple(str(c) for c in range(C))
    if len(names) != C:
        raise ValueError(f"{len(names)} names for {C} subcomponents.")
    live = fires.any(axis=0)
    cols = np.flatnonzero(live)
    T = max(len(cols) - 1, 0)
    if T:
        p, costs, L = _merge_jit(jnp.asarray(fires[:, cols], jnp.float32), jax.random.key(seed),
                          alpha=alpha, pair_threshold=float(pair_threshold), n_iters=T)
        pairs, costs, L = cols[np.asarray(p)], np.asarray(costs), np.asarray(L)
    else:
        s = fires[:, cols].mean(0).astype(np.float32)
        pairs, costs = np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
        L = np.asarray([description_length(s, np.ones_like(s), np.ones(len(s), bool), alpha)
                        ]).astype(np.float32) if len(cols) else np.zeros(1, np.float32)
    co = fires.T.astype(np.int32) @ fires.astype(np.int32) if C <= COOC_MAX_C else None
    meta = dict(meta or {}, alpha=alpha, pair_threshold=float(pair_threshold), n_iters=T)
    return MergeHistory(names, live, pairs.astype(np.int64), costs.astype(np.float32),
                        L.astype(np.float32), N, meta, co)
