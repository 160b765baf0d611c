"""L3D's pieces against an independent NumPy reference on small shapes: the per-sample gradients
g_i, the Tucker tensors, the encoding, the batch top-k, the normalised reconstruction error,
the renormalisation; the factored encoding, loss and norms against the explicit (dense) ones,
values and gradients; its config errors; a short run from the config file end to end."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.methods import l3d
from spdjax.methods import l3d_terms
from spdjax.methods.l3d_decomposition import (EPS, tucker, tucker_contract, tucker_gram,
                                              tucker_sq_norms)
from spdjax.methods.l3d_terms import batch_topk_mask, keep_count

from helpers import two_site_target

B, C = 8, 3


@pytest.fixture(scope="module")
def setup():
    target, tp = two_site_target(d_in=3, d_hidden=4, d_out=2)
    d = l3d.decompose_l3d(target, {"*": 1}, C, rank=2)
    params = jax.jit(d.init)(jax.random.key(0))  # one compile, not every op's
    # Decoder and encoder apart, so a mix-up of the two is caught.
    params["encode"] = jax.tree.map(lambda a: a * 1.7 + 0.1, params["encode"])
    x = jax.random.normal(jax.random.key(1), (B, 3))
    return d, tp, params, x


def np_forward(tp, x):
    """``(pre, h, out)`` of the two-site target ``relu(x Wa + ba) Wb``, in float64."""
    Wa, ba, Wb = (np.asarray(tp["a"]["kernel"], np.float64), np.asarray(tp["a"]["bias"],
                  np.float64), np.asarray(tp["b"]["kernel"], np.float64))
    pre = x @ Wa + ba
    h = np.maximum(pre, 0)
    return pre, h, h @ Wb


def np_softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def np_grads(tp, x, y, divergence="mse"):
    """The per-sample gradient of D(f(x), y) by hand (one sample): ``mse`` D = 0.5 mean_o
    (f_o - y_o)^2, dD/df = (f - y) / n; ``reference_mse`` (the reference code's MSEVectorLoss,
    mean_o f_o (f_o - y_o) with y detached) dD/df = (2 f - y) / n; ``kl`` D = KL(softmax(y) ||
    softmax(f)), dD/df = softmax(f) - softmax(y)."""
    Wb = np.asarray(tp["b"]["kernel"], np.float64)
    pre, h, out = np_forward(tp, x)
    d_out = {"mse": (out - y) / out.shape[-1], "reference_mse": (2 * out - y) / out.shape[-1],
             "kl": np_softmax(out) - np_softmax(y)}[divergence]
    d_h = (d_out @ Wb.T) * (pre > 0)
    return {"a": {"weight": np.outer(x, d_h), "bias": d_h}, "b": {"weight": np.outer(h, d_out)}}


def np_tucker(f):
    """Subnetwork tensors ``(*shape, C)`` by explicit loops over the Tucker ranks."""
    core = np.asarray(f["core"], np.float64)
    mats = [np.asarray(f[f"f{j}"], np.float64) for j in range(core.ndim - 1)]
    shape = tuple(m.shape[1] for m in mats) + (core.shape[-1],)
    out = np.zeros(shape)
    for c in range(core.shape[-1]):
        for ranks in itertools.product(*(range(r) for r in core.shape[:-1])):
            term = core[ranks + (c,)]
            vec = np.ones(())
            for j, r in enumerate(ranks):
                vec = np.multiply.outer(vec, mats[j][r, :, c])
            out[..., c] += term * vec
    return out


def flat(tree_of_site_tensors, sites):
    return np.concatenate([np.asarray(tree_of_site_tensors[n][t], np.float64).reshape(-1)
                           for n in sites for t in sorted(tree_of_site_tensors[n])])


def test_per_sample_gradients_are_vmap_grad_of_the_divergence(setup):
    d, tp, _, x = setup
    key = jax.random.key(3)
    grads = jax.jit(d.per_sample_grads)(tp, x, key)
    out = np.asarray(d.target(tp, x), np.float64)
    idx = np.asarray(jax.random.randint(key, (B,), 0, B))  # the references drawn
    for i in range(B):
        want = np_grads(tp, np.asarray(x[i], np.float64), out[idx[i]])
        for n, ts in want.items():
            for t, v in ts.items():
                np.testing.assert_allclose(grads[n][t][i], v, rtol=1e-4, atol=1e-6)


def test_reference_mse_and_kl_gradients_and_the_mean_reference(setup):
    d0, tp, _, x = setup
    out = np.asarray(d0.target(tp, x), np.float64)
    key = jax.random.key(4)
    idx = np.asarray(jax.random.randint(key, (B,), 0, B))
    for divergence, reference in [("reference_mse", "sample"), ("kl", "sample"), ("mse", "mean"),
                                  ("reference_mse", "mean")]:
        d = l3d.decompose_l3d(d0.target, {"*": 1}, C, rank=2, divergence=divergence,
                              reference=reference)
        grads = jax.jit(d.per_sample_grads)(tp, x, key)
        refs = out[idx] if reference == "sample" else np.broadcast_to(out.mean(0), out.shape)
        for i in range(B):
            want = np_grads(tp, np.asarray(x[i], np.float64), refs[i], divergence)
            for n, ts in want.items():
                for t, v in ts.items():
                    np.testing.assert_allclose(grads[n][t][i], v, rtol=1e-4, atol=1e-6,
                                               err_msg=f"{divergence}/{reference} {n}/{t}")


def np_matrices(params, grads):
    """``(V_in [C, n_w], V_out [C, n_w], G [batch, n_w])`` flattened in float64."""
    sites = ("a", "b")
    enc = {n: {t: np_tucker(f) for t, f in ts.items()} for n, ts in params["encode"].items()}
    dec = {n: {t: np_tucker(f) for t, f in ts.items()} for n, ts in params["decode"].items()}
    V_in = np.stack([flat({n: {t: v[..., c] for t, v in ts.items()} for n, ts in enc.items()},
                          sites) for c in range(C)])
    V_out = np.stack([flat({n: {t: v[..., c] for t, v in ts.items()} for n, ts in dec.items()},
                           sites) for c in range(C)])
    n_batch = jax.tree.leaves(grads)[0].shape[0]
    G = np.stack([flat({n: {t: v[i] for t, v in ts.items()} for n, ts in grads.items()}, sites)
                  for i in range(n_batch)])
    return V_in, V_out, G


def np_relative_error(V_in, V_out, G, topk):
    """``(error, keep)``: the normalised top-k reconstruction error of ``G``, the reference's
    batch top-k (everything at least the ``int(k n)``-th largest ``|z|``, 0-based)."""
    z = G @ V_in.T
    threshold = np.sort(np.abs(z).ravel())[::-1][min(int(topk * z.size), z.size - 1)]
    keep = np.abs(z) >= threshold
    G_hat = (z * keep) @ V_out
    return np.sum((G - G_hat) ** 2) / (np.sum(G**2) + 1e-10), keep


def test_reconstruction_error_against_a_numpy_loop(setup):
    d, tp, params, x = setup
    grads = jax.jit(d.per_sample_grads)(tp, x, jax.random.key(3))
    topk = 0.2
    loss, metrics = jax.jit(l3d.objective(d, topk=topk))(params, tp, x, jax.random.key(3), 0.5)

    V_in, V_out, G = np_matrices(params, grads)
    want, keep = np_relative_error(V_in, V_out, G, topk)
    assert keep.sum() == keep_count(B * C, topk) == int(topk * B * C) + 1
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(metrics["active_per_example"]) == pytest.approx(keep.sum() / B)
    assert d.n_params == G.shape[1] == 3 * 4 + 4 + 4 * 2


def test_dense_warm_start_keeps_nearly_everything(setup):
    d, tp, params, x = setup
    fn = jax.jit(l3d.objective(d, topk=0.1, dense_frac=0.25))
    _, early = fn(params, tp, x, jax.random.key(0), 0.1)
    _, late = fn(params, tp, x, jax.random.key(0), 0.5)
    assert float(early["active_per_example"]) == pytest.approx(C)  # 0.999: every entry of 24
    assert float(late["active_per_example"]) == pytest.approx(keep_count(B * C, 0.1) / B)


def test_batch_topk_is_over_samples_and_subnetworks():
    z = jnp.array([[5.0, -1.0, 0.0], [0.5, -7.0, 2.0]])
    # int(k n) + 1 entries of all 6: 0.2 -> 2 (7 and 5), 0.5 -> 4 (7, 5, 2 and 1)
    np.testing.assert_array_equal(batch_topk_mask(z, 0.2), [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(batch_topk_mask(z, 0.5), [[1, 1, 0], [0, 1, 1]])


def test_renormalisation_rules(setup):
    d, _, params, _ = setup

    def measures(dec):
        norms = [np.sqrt(np.sum(np_tucker(f) ** 2, axis=tuple(range(f["core"].ndim - 1))))
                 for ts in dec.values() for f in ts.values()]
        return sum(norms), np.sqrt(sum(n**2 for n in norms))

    big = jax.tree.map(lambda a: a * 3.0, params["decode"])
    l1, _ = measures(big)
    once = d.normalise(big, "reference")
    np.testing.assert_allclose(measures(once)[0], l1 / np.sqrt(l1), rtol=1e-5)  # / sqrt(sum)
    for _ in range(40):  # applied every step, it converges to sum_t ||V_t|| = 1
        once = d.normalise(once, "reference")
    np.testing.assert_allclose(measures(once)[0], 1.0, rtol=1e-4)
    np.testing.assert_allclose(measures(d.normalise(big, "unit"))[1], 1.0, rtol=1e-5)


def test_the_optimizer_renormalises_the_decoder_only(setup):
    d, _, params, _ = setup
    opt = l3d.renormalise(d, "unit")
    updates = jax.tree.map(jnp.ones_like, params)
    new_updates, _ = opt.update(updates, opt.init(params), params)
    new = jax.tree.map(jnp.add, params, new_updates)
    np.testing.assert_allclose(
        jax.tree.leaves(new["encode"])[0], jax.tree.leaves(params["encode"])[0] + 1.0)
    dec = d.tensors(new["decode"])
    total = sum(np.sum(np.asarray(v) ** 2, axis=tuple(range(v.ndim - 1)))
                for ts in dec.values() for v in ts.values())
    np.testing.assert_allclose(total, np.ones(C), rtol=1e-5)


def test_intervention_response_is_the_directional_derivative(setup):
    d, tp, params, x = setup
    resp = np.asarray(l3d.intervention_responses(d, params, tp, x))
    theta0 = d.theta0(tp)
    dirs = d.tensors(params["decode"])
    eps = 1e-5
    x64 = np.asarray(x, np.float64)
    for c in range(C):  # a central difference of an independent float64 forward
        def out_at(delta):
            moved = {n: {t: np.asarray(theta0[n][t], np.float64)
                         + delta * np.asarray(dirs[n][t][..., c], np.float64) for t in ts}
                     for n, ts in theta0.items()}
            h = np.maximum(x64 @ moved["a"]["weight"] + moved["a"]["bias"], 0)
            return h @ moved["b"]["weight"]
        fd = (out_at(eps) - out_at(-eps)) / (2 * eps)
        np.testing.assert_allclose(resp[c], np.sum(fd**2, axis=-1), rtol=1e-3, atol=1e-6)


def test_fixed_batches_are_shuffled_epochs_over_the_training_set():
    data = jnp.arange(10.0)[:, None] * jnp.ones((1, 2))  # row i is (i, i)
    fn = jax.jit(l3d.fixed_batches(data, 4, jax.random.key(3)))
    # ceil(10 / 4) = 3 steps an epoch; the epoch's last batch is filled from its start.
    epochs = [np.concatenate([np.asarray(fn(jnp.int32(3 * e + p)))[:, 0] for p in range(3)])
              for e in range(3)]
    for rows in epochs:
        assert sorted(rows[:10].tolist()) == list(range(10))
        np.testing.assert_array_equal(rows[10:], rows[:2])
    assert epochs[0].tolist() != epochs[1].tolist()  # a new order every epoch
    with pytest.raises(ValueError, match="batch_size must be in"):
        l3d.fixed_batches(data, 11, jax.random.key(0))


def test_the_objective_picks_the_steps_batch_from_step_frac_at_the_largest_total(setup):
    # The loop passes float32(step) / total_steps; the objective must round it back to the
    # step, so each of neighbouring steps, up to MAX_FIXED_STEPS, sees its own batch.
    d, tp, params, _ = setup
    d = l3d.decompose_l3d(d.target, {"*": 1}, C, rank=2, reference="mean")  # no key in the loss
    data = jax.random.normal(jax.random.key(7), (5, B, 3))  # batch of step s: data[s % 5]
    total = l3d.MAX_FIXED_STEPS
    fixed = jax.jit(l3d.objective(d, topk=0.3, batches=lambda s: data[s % 5], total_steps=total))
    plain = jax.jit(l3d.objective(d, topk=0.3))
    want = [float(plain(params, tp, data[i], jax.random.key(0), 0.0)[0]) for i in range(5)]
    assert len(set(want)) == 5  # an off-by-one step would be seen
    steps = [0, 1, 2, total - 3, total - 2, total - 1, total]
    frac = jnp.asarray(steps, jnp.float32) / total  # as training/step.py
    got = [float(fixed(params, tp, data[0], jax.random.key(0), f)[0]) for f in frac]
    assert got == pytest.approx([want[s % 5] for s in steps], rel=1e-6)


def test_a_fixed_training_set_replaces_the_loops_batch(setup):
    d, tp, params, _ = setup
    data = jax.random.normal(jax.random.key(5), (20, 3))
    batches = l3d.fixed_batches(data, B, jax.random.key(6))
    fixed = l3d.objective(d, topk=0.3, batches=batches, total_steps=100)
    plain = l3d.objective(d, topk=0.3)

    @jax.jit  # one compile for both objectives
    def both(params, tp, junk, step_frac, batch):
        return (fixed(params, tp, junk, jax.random.key(1), step_frac)[0],
                plain(params, tp, batch, jax.random.key(1), 0.0)[0])

    batch_of, junk = jax.jit(batches), jnp.full((B, 3), 1e3)
    for step in (0, 2, 37):
        got, want = both(params, tp, junk, jnp.float32(step) / 100, batch_of(jnp.int32(step)))
        assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_the_l3d_configs_use_the_papers_fixed_training_set():
    config = spdjax.config.load("l3d:tmcs")
    assert config.l3d.n_samples == 1000 and config.steps == 1000 * 32
    assert config.l3d.lr_decay_steps == 100 * 32  # StepLR steps once per epoch of 32 batches


@pytest.mark.parametrize("override, match", [
    ({"l3d.n_samples": 16}, r"l3d.n_samples must be 0 .* >= batch_size=32"),
    ({"l3d.n_samples": -1}, "l3d.n_samples must be 0"),
    ({"l3d.topk": 0.0}, r"l3d.topk must be a fraction in \(0, 1\]"),
    ({"l3d.rank": 0}, "l3d.rank must be a positive integer"),
    ({"l3d.divergence": "l1"}, "l3d.divergence must be one of"),
    ({"l3d.normalisation": "l2"}, "l3d.normalisation must be one of"),
    ({"l3d.dense_steps": 10**9}, "l3d.dense_steps must be an integer in"),
    ({"microbatches": 2}, "microbatches must be 1"),
    ({"init": "gaussian"}, "L3D does not use init='gaussian'"),
    ({"l3d.divergence": "reference_mse", "init": "gaussian"}, "L3D does not use init="),
])
def test_bad_l3d_settings_fail_before_any_work(override, match):
    from spdjax.config.runs import validate

    with pytest.raises(ValueError, match=match):
        validate(spdjax.config.load("l3d:5-2", override))


@pytest.mark.parametrize("field, value, match", [
    ("lr_decay_steps", True, "l3d.lr_decay_steps must be an integer >= 1, got True"),
    ("dense_steps", False, r"l3d.dense_steps must be an integer in \[0, steps=.*\], got False"),
    ("rank", True, "l3d.rank must be a positive integer, got True"),
])
def test_booleans_are_not_numbers_for_l3d(field, value, match):
    # ml_collections keeps a bool given for an int field (bool is an int subclass); one for a
    # float field (topk, lr_decay) it turns into 1.0 / 0.0 before any check sees it.
    config = spdjax.config.load("l3d:5-2", {f"l3d.{field}": value})
    with pytest.raises(ValueError, match=match):
        l3d.check_config(config)


def test_evaluate_fn_recon_error_against_numpy(setup):
    d0, tp, params, _ = setup
    d = l3d.decompose_l3d(d0.target, {"*": 1}, C, rank=2, reference="mean")  # key-free refs
    x = jax.random.normal(jax.random.key(8), (2 * B + 3, 3))  # two chunks of B, 3 rows left out
    summary = l3d.evaluate_fn(d, topk=0.2, batch_size=B, selectivity_samples=8)(
        params, tp, x, jax.random.key(0))
    errs, dense, per_sample = [], [], []
    grads_fn = jax.jit(d.per_sample_grads)
    for k in range(2):
        grads = grads_fn(tp, x[k * B:(k + 1) * B], jax.random.key(0))
        V_in, V_out, G = np_matrices(params, grads)
        err, keep = np_relative_error(V_in, V_out, G, 0.2)
        errs.append(err)
        dense.append(np_relative_error(V_in, V_out, G, 1.0)[0])
        G_hat = ((G @ V_in.T) * keep) @ V_out
        norm = np.linalg.norm(G, axis=1)  # a sample with g = 0 counts as error 0
        per_sample.append(np.mean(np.where(norm > 0, np.linalg.norm(G - G_hat, axis=1)
                                           / np.where(norm > 0, norm, 1.0), 0.0)))
    assert summary["recon_error"] == pytest.approx(np.mean(errs), rel=1e-4)
    assert summary["recon_error_dense"] == pytest.approx(np.mean(dense), rel=1e-4)
    assert summary["per_sample_error"] == pytest.approx(np.mean(per_sample), rel=1e-4)


def test_an_l3d_run_on_tms_trains_evaluates_and_plots(finished_runs):
    # The tiny L3D run (tests/tiny_runs.py: l3d:5-2, 2 steps, a fixed set of 64 samples) went
    # through setup, train, evaluate and plot (spdjax.train_and_evaluate). Its lr's step decay
    # is checked on the guide's run (test_the_guides_library_examples_run).
    import json

    wd = finished_runs["l3d"]
    assert json.loads((wd / "config.json").read_text())["method"] == "l3d"
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0 < summary["recon_error"] < 1 and summary["alive"] <= 5
    assert 0 <= summary["selectivity"] <= 1 and 0 < summary["mmcs"] <= 1
    assert 0 < summary["recon_error_train"] < 1  # the config's fixed training set
    assert (wd / "figures" / "combined_diagram.png").stat().st_size > 0


def test_the_guides_library_examples_run(tmp_path, monkeypatch):
    import json
    import pathlib
    import re

    guide = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guides" / "l3d.md"
    blocks = re.findall(r"^```python\n(.*?)^```", guide.read_text(), re.M | re.S)
    assert len(blocks) == 2
    # Small enough to run in seconds: few steps (one dense), a 64-sample training set, an eval
    # batch of the same size (one compile for both), a target trained for a few steps.
    small = blocks[0].replace('{"steps": 3200}', '{"steps": 8, "log_every": 4, '
                              '"checkpoint_every": 8, "eval_batch_size": 64, '
                              '"l3d.n_samples": 64, "l3d.dense_steps": 1, "target_steps": 4, '
                              '"l3d.lr_decay_steps": 5}')
    assert small != blocks[0]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(small + blocks[1], str(guide), "exec"), ns)
    summary = ns["summary"]
    assert 0 < summary["recon_error"] < 1 and 0 < summary["recon_error_train"] < 1
    assert -1 <= summary["a_r"] <= 1
    lines = [json.loads(v) for v in
             (tmp_path / "workdir" / "l3d_tmcs" / "metrics.jsonl").read_text().splitlines()]
    # Logged at steps 4 and 8 (lr of steps 3 and 7): L3D's own lr carries the step decay.
    logged = [v[k] for v in lines if "lr_decayed" in v for k in ("lr", "lr_decayed")]
    assert logged == pytest.approx([0.01, 0.01, 0.01, 0.01 * 0.8])
    assert np.isfinite(float(ns["loss"])) and 0 < float(ns["loss"]) <= 1.5
    assert ns["x"].shape == (32, 10)


def test_three_method_ground_truth_reads_l3d_signs_and_shared_components():
    from benchmarks.reproduce.three_methods import ground_truth

    W = np.random.default_rng(0).normal(size=(5, 2))
    P = np.zeros((5, 5, 2))
    for c in range(4):  # features 0-3 each on a component of their own; 4 on component 3 too
        P[c, c] = W[c]
    P[3, 4] = W[4]
    spd = ground_truth("SPD", W, P)
    assert spd["features_found"] == 4 and spd["components_shared"]
    assert spd["mmcs"] == pytest.approx(1.0) and spd["ml2r"] == pytest.approx(1.0)
    flipped = ground_truth("SPD", W, -P)  # signed cosines: a negated component matches nothing
    assert flipped["features_found"] == 0
    l3d_gt = ground_truth("L3D", W, -P)  # L3D: |cos|, no ML2R
    assert l3d_gt["features_found"] == 4 and "ml2r" not in l3d_gt


def test_the_resid_mlp_variant_decomposes_the_spd_target():
    from spdjax.config.runs import validate

    config = spdjax.config.load("l3d:resid-mlp-1")
    validate(config)
    spd = spdjax.config.load("resid_mlp:1")
    same = ("experiment", "variant", "target_seed", "target_steps", "target_recipe")
    assert [config[k] for k in same] == [spd[k] for k in same]
    assert config.C == 100 and config.l3d.n_samples == 0


@pytest.mark.parametrize("C", [0, True, 2.0])
def test_apd_and_l3d_share_the_c_check(setup, C):
    from spdjax.methods.apd_decomposition import decompose_apd

    target = setup[0].target
    for name, fn in (("L3D", l3d.decompose_l3d), ("APD", decompose_apd)):
        with pytest.raises(ValueError, match=f"{name}: C must be a positive integer, got {C!r}"):
            fn(target, {"*": 1}, C)


def random_factors(key, shape, ranks, C_):
    keys = jax.random.split(key, len(shape) + 1)
    f = {"core": jax.random.normal(keys[0], (*ranks, C_))}
    for j, (r, dim) in enumerate(zip(ranks, shape)):
        f[f"f{j}"] = jax.random.normal(keys[j + 1], (r, dim, C_)) / np.sqrt(dim)
    return f


# Several sites with 1-D (bias), 2-D and 3-D tensors; ranks capped at each mode's size.
FACTORED_SHAPES = {"s1": {"weight": (5, 4), "bias": (4,)}, "s2": {"weight": (3, 4, 2)},
                   "s3": {"weight": (4, 6)}}


def factored_setup(rank, seed=0, C_=5, batch=6):
    key = jax.random.key(seed)
    trees = []
    for which in range(2):  # encoder, decoder
        tree = {}
        for i, (n, ts) in enumerate(FACTORED_SHAPES.items()):
            tree[n] = {}
            for j, (t, shape) in enumerate(ts.items()):
                ranks = tuple(min(rank, dim) for dim in shape) if t == "weight" else (1,)
                tree[n][t] = random_factors(jax.random.fold_in(key, 100 * which + 10 * i + j),
                                            shape, ranks, C_)
        trees.append(tree)
    grads = {n: {t: jax.random.normal(jax.random.fold_in(key, 1000 + 10 * i + j), (batch, *shape))
                 for j, (t, shape) in enumerate(ts.items())}
             for i, (n, ts) in enumerate(FACTORED_SHAPES.items())}
    return {"encode": trees[0], "decode": trees[1]}, grads


def dense_contract(f, g):
    v = tucker(f)
    dims = "ijk"[:v.ndim - 1]
    return jnp.einsum(f"b{dims},{dims}C->bC", g, v)


@pytest.mark.parametrize("rank", [1, 2])
def test_factored_tucker_contraction_gram_and_norms_equal_the_dense_ones(rank):
    params, grads = factored_setup(rank)

    @jax.jit  # one compile for every tensor
    def pieces(dec, grads):
        return {n: {t: (tucker(f), tucker_contract(f, grads[n][t]), dense_contract(f, grads[n][t]),
                        tucker_gram(f), tucker_sq_norms(f)) for t, f in ts.items()}
                for n, ts in dec.items()}

    got = pieces(params["decode"], grads)
    for n, ts in params["decode"].items():
        for t, f in ts.items():
            v, contracted, dense, gram, sq_norms = got[n][t]
            np.testing.assert_allclose(v, np_tucker(f), rtol=1e-4, atol=1e-6)  # 3-D too
            flat_v = np.asarray(v, np.float64).reshape(-1, v.shape[-1])  # [n_params, C]
            np.testing.assert_allclose(contracted, dense, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gram, flat_v.T @ flat_v, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(sq_norms, np.sum(flat_v**2, axis=0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"gradients of shape \(6, 4, 5\) do not match"):
        tucker_contract(params["decode"]["s1"]["weight"], jnp.zeros((6, 4, 5)))


def dense_loss(params, grads, topk):
    """The explicit path: every subnetwork's dense tensor, z = <V_in, g>, g_hat = V_out z_topk."""
    z = sum(dense_contract(f, grads[n][t]) for n, ts in params["encode"].items()
            for t, f in ts.items())
    recon = l3d_terms.decode(None, params, z * batch_topk_mask(z, topk))
    return (l3d_terms.dense_relative_error(grads, recon),
            l3d_terms.dense_per_sample_error(grads, recon))


