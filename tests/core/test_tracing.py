"""Sites found by tracing (spdjax.core.tracing): every weight application of linen, nnx and plain
JAX models, checked against the model's own output with all masks 1."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spdjax
from helpers import assert_reproduces_target

V, D, T = 13, 8, 5  # vocabulary, width, sequence length


def shapes(target):
    return {n: (s.kind, s.d_in, s.d_out) for n, s in target.sites.items()}


def check_exact(target, tp, x, want, C=None):
    """With V U = W at every site and all masks 1 the decomposed model is the model.

    Everything here and in the callers runs jitted: one compile per program, instead of one per
    op and shape of an eager forward (the interpreter's, flax's)."""
    np.testing.assert_allclose(jax.jit(target)(tp, x), want, rtol=1e-5, atol=1e-5)
    C = C or max(s.d_out for s in target.sites.values())
    assert_reproduces_target(spdjax.decompose(target, {"*": C}), tp, x,
                             layerwise=len(target.sites) <= 4)


# ----------------------------------------------------------------------------------------- linen


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
        return x + nn.Dense(D, name="mlp_out")(nn.gelu(nn.Dense(16, name="mlp_in")(x))), None


class LinenLM(nn.Module):
    """Embedding, two attention blocks stacked by nn.scan, tied unembedding (Embed.attend)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, name="embed")
        layers = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=2)
        x, _ = layers(name="layers")(embed(ids), None)
        return embed.attend(x)


def test_linen_transformer_every_weight_is_a_site():
    m = LinenLM()
    ids = jax.random.randint(jax.random.key(0), (3, T), 0, V)
    variables = jax.jit(m.init)(jax.random.key(1), ids)
    target, tp = spdjax.from_linen(m, variables, ids)
    want = {"embed": ("embed", V, D), "embed#2": ("linear", D, V)}
    for i in range(2):
        for proj in ("query", "key", "value", "out"):
            want[f"layers/{i}/attn/{proj}"] = ("linear", D, D)  # (D, 2, 4) / (2, 4, D) kernels
        want |= {f"layers/{i}/mlp_in": ("linear", D, 16), f"layers/{i}/mlp_out": ("linear", 16, D)}
    assert shapes(target) == want
    # The scan's layer i is the stacked kernel's slice i, as a matrix.
    np.testing.assert_array_equal(target.sites["layers/1/attn/out"].weight(tp),
                                  tp["layers"]["attn"]["out"]["kernel"][1].reshape(D, D))
    np.testing.assert_array_equal(target.sites["embed#2"].weight(tp), tp["embed"]["embedding"].T)
    check_exact(target, tp, ids, jax.jit(m.apply)(variables, ids))
    d = spdjax.decompose(target, {"*/attn/*": 8})
    assert len(d.site_names) == 8
    # Another batch shape re-traces; its site inputs are [..., d_in].
    ids2 = ids[:1, :3]
    inputs = jax.eval_shape(lambda tp, x: target.forward(tp, x, {})[1], tp, ids2)
    assert inputs["layers/0/attn/query"].shape == (1, 3, D)
    assert inputs["embed"].shape == (1, 3)


class DenseGeneralModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (B, 2, 3, 4): contract the last two axes into (5, 6) features
        h = nn.DenseGeneral((5, 6), axis=(-2, -1), name="dg")(x)
        h = nn.Einsum((5, 6, 7), "bkij,ijn->bkn", name="ein")(h)
        shared = nn.Dense(7, name="twice")
        return shared(jnp.tanh(shared(h)))


def test_linen_dense_general_einsum_and_a_layer_called_twice():
    m = DenseGeneralModel()
    x = jax.random.normal(jax.random.key(0), (3, 2, 3, 4))
    variables = jax.jit(m.init)(jax.random.key(1), x)
    target, tp = spdjax.from_linen(m, variables, x)
    assert shapes(target) == {"dg": ("linear", 12, 30), "ein": ("linear", 30, 7),
                              "twice": ("linear", 7, 7), "twice#2": ("linear", 7, 7)}
    check_exact(target, tp, x, jax.jit(m.apply)(variables, x))
    inputs = jax.jit(lambda tp, x: target.forward(tp, x, {})[1])(tp, x)
    np.testing.assert_array_equal(inputs["dg"], x.reshape(3, 2, 12))


