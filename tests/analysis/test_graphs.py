"""Attribution graphs (spdjax/analysis/graphs.py): edges against float64 finite differences of a
NumPy transformer, pruning, the strongest path, validation where the answer is known, the JSON
round trip, the figure, and the induction path on a hand-built induction model."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.analysis import graph_compute, graph_edges, graph_plots, graph_prune, graphs as G
from spdjax.cli import prompts
from spdjax.core.target import Site, from_function, weight_at
from spdjax.families.lm import llama
from spdjax.families.lm import model as lm_model

# -- a tiny random transformer (the lm family's model) and its NumPy twin ------------------

CFG = lm_model.LMConfig("induction", 5, 6, 4, 1, 2, prefix_window=3)
SITES = [f"blocks_{i}/attn/{p}" for i in range(2) for p in ("q", "k", "v", "out")]
IDS = jnp.array([[0, 3, 6, 2, 1, 6]], jnp.int32)


@pytest.fixture(scope="module")
def tiny_lm():
    target = lm_model.target(CFG)
    tp = lm_model.init_params(jax.random.key(0), CFG)
    d = spdjax.decompose(target, {"blocks_*/attn/*": 3})
    params = d.init(jax.random.key(1), tp)
    ci = {n: jax.random.uniform(jax.random.fold_in(jax.random.key(2), i), (1, 6, 3), minval=0.2,
                                maxval=1.0) for i, n in enumerate(SITES)}
    return d, params, tp, ci


def _np_forward(d, params, tp, ids, masks, leaves=None, emb=None):
    """float64 NumPy forward of the 2-layer attention-only model; each site gives ``b Û`` with
    ``b`` the leaf (or ``m a`` when no leaves: the consistent point); returns ``(acts, b,
    centred logits)``."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    T = ids.shape[1]
    x = f(tp["embed"]["embedding"])[np.asarray(ids[0])] if emb is None else emb
    pos = f(lm_model.sinusoids(T, CFG.d_model))
    acts, bs = {}, {}

    def site(name, inp):
        V, U = (f(a) for a in d.factors(params, name))
        norm = np.linalg.norm(U, axis=1)
        acts[name] = inp @ V * norm
        b = leaves[name] if leaves is not None else masks[name] * acts[name]
        bs[name] = b
        return b @ (U / norm[:, None])

    for i in range(2):
        p = f"blocks_{i}/attn/"
        q, k, v = site(p + "q", x + pos), site(p + "k", x + pos), site(p + "v", x)
        s = q @ k.T / math.sqrt(CFG.d_model)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -1e30)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + site(p + "out", w @ v)
    logits = x @ f(tp["unembed"]["kernel"])
    return acts, bs, logits - logits.mean(-1, keepdims=True)


