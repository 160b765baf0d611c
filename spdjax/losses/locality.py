"""Nonlinearity locality: concentrate each subcomponent's nonlinearity-facing vector on few units.

A weight-space term of the VPD library (goodfire-ai/param-decomp, ``NonlinearityLocalityLoss``):
for a site whose input or output feeds (or is fed by) a nonlinearity, e.g. an MLP's ``W_in``
(output side: one unit per hidden neuron) or ``W_out`` (input side), or an attention projection
(one unit per head), each subcomponent's vector on that side (a row of ``U`` or a column of
``V``) is split into its units' squared-norm fractions, and a soft count of the units it uses is
penalised. It favours subcomponents that each touch few neurons or heads, the units through which
the paper's subcomponents interact nonlinearly ("Interpreting Language Model Parameters",
Bushnaq et al. 2026, sections on simplicity and on attention subcomponents spanning heads).
Formula, options and defaults: docs/guides/losses.md, "VPD's minimality and locality terms".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from spdjax.losses.checks import Check, boolean, options, positive_finite
from spdjax.losses.context import Context
from spdjax.losses.minimality import anneal_order, fraction, linear_anneal

Array = jax.Array
SIDES = ("input", "output")


@dataclasses.dataclass(frozen=True)
class Alignment:
    """One site's nonlinearity-facing side (``"input"``: columns of ``V``; ``"output"``: rows of
    ``U``), its units (``heads`` equal contiguous blocks, or one unit per coordinate when None),
    the units' kind (each kind's mean count gets its own weight) and how many nonlinearities use
    each unit (``multiplicity``, e.g. query heads per key/value head under GQA)."""

    site: str
    side: str
    heads: int | None = None
    kind: str = "neuron"
    multiplicity: int = 1


def _int_at_least_1(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def parse_units(units: Any) -> tuple[Alignment, ...]:
    """``{site: "input" | "output" | {"side", "heads"?, "kind"?, "multiplicity"?}}`` (or
    alignments already) -> :class:`Alignment` per site; a bad entry raises ``ValueError`` naming
    it."""
    if isinstance(units, tuple) and all(isinstance(u, Alignment) for u in units):
        return units
    if not isinstance(units, Mapping) or not units:
        raise ValueError("units must be a non-empty mapping {site name: 'input' | 'output' | "
                         f"{{'side': ..., 'heads': int, 'kind': str, 'multiplicity': int}}}}, "
                         f"got {units!r}.")
    out = []
    for site, spec in units.items():
        spec = {"side": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, Mapping) or set(spec) - {"side", "heads", "kind", "multiplicity"}:
            raise ValueError(f"units[{site!r}] must be 'input', 'output' or a mapping with keys "
                             f"side, heads, kind, multiplicity; got {spec!r}.")
        side, heads = spec.get("side"), spec.get("heads")
        if side not in SIDES:
            raise ValueError(f"units[{site!r}]: side must be one of {SIDES} (the side that faces "
                             f"the nonlinearity), got {side!r}.")
        if heads is not None and not _int_at_least_1(heads):
            raise ValueError(f"units[{site!r}]: heads must be an integer >= 1 or absent "
                             f"(one unit per coordinate), got {heads!r}.")
        kind = spec.get("kind", "neuron" if heads is None else "attention_head")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"units[{site!r}]: kind must be a non-empty string, got {kind!r}.")
        mult = spec.get("multiplicity", 1)
        if not _int_at_least_1(mult):
            raise ValueError(f"units[{site!r}]: multiplicity must be an integer >= 1, got "
                             f"{mult!r}.")
        out.append(Alignment(str(site), side, heads, kind, mult))
    return tuple(out)


def units_and_weights(opts: Mapping[str, Any]) -> None:
    """Joint check: ``units`` parses, and ``kind_coefficients`` (when given) weighs every kind
    the units name, with at least one kind trained."""
    units = parse_units(opts["units"])
    weights = opts.get("kind_coefficients")
    if weights is None:
        return
    if not isinstance(weights, Mapping) or any(
            w is not None and not (isinstance(w, (int, float)) and not isinstance(w, bool)
                                   and w > 0) for w in weights.values()):
        raise ValueError("kind_coefficients must map each unit kind to a number > 0 or None "
                         f"(kind left out of the term), got {weights!r}.")
    missing = sorted({u.kind for u in units} - set(weights))
    if missing:
        raise ValueError(f"kind_coefficients has no entry for the unit kinds {missing} that "
                         "units names; give each a weight (or None to leave it out).")
    if all(weights[u.kind] is None for u in units):
        raise ValueError("kind_coefficients leaves out every unit kind: nothing to train.")


def unit_fractions(vectors: Array, heads: int | None) -> Array:
    """``[C, d] -> [C, U]``: each unit's share ``sum_{j in u} v_j^2 / sum_j v_j^2`` of a vector's
    squared norm (a zero vector: all 0). Each row is divided by its (constant) largest magnitude
    first, which keeps float32 squares from underflowing and leaves the fractions unchanged."""
    vectors = vectors.astype(jnp.float32)
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(vectors), axis=-1, keepdims=True))
    vectors = vectors / jnp.where(scale > 0, scale, 1.0)
    sq = vectors * vectors
    if heads is not None:
        sq = sq.reshape(sq.shape[0], heads, sq.shape[1] // heads).sum(-1)
    total = sq.sum(-1, keepdims=True)
    alive = total > 0
    return jnp.where(alive, sq / jnp.where(alive, total, 1.0), 0.0)


def soft_unit_count(fractions: Array, threshold, *, normalize_at_one: bool = False) -> Array:
    """``[C, U] -> [C]``: ``sum_u f_u / (f_u + t / U)`` (times ``1 + t / U`` with
    ``normalize_at_one``, so a vector on one unit counts exactly 1 at every ``t``)."""
    n_units = fractions.shape[-1]
    count = jnp.sum(fractions / (fractions + threshold / n_units), axis=-1)
    return (1.0 + threshold / n_units) * count if normalize_at_one else count


def _side_vectors(ctx: Context, params, a: Alignment) -> Array:
    d = ctx.decomposition
    if a.site not in d.site_names:
        raise ValueError(f"nonlinearity_locality: units names the site {a.site!r}, which is not "
                         f"decomposed; the sites are {list(d.site_names)}.")
    V, U = d.factors(params, a.site)  # V (d_in, C), U (C, d_out)
    vectors = U if a.side == "output" else V.T
    if a.heads is not None and vectors.shape[-1] % a.heads:
        raise ValueError(f"nonlinearity_locality: site {a.site!r} has {vectors.shape[-1]} "
                         f"{a.side} coordinates, not divisible into heads={a.heads} equal units.")
    return vectors


@options(units_and_weights, anneal_order("relative_threshold"),
         relative_threshold=positive_finite, relative_threshold_anneal_start_frac=fraction,
         relative_threshold_anneal_final=Check(
             lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and v > 0), "None or a number > 0"),
         relative_threshold_anneal_end_frac=fraction, normalize_at_one=boolean)
def nonlinearity_locality(
    params, ctx: Context, key=None, *, units: Mapping[str, Any], relative_threshold: float,
    relative_threshold_anneal_start_frac: float = 1.0,
    relative_threshold_anneal_final: float | None = None,
    relative_threshold_anneal_end_frac: float = 1.0,
    kind_coefficients: Mapping[str, float | None] | None = None, normalize_at_one: bool = False,
) -> Array:
    """``sum_k w_k * mean_{(l, c) of kind k} n_{l,c} * sum_u f_u / (f_u + t / U_l)``.

    For each site ``l`` in ``units``: its subcomponents' vectors on the nonlinearity-facing side
    (rows ``U_c`` for ``"output"``, columns ``V_c`` for ``"input"``), each split into ``U_l``
    units (coordinates, or ``heads`` contiguous blocks) with squared-norm fractions ``f_u``
    (:func:`unit_fractions`; the scale of ``V``/``U`` cancels), a soft count of the units used
    (:func:`soft_unit_count`, threshold ``t`` relative to the uniform fraction ``1/U_l``,
    annealed like p), times the units' ``multiplicity`` ``n``. One mean per unit kind over all
    its sites' subcomponents, weighted by ``kind_coefficients`` (None: 1 each; a None weight
    leaves that kind out). Returns a scalar; the CI plays no part.
    """
    del key
    alignments = parse_units(units)
    t = linear_anneal(ctx.step_frac, relative_threshold, relative_threshold_anneal_start_frac,
                      relative_threshold_anneal_final, relative_threshold_anneal_end_frac)
    weights = ({u.kind: 1.0 for u in alignments} if kind_coefficients is None
               else dict(kind_coefficients))
    sums: dict[str, Array] = {}
    counts: dict[str, int] = {}
    for a in alignments:
        if weights.get(a.kind) is None:
            continue
        vectors = _side_vectors(ctx, params, a)
        per_component = a.multiplicity * soft_unit_count(
            unit_fractions(vectors, a.heads), t, normalize_at_one=normalize_at_one)
        sums[a.kind] = sums.get(a.kind, 0.0) + jnp.sum(per_component)
        counts[a.kind] = counts.get(a.kind, 0) + vectors.shape[0]
    return sum((weights[k] * sums[k] / counts[k] for k in sums), jnp.zeros((), jnp.float32))
