"""Per-prompt attribution graphs between subcomponents (VPD: Bushnaq et al. 2026, "Interpreting
Language Model Parameters", attribution graphs; the later reference's app, goodfire-ai/spd).

For one prompt (a batch of one example, ``[1, T]`` ids or ``[1, d]`` floats), the nodes are

* **component** nodes ``(position, site, c)`` whose CI (lower) exceeds ``threshold``;
* **input** nodes: per position, the token (the output of the target's undecomposed token
  embedding, summed over its width); for a float input, each nonzero input feature;
* **output** nodes: the ``top_k`` most probable outputs at each chosen position.

Activations. Subcomponent ``c`` of a site with input ``x`` has the activation
``a_c = ||U_c|| (x · V_c)`` (VPD's, invariant to rescaling ``V_c`` and ``U_c`` against each
other); in the forward the graph is read in, masked by ``m`` (the CI, or ones), the site computes
``sum_c b_c Û_c (+ bias)`` with the mask-scaled activation ``b_c = m_c a_c`` and
``Û_c = U_c / ||U_c||``. An output node's activation is its logit minus the mean logit at its
position.

Edges. The weight of source ``s`` -> target ``t`` is gradient x activation,
``w(s -> t) = (∂a_t / ∂b_s) b_s``, taken with every ``b`` a leaf (the forward reads the leaves,
not the activations it computes), so only **direct** effects count: paths that pass through
another subcomponent are that subcomponent's edges (VPD: "gradients stopped through all other
subcomponents"). Paths through attention are direct: a key or value subcomponent at position
``j`` feeds the out projection's subcomponents at every ``i >= j``. With ``m`` = CI this is VPD's
``(∂a_c/∂a_c') a_c' g_c'``. Input edges are ``sum (∂a_t/∂e) e`` over the embedding ``e``.

Cost. One forward and ``R`` backward passes (one VJP per target node, ``jax.vmap`` over
``chunk`` one-hot cotangents at a time), ``R`` = component nodes + output nodes: time
``O(R x forward)``, memory ``O(chunk x (T sum_s C_s + T V))`` on top of one forward
(benchmarks/README.md, "Attribution graphs").

Pruning (:func:`prune`) follows circuit-tracing practice (Ameisen et al. 2025, "Circuit
Tracing", graph pruning): rows of ``|A|`` normalised to sum 1, influence on the outputs
``w_out^T ((I - A)^-1 - I)`` (``w_out``: output probabilities), the component nodes with the
largest influence kept up to ``node_threshold`` of the total, then the edges with the largest
``|A_ts| (influence_t + w_t)`` up to ``edge_threshold``.

Validation (:func:`validate`): KL(target || graph only) at the output positions, with the
graph's subcomponents at 1 and every other at 0; and the worst KL that PGD on the masks of every
subcomponent *outside* the graph (in [0, 1], graph nodes held at 1) finds
(:func:`spdjax.losses.adversarial.pgd_sources`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import interventions as iv
from spdjax.core.decomposition import CausalImportance
from spdjax.core.target import Mapped
from spdjax.losses.adversarial import masks_from_sources, pgd_sources
from spdjax.losses.context import Context

Array = jax.Array
# Pruning defaults: 0.9 of the influence (at 0.8 the hand-built induction model's graph loses
# the previous-token head's sources; tests/analysis/test_graphs.py), 0.98 of the edge score.
NODE_THRESHOLD, EDGE_THRESHOLD = 0.9, 0.98
INPUT, COMPONENT, OUTPUT = "input", "component", "output"
MASKINGS = ("ci", "ones")
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Node:
    """A graph node. ``index``: the subcomponent (component), the token or input feature
    (input), the output token (output); ``activation``: ``b`` (component), the input value
    (a float input; a token's embedding norm), the mean-centred logit (output); ``ci``: the CI
    (component) or the target's probability (output)."""

    kind: str
    position: int
    index: int
    site: str = ""
    activation: float = 0.0
    ci: float = 0.0
    label: str = ""

    @property
    def name(self) -> str:
        if self.kind == COMPONENT:
            return f"{self.site}:{self.index}@{self.position}"
        return f"{self.kind}:{self.label or self.index}@{self.position}"


@dataclasses.dataclass
class Graph:
    """Nodes and edges ``sources[e] -> targets[e]`` with ``weights[e]`` (node indices), the
    output positions, each node's influence on the outputs, and validation numbers."""

    nodes: list[Node]
    sources: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: list[int] | None
    influence: np.ndarray | None = None
    validation: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)

    def adjacency(self) -> np.ndarray:
        """``(N, N)`` ``A[target, source]`` edge weights."""
        A = np.zeros((len(self.nodes), len(self.nodes)))
        A[self.targets, self.sources] = self.weights
        return A

    def components(self) -> list[iv.Subcomponent]:
        """The graph's subcomponents, per position."""
        return [iv.Subcomponent(n.site, n.index, n.position if self.positions is not None
                                else None) for n in self.nodes if n.kind == COMPONENT]

    def to_json(self) -> dict:
        return {"nodes": [{"name": n.name, **dataclasses.asdict(n)} for n in self.nodes],
                "edges": [{"source": int(s), "target": int(t), "weight": float(w)}
                          for s, t, w in zip(self.sources, self.targets, self.weights)],
                "positions": self.positions,
                "influence": None if self.influence is None else self.influence.tolist(),
                "validation": self.validation, "settings": self.settings}

    @classmethod
    def from_json(cls, d: Mapping) -> Graph:
        nodes = [Node(**{k: v for k, v in n.items() if k != "name"}) for n in d["nodes"]]
        e = d["edges"]
        return cls(nodes=nodes, sources=np.array([x["source"] for x in e], int),
                   targets=np.array([x["target"] for x in e], int),
                   weights=np.array([x["weight"] for x in e], float), positions=d["positions"],
                   influence=None if d["influence"] is None else np.asarray(d["influence"]),
                   validation=dict(d["validation"]), settings=dict(d["settings"]))

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


