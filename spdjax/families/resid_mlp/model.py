"""ResidMLP targets ("compressed computation"): model, training recipe and naive baseline (the
target cache is :mod:`spdjax.families.resid_mlp.cache`).

The model (SPD paper, "Toy Model of Compressed Computation" and appendix "Training details and
hyperparameters"), in Flax layout::

    r   = x @ W_E                                  # W_E (n_features, d_embed), fixed, not a site
    r   = r + act(r @ W_in_i) @ W_out_i            # sites "layers_<i>/mlp_in", "layers_<i>/mlp_out"
    out = r @ W_E.T                                # unembedding W_U = W_E^T, not a site

``W_E`` has N(0, 1) rows scaled to unit norm and is frozen; no biases. Trained with AdamW
(lr 3e-3, quarter-period cosine decay, weight decay 0.01, batch 2048) on ``mean((out - y)^2)``
with ``y = x + act(x)``, features ``U[-1, 1)`` kept with probability 0.01.

The naive monosemantic baseline (APD paper, "Toy Model of Compressed Computation") spends one
neuron on each of the first ``d_mlp * n_layers`` features: ``out_f = x_f + act(x_f)`` there and
``out_f = x_f`` elsewhere (plus, with the target's ``W_E``, the interference the target shares).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.data import sparse_features
from spdjax.training import targets as target_training
from spdjax.losses.divergences import mse  # the ``readoff`` loss: mean of (out - y)^2
from spdjax.core.target import Mapped, Site, Target, from_function, weight_at
from spdjax.training.schedules import SCHEDULES, make_schedule

Array = jax.Array

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=False)}
EVAL_BATCHES = 10  # the reference averages its final loss over 10 batches


@dataclasses.dataclass(frozen=True)
class ResidMLPConfig:
    """A ResidMLP architecture and its training recipe."""

    n_features: int
    d_embed: int
    d_mlp: int  # neurons per layer
    n_layers: int
    act: str = "relu"
    steps: int = 0  # 0: the reference's 1000 for 1 and 2 layers, 10 000 for 3 or more
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"  # quarter period, lr * cos(pi/2 * step / (steps - 1))
    feature_probability: float = 0.01
    value_range: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"Unknown act {self.act!r}; expected one of {sorted(ACTIVATIONS)}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; valid: {sorted(SCHEDULES)}.")
        if min(self.n_features, self.d_embed, self.d_mlp, self.n_layers) < 1:
            raise ValueError(f"All sizes must be positive: {self}.")
        if self.steps == 0:
            object.__setattr__(self, "steps", 10_000 if self.n_layers >= 3 else 1000)

    @property
    def variant(self) -> str:
        """Name used in cache files, e.g. ``"100-1000-50x1"``."""
        return f"{self.n_features}-{self.d_embed}-{self.d_mlp}x{self.n_layers}"


RESID_VARIANTS = {
    "1": ResidMLPConfig(100, 1000, 50, 1),
    "2": ResidMLPConfig(100, 1000, 25, 2),
    "3": ResidMLPConfig(102, 1000, 17, 3),
}


def get_resid_config(name_or_cfg: str | ResidMLPConfig) -> ResidMLPConfig:
    """A :class:`ResidMLPConfig` from a name in :data:`RESID_VARIANTS` (or passed through)."""
    if isinstance(name_or_cfg, ResidMLPConfig):
        return name_or_cfg
    if name_or_cfg not in RESID_VARIANTS:
        valid = sorted(RESID_VARIANTS)
        raise ValueError(f"Unknown ResidMLP variant {name_or_cfg!r}; valid: {valid}.")
    return RESID_VARIANTS[name_or_cfg]


def resid_mlp_target(cfg: ResidMLPConfig, *, fold: bool = True) -> Target:
    """The ResidMLP as a :class:`~spdjax.core.target.Target`; ``[..., n_features]`` in and out.

    ``fold=True`` (default) never forms the ``d_embed``-wide residual stream: it is kept as the
    narrow pieces written into it (:class:`~spdjax.core.target.Mapped` in sum form: ``x @ W_E + h_0
    @ W_out_0 + ...``, each ``mlp_out`` but the last returning its output factored), every
    ``mlp_in`` reads it piece by piece (``x @ (W_E @ V) + (acts_0 * m) @ (U_0 @ V) + ...``), and
    the last ``mlp_out`` is read only through the unembedding (``Mapped(h, post=W_E.T)``). The
    same numbers up to float rounding; 9.7 -> 1.8 GFLOP per ResidMLP 1 step, 2 layers
    benchmarks/README.md. ``False``: the plain forward (site inputs ``[..., d_embed]``).
    """
    act = ACTIVATIONS[cfg.act]
    last = cfg.n_layers - 1

    def through(a, W):  # a @ W (a Mapped value folds W in; a wide sum may come back plain)
        return a.matmul(W) if isinstance(a, Mapped) else a @ W

    def fn(params, x, hooks):
        W_E = params["W_E"]
        r = Mapped(x, pre=W_E) if fold else x @ W_E
        for i in range(cfg.n_layers):
            W_in, W_out = (params[f"layers_{i}"][m]["kernel"] for m in ("mlp_in", "mlp_out"))
            name = f"layers_{i}"
            h = act(hooks(f"{name}/mlp_in", r, lambda a, W=W_in: through(a, W)))
            if fold and i == last:  # read only through the unembedding
                y = hooks(f"{name}/mlp_out", Mapped(h, post=W_E.T),
                          lambda a, W=W_out: through(a, W))
                return through(r, W_E.T) + y
            h = Mapped(h, factored=True) if fold else h
            r = r + hooks(f"{name}/mlp_out", h, lambda a, W=W_out: through(a, W))
        return r @ W_E.T

    shapes = {"mlp_in": (cfg.d_embed, cfg.d_mlp), "mlp_out": (cfg.d_mlp, cfg.d_embed)}
    sites = [Site(f"layers_{i}/{m}", "linear", *dims, weight_at((f"layers_{i}", m, "kernel")))
             for i in range(cfg.n_layers) for m, dims in shapes.items()]
    return from_function(fn, sites)


def site_roles(cfg: ResidMLPConfig) -> dict[str, str]:
    """``{site: role}`` in forward order: ``mlp_in`` should have one subcomponent per feature
    (``"features"``), ``mlp_out`` one dense block of ``d_mlp`` (``"dense"``)."""
    return {f"layers_{i}/{m}": role for i in range(cfg.n_layers)
            for m, role in (("mlp_in", "features"), ("mlp_out", "dense"))}


def init_resid_mlp_params(key: Array, cfg: ResidMLPConfig) -> dict:
    """``W_E``: N(0, 1) rows scaled to unit norm; MLPs: torch ``nn.Linear`` ``U(±1/√fan_in)``."""
    k_embed, k_layers = jax.random.split(key)
    W_E = jax.random.normal(k_embed, (cfg.n_features, cfg.d_embed), jnp.float32)

    def linear(k, d_in, d_out):
        bound = float(d_in) ** -0.5
        return {"kernel": jax.random.uniform(k, (d_in, d_out), jnp.float32, -bound, bound)}

    params: dict = {"W_E": W_E / jnp.linalg.norm(W_E, axis=-1, keepdims=True)}
    for i in range(cfg.n_layers):
        k_in, k_out = jax.random.split(jax.random.fold_in(k_layers, i))
        params[f"layers_{i}"] = {"mlp_in": linear(k_in, cfg.d_embed, cfg.d_mlp),
                                 "mlp_out": linear(k_out, cfg.d_mlp, cfg.d_embed)}
    return params


def sample_inputs(cfg: ResidMLPConfig, key: Array, batch_size: int) -> Array:
    """``[batch_size, n_features]`` sparse features ``U[-1, 1)``: the target's and SPD's inputs."""
    return sparse_features(key, batch_size, cfg.n_features,
                           feature_probability=cfg.feature_probability, value_range=cfg.value_range)


def sample_batch(key: Array, cfg: ResidMLPConfig, batch_size: int | None = None):
    """``(x, y)``, both ``[batch, n_features]``, with labels ``y = x + act(x)`` (κ = 1)."""
    x = sample_inputs(cfg, key, batch_size or cfg.batch_size)
    return x, x + ACTIVATIONS[cfg.act](x)


def make_trainer(cfg: ResidMLPConfig) -> target_training.TargetTrainer:
    """The reference recipe: AdamW with a quarter-cosine schedule on the ``readoff`` loss; ``W_E``
    frozen. The plain forward (``fold=False``): cached targets stay bit-identical to earlier
    ones."""
    target = resid_mlp_target(cfg, fold=False)

    def init(key):
        params = init_resid_mlp_params(key, cfg)
        W_E = params.pop("W_E")
        return params, {"W_E": W_E}

    def finish(trainable, frozen):
        return {"W_E": frozen["W_E"], **trainable}

    return target_training.TargetTrainer(
        init=init, loss=lambda p, frozen, batch: mse(target({**p, **frozen}, batch[0]), batch[1]),
        sample=lambda key: sample_batch(key, cfg),
        optimizer=optax.adamw(make_schedule(cfg.schedule, cfg.lr, cfg.steps),
                              weight_decay=cfg.weight_decay),
        finish=finish)


def evaluate_loss(params: dict | None, cfg: ResidMLPConfig, key: Array, *,
                  n_batches: int = EVAL_BATCHES) -> float:
    """Mean loss over ``n_batches`` fresh batches from ``fold_in(key, b)``; None: ideal baseline."""
    model = (functools.partial(ideal_baseline, cfg=cfg) if params is None
             else functools.partial(resid_mlp_target(cfg, fold=False), params))
    batches = (sample_batch(jax.random.fold_in(key, b), cfg) for b in range(n_batches))
    return float(jnp.mean(jnp.stack([mse(model(x), y) for x, y in batches])))


def train_resid_mlp_target(
    cfg: ResidMLPConfig, seed: int, *, chunk_steps: int = 1000
) -> tuple[dict, dict]:
    """Trains a ResidMLP target from ``seed``; returns ``(params, info)``.

    ``info``: ``seed``, ``losses`` (one mean per chunk), ``seconds`` (compilation included) and
    :func:`target_report` on 10 fresh batches (it replaces ``final_loss``).
    """
    params, info = target_training.train(make_trainer, cfg, cfg.steps, seed,
                                         what=f"ResidMLP {cfg.variant}", chunk_steps=chunk_steps)
    info = {k: info[k] for k in ("seed", "losses", "seconds", "eval_key")}
    return params, {**info, **target_report(params, cfg, key=info.pop("eval_key"))}


def naive_baseline_params(W_E: Array, cfg: ResidMLPConfig) -> dict:
    """The monosemantic model with the target's ``W_E``: neuron ``n`` computes feature ``n`` only.

    Neuron ``j`` of layer ``i`` serves feature ``n = i * d_mlp + j``. It writes ``w_n`` with
    ``W_E w_n = e_n`` (``pinv(W_E)``, plus a null-space part that later layers' reads are
    orthogonal to) and reads ``q_n`` with ``W_E q_n = e_n``, orthogonal to earlier writes. So
    ``out = x W_E W_E^T + act(x) * served`` exactly: besides the unserved features, the only
    error is the residual stream's embedding interference, which the target shares.
    """
    nf, de, dm = cfg.n_features, cfg.d_embed, cfg.d_mlp
    if nf + dm * (cfg.n_layers - 1) > de:
        raise ValueError(f"The monosemantic baseline needs n_features + d_mlp * (n_layers - 1) <= "
                         f"d_embed; got {nf} + {dm} * {cfg.n_layers - 1} > {de}.")
    W_E = jnp.asarray(W_E, jnp.float32)
    P = jnp.linalg.pinv(W_E)  # [d_embed, n_features], W_E @ P = I
    null = jnp.linalg.svd(W_E, full_matrices=True)[2][nf:]  # [d_embed - nf, d_embed]: W_E ⟂ null
    params: dict = {"W_E": W_E}
    written = jnp.zeros((0, de), jnp.float32)
    for i in range(cfg.n_layers):
        feats = np.arange(i * dm, min((i + 1) * dm, nf))  # empty once the features run out
        Q = jnp.linalg.pinv(jnp.concatenate([W_E, written]))[:, feats]  # [d_embed, k]
        W = P[:, feats].T + (null[feats] if i < cfg.n_layers - 1 else 0.0)  # [k, d_embed]
        written = jnp.concatenate([written, W])
        params[f"layers_{i}"] = {
            "mlp_in": {"kernel": jnp.zeros((de, dm), jnp.float32).at[:, : feats.size].set(Q)},
            "mlp_out": {"kernel": jnp.zeros((dm, de), jnp.float32).at[: feats.size].set(W)},
        }
    return params


def ideal_baseline(x: Array, cfg: ResidMLPConfig) -> Array:
    """The naive baseline without embedding interference: ``x + act(x)`` on served features."""
    served = jnp.arange(cfg.n_features) < cfg.d_mlp * cfg.n_layers
    return x + jnp.where(served, ACTIVATIONS[cfg.act](x), 0.0)


def naive_baseline_loss(cfg: ResidMLPConfig, W_E: Array | None = None, *, key: Array,
                        n_batches: int = EVAL_BATCHES) -> float:
    """Loss on :func:`evaluate_loss`'s batches of :func:`naive_baseline_params` with ``W_E``, or
    without it of :func:`ideal_baseline`: ``(1 - d_mlp n_layers / n_features) p E[act(x)^2]``."""
    params = None if W_E is None else naive_baseline_params(W_E, cfg)
    return evaluate_loss(params, cfg, key, n_batches=n_batches)


def target_report(params: dict, cfg: ResidMLPConfig, *, key: Array | None = None,
                  n_batches: int = EVAL_BATCHES) -> dict[str, float]:
    """Target loss vs the naive baseline with the target's ``W_E`` (NaN where it cannot be built)
    and the ideal one, on the same fresh batches."""
    key = jax.random.key(12345) if key is None else key
    fits = cfg.n_features + cfg.d_mlp * (cfg.n_layers - 1) <= cfg.d_embed
    W_E, kw = params["W_E"], {"key": key, "n_batches": n_batches}
    return {"final_loss": evaluate_loss(params, cfg, **kw),
            "baseline_loss": naive_baseline_loss(cfg, W_E, **kw) if fits else float("nan"),
            "ideal_baseline_loss": naive_baseline_loss(cfg, **kw)}


def sites(cfg: ResidMLPConfig, config) -> dict[str, int]:
    """Every ``mlp_in`` and ``mlp_out``, with the run's ``config.C`` subcomponents each."""
    return {"layers_*/mlp_in": config.C, "layers_*/mlp_out": config.C}
