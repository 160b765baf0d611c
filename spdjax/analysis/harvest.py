"""Harvest: what every subcomponent does over a dataset, in one streaming pass (the later
reference's ``harvest`` stage, goodfire-ai/param-decomp ``param_decomp_lab/harvest``).

For each subcomponent (all sites' subcomponents in one list, site by site in the
decomposition's order; ``"site:c"`` names one) over ``n_batches`` batches of the run's data:

* **firing**: a subcomponent fires on an example (a toy's input vector, or a token position
  of a sequence model) when its CI (lower) is above ``threshold``: by default the run's
  ``l0_threshold`` (0.1 unless changed), the threshold of the CI-L0 the run logged and of the
  suite's L0, so "fires" here is "counted in L0" there. ``count``, ``density = count / n``
  and ``mean_ci`` (the mean CI over all examples);
* **co-occurrence**: ``cooc[i, j]`` = examples on which ``i`` and ``j`` both fire (every site
  against every site; the diagonal is ``count``); computed ``block`` rows at a time so a
  batch's extra memory is ``block x C_total`` whatever the total ``C_total``;
* **input and output "tokens"**, with precision ``P(token | fires)``, recall ``P(fires |
  token)`` and PMI ``log P(fires, token) / (P(fires) P(token))`` (natural log; -inf where they
  never meet):

  - sequence models (integer ids): the input token is the token at the position; the output
    token is the target model's top prediction there (argmax of its logits);
  - toys (float feature vectors): the input "tokens" of an example are its active features
    (``x_i != 0``; several per example, so precision summed over tokens may exceed 1); the
    output token is the output coordinate of largest magnitude, ``argmax_j |f(x)_j|`` of the
    target;
* **examples**: for each subcomponent, ``examples`` firings drawn uniformly at random from all
  its firings in the pass (reservoir sampling by random priorities: each firing gets an
  independent ``U[0, 1)`` priority from the batch's key and the ``examples`` largest are kept,
  a uniform sample without replacement that is merged batch by batch). Each keeps the batch
  and position, the CI, and for sequence models the ``window`` tokens on each side with the
  subcomponent's CI at each of them (``-1`` / NaN past the sequence's ends); for toys the
  input vector.

Library: :func:`harvest` (a loaded run in, a :class:`Harvest` out), :func:`load_harvest`.
Command: ``python -m spdjax.harvest --workdir=DIR`` (docs/guides/analysis.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import streaming

Array = jax.Array
DEFAULT_THRESHOLD = 0.1  # the config's l0_threshold default; the run's own is used when known
STATE_FILE = "state.npz"
SUMMARY_FILE = "summary.json"
NO_PRIORITY = -1.0  # an empty reservoir slot (real priorities are in [0, 1))


@dataclasses.dataclass(frozen=True)
class HarvestSpec:
    """The static shape of a harvest: the sites and their C, the kind of input (``"tokens"``:
    integer ids ``[B, T]``; ``"features"``: float vectors ``[B, n_in]``), the input and output
    vocabularies, and the options."""

    sites: tuple[str, ...]
    sizes: tuple[int, ...]
    kind: str
    n_in: int
    n_out: int
    threshold: float = DEFAULT_THRESHOLD
    examples: int = 10
    window: int = 8
    block: int = 1024

    def __post_init__(self):
        if self.kind not in ("tokens", "features"):
            raise ValueError(f"kind must be 'tokens' or 'features'; got {self.kind!r}.")
        for name, v in (("examples", self.examples), ("block", self.block)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}.")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0; got {self.window!r}.")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1): CI is at most 1; got "
                             f"{self.threshold!r}.")

    @property
    def C(self) -> int:
        return int(sum(self.sizes))

    def offsets(self) -> dict[str, int]:
        out, o = {}, 0
        for s, c in zip(self.sites, self.sizes):
            out[s], o = o, o + c
        return out


def init_state(spec: HarvestSpec) -> dict:
    """The empty accumulators (``int32`` counts, ``float32`` sums)."""
    C, K = spec.C, spec.examples
    i32, f32 = jnp.int32, jnp.float32
    state = {
        "n": jnp.zeros((), i32), "count": jnp.zeros((C,), i32), "ci_sum": jnp.zeros((C,), f32),
        "cooc": jnp.zeros((C, C), i32),
        "in_count": jnp.zeros((spec.n_in,), i32), "in_fire": jnp.zeros((C, spec.n_in), i32),
        "out_count": jnp.zeros((spec.n_out,), i32), "out_fire": jnp.zeros((C, spec.n_out), i32),
        "ex_priority": jnp.full((C, K), NO_PRIORITY, f32), "ex_ci": jnp.zeros((C, K), f32),
        "ex_batch": jnp.full((C, K), -1, i32), "ex_pos": jnp.full((C, K), -1, i32),
    }
    if spec.kind == "tokens":
        w = 2 * spec.window + 1
        state["ex_tokens"] = jnp.full((C, K, w), -1, i32)
        state["ex_window_ci"] = jnp.full((C, K, w), jnp.nan, f32)
    else:
        state["ex_inputs"] = jnp.zeros((C, K, spec.n_in), f32)
    return state


def cooccurrence(fires: Array, block: int) -> Array:
    """``fires.T @ fires`` as int32 counts (``fires`` ``[N, C]`` bool), ``block`` rows at a
    time (the float32 products are exact while ``N < 2**24``)."""
    f = fires.astype(jnp.float32)
    C = f.shape[1]
    if block >= C:
        return jnp.einsum("nc,nd->cd", f, f).astype(jnp.int32)
    rows = [jnp.einsum("nc,nd->cd", f[:, i:i + block], f).astype(jnp.int32)
            for i in range(0, C, block)]
    return jnp.concatenate(rows, axis=0)


def observe(spec: HarvestSpec, state: dict, ci: Array, inputs: Array, out_tokens: Array,
            key: Array, batch_index: Array | int) -> dict:
    """``state`` after one batch (pure; jit it).

    ``ci``: every site's CI concatenated, ``[B, T, C]`` (tokens) or ``[B, C]`` (features);
    ``inputs``: ids ``[B, T]`` or features ``[B, n_in]``; ``out_tokens``: the output token per
    example, ``[B, T]`` or ``[B]``; ``key``: the batch's reservoir key."""
    lead = ci.shape[:-1]
    N, C = int(np.prod(lead)), spec.C
    if N >= 2 ** 24:
        raise ValueError(f"A batch of {N} examples/tokens is too large for exact float32 counts "
                         "(< 2**24): use smaller batches.")
    g = ci.reshape(N, C).astype(jnp.float32)
    fires = g > spec.threshold
    fi = fires.astype(jnp.int32)
    out = dict(state)
    out["n"] = state["n"] + N
    out["count"] = state["count"] + fi.sum(0)
    out["ci_sum"] = state["ci_sum"] + g.sum(0)
    out["cooc"] = state["cooc"] + cooccurrence(fires, spec.block)
    otok = out_tokens.reshape(N)
    out["out_count"] = state["out_count"] + jnp.bincount(otok, length=spec.n_out).astype(
        jnp.int32)
    out["out_fire"] = state["out_fire"] + jax.ops.segment_sum(fi, otok, spec.n_out).T
    if spec.kind == "tokens":
        itok = inputs.reshape(N)
        out["in_count"] = state["in_count"] + jnp.bincount(itok, length=spec.n_in).astype(
            jnp.int32)
        out["in_fire"] = state["in_fire"] + jax.ops.segment_sum(fi, itok, spec.n_in).T
    else:
        present = (inputs != 0).astype(jnp.float32)
        out["in_count"] = state["in_count"] + present.sum(0).astype(jnp.int32)
        out["in_fire"] = state["in_fire"] + jnp.einsum(
            "nc,ni->ci", fires.astype(jnp.float32), present).astype(jnp.int32)
    out.update(_reservoir(spec, state, g, fires, inputs, key, batch_index))
    return out


