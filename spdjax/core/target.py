"""The target protocol: a model whose weight matrices ("sites") can be swapped for components.

A :class:`Target` is a pure function

    forward(params, x, replace) -> (output, site_inputs)

where ``replace`` maps some site names to functions ``site_input -> site_output`` that are used
instead of the target's own weights at those sites, and ``site_inputs`` maps every site the
forward visited to the input it saw. With ``replace={}`` this is the clean forward that also
returns every site's input (the "pre-weight activations" of the paper).

A hand-written pure function becomes a target with :func:`from_function`; unmodified Flax models
go through the adapters in :mod:`spdjax.core.adapters`.

Weights are always in Flax layout: ``W`` has shape ``(d_in, d_out)`` and a linear site computes
``x @ W + b``; an embedding site has ``W`` of shape ``(vocab, d_emb)`` and computes ``W[ids]``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any
SiteFn = Callable[[Array], Array]
ForwardFn = Callable[[Params, Any, Mapping[str, SiteFn]], tuple[Any, dict[str, Array]]]

SITE_KINDS = ("linear", "embed", "conv")


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One decomposable weight matrix of a target.

    Attributes:
      name: path-like name used by site patterns, e.g. ``"layers_0/mlp_in"``.
      kind: ``"linear"`` (``x @ W + b``), ``"embed"`` (``W[ids]``) or ``"conv"`` (a convolution
        as its im2col matrix: ``W`` is (kernel window x in-channels, out-channels)).
      d_in: input width (the vocabulary size for an embedding).
      d_out: output width.
      weight: ``params -> W`` with shape ``(d_in, d_out)``.
      bias: ``params -> b`` with shape ``(d_out,)``, or None. Biases are never decomposed.
      conv: for ``"conv"`` sites, ``(M (d_in, k), image) -> [..., k]``: the site's convolution
        with the matrix ``M`` as its kernel, channels last.
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    weight: Callable[[Params], Array]
    bias: Callable[[Params], Array] | None = None
    conv: Callable[[Array, Array], Array] | None = None

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"Site {self.name!r}: kind {self.kind!r} is not one of {SITE_KINDS}.")
        if (self.kind == "conv") != (self.conv is not None):
            raise ValueError(f"Site {self.name!r}: a 'conv' site needs its conv function and "
                             "only a conv site has one.")

    def apply(self, M: Array, x: Array | Mapped) -> Array:
        """``[..., k]``: the site's input ``x`` through a matrix ``M (d_in, k)`` in place of ``W``
        (``x @ M``, ``M[ids]``, or the convolution with ``M`` as its kernel; for a
        :class:`Mapped` input ``z @ (pre @ M)``)."""
        if isinstance(x, Mapped):
            if self.kind != "linear":
                raise ValueError(f"Site {self.name!r}: only a linear site takes a Mapped input.")
            return x.apply(M)
        if self.kind == "conv":
            return self.conv(M, x)
        if self.kind == "embed":
            return jax.numpy.take(M, x, axis=0)
        return jax.numpy.einsum("...i,ic->...c", x, M)


    def out(self, M: Array | None, x: Array | Mapped) -> Array | None:
        """``M`` (``(..., d_out)``: a weight, ``U`` or a bias) in the coordinates the site's output
        is read in: ``M @ post`` for a :class:`Mapped` input with an output map, else ``M``."""
        post = x.post if isinstance(x, Mapped) else None
        return M if M is None or post is None else M @ post


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mapped:
    """A linear site's input and output in factored form, for less work per step.

    The site's real input is ``x @ pre`` (``pre (d_x, d_in)``; None: ``x`` itself), or for
    tuples ``x = (x_1, ..., x_k)``, ``pre = (pre_1, ..., pre_k)`` the sum ``Σ_j x_j @ pre_j``
    (a residual stream kept as the narrow pieces written into it). Its output ``y (..., d_out)``
    is only ever read through ``y @ post`` (``post (d_out, d_y)``; None: as it is), or, with
    ``factored=True``, is wanted back factored: a sum-form ``Mapped`` whose terms are the
    narrow coefficients the site multiplies into its (masked) rows, ``(acts * m) @ U + ...``,
    for later sites to read through their own weights.

    A target whose site input is a fixed linear map of something narrower (ResidMLP's first
    ``mlp_in`` reads the embedding ``x @ W_E``), whose site output is only read through one (its
    last ``mlp_out``, through the unembedding), or whose wide stream is only the sum of narrow
    writes (its middle residual stream) passes ``hooks(name, Mapped(...), lambda a:
    a.matmul(W))``: every product with the site's weight, components, delta or bias is then
    folded as ``x_j @ (pre_j @ M @ post)``, never materialising the wide ``[..., d_in]`` input
    or ``[..., d_out]`` output. The same numbers up to float rounding
    (``tests/families/test_resid_mlp.py``,
    ``test_the_folded_forward_gives_the_plain_forwards_losses_and_gradients``).
    """

    x: Array | tuple[Array, ...]
    pre: Array | None | tuple[Array | None, ...] = None
    post: Array | None = None
    factored: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def terms(self) -> tuple[tuple[Array, Array | None], ...]:
        """``((x_j, pre_j), ...)``: the input is ``Σ_j x_j @ pre_j``."""
        if isinstance(self.x, tuple):
            return tuple(zip(self.x, self.pre))
        return ((self.x, self.pre),)

    def apply(self, M: Array) -> Array:
        """``Σ_j x_j @ (pre_j @ M)``: the input through ``M (d_in, k)``."""
        return _total(jnp.einsum("...i,ic->...c", x, M if pre is None else pre @ M)
                      for x, pre in self.terms)

    def matmul(self, W: Array) -> Array | Mapped:
        """The site's output through ``W (d_in, d_out)`` as the site gives it (a target's default
        site function): ``Σ_j x_j @ (pre_j @ W @ post)``, or factored, the terms
        ``(x_j, pre_j @ W)``."""
        if self.factored:
            return Mapped.sum([(x, W if pre is None else pre @ W) for x, pre in self.terms])
        return self.apply(W if self.post is None else W @ self.post)

    def dense(self) -> Array:
        """The real input ``Σ_j x_j @ pre_j`` (for what needs it whole: a CI function of the
        raw input, the hidden-activation reconstruction)."""
        return _total(x if pre is None else x @ pre for x, pre in self.terms)

    @staticmethod
    def sum(terms, bias: Array | None = None) -> Mapped | Array:
        """``Σ_j x_j @ pre_j (+ bias)`` from ``[(x_j, pre_j), ...]`` (``pre_j`` None: ``x_j``
        itself; the bias ``(d,)`` becomes the term ``(ones [..., 1], bias[None])``), kept
        factored, or as the plain array where the terms are together at least as wide as the
        sum itself (factoring would then cost more than it saves)."""
        if bias is not None:
            x0 = terms[0][0]
            terms = [*terms, (jnp.ones(x0.shape[:-1] + (1,), x0.dtype), bias[None, :])]
        xs, pres = zip(*terms)
        widths = [x.shape[-1] if pre is not None else None for x, pre in terms]
        if None not in widths and sum(widths) >= terms[0][1].shape[-1]:
            return Mapped(tuple(xs), tuple(pres)).dense()
        return Mapped(tuple(xs), tuple(pres))

    def __add__(self, other: Array | Mapped) -> Mapped:
        """The sum of two inputs (a residual stream plus a site's write), still factored."""
        if self.post is not None or self.factored or (
                isinstance(other, Mapped) and (other.post is not None or other.factored)):
            raise ValueError("Only plain sum-form Mapped values (no post map, not factored) add.")
        more = other.terms if isinstance(other, Mapped) else ((other, None),)
        return Mapped.sum(self.terms + more)

    __radd__ = __add__


def _total(arrays) -> Array:
    """The sum of a non-empty iterable of arrays (no ``0 +`` in front: one term is returned
    as it is)."""
    return functools.reduce(operator.add, arrays)


def dense_input(x: Array | Mapped) -> Array:
    """A site input as a plain array (:meth:`Mapped.dense` for a factored one)."""
    return x.dense() if isinstance(x, Mapped) else x


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A pure forward function plus the catalogue of its decomposable sites.

    ``unsupported`` names weight applications that were found but cannot be sites, with why
    (a site pattern that matches only those is an error that says so). ``example`` (a traced
    target's example input, as ``jax.ShapeDtypeStruct`` leaves; None for a hand-written one) is
    what a batch must look like: :func:`check_batch` refuses another structure or kind of dtype.
    """

    forward: ForwardFn
    sites: Mapping[str, Site]
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)
    example: Any = None

    def __call__(self, params: Params, x: Any) -> Any:
        """Clean forward pass: the target's output alone."""
        return self.forward(params, x, {})[0]


def _describe(x: Any) -> str:
    """A batch (or one of its leaves) in words: its type, and dtype and shape where it has them."""
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"an array of dtype {x.dtype} and shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        first = x[0] if x else None
        inner = "" if not x else " of arrays" if hasattr(first, "dtype") else (
            f" of {type(first).__name__}")
        return f"a Python {type(x).__name__}{inner}"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))}"
    return f"a {type(x).__name__}"