def test_edges_equal_finite_differences_of_a_numpy_transformer(tiny_lm):
    d, params, tp, ci = tiny_lm
    g = G.compute_graph(d, params, tp, IDS, threshold=0.0, top_k=2, ci=ci, chunk=16)
    masks = {n: np.asarray(ci[n][0], np.float64) for n in SITES}
    acts0, b0, logits0 = _np_forward(d, params, tp, IDS, masks)
    emb0 = np.asarray(tp["embed"]["embedding"], np.float64)[np.asarray(IDS[0])]
    n_in = 6
    comps = [n for n in g.nodes if n.kind == G.COMPONENT]
    assert len(comps) == 8 * 6 * 3  # CI in [0.2, 1) > 0: every subcomponent-position
    for node in comps:  # node activations are b = m a
        np.testing.assert_allclose(node.activation, b0[node.site][node.position, node.index],
                                   rtol=1e-4, atol=1e-6)

    def value(node, acts, logits):
        if node.kind == G.COMPONENT:
            return acts[node.site][node.position, node.index]
        return logits[node.position, node.index]

    h = 1e-5
    expected = np.zeros((len(g.nodes), len(g.nodes)))
    for j, src in enumerate(g.nodes[:n_in + len(comps)]):
        if src.kind == G.INPUT:  # directional derivative along e at this position
            plus, minus = emb0.copy(), emb0.copy()
            plus[src.position] *= 1 + h
            minus[src.position] *= 1 - h
            runs = [_np_forward(d, params, tp, IDS, masks, leaves=b0, emb=e) for e in (plus,
                                                                                     minus)]
        else:
            runs = []
            for sign in (1, -1):
                lv = {n: v.copy() for n, v in b0.items()}
                lv[src.site][src.position, src.index] *= 1 + sign * h
                runs.append(_np_forward(d, params, tp, IDS, masks, leaves=lv))
        for i, tgt in enumerate(g.nodes):
            if tgt.kind == G.INPUT:
                continue
            (ap, _, lp), (am, _, lm) = runs
            expected[i, j] = (value(tgt, ap, lp) - value(tgt, am, lm)) / (2 * h)
    A = g.adjacency()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(A, expected, atol=2e-4 * scale, rtol=0)
    # Direct effects only, through attention across positions: out at i reads v at j <= i,
    # never at j > i; q at i reads nothing at another position.
    idx = {n.name: k for k, n in enumerate(g.nodes)}
    assert A[idx["blocks_0/attn/out:0@4"], idx["blocks_0/attn/v:1@2"]] != 0
    assert A[idx["blocks_0/attn/out:0@2"], idx["blocks_0/attn/v:1@4"]] == 0
    assert A[idx["blocks_1/attn/q:0@4"], idx["blocks_0/attn/out:1@2"]] == 0
    assert A[idx["blocks_1/attn/q:0@4"], idx["blocks_0/attn/v:1@4"]] == 0  # through out only
    assert A[idx["blocks_1/attn/q:0@4"], idx["blocks_0/attn/out:1@4"]] != 0


def test_integrated_gradient_edges_against_numpy_and_completeness(tiny_lm):
    d, params, tp, ci = tiny_lm
    # larger subcomponents (U and V x 1.7: activations and writes x 2.9), so the attention is
    # far from linear along the path and integrated gradients differs from gradient x activation
    params = {**params, "components": jax.tree.map(lambda a: 1.7 * a, params["components"])}
    steps = 32
    assert graph_edges.ig_alphas(2).tolist() == [0.25, 0.75]  # midpoints
    kw = dict(threshold=0.0, top_k=2, ci=ci, chunk=64)
    g = G.compute_graph(d, params, tp, IDS, attribution="integrated", ig_steps=steps, **kw)
    grad = G.compute_graph(d, params, tp, IDS, **kw)
    masks = {n: np.asarray(ci[n][0], np.float64) for n in SITES}
    acts0, b0, logits0 = _np_forward(d, params, tp, IDS, masks)
    emb0 = np.asarray(tp["embed"]["embedding"], np.float64)[np.asarray(IDS[0])]
    # the path's start: every subcomponent at 0, the token embeddings the prompt's
    zero = _np_forward(d, params, tp, IDS, masks, leaves={n: 0 * v for n, v in b0.items()},
                       emb=emb0)

    def value(node, run):
        acts, _, logits = run
        if node.kind == G.COMPONENT:
            return acts[node.site][node.position, node.index]
        return logits[node.position, node.index]

    A, A_grad = g.adjacency(), grad.adjacency()
    n_in = sum(n.kind == G.INPUT for n in g.nodes)
    scale = np.abs(A).max()
    # Completeness: every subcomponent-position is a node (CI > 0), so the edges into a node
    # from the subcomponents sum to its value at the prompt minus its value with all at 0.
    change = np.array([value(t, (acts0, b0, logits0)) - value(t, zero)
                       for t in g.nodes[n_in:]])
    np.testing.assert_allclose(A[n_in:, n_in:].sum(1), change, atol=1e-3 * scale, rtol=2e-3)
    # ... which gradient x activation is not (a check that this model is nonlinear enough)
    assert np.abs(A_grad[n_in:, n_in:].sum(1) - change).max() > 0.02 * scale  # 0.048
    # Input edges stay gradient x activation at the prompt.
    np.testing.assert_allclose(A[:, :n_in], A_grad[:, :n_in], rtol=1e-5, atol=1e-7 * scale)
    # Entries: b_s times the finite-difference derivative averaged over the same midpoints.
    idx = {n.name: k for k, n in enumerate(g.nodes)}
    h = 1e-5
    for t, s_ in [("blocks_1/attn/out:0@5", "blocks_1/attn/k:1@2"),
                  ("blocks_1/attn/q:2@4", "blocks_0/attn/out:1@4"),
                  ("output:" + str(g.nodes[-1].index) + "@5", "blocks_0/attn/v:0@3")]:
        src, tgt = g.nodes[idx[s_]], g.nodes[idx[t]]
        deriv = 0.0
        for alpha in graph_edges.ig_alphas(steps):
            runs = []
            for sign in (1, -1):
                lv = {n: alpha * v for n, v in b0.items()}
                lv[src.site][src.position, src.index] += sign * h
                runs.append(_np_forward(d, params, tp, IDS, masks, leaves=lv, emb=emb0))
            deriv += (value(tgt, runs[0]) - value(tgt, runs[1])) / (2 * h) / steps
        np.testing.assert_allclose(A[idx[t], idx[s_]], deriv * b0[src.site][src.position,
                                                                            src.index],
                                   atol=2e-4 * scale, rtol=1e-3)