def _reservoir(spec: HarvestSpec, state: dict, g: Array, fires: Array, inputs: Array,
               key: Array, batch_index) -> dict:
    """The reservoirs merged with this batch's firings: every firing gets a ``U[0, 1)``
    priority, each subcomponent keeps its ``examples`` largest among old and new."""
    N, C = g.shape
    K = min(spec.examples, N)
    u = jax.random.uniform(key, (N, C))
    pri = jnp.where(fires, u, NO_PRIORITY).T  # [C, N]
    new_p, idx = jax.lax.top_k(pri, K)  # [C, K] positions in the flattened batch
    comp = jnp.arange(C)[:, None]
    new = {"ex_priority": new_p, "ex_ci": g[idx, comp],
           "ex_batch": jnp.full(idx.shape, batch_index, jnp.int32),
           "ex_pos": idx.astype(jnp.int32)}
    if spec.kind == "tokens":
        B, T = inputs.shape
        w = spec.window
        b, t = idx // T, idx % T
        offs = t[..., None] + jnp.arange(-w, w + 1)  # [C, K, 2w+1]
        inside = (offs >= 0) & (offs < T)
        safe = jnp.clip(offs, 0, T - 1)
        bb = jnp.broadcast_to(b[..., None], safe.shape)
        new["ex_tokens"] = jnp.where(inside, inputs[bb, safe], -1).astype(jnp.int32)
        g3 = g.reshape(B, T, C)
        cc = jnp.broadcast_to(comp[..., None], safe.shape)
        new["ex_window_ci"] = jnp.where(inside, g3[bb, safe, cc], jnp.nan)
    else:
        new["ex_inputs"] = inputs.astype(jnp.float32)[idx]
    pri_all = jnp.concatenate([state["ex_priority"], new["ex_priority"]], axis=1)
    keep_p, keep = jax.lax.top_k(pri_all, spec.examples)
    merged = {"ex_priority": keep_p}
    for name, v in new.items():
        if name == "ex_priority":
            continue
        both = jnp.concatenate([state[name], v.astype(state[name].dtype)], axis=1)
        sel = keep.reshape(keep.shape + (1,) * (both.ndim - 2))
        merged[name] = jnp.take_along_axis(both, sel, axis=1)
    return merged


