"""L3D's decomposition (Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits
Through Local Loss Landscape Decomposition", arXiv 2504.00194): ``C`` subnetworks, each a
*direction* in the space of every decomposed weight and bias, held as low-rank Tucker tensors
(:class:`L3DDecomposition`, built by :func:`decompose_l3d`), and the per-sample divergence
gradients they reconstruct (:meth:`L3DDecomposition.per_sample_grads`). The losses are in
:mod:`spdjax.methods.l3d`.

The parameter space is one tensor per decomposed site weight ``(d_in, d_out)`` and one per site
bias ``(d_out,)``. A tied site (TMS ``linear2 = linear1ᵀ``) is its own tensor here: the gradient
is taken with respect to each *usage* of the weight, as the L3D reference code decomposes TMS
through an untied copy of the model (github briannachrisman/eigenestimation,
``scripts/1_tms/train_tms_eigenmodel.py``).

Tucker format (L3D paper, appendix "Low rank parameter directions"): subnetwork ``c``'s slice of a
tensor of shape ``(d_1, ..., d_n)`` is ``core[..., c] x_1 F_1[..., c] ... x_n F_n[..., c]`` with
``core (r_1, ..., r_n, C)`` and ``F_j (r_j, d_j, C)``. Weights take rank ``(r, r)``, biases rank
``(1,)`` (for a vector every Tucker rank is the same set of vectors). The encoder ``V_in`` and
the decoder ``V_out`` are two such sets of factors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spdjax.core import components as comp_lib
from spdjax.core.decomposition import check_sites_called
from spdjax.core.target import Mapped, Target
from spdjax.methods.base import spanning_sites

Array = jax.Array
DIVERGENCES = ("mse", "kl", "reference_mse")
REFERENCES = ("sample", "mean")
NORMALISATIONS = ("reference", "unit")
EPS = 1e-10  # the reference code's eps: in the loss's denominator and the renormalisation


_RANKS, _DIMS = "pqrstu", "ijklmn"  # einsum letters of the Tucker ranks and tensor modes


def _tucker_spec(ndim: int) -> str:
    """``"pqC,piC,qjC->ijC"`` for a matrix, ``"pC,piC->iC"`` for a vector."""
    ranks, dims = _RANKS[:ndim], _DIMS[:ndim]
    return ",".join([ranks + "C"] + [f"{r}{d}C" for r, d in zip(ranks, dims)]) + f"->{dims}C"


def _ndim(factors: Mapping[str, Array]) -> int:
    ndim = factors["core"].ndim - 1
    if not 1 <= ndim <= len(_DIMS):
        raise ValueError(f"L3D Tucker tensors have 1 to {len(_DIMS)} modes, got a core of shape "
                         f"{factors['core'].shape} ({ndim} modes).")
    return ndim


def tucker(factors: Mapping[str, Array]) -> Array:
    """``(*shape, C)``: the tensors of all ``C`` subnetworks from their Tucker factors
    ``{"core": (r_1.., C), "f0": (r_1, d_1, C), ...}``, explicitly (``prod(shape) * C``
    floats: the training step uses :func:`tucker_contract` and :func:`tucker_gram`)."""
    ndim = _ndim(factors)
    return jnp.einsum(_tucker_spec(ndim), factors["core"],
                      *(factors[f"f{j}"] for j in range(ndim)))


def tucker_contract(factors: Mapping[str, Array], g: Array) -> Array:
    """``[batch, C]``: ``<V[c], g_b>`` for ``g [batch, *shape]`` and the Tucker tensors ``V`` of
    ``factors``, mode by mode, without forming ``V``.

    The largest mode is contracted first (``g x_j F_j``, a ``[batch * rest, d_j] @ [d_j, r_j C]``
    product, the only step that costs ``batch * prod(shape) * r_j * C``), which leaves the
    smallest intermediate; the other modes and the core then act per subnetwork. For rank 1 on a
    matrix this is ``u_c^T g_b v_c`` times the core."""
    ndim = _ndim(factors)
    if isinstance(g, OuterGrads):
        if ndim != 2:
            raise ValueError(f"L3D: outer-product gradients need a matrix's Tucker factors, got "
                             f"{ndim} modes.")
        # sum_s core[p, q, c] (F0[p, :, c] . a_bs) (F1[q, :, c] . d_bs): batch * P * (d_in +
        # d_out) * r * C, where the dense gradient costs batch * d_in * d_out * r * C.
        left = jnp.einsum("bsi,piC->bspC", g.inputs, factors["f0"])
        right = jnp.einsum("bsj,qjC->bsqC", g.deltas, factors["f1"])
        return jnp.einsum("bspC,bsqC,pqC->bC", left, right, factors["core"])
    if g.ndim != ndim + 1 or g.shape[1:] != tuple(factors[f"f{j}"].shape[1]
                                                  for j in range(ndim)):
        raise ValueError(f"L3D: gradients of shape {g.shape} do not match Tucker factors of "
                         f"modes {[factors[f'f{j}'].shape[1] for j in range(ndim)]} (expected "
                         f"[batch, *modes]).")
    order = sorted(range(ndim), key=lambda j: -g.shape[1 + j])
    axes = ["b"] + list(_DIMS[:ndim])  # the current axes of `t`, C added after the first mode
    t = g
    for step, j in enumerate(order):
        new = [_RANKS[j] if a == _DIMS[j] else a for a in axes]
        if step == 0:
            new.append("C")
        t = jnp.einsum(f"{''.join(axes)},{_RANKS[j]}{_DIMS[j]}C->{''.join(new)}", t,
                       factors[f"f{j}"])
        axes = new
    return jnp.einsum(f"{''.join(axes)},{_RANKS[:ndim]}C->bC", t, factors["core"])


def _mode_grams(factors: Mapping[str, Array], diagonal: bool) -> list[Array]:
    """Per mode ``F_j[p, :, c] . F_j[q, :, c']``: ``(r, r, C, C)``, or ``(r, r, C)`` with
    ``diagonal`` (``c = c'``)."""
    spec = "piC,qiC->pqC" if diagonal else "piC,qiD->pqCD"
    return [jnp.einsum(spec, factors[f"f{j}"], factors[f"f{j}"])
            for j in range(_ndim(factors))]


def tucker_gram(factors: Mapping[str, Array]) -> Array:
    """``(C, C)``: ``<V[c], V[c']>`` of the Tucker tensors ``V`` of ``factors``, from the
    per-mode factor Grams and the cores (``sum core[p.., c] core[q.., c'] prod_j
    <F_j[p_j, :, c], F_j[q_j, :, c']>``), without forming ``V``."""
    ndim = _ndim(factors)
    p, q = _RANKS[:ndim], _DIMS[:ndim]  # the two cores' rank letters
    spec = ",".join([p + "C", q + "D"] + [f"{p[j]}{q[j]}CD" for j in range(ndim)]) + "->CD"
    return jnp.einsum(spec, factors["core"], factors["core"], *_mode_grams(factors, False))


def tucker_sq_norms(factors: Mapping[str, Array]) -> Array:
    """``(C,)``: ``||V[c]||_F^2``, the diagonal of :func:`tucker_gram`, at ``C`` times less."""
    ndim = _ndim(factors)
    p, q = _RANKS[:ndim], _DIMS[:ndim]
    spec = ",".join([p + "C", q + "C"] + [f"{p[j]}{q[j]}C" for j in range(ndim)]) + "->C"
    return jnp.einsum(spec, factors["core"], factors["core"], *_mode_grams(factors, True))


class OuterGrads(NamedTuple):
    """A batch of per-sample gradients of a linear site's weight, ``g_b = sum_p a_bp ⊗ d_bp``
    (``a``: the site's input at position ``p``, ``d``: the divergence's gradient at its output),
    kept as the two factors: ``batch * P * (d_in + d_out)`` floats instead of ``batch * d_in *
    d_out``. :func:`tucker_contract` and the squared norm (:meth:`sq_norms`) read it as is."""

    inputs: Array  # [batch, P, d_in]
    deltas: Array  # [batch, P, d_out]

    def dense(self) -> Array:
        """``[batch, d_in, d_out]``: the gradients explicitly."""
        return jnp.einsum("bpi,bpj->bij", self.inputs, self.deltas)

    def position_grams(self) -> tuple[Array, Array]:
        """``([batch, P, P], [batch, P, P])``: ``a_bp . a_bq`` and ``d_bp . d_bq``."""
        return (jnp.einsum("bpi,bqi->bpq", self.inputs, self.inputs),
                jnp.einsum("bpj,bqj->bpq", self.deltas, self.deltas))

    def sq_norms(self) -> Array:
        """``[batch]``: ``||g_b||_F^2 = sum_pq (a_bp . a_bq)(d_bp . d_bq)``."""
        return jnp.einsum("bpq,bpq->b", *self.position_grams())


def outer_form_is_cheaper(positions: int, d_in: int, d_out: int, rank: int, C: int) -> bool:
    """Whether a linear site's per-sample weight gradients cost fewer multiply-adds per sample
    as :class:`OuterGrads` than dense, in what the L3D step does with them: contract them with
    the encoder's and the decoder's rank-``rank`` Tucker factors (:func:`tucker_contract`) and
    take their squared norms. Factored: ``2 P (d_in + d_out) r C + 2 P r^2 C`` plus ``P^2 (d_in
    + d_out)`` for the norm (``P = positions``); dense: ``P d_in d_out`` to form them, ``2 d_in
    d_out r C + 2 min(d_in, d_out) r^2 C`` and ``d_in d_out``. Dense wins for long sequences of
    narrow sites (``P`` above about ``d_in d_out / (d_in + d_out)``)."""
    P_, r = positions, rank
    factored = 2 * P_ * (d_in + d_out) * r * C + 2 * P_ * r * r * C + P_ * P_ * (d_in + d_out)
    dense = (P_ * d_in * d_out + 2 * d_in * d_out * r * C + 2 * min(d_in, d_out) * r * r * C
             + d_in * d_out)
    return factored < dense


class _NoOuterForm(ValueError):
    """A site whose per-sample gradient :meth:`L3DDecomposition.per_sample_grad_factors` cannot
    keep as :class:`OuterGrads` (not linear, or an output wanted back factored)."""


@dataclasses.dataclass(frozen=True, eq=False)
class L3DDecomposition:
    """The static structure of an L3D decomposition.

    Attributes:
      target: the decomposed :class:`~spdjax.core.target.Target`.
      site_names: the decomposed sites.
      C: the number of subnetworks.
      shapes: ``{site: {"weight": (d_in, d_out)[, "bias": (d_out,)]}}``: the parameter space.
      ranks: ``{site: {"weight": (r, r)[, "bias": (1,)]}}``: Tucker ranks.
      divergence: ``"mse"`` (``0.5 mean_o (f_o - y_o)^2``; toy models) or ``"kl"``
        (``KL(softmax(y) || softmax(f))``; logits), the paper's ``D``; or
        ``"reference_mse"``: ``mean_o f_o (f_o - y_o)`` with ``y`` held constant, the L3D
        reference code's ``MSEVectorLoss``, whose gradient ``mean_o (2 f_o - y_o) df_o`` is not
        the paper's ``mean_o (f_o - y_o) df_o`` (:meth:`divergence_fn`).
      reference: ``"sample"`` (the paper's choice: another sample of the batch, drawn at random)
        or ``"mean"`` (the batch's mean output).
    """

    target: Target
    site_names: tuple[str, ...]
    C: int
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
    ranks: Mapping[str, Mapping[str, tuple[int, ...]]]
    divergence: str = "mse"
    reference: str = "sample"
    # The view evaluations use (:class:`spdjax.methods.base.DecompositionView`): full-rank
    # directions, no causal-importance function.
    rank_one = False
    causal_importance = None

    @property
    def n_params(self) -> int:
        """``n_w``: the size of the decomposed parameter space."""
        return sum(math.prod(s) for t in self.shapes.values() for s in t.values())

    def site(self, name):
        return self.target.sites[name]

    def theta0(self, target_params) -> dict:
        """The target's point ``W_0`` in the decomposed parameter space."""
        out = {}
        for n in self.site_names:
            s = self.site(n)
            out[n] = {"weight": s.weight(target_params)}
            if "bias" in self.shapes[n]:
                out[n]["bias"] = s.bias(target_params)
        return out

    def init(self, key) -> dict:
        """``{"encode": ..., "decode": ...}``, each ``{site: {tensor: {"core", "f0", ...}}}``.

        As the reference: every factor ``N(0, 1) / C``, the decoder renormalised
        (:meth:`normalise`), the encoder a copy of it."""
        decode = {}
        for i, n in enumerate(self.site_names):
            decode[n] = {}
            for j, (t, shape) in enumerate(self.shapes[n].items()):
                ranks = self.ranks[n][t]
                keys = jax.random.split(jax.random.fold_in(key, 2 * i + j), len(shape) + 1)
                f = {"core": jax.random.normal(keys[0], (*ranks, self.C)) / self.C}
                for k, (r, d) in enumerate(zip(ranks, shape)):
                    f[f"f{k}"] = jax.random.normal(keys[k + 1], (r, d, self.C)) / self.C
                decode[n][t] = f
        decode = self.normalise(decode, "reference")
        return {"encode": jax.tree.map(jnp.copy, decode), "decode": decode}

    def tensors(self, factors) -> dict:
        """``{site: {tensor: (*shape, C)}}``: every subnetwork, explicitly."""
        return {n: {t: tucker(f) for t, f in ts.items()} for n, ts in factors.items()}

    def normalise(self, decode, how: str) -> dict:
        """The decoder after the paper's per-step renormalisation.

        ``"unit"``: each subnetwork scaled to unit L2 norm over the whole parameter space (the
        paper's text). ``"reference"`` (the reference code's ``normalize_low_ranks``): each
        subnetwork divided by ``sqrt(sum_t ||V_t||_F) + eps`` (``t``: its tensors), which, applied
        every step, drives ``sum_t ||V_t||_F`` to 1. Each of a tensor's ``n + 1`` Tucker factors
        takes the ``1/(n+1)``-th power of the scale, as the reference does.
        """
        if how not in NORMALISATIONS:
            raise ValueError(f"Unknown L3D normalisation {how!r}; expected one of "
                             f"{NORMALISATIONS}.")
        norms = [jnp.sqrt(jnp.maximum(tucker_sq_norms(f), 0.0))  # (C,), from Grams
                 for ts in decode.values() for f in ts.values()]
        if how == "unit":
            scale = jnp.sqrt(sum(n**2 for n in norms))
        else:
            scale = jnp.sqrt(sum(norms))
        out = {}
        for n, ts in decode.items():
            out[n] = {}
            for t, f in ts.items():
                k = len(f)  # core + one factor per mode
                per = scale ** (1.0 / k) + EPS
                out[n][t] = {name: a / per for name, a in f.items()}
        return out

    def component_weights(self, params, name: str) -> Array:
        """``(C, d_in, d_out)``: every subnetwork's (decoder) direction in site ``name``'s
        weight. Unit-scale directions with an arbitrary sign, not parts of ``W``."""
        return jnp.moveaxis(tucker(params["decode"][name]["weight"]), -1, 0)

    def component_weight(self, params, name: str) -> Array:
        """``(d_in, d_out)``: the sum of the subnetworks' directions at site ``name`` (defined
        for the view; L3D's directions do not sum to the target's weight)."""
        return jnp.sum(self.component_weights(params, name), axis=0)

    def partition_specs(self, params, model_axis: str) -> dict:
        """Replicated: the factors are small (the ``C`` axis is last and not sharded)."""
        del model_axis
        return jax.tree.map(lambda _: P(), params)

    def clean_forward(self, target_params, x):
        out, inputs = self.target.forward(target_params, x, {})
        return out, {n: inputs[n] for n in self.site_names}

    def forward_at(self, target_params, theta, x):
        """The target's output with the decomposed sites' weights and biases taken from
        ``theta`` (same structure as :meth:`theta0`): ``f(x; W)``."""
        def site_fn(n):
            s, w, b = self.site(n), theta[n]["weight"], theta[n].get("bias")
            if b is None and s.bias is not None:
                b = s.bias(target_params)

            def fn(a):
                if isinstance(a, Mapped):
                    y = a.matmul(w)
                    if b is not None:
                        y = (Mapped.sum(y.terms, bias=b) if isinstance(y, Mapped)
                             else y + s.out(b, a))
                    return y
                if s.kind == "conv":
                    y = s.conv(w, a)
                else:
                    y = comp_lib.inner_acts(s.kind, w, a)
                return y if b is None else y + b
            return fn

        return self.target.forward(target_params, x, {n: site_fn(n) for n in self.site_names})[0]

    def divergence_fn(self, out: Array, ref: Array) -> Array:
        """The paper's ``D(f(x_i), y_r)`` for one sample (mean over any leading positions).

        ``"reference_mse"`` is the L3D reference code's ``MSEVectorLoss``
        (github briannachrisman/eigenestimation, ``eigenestimation/utils/loss.py``):
        ``mean_o f_o (f_o - y_o)`` where only ``y`` is detached, so its gradient is
        ``mean_o (2 f_o - y_o) df_o``. Its value is not a divergence (not 0 at ``f = y``); the
        reference trains its toy models' decompositions with it (``y`` drawn as ``"sample"``:
        the code ignores its ``model0`` argument)."""
        if self.divergence == "mse":
            return 0.5 * jnp.mean((out - ref) ** 2)
        if self.divergence == "reference_mse":
            return jnp.mean(out * (out - ref))
        log_p, log_q = jax.nn.log_softmax(ref, axis=-1), jax.nn.log_softmax(out, axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))

    def references(self, target_params, x, key) -> Array:
        """``y_r`` per sample: the target's output on a uniformly drawn sample of the batch
        (with replacement, as the reference code; ``"sample"``) or the batch's mean output."""
        out = self.target(target_params, x)
        if self.reference == "mean":
            return jnp.broadcast_to(jnp.mean(out, axis=0, keepdims=True), out.shape)
        idx = jax.random.randint(key, (out.shape[0],), 0, out.shape[0])
        return out[idx]

    def check_visited(self, target_params, x) -> None:
        """Raises ``ValueError`` naming the decomposed sites the target's forward never calls on
        ``x`` (as :meth:`spdjax.core.decomposition.Decomposition.clean_forward`): their
        gradients would be silently zero. Traces one sample's forward; runs nothing."""
        seen = jax.eval_shape(lambda xs: self.target.forward(target_params, xs, {})[1], x[:1])
        check_sites_called(self.site_names, seen, "L3D: ")

    def per_sample_grads(self, target_params, x, key) -> dict:
        """``g_i = grad_W D(f(x_i; W), y_r) at W_0``, ``{site: {tensor: [batch, *shape]}}``
        (``vmap`` of ``grad`` over the batch; constants with respect to the factors). Raises
        ``ValueError`` for a decomposed site the forward never calls (:meth:`check_visited`)."""
        self.check_visited(target_params, x)
        theta = self.theta0(target_params)
        refs = jax.lax.stop_gradient(self.references(target_params, x, key))

        def one(xi, ref):
            def d(th):
                return self.divergence_fn(self.forward_at(target_params, th, xi[None])[0], ref)
            return jax.grad(d)(theta)

        return jax.lax.stop_gradient(jax.vmap(one)(x, refs))

    def per_sample_grad_factors(self, target_params, x, key) -> dict:
        """:meth:`per_sample_grads` (the same references), each weight's gradient kept as
        :class:`OuterGrads` where that is cheaper (:func:`outer_form_is_cheaper`, per site; else
        formed, ``[batch, d_in, d_out]``): a linear site ``y = a W + b`` has per-sample gradient
        ``sum_p a_p ⊗ d_p``, its input ``a`` times the divergence's gradient ``d`` at its output,
        taken as the gradient of a zero offset added to the output (``vmap`` of ``grad``).
        Biases' gradients ``sum_p d_p`` are dense, ``[batch, d_out]``. A ``Mapped`` input is
        formed explicitly (``[batch, ..., d_in]``); raises ``_NoOuterForm`` for other site kinds
        or an output wanted back factored (:meth:`loss_grads` then takes the dense ones), and
        ``ValueError`` for a site the forward never calls (:meth:`check_visited`)."""
        self.check_visited(target_params, x)
        names = self.site_names
        for n in names:
            if self.site(n).kind != "linear":
                raise _NoOuterForm(f"site {n!r} is {self.site(n).kind!r}, not linear")
        refs = jax.lax.stop_gradient(self.references(target_params, x, key))
        shapes = jax.eval_shape(lambda xs: self.target.forward(target_params, xs, {})[1], x[:1])
        # One sample's output offsets, (1, *positions, d_out): a Mapped input's terms share the
        # real input's leading axes.
        zeros = {n: jnp.zeros((*(shapes[n].terms[0][0] if isinstance(shapes[n], Mapped)
                                 else shapes[n]).shape[:-1], self.site(n).d_out))
                 for n in names}

        def site_fn(n, offset, seen):
            s = self.site(n)
            w, b = s.weight(target_params), (None if s.bias is None else s.bias(target_params))

            def fn(a):
                post = None
                if isinstance(a, Mapped):
                    if a.factored:
                        raise _NoOuterForm(f"site {n!r} gives its output back factored")
                    post = a.post
                    a = sum(x if pre is None else jnp.einsum("...k,ki->...i", x, pre)
                            for x, pre in a.terms)
                seen[n] = a
                y = jnp.einsum("...i,io->...o", a, w) + offset
                y = y if b is None else y + b
                return y if post is None else jnp.einsum("...o,oy->...y", y, post)
            return fn

        def one(xi, ref):
            def d(offsets):
                seen = {}
                out = self.target.forward(target_params, xi[None],
                                          {n: site_fn(n, offsets[n], seen) for n in names})[0]
                return self.divergence_fn(out[0], ref), seen
            return jax.grad(d, has_aux=True)(zeros)

        deltas, inputs = jax.vmap(one)(x, refs)
        out = {}
        for n in names:
            s = self.site(n)
            a = inputs[n].reshape(x.shape[0], -1, s.d_in)
            dl = deltas[n].reshape(x.shape[0], -1, s.d_out)
            g = OuterGrads(a, dl)
            if not outer_form_is_cheaper(a.shape[1], s.d_in, s.d_out,
                                         max(self.ranks[n]["weight"]), self.C):
                g = g.dense()
            out[n] = {"weight": g}
            if "bias" in self.shapes[n]:
                out[n]["bias"] = jnp.sum(dl, axis=1)
        return jax.lax.stop_gradient(out)

    def loss_grads(self, target_params, x, key) -> dict:
        """The per-sample gradients the loss reads: :meth:`per_sample_grad_factors` where every
        site allows it, else :meth:`per_sample_grads` (the same values)."""
        try:
            return self.per_sample_grad_factors(target_params, x, key)
        except _NoOuterForm:
            return self.per_sample_grads(target_params, x, key)


def decompose_l3d(target: Target, sites: Mapping[str, int], C: int, *, rank: int = 1,
                  biases: bool = True, divergence: str = "mse",
                  reference: str = "sample") -> L3DDecomposition:
    """An L3D decomposition of the sites matched by ``sites`` (their C values are ignored: L3D's
    ``C`` subnetworks span every site), weight rank ``rank`` (capped at each dimension),
    including the sites' biases unless ``biases=False``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"L3D: rank must be a positive integer, got {rank!r}.")
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown L3D divergence {divergence!r}; expected one of "
                         f"{DIVERGENCES}.")
    if reference not in REFERENCES:
        raise ValueError(f"Unknown L3D reference {reference!r}; expected one of {REFERENCES}.")
    names = spanning_sites("L3D", target, sites, C, refused_kind="embed",
                           message="linear and conv sites; {} are embeddings (leave them out "
                           "of the patterns).")
    shapes, ranks = {}, {}
    for n in names:
        s = target.sites[n]
        shapes[n] = {"weight": (s.d_in, s.d_out)}
        ranks[n] = {"weight": (min(rank, s.d_in), min(rank, s.d_out))}
        if biases and s.bias is not None:
            shapes[n]["bias"] = (s.d_out,)
            ranks[n]["bias"] = (1,)
    return L3DDecomposition(target=target, site_names=names, C=C, shapes=shapes, ranks=ranks,
                            divergence=divergence, reference=reference)
