"""Decomposing models the library has never seen: linen, nnx, embeddings, ties, inits, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spdjax
from spdjax.core import components
from spdjax.methods.spd import aliased_tie_updates, faithfulness_warmup, init_fn

from helpers import assert_reproduces_target, two_site_target


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((16, 12)):
            x = nn.gelu(nn.Dense(width, name=f"layers_{i}")(x))
        return nn.Dense(4, name="head")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(6, 16, rngs=rngs), nnx.Linear(16, 12, rngs=rngs)])
        self.head = nnx.Linear(12, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


class LinenEmbedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 8, name="embed")(ids)
        return nn.Dense(11, name="unembed")(nn.relu(nn.Dense(8, name="mlp")(h)))


def test_linen_model_reproduced_exactly():
    m = LinenMLP()
    x = jax.random.normal(jax.random.key(1), (5, 6))
    target, tp = spdjax.from_linen(m, m.init(jax.random.key(0), x), x)
    assert sorted(target.sites) == ["head", "layers_0", "layers_1"]
    d = spdjax.decompose(target, {"layers_*": 16, "head": 4})
    assert d.site_names == ("layers_0", "layers_1", "head")
    assert_reproduces_target(d, tp, x)
    np.testing.assert_allclose(target(tp, x), m.apply({"params": tp}, x), rtol=1e-6)


def test_nnx_model_reproduced_exactly():
    m = NnxMLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    target, tp = spdjax.from_nnx(m, x)
    assert sorted(target.sites) == ["head", "layers/0", "layers/1"]
    d = spdjax.decompose(target, {"layers/*": 20, "head": 4})
    assert_reproduces_target(d, tp, x)
    np.testing.assert_allclose(target(tp, x), m(x), rtol=1e-6)


def test_embedding_site_and_batch_by_sequence_dims():
    m = LinenEmbedLM()
    ids = jax.random.randint(jax.random.key(0), (3, 5), 0, 11)
    target, tp = spdjax.from_linen(m, m.init(jax.random.key(1), ids), ids)
    assert target.sites["embed"].kind == "embed"
    d = spdjax.decompose(target, {"embed": 9, "mlp": 8, "unembed": 11})
    assert_reproduces_target(d, tp, ids)
    params = d.init(jax.random.key(2), tp)

    @jax.jit
    def compute(params, ids):
        ctx = spdjax.make_context(d, tp, params, ids)
        return ctx.ci["embed"].lower, spdjax.stochastic_recon(params, ctx, jax.random.key(0),
                                                              divergence="kl")

    lower, loss = compute(params, ids)
    assert lower.shape == (3, 5, 9)
    assert np.isfinite(loss)


def test_pattern_errors():
    target, _ = two_site_target()
    with pytest.raises(ValueError, match=r"'c\*' matches no decomposable site.*\['a', 'b'\]"):
        spdjax.decompose(target, {"c*": 3})
    with pytest.raises(ValueError, match="'a' is matched by both '\\*' and 'a'"):
        spdjax.decompose(target, {"*": 3, "a": 2})
    with pytest.raises(ValueError, match="C must be a positive int"):
        spdjax.decompose(target, {"a": 0})
    with pytest.raises(ValueError, match="Unknown CI function type 'gate'"):
        spdjax.decompose(target, {"a": 3}, ci_fn="gate")
    with pytest.raises(ValueError, match="needs at least one hidden layer"):
        spdjax.decompose(target, {"a": 3}, ci_hidden=())


def test_any_parameter_applied_as_a_matrix_is_a_site():
    class Custom(nn.Module):  # a 'kernel' param not applied through nn.Dense
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.lecun_normal(), (3, 2))

    m, x = Custom(), jnp.ones((1, 3))
    target, tp = spdjax.from_linen(m, m.init(jax.random.key(0), x), x)
    assert {n: (s.kind, s.d_in, s.d_out) for n, s in target.sites.items()} == {
        "kernel": ("linear", 3, 2)}
    assert_reproduces_target(spdjax.decompose(target, {"*": 2}), tp, x)


def test_site_never_called_is_an_error():
    def fn(p, x, hooks):  # a pure target whose forward skips a declared site
        return hooks("a", x, lambda a: a @ p["a"])

    sites = [spdjax.Site(n, "linear", 3, 3, spdjax.weight_at((n,))) for n in ("a", "b")]
    target = spdjax.from_function(fn, sites)
    tp = {"a": jnp.eye(3), "b": jnp.eye(3)}
    d = spdjax.decompose(target, {"*": 3})
    with pytest.raises(ValueError, match="never called"):
        d.clean_forward(tp, jnp.ones((1, 3)))


def _tied_autoencoder():
    """``x -> (x W) Wᵀ`` as a function target with sites enc / dec (dec tied to enc)."""
    def fn(p, x, hooks):
        h = hooks("enc", x, lambda a: a @ p["W"])
        return hooks("dec", h, lambda a: a @ p["W"].T)

    sites = [spdjax.Site("enc", "linear", 5, 2, spdjax.weight_at(("W",))),
             spdjax.Site("dec", "linear", 2, 5, spdjax.weight_at(("W",), transpose=True))]
    target = spdjax.from_function(fn, sites)
    tp = {"W": jax.random.normal(jax.random.key(0), (5, 2))}
    return target, tp


def test_ties_share_one_factor_pair():
    target, tp = _tied_autoencoder()
    d = spdjax.decompose(target, {"enc": 4, "dec": 4}, ties={"dec": "enc"})
    params = d.init(jax.random.key(1), tp)
    assert list(params["components"]) == ["enc"] and sorted(params["ci"]) == ["dec", "enc"]
    V, U = d.factors(params, "dec")
    np.testing.assert_array_equal(V, params["components"]["enc"]["U"].T)
    np.testing.assert_array_equal(U, params["components"]["enc"]["V"].T)
    with pytest.raises(ValueError, match="Cannot tie"):
        spdjax.decompose(target, {"enc": 4, "dec": 3}, ties={"dec": "enc"})


def test_aliased_ties_take_two_adam_updates_like_the_reference():
    """tie_mode="aliased": each copy gets its own gradient and Adam state, both updates land on
    both copies (torch: two Parameters sharing storage), and the copies stay equal."""
    target, tp = _tied_autoencoder()
    shared = spdjax.decompose(target, {"enc": 4, "dec": 4}, ties={"dec": "enc"})
    aliased = spdjax.decompose(target, {"enc": 4, "dec": 4}, ties={"dec": "enc"},
                               tie_mode="aliased")
    p_shared = shared.init(jax.random.key(1), tp)
    params = aliased.init(jax.random.key(1), tp)
    assert sorted(params["components"]) == ["dec", "enc"]
    for name in ("enc", "dec"):  # same init as the shared pair
        for a, b in zip(aliased.factors(params, name), shared.factors(p_shared, name)):
            np.testing.assert_array_equal(a, b)

    x = jax.random.normal(jax.random.key(2), (8, 5))
    batch_out = x @ tp["W"] @ tp["W"].T

    def loss(p, d):
        out = d.forward(tp, p, x, {"enc": None, "dec": None})
        return jnp.mean((out - batch_out - 0.1) ** 2)

    grads = jax.jit(jax.grad(loss), static_argnums=1)
    g_all = grads(params, aliased)
    g = g_all["components"]
    g_shared = grads(p_shared, shared)["components"]["enc"]
    # The shared gradient is the sum of the two copies' gradients.
    np.testing.assert_allclose(g["enc"]["V"] + g["dec"]["U"].T, g_shared["V"], rtol=1e-5)

    lr = 0.1
    opt = spdjax.make_optimizer(aliased, lr)

    @jax.jit
    def first_step(grads, params):
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates)

    new = first_step(g_all, params)["components"]
    adam1 = lambda grad: -lr * grad / (jnp.abs(grad) + 1e-8)  # Adam's first step, bias-corrected
    expected_V = params["components"]["enc"]["V"] + adam1(g["enc"]["V"]) + adam1(g["dec"]["U"]).T
    np.testing.assert_allclose(new["enc"]["V"], expected_V, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(new["dec"]["U"], new["enc"]["V"].T)
    np.testing.assert_array_equal(new["dec"]["V"], new["enc"]["U"].T)
    with pytest.raises(ValueError, match="Unknown tie_mode 'alias'"):
        spdjax.decompose(target, {"enc": 4, "dec": 4}, ties={"dec": "enc"}, tie_mode="alias")


def test_the_warmup_moves_aliased_copies_by_both_updates_and_keeps_them_equal():
    """The gaussian init's faithfulness warm-up treats aliased ties as training does."""
    target, tp = _tied_autoencoder()
    aliased = spdjax.decompose(target, {"enc": 4, "dec": 4}, ties={"dec": "enc"},
                               tie_mode="aliased")
    params = jax.jit(init_fn(aliased, init=spdjax.init_gaussian, warmup_steps=50))(
        jax.random.key(1), tp)
    comps = params["components"]
    np.testing.assert_array_equal(comps["dec"]["U"], comps["enc"]["V"].T)
    np.testing.assert_array_equal(comps["dec"]["V"], comps["enc"]["U"].T)

    start = aliased.init(jax.random.key(1), tp, init=spdjax.init_gaussian)
    ctx = spdjax.Context(decomposition=aliased, target_params=tp, batch=None, target_out=None,
                         site_inputs={}, ci={}, step_frac=jnp.float32(0))
    faith = lambda c: spdjax.faithfulness({"components": c, "ci": start["ci"]}, ctx)
    lr, wd = 0.01, 0.1
    one = jax.jit(lambda c: faithfulness_warmup(
        c, faith, steps=1, lr=lr, weight_decay=wd,
        tie_sync=aliased_tie_updates(aliased, within=None)))(start["components"])
    g, V = jax.jit(jax.grad(faith))(start["components"]), start["components"]["enc"]["V"]
    adamw1 = lambda grad, p: -lr * (grad / (jnp.abs(grad) + 1e-8) + wd * p)  # first AdamW step
    expected = V + adamw1(g["enc"]["V"], V) + adamw1(g["dec"]["U"], V.T).T
    np.testing.assert_allclose(one["enc"]["V"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(one["dec"]["U"], one["enc"]["V"].T)


def test_paper_init():
    W = jax.random.normal(jax.random.key(0), (7, 3))
    f = components.COMPONENT_INITS.get("paper")(jax.random.key(1), W, 5)
    V, U = np.asarray(f["V"]), np.asarray(f["U"])
    np.testing.assert_allclose(np.linalg.norm(V, axis=0), 1.0, rtol=1e-5)
    # Each U row is a unit vector scaled by the overlap v_c^T W u_c.
    norms = np.linalg.norm(U, axis=1)
    unit = U / norms[:, None]
    overlap = np.einsum("ic,io,co->c", V, np.asarray(W), unit)
    np.testing.assert_allclose(np.abs(overlap), norms, rtol=1e-4)
    assert (np.sign(overlap) > 0).all()  # s_c u_c / |s_c| has overlap sign(s_c) * |s_c| ... > 0


@pytest.mark.parametrize("C", [2, 3, 8])
def test_svd_init(C):
    """Singular pieces first (NumPy's SVD, float64); surplus: unit V columns and zero U rows."""
    W = np.asarray(jax.random.normal(jax.random.key(0), (5, 3)), np.float64)
    f = components.COMPONENT_INITS.get("svd")(jax.random.key(1), jnp.asarray(W, jnp.float32), C)
    V, U = np.asarray(f["V"], np.float64), np.asarray(f["U"], np.float64)
    assert V.shape == (5, C) and U.shape == (C, 3)
    left, s, right = np.linalg.svd(W, full_matrices=False)
    r = min(C, 3)
    for c in range(r):
        piece = np.outer(V[:, c], U[c])
        np.testing.assert_allclose(piece, s[c] * np.outer(left[:, c], right[c]), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(V[:, c]), np.linalg.norm(U[c]), rtol=1e-5)
    best = (left[:, :r] * s[:r]) @ right[:r]  # Eckart-Young: W itself once C >= rank
    np.testing.assert_allclose(V @ U, best, atol=1e-5)
    if C > 3:
        np.testing.assert_allclose(np.linalg.norm(V[:, 3:], axis=0), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(U[3:], 0.0)
        np.testing.assert_allclose(V @ U, W, atol=1e-5)


def test_gaussian_init_and_faithfulness_warmup():
    target, tp = two_site_target(d_in=30, d_hidden=40)
    d = spdjax.decompose(target, {"a": 200, "b": 50})
    params = d.init(jax.random.key(0), tp, init="gaussian")
    V = np.asarray(params["components"]["a"]["V"])
    U = np.asarray(params["components"]["a"]["U"])
    np.testing.assert_allclose(V.std(), 1 / np.sqrt(30), rtol=0.05)
    np.testing.assert_allclose(U.std(), 1 / np.sqrt(200), rtol=0.05)

    def faith(comps):
        p = {"components": comps, "ci": params["ci"]}
        ctx = spdjax.make_context(d, tp, p, jnp.ones((1, 30)))
        return spdjax.faithfulness(p, ctx)

    faith = jax.jit(faith)
    before = faith(params["components"])
    after = faith(jax.jit(lambda c: faithfulness_warmup(c, faith, steps=200))(
        params["components"]))
    assert after < 0.05 * before
    with pytest.raises(ValueError, match="Unknown component init 'xavier'"):
        d.init(jax.random.key(0), tp, init="xavier")


@pytest.mark.parametrize("ci_fn, hidden", [("mlp", (4, 3)), ("vector_mlp", (5,)),
                                            ("shared_mlp", ()), ("shared_mlp", (7,))])
def test_ci_function_kinds_shapes(ci_fn, hidden):
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 5, "b": 3}, ci_fn=ci_fn, ci_hidden=hidden)
    params = d.init(jax.random.key(0), tp)
    x = jnp.ones((2, 4, 3))  # batch x sequence leading dims
    ci = jax.jit(lambda p: spdjax.make_context(d, tp, p, x).ci)(params)
    assert ci["a"].pre.shape == (2, 4, 5) and ci["b"].pre.shape == (2, 4, 3)
    g = jax.jit(jax.grad(lambda p: spdjax.importance_minimality(
        p, spdjax.make_context(d, tp, p, x), pnorm=2.0)))(params)
    assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(g))


