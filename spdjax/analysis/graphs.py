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

Integrated gradients (``attribution="integrated"``; Sundararajan et al. 2017, "Axiomatic
Attribution for Deep Networks"). Gradient x activation is a first-order estimate at the prompt:
where attention is saturated (a softmax weight near 1) the gradient through the pattern is ~0,
and the query and key subcomponents that *choose* the attended position get no edges, though
ablating them changes the output (an induction head's QK). Integrated gradients averages the
gradient along the straight path from every subcomponent at 0 to the prompt, the inputs held at
the prompt's (the baseline is the model of its embeddings and biases alone; scaling the inputs
too would leave a LayerNorm or RMSNorm model unchanged along the path, its norms undoing the
scale): ``w(s -> t) = b_s mean_k ∂a_t/∂b_s (alpha_k b, x)`` at ``ig_steps`` midpoints
``alpha_k``. The edges into ``t`` from all component leaves (nodes or not) then sum to
``a_t(b, x) - a_t(0, x)`` (completeness, up to the midpoint rule's error, ``O(1/ig_steps^2)``
on a smooth model and ``O(1/ig_steps)`` where ReLUs switch along the path); a path through a
pattern that is unsaturated on the way gets its share. Input edges stay gradient x activation at
the prompt, and a decomposed embedding's token -> subcomponent edge is its ``b`` in both modes.
It costs ``ig_steps + 1`` times gradient x activation.

Cost. One forward and ``R`` backward passes (one VJP per target node, ``jax.vmap`` over
``chunk`` one-hot cotangents at a time), ``R`` = component nodes + output nodes: time
``O(R x forward)`` (``ig_steps + 1`` times that, integrated), memory
``O(chunk x (T sum_s C_s + T V))`` on top of one forward (twice that, integrated: the scan's
accumulator) (benchmarks/README.md, "Attribution
graphs").

Pruning (:func:`~spdjax.analysis.graph_prune.prune`) follows circuit-tracing practice
(Ameisen et al. 2025, "Circuit Tracing", graph pruning): rows of ``|A|`` normalised to sum 1,
influence on the outputs ``w_out^T ((I - A)^-1 - I)`` (``w_out``: output probabilities), the
component nodes with the largest influence kept up to ``node_threshold`` of the total, then the
edges with the largest ``|A_ts| (influence_t + w_t)`` up to ``edge_threshold``.

Validation (:func:`~spdjax.analysis.graph_validate.validate`): KL(target || graph only) at the
output positions, with the graph's subcomponents at 1 and every other at 0; and the worst KL
that signed-gradient ascent (PGD) on the masks of every subcomponent *outside* the graph (in
[0, 1], graph nodes held at 1; with ``delta`` the delta component at 1 throughout) finds.

Modules: :mod:`~spdjax.analysis.graph_compute` (nodes, the :class:`Graph`),
:mod:`~spdjax.analysis.graph_edges` (the edge pass, resumable),
:mod:`~spdjax.analysis.graph_prune`, :mod:`~spdjax.analysis.graph_validate`; this module
re-exports their public names and adds :func:`build`, the three in one call, and
:func:`site_order`, the rows of a drawing (the sites in the order the model calls them).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

# Re-exported: the attribution-graph vocabulary, importable from here as the guide shows.
from spdjax.analysis.graph_compute import (  # noqa: F401
    ATTRIBUTIONS, COMPONENT, INPUT, MASKINGS, OUTPUT, Graph, Node, Progress, compute_graph)
from spdjax.analysis.graph_edges import IG_STEPS, ig_alphas, leaf_forward  # noqa: F401
from spdjax.analysis.graph_prune import (  # noqa: F401
    EDGE_THRESHOLD, NODE_THRESHOLD, influence, output_weights, prune, strongest_path)
from spdjax.analysis.graph_validate import adversarial_kl, graph_masks, validate  # noqa: F401


def build(decomposition, params, target_params, batch, *, positions=None, threshold=0.1,
          top_k=5, masking="ci", delta=False, node_threshold=NODE_THRESHOLD,
          edge_threshold=EDGE_THRESHOLD, chunk=32, attribution="gradient", ig_steps=IG_STEPS,
          ci=None, decode=None, validation: Mapping[str, Any] | None = None,
          progress: Progress | None = None, partial=None) -> Graph:
    """:func:`compute_graph`, :func:`prune` and :func:`validate` (``validation``: its keyword
    options; None: the defaults; ``{"pgd_steps": 0}``: no PGD) in one call; the unpruned
    graph's size is in ``settings["unpruned"]``."""
    full = compute_graph(decomposition, params, target_params, batch, positions=positions,
                         threshold=threshold, top_k=top_k, masking=masking, delta=delta,
                         chunk=chunk, attribution=attribution, ig_steps=ig_steps, ci=ci,
                         decode=decode, progress=progress, partial=partial)
    graph = prune(full, node_threshold=node_threshold, edge_threshold=edge_threshold)
    graph.settings["unpruned"] = {"n_nodes": sum(n.kind == COMPONENT for n in full.nodes),
                                  "n_edges": int(len(full.weights))}
    graph.validation = validate(decomposition, params, target_params, batch, graph, delta=delta,
                                progress=progress, **dict(validation or {}))
    return graph


def site_order(decomposition, target_params, batch) -> list[str]:
    """The decomposed sites in the order the target's forward calls them on ``batch`` (one
    abstract trace, no computation): the rows of a graph's drawing, bottom to top. A
    decomposition lists its sites by the patterns that chose them (e.g. every attention
    projection, then every MLP), which would draw a later layer below an earlier one."""
    called: list[str] = []

    def trace(tp, x):
        _, inputs = decomposition.target.forward(tp, x, {})
        called.extend(inputs)  # a dict in call order (a site is recorded when it is called)
        return 0

    jax.eval_shape(trace, target_params, batch)
    names = decomposition.site_names
    order = [n for n in called if n in names]
    return order + [n for n in names if n not in order]