# ------------------------------------------------------------------------------------------- nnx


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
        self.mlp = nnx.LinearGeneral(D, (2, 8), rngs=rngs)
        self.down = nnx.Einsum("btij,ijd->btd", (2, 8, D), rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(nnx.relu(self.mlp(x)))


class NnxLM(nnx.Module):
    """Embedding, two blocks created by nnx.vmap and applied by nnx.scan, tied unembedding."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.layers = make(rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, block):
            return block(x)

        return self.embed.attend(step(self.embed(ids), self.layers))


def test_nnx_transformer_every_weight_is_a_site():
    m = NnxLM(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (3, T), 0, V)
    target, tp = spdjax.from_nnx(m, ids)
    want = {"embed": ("embed", V, D), "embed#2": ("linear", D, V)}
    for i in range(2):
        for proj in ("query", "key", "value", "out"):
            want[f"layers/{i}/attn/{proj}"] = ("linear", D, D)
        want |= {f"layers/{i}/mlp": ("linear", D, 16), f"layers/{i}/down": ("linear", 16, D)}
    assert shapes(target) == want
    check_exact(target, tp, ids, nnx.jit(lambda m, ids: m(ids))(m, ids))


# ---------------------------------------------------------------------------------- convolutions


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (B, 8, 8, 4)
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME", name="conv2d")(x))
        x = nn.relu(nn.Conv(5, (2,), name="conv1d")(x.reshape(x.shape[0], -1, 6)))
        return nn.Dense(3, name="head")(x.mean(1))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 6, (3, 3), padding="VALID", rngs=rngs)
        self.depthwise = nnx.Conv(6, 6, (3, 3), feature_group_count=6, rngs=rngs)

    def __call__(self, x):
        return self.depthwise(jax.nn.relu(self.conv(x))).sum((1, 2))


def test_convolutions_are_sites_as_their_im2col_matrix():
    m = LinenCNN()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    variables = jax.jit(m.init)(jax.random.key(1), x)
    target, tp = spdjax.from_linen(m, variables, x)
    assert shapes(target) == {"conv2d": ("conv", 3 * 3 * 4, 6), "conv1d": ("conv", 2 * 6, 5),
                              "head": ("linear", 5, 3)}
    np.testing.assert_array_equal(target.sites["conv2d"].weight(tp),
                                  tp["conv2d"]["kernel"].reshape(36, 6))
    check_exact(target, tp, x, jax.jit(m.apply)(variables, x), C=8)
    d = spdjax.decompose(target, {"conv2d": 8})
    lower = jax.eval_shape(lambda p: spdjax.make_context(d, tp, p, x).ci["conv2d"].lower,
                           jax.eval_shape(d.init, jax.random.key(2), tp))
    assert lower.shape == (2, 4, 4, 8)  # a CI per output position, channels last
    with pytest.raises(ValueError, match="need a per-site CI function on inner activations"):
        spdjax.decompose(target, {"conv2d": 8}, ci_fn="vector_mlp")

    nnx_model = NnxCNN(nnx.Rngs(0))
    target, tp = spdjax.from_nnx(nnx_model, x)
    assert shapes(target) == {"conv": ("conv", 36, 6)}
    assert "grouped" in target.unsupported["depthwise"]
    check_exact(target, tp, x, nnx.jit(lambda m, x: m(x))(nnx_model, x), C=8)


# ------------------------------------------------------------------------------- plain functions


def torch_style(p, x):
    """Weights stored (out, in) and applied transposed, layers stacked and scanned."""
    h = x @ p["fc"]["weight"].T

    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, h, p["stack"])
    return jnp.einsum("ob,...b->...o", p["head"], h)  # weight on the left of the dot


def test_plain_function_weights_any_orientation():
    k = jax.random.split(jax.random.key(0), 3)
    tp = {"fc": {"weight": jax.random.normal(k[0], (6, 4))},
          "stack": jax.random.normal(k[1], (3, 6, 6)) / 3, "head": jax.random.normal(k[2], (2, 6))}
    x = jax.random.normal(jax.random.key(1), (5, 4))
    target, tp = spdjax.from_jax(torch_style, tp, x)
    assert shapes(target) == {"fc": ("linear", 4, 6), "stack/0": ("linear", 6, 6),
                              "stack/1": ("linear", 6, 6), "stack/2": ("linear", 6, 6),
                              "head": ("linear", 6, 2)}
    np.testing.assert_array_equal(target.sites["fc"].weight(tp), tp["fc"]["weight"].T)
    check_exact(target, tp, x, torch_style(tp, x))


def test_unsupported_weights_are_named_when_chosen():
    def per_head(p, x):  # the head axis is a batch axis of the dot: a stack of matrices
        return jnp.einsum("bhd,hdk->bhk", x, p["w"]) @ p["out"]

    tp = {"w": jnp.ones((2, 3, 4)), "out": jnp.ones((4, 5))}
    target, tp = spdjax.from_jax(per_head, tp, jnp.ones((1, 2, 3)))
    assert sorted(target.sites) == ["out"] and sorted(target.unsupported) == ["w"]
    with pytest.raises(ValueError, match=r"'w\*' matches only weights that cannot be decomposed: "
                                         r"'w': .*batch axes"):
        spdjax.decompose(target, {"w*": 4})
    spdjax.decompose(target, {"out": 5})  # the rest of the model still decomposes


def test_gradients_flow_through_the_interpreter():
    m = LinenLM()
    ids = jax.random.randint(jax.random.key(0), (2, T), 0, V)
    target, tp = spdjax.from_linen(m, jax.jit(m.init)(jax.random.key(1), ids), ids)
    with pytest.warns(UserWarning, match="matches 'embed' but not 'embed#2'"):  # on purpose
        d = spdjax.decompose(target, {"layers/*": 8, "embed": 8})
    params = d.init(jax.random.key(2), tp)  # eager: its jitted program compiles slower

    def loss(params, key):
        ctx = spdjax.make_context(d, tp, params, ids)
        return spdjax.stochastic_recon(params, ctx, key, n_samples=2, divergence="kl")

    value, grads = jax.jit(jax.value_and_grad(loss))(params, jax.random.key(3))
    assert np.isfinite(value) and value > 0
    norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).sum()), grads["components"]))
    assert all(n > 0 for n in norms)


# ------------------------------------------------------------------------ edge cases of naming


def test_nested_scans_name_the_outer_layer_first():
    def nested(p, x):  # p["w"]: (outer 2, inner 3, d, d), both axes scanned
        def outer(h, w_outer):
            return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w_outer)[0], None
        return jax.lax.scan(outer, x, p["w"])[0]

    w = jax.random.normal(jax.random.key(0), (2, 3, 4, 4)) / 2
    x = jax.random.normal(jax.random.key(1), (5, 4))
    target, tp = spdjax.from_jax(nested, {"w": w}, x)
    assert sorted(target.sites) == [f"w/{i}/{j}" for i in range(2) for j in range(3)]
    np.testing.assert_array_equal(target.sites["w/1/0"].weight(tp), w[1, 0])
    check_exact(target, tp, x, nested({"w": w}, x))


def test_paths_that_print_alike_stay_two_sites():
    p = {"a/b": {"w": jnp.eye(3)}, "a": {"b": {"w": 2 * jnp.eye(3)}}}
    x = jnp.ones((2, 3))

    def fn(p, x):
        return x @ p["a/b"]["w"] @ p["a"]["b"]["w"]

    target, tp = spdjax.from_jax(fn, p, x)
    assert len(target.sites) == 2  # neither hides the other
    check_exact(target, tp, x, fn(p, x))


def test_stacked_weights_cast_before_the_scan_are_sites():
    def cast_then_scan(p, x):
        w = p["w"].astype(jnp.bfloat16).astype(jnp.float32)
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, w)[0]

    w = jax.random.normal(jax.random.key(0), (3, 4, 4)).astype(jnp.bfloat16).astype(jnp.float32)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    target, tp = spdjax.from_jax(cast_then_scan, {"w": w}, x)
    assert sorted(target.sites) == ["w/0", "w/1", "w/2"]
    check_exact(target, tp, x, cast_then_scan({"w": w}, x))


def test_loop_constant_weights_are_unsupported_not_per_step_sites():
    def rnn(p, xs):  # one cell applied at every time step
        def cell(h, x):
            h = jnp.tanh(h @ p["cell"]["w_h"] + x @ p["cell"]["w_x"])
            return h, h
        h = jax.lax.scan(cell, jnp.zeros((xs.shape[1], 4)), xs)[0]
        return h @ p["head"]["w"]

    k = jax.random.split(jax.random.key(0), 3)
    p = {"cell": {"w_h": jax.random.normal(k[0], (4, 4)), "w_x": jax.random.normal(k[1], (3, 4))},
         "head": {"w": jax.random.normal(k[2], (4, 2))}}
    xs = jnp.ones((6, 2, 3))  # (time, batch, features)
    target, tp = spdjax.from_jax(rnn, p, xs)
    assert sorted(target.sites) == ["head"]
    assert sorted(target.unsupported) == ["cell/w_h", "cell/w_x"]
    assert "loop constant" in target.unsupported["cell/w_h"]
    np.testing.assert_allclose(target(tp, jnp.ones((9, 2, 3))), rnn(p, jnp.ones((9, 2, 3))),
                               rtol=1e-6)  # another sequence length: same sites, same model


class DropoutMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.fc(x))))


def test_nnx_model_in_train_mode_with_dropout():
    model = DropoutMLP(nnx.Rngs(0, dropout=1))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    target, tp = spdjax.from_nnx(model, x)  # train mode: dropout draws from the model's rngs
    assert sorted(target.sites) == ["fc", "out"]
    y1, y2 = target(tp, x), target(tp, x)
    np.testing.assert_array_equal(y1, y2)  # the model's rng state is not advanced by tracing
    assert bool(jnp.all(jnp.isfinite(y1)))
    model.eval()
    target, tp = spdjax.from_nnx(model, x)
    check_exact(target, tp, x, model(x))
