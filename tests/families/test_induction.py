"""The induction-head criteria (spdjax.families.lm.induction) on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.families.lm import induction
from spdjax.losses import make_context
from spdjax.families.lm import model as lm_model
from spdjax.losses.divergences import DIVERGENCES, kl

CFG = lm_model.LMConfig("induction", 12, 16, 8, 1, 2, prefix_window=10)
SITES = list(induction.CIRCUIT_POSITION)


@jax.jit  # one compile for the init and the batch, not one per eager op
def _init_and_batch():
    params = lm_model.init_params(jax.random.key(0), CFG)
    ids, labels = lm_model.induction(CFG, jax.random.key(1), 32)
    return params, ids, labels


@pytest.fixture(scope="module")
def target_and_batch():
    """``(target params, ids [32, 16], labels [32])``, shared by the tests that only read them."""
    return _init_and_batch()


@pytest.fixture(scope="module")
def exact(target_and_batch):
    """``(decomposition, params)`` of :func:`_exact_decomposition` of the shared target."""
    return _exact_decomposition(target_and_batch[0])


def _exact_decomposition(target_params):
    """Factors V = W, U = I (C = d_out): the subcomponents sum to every site's weight."""
    d = spdjax.decompose(lm_model.target(CFG), {"blocks_*/attn/*": CFG.d_model})
    p = jax.jit(d.init)(jax.random.key(2), target_params)
    for n in d.site_names:
        W = d.site(n).weight(target_params)
        p["components"][n] = {"V": W, "U": jnp.eye(CFG.d_model)}
    return d, p


def test_forward_is_the_model_and_shows_causal_patterns(target_and_batch):
    params, ids, _ = target_and_batch
    (logits, pats), model = jax.jit(lambda p: (  # both in one compile
        induction.forward(p, CFG, ids), lm_model.Transformer(CFG).apply({"params": p}, ids)))(
        params)
    np.testing.assert_allclose(logits, model, atol=1e-5)
    assert len(pats) == 2 and pats[0].shape == (32, 16, 16)
    np.testing.assert_allclose(pats[1].sum(-1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.triu(pats[0], 1))) == 0.0
    with pytest.raises(ValueError, match="induction toy"):
        induction.forward(params, lm_model.VARIANTS["bytes"], ids)


def test_positions_found_set_and_sparsity_on_hand_built_ci(target_and_batch):
    ids = target_and_batch[1][:4]
    pos = jax.tree.map(np.asarray, induction.key_positions(ids, CFG))
    s_token = CFG.n_tokens + 1
    assert np.all(np.asarray(ids)[np.arange(4), pos["s"]] == s_token)
    ci = {n: np.zeros((4, 16, 5), np.float32) for n in SITES}  # built on the host: no eager ops
    # subcomponent 3 of layer-1 v at m in sequence 2 only; subcomponent 0 of layer-1 q at e in
    # all; subcomponent 4 of layer-0 q everywhere but at its circuit position m.
    ci["blocks_1/attn/v"][2, pos["m"][2], 3] = 0.5
    ci["blocks_1/attn/q"][:, -1, 0] = 1.0
    ci["blocks_0/attn/q"][:, :, 4] = 1.0
    ci["blocks_0/attn/q"][np.arange(4), pos["m"], 4] = 0.05
    # both functions under one jit (as induction.measure_ci calls them): one compile
    found, sp = jax.jit(lambda c, i: (induction.found_subcomponents(c, i, CFG),
                                      induction.sparsity(c, i, CFG)))(ci, ids)
    assert np.asarray(found["blocks_1/attn/v"]).tolist() == [False] * 3 + [True, False]
    assert np.asarray(found["blocks_1/attn/q"]).tolist() == [True] + [False] * 4
    assert not np.any(found["blocks_0/attn/q"]) and not np.any(found["blocks_1/attn/k"])
    assert float(sp["at_induction"]["blocks_1/attn/q"]) == 1.0
    assert float(sp["at_induction"]["blocks_1/attn/v"]) == 0.0
    assert float(sp["at_circuit_position"]["blocks_1/attn/v"]) == 0.25
    assert float(sp["elsewhere"]["blocks_0/attn/q"]) == 1.0  # active on every other position
    assert float(sp["elsewhere"]["blocks_1/attn/q"]) == 0.0  # only at e
    with pytest.raises(ValueError, match="missing the circuit's sites"):
        induction.found_subcomponents({"blocks_0/attn/q": ci["blocks_0/attn/q"]}, ids, CFG)