# -- the pass over a run's data -------------------------------------------------------------
def sampler(run, batch_size: int) -> Callable[[Array], Any]:
    """``key -> batch`` of ``batch_size`` from the run's data distribution (the experiment's
    ``sample(key, batch_size)`` if it has one, else its family's ``sample``)."""
    experiment = run.experiment
    if hasattr(experiment, "sample"):
        return lambda key: experiment.sample(key, batch_size)
    return lambda key: experiment.family.sample(experiment.model_config, key, batch_size)


def spec_for(run, *, threshold: float | None = None, examples: int = 10, window: int = 8,
             block: int = 1024, batch_size: int = 64) -> HarvestSpec:
    """The :class:`HarvestSpec` of a loaded run (its sites, its data's kind and vocabularies,
    read off one batch's shapes)."""
    d = run.decomposition
    if d.causal_importance is None:
        raise ValueError("This decomposition has no CI function (APD): a harvest counts CI "
                         "firings; harvest an SPD or VPD run.")
    if threshold is None:
        threshold = float(run.config.get("l0_threshold", DEFAULT_THRESHOLD)) \
            if getattr(run, "config", None) is not None else DEFAULT_THRESHOLD
    batch = jax.eval_shape(sampler(run, batch_size), jax.random.key(0))
    if not isinstance(batch, jax.ShapeDtypeStruct):
        raise ValueError("harvest reads batches that are one array (token ids or feature "
                         f"vectors); this run's batches are {type(batch).__name__}.")
    out = jax.eval_shape(lambda x: d.target.forward(run.target_params, x, {})[0],
                         batch)
    tokens = jnp.issubdtype(batch.dtype, jnp.integer)
    if tokens:
        embeds = [s for s in d.target.sites.values()
                  if s.kind == "embed" and s.d_in == out.shape[-1]]
        n_in = embeds[0].d_in if embeds else out.shape[-1]
    else:
        n_in = batch.shape[-1]
    return HarvestSpec(sites=tuple(d.site_names), sizes=tuple(int(d.C[s]) for s in d.site_names),
                       kind="tokens" if tokens else "features", n_in=int(n_in),
                       n_out=int(out.shape[-1]), threshold=float(threshold), examples=examples,
                       window=window, block=block)


