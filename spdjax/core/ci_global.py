"""Global causal-importance functions: one network computes the raw CI of every decomposed site.

The per-site CI functions of :mod:`spdjax.core.ci` see one site's input each. A *global* CI
function sees the inputs of all sites at once, so the importance of a subcomponent in one matrix
can depend on what every other matrix receives (VPD, "Interpreting Language Model Parameters",
Bushnaq et al. 2026: "one global bidirectional transformer fed with the RMS-normed concatenated
activations of all matrices"; docs/guides/methods.md, "CI functions"). Provided, and registered
in :data:`spdjax.core.ci.CI_FUNCTIONS` under their config names:

  :class:`GlobalMLP`            ``global_mlp``: one MLP on the concatenation of every site's
                                input ``[..., sum d_in]``, then one linear head per site.
  :class:`GlobalTransformer`    ``global_transformer``: RMS-norm each site's input, concatenate,
                                project to ``d_model``, pre-norm transformer blocks with RoPE
                                attention over positions, one linear head per site.
  :class:`ChunkwiseTransformer` ``chunkwise_transformer``: the same, but the sites are split into
                                consecutive chunks of ``sites_per_chunk`` (decomposition order),
                                each with its own independent transformer on its sites' inputs:
                                how the later reference scales the global transformer to deep
                                models (goodfire-ai/param-decomp's chunkwise CI function).

The protocol (:class:`GlobalCIFunction`) differs from the per-site one in what ``init`` and
``apply`` see: every site, as ``{site: (d_in, C)}`` and ``{site: x [..., d_in]}``; ``apply``
returns ``{site: raw CI [..., C]}``. A decomposition keeps the params in
``params["ci"][GLOBAL]`` (:data:`GLOBAL`). Sites are concatenated in sorted-name order (the
order of a dict's keys in a JAX pytree), so params made by ``init`` fit ``apply`` whatever order
the inputs come in.

Every site has its own output head ``{"w": (width, C), "b": (C,)}``: its C axis is sharded on
the model axis like the factors; the trunk (hidden layers, projections, blocks) has no C axis
and is replicated, or, for the transformers with ``shard_trunk=True``, split Megatron-style
(attention heads and MLP hidden units on the model axis).

Sequence inputs ``[batch, pos, d_in]`` attend over ``pos``; inputs without a position axis
(TMS, ResidMLP: ``[batch, d_in]``) are one position each, so attention is the identity map on
the value projection and the transformer is a position-wise residual network. Leading axes
beyond ``[..., pos, d]`` are batch axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from spdjax.core.ci import CI_FUNCTIONS, _check_hidden, _gelu, _normal

Array = jax.Array
GLOBAL = "__global__"  # the key of a global CI function's params in params["ci"]
# torch's F.rms_norm default (eps=None: the dtype's machine epsilon), which the reference's
# CI transformer uses; float32 here.
RMS_EPS = float(np.finfo(np.float32).eps)
_RELU_GAIN = math.sqrt(2.0)


def is_global(ci_fn: Any) -> bool:
    """Whether ``ci_fn`` is a global CI function (one network for all sites)."""
    return bool(getattr(ci_fn, "is_global", False))


class GlobalCIFunction(Protocol):
    """What a global CI function provides (:class:`GlobalMLP`, :class:`GlobalTransformer`, ...).

    ``init(key, sites={site: (d_in, C)})`` -> params; ``apply(params, {site: x [..., d_in]})``
    -> ``{site: raw, pre-sigmoid CI [..., C]}`` (all inputs share their leading axes);
    ``partition_specs`` lays the params out with every C axis on ``model_axis``.
    """

    is_global: bool  # True
    uses_inner_acts: bool  # False: global functions read the sites' inputs

    def init(self, key: Array, *, sites: Mapping[str, tuple[int, int]]) -> Any: ...

    def apply(self, params: Any, xs: Mapping[str, Array]) -> dict[str, Array]: ...

    def partition_specs(self, params: Any, model_axis: str) -> Any: ...


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: Array, eps: float = RMS_EPS) -> Array:
    """``x / sqrt(mean(x², axis=-1) + eps)``, without a learned scale (as the reference); the
    mean of squares in float32 whatever ``x``'s dtype (a bfloat16 sum of thousands of squares
    loses its low bits)."""
    x32 = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x * scale.astype(x.dtype)


def rope(x: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding of ``x [..., pos, heads, d_head]`` (``d_head`` even).

    The "rotate half" form: channel ``i`` and ``i + d_head/2`` are the two coordinates of a
    plane rotated by ``pos * base^(-2i/d_head)`` (Su et al. 2021, RoFormer, eq. 34).
    """
    T, dh = x.shape[-3], x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)  # (dh/2,)
    angles = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq  # (pos, dh/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :].astype(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(q: Array, k: Array, v: Array, *, causal: bool) -> Array:
    """Softmax attention ``q, k, v [..., pos, heads, d_head] -> [..., pos, heads, d_head]``,
    scaled by ``1/sqrt(d_head)``; ``causal`` lets position t attend to positions <= t only."""
    s = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[-3]
        allowed = jnp.tril(jnp.ones((T, T), bool))
        s = jnp.where(allowed, s, jnp.finfo(s.dtype).min)
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(s, axis=-1), v)


