"""Persistent PGD (VPD): scopes and pool, one step against a float64 NumPy reference (warm-up
kept, Adam ascent, [0, 1] box), the merged stochastic/PGD term, per-term state optimizers, option
checks, jit + vmap, and a managed run that resumes."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spdjax
from spdjax.losses import persistent_pgd as ppgd
from spdjax.core.routing import make_router, route
from spdjax.losses.adversarial import ADVERSARY, assign_state
from spdjax.methods import adversary

from helpers import two_site_target

B, C = 6, {"a": 4, "b": 3}
B1, B2, LR = 0.5, 0.99, 0.05


@pytest.fixture(scope="module")
def setup():
    target, tp = two_site_target(d_in=3, d_hidden=4, d_out=2)
    d = spdjax.decompose(target, C, ci_hidden=(3,))
    params = jax.jit(d.init)(jax.random.key(0), tp)
    x = jax.random.normal(jax.random.key(1), (B, 3))
    return d, tp, params, x


def _with_state(d, params, fn, key=jax.random.key(7), **options):
    state = fn.adversary_init(d, key, **options)
    return {**params, ADVERSARY: {fn.__name__: state}}


def _adam(lr=LR):
    return optax.adam(lr, b1=B1, b2=B2)


def _step(d, tp, x, fn, params, key, coeff=0.5, **options):
    """One training step of the state: the gradient of ``coeff * term``, then the term's
    adversary optimizer (as :func:`spdjax.methods.adversary.with_adversary` applies it)."""
    bound = functools.partial(fn, **options)
    tx = adversary.with_adversary(optax.sgd(0.0), {n: fn.adversary_optimizer()
                                                   for n in params[ADVERSARY]})

    @jax.jit  # the gradient and the update compiled together (eager dispatch is slow)
    def step(params):
        def total(p):
            return coeff * bound(p, spdjax.make_context(d, tp, p, x), key)

        value, grads = jax.value_and_grad(total)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return value / coeff, optax.apply_updates(params, updates)[ADVERSARY][fn.__name__]

    return step(params)


# ---------------------------------------------------------------- float64 NumPy reference


def _np_forward(d, tp, params, x, masks):
    """relu(site a) -> site b with masks {site: [B, C]}: (x V * m) U (+ bias)."""
    f = {n: [np.asarray(a, np.float64) for a in d.factors(params, n)] for n in "ab"}
    h = np.maximum((np.asarray(x, np.float64) @ f["a"][0] * masks["a"]) @ f["a"][1]
                   + np.asarray(tp["a"]["bias"], np.float64), 0)
    return (h @ f["b"][0] * masks["b"]) @ f["b"][1]


def _np_loss(d, tp, params, x, lower, target_out, rows):
    def loss(sources):
        masks = {n: lower[n] + (1 - lower[n]) * sources[n][rows] for n in "ab"}
        return np.mean((_np_forward(d, tp, params, x, masks) - target_out) ** 2)
    return loss


def _np_grad(loss, sources, h=1e-6):
    grads = {}
    for n, s in sources.items():
        g = np.zeros_like(s)
        for i in np.ndindex(s.shape):
            up, down = {k: v.copy() for k, v in sources.items()}, {k: v.copy() for k, v in
                                                                   sources.items()}
            up[n][i] += h
            down[n][i] -= h
            g[i] = (loss(up) - loss(down)) / (2 * h)
        grads[n] = g
    return grads


def _np_adam_ascent(s, g, m, v, t):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    step = LR * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + 1e-8)
    return np.clip(s + step, 0, 1), m, v


def test_one_pooled_step_keeps_the_warm_up_and_matches_numpy(setup):
    d, tp, params, x = setup
    fn, pool, key = ppgd.persistent_pgd_recon, 4, jax.random.key(3)
    params = _with_state(d, params, fn, pool_size=pool, optimizer=_adam())
    value, state = _step(d, tp, x, fn, params, key, pool_size=pool, optimizer=_adam(),
                         n_warmup_steps=1)

    ctx = jax.jit(lambda p: spdjax.make_context(d, tp, p, x))(params)
    lower = {n: np.asarray(ctx.ci[n].lower, np.float64) for n in "ab"}
    rows = np.asarray(ppgd.pool_rows(key, B, pool))
    loss = _np_loss(d, tp, params, x, lower, np.asarray(ctx.target_out, np.float64), rows)
    s = {n: np.asarray(params[ADVERSARY][fn.__name__]["sources"][n], np.float64) for n in "ab"}
    m = {n: np.zeros_like(s[n]) for n in s}
    v = {n: np.zeros_like(s[n]) for n in s}
    for t in (1, 2):  # the warm-up ascent, then the outer ascent from the warmed-up sources
        if t == 2:
            np.testing.assert_allclose(value, loss(s), rtol=1e-4)  # the value is at the warm-up
        g = _np_grad(loss, s)
        for n in s:
            s[n], m[n], v[n] = _np_adam_ascent(s[n], g[n], m[n], v[n], t)
    for n in "ab":
        assert state["sources"][n].shape == (pool, C[n])
        np.testing.assert_allclose(state["sources"][n], s[n], atol=2e-4)
    assert float(state["opt_state"]["000"]) == 2.0  # Adam's count: warm-up + outer


def test_scopes_store_and_expand_as_the_reference(setup):
    lead, c = (6, 5), 3
    shapes = {"single_source": (c,), "broadcast_across_batch": (5, c),
              "repeat_across_batch": (2, 5, c), "per_batch_per_position": (6, 5, c)}
    rng = np.random.default_rng(0)
    for scope, shape in shapes.items():
        assert ppgd.source_shape(c, scope=scope, batch_shape=lead, n_sources=2) == shape
        s = rng.uniform(size=shape).astype(np.float32)
        out = np.asarray(jax.jit(functools.partial(ppgd.expand_sources, leading=lead,
                                                   scope=scope))(s))
        expected = {"single_source": lambda: np.broadcast_to(s, (*lead, c)),
                    "broadcast_across_batch": lambda: np.broadcast_to(s[None], (*lead, c)),
                    "repeat_across_batch": lambda: s[np.arange(6) % 2],  # example b: b % n
                    "per_batch_per_position": lambda: s}[scope]()
        np.testing.assert_array_equal(out, expected)
    # A per-example scope meets the evaluation's batch of any size by cycling (example b: b % n);
    # other positions fail.
    s = rng.uniform(size=shapes["per_batch_per_position"]).astype(np.float32)
    for batch in (12, 8, 4):
        out = ppgd.expand_sources(s, (batch, 5), scope="per_batch_per_position")
        np.testing.assert_array_equal(out, s[np.arange(batch) % 6])
    with pytest.raises(ValueError, match="do not fit"):
        ppgd.expand_sources(s, (6, 4), scope="per_batch_per_position")
    for scope, shape in (("single_source", (4, c)), ("broadcast_across_batch", (4, 5, c))):
        assert ppgd.source_shape(c, scope=scope, batch_shape=lead, pool_size=4) == shape
        s = rng.uniform(size=shape).astype(np.float32)
        rows = np.array([3, 0, 0, 2, 1, 3])
        out = np.asarray(ppgd.expand_sources(s, lead, scope=scope, rows=rows))
        per_example = s[rows] if s.ndim == 3 else s[rows][:, None]
        np.testing.assert_array_equal(out, np.broadcast_to(per_example, (*lead, c)))


def test_position_scopes_train_per_example(setup):
    """Sequence inputs [B, T, d]: per-batch-per-position sources with the merged term: only the
    examples assigned adversarial get a source gradient, whole examples at a time."""
    d, tp, params, _ = setup
    T, fn = 5, ppgd.stochastic_pgd_recon_subset
    x = jax.random.normal(jax.random.key(2), (16, T, 3))
    options = dict(scope="per_batch_per_position", batch_shape=(16, T), optimizer=_adam())
    params = _with_state(d, params, fn, **options)
    before = params[ADVERSARY][fn.__name__]["sources"]["a"]

    def moved(adv_fraction):  # [16, T]: the positions whose sources the step moved
        _, state = _step(d, tp, x, fn, params, jax.random.key(4), adv_fraction=adv_fraction,
                         **options)
        return np.asarray(jnp.any(state["sources"]["a"] != before, axis=-1))

    everywhere, half = moved(1.0), moved(0.5)
    assert everywhere.shape == (16, T) and everywhere.any(axis=1).all()
    adversarial = half.any(axis=1)  # an example is adversarial as a whole, or not at all
    np.testing.assert_array_equal(half, everywhere & adversarial[:, None])
    assert 0 < adversarial.sum() < 16


def test_merged_term_at_the_extremes(setup):
    d, tp, params, x = setup
    key, opt = jax.random.key(5), _adam()
    merged, plain = ppgd.stochastic_pgd_recon_subset, ppgd.persistent_pgd_recon
    state = merged.adversary_init(d, jax.random.key(7), optimizer=opt)
    p = {**params, ADVERSARY: {merged.__name__: state, plain.__name__: state}}
    ctx = jax.jit(lambda q: spdjax.make_context(d, tp, q, x))(p)
    at_one = jax.jit(functools.partial(merged, adv_fraction=1.0, optimizer=opt))(p, ctx, key)
    alone = jax.jit(functools.partial(plain, optimizer=opt))(p, ctx, key)
    np.testing.assert_allclose(at_one, alone, rtol=1e-6)  # all adversarial, every site routed
    # All stochastic: the sources play no part, so neither the value nor the state moves.
    _, after = _step(d, tp, x, merged, p, key, adv_fraction=0.0, optimizer=opt)
    jax.tree.map(np.testing.assert_array_equal, after["sources"], state["sources"])
    shifted = {**p, ADVERSARY: jax.tree.map(lambda s: 1.0 - s, p[ADVERSARY])}
    f0 = jax.jit(functools.partial(merged, adv_fraction=0.0, optimizer=opt))
    np.testing.assert_allclose(f0(p, ctx, key), f0(shifted, ctx, key), rtol=1e-6)


def _np_merged_forward(d, tp, params, x, masks, routed):
    """As _np_forward, a site taking the target's weight where ``routed[site]`` is False."""
    f = {n: [np.asarray(a, np.float64) for a in d.factors(params, n)] for n in "ab"}
    w = {n: np.asarray(tp[n]["kernel"], np.float64) for n in "ab"}
    x = np.asarray(x, np.float64)

    def site(n, a):
        on = routed[n][:, None]
        return np.where(on, (a @ f[n][0] * masks[n]) @ f[n][1], a @ w[n])

    h = np.maximum(site("a", x) + np.asarray(tp["a"]["bias"], np.float64), 0)
    return site("b", h)