def factored_loss(params, grads, topk):
    """The training step's path (:func:`l3d_terms.reconstruction_errors`)."""
    # The terms read only the params (the decomposition argument is unused), so no
    # L3DDecomposition is needed for these 3-D tensors. Also whether the Gram identity was used.
    sq_err, sq_norm, _, _, gram_form = l3d_terms.reconstruction_errors(None, params, grads, topk)
    return (l3d_terms.relative_error(sq_err, sq_norm),
            (l3d_terms.per_sample_error(sq_err, sq_norm), gram_form))


@pytest.mark.parametrize("rank", [1, 2])
def test_factored_loss_and_its_gradients_equal_the_dense_path(rank):
    params, grads = factored_setup(rank, seed=rank)

    @jax.jit  # topk traced: one compile for both values and both paths
    def both(p, k):
        return tuple(jax.value_and_grad(lambda p: fn(p, grads, k), has_aux=True)(p)
                     for fn in (factored_loss, dense_loss))

    for topk in (0.3, 1.0):
        ((got, (got_per, gram_form)), grad_f), ((want, want_per), grad_d) = both(params, topk)
        assert 0.05 < float(want) < 50  # a non-trivial error, so a dropped term would show
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(got_per, want_per, rtol=1e-4)
        # The identity was used here (well-conditioned factors), not the explicit fallback.
        assert bool(gram_form)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_f),
                                jax.tree.leaves(grad_d)):
            scale = float(np.max(np.abs(b)))
            assert scale > 0, path
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"topk {topk} {path}")