# -- the leaf forward ----------------------------------------------------------------------


def _unit_rows(U: Array) -> tuple[Array, Array]:
    """``(||U_c||, U_c / ||U_c||)`` (a zero row stays zero)."""
    norm = jnp.linalg.norm(U, axis=1)
    return norm, U / jnp.where(norm > 0, norm, 1.0)[:, None]


def _token_embeddings(decomposition, target_params, batch) -> dict[str, Array]:
    """``{site: its output}`` of the target's undecomposed embedding sites that read the batch's
    token ids: the input leaves of an integer prompt."""
    if not jnp.issubdtype(batch.dtype, jnp.integer):
        return {}
    _, inputs = decomposition.target.forward(target_params, batch, {})
    out = {}
    for name, site in decomposition.target.sites.items():
        x = inputs.get(name)
        if (site.kind == "embed" and name not in decomposition.site_names and x is not None
                and x.shape == batch.shape and bool(jnp.all(x == batch))):
            e = jnp.take(site.weight(target_params), batch, axis=0)
            out[name] = e if site.bias is None else e + site.bias(target_params)
    return out


def leaf_forward(decomposition, params, target_params, batch, embeds: Sequence[str],
                 delta: bool = False) -> Callable:
    """``leaves -> (acts, output)``: the target run with every decomposed site computing
    ``b Û (+ delta + bias)`` from the leaf ``b = leaves["components"][site]`` and recording its
    own activations ``acts[site] = ||U|| (x V)``; the token-embedding sites ``embeds`` give
    ``leaves["input"][site]``, and a float prompt is ``leaves["input"]["batch"]``."""
    target = decomposition.target

    def f(leaves):
        acts, replace = {}, {}
        for name in decomposition.site_names:
            site = decomposition.site(name)
            V, U = decomposition.factors(params, name)
            norm, U_hat = _unit_rows(U)
            bias = None if site.bias is None else site.bias(target_params)
            D = site.weight(target_params) - V @ U if delta else None

            def fn(x, name=name, site=site, V=V, norm=norm, U_hat=U_hat, bias=bias, D=D):
                if isinstance(x, Mapped) and x.factored:
                    raise ValueError(f"Site {name!r} takes a factored input: attribution "
                                     "graphs need the target's plain (unfolded) forward.")
                acts[name] = site.apply(V, x) * norm
                y = jnp.einsum("...c,co->...o", leaves["components"][name], site.out(U_hat, x))
                if D is not None:
                    y = y + site.apply(site.out(D, x), x)
                b = site.out(bias, x)
                return y if b is None else y + b

            replace[name] = fn
        for name in embeds:
            replace[name] = lambda _ids, name=name: leaves["input"][name]
        x = leaves["input"]["batch"] if "batch" in leaves["input"] else batch
        out, _ = target.forward(target_params, x, replace)
        return acts, out

    return f