def test_merged_term_at_half_matches_numpy(setup):
    """adv_fraction 0.5, two draws: per draw each example is adversarial (the persistent source
    on every site) or stochastic (fresh uniform sources on the routed sites, the target's weight
    on the others); the value is the mean over draws of the MSE, and only the adversarial
    examples' finite-difference gradient reaches the sources (float64 NumPy, one Adam ascent)."""
    d, tp, params, x = setup
    fn, key, n_samples = ppgd.stochastic_pgd_recon_subset, jax.random.key(11), 2
    params = _with_state(d, params, fn, optimizer=_adam())
    value, state = _step(d, tp, x, fn, params, key, adv_fraction=0.5, optimizer=_adam(),
                         n_samples=n_samples)

    ctx = jax.jit(lambda p: spdjax.make_context(d, tp, p, x))(params)
    lower = {n: np.asarray(ctx.ci[n].lower, np.float64) for n in "ab"}
    target_out = np.asarray(ctx.target_out, np.float64)
    draws = []  # the draws' randomness, taken from the streams the term documents
    for j in range(n_samples):
        k = jax.random.fold_in(key, j)
        routing = route(jax.random.fold_in(k, ppgd.ROUTING_STREAM),
                                            make_router("uniform_k"),
                                            ["a", "b"], (B,))
        flag = np.asarray(jax.random.bernoulli(jax.random.fold_in(k, ppgd._ASSIGN), 0.5, (B,)))
        uniform = {n: np.asarray(jax.random.uniform(jax.random.fold_in(
            jax.random.fold_in(k, ppgd._UNIFORM), i), (B, C[n])), np.float64)
            for i, n in enumerate("ab")}
        draws.append((flag, {n: np.asarray(routing[n]) | flag for n in "ab"}, uniform))
    assert any(f.any() and not f.all() for f, _, _ in draws)  # both kinds of example occur

    def loss(sources):
        total = 0.0
        for flag, routed, uniform in draws:
            masks = {n: lower[n] + (1 - lower[n]) * np.where(flag[:, None], sources[n][None],
                                                             uniform[n]) for n in "ab"}
            out = _np_merged_forward(d, tp, params, x, masks, routed)
            total += np.mean((out - target_out) ** 2)
        return total / n_samples

    s = {n: np.asarray(params[ADVERSARY][fn.__name__]["sources"][n], np.float64) for n in "ab"}
    np.testing.assert_allclose(value, loss(s), rtol=1e-4)
    # no warm-up ascent unless asked (the reference's default), so one ascent from the sources
    for term in (fn, ppgd.persistent_pgd_recon):
        assert inspect.signature(term).parameters["n_warmup_steps"].default == 0
    g = _np_grad(loss, s)
    for n in "ab":
        want, _, _ = _np_adam_ascent(s[n], g[n], 0.0, 0.0, 1)
        np.testing.assert_allclose(state["sources"][n], want, atol=2e-4)