def test_mlp_ci_init_scales():
    from spdjax.core.ci import make_ci_fn

    layers = make_ci_fn("mlp", (16,)).init(jax.random.key(0), C=400, d_in=3)
    np.testing.assert_allclose(np.std(layers[0]["w"]), np.sqrt(2.0), rtol=0.05)
    np.testing.assert_allclose(np.std(layers[1]["w"]), 1 / 4.0, rtol=0.05)
    assert not np.any(layers[0]["b"]) and not np.any(layers[1]["b"])


def test_fused_scalar_mlp_gradient_matches_autodiff():
    from jax.test_util import check_grads

    from spdjax.core.ci import _scalar_mlp, scalar_mlp

    k = jax.random.split(jax.random.key(0), 5)
    args = (jax.random.normal(k[0], (3, 4, 5)), jax.random.normal(k[1], (5, 6)),
            jax.random.normal(k[2], (5, 6)), jax.random.normal(k[3], (5, 6)),
            jax.random.normal(k[4], (5,)))
    fused = jax.jit(scalar_mlp)  # jitted: check_grads evaluates it many times
    np.testing.assert_allclose(fused(*args), jax.jit(_scalar_mlp)(*args), rtol=1e-6)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=range(5)))(*args)

    for g, w in zip(grads(scalar_mlp), grads(_scalar_mlp)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    check_grads(fused, args, order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def _stream_target(factored: bool, d: int = 40):
    """x -> r = x P (width d) -> h = relu(r Wa + ba) -> r + (h Wb + bb) -> (that) Wc: with
    ``factored``, r is Mapped(x, pre=P) and site "b" returns its write factored."""
    from spdjax.core.target import Mapped

    def site(a, W, b=0.0):
        return (a.matmul(W) if isinstance(a, Mapped) else a @ W) + b

    def fn(p, x, hooks):
        r = Mapped(x, pre=p["P"]) if factored else x @ p["P"]
        h = jax.nn.relu(hooks("a", r, lambda a: site(a, p["a"]["w"], p["a"]["b"])))
        r = r + hooks("b", Mapped(h, factored=True) if factored else h,
                      lambda a: site(a, p["b"]["w"], p["b"]["b"]))
        return hooks("c", r, lambda a: site(a, p["c"]["w"]))

    shapes = {"a": (d, 8), "b": (8, d), "c": (d, 5)}
    sites = [spdjax.Site(n, "linear", i, o, spdjax.weight_at((n, "w")),
                         None if n == "c" else spdjax.weight_at((n, "b")))
             for n, (i, o) in shapes.items()]
    ks = iter(jax.random.split(jax.random.key(7), 8))
    params = {n: {"w": jax.random.normal(next(ks), s) / np.sqrt(s[0]),
                  "b": 0.1 * jax.random.normal(next(ks), s[1:])} for n, s in shapes.items()}
    params["P"] = jax.random.normal(next(ks), (6, d))
    return spdjax.from_function(fn, sites), params


def test_a_stream_kept_factored_gives_the_plain_forward_with_bias_delta_and_routing():
    # Site "b" returns (acts * m) U + m_delta h (W - V U) routed against h W, plus its bias, as
    # narrow terms that site "c" reads through its own matrices: the same output and gradients.
    from spdjax.core.masks import SiteMask
    x = jax.random.normal(jax.random.key(1), (16, 6))
    (folded, tp), (plain, _) = _stream_target(True), _stream_target(False)
    inputs = jax.eval_shape(lambda tp, x: folded.forward(tp, x, {})[1], tp, x)
    assert isinstance(inputs["c"], spdjax.Mapped) and len(inputs["c"].terms) == 3
    ds = [spdjax.decompose(t, {"*": 3}) for t in (folded, plain)]
    comps = ds[1].init(jax.random.key(0), tp)
    km, kd, kr = jax.random.split(jax.random.key(2), 3)
    masks = {n: SiteMask(component=jax.random.uniform(jax.random.fold_in(km, i), (16, 3)),
                         delta=jax.random.uniform(jax.random.fold_in(kd, i), (16,)),
                         routing=jax.random.bernoulli(jax.random.fold_in(kr, i), 0.5, (16,)))
             for i, n in enumerate("abc")}

    def run(d):  # one program per forward: the loss, its gradients and the site inputs
        @jax.jit
        def f(comps, masks):
            value, grads = jax.value_and_grad(
                lambda c: jnp.sum(d.forward(tp, c, x, masks) ** 2))(comps)
            return value, grads, d.forward(tp, comps, x, masks, with_inputs=True)[1]

        return f(comps, masks)

    outs = [run(d) for d in ds]
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), outs[0][1],
                 outs[1][1])
    for n in "abc":  # and each site's input, as the plain forward sees it
        np.testing.assert_allclose(spdjax.dense_input(outs[0][2][n]), outs[1][2][n], rtol=1e-4,
                                   atol=1e-5)