# -- the graph -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Flat indices: the target vector ``[acts of each site (T*C), centred logits (T*V)]`` and
    the source vector ``[b of each site (T*C), input attributions]``."""

    sites: tuple[str, ...]
    offsets: dict
    out_offset: int
    size: int
    shapes: dict


def _layout(acts: Mapping[str, Array], out: Array) -> _Layout:
    offsets, o = {}, 0
    for name, a in acts.items():
        offsets[name] = o
        o += a.size
    return _Layout(tuple(acts), offsets, o, o + out.size,
                   {n: a.shape for n, a in acts.items()})


def _component_flat(lay: _Layout, site: str, pos: int, c: int) -> int:
    shape = lay.shapes[site]
    return lay.offsets[site] + (c if len(shape) == 2 else pos * shape[-1] + c)


def compute_graph(decomposition, params, target_params, batch, *,
                  positions: Sequence[int] | None = None, threshold: float = 0.1, top_k: int = 5,
                  masking: str = "ci", delta: bool = False, chunk: int = 32,
                  ci: Mapping[str, Array] | None = None,
                  decode: Callable[[int], str] | None = None,
                  progress: Progress | None = None) -> Graph:
    """The unpruned attribution graph of the prompt ``batch`` (module docstring): every
    component node with CI > ``threshold``, the inputs, the ``top_k`` outputs at ``positions``
    (default: the last), and every nonzero direct edge between them.

    ``masking``: the forward the graph is read in, ``"ci"`` (masks = CI; VPD) or ``"ones"``
    (the unmasked decomposition; with ``delta=True`` the target itself, as the reference's
    app). ``ci``: CI to use instead of the CI function's (``{site: [1, *P, C]}``, e.g. from
    :func:`spdjax.analysis.interventions.optimize_sparse_ci`). ``chunk``: target nodes per
    vmapped batch of VJPs."""
    if masking not in MASKINGS:
        raise ValueError(f"Unknown masking {masking!r}; expected one of {MASKINGS}.")
    if not (isinstance(chunk, int) and chunk > 0):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}.")
    if not (isinstance(top_k, int) and top_k > 0):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    target_out, _, lower = iv.prompt_ci(decomposition, params, target_params, batch)
    lower = {n: jnp.asarray(v, jnp.float32) for n, v in (lower if ci is None else ci).items()}
    n_pos = iv.n_positions(lower)
    pos = iv.positions_of(target_out, positions)
    m = {n: (g if masking == "ci" else jnp.ones_like(g)) for n, g in lower.items()}
    fwd_masks = iv.masks_for(m, base="ci", delta=delta)  # base "ci": the masks m themselves
    _, inputs = decomposition.forward(target_params, params, batch, fwd_masks, with_inputs=True)
    acts0 = {}
    for name in decomposition.site_names:
        V, U = decomposition.factors(params, name)
        acts0[name] = decomposition.site(name).apply(V, inputs[name]) * _unit_rows(U)[0]
    embeds = _token_embeddings(decomposition, target_params, batch)
    is_float = jnp.issubdtype(batch.dtype, jnp.floating)
    leaves = {"components": {n: m[n] * acts0[n] for n in decomposition.site_names},
              "input": {"batch": batch} if is_float else embeds}
    f = leaf_forward(decomposition, params, target_params, batch, tuple(embeds), delta)
    lay = _layout(acts0, target_out)

    # Nodes: inputs, components (CI > threshold), outputs.
    nodes: list[Node] = []
    src_flat: list[int] = []  # per source node: its index in the source vector
    n_src_comp = sum(a.size for a in acts0.values())
    if is_float:
        x = np.asarray(batch)[0]
        for flat in np.flatnonzero(x.reshape(-1)):
            p, feat = divmod(int(flat), x.shape[-1])
            nodes.append(Node(INPUT, p, feat, activation=float(x.reshape(-1)[flat])))
            src_flat.append(n_src_comp + int(flat))
    else:
        ids = np.asarray(batch)[0].reshape(-1)
        norms = sum(np.linalg.norm(np.asarray(e)[0], axis=-1) for e in embeds.values()) if (
            embeds) else np.zeros(len(ids))
        for p, t in enumerate(ids):
            nodes.append(Node(INPUT, p, int(t), activation=float(norms[p]),
                              label=decode(int(t)) if decode else ""))
            src_flat.append(n_src_comp + p if embeds else -1)
    comp_rows = []
    for name in decomposition.site_names:
        g, b = np.asarray(lower[name])[0], np.asarray(leaves["components"][name])[0]
        for idx in zip(*np.nonzero(g > threshold)):
            p = 0 if g.ndim == 1 else int(idx[0])
            c = int(idx[-1])
            flat = _component_flat(lay, name, p, c)
            comp_rows.append(flat)
            src_flat.append(flat)
            nodes.append(Node(COMPONENT, p, c, site=name, activation=float(b[idx]),
                              ci=float(g[idx])))
    probs = np.asarray(jax.nn.softmax(iv.at_positions(target_out, pos), -1))
    logits = np.asarray(iv.at_positions(target_out, pos))
    out_rows = []
    V = target_out.shape[-1]
    for row, p in enumerate(pos if pos is not None else [0]):
        for t in np.argsort(-probs[row], kind="stable")[:top_k]:
            out_rows.append(lay.out_offset + p * V + int(t))
            nodes.append(Node(OUTPUT, p, int(t), activation=float(
                logits[row, t] - logits[row].mean()), ci=float(probs[row, t]),
                label=decode(int(t)) if decode else ""))
    n_in = len(nodes) - len(comp_rows) - len(out_rows)
    target_rows = np.asarray(comp_rows + out_rows, np.int32)
    sources = np.asarray(src_flat, np.int32)

    def flat_f(lv):
        acts, out = f(lv)
        centred = out - jnp.mean(out, axis=-1, keepdims=True)
        return jnp.concatenate([acts[n].reshape(-1) for n in lay.sites] + [centred.reshape(-1)])

    def flat_sources(g, lv):
        parts = [(g["components"][n] * lv["components"][n]).reshape(-1) for n in lay.sites]
        inp = jax.tree.map(lambda a, b: a * b, g["input"], lv["input"])
        if is_float:
            parts.append(inp["batch"].reshape(-1))
        elif embeds:
            parts.append(sum(jnp.sum(v, axis=-1) for v in inp.values()).reshape(-1))
        return jnp.concatenate(parts + [jnp.zeros((1,), jnp.float32)])  # [-1]: no leaf

    @jax.jit
    def rows(lv, idx):
        y, vjp = jax.vjp(flat_f, lv)

        def one(i):
            (g,) = vjp(jax.nn.one_hot(i, y.shape[0], dtype=y.dtype))
            return flat_sources(g, lv)[sources]

        return jax.vmap(one)(idx)

    R = len(target_rows)
    A = np.zeros((R, len(sources)), np.float32)
    for start in range(0, R, chunk):
        idx = target_rows[start:start + chunk]
        padded = np.pad(idx, (0, chunk - len(idx)), constant_values=idx[0])
        A[start:start + len(idx)] = np.asarray(rows(leaves, jnp.asarray(padded)))[:len(idx)]
        if progress is not None:
            progress(f"edges: {min(start + chunk, R)}/{R} target nodes")
    if not embeds and not is_float:  # decomposed embedding: its nodes stand for their token
        for r in range(len(comp_rows)):
            node = nodes[n_in + r]
            if decomposition.site(node.site).kind == "embed":
                A[r, node.position] = node.activation
    t_idx, s_idx = np.nonzero(A)
    return Graph(nodes=nodes, sources=s_idx.astype(int), targets=(t_idx + n_in).astype(int),
                 weights=A[t_idx, s_idx].astype(float), positions=pos,
                 settings={"threshold": threshold, "top_k": top_k, "masking": masking,
                           "delta": delta, "n_positions": n_pos})


# -- pruning -------------------------------------------------------------------------------


def _normalised(A: np.ndarray) -> np.ndarray:
    """``|A|`` with each row scaled to sum 1 (zero rows stay zero)."""
    A = np.abs(A)
    s = A.sum(axis=1, keepdims=True)
    return np.divide(A, s, out=np.zeros_like(A), where=s > 0)


def output_weights(graph: Graph) -> np.ndarray:
    """``(N,)``: each output node's target probability, normalised to sum 1; 0 elsewhere."""
    w = np.array([n.ci if n.kind == OUTPUT else 0.0 for n in graph.nodes])
    return w / w.sum() if w.sum() > 0 else w


