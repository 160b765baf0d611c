"""Validation of an attribution graph on its prompt: KL(target || the graph's subcomponents
alone) at the output positions, and the worst KL that signed-gradient ascent on the masks of
every subcomponent *outside* the graph finds (graph nodes held at 1). The method:
:mod:`spdjax.analysis.graphs`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import interventions as iv
from spdjax.analysis.graph_compute import COMPONENT, OUTPUT, Graph, Progress
from spdjax.core.masks import SiteMask

Array = jax.Array


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
    graph-only. ``delta=True``: every forward, the PGD ones included, adds the delta component
    at mask 1."""
    target_out, _, lower = iv.prompt_ci(decomposition, params, target_params, batch)
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
            decomposition, params, target_params, batch, in_graph, target_out, pos,
            steps=pgd_steps, step_size=pgd_step_size, restarts=pgd_restarts, rounds=rounds,
            key=jax.random.key(0) if key is None else key, delta=delta, progress=progress)
        out.update(kl_pgd_worst=worst, kl_pgd=finals, pgd_steps=pgd_steps,
                   pgd_step_size=pgd_step_size)
    return out


def adversarial_kl(decomposition, params, target_params, batch, held: Mapping[str, Array],
                   target_out, positions, *, steps: int, step_size: float, restarts: int,
                   rounds: int, key: Array, delta: bool = False,
                   progress: Progress | None = None) -> tuple[float, list[float]]:
    """The worst KL(target || masked) at ``positions`` over masks ``held + (1 - held) s``,
    ``s`` in [0, 1] chosen by signed ascent (``s <- clip(s + step_size sign(dKL/ds), 0, 1)``,
    the ascent of :func:`spdjax.losses.adversarial.pgd_sources`; one source per subcomponent
    and position; ``delta=True`` adds the delta component at mask 1, not attacked):
    ``(max over restarts, each restart's final)``. Restart 0 starts from ``s = 0``, the others
    from ``U[0, 1)`` draws of ``fold_in(key, r)``."""
    if not (isinstance(steps, int) and steps > 0 and isinstance(restarts, int) and restarts > 0):
        raise ValueError(f"PGD needs steps > 0 and restarts > 0, got {steps!r}, {restarts!r}.")
    if not step_size > 0:
        raise ValueError(f"PGD needs step_size > 0, got {step_size!r}.")
    rounds = max(1, min(rounds, steps))
    held = {n: jnp.asarray(h, jnp.float32) for n, h in held.items()}

    def kl_of(s):
        masks = {}
        for n, h in held.items():
            m = h + (1.0 - h) * s[n]
            masks[n] = SiteMask(component=m, delta=jnp.ones(m.shape[:-1], m.dtype)) if delta \
                else m
        out = decomposition.forward(target_params, params, batch, masks)
        return iv.kl_at(out, target_out, positions)

    def make_round(n):
        def ascend(s, _):
            g = jax.grad(kl_of)(s)
            return jax.tree.map(lambda a, d: jnp.clip(a + step_size * jnp.sign(d), 0.0, 1.0),
                                s, g), None

        return jax.jit(lambda s: jax.lax.scan(ascend, s, None, length=n)[0])

    kl_jit = jax.jit(kl_of)
    per = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    fns = {n: make_round(n) for n in set(per)}
    finals = []
    for r in range(restarts):
        k = jax.random.fold_in(key, r)
        s = {n: (jnp.zeros_like(h) if r == 0 else jax.random.uniform(
            jax.random.fold_in(k, i), h.shape)) for i, (n, h) in enumerate(held.items())}
        done = 0
        for n in per:
            s = fns[n](s)
            done += n
            if progress is not None:
                progress(f"PGD restart {r + 1}/{restarts}: step {done}/{steps}, "
                         f"KL {float(kl_jit(s)):.4g}")
        finals.append(float(kl_jit(s)))
    return max(finals), finals