def test_the_factored_renormalisation_matches_dense_norms(setup):
    params, _ = factored_setup(2)
    dec = params["decode"]
    for how in ("unit", "reference"):
        # normalise reads only the factors; its dense counterpart, from tucker() explicitly:
        norms = [np.sqrt(np.sum(np.asarray(tucker(f), np.float64) ** 2,
                                axis=tuple(range(f["core"].ndim - 1))))
                 for ts in dec.values() for f in ts.values()]
        scale = np.sqrt(sum(v**2 for v in norms)) if how == "unit" else np.sqrt(sum(norms))
        got = setup[0].normalise(dec, how)  # reads only the factors it is given
        for n, ts in dec.items():
            for t, f in ts.items():
                per = scale ** (1.0 / len(f)) + EPS
                for name, a in f.items():
                    np.testing.assert_allclose(got[n][t][name], np.asarray(a) / per, rtol=1e-5,
                                               err_msg=f"{how} {n}/{t}/{name}")


def test_outer_product_gradients_equal_the_dense_ones_and_give_the_same_loss(setup):
    from spdjax.families.resid_mlp import model as rm
    from spdjax.methods.l3d_decomposition import OuterGrads

    def is_outer(v):
        return isinstance(v, OuterGrads)

    d, tp, params, x = setup
    cfg1, cfg2 = (rm.ResidMLPConfig(6, 10, 3, n, batch_size=8) for n in (1, 2))
    rng = np.random.default_rng(0)

    def resid_params(cfg):
        params = {"W_E": rng.normal(size=(cfg.n_features, cfg.d_embed))}
        for i in range(cfg.n_layers):
            params[f"layers_{i}"] = {
                "mlp_in": {"kernel": rng.normal(size=(cfg.d_embed, cfg.d_mlp))},
                "mlp_out": {"kernel": rng.normal(size=(cfg.d_mlp, cfg.d_embed))}}
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

    resid = [(l3d.decompose_l3d(rm.resid_mlp_target(cfg), {"*/mlp_*": 1}, C), resid_params(cfg),
              jnp.asarray(rng.uniform(-1, 1, size=(B, cfg.n_features)), jnp.float32))
             for cfg in (cfg1, cfg2)]
    # Two layers: the first mlp_out gives its output back factored, so the dense gradients.
    shapes = jax.eval_shape(resid[1][0].loss_grads, *resid[1][1:], jax.random.key(3))
    assert not any(is_outer(v) for v in jax.tree.leaves(shapes, is_leaf=is_outer))
    forms = []
    for i, (dd, tpp, xx) in enumerate([(d, tp, x), resid[0]]):  # a bias; Mapped in and out
        dense, got = jax.jit(lambda tp_, x_, dd=dd: (  # one compile for both forms
            dd.per_sample_grads(tp_, x_, jax.random.key(3)),
            dd.loss_grads(tp_, x_, jax.random.key(3))))(tpp, xx)
        forms.append((dense, got))
        leaves = jax.tree.leaves(got, is_leaf=is_outer)
        assert [is_outer(v) for v in leaves] == [t == "weight" for ts in dense.values()
                                                 for t in sorted(ts)]
        for (path, want), v in zip(jax.tree_util.tree_leaves_with_path(dense), leaves):
            v = v.dense() if is_outer(v) else v
            np.testing.assert_allclose(v, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()),
                                       err_msg=f"case {i} {path}")
    # The loss and its gradient from either form of the two-site target's gradients.
    dense, outer = forms[0]

    @jax.jit  # one compile for both forms
    def loss_and_grads(p, forms):
        return [jax.value_and_grad(lambda p: l3d_terms.relative_error(
            *l3d_terms.reconstruction_errors(d, p, g, 0.3)[:2]))(p) for g in forms]

    (want, g_want), (got, g_got) = loss_and_grads(params, (dense, outer))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-5 * float(jnp.abs(b).max())),
                 g_got, g_want)