def test_integrated_gradients_on_an_rmsnorm_model_is_complete():
    # Llama-style (RMSNorm before every block and the unembedding): the path holds the token
    # embeddings, so the norms see a changing residual stream, and the edges into every node
    # from all subcomponents sum to its change (checked with the leaf forward itself). Scaling
    # the embeddings too would leave the normed model unchanged along the path: its edges
    # would sum to ~0 and grow like log(ig_steps).
    cfg = llama.LlamaConfig(d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, d_mlp=24,
                            seq_len=8, vocab_size=300)
    tp = lm_model.init_params(jax.random.key(0), cfg)
    d = spdjax.decompose(lm_model.target(cfg), {"blocks_*/attn/*": 3, "blocks_*/mlp_*": 3})
    params = d.init(jax.random.key(1), tp)
    ids = jnp.array([[5, 17, 299, 0, 42, 42, 7, 256]], jnp.int32)
    ci = {n: jnp.full((1, 8, 3), 0.7) for n in d.site_names}
    g = G.compute_graph(d, params, tp, ids, threshold=0.0, top_k=2, ci=ci, chunk=128,
                        attribution="integrated", ig_steps=16)
    A = g.adjacency()
    n_in = sum(n.kind == G.INPUT for n in g.nodes)
    embeds = graph_compute._token_embeddings(d, tp, ids)

    @jax.jit
    def change():  # (acts, centred logits) with the prompt's b minus with every b at 0
        _, inputs = d.forward(tp, params, ids, ci, with_inputs=True)
        b = {n: ci[n] * d.site(n).apply(d.factors(params, n)[0], inputs[n])
             * jnp.linalg.norm(d.factors(params, n)[1], axis=1) for n in d.site_names}
        f = graph_edges.leaf_forward(d, params, tp, ids, tuple(embeds))
        (a1, o1), (a0, o0) = (f({"components": c, "input": embeds})
                              for c in (b, jax.tree.map(jnp.zeros_like, b)))
        centred = lambda o: o - o.mean(-1, keepdims=True)  # noqa: E731
        return jax.tree.map(jnp.subtract, a1, a0), centred(o1) - centred(o0)

    acts, logits = change()
    expected = [acts[n.site][0, n.position, n.index] if n.kind == G.COMPONENT
                else logits[0, n.position, n.index] for n in g.nodes[n_in:]]
    np.testing.assert_allclose(A[n_in:, n_in:].sum(1), expected,
                               atol=5e-3 * np.abs(A).max(), rtol=1e-2)


