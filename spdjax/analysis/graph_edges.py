"""The edge pass of an attribution graph (:mod:`spdjax.analysis.graphs` says what the edges
are): the target run from leaves (:func:`leaf_forward`), gradient x activation or integrated
gradients of every target node with respect to every leaf (:func:`_edge_rows`, vmapped VJPs), and
the loop over chunks of target nodes that fills the edge matrix, keeping the rows done so far in
a file when asked so that an interrupted graph resumes (:func:`edge_matrix`).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import streaming
from spdjax.core.target import Mapped

Array = jax.Array
IG_STEPS = 16  # integrated gradients' default number of midpoints
SAVE_EVERY_S = 30.0  # a resumable edge pass keeps its rows at most this often


def unit_rows(U: Array) -> tuple[Array, Array]:
    """``(||U_c||, U_c / ||U_c||)`` (a zero row stays zero)."""
    norm = jnp.linalg.norm(U, axis=1)
    return norm, U / jnp.where(norm > 0, norm, 1.0)[:, None]


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
            norm, U_hat = unit_rows(U)
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


def ig_alphas(steps: int) -> np.ndarray:
    """The ``steps`` midpoints ``(k + 1/2) / steps`` of ``[0, 1]`` at which integrated gradients
    evaluates the gradient (the midpoint rule: error ``O(1 / steps^2)`` where the model is smooth
    along the path, ``O(1 / steps)`` where a ReLU switches on it)."""
    return (np.arange(steps) + 0.5) / steps


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _edge_rows(decomposition, embeds: tuple[str, ...], delta: bool, steps: int, params,
               target_params, batch, leaves, idx: Array) -> Array:
    """``[len(idx), S + 1]``: per target row ``idx[r]`` of the flat target vector (every
    site's activations, then the centred logits), ``d target / d source x source`` for every
    entry of the flat source vector (``S``: the components' ``b`` at every position, then the
    input attributions; the last entry 0, for a source without a leaf). One VJP of the leaf
    forward, vmapped over one-hot cotangents. ``steps`` > 0: integrated gradients for the
    component sources, their gradient averaged over the component leaves scaled by
    :func:`ig_alphas` with the input leaves held at the prompt's (one VJP per step, in a
    ``lax.scan``); the input sources keep the gradient at the prompt.

    Compiled once per decomposition, embedding sites, ``delta`` and shapes: the prompt, the
    parameters and the leaves are arguments, so a new prompt of a length already seen (whatever
    its nodes) reuses the compiled pass; the caller picks the source nodes' entries."""
    f = leaf_forward(decomposition, params, target_params, batch, embeds, delta)
    sites = decomposition.site_names
    is_float = jnp.issubdtype(batch.dtype, jnp.floating)

    def flat_f(lv):
        acts, out = f(lv)
        centred = out - jnp.mean(out, axis=-1, keepdims=True)
        return jnp.concatenate([acts[n].reshape(-1) for n in sites] + [centred.reshape(-1)])

    def flat_sources(g, lv):
        parts = [(g["components"][n] * lv["components"][n]).reshape(-1) for n in sites]
        inp = jax.tree.map(lambda a, b: a * b, g["input"], lv["input"])
        if is_float:
            parts.append(inp["batch"].reshape(-1))
        elif embeds:
            parts.append(sum(jnp.sum(v, axis=-1) for v in inp.values()).reshape(-1))
        return jnp.concatenate(parts + [jnp.zeros((1,), jnp.float32)])  # [-1]: no leaf

    def grads(lv):  # d target_row / d leaves, per row of idx
        y, vjp = jax.vjp(flat_f, lv)
        return jax.vmap(lambda i: vjp(jax.nn.one_hot(i, y.shape[0], dtype=y.dtype))[0])(idx)

    g = grads(leaves)
    if steps:
        def step(acc, alpha):
            comps = jax.tree.map(lambda v: alpha.astype(v.dtype) * v, leaves["components"])
            gc = grads({"components": comps, "input": leaves["input"]})["components"]
            return jax.tree.map(jnp.add, acc, gc), None

        acc0 = jax.tree.map(jnp.zeros_like, g["components"])
        gc, _ = jax.lax.scan(step, acc0, jnp.asarray(ig_alphas(steps), jnp.float32))
        g = {"components": jax.tree.map(lambda a: a / steps, gc), "input": g["input"]}
    return jax.vmap(flat_sources, in_axes=(0, None))(g, leaves)


def edge_matrix(decomposition, embeds: tuple[str, ...], delta: bool, steps: int, params,
                target_params, batch, leaves, target_rows: np.ndarray, sources: np.ndarray, *,
                chunk: int, key: dict, partial: str | pathlib.Path | None = None,
                save_every_s: float = SAVE_EVERY_S,
                progress: Callable[[str], None] | None = None) -> np.ndarray:
    """``[R, S]`` edges (float32): row ``r`` is target row ``target_rows[r]`` of the flat target
    vector, column ``j`` source entry ``sources[j]`` (:func:`_edge_rows`), ``chunk`` target
    nodes per call.

    ``partial``: a file that keeps the rows done so far (written atomically at most every
    ``save_every_s`` seconds and on ``KeyboardInterrupt``, deleted when the matrix is done). A
    pass that finds one made for the same graph (``key``: what the graph depends on, e.g. its
    nodes and settings, compared exactly) continues after its rows; one made for another graph
    is said in ``progress`` and replaced."""
    R = len(target_rows)
    A = np.zeros((R, len(sources)), np.float32)
    start = 0
    meta = {"what": "attribution graph edges", "key": hashlib.sha1(
        repr(sorted(key.items())).encode()).hexdigest(), "shape": [R, len(sources)]}
    if partial is not None and pathlib.Path(partial).exists():
        try:
            streaming.check_resumable(streaming.read_meta(partial), meta, partial)
            saved, info = streaming.load_state(partial, {"A": A})
            A, start = np.array(saved["A"]), int(info["done"])
            if progress is not None:
                progress(f"edges: resuming at {start}/{R} target nodes (from {partial})")
        except (ValueError, OSError, KeyError) as e:
            if progress is not None:
                progress(f"edges: {partial} is not this graph's ({str(e)[:120]}); starting over")

    def save(done):
        streaming.save_state(partial, {"A": A}, dict(meta, done=done))

    last = time.monotonic()
    done = start
    try:
        for first in range(start, R, chunk):
            idx = target_rows[first:first + chunk]
            padded = np.pad(idx, (0, chunk - len(idx)), constant_values=idx[0])
            full = _edge_rows(decomposition, embeds, delta, steps, params, target_params,
                              batch, leaves, jnp.asarray(padded))
            A[first:first + len(idx)] = np.asarray(full)[:len(idx), sources]
            done = first + len(idx)
            if partial is not None and time.monotonic() - last >= save_every_s and done < R:
                save(done)
                last = time.monotonic()
            if progress is not None:
                progress(f"edges: {done}/{R} target nodes")
    except KeyboardInterrupt:
        if partial is not None and done > start:
            save(done)
        raise
    if partial is not None:
        pathlib.Path(partial).unlink(missing_ok=True)
    return A
