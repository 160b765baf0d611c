"""Ground truth on the L3D paper's toy models, for any method's decomposition (through
:class:`~spdjax.methods.base.DecompositionView`'s ``component_weights`` only):

* ``output_purity`` / ``outputs_covered``: moving the weights along a component changes mainly
  one output (the paper's TMS and X^2 interventions): per component, the share of the mean
  squared output response ``d f / d delta`` (at ``delta = 0``, over sparse inputs) on its top
  output; the mean over components with any response, and how many distinct outputs are some
  component's top one;
* TMS: MMCS of the ``linear1`` components against ``W``'s feature rows (``mmcs``, signed
  cosines as for SPD and APD; ``mmcs_abs`` with ``|cos|``, for directions of arbitrary sign);
* TMCS: ``a_r2``, the paper's recovery of ``A``: per component, its input feature
  ``i* = argmax_i ||W_in^c[i, :]||`` and the traced coefficients ``a_hat = W_in^c[i*, :] W_out^c``;
  ``r^2`` (squared Pearson correlation) of all ``a_hat`` against ``A[i*, :]`` and ``a_r``, the
  correlation itself (the number the reference notebook prints as "r^2"), and how many
  distinct input features the components cover. Meaningful for methods whose components span both
  layers (L3D, APD);
* higher-rank: which input group each component reads (:func:`group_recovery`): its share of
  ``||W_in^c||^2`` on each group's rows, its top group, and ``groups_recovered``, how many groups
  have a component with at least :data:`GROUP_SHARE` of its input weight on them. Over every
  component here; with a method's per-component use (L3D's ``use_fraction``: never in the
  top-k = dead) over the used ones only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import metrics
from spdjax.families.l3d_toys.model import ToyConfig, sample_batch, toy_target

EVAL_SAMPLES = 2048
RESPONSE_FLOOR = 1e-6  # a component whose response is below this x the largest one is unused
# A component reads a group if this share of its squared input weight lies on the group's rows
# (a perfect one has 1; a random direction 1 / n_groups on average).
GROUP_SHARE = 0.9


def output_responses(decomp, params, target_params, cfg: ToyConfig) -> np.ndarray:
    """``[C, n_outputs]``: mean over sparse inputs of ``(d f_o / d delta)^2`` for
    ``W_l + delta P_{c,l}`` at every decomposed site ``l``."""
    target = toy_target(cfg)

    @jax.jit  # one program: op by op, sampling and the weights compile each op on its own
    def responses(params, target_params):
        x = sample_batch(cfg, jax.random.key(0), EVAL_SAMPLES)
        P = {n: jnp.asarray(decomp.component_weights(params, n)) for n in decomp.site_names}

        def site_fn(n, delta):
            s = target.sites[n]
            W = s.weight(target_params)
            b = None if s.bias is None else s.bias(target_params)
            return lambda a: a @ (W + delta[n]) + (0.0 if b is None else b)

        def out(delta):
            return target.forward(target_params, x, {n: site_fn(n, delta) for n in P})[0]

        zero = {n: jnp.zeros(p.shape[1:]) for n, p in P.items()}

        def one(c):
            _, d = jax.jvp(out, (zero,), ({n: p[c] for n, p in P.items()},))
            return jnp.mean(d**2, axis=0)

        C = next(iter(P.values())).shape[0]
        return jax.lax.map(one, jnp.arange(C))

    return np.asarray(responses(params, target_params))


def tmcs_recovery(decomp, params, target_params) -> dict:
    """``a_r2`` and ``features_covered`` (module docstring)."""
    W_in = np.asarray(decomp.component_weights(params, "linear1"))  # (C, 10, 5)
    W_out = np.asarray(decomp.component_weights(params, "linear2"))  # (C, 5, 10)
    A = np.asarray(target_params["task"]["A"])
    norms = np.linalg.norm(W_in, axis=2)  # (C, 10)
    keep = np.linalg.norm(W_in, axis=(1, 2)) * np.linalg.norm(W_out, axis=(1, 2)) > 1e-8
    feats = np.argmax(norms, axis=1)
    a_hat = np.stack([W_in[c, feats[c]] @ W_out[c] for c in range(W_in.shape[0])])
    a_true = A[feats]
    r = np.corrcoef(a_hat[keep].ravel(), a_true[keep].ravel())[0, 1]
    return {"a_r2": float(r**2), "a_r": float(r),
            "features_covered": int(len(set(feats[keep].tolist()))),
            "component_features": feats.tolist()}


def group_shares(W_in: np.ndarray, group_size: int) -> np.ndarray:
    """``[C, n_groups]``: each component's share of ``||W_in^c||^2`` on each group's rows.

    ``W_in``: ``[C, n_features, n_hidden]``, features in consecutive groups of ``group_size``.
    A component without input weight gets shares 0.
    """
    W_in = np.asarray(W_in, dtype=np.float64)
    C, n_features, _ = W_in.shape
    if group_size < 1 or n_features % group_size:
        raise ValueError(f"group_size must divide the {n_features} input features; got "
                         f"{group_size}.")
    per_group = (W_in**2).sum(axis=2).reshape(C, n_features // group_size, group_size).sum(2)
    total = per_group.sum(axis=1, keepdims=True)
    return np.where(total > 0, per_group / np.where(total > 0, total, 1.0), 0.0)


def group_recovery(W_in: np.ndarray, group_size: int, use=None) -> dict:
    """Which input group each component reads (module docstring).

    ``use``: ``[C]`` how often each component is used (e.g. L3D's ``use_fraction``); components
    with ``use == 0`` are dead and left out of the group counts. None: every component counts.
    Returns ``component_groups`` / ``component_group_share`` (per component: top group, its
    share), ``group_components`` (per group: how many counted components have it as their top
    group with a share of at least :data:`GROUP_SHARE`), ``group_best_share`` (per group: the
    largest share a counted component puts on it), ``groups_recovered`` (groups with at least
    one such component), ``groups_single`` (groups with exactly one) and ``components_counted``.
    """
    shares = group_shares(W_in, group_size)
    C, n_groups = shares.shape
    counted = np.ones(C, bool) if use is None else np.asarray(use) > 0
    if counted.shape != (C,):
        raise ValueError(f"use must have one entry per component ({C}); got shape "
                         f"{np.shape(use)}.")
    top = shares.argmax(axis=1)
    top_share = shares.max(axis=1)
    reads = counted & (top_share >= GROUP_SHARE)
    components = np.bincount(top[reads], minlength=n_groups)
    best = np.where(counted[:, None], shares, 0.0).max(axis=0)
    return {"component_groups": top.tolist(), "component_group_share": top_share.tolist(),
            "group_components": components.tolist(), "group_best_share": best.tolist(),
            "groups_recovered": int((components > 0).sum()),
            "groups_single": int((components == 1).sum()),
            "components_counted": int(counted.sum())}


def evaluate(decomp, params, target_params, cfg: ToyConfig, *, steps: int | None = None) -> dict:
    """The module docstring's metrics."""
    del steps
    resp = output_responses(decomp, params, target_params, cfg)
    total = resp.sum(axis=1)
    used = total > RESPONSE_FLOOR * total.max()
    purity = resp.max(axis=1) / np.where(total > 0, total, 1.0)
    out = {"output_purity": float(purity[used].mean()),
           "outputs_covered": int(len(set(np.argmax(resp[used], axis=1).tolist()))),
           "component_top_output": np.argmax(resp, axis=1).tolist()}
    if cfg.kind == "tms":
        W = np.asarray(target_params["linear1"]["kernel"])
        mm = metrics.mmcs_ml2r_components(W, decomp.component_weights(params, "linear1"))
        # L3D's directions have an arbitrary sign: mmcs_abs takes max_c |cos| instead
        out.update(mmcs=mm["mmcs"], mmcs_std=mm["mmcs_std"],
                   mmcs_abs=float(np.abs(mm["cos"]).max(axis=0).mean()))
    if cfg.kind == "tmcs":
        out.update(tmcs_recovery(decomp, params, target_params))
    if cfg.kind == "high-rank":
        out.update(group_recovery(decomp.component_weights(params, "linear1"), cfg.group_size))
    return out