def test_an_interrupted_graph_resumes_its_edges_and_ignores_another_graphs(tiny_lm, tmp_path):
    d, params, tp, ci = tiny_lm
    kw = dict(threshold=0.0, top_k=2, ci=ci, chunk=32)
    full = G.compute_graph(d, params, tp, IDS, **kw)  # 146 target nodes: 5 chunks
    part = tmp_path / "g.partial.npz"
    seen = []

    def stop_after_two(line):
        seen.append(line)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        G.compute_graph(d, params, tp, IDS, partial=part, progress=stop_after_two, **kw)
    assert part.exists()  # the two chunks done, kept on the interrupt
    lines = []
    g = G.compute_graph(d, params, tp, IDS, partial=part, progress=lines.append, **kw)
    assert lines[0] == f"edges: resuming at 64/146 target nodes (from {part})"
    assert lines[1:] == [f"edges: {k}/146 target nodes" for k in (96, 128, 146)]
    np.testing.assert_array_equal(g.adjacency(), full.adjacency())
    assert not part.exists()  # done: the partial file is gone
    # a partial of another graph (another prompt) is said and replaced, not used
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        G.compute_graph(d, params, tp, IDS[:, ::-1], partial=part, progress=stop_after_two, **kw)
    lines.clear()
    g = G.compute_graph(d, params, tp, IDS, partial=part, progress=lines.append, **kw)
    assert "is not this graph's" in lines[0] and lines[1] == "edges: 32/146 target nodes"
    np.testing.assert_array_equal(g.adjacency(), full.adjacency())


def test_masking_ones_and_the_threshold_choose_the_nodes(tiny_lm):
    d, params, tp, ci = tiny_lm
    sparse = {n: jnp.where(v > 0.6, v, 0.0) for n, v in ci.items()}
    g = G.compute_graph(d, params, tp, IDS, threshold=0.6, top_k=3, ci=sparse,
                        masking="ones", positions=[-1, 2])
    comps = [n for n in g.nodes if n.kind == G.COMPONENT]
    assert len(comps) == sum(int(jnp.sum(v > 0.6)) for v in ci.values())
    outs = [n for n in g.nodes if n.kind == G.OUTPUT]
    assert sorted({n.position for n in outs}) == [2, 5] and len(outs) == 6
    assert g.positions == [2, 5]


# -- pruning and the strongest path on a constructed graph ---------------------------------


def _graph(nodes, edges):
    s, t, w = (np.array(x) for x in zip(*edges))
    return G.Graph(nodes=nodes, sources=s.astype(int), targets=t.astype(int),
                   weights=w.astype(float), positions=[1])


def _chain_nodes():
    inp = [G.Node(G.INPUT, p, p) for p in range(2)]
    comp = [G.Node(G.COMPONENT, 1, c, site="s") for c in range(4)]
    out = [G.Node(G.OUTPUT, 1, 0, ci=0.9), G.Node(G.OUTPUT, 1, 1, ci=0.1)]
    return inp + comp + out  # indices: in 0-1, comp 2-5, out 6-7


def test_prune_keeps_the_influential_nodes_and_drops_the_weak():
    # 0 -> 2 -> 6 carries almost everything; 1 -> 3 -> 6 a little; 4 feeds out 7 weakly;
    # 5 feeds nothing.
    g = _graph(_chain_nodes(), [(0, 2, 5.0), (2, 6, 10.0), (1, 3, 1.0), (3, 6, 0.1),
                                (4, 7, 1.0), (0, 4, 1.0), (1, 5, 2.0)])
    inf = G.influence(g)
    np.testing.assert_allclose(inf[2], 0.9 * 10 / 10.1, rtol=1e-9)
    np.testing.assert_allclose(inf[4], 0.1, rtol=1e-9)
    assert inf[5] == 0
    pruned = G.prune(g, node_threshold=0.8, edge_threshold=0.98)
    kept = {g.nodes.index(n) for n in pruned.nodes}
    assert 2 in kept and 5 not in kept
    assert 3 not in kept  # 0.9 * 0.1/10.1 of the influence
    assert sum(n.kind == G.INPUT for n in pruned.nodes) == 2  # inputs and outputs stay
    assert sum(n.kind == G.OUTPUT for n in pruned.nodes) == 2
    everything = G.prune(g, node_threshold=1.0, edge_threshold=1.0)
    assert {g.nodes.index(n) for n in everything.nodes if n.kind == G.COMPONENT} == {2, 3, 4}
    with pytest.raises(ValueError, match="node_threshold"):
        G.prune(g, node_threshold=0.0)