def _kind(dtype) -> str:
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex"
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        return "integer"
    return str(dtype)


def check_batch(target: Target, x: Any) -> None:
    """A batch must be arrays of real numbers (not Python lists or scalars, not complex) and,
    for a traced target, have its example input's structure and kind of dtype (float inputs for
    a float model, integer ids for a token model). Raises one ``ValueError`` naming the batch's
    type and dtype and what was expected; a shape check only, so free under ``jit``."""
    example = target.example
    expected = ""
    if example is not None:
        ex_leaves = jax.tree.leaves(example)
        ex = example if len(ex_leaves) != 1 or not hasattr(example, "dtype") else ex_leaves[0]
        expected = (f"; the target was traced on {_describe(ex)}: pass a batch of that "
                    "structure and kind of dtype (any leading shape)")
        if jax.tree.structure(x) != jax.tree.structure(example):
            raise ValueError(f"The batch is {_describe(x)}{expected}.")
    else:
        ex_leaves = [None] * len(jax.tree.leaves(x))
    for leaf, ex in zip(jax.tree.leaves(x), ex_leaves):
        if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
            what = _describe(x) if leaf is x or isinstance(x, (list, tuple)) else _describe(leaf)
            raise ValueError(f"The batch is {what}, not an array{expected or ''}; pass a "
                             "jax or numpy array (e.g. jnp.asarray(batch)).")
        kind = _kind(leaf.dtype)
        if kind not in ("float", "integer"):
            raise ValueError(f"The batch is {_describe(leaf)}: inputs must be real numbers "
                             f"(float, or integer token ids){expected}.")
        if ex is not None and kind != _kind(ex.dtype) and not (
                kind == "integer" and _kind(ex.dtype) == "float"):
            raise ValueError(f"The batch is {_describe(leaf)}{expected}.")