def test_the_factored_loss_is_accurate_and_never_negative_for_cancelling_coefficients():
    # Nearly parallel decoder directions (the last a copy of the first, eps apart) and the
    # encoder pinv(V_out): coefficients ~1/eps of opposite signs reconstruct g exactly. The Gram
    # identity alone gave -5.8e-3 (eps 1e-3) and 0.04710 for the true 0.04780 with one
    # direction dropped (eps 3e-3); the explicit form is exact to ~1e-10.
    rng = np.random.default_rng(0)
    n, batch = 20, 64
    G = rng.normal(size=(batch, n))
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    U, w = Q[:, :n - 1], Q[:, n - 1]

    @jax.jit  # topk traced: one compile per shape
    def errors(V_out, V_in, topk):
        def fac(V):
            return {"core": jnp.ones((1, V.shape[1]), jnp.float32), "f0": V[None]}
        p = {"encode": {"s": {"bias": fac(V_in)}}, "decode": {"s": {"bias": fac(V_out)}}}
        out = l3d_terms.reconstruction_errors(None, p, {"s": {"bias": jnp.asarray(G, jnp.float32)}},
                                              topk)
        return l3d_terms.relative_error(*out[:2]), out[4]

    def loss(V_out, V_in, topk):
        err, gram_form = errors(jnp.asarray(V_out, jnp.float32), jnp.asarray(V_in, jnp.float32),
                                jnp.float32(topk))
        return float(err), bool(gram_form)

    for eps in (3e-3, 1e-3):
        V_out = np.concatenate([U, U[:, :1] + eps * w[:, None]], 1)
        V_out /= np.linalg.norm(V_out, axis=0)
        V_in = np.linalg.pinv(V_out).T
        dropped = V_in.copy()
        dropped[:, 1] = 0.0
        for enc, topk in ((V_in, 1.0), (V_in, l3d.DENSE_TOPK), (dropped, 1.0)):
            want = np_relative_error(enc.T, V_out.T, G, topk)[0]
            got, gram_form = loss(V_out, enc, topk)
            assert got >= 0 and not gram_form
            assert got == pytest.approx(want, rel=1e-4, abs=1e-7), (eps, topk)
    V = Q[:, :n - 1]  # orthonormal: no cancellation, the identity is kept
    got, gram_form = loss(V, V, 1.0)
    assert gram_form and got == pytest.approx(np_relative_error(V.T, V.T, G, 1.0)[0], rel=1e-5)