def test_strongest_path_follows_the_largest_edge_back_from_the_output():
    # out 6 <- 2 (6) <- 0 beats out 6 <- 3 (4) <- 4 <- 1
    g = _graph(_chain_nodes(), [(0, 2, 1.0), (2, 6, 6.0), (3, 6, 4.0), (4, 3, 2.0),
                                (1, 4, 3.0)])
    assert G.strongest_path(g) == [0, 2, 6]
    g = _graph(_chain_nodes(), [(0, 2, 1.0), (5, 2, 3.0), (2, 6, 3.0), (3, 6, 7.0),
                                (4, 3, 2.0), (1, 4, 3.0)])
    assert G.strongest_path(g) == [1, 4, 3, 6]


def test_node_counts_by_site_and_position():
    nodes = [G.Node(G.INPUT, 0, 1), G.Node(G.COMPONENT, 3, 0, site="b"),
             G.Node(G.COMPONENT, 1, 2, site="b"), G.Node(G.COMPONENT, 3, 1, site="b"),
             G.Node(G.COMPONENT, 2, 0, site="a"), G.Node(G.OUTPUT, 3, 7)]
    g = G.Graph(nodes, np.zeros(0, int), np.zeros(0, int), np.zeros(0), positions=[3])
    assert g.node_counts(["a", "b"]) == {"a@2": 1, "b@1": 1, "b@3": 2}
    assert list(g.node_counts()) == ["b@1", "b@3", "a@2"]  # first seen
    g.positions = None
    assert g.node_counts() == {"b": 3, "a": 1}


def test_json_round_trip(tiny_lm, tmp_path):
    g = _graph(_chain_nodes(), [(0, 2, 1.0), (2, 6, -6.0)])
    g.validation = {"kl_graph_only": 0.5}
    g.save(tmp_path / "g.json")
    back = G.Graph.from_json(json.loads((tmp_path / "g.json").read_text()))
    assert back.nodes == g.nodes and back.validation == g.validation
    np.testing.assert_array_equal(back.weights, g.weights)


# -- validation where the answer is known --------------------------------------------------


def test_validation_of_a_graph_of_every_node_and_of_none(tiny_lm):
    d, params, tp, _ = tiny_lm
    ones = {n: jnp.ones((1, 6, 3)) for n in SITES}
    full = G.compute_graph(d, params, tp, IDS, threshold=0.5, top_k=2, ci=ones)
    v = G.validate(d, params, tp, IDS, full, pgd_steps=4, pgd_restarts=1, rounds=2)
    # every subcomponent in the graph: graph-only is the unmasked model, nothing to attack
    assert v["kl_graph_only"] == pytest.approx(v["kl_unmasked"], abs=1e-6)
    assert v["kl_pgd_worst"] == pytest.approx(v["kl_unmasked"], abs=1e-6)
    empty = G.prune(full, node_threshold=1e-9)
    empty = graph_prune._subgraph(empty, np.array([n.kind != G.COMPONENT for n in empty.nodes]))
    lines = []
    v0 = G.validate(d, params, tp, IDS, empty, pgd_steps=6, pgd_restarts=2, rounds=3,
                    progress=lines.append)
    assert v0["kl_graph_only"] > v["kl_graph_only"]
    assert v0["kl_pgd_worst"] >= v0["kl_graph_only"] - 1e-6  # restart 0 starts at graph-only
    assert len(lines) == 6 and lines[-1].startswith("PGD restart 2/2: step 6/6")
    # delta: every forward adds the delta component at 1, PGD's too. With every subcomponent
    # in the graph that forward is the target itself, so even the worst case has KL 0 (PGD
    # without the delta would measure the decomposition without it: kl_unmasked > 0).
    vd = G.validate(d, params, tp, IDS, full, pgd_steps=1, pgd_restarts=1, rounds=1, delta=True)
    assert v["kl_unmasked"] > 1e-3
    for k in ("kl_graph_only", "kl_unmasked", "kl_pgd_worst"):
        assert vd[k] == pytest.approx(0.0, abs=1e-5), (k, vd)


