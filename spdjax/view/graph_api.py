"""The viewer's attribution-graph explorer, as JSON: a prompt's graph (:func:`graph_json`, what
``POST /api/graph`` answers) and an intervention on it (:func:`intervene_json`,
``POST /api/intervene``).

Both take a finished language-model run (``spdjax.load(workdir)``) and a request body (a dict
read from JSON); a bad body, an empty prompt, a token the run's encoding does not know, a node
that is not a subcomponent of the decomposition, or a run that is not a language model is a
:class:`~spdjax.view.errors.BadRequest` (a ``ValueError``) whose message names the bad value and
what was expected (the server's HTTP 400); any other exception is a bug (the server's 500).

The graph is :func:`spdjax.analysis.graph_compute.compute_graph` pruned by
:func:`~spdjax.analysis.graph_prune.prune` (docs/guides/attribution_graphs.md); the intervention is
:func:`spdjax.analysis.interventions.intervene`. Prompts are encoded as the command-line tools
encode them (:mod:`spdjax.cli.prompts`), so a prompt typed here gives the graph
``python -m spdjax.attribution_graph --prompt=...`` gives.

Speed: per run, the decomposition's clean forward, CI and masked forward are compiled once
(:class:`_Compiled`), and the graph's edge pass once per prompt length
(:func:`~spdjax.analysis.graph_compute.compute_graph` takes the prompt as an argument), so a new
prompt of a length already seen needs no compilation (docs/guides/viewer.md, "Speed"); graphs
are kept per prompt and settings (the last :data:`GRAPHS_KEPT`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import graphs, interventions as iv
from spdjax.cli import prompts
from spdjax.view import data
from spdjax.view.errors import BadRequest

GRAPHS_KEPT = 16  # graphs remembered per run (a few KB of JSON each)
MAX_TOP_K = 50
GRAPH_KEYS = {
    "prompt": "the prompt text (as for python -m spdjax.attribution_graph --prompt)",
    "threshold": "CI above which a subcomponent-position is a node, in [0, 1) (0.1)",
    "positions": "output positions, a list of integers, negative from the end (the last)",
    "top_k": f"output tokens per position, 1..{MAX_TOP_K} (3)",
    "masking": f"the forward the graph is read in, one of {list(graphs.MASKINGS)} ('ci')",
    "attribution": f"edge weights, one of {list(graphs.ATTRIBUTIONS)} ('gradient'; "
                   f"'integrated' sees through saturated attention, {graphs.IG_STEPS + 1} "
                   "times the cost)",
    "node_threshold": f"pruning: share of the influence kept, in (0, 1] "
                      f"({graphs.NODE_THRESHOLD})",
    "edge_threshold": f"pruning: share of the edge score kept, in (0, 1] "
                      f"({graphs.EDGE_THRESHOLD})",
    "prune": "false: the unpruned graph, every node above the threshold (true)",
}
INTERVENE_KEYS = {
    "prompt": "the prompt text",
    "keep": "node ids 'site:index@position' set to mask 1",
    "ablate": "node ids 'site:index@position' set to mask 0",
    "base": f"the masks of the others, one of {list(iv.BASES)} (default: 'zeros' with keep, "
            "else 'ones')",
    "positions": "output positions, a list of integers (the last)",
    "top_k": f"predictions per position, 1..{MAX_TOP_K} (5)",
}


class _Compiled:
    """The run's decomposition with ``clean_forward``, ``causal_importance`` and ``forward``
    jitted once; every other attribute is the decomposition's. What the analysis functions
    receive as their ``decomposition``, so their own code runs on compiled forwards."""

    def __init__(self, decomposition):
        self._decomposition = decomposition
        self.clean_forward = jax.jit(decomposition.clean_forward)
        self.causal_importance = jax.jit(decomposition.causal_importance)
        self.forward = jax.jit(decomposition.forward, static_argnames=("with_inputs",))

    def __getattr__(self, name):
        return getattr(self._decomposition, name)


class _Session:
    """What one run's requests share: the compiled decomposition, the prompt codec, the row
    order (:func:`spdjax.analysis.graphs.site_order`), the target's embedding sites, the graphs
    computed so far, and a lock (one request computes at a time, so two requests never compile
    the same function twice)."""

    def __init__(self, run):
        family = run.experiment.family
        if family.name != "lm" and getattr(family, "prompt_codec", None) is None:
            raise BadRequest(
                f"The graph explorer reads language-model runs (prompts of tokens); the run in "
                f"{run.workdir} is of the {family.name!r} family. Its per-prompt analyses: "
                "python -m spdjax.attribution_graph / spdjax.intervene with a numeric prompt.")
        self.decomposition = _Compiled(run.decomposition)
        self.codec = prompts.codec(run)
        # A text (Llama) LM's prompts are ids; its tokens are shown with the corpus's tokenizer
        # (as ids when it cannot be read).
        self.token_text = self.codec.decode
        if self.token_text is None:
            try:
                self.token_text = data.model_token_text(run.experiment.model_config)
            except (OSError, ValueError):
                pass
        target = run.decomposition.target
        self.site_order: list[str] | None = None  # the drawing's rows, on the first prompt
        self.embeds = {n: s.d_in for n, s in target.sites.items() if s.kind == "embed"}
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def batch(self, run, text: Any) -> tuple[jax.Array, list[str]]:
        """``([1, T] ids, their token texts)`` of the prompt ``text``."""
        if not isinstance(text, str):
            raise BadRequest(f"'prompt' must be a string, got {text!r}.")
        if not text.strip():
            raise BadRequest("The prompt is empty: type at least one token.")
        with _checking():
            batch, _ = prompts.prompt_batch(run, text)
        if not np.issubdtype(batch.dtype, np.integer):
            raise BadRequest(f"The prompt {text!r} is not tokens (it encodes to floats).")
        self.check_vocabulary(run, batch)
        return jnp.asarray(batch), [self.decode(int(i)) for i in batch[0]]

    def check_vocabulary(self, run, batch: np.ndarray) -> None:
        """A ``ValueError`` for ids outside the token embedding's rows (the compiled forward
        would clamp them silently). The token embeddings are the embedding sites that read the
        ids (not e.g. a position embedding), found by one target forward when an id is at least
        the smallest embedding's size."""
        if not self.embeds or (batch.min() >= 0 and batch.max() < min(self.embeds.values())):
            return
        _, inputs = run.decomposition.target.forward(run.target_params, jnp.asarray(batch), {})
        reading = [n for n in self.embeds if n in inputs and np.shape(inputs[n]) == batch.shape
                   and np.array_equal(np.asarray(inputs[n]), batch)]
        vocab = min((self.embeds[n] for n in reading), default=None)
        bad = sorted({int(i) for i in batch.reshape(-1) if vocab is not None
                      and not 0 <= i < vocab})
        if bad:
            raise BadRequest(f"The prompt's token ids {bad} are outside the model's vocabulary "
                             f"[0, {vocab}).")

    def decode(self, i: int) -> str:
        return self.token_text(i) if self.token_text else str(i)

    def args(self, run, batch):
        return self.decomposition, run.params, run.target_params, batch


