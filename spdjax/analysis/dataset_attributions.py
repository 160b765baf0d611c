"""Dataset attributions: which sources drive which targets, gradient x activation summed over a
dataset (VPD's "dataset attributions", Bushnaq et al. 2026; the later reference's
``param_decomp_lab/dataset_attributions``, whose accumulation this follows).

Sources are the input tokens (sequence models: token ids; toys: the input features) and every
subcomponent; targets are every subcomponent and every output coordinate (sequence models:
the output token's logit). With all masks 1 (every subcomponent on) and the outputs of the
decomposed sites stop-gradiented at their inputs, so that only direct effects count
(:mod:`~spdjax.analysis.grad_act`), for a batch and summed over batches::

    A[t, (s, c)]  = sum_{examples n, n'} d y_t[n] / d a_s,c[n']  *  a_s,c[n']  *  g_s,c[n']
    A[t, token v] = sum_{n' : token at n' is v} d y_t[n] / d e[n'] . e[n']      (token ids)
    A[t, feat i]  = sum_{n'} d y_t[n] / d x_i[n'] * x_i[n']                       (features)

where ``n`` runs over examples / token positions, ``a_s,c = (x_s V_s,c) ||U_s,c||`` is the
activation of subcomponent ``c`` of site ``s`` and ``g_s,c`` its CI (lower): a subcomponent is
weighted by how causally important it is there. ``y_t`` is a target subcomponent's activation
``a_t`` (not CI-weighted), or the output coordinate ``f(x)_j`` (an LM's logit of token ``j``).
``e[n']`` is the token embedding at position ``n'``. Positions ``n`` are summed before the
gradient (one backward pass per target, batched with ``vmap`` in ``chunk`` targets at a time).
A source at a later site than the target has no direct path: its entries are 0.

:class:`DatasetAttributions` holds ``A``, with the number of examples ``n`` to give the mean
per example (``A / n``), and answers :meth:`~DatasetAttributions.top_sources` and
:meth:`~DatasetAttributions.top_targets`. Library: :func:`dataset_attributions`,
:func:`load_attributions`; command: ``python -m spdjax.dataset_attributions --workdir=DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import grad_act, streaming
from spdjax.analysis.harvest import sampler

Array = jax.Array
STATE_FILE = "state.npz"


@dataclasses.dataclass(frozen=True)
class AttributionSpec:
    """Static shape: sites and their C, input kind (``"tokens"`` / ``"features"``), the input
    and output widths, the embedding site for tokens, targets per vmapped chunk."""

    sites: tuple[str, ...]
    sizes: tuple[int, ...]
    kind: str
    n_in: int
    n_out: int
    embed_site: str | None = None
    chunk: int = 64

    def __post_init__(self):
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk must be a positive int; got {self.chunk!r}.")

    @property
    def target_names(self) -> list[str]:
        return [f"{s}:{c}" for s, n in zip(self.sites, self.sizes) for c in range(n)] + [
            f"output:{j}" for j in range(self.n_out)]

    @property
    def source_names(self) -> list[str]:
        return [f"input:{i}" for i in range(self.n_in)] + [
            f"{s}:{c}" for s, n in zip(self.sites, self.sizes) for c in range(n)]


def init_state(spec: AttributionSpec) -> dict:
    nt, ns = sum(spec.sizes) + spec.n_out, spec.n_in + sum(spec.sizes)
    return {"n": jnp.zeros((), jnp.int32), "attr": jnp.zeros((nt, ns), jnp.float32),
            "ci_sum": jnp.zeros((sum(spec.sizes),), jnp.float32),
            "in_count": jnp.zeros((spec.n_in,), jnp.float32)}


def batch_attributions(spec: AttributionSpec, decomposition, params, target_params,
                       batch) -> tuple[Array, Array]:
    """``(A [targets, sources] of this batch, CI [..., C_total])`` (pure; jit it)."""
    out, site_inputs = decomposition.clean_forward(target_params, batch)
    ci = decomposition.causal_importance(params, site_inputs)
    ci = {s: jax.lax.stop_gradient(ci[s].lower.astype(jnp.float32)) for s in spec.sites}
    lead = out.shape[:-1]
    masks = grad_act.unit_masks(decomposition, lead)
    scale = jnp.ones(batch.shape, jnp.float32)

    def targets(masks, scale):
        out, acts = grad_act.direct_forward(decomposition, params, target_params, batch, masks,
                                            scale, embed_site=spec.embed_site)
        axes = tuple(range(len(lead)))
        return jnp.concatenate([acts[s].sum(axes) for s in spec.sites] + [out.sum(axes)])

    y, vjp = jax.vjp(targets, masks, scale)
    n_t = y.shape[0]
    rows = []
    for start in range(0, n_t, spec.chunk):
        eye = jax.nn.one_hot(jnp.arange(start, min(start + spec.chunk, n_t)), n_t)
        g_masks, g_scale = jax.vmap(vjp)(eye)
        if spec.kind == "tokens":
            flat = g_scale.reshape(g_scale.shape[0], -1)  # [chunk, B*T]
            inputs = jax.vmap(lambda r: jax.ops.segment_sum(r, batch.reshape(-1), spec.n_in))(
                flat)
        else:
            inputs = g_scale.reshape(g_scale.shape[0], -1, spec.n_in).sum(1)
        comps = [jnp.einsum("k...c,...c->kc", g_masks[s], ci[s]) for s in spec.sites]
        rows.append(jnp.concatenate([inputs] + comps, axis=1))
    return jnp.concatenate(rows, axis=0), jnp.concatenate([ci[s] for s in spec.sites], -1)


def spec_for(run, *, batch_size: int = 16, chunk: int = 64) -> AttributionSpec:
    """The :class:`AttributionSpec` of a loaded run (read off one batch's shapes)."""
    d = run.decomposition
    if d.causal_importance is None:
        raise ValueError("This decomposition has no CI function (APD): dataset attributions "
                         "weight sources by CI; use an SPD or VPD run.")
    batch = jax.eval_shape(sampler(run, batch_size), jax.random.key(0))
    if not isinstance(batch, jax.ShapeDtypeStruct):
        raise ValueError("dataset attributions read batches that are one array (token ids or "
                         f"feature vectors); this run's batches are {type(batch).__name__}.")
    out = jax.eval_shape(lambda x: d.target.forward(run.target_params, x, {})[0], batch)
    tokens = jnp.issubdtype(batch.dtype, jnp.integer)
    embed = grad_act.token_embedding_site(d, run.target_params, batch) if tokens else None
    n_in = d.target.sites[embed].d_in if tokens else batch.shape[-1]
    return AttributionSpec(sites=tuple(d.site_names), sizes=tuple(int(d.C[s])
                                                                  for s in d.site_names),
                           kind="tokens" if tokens else "features", n_in=int(n_in),
                           n_out=int(out.shape[-1]), embed_site=embed, chunk=chunk)


def make_update(run, spec: AttributionSpec, batch_size: int):
    """``(state, i, key) -> state`` with batch ``i`` drawn from ``fold_in(key, 0)``."""
    d, params, target_params = run.decomposition, run.params, run.target_params
    sample = sampler(run, batch_size)

    @jax.jit
    def step(state, key):
        batch = sample(jax.random.fold_in(key, 0))
        attr, ci = batch_attributions(spec, d, params, target_params, batch)
        if spec.kind == "tokens":
            counts = jnp.bincount(batch.reshape(-1), length=spec.n_in).astype(jnp.float32)
        else:
            counts = (batch != 0).reshape(-1, spec.n_in).sum(0).astype(jnp.float32)
        n = int(np.prod(ci.shape[:-1]))
        return {"n": state["n"] + n, "attr": state["attr"] + attr,
                "ci_sum": state["ci_sum"] + ci.reshape(n, -1).sum(0),
                "in_count": state["in_count"] + counts}

    return lambda state, i, key: step(state, key)


def dataset_attributions(run, *, n_batches: int = 20, batch_size: int = 16, seed: int = 0,
                         chunk: int = 64, out_dir: str | pathlib.Path | None = None,
                         save_every: int = 0, resume: bool = True,
                         report: Callable[[int, int, float], None] | None = None
                         ) -> "DatasetAttributions":
    """The dataset attributions of a loaded run (:func:`spdjax.load`) over ``n_batches``
    batches of ``batch_size`` (batch ``i`` from ``fold_in(key(seed), i)``); ``out_dir``,
    ``save_every``, ``resume`` as in :func:`spdjax.analysis.harvest.harvest`."""
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int; got {n_batches!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    spec = spec_for(run, batch_size=batch_size, chunk=chunk)
    meta = {"tool": "dataset_attributions", "sites": list(spec.sites), "sizes": list(spec.sizes),
            "seed": seed, "batch_size": batch_size, "step": getattr(run, "step", None)}
    state, start, save = streaming.resume_point(
        None if out_dir is None else pathlib.Path(out_dir) / STATE_FILE, init_state(spec),
        meta, n_batches=n_batches, resume=resume)
    state = streaming.accumulate(make_update(run, spec, batch_size), state, seed=seed,
                                 n_batches=n_batches, start=start, save=save,
                                 save_every=save_every, report=report)
    result = DatasetAttributions(spec, {k: np.asarray(v) for k, v in state.items()},
                                 dict(meta, n_batches=n_batches))
    if out_dir is not None:
        result.save(out_dir)
    return result


@dataclasses.dataclass(eq=False)
class DatasetAttributions:
    """Accumulated attributions ``A [targets, sources]`` (module docstring) and the number of
    examples ``n``. Names: targets ``"site:c"`` / ``"output:j"``, sources ``"input:i"`` /
    ``"site:c"``."""

    spec: AttributionSpec
    state: dict
    meta: dict

    @property
    def n(self) -> int:
        return int(self.state["n"])

    @property
    def mean(self) -> np.ndarray:
        """``A / n``: the attribution per example (toys) or token (sequence models)."""
        return self.state["attr"].astype(np.float64) / max(self.n, 1)

    def _index(self, names: list[str], name: str, what: str) -> int:
        if name not in names:
            raise ValueError(f"No {what} {name!r}: {what}s are "
                             f"{', '.join(names[:3])}, ..., {names[-1]}.")
        return names.index(name)

    def _top(self, values: np.ndarray, names: list[str], k: int, sign: str):
        if sign not in ("abs", "positive", "negative"):
            raise ValueError(f"sign must be 'abs', 'positive' or 'negative'; got {sign!r}.")
        key = {"abs": np.abs(values), "positive": values, "negative": -values}[sign]
        order = np.argsort(-key, kind="stable")[:k]
        return [(names[i], float(values[i])) for i in order if key[i] > 0]

    def top_sources(self, target: str, k: int = 10, *, sign: str = "abs"
                    ) -> list[tuple[str, float]]:
        """The ``k`` sources with the largest mean attribution to ``target`` (``sign``:
        ``"abs"`` by magnitude, ``"positive"`` the largest positive, ``"negative"`` the most
        negative; zeros left out), as ``(name, value)``."""
        t = self._index(self.spec.target_names, target, "target")
        return self._top(self.mean[t], self.spec.source_names, k, sign)

    def top_targets(self, source: str, k: int = 10, *, sign: str = "abs"
                    ) -> list[tuple[str, float]]:
        """The ``k`` targets ``source`` attributes most to."""
        s = self._index(self.spec.source_names, source, "source")
        return self._top(self.mean[:, s], self.spec.target_names, k, sign)

    def save(self, out_dir: str | pathlib.Path) -> pathlib.Path:
        """Writes ``attributions.npz`` and ``summary.json`` (each target's top 5 sources)."""
        out_dir = pathlib.Path(out_dir)
        streaming.save_state(out_dir / "attributions.npz", self.state,
                             dict(self.meta, spec=dataclasses.asdict(self.spec)))
        tops = {t: self.top_sources(t, 5) for t in self.spec.target_names}
        (out_dir / "summary.json").write_text(json.dumps(
            {"settings": self.meta, "n": self.n, "top_sources": {
                t: [{"source": s, "mean": v} for s, v in top] for t, top in tops.items() if top}},
            indent=1))
        return out_dir


def load_attributions(path: str | pathlib.Path) -> DatasetAttributions:
    """A saved :class:`DatasetAttributions`: a run's workdir (reads
    ``analysis/dataset_attributions/attributions.npz``), that directory, or the file."""
    spec, state, meta = streaming.load_result(
        path, subdir="dataset_attributions", filename="attributions.npz",
        what="dataset attributions", command="spdjax.dataset_attributions",
        spec_type=AttributionSpec, init=init_state)
    return DatasetAttributions(spec, state, meta)