def test_attention_and_ov_measures_on_hand_built_weights():
    T = 6
    # the inputs built on the host and every measure under one jit: one compile
    prev = np.zeros((1, T, T), np.float32)
    prev[0, 0, 0] = 1.0
    prev[0, np.arange(1, T), np.arange(T - 1)] = 1.0
    uniform = (np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]).astype(np.float32)
    # one-hot embeddings, identity OV and unembedding: every token copies itself; a cyclic
    # permutation in W_out copies none.
    V, D = CFG.vocab, 16
    cfg = lm_model.LMConfig("induction", 12, 16, D, 1, 2, prefix_window=10)
    eye = np.eye(V, D, dtype=np.float32)

    def ov_params(w_out):
        return {"embed": {"embedding": eye}, "unembed": {"kernel": eye.T},
                "blocks_1": {"attn": {"v": {"kernel": np.eye(D, dtype=np.float32)},
                                      "out": {"kernel": w_out}}}}

    @jax.jit
    def measures(prev, uniform, copying, permuted):
        return (induction.previous_token_mass(prev),
                induction.attention_mass(prev, jnp.array([4]), jnp.array([3])),
                induction.attention_mass(prev, jnp.array([4]), jnp.array([4])),
                induction.previous_token_mass(uniform[None]),
                induction.ov_diagonal_fraction(copying, cfg),
                induction.ov_diagonal_fraction(permuted, cfg))

    out = [float(v) for v in measures(prev, uniform, ov_params(np.eye(D, dtype=np.float32)),
                                      ov_params(np.roll(np.eye(D, dtype=np.float32), 1, axis=1)))]
    assert out[:3] == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(out[3], np.mean(1.0 / np.arange(2, T + 1)), rtol=1e-6)
    assert out[4:] == [1.0, 0.0]


def test_exact_decomposition_with_everything_found_is_the_target(target_and_batch, exact):
    params, ids, labels = target_and_batch
    d, p = exact
    ones = {n: jnp.ones((32, 16, CFG.d_model)) for n in SITES}
    kept = induction.subnetwork_params(d, p, params, {n: jnp.ones(8, bool) for n in SITES})
    for n in SITES:
        np.testing.assert_allclose(d.site(n).weight(kept), d.site(n).weight(params), atol=1e-6)
    m = jax.jit(lambda: induction.measure_ci(d, p, params, CFG, ids, labels, ones))()
    m = jax.tree.map(float, m)
    assert m["found"] == {n: 8.0 for n in SITES}
    assert m["kept_accuracy"] == m["unmasked_accuracy"] == m["target_accuracy"]
    assert m["kept_ci_masked_accuracy"] == m["target_accuracy"]
    assert m["kept_accuracy_one_site"] == {n: m["target_accuracy"] for n in SITES}
    assert m["previous_token_mass"] == pytest.approx(m["target_previous_token_mass"], abs=1e-6)
    assert m["induction_mass"] == pytest.approx(m["target_induction_mass"], abs=1e-6)
    assert m["ov_diagonal_fraction"] == m["target_ov_diagonal_fraction"]
    assert m["sparsity"]["at_induction"]["blocks_0/attn/q"] == 8.0
    v = induction.verdicts(m)
    assert v["sparse_at_induction"] and not v["sparse_elsewhere"]  # 8 <= 8 at e; 8 > 1 off it
    assert v["keep_found"] == (m["target_accuracy"] >= 0.95)


