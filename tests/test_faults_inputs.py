"""Bad inputs at the library boundary (issue 36, items 5-7): input checks that hold under
``jax.jit``, the CI-gradient trap, batches of the wrong type or dtype, and a site pattern that
matches only some applications of a reused weight."""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.training import loop


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))


class Shared(nn.Module):  # one weight applied twice: sites "shared" and "shared#2"
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(5, name="shared")
        return d(nn.relu(d(x)))


class Tokens(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(3, name="head")(nn.Embed(7, 4, name="embed")(ids))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jnp.ones((1, 5))
    target, target_params = spdjax.from_linen(model, model.init(jax.random.key(0), x), x)
    decomp = spdjax.decompose(target, {"hidden": 4, "out": 4})
    return decomp, target_params, decomp.init(jax.random.key(1), target_params)


@pytest.fixture(scope="module")
def tokens():
    model = Tokens()
    ids = jnp.zeros((2, 3), jnp.int32)
    target, target_params = spdjax.from_linen(model, model.init(jax.random.key(0), ids), ids)
    decomp = spdjax.decompose(target, {"embed": 4, "head": 4})
    return decomp, target_params, decomp.init(jax.random.key(1), target_params)


# -- item 7: batches of the wrong type or dtype ---------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("batch, words", [
    (jnp.ones((4, 5), jnp.complex64), "complex64"),
    ([[1.0] * 5] * 4, "Python list"),
    ({"x": jnp.ones((4, 5))}, "dict with keys ['x']"),
], ids=["complex64", "list", "dict"])
def test_a_batch_of_the_wrong_type_or_dtype_is_one_clear_error(mlp, batch, words, jit):
    decomp, target_params, params = mlp
    fn = lambda b: spdjax.make_context(decomp, target_params, params, b).target_out  # noqa: E731
    with pytest.raises(ValueError, match="The batch is a") as e:
        (jax.jit(fn) if jit else fn)(batch)
    assert words in str(e.value) and "float32" in str(e.value) and "(1, 5)" in str(e.value)


def test_float_ids_for_a_token_model_are_refused(tokens):
    decomp, target_params, params = tokens
    with pytest.raises(ValueError, match="float32.*traced on an array of dtype int32"):
        spdjax.make_context(decomp, target_params, params, jnp.ones((2, 3)))


def test_a_pattern_matching_only_the_first_application_of_a_reused_weight_warns():
    model = Shared()
    x = jnp.ones((1, 5))
    target, _ = spdjax.from_linen(model, model.init(jax.random.key(0), x), x)
    assert {"shared", "shared#2"} <= set(target.sites)
    with pytest.warns(UserWarning, match=r"matches 'shared' but not 'shared#2'"):
        spdjax.decompose(target, {"shared": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spdjax.decompose(target, {"shared*": 4})  # every application: no warning


# -- item 6: the CI-gradient trap ---------------------------------------------------------------

def _loss(decomp, target_params, params, ctx, key):
    return (spdjax.stochastic_recon(params, ctx, key, n_samples=2)
            + 1e-3 * spdjax.importance_minimality(params, ctx, pnorm=1.0))


@pytest.mark.parametrize("jit", [False, True])
def test_a_context_built_outside_the_differentiated_function_is_refused(mlp, jit):
    decomp, target_params, params = mlp
    batch = spdjax.sparse_features(jax.random.key(2), 16, 5, feature_probability=0.5)

    def update(params, key):  # the trap: ctx from outside the function grad differentiates
        ctx = spdjax.make_context(decomp, target_params, params, batch)
        return jax.grad(lambda p: _loss(decomp, target_params, p, ctx, key))(params)

    with pytest.raises(ValueError, match="zero gradient.*built outside the function"):
        (jax.jit(update) if jit else update)(params, jax.random.key(3))

    def right(params, key):  # the README's way: ctx inside; CI params get their gradient
        def loss_fn(p):
            ctx = spdjax.make_context(decomp, target_params, p, batch)
            return _loss(decomp, target_params, p, ctx, key)
        return jax.grad(loss_fn)(params)

    grads = (jax.jit(right) if jit else right)(params, jax.random.key(3))
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["ci"]))


def test_a_context_passed_into_jit_without_differentiation_still_works(mlp):
    decomp, target_params, params = mlp  # evaluation: ctx from one jit, terms in another
    batch = spdjax.sparse_features(jax.random.key(2), 16, 5, feature_probability=0.5)
    ctx = jax.jit(lambda p: spdjax.make_context(decomp, target_params, p, batch))(params)
    value = jax.jit(lambda p, c: _loss(decomp, target_params, p, c, jax.random.key(0)))(params,
                                                                                        ctx)
    assert np.isfinite(float(value))


# -- item 5: input checks that hold under jit -----------------------------------------------------