def test_the_source_lr_warms_up_linearly(setup):
    """``lr_warmup_frac``: the sources' update is scaled by min(1, step_frac / lr_warmup_frac)
    (VPD's library: from 0 over the first 2.5% of training)."""
    d, tp, params, x = setup
    fn, opt = ppgd.persistent_pgd_recon, _adam()
    params = _with_state(d, params, fn, optimizer=opt)
    before = np.asarray(params[ADVERSARY][fn.__name__]["sources"]["a"])

    tx = adversary.with_adversary(optax.sgd(0.0), {fn.__name__: fn.adversary_optimizer()})

    def mover(**options):
        """``step_frac`` -> how far one step moves site a's sources; compiled once for every
        step fraction (a traced argument), the step's gradient and update together."""
        bound = functools.partial(fn, optimizer=opt, **options)  # one (outer) ascent

        @jax.jit
        def after(params, step_frac):
            def total(p):
                return bound(p, spdjax.make_context(d, tp, p, x, step_frac), jax.random.key(3))

            updates, _ = tx.update(jax.grad(total)(params), tx.init(params), params)
            return optax.apply_updates(params, updates)[ADVERSARY][fn.__name__]["sources"]["a"]

        return lambda step_frac: np.asarray(after(params, step_frac)) - before

    full = mover()(0.0)
    assert np.abs(full).max() > 0
    warming = mover(lr_warmup_frac=0.1)
    np.testing.assert_array_equal(warming(0.0), 0.0)  # lr 0 at the start
    inside = (before + full > 1e-3) & (before + full < 1 - 1e-3)  # not clipped at the box
    np.testing.assert_allclose(warming(0.05)[inside], 0.5 * full[inside], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(warming(0.2), full, rtol=1e-6, atol=1e-7)


def test_with_adversary_gives_each_term_its_own_optimizer():
    state = {"assigned": {"x": jnp.array([0.2, 0.4])}, "ascended": jnp.array([0.5, 0.9])}
    params = {"components": jnp.ones(2), ADVERSARY: state}

    def loss(p):  # the "assigned" term hands over new = [0.7, 0.1]
        adv = p[ADVERSARY]
        return (jnp.sum(p["components"] * adv["ascended"])
                + 3.0 * assign_state(adv["assigned"], {"x": jnp.array([0.7, 0.1])}))

    tx = adversary.with_adversary(optax.sgd(0.0), {"assigned": optax.sgd(1.0),
                                                   "ascended": adversary.ascend_in_unit_box(0.3)})
    updates, _ = jax.jit(tx.update)(jax.grad(loss)(params), tx.init(params), params)
    new = optax.apply_updates(params, updates)[ADVERSARY]
    np.testing.assert_allclose(new["assigned"]["x"], [0.7, 0.1], atol=1e-7)  # not scaled by 3
    np.testing.assert_allclose(new["ascended"], [0.8, 1.0], atol=1e-6)  # up, clipped to 1
    with pytest.raises(ValueError, match="has no optimizer"):
        adversary.with_adversary(optax.sgd(0.0), {"assigned": optax.sgd(1.0)}).init(params)


@pytest.mark.parametrize("name, options, match", [
    ("persistent_pgd_recon", {"scope": "per_position"}, "scope must be one of"),
    ("persistent_pgd_recon", {"scope": "repeat_across_batch", "batch_shape": (4,)}, "n_sources"),
    ("persistent_pgd_recon", {"scope": "repeat_across_batch", "n_sources": 3,
                              "batch_shape": (4,)}, "must divide"),
    ("persistent_pgd_recon", {"scope": "broadcast_across_batch"}, "needs batch_shape"),
    ("persistent_pgd_recon", {"scope": "per_batch_per_position", "batch_shape": (4,),
                              "pool_size": 2}, "pool_size applies"),
    ("persistent_pgd_recon", {"pool_size": 0}, "pool_size must be"),
    ("persistent_pgd_recon", {"n_warmup_steps": -1}, "n_warmup_steps must be"),
    ("persistent_pgd_recon", {"lr": 0.0}, "lr must be"),
    ("stochastic_pgd_recon_subset", {"adv_fraction": 1.5}, "adv_fraction must be"),
    ("stochastic_pgd_recon_subset", {"router": "nope"}, "Unknown router"),
])
def test_bad_options_fail_when_bound(name, options, match):
    with pytest.raises(ValueError, match=match):
        spdjax.losses.term(name, 1.0, **options)


def test_source_optimizers_resolve_by_name():
    terms = adversary.resolve_source_optimizers([
        spdjax.losses.term("persistent_pgd_recon", 1.0),
        spdjax.losses.term("stochastic_pgd_recon_subset", 1.0, optimizer="sgd", lr=0.1)])
    assert all(isinstance(t.options["optimizer"], optax.GradientTransformation) for t in terms)
    for bad, match in (({"optimizer": "adagrad"}, "Unknown optimizer|expected one of"),
                       ({"optimizer_options": {"nesterov_typo": 1}}, "takes no options")):
        with pytest.raises(ValueError, match=match):
            adversary.resolve_source_optimizers([spdjax.losses.term("persistent_pgd_recon", 1.0,
                                                                    **bad)])
    with pytest.raises(ValueError, match="still a name"):
        ppgd.source_optimizer("adam")


def test_a_vmapped_ensemble_step_matches_its_members(setup):
    d, tp, params, x = setup
    fn, opt = ppgd.stochastic_pgd_recon_subset, _adam()
    members = [_with_state(d, params, fn, key=jax.random.key(i), optimizer=opt, delta=True,
                           pool_size=3) for i in (0, 1)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    options = dict(optimizer=opt, delta=True, pool_size=3, n_warmup_steps=1)

    def grads(p, key):
        return jax.grad(lambda q: fn(q, spdjax.make_context(d, tp, q, x), key, **options))(p)

    keys = jax.random.split(jax.random.key(9), 2)
    together = jax.jit(jax.vmap(grads))(stacked, keys)[ADVERSARY]
    one = jax.jit(grads)  # compiled once for both members
    for i, member in enumerate(members):
        alone = one(member, keys[i])[ADVERSARY]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                     together, alone)


def _config(**overrides):
    config = spdjax.config.load("tms:5-2", {"steps": 6, "log_every": 3, "checkpoint_every": 3,
                                            "batch_size": 32, "eval_batch_size": 64,
                                            "figures": False, **overrides})
    with config.unlocked():
        config.losses.stochastic_pgd_recon_subset = {"coeff": 1.0, "adv_fraction": 0.5,
                                                     "pool_size": 4, "n_warmup_steps": 2}
    return config


@pytest.mark.slow  # ~25 s; the sources' state and update are tested step by step above
def test_a_managed_run_trains_the_sources_and_resumes(tmp_path):
    from spdjax.training import loop

    straight = spdjax.setup(_config())
    start = jax.device_get(straight.params[ADVERSARY])
    assert start["stochastic_pgd_recon_subset"]["sources"]["linear1"].shape == (4, 20)
    loop.train(straight)
    end = jax.device_get(straight.params[ADVERSARY])
    for name in start:
        assert all(((s >= 0) & (s <= 1)).all() for s in end[name]["sources"].values())
        assert not np.allclose(start[name]["sources"]["linear1"], end[name]["sources"]["linear1"])
    assert float(end["stochastic_pgd_recon_subset"]["opt_state"]["000"]) == 6 * 3  # 2 + 1 a step

    stopped = spdjax.setup(_config(), tmp_path / "run")
    loop.train(stopped, 3)
    loop.close(stopped)
    resumed = spdjax.setup(_config(), tmp_path / "run")
    assert resumed.step == 3
    loop.train(resumed)
    loop.close(resumed)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
                 jax.device_get(straight.params))