def make_update(run, spec: HarvestSpec, batch_size: int) -> Callable[[dict, int, Array], dict]:
    """``(state, i, key) -> state``: batch ``i`` (data from ``fold_in(key, 0)``, reservoir
    priorities from ``fold_in(key, 1)``) observed; the per-batch work is one jitted call."""
    d, params, target_params = run.decomposition, run.params, run.target_params
    sample = sampler(run, batch_size)

    @jax.jit
    def step(state, i, key):
        batch = sample(jax.random.fold_in(key, 0))
        out, site_inputs = d.clean_forward(target_params, batch)
        ci = d.causal_importance(params, site_inputs)
        g = jnp.concatenate([ci[s].lower.astype(jnp.float32) for s in spec.sites], axis=-1)
        if spec.kind == "tokens":
            out_tok = jnp.argmax(out, axis=-1)
        else:
            out_tok = jnp.argmax(jnp.abs(out), axis=-1)
        return observe(spec, state, g, batch, out_tok.astype(jnp.int32),
                       jax.random.fold_in(key, 1), i)

    return lambda state, i, key: step(state, jnp.int32(i), key)


def settings(spec: HarvestSpec, *, seed: int, batch_size: int, step: int | None) -> dict:
    """The settings a saved state must match to be resumed."""
    return {"tool": "harvest", "threshold": spec.threshold, "examples": spec.examples,
            "window": spec.window, "sites": list(spec.sites), "sizes": list(spec.sizes),
            "kind": spec.kind, "seed": seed, "batch_size": batch_size, "step": step}


