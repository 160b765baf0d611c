"""The graph explorer's API (spdjax/view/graph_api.py) on the committed tiny induction-toy run:
the graph is analysis.graphs' for the same prompt, interventions are interventions.intervene's,
requests after the first reuse what was computed, and each bad input is a BadRequest naming
it."""

import pathlib
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.analysis import graph_edges, graphs, interventions as iv
from spdjax.cli import prompts
from spdjax.view import graph_api as ga
from spdjax.view.errors import BadRequest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "lm_ih_tiny"  # lm:ih, seq_len 12, C 4
TMS_RUN = ROOT / "tests" / "fixtures" / "checkpoint_format1"  # tms:5-2, 20 steps
PROMPT = "BOS 1 2 3 S 1 2 3 S"
IDS = jnp.array([[0, 1, 2, 3, 129, 1, 2, 3, 129]], jnp.int32)


@pytest.fixture(scope="module")
def run(lm_run):
    """The tiny LM run (a harvested copy of FIXTURE), loaded once per session (conftest)."""
    return lm_run


@pytest.fixture(scope="module")
def full(run):
    """The unpruned graph the analysis library computes for PROMPT (top 3 outputs)."""
    return graphs.compute_graph(run.decomposition, run.params, run.target_params, IDS, top_k=3,
                                decode=prompts.codec(run).decode)


@pytest.fixture(scope="module")
def unpruned(run):
    return ga.graph_json(run, {"prompt": PROMPT, "prune": False})


def _args(run):
    return run.decomposition, run.params, run.target_params, IDS


def test_unpruned_graph_is_the_analysis_graph(run, full, unpruned):
    g = unpruned
    assert g["tokens"] == ["BOS", "1", "2", "3", "S", "1", "2", "3", "S"]
    assert g["ids"] == IDS[0].tolist() and g["positions"] == [8]
    _, called = run.target.forward(run.target_params, IDS, {})  # inputs in call order
    assert g["sites"] == [n for n in called if n in run.decomposition.site_names]
    assert sorted(g["sites"]) == sorted(run.decomposition.site_names)
    assert [n["id"] for n in g["nodes"]] == [n.name for n in full.nodes]
    comps = [n for n in g["nodes"] if n["kind"] == "component"]
    assert len(comps) == g["unpruned"]["n_nodes"] > 10
    for mine, ref in zip(g["nodes"], full.nodes):
        assert mine["kind"] == ref.kind and mine["position"] == ref.position
        assert mine["activation"] == pytest.approx(ref.activation, rel=1e-4, abs=1e-6)
        if ref.kind == graphs.COMPONENT:
            assert (mine["site"], mine["component"]) == (ref.site, ref.index)
            assert mine["ci"] == pytest.approx(ref.ci, rel=1e-5)
            assert mine["id"] == f"{ref.site}:{ref.index}@{ref.position}"
            assert mine["token"] == g["tokens"][ref.position]
        elif ref.kind == graphs.OUTPUT:
            assert mine["prob"] == pytest.approx(ref.ci, rel=1e-5)
    names = [n.name for n in full.nodes]
    ref_edges = {(names[s], names[t]): w for s, t, w in zip(full.sources, full.targets,
                                                            full.weights)}
    mine = {(e["source"], e["target"]): e["weight"] for e in g["edges"]}
    assert mine.keys() == ref_edges.keys() and len(mine) == g["unpruned"]["n_edges"]
    scale = max(abs(w) for w in ref_edges.values())
    np.testing.assert_allclose([mine[k] for k in ref_edges], list(ref_edges.values()),
                               rtol=0, atol=1e-4 * scale)
    influence = graphs.influence(full)
    np.testing.assert_allclose([n["influence"] for n in g["nodes"]], influence, rtol=1e-3,
                               atol=1e-6)


def test_pruned_graph_and_the_model_predictions(run, full):
    g = ga.graph_json(run, {"prompt": PROMPT, "node_threshold": 1.0, "edge_threshold": 1.0})
    ref = graphs.prune(full, node_threshold=1.0, edge_threshold=1.0)
    assert [n["id"] for n in g["nodes"]] == [n.name for n in ref.nodes]
    assert len(g["edges"]) == len(ref.weights)
    assert any(n["kind"] == "component" for n in g["nodes"])
    decode = prompts.codec(run).decode
    model = iv.intervene(*_args(run), base="ones", k=3, decode=decode)
    assert g["predictions"]["target"] == model.target_top
    assert [t["token"] for t in g["predictions"]["components"][0]] == [
        t["token"] for t in model.masked_top[0]]
    assert g["kl_components"] == pytest.approx(model.kl, rel=1e-4, abs=1e-7)
    only = iv.intervene(*_args(run), keep=ref.components(), base="zeros")
    assert g["kl_graph_only"] == pytest.approx(only.kl, rel=1e-4, abs=1e-7)
    assert g["settings"]["node_threshold"] == 1.0 and g["settings"]["prune"] is True