def test_kept_accuracy_per_site_names_the_site_whose_found_set_falls_short(target_and_batch,
                                                                            exact):
    # labels: the target's own answers (accuracy 1); nothing found at layer 1's out projection
    params, ids, _ = target_and_batch
    d, p = exact
    labels = jnp.argmax(induction.forward(params, CFG, ids)[0][:, -1], -1)
    ci = {n: jnp.full((32, 16, CFG.d_model), 0.0 if n == "blocks_1/attn/out" else 1.0)
          for n in SITES}
    m = jax.tree.map(float, jax.jit(lambda: induction.measure_ci(d, p, params, CFG, ids, labels,
                                                                 ci))())
    assert m["target_accuracy"] == m["unmasked_accuracy"] == 1.0
    one = m["kept_accuracy_one_site"]
    assert one.pop("blocks_1/attn/out") == m["kept_accuracy"] < 0.9
    # CI 1 at every found subcomponent: masking by CI is keeping the found sets
    assert m["kept_ci_masked_accuracy"] == m["kept_accuracy"]
    assert one == {n: 1.0 for n in SITES if n != "blocks_1/attn/out"}


def test_criteria_end_to_end_and_bad_inputs(target_and_batch, exact):
    params, ids, labels = target_and_batch
    d, p = exact
    out = induction.criteria(d, p, params, CFG, ids, labels)
    assert set(out["passes"]) == {"sparse_at_induction", "sparse_elsewhere", "keep_found",
                                  "ablate_found", "previous_token_head", "induction_head",
                                  "copying"}
    assert out["all_pass"] == all(out["passes"].values())
    assert all(0 <= v <= CFG.d_model for v in out["found"].values())
    # saturated CI at e: layer-1 out's CI bias lifted so all 8 are; the rest counted in NumPy
    ci = dict(p["ci"], **{"blocks_1/attn/out": [p["ci"]["blocks_1/attn/out"][0], {
        **p["ci"]["blocks_1/attn/out"][1], "b": p["ci"]["blocks_1/attn/out"][1]["b"] + 5.0}]})
    lifted = {**p, "ci": ci}
    sat = induction.criteria(d, lifted, params, CFG, ids, labels)["saturated_at_induction"]
    assert sat.pop("blocks_1/attn/out") == 8.0
    pre = {n: np.asarray(c.pre) for n, c in make_context(d, params, p, ids).ci.items()}
    assert sat == {n: pytest.approx(np.mean(np.sum(pre[n][:, -1, :] >= 1.0, axis=-1)))
                   for n in sat}
    assert sum(sat.values()) > 0  # the random CI functions saturate a few
    with pytest.raises(ValueError, match="S = 13 exactly once"):
        induction.criteria(d, p, params, CFG, ids.at[:, -1].set(1), labels)
    with pytest.raises(ValueError, match="tau must be in"):
        induction.criteria(d, p, params, CFG, ids, labels, tau=1.5)


def test_kl_answer_is_kl_at_the_last_position():
    a, b = jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
    assert DIVERGENCES["kl_answer"] is induction.kl_answer
    np.testing.assert_allclose(induction.kl_answer(a, b), kl(a[:, -1], b[:, -1]), rtol=1e-6)
    assert float(induction.kl_answer(a.at[:, :-1].set(0.0), b)) == pytest.approx(
        float(induction.kl_answer(a, b)))
    with pytest.raises(ValueError, match="positions, vocab"):
        induction.kl_answer(a[0, 0, 0], b[0, 0, 0])


def test_answer_recipe_reconstructs_the_answer_position_only():
    from spdjax.config import files as configs
    c = configs.load("lm:ih+answer")
    assert c.losses.stochastic_recon.divergence == "kl_answer"
    assert c.losses.stochastic_recon_layerwise.divergence == "kl_answer"
    assert c.losses.importance_minimality.coeff > configs.load("lm:ih").losses[
        "importance_minimality"].coeff
    with pytest.raises(ValueError, match="induction toy"):
        configs.load("lm:bytes+answer")
