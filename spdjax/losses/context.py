"""What one training step computes once and every loss term reads: :class:`Context`.

Because the causal importances in a context are a function of ``params``, build the context
*inside* the function you differentiate (:func:`make_context`).

Input checks under ``jit``. :func:`make_context` refuses a bad batch with a ``ValueError``:
at once, before any work, for what its shape and dtype show (another structure than the traced
example, a Python list, a complex dtype, an empty batch, a wrong last axis), and, for concrete
inputs, for its values (NaN or inf, token ids outside ``[0, vocab)``, negative ids included).
Under ``jax.jit`` values are not known while tracing, so the value checks become
``jax.experimental.checkify`` checks, emitted only where someone will read them: inside
:func:`checked` (for your own step) and in the managed run's train step
(:func:`spdjax.training.step.make_train_step`, on by default, raising a ``ValueError`` with the
step). A plain ``jax.jit`` of a loss therefore compiles as before, without the value checks::

    update = jax.jit(spdjax.losses.checked(update))   # returns (error, update's outputs)
    err, (params, opt_state, loss) = update(params, opt_state, key)
    err.throw()                                       # ValueError naming the site and values
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import checkify

from spdjax.core.decomposition import (CausalImportance, Decomposition,
                                       traced_input_checks)

Array = jax.Array


try:  # the traces of differentiation (private; without them the check below is skipped)
    from jax._src.core import trace_ctx
    from jax._src.interpreters.ad import JVPTrace, LinearizeTrace
    _AD_TRACES: tuple = (JVPTrace, LinearizeTrace)
except ImportError:  # pragma: no cover
    trace_ctx, _AD_TRACES = None, ()


def _carries(tree: Any, trace) -> bool:
    """Whether a leaf of ``tree`` is a tracer of ``trace``, looking through the tracers of other
    transformations wrapped around it."""
    stack = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.core.Tracer)]
    while stack:
        t = stack.pop()
        if getattr(t, "_trace", None) is trace:
            return True
        stack += [v for v in (getattr(t, "val", None), getattr(t, "primal", None))
                  if isinstance(v, jax.core.Tracer)]
    return False


def _check_ci_is_differentiated(ci: Any) -> None:
    """The CI-gradient trap: a term reads the context's CI while a gradient is being taken (the
    innermost trace differentiates), but the CI does not carry that differentiation, so the CI
    params would get exactly zero gradient, silently: the context was built outside the
    differentiated function. Raises at trace time; a look at the tracers only, no number
    changes."""
    trace = getattr(trace_ctx, "trace", None) if trace_ctx is not None else None
    if not isinstance(trace, _AD_TRACES) or not jax.tree.leaves(ci) or _carries(ci, trace):
        return
    raise ValueError(
        "The context's causal importances are read inside a gradient they do not take part in, "
        "so the CI functions would get exactly zero gradient: the context was built outside the "
        "function you differentiate. Call spdjax.make_context(decomposition, target_params, "
        "params, batch) inside the loss function, with the params it is differentiated with.")


@flax.struct.dataclass
class Context:
    """The batch, the clean target output, each site's clean input and the CI of every site.

    Reading ``ctx.ci`` while differentiating a function the context was not built inside is an
    error (the CI-gradient trap: the CI params would get zero gradient; see
    :func:`make_context`)."""

    decomposition: Decomposition = flax.struct.field(pytree_node=False)
    target_params: Any
    batch: Any
    target_out: Array
    site_inputs: dict[str, Array]
    ci: dict[str, CausalImportance]
    step_frac: Array  # step / total steps, in [0, 1]; used by p-annealing

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if name == "ci":
            _check_ci_is_differentiated(value)
        return value


def make_context(
    decomposition: Decomposition, target_params: Any, params: dict, batch: Any, step_frac=0.0,
    *, ci_lower_noise: float = 0.0, key: Array | None = None,
) -> Context:
    """Clean target forward (output and site inputs) and causal importances for ``batch``
    (``ci_lower_noise`` with ``key``: the noisy ``σ_lo`` input of
    :meth:`~spdjax.core.decomposition.Decomposition.causal_importance`).

    Call it inside the function you differentiate: the CI is a function of ``params``. A
    context built outside (e.g. once per step, before ``jax.value_and_grad(loss_fn)``) would
    give the CI params exactly zero gradient; its loss terms raise ``ValueError`` instead."""
    target_out, site_inputs = decomposition.clean_forward(target_params, batch)
    target_out = jax.lax.stop_gradient(target_out)
    site_inputs = jax.lax.stop_gradient(site_inputs)
    ci = decomposition.causal_importance(params, site_inputs, lower_noise=ci_lower_noise, key=key)
    return Context(
        decomposition=decomposition,
        target_params=target_params,
        batch=batch,
        target_out=target_out,
        site_inputs=site_inputs,
        ci=ci,
        step_frac=jnp.asarray(step_frac, jnp.float32),
    )


def checked(fn: Callable) -> Callable:
    """``fn`` with :func:`make_context`'s value checks kept under ``jax.jit``: returns
    ``(error, fn's outputs)`` (``jax.experimental.checkify.checkify`` with the user checks,
    traced inside :func:`~spdjax.core.decomposition.traced_input_checks`); ``error.throw()``
    raises the first failed check, naming the site and the values. Jit the result
    (``jax.jit(checked(update))``), not the other way round."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with traced_input_checks():
            return checkify.checkify(fn, errors=checkify.user_checks)(*args, **kwargs)

    return run