def test_keep_every_node_equals_intervene(run, unpruned):
    comps = [n["id"] for n in unpruned["nodes"] if n["kind"] == "component"]
    res = ga.intervene_json(run, {"prompt": PROMPT, "keep": comps, "ablate": []})
    ref = iv.intervene(*_args(run), keep=iv.parse_subcomponents(",".join(comps)),
                       decode=prompts.codec(run).decode)
    assert res["kl"] == pytest.approx(ref.kl, rel=1e-4, abs=1e-7) and res["kl"] > 0
    assert res["base"] == "zeros" and res["n_kept"] == ref.n_kept == len(comps)
    assert res["target"] == ref.target_top
    assert [t["token"] for t in res["intervened"][0]] == [t["token"] for t in ref.masked_top[0]]
    np.testing.assert_allclose([t["prob"] for t in res["intervened"][0]],
                               [t["prob"] for t in ref.masked_top[0]], rtol=1e-4)
    # Nothing named, base ones: the unmasked decomposition, the graph's "components" column.
    none = ga.intervene_json(run, {"prompt": PROMPT, "top_k": 3})
    assert none["kl"] == pytest.approx(unpruned["kl_components"], rel=1e-4, abs=1e-7)


def test_ablating_the_most_influential_node_changes_the_predictions(run, unpruned):
    comps = [n for n in unpruned["nodes"] if n["kind"] == "component"]
    top = max(comps, key=lambda n: n["influence"])["id"]
    before = ga.intervene_json(run, {"prompt": PROMPT})
    after = ga.intervene_json(run, {"prompt": PROMPT, "ablate": [top]})
    assert after["ablate"] == [top] and after["base"] == "ones"
    # The fixture's model is barely trained (its output is near uniform): the change is small,
    # yet ~100x float32 rounding.
    p0 = {t["token"]: t["prob"] for t in before["intervened"][0]}
    p1 = {t["token"]: t["prob"] for t in after["intervened"][0]}
    assert p0.keys() != p1.keys() or max(abs(p0[t] - p1[t]) for t in p0) > 1e-5
    assert abs(after["kl"] - before["kl"]) > 1e-6
    ref = iv.intervene(*_args(run), ablate=iv.parse_subcomponents(top))
    assert after["kl"] == pytest.approx(ref.kl, rel=1e-4, abs=1e-7)


def test_requests_reuse_the_graph_and_the_compiled_forwards(run, unpruned):
    again = ga.graph_json(run, {"prompt": PROMPT, "prune": False})
    assert again["nodes"] is unpruned["nodes"]  # kept, not recomputed
    session = ga._session(run)
    assert ga._session(run) is session
    node = next(n["id"] for n in unpruned["nodes"] if n["kind"] == "component")
    ga.intervene_json(run, {"prompt": PROMPT, "ablate": [node]})
    n_compiled = session.decomposition.forward._cache_size()
    for body in ({"ablate": [node]}, {"keep": [node]}, {"keep": [node], "base": "ci"}):
        ga.intervene_json(run, {"prompt": "BOS 4 5 6 S 4 5 6 S", **body})
    assert session.decomposition.forward._cache_size() == n_compiled  # same length: no retrace
    # A new graph of a prompt of the same length: its edge pass is not compiled again.
    n_edges = graph_edges._edge_rows._cache_size()
    other = ga.graph_json(run, {"prompt": "BOS 4 5 6 S 4 5 6 S", "prune": False})
    assert other["tokens"][1] == "4" and other["nodes"] is not unpruned["nodes"]
    assert graph_edges._edge_rows._cache_size() == n_edges