def _linear(key, fan_in: int, fan_out: int, gain: float) -> dict:
    return {"w": _normal(key, (fan_in, fan_out), fan_in, gain), "b": jnp.zeros((fan_out,))}


def _heads_init(key, width: int, sites: Mapping[str, tuple[int, int]]) -> dict:
    """One linear head ``width -> C`` per site (gain 1, as the output layer of every CI MLP)."""
    return {n: _linear(jax.random.fold_in(key, i), width, C, 1.0)
            for i, (n, (_, C)) in enumerate(sites.items())}


def _heads_apply(heads: Mapping[str, dict], h: Array) -> dict[str, Array]:
    return {n: jnp.einsum("...i,ic->...c", h, p["w"]) + p["b"] for n, p in heads.items()}


def _heads_specs(heads: Mapping[str, dict], model_axis: str) -> dict:
    return {n: {"w": P(None, model_axis), "b": P(model_axis)} for n in heads}


def _concat(xs: Mapping[str, Array], names: Sequence[str], *, normalize: bool) -> Array:
    """``[..., sum d_in]``: the inputs of ``names`` (sorted), each RMS-normed if ``normalize``."""
    lead = {n: tuple(xs[n].shape[:-1]) for n in names}
    if len(set(lead.values())) > 1:
        raise ValueError(f"A global CI function needs every site's input to share its leading "
                         f"(batch, position) axes; got {lead}.")
    return jnp.concatenate([rms_norm(xs[n]) if normalize else xs[n] for n in sorted(names)],
                           axis=-1)


def _check_sites(name: str, sites: Mapping[str, tuple[int, int]]) -> None:
    if not sites:
        raise ValueError(f"CI function {name!r}: no sites to compute CI for.")


# ----------------------------------------------------------------------------- global MLP


@dataclasses.dataclass(frozen=True)
class GlobalMLP:
    """One MLP ``sum d_in -> hidden... -> {site: C}`` on the concatenated site inputs.

    Params: ``{"trunk": [{"w": (fan_in, fan_out), "b": (fan_out,)}, ...], "heads": {site:
    {"w": (width, C), "b": (C,)}}}``; GELU after every trunk layer, none after the heads (the
    reference's global shared MLP, its output split per site). ``hidden=()`` is one linear map.
    """

    hidden: tuple[int, ...] = (64,)
    is_global: ClassVar[bool] = True
    uses_inner_acts: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "hidden",
                           _check_hidden("global_mlp", self.hidden, allow_empty=True))

    def init(self, key, *, sites: Mapping[str, tuple[int, int]]) -> dict:
        _check_sites("global_mlp", sites)
        dims = [sum(d for d, _ in sites.values()), *self.hidden]
        kt, kh = jax.random.split(key)
        trunk = [_linear(jax.random.fold_in(kt, i), a, b, _RELU_GAIN)
                 for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]
        return {"trunk": trunk, "heads": _heads_init(kh, dims[-1], sites)}

    def apply(self, params: dict, xs: Mapping[str, Array]) -> dict[str, Array]:
        h = _concat(xs, list(params["heads"]), normalize=False)
        for layer in params["trunk"]:
            h = _gelu(jnp.einsum("...i,io->...o", h, layer["w"]) + layer["b"])
        return _heads_apply(params["heads"], h)

    def partition_specs(self, params: dict, model_axis: str) -> dict:
        return {"trunk": [{"w": P(), "b": P()} for _ in params["trunk"]],
                "heads": _heads_specs(params["heads"], model_axis)}


# ----------------------------------------------------------------------------- transformers


