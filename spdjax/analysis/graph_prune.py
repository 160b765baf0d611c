"""Pruning an attribution graph to the nodes and edges that carry its influence on the outputs
(circuit-tracing practice: Ameisen et al. 2025, "Circuit Tracing", graph pruning), and its
strongest path. The method: :mod:`spdjax.analysis.graphs`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spdjax.analysis.graph_compute import COMPONENT, OUTPUT, Graph

# Pruning defaults: 0.9 of the influence (at 0.8 the hand-built induction model's graph loses
# the previous-token head's sources; tests/analysis/test_graphs.py), 0.98 of the edge score.
NODE_THRESHOLD, EDGE_THRESHOLD = 0.9, 0.98


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