def test_the_gram_identity_is_clipped_at_zero():
    # ||g||^2 = 1, z.y = 1, z^T M z = 1 - 1e-3: the identity's -1e-3 is a rounding artefact.
    err = l3d_terms.sq_errors(jnp.ones(1), jnp.ones((1, 1)), jnp.full((1, 1), 1 - 1e-3),
                              jnp.ones((1, 1)))
    assert float(err[0]) == 0.0
    assert float(l3d_terms.relative_error(jnp.array([-1.0, 0.5]), jnp.ones(2))) == pytest.approx(
        0.25)


def positions_target(T, d_in=6, d_hidden=8, d_out=5, seed=0):
    """``x [B, T, d_in]``: site ``a`` (with a bias) per position, a mix across positions
    (cumulative sum), site ``b`` per position, the mean over positions."""
    from spdjax.core.target import Site, weight_at

    def fn(p, x, hooks):
        h = jnp.tanh(hooks("a", x, lambda a: a @ p["a"]["kernel"] + p["a"]["bias"]))
        h = h + 0.3 * jnp.cumsum(h, axis=-2)
        return jnp.mean(hooks("b", h, lambda a: a @ p["b"]["kernel"]), axis=-2)

    sites = [Site("a", "linear", d_in, d_hidden, weight_at(("a", "kernel")),
                  weight_at(("a", "bias"))),
             Site("b", "linear", d_hidden, d_out, weight_at(("b", "kernel")))]
    rng = np.random.default_rng(seed)
    tp = {"a": {"kernel": rng.normal(size=(d_in, d_hidden)), "bias": rng.normal(size=d_hidden)},
          "b": {"kernel": rng.normal(size=(d_hidden, d_out)) / 3}}
    x = rng.normal(size=(6, T, d_in))
    tp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tp)
    return spdjax.from_function(fn, sites), tp, jnp.asarray(x, jnp.float32)


