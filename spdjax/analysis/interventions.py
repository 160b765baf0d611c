"""Interventions on one prompt: keep or ablate chosen subcomponents and read the prediction, and
optimise a sparse CI that preserves a chosen output token.

A prompt is a batch of one example (``[1, T]`` token ids for a language model, ``[1, d]`` for a
toy); a site's mask is ``[1, *P, C]`` (``P``: the position axes, none for a toy). A subcomponent
is named ``(site, index)`` or, for one position only, ``(site, index, position)``
(:class:`Subcomponent`; :func:`parse_subcomponents` reads ``"site:idx[@pos],..."``).

* :func:`masks_for` builds masks from a base (all ones, the CI, or all zeros) with a set kept at
  1 or ablated to 0;
* :func:`intervene`: the masked model's top-k predictions at chosen positions next to the
  target's, and KL(target || masked) there;
* :func:`optimize_sparse_ci`: gradient descent on mask logits (masks ``σ_lo(z)`` in [0, 1]) of
  ``CE(token) + coeff * sum σ_up(z)^p``, the CI optimisation of the later reference's app
  (goodfire-ai/spd, ``optim_cis``); returns the kept set, and KL and the token's probability
  with the optimised masks and with the set alone (kept at 1, the rest 0).

Outputs are read as logits over the last axis (softmax, KL of
:func:`spdjax.losses.divergences.kl`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.masks import SiteMask
from spdjax.losses.divergences import kl

Array = jax.Array
BASES = ("ones", "ci", "zeros")
MASK_TYPES = ("ci", "stochastic")


class Subcomponent(NamedTuple):
    """Subcomponent ``index`` of ``site``; ``position`` None: at every position."""

    site: str
    index: int
    position: int | None = None


def parse_subcomponents(text: str) -> list[Subcomponent]:
    """``"blocks_1/attn/out:3,blocks_0/attn/v:0@5"`` -> subcomponents (``@pos``: one position,
    negative counts from the end). Names are checked against a decomposition by
    :func:`check_subcomponents`."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        site, sep, rest = item.rpartition(":")
        idx, at, pos = rest.partition("@")
        try:
            index = int(idx)
            position = int(pos) if at else None
        except ValueError:
            index = None
        if not sep or not site or index is None:
            raise ValueError(f"Subcomponent {item!r} is not 'site:index' or 'site:index@position' "
                             "(e.g. 'blocks_1/attn/out:3' or 'blocks_0/attn/v:0@5').")
        out.append(Subcomponent(site, index, position))
    return out


def check_subcomponents(decomposition, subs: Iterable[Subcomponent],
                        n_positions: int | None) -> list[Subcomponent]:
    """``subs`` with negative positions resolved; a ``ValueError`` for an unknown site, an index
    outside ``[0, C)`` or a position outside the prompt."""
    out = []
    for s in subs:
        if s.site not in decomposition.site_names:
            raise ValueError(f"Unknown site {s.site!r}; the decomposed sites are "
                             f"{list(decomposition.site_names)}.")
        C = decomposition.C[s.site]
        if not 0 <= s.index < C:
            raise ValueError(f"Subcomponent index {s.index} of site {s.site!r} is outside "
                             f"[0, {C}): the site has C = {C} subcomponents.")
        pos = s.position
        if pos is not None:
            if n_positions is None:
                raise ValueError(f"Subcomponent {s.site}:{s.index}@{pos}: this model's outputs "
                                 "have no position axis; leave '@position' out.")
            if not -n_positions <= pos < n_positions:
                raise ValueError(f"Position {pos} of {s.site}:{s.index} is outside the prompt "
                                 f"of {n_positions} positions.")
            pos %= n_positions
        out.append(Subcomponent(s.site, s.index, pos))
    return out