# Keyed by the run itself (a session holds no reference to it, so it goes with the run).
_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()


def _session(run) -> _Session:
    with _SESSIONS_LOCK:
        if run not in _SESSIONS:
            _SESSIONS[run] = _Session(run)
        return _SESSIONS[run]


# -- reading a body -----------------------------------------------------------------------


@contextlib.contextmanager
def _checking():
    """The library's input checks (prompt encoding, node ids) raise ``ValueError`` for what the
    user typed: inside this block that is the request's :class:`BadRequest`."""
    try:
        yield
    except BadRequest:
        raise
    except ValueError as e:
        raise BadRequest(str(e)) from e


def _check_keys(body: Any, allowed: Mapping[str, str]) -> None:
    if not isinstance(body, Mapping):
        raise BadRequest(f"The request body must be a JSON object, got {body!r}.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"Unknown request fields {unknown}; expected "
                         + "; ".join(f"{k}: {v}" for k, v in allowed.items()) + ".")
    if "prompt" not in body:
        raise BadRequest("The request has no 'prompt': send {\"prompt\": \"...\"}.")


def _number(body: Mapping, key: str, default: float, lo: float, hi: float, *,
            lo_open: bool = False, hi_open: bool = False) -> float:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        raise BadRequest(f"'{key}' must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {v!r}.")
    return float(v)