def influence(graph: Graph) -> np.ndarray:
    """``(N,)``: each node's influence on the outputs through every path,
    ``w_out^T ((I - Â)^-1 - I)`` with ``Â`` the row-normalised ``|A|`` (a DAG: the series
    ``Â + Â² + ...`` is finite)."""
    A = _normalised(graph.adjacency())
    w = output_weights(graph)
    return np.linalg.solve((np.eye(len(w)) - A).T, w) - w


def prune(graph: Graph, *, node_threshold: float = NODE_THRESHOLD,
          edge_threshold: float = EDGE_THRESHOLD) -> Graph:
    """The graph with its component nodes cut to those carrying ``node_threshold`` of the total
    influence on the outputs (largest first) and its edges to those carrying
    ``edge_threshold`` of the total edge score ``|Â_ts| (influence_t + w_t)``; inputs and
    outputs stay. Component nodes left without an outgoing edge are dropped."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v!r}.")
    inf = influence(graph)
    comp = np.array([n.kind == COMPONENT for n in graph.nodes])
    keep = ~comp
    order = np.flatnonzero(comp)[np.argsort(-inf[comp], kind="stable")]
    total = inf[comp].sum()
    if total > 0:
        cum = np.cumsum(inf[order]) / total
        keep[order[:int(np.searchsorted(cum, node_threshold)) + 1]] = True
    sub = _subgraph(graph, keep)
    A = _normalised(sub.adjacency())
    inf = influence(sub)
    score = A * (inf + output_weights(sub))[:, None]
    edge_score = score[sub.targets, sub.sources]
    order = np.argsort(-edge_score, kind="stable")
    cum = np.cumsum(edge_score[order]) / max(edge_score.sum(), 1e-30)
    kept_edges = np.zeros(len(order), bool)
    kept_edges[order[:int(np.searchsorted(cum, edge_threshold)) + 1]] = True
    sub = dataclasses.replace(sub, sources=sub.sources[kept_edges],
                              targets=sub.targets[kept_edges], weights=sub.weights[kept_edges])
    while True:  # drop component nodes that feed nothing any more
        has_out = np.zeros(len(sub.nodes), bool)
        has_out[sub.sources] = True
        keep = np.array([n.kind != COMPONENT for n in sub.nodes]) | has_out
        if keep.all():
            break
        sub = _subgraph(sub, keep)
    sub.influence = influence(sub)
    sub.settings = {**sub.settings, "node_threshold": node_threshold,
                    "edge_threshold": edge_threshold}
    return sub


def _subgraph(graph: Graph, keep: np.ndarray) -> Graph:
    new = -np.ones(len(graph.nodes), int)
    new[keep] = np.arange(int(keep.sum()))
    e = keep[graph.sources] & keep[graph.targets]
    return dataclasses.replace(
        graph, nodes=[n for n, k in zip(graph.nodes, keep) if k], sources=new[graph.sources[e]],
        targets=new[graph.targets[e]], weights=graph.weights[e],
        influence=None if graph.influence is None else graph.influence[keep])


def strongest_path(graph: Graph, output: int | None = None) -> list[int]:
    """Node indices of the strongest path into ``output`` (default: the most probable output
    node), input first: from the output, repeatedly the source of the largest ``|weight|``
    edge into the current node, until a node without sources."""
    if output is None:
        output = int(np.argmax(output_weights(graph)))
    A = np.abs(graph.adjacency())
    path = [output]
    while A[path[-1]].max(initial=0.0) > 0 and len(path) <= len(graph.nodes):
        path.append(int(np.argmax(A[path[-1]])))
    return path[::-1]


# -- validation ----------------------------------------------------------------------------


def graph_masks(graph: Graph, lower: Mapping[str, Array]) -> dict[str, Array]:
    """``{site: [1, *P, C]}``: 1 at the graph's component nodes, 0 elsewhere."""
    return iv.masks_for(lower, base="zeros", keep=graph.components())


