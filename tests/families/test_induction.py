"""The induction-head criteria (spdjax.families.lm.induction) on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.families.lm import induction
from spdjax.families.lm import model as lm_model
from spdjax.losses.divergences import DIVERGENCES, kl

CFG = lm_model.LMConfig("induction", 12, 16, 8, 1, 2, prefix_window=10)
SITES = list(induction.CIRCUIT_POSITION)


def _target_and_batch(n=32):
    params = lm_model.init_params(jax.random.key(0), CFG)
    ids, labels = lm_model.induction(CFG, jax.random.key(1), n)
    return params, ids, labels


def _exact_decomposition(target_params):
    """Factors V = W, U = I (C = d_out): the subcomponents sum to every site's weight."""
    d = spdjax.decompose(lm_model.target(CFG), {"blocks_*/attn/*": CFG.d_model})
    p = d.init(jax.random.key(2), target_params)
    for n in d.site_names:
        W = d.site(n).weight(target_params)
        p["components"][n] = {"V": W, "U": jnp.eye(CFG.d_model)}
    return d, p


def test_forward_is_the_model_and_shows_causal_patterns():
    params, ids, _ = _target_and_batch()
    logits, pats = jax.jit(lambda p: induction.forward(p, CFG, ids))(params)
    np.testing.assert_allclose(
        logits, jax.jit(lm_model.Transformer(CFG).apply)({"params": params}, ids), atol=1e-5)
    assert len(pats) == 2 and pats[0].shape == (32, 16, 16)
    np.testing.assert_allclose(pats[1].sum(-1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.triu(pats[0], 1))) == 0.0
    with pytest.raises(ValueError, match="induction toy"):
        induction.forward(params, lm_model.VARIANTS["bytes"], ids)


def test_positions_found_set_and_sparsity_on_hand_built_ci():
    _, ids, _ = _target_and_batch(4)
    pos = induction.key_positions(ids, CFG)
    s_token = CFG.n_tokens + 1
    assert np.all(np.asarray(ids)[np.arange(4), np.asarray(pos["s"])] == s_token)
    ci = {n: jnp.zeros((4, 16, 5)) for n in SITES}
    # subcomponent 3 of layer-1 v at m in sequence 2 only; subcomponent 0 of layer-1 q at e in
    # all; subcomponent 4 of layer-0 q everywhere but at its circuit position m.
    m2 = int(pos["m"][2])
    ci["blocks_1/attn/v"] = ci["blocks_1/attn/v"].at[2, m2, 3].set(0.5)
    ci["blocks_1/attn/q"] = ci["blocks_1/attn/q"].at[:, -1, 0].set(1.0)
    ci["blocks_0/attn/q"] = ci["blocks_0/attn/q"].at[:, :, 4].set(1.0)
    ci["blocks_0/attn/q"] = ci["blocks_0/attn/q"].at[jnp.arange(4), pos["m"], 4].set(0.05)
    found = induction.found_subcomponents(ci, ids, CFG)
    assert np.asarray(found["blocks_1/attn/v"]).tolist() == [False] * 3 + [True, False]
    assert np.asarray(found["blocks_1/attn/q"]).tolist() == [True] + [False] * 4
    assert not np.any(found["blocks_0/attn/q"]) and not np.any(found["blocks_1/attn/k"])
    sp = induction.sparsity(ci, ids, CFG)
    assert float(sp["at_induction"]["blocks_1/attn/q"]) == 1.0
    assert float(sp["at_induction"]["blocks_1/attn/v"]) == 0.0
    assert float(sp["at_circuit_position"]["blocks_1/attn/v"]) == 0.25
    assert float(sp["elsewhere"]["blocks_0/attn/q"]) == 1.0  # active on every other position
    assert float(sp["elsewhere"]["blocks_1/attn/q"]) == 0.0  # only at e
    with pytest.raises(ValueError, match="missing the circuit's sites"):
        induction.found_subcomponents({"blocks_0/attn/q": ci["blocks_0/attn/q"]}, ids, CFG)


def test_attention_and_ov_measures_on_hand_built_weights():
    T = 6
    prev = jnp.zeros((1, T, T)).at[0, 0, 0].set(1.0).at[0, jnp.arange(1, T),
                                                           jnp.arange(T - 1)].set(1.0)
    assert float(induction.previous_token_mass(prev)) == 1.0
    assert float(induction.attention_mass(prev, jnp.array([4]), jnp.array([3]))) == 1.0
    assert float(induction.attention_mass(prev, jnp.array([4]), jnp.array([4]))) == 0.0
    uniform = jnp.tril(jnp.ones((T, T))) / jnp.arange(1, T + 1)[:, None]
    np.testing.assert_allclose(induction.previous_token_mass(uniform[None]),
                               np.mean(1.0 / np.arange(2, T + 1)), rtol=1e-6)
    # one-hot embeddings, identity OV and unembedding: every token copies itself; a cyclic
    # permutation in W_out copies none.
    V, D = CFG.vocab, 16
    cfg = lm_model.LMConfig("induction", 12, 16, D, 1, 2, prefix_window=10)
    eye = jnp.eye(V, D)
    params = {"embed": {"embedding": eye}, "unembed": {"kernel": eye.T},
              "blocks_1": {"attn": {"v": {"kernel": jnp.eye(D)}, "out": {"kernel": jnp.eye(D)}}}}
    assert float(induction.ov_diagonal_fraction(params, cfg)) == 1.0
    params["blocks_1"]["attn"]["out"]["kernel"] = jnp.roll(jnp.eye(D), 1, axis=1)
    assert float(induction.ov_diagonal_fraction(params, cfg)) == 0.0


def test_exact_decomposition_with_everything_found_is_the_target():
    params, ids, labels = _target_and_batch()
    d, p = _exact_decomposition(params)
    ones = {n: jnp.ones((32, 16, CFG.d_model)) for n in SITES}
    kept = induction.subnetwork_params(d, p, params, {n: jnp.ones(8, bool) for n in SITES})
    for n in SITES:
        np.testing.assert_allclose(d.site(n).weight(kept), d.site(n).weight(params), atol=1e-6)
    m = jax.jit(lambda: induction.measure_ci(d, p, params, CFG, ids, labels, ones))()
    m = jax.tree.map(float, m)
    assert m["found"] == {n: 8.0 for n in SITES}
    assert m["kept_accuracy"] == m["target_accuracy"]
    assert m["previous_token_mass"] == pytest.approx(m["target_previous_token_mass"], abs=1e-6)
    assert m["induction_mass"] == pytest.approx(m["target_induction_mass"], abs=1e-6)
    assert m["ov_diagonal_fraction"] == m["target_ov_diagonal_fraction"]
    assert m["sparsity"]["at_induction"]["blocks_0/attn/q"] == 8.0
    v = induction.verdicts(m)
    assert v["sparse_at_induction"] and not v["sparse_elsewhere"]  # 8 <= 8 at e; 8 > 1 off it
    assert v["keep_found"] == (m["target_accuracy"] >= 0.95)


def test_criteria_end_to_end_and_bad_inputs():
    params, ids, labels = _target_and_batch()
    d, p = _exact_decomposition(params)
    out = induction.criteria(d, p, params, CFG, ids, labels)
    assert set(out["passes"]) == {"sparse_at_induction", "sparse_elsewhere", "keep_found",
                                  "ablate_found", "previous_token_head", "induction_head",
                                  "copying"}
    assert out["all_pass"] == all(out["passes"].values())
    assert all(0 <= v <= CFG.d_model for v in out["found"].values())
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