def _token_loss(decomp, target_params):
    def loss_fn(params, ids, key):
        ctx = spdjax.make_context(decomp, target_params, params, ids)
        return spdjax.stochastic_recon(params, ctx, key, divergence="kl")
    return loss_fn


@pytest.fixture(scope="module")
def checked_token_loss(tokens):
    """The token loss and its checked, jitted value and gradient: one compile for every batch."""
    loss_fn = _token_loss(*tokens[:2])
    return loss_fn, jax.jit(spdjax.losses.checked(jax.value_and_grad(loss_fn)))


@pytest.mark.parametrize("bad, message", [
    (7, r"token ids must be in \[0, 7\); got ids from 0 to 7"),
    (-1, r"token ids must be >= 0; the batch holds the id -1"),
], ids=["id>=vocab", "negative-id"])
def test_bad_token_ids_are_refused_eagerly_and_under_jit(tokens, checked_token_loss, bad,
                                                         message):
    params = tokens[2]
    ids = jnp.zeros((2, 3), jnp.int32).at[1, 2].set(bad)
    loss_fn, checked = checked_token_loss
    with pytest.raises(ValueError, match=message):  # eagerly
        loss_fn(params, ids, jax.random.key(0))
    err, _ = checked(params, ids, jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        err.throw()
    err, (loss, _) = checked(params, jnp.zeros((2, 3), jnp.int32), jax.random.key(0))
    err.throw()  # a good batch passes
    assert np.isfinite(float(loss))


def test_a_rebuilt_checked_function_lowers_to_the_same_program(tokens):
    """Checks are numbered per trace, not per process: a rebuilt train step is the program the
    persistent compilation cache already holds (the numbers are constants of the program)."""
    params, ids = tokens[2], jnp.zeros((2, 3), jnp.int32)
    texts = {jax.jit(spdjax.losses.checked(_token_loss(*tokens[:2])))
             .lower(params, ids, jax.random.key(0)).as_text() for _ in range(2)}
    assert len(texts) == 1


def test_a_nan_batch_is_refused_under_jit_and_plain_jit_still_compiles(mlp):
    decomp, target_params, params = mlp

    def loss_fn(params, batch, key):
        ctx = spdjax.make_context(decomp, target_params, params, batch)
        return _loss(decomp, target_params, params, ctx, key)

    batch = jnp.ones((8, 5)).at[3, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="'hidden': its input holds NaN or inf"):
        loss_fn(params, batch, jax.random.key(0))
    err, _ = jax.jit(spdjax.losses.checked(jax.value_and_grad(loss_fn)))(params, batch,
                                                                         jax.random.key(0))
    with pytest.raises(ValueError, match="'hidden': its input holds NaN or inf"):
        err.throw()
    # Without checked, a jitted loss is the plain program it was (no checks to read).
    assert not np.isfinite(float(jax.jit(loss_fn)(params, batch, jax.random.key(0))))


def test_the_managed_run_stops_on_a_bad_batch_with_a_clear_error_not_a_divergence():

    config = spdjax.config.load("tms:5-2", {"steps": 30, "C": 6, "batch_size": 64,
                                            "eval_batch_size": 256, "log_every": 10,
                                            "figures": False})
    run = spdjax.setup(config, None)
    good = run.experiment.batch_fn

    def bad(key):  # NaN in about one batch in four
        x = good(key)
        return jnp.where(jax.random.uniform(jax.random.fold_in(key, 9)) < 0.25, jnp.nan, x)

    run.experiment = dataclasses.replace(run.experiment, batch_fn=bad)
    run.step_fn = loop.build_step(run)
    with pytest.raises(ValueError, match=r"Bad input at step \d+: Site '.*': its input holds "
                                         "NaN or inf"):
        loop.train(run)
    loop.close(run)


def test_an_ensemble_stops_on_a_bad_batch_of_any_member_with_a_clear_error():
    """The members' input checks are read at log steps too (the ensemble's one program is
    checked as a whole)."""
    config = spdjax.config.load("tms:5-2", {"steps": 20, "C": 6, "batch_size": 64,
                                            "eval_batch_size": 256, "log_every": 10,
                                            "ensemble": 2, "figures": False})
    ens = spdjax.setup_ensemble(config)
    for run, _, _ in ens.groups:
        good = run.experiment.batch_fn
        run.experiment = dataclasses.replace(
            run.experiment, batch_fn=lambda key, good=good: good(key).at[0, 0].set(jnp.inf))
    ens.step_fns.clear()
    with pytest.raises(ValueError, match=r"Bad input by step \d+: Site '.*': its input holds "
                                         "NaN or inf"):
        spdjax.training.ensemble.train(ens)
    spdjax.training.ensemble.close(ens)
    with pytest.raises(RuntimeError, match="This ensemble is closed"):
        spdjax.training.ensemble.train(ens)