def _top_k(body: Mapping, default: int) -> int:
    k = body.get("top_k", default)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
        raise BadRequest(f"'top_k' must be an integer in [1, {MAX_TOP_K}], got {k!r}.")
    return k


def _positions(body: Mapping, T: int) -> list[int]:
    """The output positions asked for, each in ``[-T, T)`` for a prompt of ``T`` tokens (an
    LM's output has one position per token)."""
    p = body.get("positions") or []
    if isinstance(p, int) and not isinstance(p, bool):
        p = [p]
    if not isinstance(p, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in p):
        raise BadRequest(f"'positions' must be a list of integers (negative: from the end), "
                         f"got {p!r}.")
    for x in p:
        if not -T <= x < T:
            raise BadRequest(f"Output position {x} is outside the prompt of {T} positions.")
    return p


def _nodes(body: Mapping, key: str) -> list[iv.Subcomponent]:
    ids = body.get(key) or []
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise BadRequest(f"'{key}' must be a list of node ids like 'blocks_0/attn/v:3@2', "
                         f"got {ids!r}.")
    out = []
    for node in ids:
        kind = node.split(":", 1)[0]
        if kind in (graphs.INPUT, graphs.OUTPUT):
            raise BadRequest(f"Node {node!r} is an {kind} node: only subcomponent nodes "
                             "('site:index@position') can be kept or ablated.")
        with _checking():
            subs = iv.parse_subcomponents(node)
        if len(subs) != 1:
            raise BadRequest(f"Node id {node!r} must name one subcomponent "
                             "('site:index@position').")
        out += subs
    return out


# -- the two requests ---------------------------------------------------------------------


def _node_json(n: graphs.Node, influence: float, tokens: list[str], decode) -> dict:
    comp = n.kind == graphs.COMPONENT
    return {"id": n.name, "kind": n.kind, "site": n.site if comp else None,
            "component": n.index if comp else None, "position": n.position,
            "token_id": None if comp else n.index,
            "token": decode(n.index) if n.kind == graphs.OUTPUT else tokens[n.position],
            "ci": n.ci if comp else None,
            "prob": n.ci if n.kind == graphs.OUTPUT else None,
            "activation": n.activation, "influence": influence}


