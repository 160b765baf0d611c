"""Interventions (spdjax/analysis/interventions.py) on a constructed model where one
subcomponent alone makes the prediction; the per-prompt tools with their default positions on
a model whose output has no position axis (the TMS run of tests/fixtures/checkpoint_format1),
through the library and the command."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.analysis import graphs, interventions as iv
from spdjax.core.target import Site, from_function, weight_at

X = jnp.array([[1.0, 0.5]])


@pytest.fixture(scope="module")
def one_suffices():
    """logits = x @ W (2 -> 3) with W the sum of 4 rank-one pieces: piece 0 puts 5 on token 2
    for x = (1, 0.5); pieces 1-3 add at most ~1.2 anywhere."""
    V = np.array([[1.0, 0.0, 0.3, 0.2], [0.0, 1.0, 0.5, -0.4]])
    U = np.array([[0.0, 0.0, 5.0], [1.8, -0.9, 0.6], [-1.2, 1.5, 0.3], [0.9, 0.6, -1.5]])
    W = V @ U
    target = from_function(lambda p, x, hooks: hooks("w", x, lambda a: a @ p["w"]),
                           [Site("w", "linear", 2, 3, weight_at(("w",)))])
    tp = {"w": jnp.asarray(W, jnp.float32)}
    d = spdjax.decompose(target, {"w": 4})
    params = d.init(jax.random.key(0), tp)
    params["components"]["w"] = {"V": jnp.asarray(V, jnp.float32),
                                 "U": jnp.asarray(U, jnp.float32)}
    return d, params, tp


def test_keeping_the_sufficient_subcomponent_keeps_the_prediction(one_suffices):
    d, params, tp = one_suffices
    kept = iv.intervene(d, params, tp, X, keep=[iv.Subcomponent("w", 0)], k=3)
    assert kept.positions is None and kept.n_kept == 1
    assert kept.target_top[0][0]["token"] == kept.masked_top[0][0]["token"] == 2
    # the NumPy computation of the same KL
    logits_t = np.asarray(X, np.float64) @ np.asarray(tp["w"], np.float64)
    logits_m = np.asarray(X[0, 0]) * np.array([0.0, 0.0, 5.0])
    p, q = (np.exp(v - v.max()) / np.exp(v - v.max()).sum() for v in (logits_t[0], logits_m))
    assert kept.kl == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-3)
    ablated = iv.intervene(d, params, tp, X, ablate=[iv.Subcomponent("w", 0)], k=3)
    assert ablated.n_kept == 3
    prob2 = {t["token"]: t["prob"] for t in ablated.masked_top[0]}[2]
    assert prob2 < 0.5 < kept.masked_top[0][0]["prob"]
    assert ablated.kl > 10 * kept.kl
    everything = iv.intervene(d, params, tp, X, k=3)  # base "ones": the decomposition = W
    assert everything.kl == pytest.approx(0.0, abs=1e-6)


def test_the_optimiser_finds_the_one_subcomponent_that_suffices(one_suffices):
    d, params, tp = one_suffices
    lines = []
    res = iv.optimize_sparse_ci(d, params, tp, X, token=2, position=None, steps=200, lr=0.1,
                                coeff=0.05, log_every=100,
                                progress=lambda s, n, row: lines.append(s))
    assert [(s, c) for s, c, _, _ in res.kept] == [("w", 0)]
    assert res.prob_kept > 0.95 and res.prob_masked > 0.9
    assert lines == [100, 200] and res.history[-1]["step"] == 200
    stoch = iv.optimize_sparse_ci(d, params, tp, X, token=2, position=None, steps=200, lr=0.1,
                                  coeff=0.05, mask_type="stochastic", key=jax.random.key(3))
    assert [(s, c) for s, c, _, _ in stoch.kept] == [("w", 0)]
    with pytest.raises(ValueError, match="needs a PRNG key"):
        iv.optimize_sparse_ci(d, params, tp, X, token=2, position=None, mask_type="stochastic")
    with pytest.raises(ValueError, match="outside the output"):
        iv.optimize_sparse_ci(d, params, tp, X, token=3, position=None)


def test_subcomponent_names_are_parsed_and_checked(one_suffices):
    d, _, _ = one_suffices
    subs = iv.parse_subcomponents("blocks_1/attn/out:3, w:0@-1,")
    assert subs == [iv.Subcomponent("blocks_1/attn/out", 3), iv.Subcomponent("w", 0, -1)]
    assert iv.describe(subs) == "blocks_1/attn/out:3,w:0@-1"
    for bad in ("w", "w:x", ":3", "w:1@y"):
        with pytest.raises(ValueError, match="is not 'site:index'"):
            iv.parse_subcomponents(bad)
    with pytest.raises(ValueError, match="Unknown site 'v'.*\\['w'\\]"):
        iv.check_subcomponents(d, [iv.Subcomponent("v", 0)], None)
    with pytest.raises(ValueError, match="outside \\[0, 4\\).*C = 4"):
        iv.check_subcomponents(d, [iv.Subcomponent("w", 4)], None)
    with pytest.raises(ValueError, match="no position axis"):
        iv.check_subcomponents(d, [iv.Subcomponent("w", 0, 2)], None)
    with pytest.raises(ValueError, match="outside the prompt of 5"):
        iv.check_subcomponents(d, [iv.Subcomponent("w", 0, 5)], 5)
    assert iv.check_subcomponents(d, [iv.Subcomponent("w", 1, -1)], 5) == [
        iv.Subcomponent("w", 1, 4)]


def test_masks_per_position():
    lower = {"a": jnp.full((1, 3, 2), 0.5)}
    m = iv.masks_for(lower, base="ci", keep=[iv.Subcomponent("a", 1, 2)],
                     ablate=[iv.Subcomponent("a", 0)])["a"]
    np.testing.assert_allclose(m[0], [[0, 0.5], [0, 0.5], [0, 1]])
    with pytest.raises(ValueError, match="Unknown mask base"):
        iv.masks_for(lower, base="half")


ROOT = pathlib.Path(__file__).resolve().parents[2]
TMS = ROOT / "tests" / "fixtures" / "checkpoint_format1"
TMS_X = jnp.array([[0.8, 0.0, 0.0, 0.3, 0.0]])


def test_output_positions_of_a_model_without_a_position_axis():
    flat, seq = jnp.zeros((1, 4)), jnp.zeros((1, 6, 4))
    for default in (None, [], [-1]):
        assert iv.positions_of(flat, default) is None
    assert iv.positions_of(seq, []) == [5] and iv.positions_of(seq, [-1, 2, 2]) == [2, 5]
    with pytest.raises(ValueError, match="no position axis; leave the positions out \\(or "
                                         "-1\\); got \\[0\\]"):
        iv.positions_of(flat, [0])
    with pytest.raises(ValueError, match="outside the prompt of 6"):
        iv.positions_of(seq, [6])


@pytest.fixture(scope="module")
def tms():
    run = spdjax.load(TMS)
    return run.decomposition, run.params, run.target_params, TMS_X


def test_the_prompt_tools_run_with_their_defaults_on_a_toy(tms):
    """TMS outputs are [1, 5]: every default (no positions, position -1) works."""
    for positions in (None, [], [-1]):
        res = iv.intervene(*tms, keep=[iv.Subcomponent("linear1", 0)], positions=positions)
        assert res.positions is None and len(res.masked_top) == 1
    sparse = iv.optimize_sparse_ci(*tms, token=0, steps=2)  # default position -1
    assert sparse.position is None and sparse.threshold == 0.5
    graph = graphs.build(*tms, positions=[-1], top_k=2, validation={"pgd_steps": 0})
    assert graph.positions is None and {n.kind for n in graph.nodes} >= {"input", "output"}


def test_the_intervene_command_on_a_toy_with_the_default_position(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "spdjax.intervene", f"--workdir={TMS}",
                        "--prompt=0.8 0 0 0.3 0", "--keep=linear1:0,linear2:0",
                        f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "output: target" in p.stdout and "2 subcomponent-positions on" in p.stdout
    assert len(list(tmp_path.glob("intervention_*.json"))) == 1
