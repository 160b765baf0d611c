"""Causal-importance (CI) functions: raw, pre-sigmoid importance per subcomponent.

A CI function is a value with the :class:`CIFunction` protocol (``init``, ``apply``,
``partition_specs``, ``uses_inner_acts``). Provided (``mlp``: SPD paper, appendix "Architecture of
Causal Importance Function MLPs"; the others: the later reference implementation, goodfire-ai/spd;
registered in :data:`CI_FUNCTIONS` under the config names):
  :class:`MLP`        ``mlp``: one tiny MLP per subcomponent on its own inner activation
                      ``h_c = (x V)_c`` (the paper's gamma_c). Input: inner acts ``[..., C]``.
  :class:`VectorMLP`  ``vector_mlp``: one MLP per subcomponent on the whole site input ``x``.
  :class:`SharedMLP`  ``shared_mlp``: one ordinary MLP ``d_in -> hidden -> C`` on the site input.
Global CI functions, one network for the CI of every site (``global_mlp``,
``global_transformer``, ``chunkwise_transformer``), are in :mod:`spdjax.core.ci_global`.

Per-component layers are stored with the component axis first, ``w: (C, fan_in, fan_out)``,
``b: (C, fan_out)``, and evaluated for all components at once with batched einsums.
Init: ``N(0, gain^2 / fan_in)`` with gain sqrt(2) for hidden layers and 1 for the output layer,
biases 0. GELU is the exact (erf) form, as in torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spdjax.core.registry import Registry

Array = jax.Array
_SQRT_HALF = math.sqrt(0.5)  # a Python float: weakly typed, so bfloat16 inputs stay bfloat16
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _cdf(x):
    """The normal CDF ``0.5 (1 + erf(x / √2))``, as torch's exact GELU computes it (XLA:CPU's
    ``erfc``, which ``jax.nn.gelu`` uses, is several times slower; the two differ in the last
    bits)."""
    return 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _gelu(x):
    """The exact (erf) GELU ``x Φ(x)``, torch's ``nn.GELU()``."""
    return x * _cdf(x)


def _layer_dims(fan_in: int, hidden: Sequence[int], fan_out: int) -> list[tuple[int, int]]:
    dims = [fan_in, *hidden, fan_out]
    return list(zip(dims[:-1], dims[1:]))


def _normal(key, shape, fan_in, gain):
    return jax.random.normal(key, shape) * (gain / math.sqrt(fan_in))


def _init_layers(key, dims, lead: tuple[int, ...]) -> list[dict]:
    keys = jax.random.split(key, len(dims))
    layers = []
    for i, (k, (fan_in, fan_out)) in enumerate(zip(keys, dims)):
        gain = 1.0 if i == len(dims) - 1 else math.sqrt(2.0)
        layers.append(
            {
                "w": _normal(k, lead + (fan_in, fan_out), fan_in, gain),
                "b": jnp.zeros(lead + (fan_out,)),
            }
        )
    return layers


def _apply_parallel(layers, a):
    """a: [..., C, fan_in] -> [..., C]; per-component layers."""
    for layer in layers[:-1]:
        a = _gelu(jnp.einsum("...ci,cio->...co", a, layer["w"]) + layer["b"])
    # The output layer has fan_out 1: a multiply-and-reduce, which XLA fuses, rather than C
    # batched [batch, fan_in] x [fan_in, 1] matmuls that force a transpose of ``a``.
    last = layers[-1]
    return jnp.einsum("...ci,ci->...c", a, last["w"][..., 0]) + last["b"][..., 0]


def _scalar_mlp(h, w1, b1, w2, b2):
    """``r[..., c] = sum_j w2[c, j] GELU(h[..., c] w1[c, j] + b1[c, j]) + b2[c]``."""
    return jnp.einsum("...cj,cj->...c", _gelu(h[..., None] * w1 + b1), w2) + b2


