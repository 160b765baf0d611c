"""The training step: one pure function, jitted at the boundary, shared by every method.

A method supplies an ``objective(params, target_params, batch, key, step_frac) -> (loss,
metrics)`` and an optimizer (:class:`spdjax.methods.Method`); this module turns them into
``step(state, target_params, root_key) -> (state, metrics)`` and knows nothing else about them.

Input checks: the step is traced inside
:func:`~spdjax.core.decomposition.traced_input_checks` and run through
``jax.experimental.checkify``, so a batch with NaN or inf, or token ids outside ``[0, vocab)``,
stops the run with a ``ValueError`` naming the steps, the site and the values, instead of a
``nan`` loss that would read as a divergence. The check is read after every call (one small
transfer; ``input_checks=False`` turns it off). Under an outer transformation (an ensemble's
``vmap`` of the step) the checks are traced but not read.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spdjax.core.decomposition import traced_input_checks
from spdjax.methods.base import Objective
from spdjax.training import sharding as shard_lib

Array = jax.Array
MATMUL_PRECISIONS = ("highest", "tensorfloat32", "bfloat16", "default")


@flax.struct.dataclass
class TrainState:
    """Step counter, the method's params, and the optimizer state (kept separate)."""

    step: Array
    params: Any
    opt_state: Any


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 (the optimizer state inherits the params' shardings).

    Weakly typed leaves (e.g. from ``jnp.full(shape, 0.5)`` in a custom init) are made strongly
    typed: an update would do so, and the step would then compile a second time.
    """
    params = jax.tree.map(
        lambda x: jax.lax.convert_element_type(x, x.dtype) if getattr(x, "weak_type", False)
        else x, params)
    opt_state = jax.jit(optimizer.init, out_shardings=_optimizer_shardings(optimizer, params))(
        params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def _optimizer_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Shardings for ``optimizer.init(params)``: a leaf that mirrors a parameter (Adam's moments:
    its path ends in the parameter's path, same shape) takes that parameter's sharding, the rest
    (step counts) are replicated. Left to the compiler, the moments of C-sharded factors came out
    whole on one device and were then replicated: every device held all of them."""
    leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "sharding")]
    if not leaves:
        return None
    first = leaves[0].sharding
    rest = (NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first)
    by_path = {jax.tree_util.keystr(path): (x.shape, x.sharding)
               for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if hasattr(x, "sharding")}

    def pick(path, leaf):
        text = jax.tree_util.keystr(path)
        matches = [p_path for p_path, (shape, _) in by_path.items()
                   if text.endswith(p_path) and tuple(leaf.shape) == tuple(shape)]
        return by_path[max(matches, key=len)][1] if matches else rest

    shapes = jax.eval_shape(optimizer.init, params)
    return jax.tree_util.tree_map_with_path(pick, shapes)


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[Array], Any],
    *,
    total_steps: int,
    mesh: Mesh | None = None,
    state_sharding: Any = None,
    donate: bool = True,
    microbatches: int = 1,
    matmul_precision: str = "highest",
    steps_per_call: int = 1,
    input_checks: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """Returns jitted ``step(state, target_params, root_key, hparams=None) -> (state, metrics)``.

    ``hparams`` (e.g. a method's loss coefficients, :attr:`Method.hparams`) reach the objective
    as its sixth argument, as traced values: steps that differ only in them share one program.

    The step draws its own batch with ``batch_fn(key)`` on device; the step key is
    ``fold_in(root_key, state.step)``, so a run is a pure function of its seed and can resume.
    With a ``mesh`` the batch is sharded along ``data`` and the state keeps ``state_sharding``
    (from :func:`~spdjax.training.sharding.place_state` after
    :func:`~spdjax.training.sharding.shard_params`).

    ``microbatches > 1`` splits the batch into that many equal chunks and averages their gradients
    (a ``lax.scan``). Every SPD loss term is a mean over examples, so this is the full-batch
    gradient, with each chunk drawing its own masks; it keeps the ``[batch, C, hidden]`` CI
    tensors in cache on CPU, which is several times faster for large C (benchmarks/README.md).

    ``matmul_precision`` (:data:`MATMUL_PRECISIONS`) is every matmul's precision: ``"highest"``
    (float32, as the fp32 reference; GPUs and TPUs otherwise take TF32 / bf16 passes),
    ``"tensorfloat32"``, ``"bfloat16"`` (one bf16 pass, float32 accumulation: close to the
    reference's bf16 autocast) or ``"default"`` (the platform's).

    ``steps_per_call = K > 1`` runs K steps per call (a ``lax.scan`` over the same step, so small
    models are not dispatch-bound on an accelerator); the metrics are then stacked ``[K, ...]``.

    ``input_checks`` (default True): the batch's values are checked in the program and a bad
    one raises ``ValueError`` from the call (module docstring).
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}.")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"Unknown matmul_precision {matmul_precision!r}; expected one of "
                         f"{MATMUL_PRECISIONS}.")
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}.")
    def loss(params, target_params, batch, key, step_frac, hparams):
        if hparams is None:  # a method without hparams: the five-argument objective
            return objective(params, target_params, batch, key, step_frac)
        return objective(params, target_params, batch, key, step_frac, hparams)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def grads_and_metrics(params, target_params, batch, key, step_frac, hparams):
        if microbatches == 1:
            (_, metrics), grads = grad_fn(params, target_params, batch, key, step_frac, hparams)
            return grads, metrics

        def split(x):
            if x.shape[0] % microbatches:
                raise ValueError(
                    f"Batch size {x.shape[0]} is not divisible by microbatches={microbatches}."
                )
            # Chunk i holds rows i, i + n, i + 2n, ...: the data-sharded axis stays leading.
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0)

        def body(acc, inputs):
            i, chunk = inputs
            (_, metrics), grads = grad_fn(
                params, target_params, chunk, jax.random.fold_in(key, i), step_frac, hparams
            )
            return jax.tree.map(jnp.add, acc, (grads, metrics)), None

        chunks = jax.tree.map(split, batch)
        zeros = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(lambda: grad_fn(params, target_params,
                                           jax.tree.map(lambda x: x[0], chunks), key, step_frac,
                                           hparams)),
        )
        init = (zeros[1], zeros[0][1])
        (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(microbatches), chunks))
        return jax.tree.map(lambda a: a / microbatches, (grads, metrics))

    def one_step(state: TrainState, target_params, root_key, hparams):
        key = jax.random.fold_in(root_key, state.step)
        k_batch, k_loss = jax.random.split(key)
        batch = batch_fn(k_batch)
        if mesh is not None:
            batch = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, shard_lib.batch_spec(x))
                ),
                batch,
            )
        step_frac = state.step.astype(jnp.float32) / max(total_steps, 1)
        grads, metrics = grads_and_metrics(state.params, target_params, batch, k_loss, step_frac,
                                           hparams)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def step(state: TrainState, target_params, root_key, hparams=None):
        with jax.default_matmul_precision(matmul_precision):
            if steps_per_call == 1:
                return one_step(state, target_params, root_key, hparams)
            return jax.lax.scan(lambda s, _: one_step(s, target_params, root_key, hparams), state,
                                None, length=steps_per_call)

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None and state_sharding is not None:
        kwargs["out_shardings"] = (state_sharding, NamedSharding(mesh, P()))
    if not input_checks:
        return jax.jit(step, **kwargs)

    def checked_step(state: TrainState, target_params, root_key, hparams=None):
        with traced_input_checks():
            err, out = checkify.checkify(step, errors=checkify.user_checks)(
                state, target_params, root_key, hparams)
        return out, err

    if "out_shardings" in kwargs:
        kwargs["out_shardings"] = (kwargs["out_shardings"], NamedSharding(mesh, P()))
    return CheckedStep(jax.jit(checked_step, **kwargs), steps_per_call, step)


class CheckedStep:
    """A train step with input checks (:func:`make_train_step`): ``step(state, target_params,
    root_key, hparams=None) -> (state, metrics)`` as the plain jitted step, ``lower`` as its
    ``jax.jit`` and ``__wrapped__`` the step without checks.

    The checks' result is read after each call (a ``ValueError`` naming the step), unless
    ``defer`` is set: then each call's result is kept on the device, the call returns without
    waiting for it, and :meth:`raise_pending` reads them all (the managed run does so at every log
    and checkpoint step, so the host never waits for the device between steps)."""

    def __init__(self, jitted, steps_per_call: int, unchecked: Callable, *, defer: bool = False):
        self.jitted, self.steps_per_call, self.__wrapped__ = jitted, steps_per_call, unchecked
        self.defer = defer
        self._pending: list = []

    def __call__(self, state, target_params, root_key, hparams=None):
        (state, metrics), err = self.jitted(state, target_params, root_key, hparams)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(err)):
            return state, metrics  # under an outer transformation: not readable here
        if self.defer:  # the step count copied: the state itself is donated to the next call
            self._pending.append((err, jnp.copy(jax.tree.leaves(state.step)[0])))
        else:
            self._raise(err, jax.tree.leaves(state.step)[0])
        return state, metrics

    def raise_pending(self) -> None:
        """Reads the checks of every call since the last read; raises for the first that
        failed."""
        pending, self._pending = self._pending, []
        for err, step in pending:
            self._raise(err, step)

    def _raise(self, err, step) -> None:
        message = err.get()
        if message is not None:
            end = int(jnp.reshape(step, -1)[0])
            span = (f"step {end}" if self.steps_per_call == 1 else
                    f"steps {end - self.steps_per_call + 1} to {end}")
            raise ValueError(f"Bad input at {span}: {message.split(' (`check` failed)')[0]} "
                             "The data the run trains on is invalid (see the family's batch "
                             "function); nothing of this step was saved.")

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)