def n_positions(ci_lower: Mapping[str, Array]) -> int | None:
    """The prompt's number of positions (one position axis ``[1, T, C]``), or None for a
    model without one (``[1, C]``); more position axes are refused."""
    g = next(iter(ci_lower.values()))
    if g.ndim == 2:
        return None
    if g.ndim != 3 or g.shape[0] != 1:
        raise ValueError(f"Prompt analyses take one example with at most one position axis: CI "
                         f"of shape [1, C] or [1, T, C]; got {tuple(g.shape)}.")
    return int(g.shape[1])


def masks_for(ci_lower: Mapping[str, Array], *, base: str = "ones",
              keep: Sequence[Subcomponent] = (), ablate: Sequence[Subcomponent] = (),
              delta: bool = False) -> dict[str, Array | SiteMask]:
    """``{site: [1, *P, C]}`` masks: ``base`` (``"ones"``, ``"ci"``: the CI, ``"zeros"``), then
    ``keep`` set to 1 and ``ablate`` set to 0 (at their position, or at every position).
    ``delta=True`` adds the delta component at mask 1 (:class:`~spdjax.core.masks.SiteMask`)."""
    if base not in BASES:
        raise ValueError(f"Unknown mask base {base!r}; expected one of {BASES}.")
    masks = {}
    for name, g in ci_lower.items():
        # Set on the host, one array per site: a graph keeps ~1000 nodes, and one device op
        # each took seconds (index arrays of a new length would compile a new scatter).
        m = np.array({"ones": np.ones(g.shape, g.dtype), "ci": g,
                      "zeros": np.zeros(g.shape, g.dtype)}[base])
        for value, subs in ((1.0, keep), (0.0, ablate)):
            for s in subs:
                if s.site == name:
                    m[(..., s.index) if s.position is None else (0, s.position, s.index)] = value
        m = jnp.asarray(m)
        masks[name] = SiteMask(component=m, delta=jnp.ones(g.shape[:-1], g.dtype)) if delta else m
    return masks


def positions_of(out: Array, positions: Sequence[int] | None) -> list[int] | None:
    """Output positions (negative from the end) resolved against ``out [1, T, V]``; default
    (None or empty) the last. None for an output without a position axis (``[1, V]``), where
    the default and ``[-1]`` ("the last", the only output there is) are accepted."""
    positions = list(positions or [])
    if out.ndim == 2:
        if any(p != -1 for p in positions):
            raise ValueError(f"This model's output has no position axis; leave the positions "
                             f"out (or -1); got {positions}.")
        return None
    T = out.shape[1]
    positions = positions or [-1]
    for p in positions:
        if not -T <= p < T:
            raise ValueError(f"Output position {p} is outside the prompt of {T} positions.")
    return sorted({p % T for p in positions})


def at_positions(out: Array, positions: list[int] | None) -> Array:
    """``[n, V]``: the output at ``positions`` (the whole ``[1, V]`` without positions)."""
    return out if positions is None else out[0, jnp.asarray(positions)]


def kl_at(out: Array, target_out: Array, positions: list[int] | None) -> Array:
    """KL(target || out) of the softmaxes at ``positions``, mean over them."""
    return kl(at_positions(out, positions), at_positions(target_out, positions))


def top_k(out: Array, positions: list[int] | None, k: int,
          decode: Callable[[int], str] | None = None) -> list[list[dict]]:
    """Per position, the ``k`` most probable outputs as ``{"token", "prob", "text"?}``."""
    probs = np.asarray(jax.nn.softmax(at_positions(out, positions), axis=-1), np.float64)
    rows = []
    for p in probs:
        order = np.argsort(-p, kind="stable")[:k]
        rows.append([{"token": int(t), "prob": float(p[t]),
                      **({"text": decode(int(t))} if decode else {})} for t in order])
    return rows


@dataclasses.dataclass
class InterventionResult:
    """An intervention's outcome at ``positions`` (None: no position axis)."""

    positions: list[int] | None
    target_top: list[list[dict]]
    masked_top: list[list[dict]]
    kl: float
    n_kept: int  # subcomponent-positions with mask > 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def prompt_ci(decomposition, params, target_params, batch) -> tuple[Array, dict, dict]:
    """``(target output, site inputs, {site: CI lower [1, *P, C]})`` of one prompt."""
    out, inputs = decomposition.clean_forward(target_params, batch)
    ci = decomposition.causal_importance(params, inputs)
    return out, inputs, {n: c.lower for n, c in ci.items()}