def test_figure_is_drawn(tmp_path):
    g = _graph(_chain_nodes(), [(0, 2, 1.0), (2, 6, -6.0), (1, 3, 0.5), (3, 7, 1.0)])
    path = graph_plots.plot_graph(g, tmp_path / "g.png", site_order=["s"], tokens=["a", "b"])
    assert path.exists() and path.stat().st_size > 1000


# -- the induction path on a hand-built induction model ------------------------------------

VOCAB, T_MAX = 4, 8  # tokens 0..3, induction token S = 3 (any token works)
D_RES = VOCAB + T_MAX + VOCAB + VOCAB  # [token | position | previous token | answer]


def _induction_target(beta0=4.0, beta1=3.0):
    """Two one-head attention layers as in the induction toy, weights set by hand: layer 0
    attends from each position to the one before and writes that token into the
    previous-token slot; layer 1 attends from the last token to where the previous token
    equals it and copies that position's token into the answer slot, which the unembedding
    reads."""
    tok, pos, prev, ans = (slice(0, 4), slice(4, 12), slice(12, 16), slice(16, 20))
    E = np.zeros((VOCAB, D_RES))
    E[:, tok] = np.eye(VOCAB)
    P = np.zeros((T_MAX, D_RES))
    P[:, pos] = np.eye(T_MAX)
    # The defaults: scores large enough to attend mostly to the right position, small enough
    # that the softmax is not saturated (a saturated pattern has no gradient to attribute
    # through; integrated gradients, below, sees through it).
    W = {n: np.zeros((D_RES, D_RES)) for n in SITES}
    W["blocks_0/attn/q"][pos, pos] = beta0 * np.eye(T_MAX, k=-1)  # query at i looks for i - 1
    W["blocks_0/attn/k"][pos, pos] = np.eye(T_MAX)
    W["blocks_0/attn/v"][tok, tok] = np.eye(VOCAB)
    W["blocks_0/attn/out"][tok, prev] = np.eye(VOCAB)
    W["blocks_1/attn/q"][tok, tok] = beta1 * np.eye(VOCAB)  # the current token ...
    W["blocks_1/attn/k"][prev, tok] = np.eye(VOCAB)  # ... where it was the previous one
    W["blocks_1/attn/v"][tok, tok] = np.eye(VOCAB)
    W["blocks_1/attn/out"][tok, ans] = np.eye(VOCAB)
    U_ans = np.zeros((D_RES, VOCAB))
    U_ans[ans] = 10 * np.eye(VOCAB)
    params = {"E": jnp.asarray(E, jnp.float32), "P": jnp.asarray(P, jnp.float32),
              "unembed": jnp.asarray(U_ans, jnp.float32),
              **{n: jnp.asarray(w, jnp.float32) for n, w in W.items()}}

    def fn(p, ids, hooks):
        T = ids.shape[-1]
        x = hooks("embed", ids, lambda i: jnp.take(p["E"], i, axis=0)) + p["P"][:T]
        for i in range(2):
            site = lambda n, a: hooks(f"blocks_{i}/attn/{n}", a,  # noqa: E731
                                      lambda h: h @ p[f"blocks_{i}/attn/{n}"])
            q, k, v = site("q", x), site("k", x), site("v", x)
            s = jnp.einsum("...qd,...kd->...qk", q, k)
            s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e30)
            x = x + site("out", jax.nn.softmax(s, -1) @ v)
        return x @ p["unembed"]

    sites = [Site("embed", "embed", VOCAB, D_RES, weight_at(("E",)))] + [
        Site(n, "linear", D_RES, D_RES, weight_at((n,))) for n in SITES]
    return from_function(fn, sites), params