def assert_factored_grads_match_dense(d, tp, x, outer_sites):
    """``loss_grads`` against ``per_sample_grads``: each tensor, ``sq_norms``, ``encode`` and
    the loss; ``outer_sites``: the weights expected as OuterGrads (the others formed)."""
    from spdjax.methods.l3d_decomposition import OuterGrads

    def is_outer(v):
        return isinstance(v, OuterGrads)

    params = jax.jit(d.init)(jax.random.key(1))
    params["encode"] = jax.tree.map(lambda a: a * 1.7 + 0.1, params["encode"])

    @jax.jit
    def both(tp, x):
        key = jax.random.key(0)
        dense, got = d.per_sample_grads(tp, x, key), d.loss_grads(tp, x, key)
        parts = [(l3d_terms.sq_norms(g), l3d_terms.encode(d, params, g),
                  l3d_terms.relative_error(*l3d_terms.reconstruction_errors(d, params, g, 0.3)[:2]))
                 for g in (dense, got)]
        return dense, got, parts

    dense, got, (want, have) = both(tp, x)
    assert {n for n, ts in got.items() if is_outer(ts["weight"])} == set(outer_sites)
    for n, ts in dense.items():
        assert set(got[n]) == set(ts)
        for t, want_t in ts.items():
            v = got[n][t].dense() if is_outer(got[n][t]) else got[n][t]
            np.testing.assert_allclose(v, want_t, rtol=1e-4,
                                       atol=1e-6 * float(jnp.abs(want_t).max()), err_msg=f"{n}/{t}")
    for a, b, what in zip(have, want, ("sq_norms", "encode", "loss")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()),
                                   err_msg=what)


