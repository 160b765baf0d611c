"""The unpruned attribution graph of one prompt: its nodes and, through the edge pass of
:mod:`~spdjax.analysis.graph_edges`, its edges (:func:`compute_graph`), and the graph as data
(:class:`Node`, :class:`Graph`). What the nodes, activations and edges are:
:mod:`spdjax.analysis.graphs`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import interventions as iv
from spdjax.analysis.graph_edges import IG_STEPS, edge_matrix, unit_rows

Array = jax.Array
INPUT, COMPONENT, OUTPUT = "input", "component", "output"
MASKINGS = ("ci", "ones")
ATTRIBUTIONS = ("gradient", "integrated")
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

    def node_counts(self, site_order: Sequence[str] | None = None) -> dict[str, int]:
        """``{"site@position": subcomponent nodes}`` (``"site"`` for a model without positions),
        sites in ``site_order`` (default: first seen), positions ascending: where the graph
        sits, at a glance."""
        comps = [n for n in self.nodes if n.kind == COMPONENT]
        order = list(site_order or []) + [n.site for n in comps]
        rank = {s: i for i, s in reversed(list(enumerate(order)))}
        pos = (lambda n: 0) if self.positions is None else (lambda n: n.position)
        counts = collections.Counter((n.site, pos(n)) for n in comps)
        name = (lambda s, p: s) if self.positions is None else (lambda s, p: f"{s}@{p}")
        return {name(s, p): counts[s, p]
                for s, p in sorted(counts, key=lambda k: (rank[k[0]], k[1]))}

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


# -- the token embeddings ------------------------------------------------------------------


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
                  attribution: str = "gradient", ig_steps: int = IG_STEPS,
                  ci: Mapping[str, Array] | None = None,
                  decode: Callable[[int], str] | None = None,
                  progress: Progress | None = None,
                  partial: str | pathlib.Path | None = None) -> Graph:
    """The unpruned attribution graph of the prompt ``batch`` (module docstring): every
    component node with CI > ``threshold``, the inputs, the ``top_k`` outputs at ``positions``
    (default: the last), and every nonzero direct edge between them.

    ``masking``: the forward the graph is read in, ``"ci"`` (masks = CI; VPD) or ``"ones"``
    (the unmasked decomposition; with ``delta=True`` the target itself, as the reference's
    app). ``ci``: CI to use instead of the CI function's (``{site: [1, *P, C]}``, e.g. from
    :func:`spdjax.analysis.interventions.optimize_sparse_ci`). ``chunk``: target nodes per
    vmapped batch of VJPs. ``attribution``: ``"gradient"`` (gradient x activation at the
    prompt) or ``"integrated"`` (integrated gradients from every subcomponent at 0, the inputs
    held, ``ig_steps`` midpoints: sees through a saturated softmax;
    :mod:`spdjax.analysis.graphs`). ``partial``: a file that keeps the edge rows done so far,
    so that an interrupted call continues where it stopped
    (:func:`~spdjax.analysis.graph_edges.edge_matrix`)."""
    if masking not in MASKINGS:
        raise ValueError(f"Unknown masking {masking!r}; expected one of {MASKINGS}.")
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"Unknown attribution {attribution!r}; expected one of "
                         f"{ATTRIBUTIONS}.")
    if not (isinstance(ig_steps, int) and not isinstance(ig_steps, bool) and ig_steps > 0):
        raise ValueError(f"ig_steps must be a positive integer, got {ig_steps!r}.")
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
        acts0[name] = decomposition.site(name).apply(V, inputs[name]) * unit_rows(U)[0]
    embeds = _token_embeddings(decomposition, target_params, batch)
    is_float = jnp.issubdtype(batch.dtype, jnp.floating)
    leaves = {"components": {n: m[n] * acts0[n] for n in decomposition.site_names},
              "input": {"batch": batch} if is_float else embeds}
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
    sources = np.asarray(src_flat, np.int32)  # -1: the source vector's last, zero, entry

    steps = ig_steps if attribution == "integrated" else 0
    key = {"nodes": [(n.name, n.activation) for n in nodes], "masking": masking,
           "delta": delta, "steps": steps, "batch": np.asarray(batch).tolist()}
    A = edge_matrix(decomposition, tuple(embeds), delta, steps, params, target_params, batch,
                    leaves, target_rows, sources, chunk=chunk, key=key, partial=partial,
                    progress=progress)
    if not embeds and not is_float:  # decomposed embedding: its nodes stand for their token
        for r in range(len(comp_rows)):
            node = nodes[n_in + r]
            if decomposition.site(node.site).kind == "embed":
                A[r, node.position] = node.activation
    t_idx, s_idx = np.nonzero(A)
    return Graph(nodes=nodes, sources=s_idx.astype(int), targets=(t_idx + n_in).astype(int),
                 weights=A[t_idx, s_idx].astype(float), positions=pos,
                 settings={"threshold": threshold, "top_k": top_k, "masking": masking,
                           "delta": delta, "n_positions": n_pos, "attribution": attribution,
                           **({"ig_steps": ig_steps} if steps else {})})