# [BOS=0, 1, S=3, M=2, 1, S=3]: the answer is M = 2; S at position 2, M at 3, last = 5
INDUCTION_IDS = jnp.array([[0, 1, 3, 2, 1, 3]], jnp.int32)


def _exact_decomposition(target, tp):
    """The decomposition whose subcomponents are the exact rank-one pieces of each weight (its
    SVD; C = 8 >= every rank), and CI 1 for every subcomponent at every position."""
    d = spdjax.decompose(target, {"blocks_*/attn/*": 8})
    params = d.init(jax.random.key(0), tp)
    comps = {}
    for n in SITES:
        u, s, vt = np.linalg.svd(np.asarray(tp[n], np.float64))
        comps[n] = {"V": jnp.asarray(u[:, :8] * s[:8], jnp.float32),
                    "U": jnp.asarray(vt[:8], jnp.float32)}
    return d, {**params, "components": comps}, {n: jnp.ones((1, 6, 8)) for n in SITES}


def test_the_induction_graph_runs_previous_token_head_then_induction_head():
    target, tp = _induction_target()
    d, params, ci = _exact_decomposition(target, tp)
    ids = INDUCTION_IDS
    assert int(jnp.argmax(target(tp, ids)[0, -1])) == 2
    full = G.compute_graph(d, params, tp, ids, threshold=0.5, top_k=1, ci=ci, masking="ones")
    # 0.8 of the influence keeps layer 1 and the previous-token head's output; its own sources,
    # one step further from the output, come in at 0.95
    g = G.prune(full, node_threshold=0.95)
    names = [g.nodes[i] for i in G.strongest_path(g)]
    assert names[-1].kind == G.OUTPUT and names[-1].index == 2
    assert (names[-2].site, names[-2].position) == ("blocks_1/attn/out", 5)
    # the induction head's query is the last position, its key the M position, whose source
    # is the previous-token head at M, which read the S position's value
    A = g.adjacency()

    def sources_of(site, position):
        rows = [i for i, n in enumerate(g.nodes) if (n.site, n.position) == (site, position)]
        return {(g.nodes[j].site or g.nodes[j].kind, g.nodes[j].position)
                for i in rows for j in np.flatnonzero(A[i])}

    assert ("blocks_1/attn/k", 3) in sources_of("blocks_1/attn/out", 5)
    assert ("blocks_1/attn/q", 5) in sources_of("blocks_1/attn/out", 5)
    assert ("blocks_0/attn/out", 3) in sources_of("blocks_1/attn/k", 3)
    assert ("blocks_0/attn/v", 2) in sources_of("blocks_0/attn/out", 3)
    # the graph alone still predicts M (14 of the 240 subcomponent-positions)
    v = G.validate(d, params, tp, ids, g, pgd_steps=0)
    assert v["graph_only_probs"][0]["graph_only"] > 0.5, v
    assert v["n_nodes"] < 20


def _edge_share(g, target, source):
    """The largest |edge| from ``source`` (site, position) into ``target``'s nodes, as a share
    of the largest |edge| into them."""
    A = np.abs(g.adjacency())
    rows = [i for i, n in enumerate(g.nodes) if (n.site, n.position) == target]
    cols = [j for j, n in enumerate(g.nodes) if (n.site, n.position) == source]
    return A[np.ix_(rows, cols)].max() / A[rows].max()