def test_outer_gradients_over_positions_with_a_bias_and_mixing_equal_the_dense_ones():
    target, tp, x = positions_target(T=3)
    d = l3d.decompose_l3d(target, {"*": 1}, C, rank=1)
    assert_factored_grads_match_dense(d, tp, x, outer_sites={"a", "b"})


def test_outer_gradients_of_a_weight_used_twice_equal_the_dense_ones():
    from spdjax.core.tracing import from_jax

    rng = np.random.default_rng(0)
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(8, 8)) / 3, jnp.float32)},
              "v": {"kernel": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}}  # (out, in)

    def f(p, x):  # x [T, 8] per sample
        h = jnp.tanh(x @ p["w"]["kernel"])
        h = jnp.tanh(h @ p["w"]["kernel"])  # the same weight again: sites w and w#2
        return jnp.einsum("oi,...ti->...to", p["v"]["kernel"], h)

    x = jnp.asarray(rng.normal(size=(6, 3, 8)), jnp.float32)
    target, tp = from_jax(f, params, x)
    assert sorted(target.sites) == ["v", "w", "w#2"]
    d = l3d.decompose_l3d(target, {"*": 1}, C, rank=1)
    # v (8 -> 3) at 3 positions is cheaper formed (outer_form_is_cheaper).
    assert_factored_grads_match_dense(d, tp, x, outer_sites={"w", "w#2"})