def intervene(decomposition, params, target_params, batch, *, keep: Sequence[Subcomponent] = (),
              ablate: Sequence[Subcomponent] = (), base: str | None = None,
              positions: Sequence[int] | None = None, k: int = 5, delta: bool = False,
              decode: Callable[[int], str] | None = None,
              ci: Mapping[str, Array] | None = None) -> InterventionResult:
    """The prompt ``batch`` with ``keep`` kept and ``ablate`` ablated.

    ``base`` (default: ``"zeros"`` when ``keep`` is given, else ``"ones"``): the masks of the
    subcomponents not named, ``"ones"`` (the unmasked decomposition), ``"ci"`` or ``"zeros"``.
    So ``keep=S`` alone runs the model with only ``S``; ``ablate=S`` alone the decomposition
    without ``S``. ``ci``: CI to use instead of the CI function's (``{site: [1, *P, C]}``).
    """
    target_out, _, lower = prompt_ci(decomposition, params, target_params, batch)
    lower = dict(lower if ci is None else ci)
    T = n_positions(lower)
    keep = check_subcomponents(decomposition, keep, T)
    ablate = check_subcomponents(decomposition, ablate, T)
    base = base or ("zeros" if keep else "ones")
    pos = positions_of(target_out, positions)
    masks = masks_for(lower, base=base, keep=keep, ablate=ablate, delta=delta)
    out = decomposition.forward(target_params, params, batch, masks)
    comp = [m.component if isinstance(m, SiteMask) else m for m in masks.values()]
    return InterventionResult(
        positions=pos, target_top=top_k(target_out, pos, k, decode),
        masked_top=top_k(out, pos, k, decode), kl=float(kl_at(out, target_out, pos)),
        n_kept=int(sum(int(jnp.sum(m > 0)) for m in comp)))