def validate(decomposition, params, target_params, batch, graph: Graph, *,
             pgd_steps: int = 100, pgd_step_size: float = 0.05, pgd_restarts: int = 2,
             rounds: int = 10, key: Array | None = None, delta: bool = False,
             progress: Progress | None = None) -> dict:
    """Validation numbers of ``graph`` on its prompt (KL(target || x) at the output positions,
    mean over them): ``kl_graph_only`` (the graph's subcomponents at 1, the rest 0),
    ``kl_unmasked`` and ``kl_ci_masked`` for scale, and ``kl_pgd_worst``: the largest KL found
    by ``pgd_restarts`` signed-gradient ascents of ``pgd_steps`` steps on the masks of every
    subcomponent-position outside the graph (the first from all zeros, i.e. the graph alone,
    then from uniform sources from ``key``), each reported every ``pgd_steps // rounds``
    steps; ``kl_pgd`` lists each restart's final KL. Also each output's probability
    graph-only."""
    target_out, inputs, lower = iv.prompt_ci(decomposition, params, target_params, batch)
    pos = graph.positions
    in_graph = graph_masks(graph, lower)
    fwd = lambda masks: decomposition.forward(target_params, params, batch, masks)  # noqa: E731
    only = fwd(iv.masks_for(in_graph, base="ci", delta=delta))
    out = {"n_nodes": sum(n.kind == COMPONENT for n in graph.nodes),
           "n_edges": int(len(graph.weights)),
           "kl_graph_only": float(iv.kl_at(only, target_out, pos)),
           "kl_unmasked": float(iv.kl_at(fwd(iv.masks_for(lower, base="ones", delta=delta)),
                                          target_out, pos)),
           "kl_ci_masked": float(iv.kl_at(fwd(iv.masks_for(lower, base="ci", delta=delta)),
                                           target_out, pos))}
    probs = np.asarray(jax.nn.softmax(iv.at_positions(only, pos), -1))
    rows = {p: r for r, p in enumerate(pos if pos is not None else [0])}
    out["graph_only_probs"] = [
        {"position": n.position, "token": n.index, "target": n.ci,
         "graph_only": float(probs[rows[n.position], n.index])}
        for n in graph.nodes if n.kind == OUTPUT]
    if pgd_steps:
        worst, finals = adversarial_kl(
            decomposition, params, target_params, batch, in_graph, target_out, inputs, pos,
            steps=pgd_steps, step_size=pgd_step_size, restarts=pgd_restarts, rounds=rounds,
            key=jax.random.key(0) if key is None else key, progress=progress)
        out.update(kl_pgd_worst=worst, kl_pgd=finals, pgd_steps=pgd_steps,
                   pgd_step_size=pgd_step_size)
    return out