def test_outer_gradients_of_mapped_inputs_with_a_bias_equal_the_dense_ones():
    from spdjax.core.target import Mapped, Site, weight_at

    rng = np.random.default_rng(1)
    k, d_in, d_hidden, d_y = 4, 9, 10, 3
    E1, E2, post = (jnp.asarray(rng.normal(size=s) / 3, jnp.float32)  # tanh not saturated
                    for s in ((k, d_in), (2, d_in), (d_hidden, d_y)))

    def fn(p, x, hooks):  # the input is x1 E1 + x2 E2, the output read through post
        W, b = p["a"]["kernel"], p["a"]["bias"]
        m = Mapped((x[..., :k], x[..., k:]), pre=(E1, E2), post=post)
        return jnp.tanh(hooks("a", m, lambda a: a.matmul(W) + b @ post)) @ p["c"]["kernel"]

    sites = [Site("a", "linear", d_in, d_hidden, weight_at(("a", "kernel")),
                  weight_at(("a", "bias")))]
    tp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {
        "a": {"kernel": rng.normal(size=(d_in, d_hidden)), "bias": rng.normal(size=d_hidden)},
        "c": {"kernel": rng.normal(size=(d_y, 2))}})
    x = jnp.asarray(rng.normal(size=(B, k + 2)), jnp.float32)
    d = l3d.decompose_l3d(spdjax.from_function(fn, sites), {"*": 1}, C, rank=2)
    assert_factored_grads_match_dense(d, tp, x, outer_sites={"a"})


def test_long_sequences_take_the_dense_gradients_per_site():
    from spdjax.methods.l3d_decomposition import outer_form_is_cheaper

    # One position: factors always win; many positions of a narrow site: dense wins.
    assert outer_form_is_cheaper(1, 6, 8, 1, C) and not outer_form_is_cheaper(12, 6, 8, 1, C)
    assert outer_form_is_cheaper(12, 100, 100, 1, C)
    target, tp, x = positions_target(T=12, d_in=6, d_hidden=40, d_out=40)
    d = l3d.decompose_l3d(target, {"*": 1}, C, rank=1)
    # a (6 -> 40) at 12 positions is cheaper formed, b (40 -> 40) as factors.
    assert not outer_form_is_cheaper(12, 6, 40, 1, C) and outer_form_is_cheaper(12, 40, 40, 1, C)
    assert_factored_grads_match_dense(d, tp, x, outer_sites={"b"})


def test_a_site_the_forward_never_calls_is_an_error():
    from spdjax.core.target import Site, weight_at

    def fn(p, x, hooks):  # site "b" is declared but never called
        return hooks("a", x, lambda a: a @ p["a"]["kernel"])

    sites = [Site(n, "linear", 3, 3, weight_at((n, "kernel"))) for n in ("a", "b")]
    tp = {n: {"kernel": jnp.eye(3)} for n in ("a", "b")}
    d = l3d.decompose_l3d(spdjax.from_function(fn, sites), {"*": 1}, C)
    x = jnp.ones((4, 3))
    for fn_ in (d.loss_grads, d.per_sample_grads, d.per_sample_grad_factors):
        with pytest.raises(ValueError, match=r"L3D: Sites \['b'\] were never called"):
            fn_(tp, x, jax.random.key(0))