def harvest(run, *, n_batches: int = 100, batch_size: int = 64, seed: int = 0,
            threshold: float | None = None, examples: int = 10, window: int = 8,
            block: int = 1024, out_dir: str | pathlib.Path | None = None, save_every: int = 0,
            resume: bool = True, report: Callable[[int, int, float], None] | None = None
            ) -> "Harvest":
    """Harvests a loaded run (:func:`spdjax.load`) over ``n_batches`` batches of
    ``batch_size`` from its data (batch ``i`` from ``fold_in(key(seed), i)``).

    With ``out_dir`` the accumulators are saved there every ``save_every`` batches and at the
    end (``state.npz``), and a saved state made with the same settings is continued
    (``resume``); the result is then also written (:meth:`Harvest.save`)."""
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int; got {n_batches!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    spec = spec_for(run, threshold=threshold, examples=examples, window=window, block=block,
                    batch_size=batch_size)
    meta = settings(spec, seed=seed, batch_size=batch_size, step=getattr(run, "step", None))
    state, start = init_state(spec), 0
    save = None
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        path = out_dir / STATE_FILE
        if resume and path.exists():
            streaming.check_resumable(streaming.read_meta(path), meta, path)
            saved, saved_meta = streaming.load_state(path, state)
            state, start = jax.tree.map(jnp.asarray, saved), min(saved_meta["done"], n_batches)

        def save(state, done):
            streaming.save_state(path, state, dict(meta, done=done, n_batches=n_batches))

    state = streaming.accumulate(make_update(run, spec, batch_size), state, seed=seed,
                                 n_batches=n_batches, start=start, save=save,
                                 save_every=save_every, report=report)
    result = Harvest.from_state(spec, state, dict(meta, n_batches=n_batches))
    if out_dir is not None:
        result.save(out_dir)
    return result


# -- the result -----------------------------------------------------------------------------
def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


@dataclasses.dataclass(eq=False)
class Harvest:
    """A finished harvest: the accumulators (NumPy) and the settings. Subcomponents are indexed
    globally (``index("site:c")``); statistics are ``[C_total]`` or ``[C_total, tokens]``."""

    spec: HarvestSpec
    state: dict
    meta: dict

    @classmethod
    def from_state(cls, spec: HarvestSpec, state: dict, meta: dict) -> "Harvest":
        return cls(spec, {k: np.asarray(v) for k, v in state.items()}, dict(meta))

    # names
    @property
    def names(self) -> list[str]:
        return [f"{s}:{c}" for s, n in zip(self.spec.sites, self.spec.sizes) for c in range(n)]

    def index(self, name: str | tuple[str, int]) -> int:
        """The global index of ``"site:c"`` or ``(site, c)``."""
        site, c = (name.rsplit(":", 1) if isinstance(name, str) else name)
        off = self.spec.offsets()
        c = int(c)
        if site not in off or not 0 <= c < self.spec.sizes[self.spec.sites.index(site)]:
            raise ValueError(f"No subcomponent {name!r}: sites {list(self.spec.sites)} with C "
                             f"{list(self.spec.sizes)}.")
        return off[site] + c

    # statistics
    @property
    def n(self) -> int:
        return int(self.state["n"])

    @property
    def count(self) -> np.ndarray:
        return self.state["count"].astype(np.int64)

    @property
    def density(self) -> np.ndarray:
        return self.count / max(self.n, 1)

    @property
    def mean_ci(self) -> np.ndarray:
        return self.state["ci_sum"].astype(np.float64) / max(self.n, 1)

    @property
    def cooccurrence(self) -> np.ndarray:
        return self.state["cooc"].astype(np.int64)

    def token_stats(self, which: str = "input") -> dict[str, np.ndarray]:
        """``{"precision", "recall", "pmi"}``, each ``[C_total, tokens]``, for the ``"input"``
        or ``"output"`` tokens (module docstring)."""
        if which not in ("input", "output"):
            raise ValueError(f"which must be 'input' or 'output'; got {which!r}.")
        p = "in" if which == "input" else "out"
        joint = self.state[f"{p}_fire"].astype(np.float64)
        tok = self.state[f"{p}_count"].astype(np.float64)
        fire = self.count.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            pmi = np.log(joint * self.n / (fire[:, None] * tok[None, :]))
        pmi = np.where((fire[:, None] > 0) & (tok[None, :] > 0), pmi, np.nan)
        return {"precision": _div(joint, fire[:, None]), "recall": _div(joint, tok[None, :]),
                "pmi": pmi}

    def top_tokens(self, name, k: int = 5, *, which: str = "input", by: str = "pmi"
                   ) -> list[tuple[int, float]]:
        """The ``k`` tokens with the largest ``by`` (``precision``, ``recall`` or ``pmi``) for
        one subcomponent, as ``(token, value)``; tokens it never fired with are left out."""
        i = self.index(name)
        stats = self.token_stats(which)
        if by not in stats:
            raise ValueError(f"by must be one of {sorted(stats)}; got {by!r}.")
        joint = self.state["in_fire" if which == "input" else "out_fire"][i]
        v = np.where(joint > 0, stats[by][i], -np.inf)
        order = [int(t) for t in np.argsort(-v, kind="stable")[:k] if joint[t] > 0]
        return [(t, float(stats[by][i, t])) for t in order]

    def best_by_recall(self, site: str, which: str = "input"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per token (a toy's feature): ``(c, recall, precision)``, the subcomponent of ``site``
        (its index within the site) that fires most often when the token is there, and that
        pair's recall and precision. For a ResidMLP, feature ``i``'s ``mlp_in`` subcomponent
        has recall and precision near 1 when the decomposition found the features."""
        if site not in self.spec.sites:
            raise ValueError(f"No site {site!r}; sites: {list(self.spec.sites)}.")
        off = self.spec.offsets()[site]
        C = self.spec.sizes[self.spec.sites.index(site)]
        stats = self.token_stats(which)
        recall, precision = stats["recall"][off:off + C], stats["precision"][off:off + C]
        best = np.argmax(recall, axis=0)
        cols = np.arange(recall.shape[1])
        return best, recall[best, cols], precision[best, cols]

    def examples(self, name) -> list[dict]:
        """The reservoir of one subcomponent: dicts with ``batch``, ``pos``, ``ci`` and
        ``tokens`` / ``window_ci`` (sequence models) or ``inputs`` (toys), in no order."""
        i = self.index(name)
        out = []
        for j in np.flatnonzero(self.state["ex_priority"][i] >= 0):
            e = {"batch": int(self.state["ex_batch"][i, j]), "pos": int(self.state["ex_pos"][i, j]),
                 "ci": float(self.state["ex_ci"][i, j])}
            if self.spec.kind == "tokens":
                e["tokens"] = self.state["ex_tokens"][i, j].tolist()
                e["window_ci"] = self.state["ex_window_ci"][i, j].tolist()
            else:
                e["inputs"] = self.state["ex_inputs"][i, j].tolist()
            out.append(e)
        return out

    def summary(self, top: int = 5) -> dict:
        """JSON-able: the settings, totals, and per subcomponent that ever fired its density,
        mean CI, top input / output tokens by PMI and its most co-occurring partners."""
        stats_in, stats_out = self.token_stats("input"), self.token_stats("output")
        names, cooc = self.names, self.cooccurrence
        comps = {}
        for i in np.flatnonzero(self.count > 0):
            partners = cooc[i].astype(np.float64) / max(self.count[i], 1)
            partners[i] = -1
            best = [int(j) for j in np.argsort(-partners, kind="stable")[:top] if cooc[i, j] > 0]

            def tops(stats, fire):
                v = np.where(fire > 0, stats["pmi"][i], -np.inf)
                return [{"token": int(t), "pmi": float(stats["pmi"][i, t]),
                         "precision": float(stats["precision"][i, t]),
                         "recall": float(stats["recall"][i, t])}
                        for t in np.argsort(-v, kind="stable")[:top] if fire[t] > 0]

            comps[names[i]] = {
                "density": float(self.density[i]), "mean_ci": float(self.mean_ci[i]),
                "input_tokens": tops(stats_in, self.state["in_fire"][i]),
                "output_tokens": tops(stats_out, self.state["out_fire"][i]),
                "cooccurs_with": [{"name": names[j], "p": float(partners[j])} for j in best]}
        return {"settings": self.meta, "n": self.n, "kind": self.spec.kind,
                "n_subcomponents": len(names), "firing": int(np.sum(self.count > 0)),
                "subcomponents": comps}

    # files
    def save(self, out_dir: str | pathlib.Path) -> pathlib.Path:
        """Writes ``harvest.npz`` (accumulators + settings) and ``summary.json`` into
        ``out_dir``; returns the directory."""
        out_dir = pathlib.Path(out_dir)
        meta = dict(self.meta, spec=dataclasses.asdict(self.spec))
        streaming.save_state(out_dir / "harvest.npz", self.state, meta)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1))
        return out_dir


def load_harvest(path: str | pathlib.Path) -> Harvest:
    """A saved :class:`Harvest`: ``path`` is a run's workdir (reads
    ``analysis/harvest/harvest.npz``), that directory, or the ``.npz`` itself."""
    path = pathlib.Path(path)
    for p in (path / "analysis" / "harvest" / "harvest.npz", path / "harvest.npz", path):
        if p.is_file():
            break
    else:
        raise FileNotFoundError(f"No harvest in {path}: run `python -m spdjax.harvest "
                                f"--workdir={path}` first.")
    meta = streaming.read_meta(p)
    fields = meta.pop("spec")
    spec = HarvestSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    state, _ = streaming.load_state(p, init_state(spec))
    return Harvest(spec, {k: np.asarray(v) for k, v in state.items()}, meta)