def test_mapped_sums_add_read_and_fall_back_to_the_plain_array_when_wide():
    from spdjax.core.decomposition import _check_site_input
    k = iter(jax.random.split(jax.random.key(3), 6))
    x, P, h, B = (jax.random.normal(next(k), s) for s in ((4, 3), (3, 10), (4, 2), (2, 10)))
    r = spdjax.Mapped(x, pre=P) + spdjax.Mapped(h, pre=B)
    M = jax.random.normal(next(k), (10, 5))
    np.testing.assert_allclose(r.dense(), x @ P + h @ B, rtol=1e-5)
    np.testing.assert_allclose(r.apply(M), (x @ P + h @ B) @ M, rtol=1e-4, atol=1e-5)
    y = jnp.ones((4, 10))
    np.testing.assert_allclose((y + r).dense(), y + x @ P + h @ B, rtol=1e-5)
    out = spdjax.Mapped(h, factored=True).matmul(B)  # factored: the terms (h, B)
    assert isinstance(out, spdjax.Mapped) and out.terms[0][0] is h
    # terms at least as wide as the sum they stand for come back as the plain array
    wide = spdjax.Mapped.sum([(jnp.ones((4, 8)), jnp.ones((8, 10))), (h, B)], jnp.ones(10))
    assert not isinstance(wide, spdjax.Mapped)
    np.testing.assert_allclose(wide, 8.0 + h @ B + 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="Only plain sum-form"):
        spdjax.Mapped(h, post=B) + r
    site = spdjax.Site("s", "linear", 10, 5, lambda p: M)
    _check_site_input(site, r)
    with pytest.raises(ValueError, match=r"maps give \[7, 10\]"):
        _check_site_input(site, r + spdjax.Mapped(h, pre=B[:, :7]))
    with pytest.raises(ValueError, match="either read through a post map or factored"):
        _check_site_input(site, spdjax.Mapped(x, pre=P, post=jnp.ones((5, 2)), factored=True))