def test_tokens_without_a_prompt_codec_decoder_use_the_family_decoder(run, monkeypatch):
    # A text (Llama) LM: prompts are ids (no codec decoder); tokens shown by its tokenizer.
    monkeypatch.setattr(ga, "_SESSIONS", weakref.WeakKeyDictionary())  # a fresh session
    monkeypatch.setitem(prompts.BUILT_IN, "induction",
                        lambda cfg: prompts.Codec(prompts._numbers, None))
    seen = []

    def token_text(cfg):
        seen.append(cfg)
        return lambda t: f"<{t}>"

    monkeypatch.setattr(ga.data, "model_token_text", token_text)
    _, tokens = ga._session(run).batch(run, "0 5 1")
    assert tokens == ["<0>", "<5>", "<1>"] and seen == [run.experiment.model_config]
    monkeypatch.setattr(ga, "_SESSIONS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(ga.data, "model_token_text", lambda cfg: None)  # no family decoder
    assert ga._session(run).batch(run, "0 5 1")[1] == ["0", "5", "1"]


@pytest.mark.parametrize("body, match", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "BOS x S"}, "token 'x' is not an id"),
    ({"prompt": "BOS 130"}, r"ids \[130\] are outside \[0, 130\)"),
    ({"prompt": "BOS " + "1 " * 12}, "13 tokens long; the model's context is 12"),
    ({"prompt": 7}, "'prompt' must be a string, got 7"),
    ({}, "has no 'prompt'"),
    ({"prompt": PROMPT, "treshold": 0.1}, r"Unknown request fields \['treshold'\]; expected "
                                          "prompt: .*threshold"),
    ({"prompt": PROMPT, "threshold": 1.5}, r"'threshold' must be a number in \[0.0, 1.0\), "
                                           "got 1.5"),
    ({"prompt": PROMPT, "top_k": 0}, r"'top_k' must be an integer in \[1, 50\], got 0"),
    ({"prompt": PROMPT, "positions": ["x"]}, r"'positions' must be a list of integers"),
    ({"prompt": PROMPT, "positions": [9]}, "Output position 9 is outside the prompt of 9"),
    ({"prompt": PROMPT, "masking": "mean"}, r"'masking' must be one of \['ci', 'ones'\], "
                                            "got 'mean'"),
    ({"prompt": PROMPT, "attribution": "ablation"}, r"'attribution' must be one of "
                                                    r"\['gradient', 'integrated'\], got "),
    ({"prompt": PROMPT, "prune": "no"}, "'prune' must be true or false, got 'no'"),
    ({"prompt": PROMPT, "node_threshold": 0}, r"'node_threshold' must be a number in "
                                              r"\(0.0, 1.0\]"),
])
def test_bad_graph_requests_name_the_value(run, body, match):
    with pytest.raises(BadRequest, match=match):
        ga.graph_json(run, body)


@pytest.mark.parametrize("body, match", [
    ({"ablate": ["blocks_9/attn/q:0@1"]}, "Unknown site 'blocks_9/attn/q'; the decomposed "
                                          "sites are"),
    ({"keep": ["blocks_0/attn/q:7@1"]}, r"index 7 of site 'blocks_0/attn/q' is outside "
                                        r"\[0, 4\)"),
    ({"ablate": ["blocks_0/attn/q:1@20"]}, "Position 20 of blocks_0/attn/q:1 is outside the "
                                           "prompt of 9 positions"),
    ({"ablate": ["input:BOS@0"]}, "'input:BOS@0' is an input node: only subcomponent nodes"),
    ({"keep": ["output:7@8"]}, "'output:7@8' is an output node"),
    ({"ablate": ["blocks_0/attn/q"]}, "is not 'site:index' or 'site:index@position'"),
    ({"ablate": ["blocks_0/attn/q:1@2,blocks_0/attn/q:2@2"]}, "must name one subcomponent"),
    ({"ablate": "blocks_0/attn/q:1@2"}, "'ablate' must be a list of node ids"),
    ({"keep": ["blocks_0/attn/q:1@2"], "ablate": ["blocks_0/attn/q:1@-7"]},
     r"Nodes \['blocks_0/attn/q:1@2'\] are both kept and ablated"),
    ({"base": "half"}, r"'base' must be one of \['ones', 'ci', 'zeros'\]"),
    ({"prompt": "BOS 1 S 2 S", "keep": ["blocks_0/attn/q:1@2"], "mode": 1},
     r"Unknown request fields \['mode'\]"),
])
def test_bad_interventions_name_the_value(run, body, match):
    with pytest.raises(BadRequest, match=match):
        ga.intervene_json(run, {"prompt": PROMPT, **body})


def test_ids_outside_the_vocabulary_are_refused_whatever_the_encoding(run, monkeypatch):
    # An encoding that passes any integer (a family's own prompt_codec could): the explorer
    # still refuses ids beyond the token embedding, which a compiled forward would clamp.
    monkeypatch.setitem(prompts.BUILT_IN, "induction",
                        lambda cfg: prompts.Codec(prompts._numbers, None))
    with pytest.raises(BadRequest, match=r"token ids \[130, 500\] are outside the model's "
                                         r"vocabulary \[0, 130\)"):
        ga.intervene_json(run, {"prompt": "0 500 1 130"})
    assert ga.intervene_json(run, {"prompt": "0 5 1 129"})["kl"] >= 0


def test_a_run_that_is_not_a_language_model_is_refused():
    tms = spdjax.load(TMS_RUN)
    for fn in (ga.graph_json, ga.intervene_json):
        with pytest.raises(BadRequest, match="reads language-model runs .* of the 'tms' family"):
            fn(tms, {"prompt": "1 0 0 0 0"})