class SiteHooks:
    """Called by a hand-written forward at every site; records inputs and applies replacements.

    Inside a forward written for :func:`from_function`, write a site as
    ``y = hooks("linear1", x, lambda a: a @ W)`` instead of ``y = x @ W``.
    """

    def __init__(self, replace: Mapping[str, SiteFn], *,
                 twice_hint: str = "Give each application its own site name."):
        self.replace = replace
        self.inputs: dict[str, Array] = {}
        self._twice_hint = twice_hint

    def __call__(self, name: str, x: Array, default: SiteFn) -> Array:
        if name in self.inputs:
            raise ValueError(
                f"Site {name!r} was called twice in one forward pass; a site must be one weight "
                f"application. {self._twice_hint}"
            )
        self.inputs[name] = x
        fn = self.replace.get(name)
        return default(x) if fn is None else fn(x)


def from_function(
    fn: Callable[[Params, Any, SiteHooks], Any], sites: Mapping[str, Site] | list[Site]
) -> Target:
    """Makes a :class:`Target` from ``fn(params, x, hooks) -> output``.

    ``fn`` calls ``hooks(name, site_input, default_fn)`` at each site (see :class:`SiteHooks`).
    """
    if not isinstance(sites, Mapping):
        sites = {s.name: s for s in sites}

    def forward(params, x, replace):
        hooks = SiteHooks(replace)
        out = fn(params, x, hooks)
        return out, hooks.inputs

    return Target(forward=forward, sites=dict(sites))


def weight_at(path: tuple, *, transpose: bool = False) -> Callable[[Params], Array]:
    """A weight getter that indexes nested mappings along ``path`` (optionally transposed)."""

    def get(params):
        w = params
        for key in path:
            w = w[key]
        return w.T if transpose else w

    return get