def adversarial_kl(decomposition, params, target_params, batch, held: Mapping[str, Array],
                   target_out, inputs, positions, *, steps: int, step_size: float,
                   restarts: int, rounds: int, key: Array,
                   progress: Progress | None = None) -> tuple[float, list[float]]:
    """The worst KL(target || masked) at ``positions`` over masks ``held + (1 - held) s``,
    ``s`` in [0, 1] chosen by signed ascent (:func:`spdjax.losses.adversarial.pgd_sources`,
    one source per subcomponent and position): ``(max over restarts, each restart's final)``.
    Restart 0 starts from ``s = 0``, the others from ``U[0, 1)`` draws of ``fold_in(key, r)``."""
    if not (isinstance(steps, int) and steps > 0 and isinstance(restarts, int) and restarts > 0):
        raise ValueError(f"PGD needs steps > 0 and restarts > 0, got {steps!r}, {restarts!r}.")
    rounds = max(1, min(rounds, steps))
    ci = {n: CausalImportance(lower=h, upper=h, pre=h) for n, h in held.items()}
    ctx = Context(decomposition=decomposition, target_params=target_params, batch=batch,
                  target_out=target_out, site_inputs=inputs, ci=ci,
                  step_frac=jnp.zeros((), jnp.float32))
    sites = list(held)
    divergence = lambda o, t: iv.kl_at(o, t, positions)  # noqa: E731

    def make_round(n):
        return jax.jit(lambda s, k: pgd_sources(
            params, ctx, k, sites, n_steps=n, step_size=step_size, init="random",
            divergence=divergence, sources=s))

    kl_of = jax.jit(lambda s: divergence(decomposition.forward(
        target_params, params, batch, masks_from_sources(s, held)), target_out))
    per = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    fns = {n: make_round(n) for n in set(per)}
    finals = []
    for r in range(restarts):
        k = jax.random.fold_in(key, r)
        s = {n: (jnp.zeros_like(h) if r == 0 else jax.random.uniform(
            jax.random.fold_in(k, i), h.shape)) for i, (n, h) in enumerate(held.items())}
        done = 0
        for n in per:
            s = fns[n](s, k)
            done += n
            if progress is not None:
                progress(f"PGD restart {r + 1}/{restarts}: step {done}/{steps}, "
                         f"KL {float(kl_of(s)):.4g}")
        finals.append(float(kl_of(s)))
    return max(finals), finals


def build(decomposition, params, target_params, batch, *, positions=None, threshold=0.1,
          top_k=5, masking="ci", delta=False, node_threshold=NODE_THRESHOLD,
          edge_threshold=EDGE_THRESHOLD, chunk=32, ci=None, decode=None,
          validation: Mapping[str, Any] | None = None, progress: Progress | None = None) -> Graph:
    """:func:`compute_graph`, :func:`prune` and :func:`validate` (``validation``: its keyword
    options; None: the defaults; ``{"pgd_steps": 0}``: no PGD) in one call; the unpruned
    graph's size is in ``settings["unpruned"]``."""
    full = compute_graph(decomposition, params, target_params, batch, positions=positions,
                         threshold=threshold, top_k=top_k, masking=masking, delta=delta,
                         chunk=chunk, ci=ci, decode=decode, progress=progress)
    graph = prune(full, node_threshold=node_threshold, edge_threshold=edge_threshold)
    graph.settings["unpruned"] = {"n_nodes": sum(n.kind == COMPONENT for n in full.nodes),
                                  "n_edges": int(len(full.weights))}
    graph.validation = validate(decomposition, params, target_params, batch, graph, delta=delta,
                                progress=progress, **dict(validation or {}))
    return graph