def graph_json(run, body: Mapping[str, Any]) -> dict:
    """The attribution graph of ``body["prompt"]`` on ``run``, pruned unless ``"prune": false``,
    as JSON (module docstring; the fields of ``body``: :data:`GRAPH_KEYS`).

    Returns ``prompt``, ``ids``, ``tokens`` (one text per position), ``positions`` (the output
    positions), ``sites`` (the decomposed sites in the order the model calls them), ``nodes``
    (``id``:
    ``"site:c@pos"`` for a subcomponent, as :func:`intervene_json` takes it, ``"input:..."`` /
    ``"output:..."`` otherwise; ``kind``, ``site``, ``component``, ``position``, ``token``,
    ``token_id``, ``ci``, ``prob`` (outputs: the target's probability), ``activation``,
    ``influence`` on the outputs), ``edges`` (``source``, ``target``: node ids; ``weight``),
    ``predictions`` (``target`` and ``components``, the unmasked decomposition: per position
    the ``top_k`` as ``{token, prob, text}``), ``kl_components`` and ``kl_graph_only``
    (KL(target || x) at the positions; graph only: the graph's subcomponents at 1, the rest
    0), ``settings`` and ``unpruned`` (its node and edge counts)."""
    _check_keys(body, GRAPH_KEYS)
    s = _session(run)
    batch, tokens = s.batch(run, body["prompt"])
    options = {"threshold": _number(body, "threshold", 0.1, 0.0, 1.0, hi_open=True),
               "positions": _positions(body, int(batch.shape[1])), "top_k": _top_k(body, 3),
               "masking": body.get("masking", "ci"),
               "attribution": body.get("attribution", "gradient")}
    pruning = {"node_threshold": _number(body, "node_threshold", graphs.NODE_THRESHOLD, 0.0,
                                         1.0, lo_open=True),
               "edge_threshold": _number(body, "edge_threshold", graphs.EDGE_THRESHOLD, 0.0,
                                         1.0, lo_open=True)}
    prune = body.get("prune", True)
    if not isinstance(prune, bool):
        raise BadRequest(f"'prune' must be true or false, got {prune!r}.")
    pruning["prune"] = prune
    if options["masking"] not in graphs.MASKINGS:
        raise BadRequest(f"'masking' must be one of {list(graphs.MASKINGS)}, got "
                         f"{options['masking']!r}.")
    if options["attribution"] not in graphs.ATTRIBUTIONS:
        raise BadRequest(f"'attribution' must be one of {list(graphs.ATTRIBUTIONS)}, got "
                         f"{options['attribution']!r}.")
    key = (tuple(np.asarray(batch).reshape(-1).tolist()), repr(sorted(options.items())),
           repr(sorted(pruning.items())))
    with s.lock:
        if key in s.graphs:
            s.graphs.move_to_end(key)
            return {**s.graphs[key], "prompt": body["prompt"]}
        args = s.args(run, batch)
        if s.site_order is None:
            s.site_order = graphs.site_order(run.decomposition, run.target_params, batch)
        full = graphs.compute_graph(*args, **options, decode=s.decode)
        if prune:
            g = graphs.prune(full, node_threshold=pruning["node_threshold"],
                             edge_threshold=pruning["edge_threshold"])
        else:
            g = full
            g.influence = graphs.influence(full)
        model = iv.intervene(*args, base="ones", positions=options["positions"],
                             k=options["top_k"], decode=s.decode)
        only = iv.intervene(*args, keep=g.components(), base="zeros",
                            positions=options["positions"], k=1)
        names = [n.name for n in g.nodes]
        result = {
            "prompt": body["prompt"], "ids": np.asarray(batch)[0].tolist(), "tokens": tokens,
            "positions": g.positions, "sites": s.site_order,
            "nodes": [_node_json(n, float(i), tokens, s.decode)
                      for n, i in zip(g.nodes, g.influence)],
            "edges": [{"source": names[a], "target": names[b], "weight": float(w)}
                      for a, b, w in zip(g.sources, g.targets, g.weights)],
            "predictions": {"target": model.target_top, "components": model.masked_top},
            "kl_components": model.kl, "kl_graph_only": only.kl,
            "settings": {**options, **pruning, "positions": g.positions},
            "unpruned": {"n_nodes": sum(n.kind == graphs.COMPONENT for n in full.nodes),
                         "n_edges": int(len(full.weights))}}
        s.graphs[key] = result
        while len(s.graphs) > GRAPHS_KEPT:
            s.graphs.popitem(last=False)
        return result


def intervene_json(run, body: Mapping[str, Any]) -> dict:
    """``body["prompt"]`` on ``run`` with the nodes ``keep`` at mask 1 and ``ablate`` at 0 (the
    others at ``base``), as :func:`spdjax.analysis.interventions.intervene` computes it; the
    fields of ``body``: :data:`INTERVENE_KEYS`.

    Returns ``positions``, ``target`` and ``intervened`` (per position the ``top_k`` as
    ``{token, prob, text}``), ``kl`` (KL(target || intervened), mean over the positions),
    ``n_kept`` (subcomponent-positions with mask > 0), and the ``keep``, ``ablate`` and
    ``base`` used."""
    _check_keys(body, INTERVENE_KEYS)
    s = _session(run)
    batch, _ = s.batch(run, body["prompt"])
    T = int(batch.shape[1])  # an LM's CI has one position per token
    with _checking():
        keep, ablate = (iv.check_subcomponents(run.decomposition, _nodes(body, k), T)
                        for k in ("keep", "ablate"))
    both = sorted({iv.describe([k]) for k in keep} & {iv.describe([a]) for a in ablate})
    if both:
        raise BadRequest(f"Nodes {both} are both kept and ablated: choose one for each.")
    base = body.get("base")
    if base is not None and base not in iv.BASES:
        raise BadRequest(f"'base' must be one of {list(iv.BASES)} (or left out), got {base!r}.")
    with s.lock:
        res = iv.intervene(*s.args(run, batch), keep=keep, ablate=ablate, base=base,
                           positions=_positions(body, T), k=_top_k(body, 5), decode=s.decode)
    return {"positions": res.positions, "target": res.target_top,
            "intervened": res.masked_top, "kl": res.kl, "n_kept": res.n_kept,
            "keep": [iv.describe([k]) for k in keep],
            "ablate": [iv.describe([a]) for a in ablate],
            "base": base or ("zeros" if keep else "ones")}