@dataclasses.dataclass(frozen=True)
class GlobalTransformer:
    """A transformer over every site's input: RMS-norm each, concatenate, project to ``d_model``,
    ``layers`` pre-norm blocks (RMS-norm -> multi-head RoPE attention -> residual; RMS-norm ->
    ``d_model -> ff -> d_model`` GELU MLP -> residual), then one linear head per site.

    VPD's (Bushnaq et al. 2026): d_model 2048, 8 layers, 16 heads, ff 8192, bidirectional.
    ``ff=0`` means ``4 * d_model``. ``causal`` restricts attention to earlier positions; the
    default, bidirectional, is VPD's and is the one that can see what a subcomponent's output
    at position t is used for: attention carries it to every later position, so its importance
    there depends on the tokens after t. Causal CI (the CI of a prefix does not change when
    tokens are appended) suits streaming analyses.

    Init (the reference's): projections into the trunk and the MLPs' first layers
    ``N(0, 2/fan_in)``, MLP second layers and heads ``N(0, 1/fan_in)``, attention projections
    ``U(±1/sqrt(d_model))`` (torch's ``nn.Linear`` default), biases 0. Params:
    ``{"chunks": [{"in": {"w", "b"}, "blocks": [{"q", "k", "v", "o": {"w": (d_model, d_model)},
    "mlp_in": {"w": (d_model, ff), "b"}, "mlp_out": {"w": (ff, d_model), "b"}}, ...],
    "heads": {site: {"w", "b"}}}]}`` (one chunk; :class:`ChunkwiseTransformer` has several).
    Every weight matrix is a leaf named ``w``, so Muon (``config.optimizer.ci.name="muon"``)
    orthogonalises each of them, as VPD trains its CI transformer.
    """

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ff: int = 0
    causal: bool = False
    rope_base: float = 10000.0
    shard_trunk: bool = False  # Megatron-style: attention heads and MLP units on the model axis
    # Rematerialise each block in the backward pass (a scan of jax.checkpoint'ed blocks): the
    # backward keeps the residual stream between blocks and one block's activations at a time
    # (decompose(remat_ci=True) sets it).
    remat: bool = False
    is_global: ClassVar[bool] = True
    uses_inner_acts: ClassVar[bool] = False
    _name: ClassVar[str] = "global_transformer"

    def __post_init__(self):
        for field in ("d_model", "layers", "heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (
                    0 if field == "layers" else 1):
                raise ValueError(f"CI function {self._name!r}: {field} must be a "
                                 f"{'non-negative' if field == 'layers' else 'positive'} int, "
                                 f"got {value!r}.")
        if not isinstance(self.ff, int) or isinstance(self.ff, bool) or self.ff < 0:
            raise ValueError(f"CI function {self._name!r}: ff must be an int >= 0 (0: 4 * "
                             f"d_model), got {self.ff!r}.")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"CI function {self._name!r}: d_model={self.d_model} must split "
                             f"into heads={self.heads} heads of even width (RoPE rotates "
                             "pairs of channels).")
        if not isinstance(self.causal, bool) or not isinstance(self.shard_trunk, bool):
            raise ValueError(f"CI function {self._name!r}: causal and shard_trunk must be true "
                             f"or false, got {self.causal!r}, {self.shard_trunk!r}.")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"CI function {self._name!r}: rope_base must be > 1, got "
                             f"{self.rope_base!r}.")

    @property
    def ff_width(self) -> int:
        return self.ff or 4 * self.d_model

    def chunks(self, names: Sequence[str]) -> list[list[str]]:
        """The groups of sites that share one transformer (here: all of them)."""
        return [list(names)]

    def init(self, key, *, sites: Mapping[str, tuple[int, int]]) -> dict:
        _check_sites(self._name, sites)
        return {"chunks": [
            self._init_chunk(jax.random.fold_in(key, i), {n: sites[n] for n in names})
            for i, names in enumerate(self.chunks(list(sites)))]}

    def _init_chunk(self, key, sites: Mapping[str, tuple[int, int]]) -> dict:
        d, ff = self.d_model, self.ff_width
        d_in = sum(di for di, _ in sites.values())
        k_in, k_heads, k_blocks = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(d)

        def block(k):
            kq, kk, kv, ko, k1, k2 = jax.random.split(k, 6)
            attn = {name: {"w": jax.random.uniform(kx, (d, d), minval=-bound, maxval=bound)}
                    for name, kx in (("q", kq), ("k", kk), ("v", kv), ("o", ko))}
            return {**attn, "mlp_in": _linear(k1, d, ff, _RELU_GAIN),
                    "mlp_out": _linear(k2, ff, d, 1.0)}

        return {"in": _linear(k_in, d_in, d, _RELU_GAIN),
                "blocks": [block(jax.random.fold_in(k_blocks, i)) for i in range(self.layers)],
                "heads": _heads_init(k_heads, d, sites)}

    def apply(self, params: dict, xs: Mapping[str, Array]) -> dict[str, Array]:
        out = {}
        for chunk in params["chunks"]:
            out.update(self._apply_chunk(chunk, xs))
        return out

    def _apply_chunk(self, chunk: dict, xs: Mapping[str, Array]) -> dict[str, Array]:
        x = _concat(xs, list(chunk["heads"]), normalize=True)
        if x.ndim < 2:
            raise ValueError(f"CI function {self._name!r} needs inputs [batch, ..., d_in]; got "
                             f"a single vector of shape {tuple(x.shape)}.")
        positionless = x.ndim == 2  # [batch, d]: each example is a sequence of length 1
        if positionless:
            x = x[:, None, :]
        h = jnp.einsum("...ti,id->...td", x, chunk["in"]["w"]) + chunk["in"]["b"]
        if self.remat and chunk["blocks"]:
            # A scan over the stacked blocks, each rematerialised: the loop fixes the order, so
            # the backward holds one block's activations (XLA may hoist the recomputations of
            # an unrolled chain and keep them all).
            blocks = jax.tree.map(lambda *w: jnp.stack(w), *chunk["blocks"])
            h, _ = jax.lax.scan(lambda c, b: (jax.checkpoint(self._block)(b, c), None), h, blocks)
        else:
            for block in chunk["blocks"]:
                h = self._block(block, h)
        if positionless:
            h = h[:, 0, :]
        return _heads_apply(chunk["heads"], h)

    def _block(self, block: dict, h: Array) -> Array:
        """One pre-norm block on the residual stream ``h [..., pos, d_model]``."""
        h = h + self._attend(block, rms_norm(h))
        mlp_in, mlp_out = block["mlp_in"], block["mlp_out"]
        z = jnp.einsum("...td,df->...tf", rms_norm(h), mlp_in["w"]) + mlp_in["b"]
        return h + jnp.einsum("...tf,fd->...td", _gelu(z), mlp_out["w"]) + mlp_out["b"]

    def _attend(self, block: dict, h: Array) -> Array:
        """Multi-head RoPE attention of ``h [..., pos, d_model]`` (no biases, as the
        reference's)."""
        nh = self.heads

        def split(w):  # [..., pos, d] -> [..., pos, heads, d_head]
            y = jnp.einsum("...td,de->...te", h, w)
            return y.reshape(*y.shape[:-1], nh, y.shape[-1] // nh)

        q, k, v = (split(block[w]["w"]) for w in ("q", "k", "v"))
        q, k = rope(q, self.rope_base), rope(k, self.rope_base)
        o = attention(q, k, v, causal=self.causal)
        return jnp.einsum("...te,ed->...td", o.reshape(*o.shape[:-2], -1), block["o"]["w"])

    def partition_specs(self, params: dict, model_axis: str) -> dict:
        m = model_axis if self.shard_trunk else None

        def block():  # columns of q, k, v and rows of o are heads; mlp_in/out split ff
            return {"q": {"w": P(None, m)}, "k": {"w": P(None, m)}, "v": {"w": P(None, m)},
                    "o": {"w": P(m, None)}, "mlp_in": {"w": P(None, m), "b": P(m)},
                    "mlp_out": {"w": P(m, None), "b": P()}}

        return {"chunks": [{"in": {"w": P(), "b": P()},
                            "blocks": [block() for _ in chunk["blocks"]],
                            "heads": _heads_specs(chunk["heads"], model_axis)}
                           for chunk in params["chunks"]]}


@dataclasses.dataclass(frozen=True)
class ChunkwiseTransformer(GlobalTransformer):
    """:class:`GlobalTransformer`, one independent copy per chunk of ``sites_per_chunk``
    consecutive sites (decomposition order; the last chunk may be smaller). Each chunk reads the
    RMS-normed inputs of its own sites only.

    The later reference (goodfire-ai/param-decomp) scales its CI transformer to deep models this
    way: a chunk is a block of layers, and its transformers are stacked and scanned so that one
    chunk's weights are live at a time. Here chunks may differ in width and C, and are applied
    one after the other.
    """

    sites_per_chunk: int = 0
    _name: ClassVar[str] = "chunkwise_transformer"

    def __post_init__(self):
        super().__post_init__()
        n = self.sites_per_chunk
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"CI function 'chunkwise_transformer' needs sites_per_chunk >= 1 "
                             f"(config: ci_options.sites_per_chunk), got {n!r}.")

    def chunks(self, names: Sequence[str]) -> list[list[str]]:
        n = self.sites_per_chunk
        return [list(names[i:i + n]) for i in range(0, len(names), n)]


for _name, _fn in (("global_mlp", GlobalMLP), ("global_transformer", GlobalTransformer),
                   ("chunkwise_transformer", ChunkwiseTransformer)):
    CI_FUNCTIONS.register(_name, _fn)