def scalar_mlp(h, w1, b1, w2, b2):
    """The paper's per-component CI MLP with one hidden layer, with a hand-fused backward.

    Same values and gradients as autodiff of :func:`_scalar_mlp`. Internally the example axis is
    made the minor one (``[C, hidden, examples]``), so every contraction in the forward and the
    backward is a plain batched matmul over ``C`` with no transposed copy of the
    ``[examples, C, hidden]`` tensor, and the backward evaluates the GELU derivative in closed
    form once (autodiff of erf-GELU costs ~1.7x more on XLA:CPU; benchmarks/README.md).
    """
    lead = h.shape[:-1]
    r_t = _scalar_mlp_t(h.reshape(-1, h.shape[-1]).T, w1, b1, w2, b2)
    return r_t.T.reshape(*lead, -1)


def _hidden_t(h_t, w1, b1):
    return h_t[:, None, :] * w1[..., None] + b1[..., None]  # [C, hidden, examples]


@jax.custom_vjp
def _scalar_mlp_t(h_t, w1, b1, w2, b2):
    """:func:`scalar_mlp` on ``h_t: [C, examples]``, returning ``[C, examples]``."""
    return jnp.einsum("cj,cjb->cb", w2, _gelu(_hidden_t(h_t, w1, b1))) + b2[:, None]


def _scalar_mlp_t_fwd(h_t, w1, b1, w2, b2):
    # GELU(z) = z Φ(z), the primal's values bit for bit; Φ is kept for the backward, which then
    # needs only exp: one transcendental fewer per [C, hidden, examples] value.
    z = _hidden_t(h_t, w1, b1)
    cdf = _cdf(z)
    return jnp.einsum("cj,cjb->cb", w2, z * cdf) + b2[:, None], (h_t, w1, b1, w2, cdf)


def _scalar_mlp_t_bwd(res, dr_t):
    h_t, w1, b1, w2, cdf = res
    z = _hidden_t(h_t, w1, b1)
    dz = dr_t[:, None, :] * w2[..., None] * (cdf + z * jnp.exp(-0.5 * z * z) * _INV_SQRT_2PI)
    dh_t = jnp.einsum("cj,cjb->cb", w1, dz)
    dw1 = jnp.einsum("cjb,cb->cj", dz, h_t)
    dw2 = jnp.einsum("cjb,cb->cj", z * cdf, dr_t)
    return dh_t, dw1, jnp.sum(dz, axis=-1), dw2, jnp.sum(dr_t, axis=-1)


_scalar_mlp_t.defvjp(_scalar_mlp_t_fwd, _scalar_mlp_t_bwd)


# ----------------------------------------------------------------------------- the CI functions


def _check_hidden(name: str, hidden: tuple, *, allow_empty: bool) -> tuple[int, ...]:
    hidden = tuple(hidden)
    if not hidden and not allow_empty:
        raise ValueError(f"CI function {name!r} needs at least one hidden layer; got {hidden!r}.")
    if any(not isinstance(h, int) or isinstance(h, bool) or h <= 0 for h in hidden):
        raise ValueError(f"CI hidden widths must be positive ints; got {list(hidden)!r}.")
    return hidden


@dataclasses.dataclass(frozen=True)
class MLP:
    """The paper's CI function: one tiny MLP per subcomponent on its own inner activation.

    ``gamma_c = MLP_c((x V)_c)``; params per layer ``w: (C, fan_in, fan_out)``, ``b: (C, fan_out)``.
    """

    hidden: tuple[int, ...] = (16,)
    uses_inner_acts: ClassVar[bool] = True  # input: inner acts [..., C] (also for embeddings)

    def __post_init__(self):
        object.__setattr__(self, "hidden", _check_hidden("mlp", self.hidden, allow_empty=False))

    def init(self, key, *, C: int, d_in: int) -> list[dict]:
        return _init_layers(key, _layer_dims(1, self.hidden, 1), (C,))

    def apply(self, params: list[dict], inner_acts: Array, x: Array) -> Array:
        if len(params) == 2:
            l1, l2 = params
            return scalar_mlp(inner_acts, l1["w"][:, 0, :], l1["b"], l2["w"][..., 0],
                              l2["b"][..., 0])
        first, rest = params[0], params[1:]
        # fan_in is 1: the first layer is an elementwise scale per (component, hidden unit).
        a = inner_acts[..., None] * first["w"][:, 0, :] + first["b"]
        return _apply_parallel(rest, _gelu(a))

    def partition_specs(self, params: list[dict], model_axis: str):
        return jax.tree.map(lambda _: P(model_axis), params)  # every leaf has C first