@dataclasses.dataclass
class SparseCIResult:
    """What :func:`optimize_sparse_ci` found: ``kept`` (mask above ``threshold``, with its mask
    value), the token's probability and KL(target || masked) at ``position`` with the
    optimised masks (``*_masked``) and with the kept set alone at 1 (``*_kept``), the loss
    every ``log_every`` steps, the ``threshold``, and ``n_ci_above``: how many
    subcomponent-positions the CI function's own masks put above the same ``threshold`` (what
    ``kept`` is compared with)."""

    token: int
    position: int | None
    kept: list[tuple[str, int, int | None, float]]
    prob_target: float
    prob_masked: float
    prob_kept: float
    kl_masked: float
    kl_kept: float
    n_ci_above: int
    history: list[dict]
    threshold: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def optimize_sparse_ci(decomposition, params, target_params, batch, *, token: int,
                       position: int | None = -1, steps: int = 300, lr: float = 0.05,
                       coeff: float = 0.01, pnorm: float = 1.0, threshold: float = 0.5,
                       mask_type: str = "ci", key: Array | None = None, delta: bool = False,
                       log_every: int = 50,
                       progress: Callable[[int, int, dict], None] | None = None
                       ) -> SparseCIResult:
    """Sparse masks that keep ``token`` at ``position``: Adam on mask logits ``z`` (started at
    the CI function's pre-activations) minimising ``CE(token) + coeff * sum σ_up(z)^pnorm`` with
    masks ``σ_lo(z)`` (the decomposition's sigmoids, so masks stay in [0, 1]).

    ``mask_type="stochastic"`` masks with ``g + (1 - g) u``, ``u ~ U[0, 1)`` drawn from
    ``fold_in(key, step)`` (``key`` required), as SPD trains; ``"ci"`` with ``g`` itself.
    ``threshold``: a subcomponent-position is kept when its final mask exceeds it.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"Unknown mask_type {mask_type!r}; expected one of {MASK_TYPES}.")
    if mask_type == "stochastic" and key is None:
        raise ValueError("optimize_sparse_ci: mask_type='stochastic' needs a PRNG key.")
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    for name, v in (("lr", lr), ("pnorm", pnorm)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}.")
    if not coeff >= 0:
        raise ValueError(f"coeff must be >= 0, got {coeff!r}.")
    target_out, inputs, _ = prompt_ci(decomposition, params, target_params, batch)
    V = target_out.shape[-1]
    if not 0 <= token < V:
        raise ValueError(f"Token {token} is outside the output's [0, {V}).")
    pos = positions_of(target_out, None if position is None else [position])
    ci = decomposition.causal_importance(params, inputs)
    z0 = {n: c.pre for n, c in ci.items()}
    sig = decomposition.sigmoid
    key = jax.random.key(0) if key is None else key

    def masked(z, step):
        g = {n: sig.lower(v) for n, v in z.items()}
        if mask_type == "stochastic":
            k = jax.random.fold_in(key, step)
            g = {n: v + (1.0 - v) * jax.random.uniform(jax.random.fold_in(k, i), v.shape)
                 for i, (n, v) in enumerate(g.items())}
        if delta:
            g = {n: SiteMask(component=v, delta=jnp.ones(v.shape[:-1])) for n, v in g.items()}
        return decomposition.forward(target_params, params, batch, g)

    def losses(z, step):
        logp = jax.nn.log_softmax(at_positions(masked(z, step), pos), axis=-1)
        ce = -jnp.mean(logp[:, token])
        sparsity = sum(jnp.sum(sig.upper(v) ** pnorm) for v in z.values())
        return ce + coeff * sparsity, {"ce": ce, "sparsity": sparsity}

    opt = optax.adam(lr)

    @jax.jit
    def update(z, state, step):
        (loss, parts), grads = jax.value_and_grad(losses, has_aux=True)(z, step)
        upd, state = opt.update(grads, state)
        return optax.apply_updates(z, upd), state, {"loss": loss, **parts}

    z, state, history = z0, opt.init(z0), []
    for step in range(steps):
        z, state, metrics = update(z, state, step)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
            history.append(row)
            if progress is not None:
                progress(step + 1, steps, row)
    final = {n: sig.lower(v) for n, v in z.items()}
    kept = []
    for name, g in final.items():
        g = np.asarray(g)
        for idx in zip(*np.nonzero(g > threshold)):
            p = None if g.ndim == 2 else int(idx[1])
            kept.append((name, int(idx[-1]), p, float(g[idx])))
    subs = [Subcomponent(n, c, p) for n, c, p, _ in kept]
    lower = {n: c.lower for n, c in ci.items()}
    outs = {
        "masked": decomposition.forward(target_params, params, batch, {
            n: SiteMask(component=v, delta=jnp.ones(v.shape[:-1])) if delta else v
            for n, v in final.items()}),
        "kept": decomposition.forward(target_params, params, batch, masks_for(
            lower, base="zeros", keep=subs, delta=delta)),
    }
    prob = {k: float(jax.nn.softmax(at_positions(o, pos), -1)[:, token].mean())
            for k, o in {"target": target_out, **outs}.items()}
    return SparseCIResult(
        token=int(token), position=None if pos is None else pos[0], kept=kept,
        prob_target=prob["target"], prob_masked=prob["masked"], prob_kept=prob["kept"],
        kl_masked=float(kl_at(outs["masked"], target_out, pos)),
        kl_kept=float(kl_at(outs["kept"], target_out, pos)),
        n_ci_above=int(sum(int(jnp.sum(v > threshold)) for v in lower.values())),
        history=history, threshold=float(threshold))


def describe(subs: Iterable[Subcomponent]) -> str:
    """Subcomponents as ``site:idx[@pos]`` text (what :func:`parse_subcomponents` reads)."""
    return ",".join(f"{s.site}:{s.index}" + ("" if s.position is None else f"@{s.position}")
                    for s in subs)
