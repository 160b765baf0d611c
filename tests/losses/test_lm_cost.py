"""The cost at language-model size: output divergences in batch chunks, rematerialised CI
functions and the bfloat16 compute dtype give the plain computation's values and gradients
(bfloat16: within a stated tolerance), and bad options fail early."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spdjax
from spdjax.config import files as configs
from spdjax.losses import adversarial, persistent_pgd as ppgd
from spdjax.losses.adversarial import ADVERSARY
from spdjax.methods import spd


class TinyLM(nn.Module):
    """Embedding, one attention-free MLP block with LayerNorm, an unembedding to ``vocab``."""

    vocab: int = 64

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, 16, name="embed")(ids)
        h = h + nn.Dense(16, name="mlp_out")(nn.gelu(nn.Dense(32, name="mlp_in")(
            nn.LayerNorm(name="ln")(h))))
        return nn.Dense(self.vocab, name="unembed")(h)


def _setup(batch=(5, 8), vocab=64, **decompose):
    m = TinyLM(vocab)
    ids = jax.random.randint(jax.random.key(0), batch, 0, vocab)
    target, tp = spdjax.from_linen(m, m.init(jax.random.key(0), ids), ids)
    d = spdjax.decompose(target, {"mlp_*": 12}, **decompose)
    return d, tp, d.init(jax.random.key(1), tp), ids


def _close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


TERMS = {
    "stochastic_recon": functools.partial(spdjax.stochastic_recon, delta=True),
    "layerwise": functools.partial(spdjax.stochastic_recon_layerwise, sample_chunk=1),
    "subset": functools.partial(spdjax.stochastic_recon_subset, n_samples=1),
    "ci_masked": spdjax.ci_masked_recon,
    # one source for the batch, with a delta channel: mask leaves of leading size 1
    "pgd_shared": functools.partial(adversarial.pgd_recon, n_steps=2, step_size=0.1,
                                    scope="shared_across_batch", delta=True),
}


def test_output_chunks_give_the_same_values_and_gradients():
    d, tp, params, ids = _setup()
    chunked = dataclasses.replace(d, output_chunk=2)  # two chunks, and a ragged third of 1 row

    def losses(decomposition, p):
        ctx = spdjax.make_context(decomposition, tp, p, ids)
        values = {n: fn(p, ctx, jax.random.key(i), divergence="kl")
                  for i, (n, fn) in enumerate(TERMS.items())}
        return sum(values.values()), values

    want = jax.jit(jax.value_and_grad(functools.partial(losses, d), has_aux=True))(params)
    got = jax.jit(jax.value_and_grad(functools.partial(losses, chunked), has_aux=True))(params)
    assert all(float(v) > 1e-4 for v in want[0][1].values())  # every term has a value to check
    _close(got[0], want[0], rtol=2e-5)
    _close(got[1], want[1], rtol=1e-4, atol=1e-7)


def test_persistent_pgd_in_chunks_gives_the_same_value_and_next_state():
    d, tp, params, ids = _setup()
    fn = ppgd.stochastic_pgd_recon_subset
    opts = dict(scope="single_source", pool_size=6, optimizer=optax.adam(0.01), n_warmup_steps=1,
                adv_fraction=0.5, divergence="kl")
    state = fn.adversary_init(d, jax.random.key(7), **opts)
    params = {**params, ADVERSARY: {fn.__name__: state}}

    def run(decomposition):
        def total(p):
            ctx = spdjax.make_context(decomposition, tp, p, ids)
            return fn(p, ctx, jax.random.key(3), term_name=fn.__name__, **opts)

        return jax.jit(jax.value_and_grad(total))(params)

    want, got = run(d), run(dataclasses.replace(d, output_chunk=2))
    _close(got[0], want[0], rtol=2e-5)
    _close(got[1], want[1], rtol=1e-4, atol=1e-6)  # incl. state - new: the same next sources


@pytest.mark.slow  # ~15 s; the chunks' values and gradients are tested in the default suite
def test_output_chunks_bound_the_memory_of_a_large_vocabulary():
    d, tp, params, ids = _setup(batch=(8, 32), vocab=1024)

    def temp_mib(chunk):
        decomposition = dataclasses.replace(d, output_chunk=chunk)

        def loss(p):
            ctx = spdjax.make_context(decomposition, tp, p, ids)
            return spdjax.stochastic_recon(p, ctx, jax.random.key(0), divergence="kl")

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    # the target's own logits (computed once, no gradient) stay whole: one [8, 32, 1024]
    assert temp_mib(1) < 0.5 * temp_mib(0)


def test_a_mask_leaf_that_fits_no_batch_is_refused():
    d, tp, params, ids = _setup()
    ctx = spdjax.make_context(dataclasses.replace(d, output_chunk=2), tp, params, ids)
    masks = {n: jnp.ones((3, 8, 12)) for n in d.site_names}  # 3 rows, the batch has 5
    with pytest.raises(ValueError, match=r"leading axis is neither the batch's \(5 rows\) nor 1"):
        spdjax.losses.recon.output_divergence(params, ctx, masks, "kl")


@pytest.mark.parametrize("ci_fn,options", [
    ("mlp", {}),  # the paper's per-subcomponent MLPs, on inner acts (custom VJP inside)
    ("global_transformer", {"d_model": 16, "layers": 2, "heads": 2}),
])
def test_remat_ci_gives_the_same_values_and_gradients(ci_fn, options):
    d, tp, params, ids = _setup(ci_fn=ci_fn, ci_options=options)
    r = spdjax.decompose(d.target, {"mlp_*": 12}, ci_fn=ci_fn, ci_options=options,
                         remat_ci=True)
    assert getattr(r.ci_fn, "remat", True)  # the transformer's own per-block remat is on

    def loss(decomposition, p):
        ctx = spdjax.make_context(decomposition, tp, p, ids)
        return (spdjax.stochastic_recon(p, ctx, jax.random.key(0), divergence="kl")
                + spdjax.importance_minimality(p, ctx, pnorm=2.0))

    want = jax.jit(jax.value_and_grad(functools.partial(loss, d)))(params)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, r)))(params)
    _close(got, want, rtol=1e-5, atol=1e-8)


def test_remat_ci_lowers_the_temporaries_of_a_transformer_ci_backward():
    options = {"d_model": 32, "layers": 4, "heads": 2}
    d, tp, params, ids = _setup(batch=(8, 64), ci_fn="global_transformer", ci_options=options)
    r = spdjax.decompose(d.target, {"mlp_*": 12}, ci_fn="global_transformer",
                         ci_options=options, remat_ci=True)

    def temp_mib(decomposition):
        def loss(p):
            ctx = spdjax.make_context(decomposition, tp, p, ids)
            return spdjax.importance_minimality(p, ctx, pnorm=2.0)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    assert temp_mib(r) < 0.6 * temp_mib(d)  # one block's activations instead of four


# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-8 ~ 0.4%); on this LM the loss moves
# by under 5% and the gradient keeps a cosine above 0.99 to the float32 one.
BF16_LOSS_RTOL, BF16_GRAD_COSINE = 0.05, 0.99


def test_bfloat16_compute_is_close_to_float32_with_float32_params_and_losses():
    d, tp, params, ids = _setup(ci_fn="global_transformer",
                                ci_options={"d_model": 16, "layers": 1, "heads": 2})
    b = dataclasses.replace(d, compute_dtype="bfloat16")

    def loss(decomposition, p):
        ctx = spdjax.make_context(decomposition, tp, p, ids)
        assert ctx.target_out.dtype == jnp.float32  # the KL's inputs are float32
        assert all(c.lower.dtype == jnp.float32 for c in ctx.ci.values())
        return (spdjax.stochastic_recon(p, ctx, jax.random.key(0), divergence="kl",
                                        delta=True)
                + spdjax.ci_masked_recon(p, ctx, divergence="kl")
                + 1e-3 * spdjax.importance_minimality(p, ctx, pnorm=2.0))

    want = jax.jit(jax.value_and_grad(functools.partial(loss, d)))(params)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, b)))(params)
    assert got[0].dtype == jnp.float32 and np.isfinite(got[0])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got[1]))  # float32 masters
    np.testing.assert_allclose(got[0], want[0], rtol=BF16_LOSS_RTOL)
    g, w = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (got[1], want[1]))
    assert np.all(np.isfinite(g))
    assert g @ w / (np.linalg.norm(g) * np.linalg.norm(w)) > BF16_GRAD_COSINE


@pytest.mark.parametrize("options,match", [
    ({"output_chunk": -1}, "output_chunk must be an integer >= 0"),
    ({"remat_ci": "yes"}, "remat_ci must be True or False"),
    ({"compute_dtype": "float16"}, r"Unknown compute_dtype 'float16'; expected one of "
                                   r"\['bfloat16', 'float32'\]"),
])
def test_bad_cost_options_are_refused(options, match):
    d, *_ = _setup()
    with pytest.raises(ValueError, match=match):
        spdjax.decompose(d.target, {"mlp_*": 12}, **options)
    (key, value), = options.items()
    if key != "remat_ci":  # a config refuses a str for its bool field itself
        with pytest.raises(ValueError, match=match):
            spd.check_config(configs.load("lm:ih", options))


def test_a_chunk_larger_than_the_batch_is_refused_at_config_check():
    config = configs.load("lm:ih", {"output_chunk": 65, "batch_size": 64})
    with pytest.raises(ValueError, match="output_chunk=65 is more rows than a step's batch"):
        spd.check_config(config)