def test_integrated_gradients_sees_the_qk_of_a_saturated_induction_head():
    # The same circuit with attention scores ~10x larger: both softmaxes saturate, so the
    # gradient through the patterns vanishes and gradient x activation gives the induction
    # head's key (at M) almost no edge into its output; integrated gradients, from every leaf
    # at 0 (uniform attention) to the prompt, gives it its share.
    target, tp = _induction_target(beta0=40.0, beta1=30.0)
    d, params, ci = _exact_decomposition(target, tp)
    kw = dict(threshold=0.5, top_k=1, ci=ci, masking="ones")
    grad = G.compute_graph(d, params, tp, INDUCTION_IDS, **kw)
    ig = G.compute_graph(d, params, tp, INDUCTION_IDS, attribution="integrated", **kw)
    assert ig.settings["attribution"] == "integrated" and ig.settings["ig_steps"] == 16
    out5, k3, q5 = ("blocks_1/attn/out", 5), ("blocks_1/attn/k", 3), ("blocks_1/attn/q", 5)
    assert _edge_share(grad, out5, k3) < 1e-3 and _edge_share(grad, out5, q5) < 1e-3
    assert _edge_share(ig, out5, k3) > 0.08 and _edge_share(ig, out5, q5) > 0.08  # 0.13
    g = G.prune(ig, node_threshold=0.95)
    assert k3 in {(g.nodes[i].site, g.nodes[i].position) for i in range(len(g.nodes))}
    with pytest.raises(ValueError, match="Unknown attribution 'ablation'; expected one of"):
        G.compute_graph(d, params, tp, INDUCTION_IDS, attribution="ablation", **kw)
    with pytest.raises(ValueError, match="ig_steps must be a positive integer, got 0"):
        G.compute_graph(d, params, tp, INDUCTION_IDS, attribution="integrated", ig_steps=0,
                        **kw)


# -- the commands on a tiny induction-toy run (tests/fixtures/lm_ih_tiny: lm:ih with
# seq_len 12, C 4, target_steps 10, one SPD step) ------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "lm_ih_tiny"


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_the_graph_its_figure_and_validation(tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(FIXTURE, wd)
    p = _cli("-m", "spdjax.attribution_graph", f"--workdir={wd}", "--prompt=BOS 3 S 5 2 S",
             "--pgd_steps=2", "--pgd_restarts=1", "--name=t", "--attribution=integrated",
             "--ig_steps=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "PGD restart 1/1: step 2/2" in p.stderr
    rec = json.loads((wd / "analysis" / "graphs" / "t.json").read_text())
    assert rec["tokens"] == ["BOS", "3", "S", "5", "2", "S"] and rec["ids"][2] == 129
    assert rec["sites"][:4] == [f"blocks_0/attn/{p}" for p in ("q", "k", "v", "out")]  # drawn
    assert {"kl_graph_only", "kl_pgd_worst", "kl_ci_masked"} <= set(rec["validation"])
    assert rec["strongest_path"][-1].startswith("output:")
    assert rec["settings"]["attribution"] == "integrated" and rec["settings"]["ig_steps"] == 4
    g = G.Graph.from_json(rec)
    line = "nodes by site and position: " + ", ".join(
        f"{k} ({v})" for k, v in g.node_counts(rec["sites"]).items())
    assert line in p.stdout
    assert (wd / "analysis" / "graphs" / "t.png").stat().st_size > 1000


def test_prompts_are_encoded_and_bad_ones_refused():
    run = spdjax.load(FIXTURE)
    batch, codec = prompts.prompt_batch(run, "BOS 1 S 4")
    assert batch.tolist() == [[0, 1, 129, 4]] and codec.decode(129) == "S"
    for bad, match in (("", "prompt is empty"), ("  ", "prompt is empty"),
                       ("BOS 1 2 3 4 5 1 2 3 4 5 1 2", "13 tokens long; the model's context "
                        "is 12"), ("BOS 130", "outside \\[0, 130\\)"), ("BOS x", "'x' is not")):
        with pytest.raises(ValueError, match=match):
            prompts.prompt_batch(run, bad)
