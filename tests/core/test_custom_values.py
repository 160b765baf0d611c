"""Values, not strings: a CI function, a loss term, a sigmoid and a mask sampler written here,
in the test, train a decomposition through the public API like the built-in ones."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import spdjax
from helpers import two_site_target


@dataclasses.dataclass(frozen=True)
class AffineCI:
    """A CI function of our own: gamma = a * (x V) + b per component (no MLP at all)."""

    uses_inner_acts = True

    def init(self, key, *, C, d_in):
        return {"a": jnp.ones((C,)), "b": jnp.full((C,), 0.5)}

    def apply(self, params, inner_acts, x):
        return params["a"] * inner_acts + params["b"]

    def partition_specs(self, params, model_axis):
        return {"a": P(model_axis), "b": P(model_axis)}


def weight_norm(params, ctx, key, *, scale):
    """A loss term of our own: scale * sum of squared factors."""
    return scale * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(params["components"]))


def half_sampler(key, shape, dtype):
    return jnp.full(shape, 0.5, dtype)


def test_custom_ci_loss_sigmoid_and_sampler_train_through_the_public_api():
    target, tparams = two_site_target()
    sigmoid = spdjax.SigmoidPair(jax.nn.sigmoid, jax.nn.sigmoid)
    decomp = spdjax.decompose(target, {"*": 4}, ci_fn=AffineCI(), sigmoid=sigmoid)
    assert decomp.ci_fn == AffineCI() and decomp.sigmoid is sigmoid
    params = decomp.init(jax.random.key(0), tparams, init=spdjax.init_gaussian)
    assert set(params["ci"]["a"]) == {"a", "b"}
    terms = [spdjax.term("stochastic_recon", 1.0, sampling=half_sampler),
             spdjax.term(weight_norm, 1e-3, scale=2.0),
             spdjax.term("importance_minimality", 1e-3, pnorm=1.0)]
    assert [t.name for t in terms] == ["stochastic_recon", "weight_norm", "importance_minimality"]
    objective = chex.assert_max_traces(spdjax.spd_objective(decomp, terms), n=1)
    opt = optax.adam(1e-2)
    step = spdjax.make_train_step(
        objective, opt, lambda k: jax.random.normal(k, (64, 3)), total_steps=100)
    state = spdjax.init_train_state(params, opt)
    losses = []
    for _ in range(100):  # one trace of the objective: no recompiles across steps
        state, metrics = step(state, tparams, jax.random.key(1))
        losses.append(float(metrics["loss"]["total"]))
    assert set(metrics["loss"]) == {"total", "stochastic_recon", "weight_norm",
                                    "importance_minimality"}
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    # The custom term's value is what the function computes from the params it saw.
    ctx = spdjax.make_context(decomp, tparams, state.params, jnp.ones((2, 3)))
    chex.assert_trees_all_close(terms[1](state.params, ctx, jax.random.key(0)),
                                weight_norm(state.params, ctx, None, scale=2.0))


def test_custom_ci_function_shards_by_its_own_partition_specs():
    target, tparams = two_site_target()
    decomp = spdjax.decompose(target, {"*": 4}, ci_fn=AffineCI())
    params = decomp.init(jax.random.key(0), tparams)
    mesh = spdjax.make_mesh(data=4, model=2)
    sharded = spdjax.shard_params(decomp, params, mesh)
    assert sharded["ci"]["b"]["a"].sharding.spec == P("model")
    assert sharded["components"]["a"]["V"].sharding.spec == P(None, "model")


def test_bad_custom_values_fail_early_and_clearly():
    target, _ = two_site_target()
    with pytest.raises(ValueError, match="Unknown CI function type 'affine'"):
        spdjax.decompose(target, {"*": 4}, ci_fn="affine")
    with pytest.raises(ValueError, match="Loss 'weight_norm': bad options"):
        spdjax.term(weight_norm, 1.0, scal=2.0)
    with pytest.raises(ValueError, match="Unknown mask sampling 'half'"):
        spdjax.term("stochastic_recon", 1.0, sampling="half")
    with pytest.raises(ValueError, match="coeff must be a number"):
        spdjax.term(weight_norm, "big", scale=1.0)
    with pytest.raises(ValueError, match="unique"):
        spdjax.total_loss([spdjax.term(weight_norm, 1.0, scale=1.0)] * 2)


def test_a_batch_that_does_not_fit_a_site_is_an_error_naming_both_sizes():
    target, tparams = two_site_target(d_in=3)
    decomp = spdjax.decompose(target, {"a": 4})
    params = decomp.init(jax.random.key(0), tparams)
    with pytest.raises((ValueError, TypeError)) as err:
        spdjax.make_context(decomp, tparams, params, jnp.ones((2, 5)))
    assert "3" in str(err.value) and "5" in str(err.value)


def test_registries_answer_membership_and_resolve_names_or_values():
    from spdjax.training.schedules import SCHEDULES

    assert "cosine" in SCHEDULES and "cos" not in SCHEDULES
    assert spdjax.SIGMOIDS.resolve("hard") is spdjax.SIGMOIDS["hard"]
    pair = spdjax.SigmoidPair(jax.nn.sigmoid, jax.nn.sigmoid)
    assert spdjax.SIGMOIDS.resolve(pair) is pair and spdjax.SIGMOIDS.name_of(pair) is None
    with pytest.raises(ValueError, match=r"Unknown lr schedule 'cos'; expected one of \["):
        SCHEDULES.get("cos")
    with pytest.raises(ValueError, match="already registered"):
        spdjax.SIGMOIDS.register("hard", pair)