@dataclasses.dataclass(frozen=True)
class VectorMLP:
    """One MLP per subcomponent on the whole site input ``x [..., d_in]`` (later reference)."""

    hidden: tuple[int, ...] = (16,)
    uses_inner_acts: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "hidden",
                           _check_hidden("vector_mlp", self.hidden, allow_empty=False))

    def init(self, key, *, C: int, d_in: int) -> list[dict]:
        return _init_layers(key, _layer_dims(d_in, self.hidden, 1), (C,))

    def apply(self, params: list[dict], inner_acts: Array | None, x: Array) -> Array:
        first, rest = params[0], params[1:]
        a = jnp.einsum("...i,cio->...co", x, first["w"]) + first["b"]
        return _apply_parallel(rest, _gelu(a))

    def partition_specs(self, params: list[dict], model_axis: str):
        return jax.tree.map(lambda _: P(model_axis), params)


@dataclasses.dataclass(frozen=True)
class SharedMLP:
    """One ordinary MLP ``d_in -> hidden -> C`` on the site input (later reference)."""

    hidden: tuple[int, ...] = ()
    uses_inner_acts: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "hidden",
                           _check_hidden("shared_mlp", self.hidden, allow_empty=True))

    def init(self, key, *, C: int, d_in: int) -> list[dict]:
        return _init_layers(key, _layer_dims(d_in, self.hidden, C), ())

    def apply(self, params: list[dict], inner_acts: Array | None, x: Array) -> Array:
        a = x
        for i, layer in enumerate(params):
            a = jnp.einsum("...i,io->...o", a, layer["w"]) + layer["b"]
            if i < len(params) - 1:
                a = _gelu(a)
        return a

    def partition_specs(self, params: list[dict], model_axis: str):
        specs = [{"w": P(), "b": P()} for _ in params]
        specs[-1] = {"w": P(None, model_axis), "b": P(model_axis)}  # only the output has C
        return specs


class CIFunction(Protocol):
    """What a CI function provides (``MLP``, ``VectorMLP``, ``SharedMLP`` or your own).

    ``apply`` returns the raw, pre-sigmoid importance ``[..., C]`` from the inner acts
    ``[..., C]`` (None unless ``uses_inner_acts``) and the site input ``x [..., d_in]``;
    ``partition_specs`` lays the params out with C on ``model_axis`` where they have it.
    """

    uses_inner_acts: bool

    def init(self, key: Array, *, C: int, d_in: int) -> Any: ...

    def apply(self, params: Any, inner_acts: Array | None, x: Array) -> Array: ...

    def partition_specs(self, params: Any, model_axis: str) -> Any: ...


# name -> constructor taking keyword options (configs: ``ci_fn``, ``ci_hidden``, ``ci_options``).
# :mod:`spdjax.core.ci_global` adds the global ones (``global_mlp``, ``global_transformer``,
# ``chunkwise_transformer``) when imported, as :mod:`spdjax.core.decomposition` does.
CI_FUNCTIONS: Registry[Callable[..., CIFunction]] = Registry(
    "CI function type", {"mlp": MLP, "vector_mlp": VectorMLP, "shared_mlp": SharedMLP}
)


def make_ci_fn(name_or_fn: str | CIFunction, hidden: Sequence[int] = (16,),
               options: Mapping[str, Any] | None = None) -> CIFunction:
    """A CI function value from a registered name, hidden widths and ``options`` (values pass
    through). Only the options the named function takes are passed to it (``hidden`` included),
    so one config can carry the options of every kind: e.g. ``d_model`` reaches
    ``global_transformer`` and is ignored by ``mlp``."""
    if not isinstance(name_or_fn, str):
        return name_or_fn
    make = CI_FUNCTIONS.get(name_or_fn)
    takes = inspect.signature(make).parameters
    given = {"hidden": tuple(hidden), **dict(options or {})}
    return make(**{k: v for k, v in given.items() if k in takes})
