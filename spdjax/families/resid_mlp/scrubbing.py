"""APD's causal-scrubbing check on ResidMLP (APD paper, section on the 1-layer model): do the
components that belong to the active features carry the computation?

For each example of the training distribution with at least one active feature, the forward is
run with ``n_ablate`` of the ``C`` components ablated (mask 0, every site):

* **scrubbed**: the ablated ones are drawn among the components *not* belonging to an active
  feature, so the responsible ones stay;
* **anti-scrubbed**: the components of the active features are ablated, plus a random draw of
  the others up to ``n_ablate``.

Each is compared, as MSE per example against the target's output, with the top-k forward (the
model as trained). A feature's component is the one with the largest attribution on the one-hot
input ``x_j = 1`` (the paper's ``x_42 = 1`` figure). The paper finds scrubbed MSEs close to the
top-k ones and anti-scrubbed MSEs far above (bimodal where components carry a second feature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from spdjax.analysis.plots import save_figure
from spdjax.families.resid_mlp.model import ResidMLPConfig, sample_inputs
from spdjax.methods import apd


def feature_components(d, params, target_params, cfg: ResidMLPConfig, *,
                       attribution: str = "target") -> np.ndarray:
    """``(n_features,)``: each feature's component, the argmax of its one-hot attributions."""
    one_hot = jnp.eye(cfg.n_features, dtype=jnp.float32)
    attr = apd.attributions(d, target_params, params, one_hot, source=attribution)
    return np.asarray(jnp.argmax(attr, axis=-1))


def scrub_masks(active: np.ndarray, owner: np.ndarray, C: int, n_ablate: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(scrubbed, anti)`` masks ``[batch, C]`` (1 keeps, 0 ablates) for the boolean ``active``
    features ``[batch, n_features]`` and each feature's component ``owner``. An example whose
    active features own more than ``n_ablate`` components has all of them ablated in the
    anti-scrubbed mask (more than ``n_ablate``); one with fewer than ``n_ablate`` others
    ablates all the others in the scrubbed mask."""
    if not 0 < n_ablate < C:
        raise ValueError(f"n_ablate must be in (0, C={C}), got {n_ablate}.")
    scrubbed, anti = np.ones((len(active), C)), np.ones((len(active), C))
    for b, row in enumerate(active):
        own = np.unique(owner[row])
        others = np.setdiff1d(np.arange(C), own)
        scrubbed[b, rng.choice(others, min(n_ablate, others.size), replace=False)] = 0
        extra = rng.choice(others, max(n_ablate - own.size, 0), replace=False)
        anti[b, np.concatenate([own, extra]).astype(int)] = 0
    return scrubbed, anti


def scrub_losses(d, params, target_params, cfg: ResidMLPConfig, key, *, topk: float,
                 n_examples: int = 2000, n_ablate: int | None = None,
                 attribution: str = "target") -> dict[str, np.ndarray]:
    """Per-example MSE against the target's output of the top-k, scrubbed and anti-scrubbed
    forwards, on ``n_examples`` training inputs with at least one active feature
    (``n_ablate``: default half of the components). The top-k mask is chosen on the whole
    sampled batch, empty examples included, as in training, and then restricted."""
    n_ablate = d.C // 2 if n_ablate is None else n_ablate
    k_x, k_mask = jax.random.split(key)
    x = sample_inputs(cfg, k_x, 4 * n_examples)
    topk_mask = apd.batch_topk(apd.attributions(d, target_params, params, x, source=attribution),
                               topk).astype(jnp.float32)
    keep = np.flatnonzero(np.any(np.asarray(x) != 0, axis=-1))[:n_examples]
    x, topk_mask = x[keep], topk_mask[keep]
    owner = feature_components(d, params, target_params, cfg, attribution=attribution)
    target_out, _ = d.clean_forward(target_params, x)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_mask)).ravel())
    scrubbed, anti = scrub_masks(np.asarray(x != 0), owner, d.C, n_ablate, rng)

    def mse(mask):
        out = d.forward(target_params, params, x, {n: jnp.asarray(mask, jnp.float32)
                                                   for n in d.site_names})
        return np.asarray(jnp.mean((out - target_out) ** 2, axis=-1))

    return {"topk": mse(topk_mask), "scrubbed": mse(scrubbed), "anti_scrubbed": mse(anti)}


def plot_scrub_histogram(losses: dict[str, np.ndarray], path, *, baseline: float | None = None,
                         dpi: int = 150):
    """The paper's histogram of per-example MSEs (log x axis), means dashed; ``baseline``: the
    monosemantic model's loss (grey)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    values = np.concatenate(list(losses.values()))
    lo = max(values[values > 0].min(), 1e-12)
    bins = np.logspace(np.log10(lo), np.log10(values.max() * 1.01), 60)
    colors = {"topk": "tab:blue", "scrubbed": "tab:pink", "anti_scrubbed": "tab:green"}
    for name, v in losses.items():
        ax.hist(np.maximum(v, lo), bins=bins, alpha=0.5, color=colors.get(name), label=name)
        ax.axvline(v.mean(), color=colors.get(name), ls="--", lw=1)
    if baseline is not None:
        ax.axvline(baseline, color="grey", lw=1.5, label="monosemantic model's loss (vs labels)")
    ax.set(xscale="log", xlabel="MSE vs target output (per example)", ylabel="examples",
           title="APD: ablating half the components, scrubbed vs anti-scrubbed")
    ax.legend()
    return save_figure(fig, path, dpi)
