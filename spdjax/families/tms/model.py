"""Toy Model of Superposition (TMS) targets: model, training recipe and feature check (the
target cache is :mod:`spdjax.families.tms.cache`).

The model (SPD paper, "Toy Model of Superposition" and appendix "Training details and
hyperparameters"), in Flax layout with ``W`` of shape
``(n_features, n_hidden)``::

    h   = x @ W                       # site "linear1", no bias
    h   = h @ I                       # site "hidden_<k>", +ID variants only (frozen identity)
    out = ReLU(h @ W.T + b)           # site "linear2", weight tied to linear1's transpose

Trained with AdamW (lr 5e-3 constant, weight decay 0.01) on ``mean((x - out)^2)`` over sparse
features ``U[0, 1)`` kept with probability 0.05. As in the PyTorch reference, whose two usages of
``W`` are separate Parameters sharing storage, each usage gets its own Adam update (own moments,
own weight decay) and both land on ``W``: two updates per step (``double_update=True``, the
default). ``double_update=False`` is one AdamW update on the summed gradient of both usages (the
recipe of spdjax before 0.3; its targets are cached under ``tms_<variant>_single-update_seed<s>``).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.data import sparse_features
from spdjax.training import targets as target_training
from spdjax.core.target import Site, Target, from_function, weight_at

Array = jax.Array
log = logging.getLogger("spdjax")

TMS_TIES = {"linear2": "linear1"}  # pass as ``decompose(..., ties=TMS_TIES)``
PROBE_VALUE = 0.75  # one-hot input value of the reference's end-of-training diagnostic
# A feature is dead when the reference's diagnostic would call it "poorly preserved",
# |out - 0.75| >= 0.3. Measured with this recipe: learned features read back 0.69-0.77 (5-2) and
# 0.59-0.64 (40-10, whose interference costs more); unlearned ones read back exactly 0 (ReLU of a
# negative bias). The reference's "well preserved" bound of 0.1 would reject every 40-10 feature.
DEFAULT_TOL = 0.3


@dataclasses.dataclass(frozen=True)
class TMSConfig:
    """A TMS architecture and its training recipe."""

    n_features: int
    n_hidden: int
    n_hidden_layers: int = 0  # frozen identity layers between linear1 and linear2 (+ID: 1)
    steps: int = 10_000
    batch_size: int = 1024
    lr: float = 5e-3
    weight_decay: float = 0.01
    feature_probability: float = 0.05
    init_bias_to_zero: bool = False
    double_update: bool = True  # the reference's two Adam updates of the tied W per step

    @property
    def variant(self) -> str:
        """Name used in cache files, e.g. ``"5-2-id"``."""
        suffix = "-id" if self.n_hidden_layers == 1 else f"-id{self.n_hidden_layers}"
        return f"{self.n_features}-{self.n_hidden}" + (suffix if self.n_hidden_layers else "")


TMS_VARIANTS = {
    "5-2": TMSConfig(5, 2, batch_size=1024, init_bias_to_zero=False),
    "5-2-id": TMSConfig(5, 2, 1, batch_size=1024, init_bias_to_zero=False),
    "40-10": TMSConfig(40, 10, batch_size=8192, init_bias_to_zero=True),
    "40-10-id": TMSConfig(40, 10, 1, batch_size=8192, init_bias_to_zero=True),
}


def get_tms_config(name_or_cfg: str | TMSConfig) -> TMSConfig:
    """A :class:`TMSConfig` from a variant name in :data:`TMS_VARIANTS` (or passed through)."""
    if isinstance(name_or_cfg, TMSConfig):
        return name_or_cfg
    if name_or_cfg not in TMS_VARIANTS:
        raise ValueError(f"Unknown TMS variant {name_or_cfg!r}; valid: {sorted(TMS_VARIANTS)}.")
    return TMS_VARIANTS[name_or_cfg]


def _hidden_names(cfg: TMSConfig) -> list[str]:
    return [f"hidden_{k}" for k in range(cfg.n_hidden_layers)]


def site_roles(cfg: TMSConfig) -> dict[str, str]:
    """``{site: role}``: ``"features"`` (one subcomponent per feature) or ``"identity"`` (the
    frozen +ID layer: ``n_hidden`` dense subcomponents)."""
    return {"linear1": "features", **{n: "identity" for n in _hidden_names(cfg)},
            "linear2": "features"}


def tms_target(cfg: TMSConfig) -> Target:
    """The TMS model as a :class:`~spdjax.core.target.Target`; input/output
    ``[..., n_features]``."""
    nf, nh = cfg.n_features, cfg.n_hidden
    hidden = _hidden_names(cfg)

    def fn(params, x, hooks):
        W = params["linear1"]["kernel"]
        h = hooks("linear1", x, lambda a: a @ W)
        for name in hidden:
            H = params[name]["kernel"]
            h = hooks(name, h, lambda a, H=H: a @ H)
        b = params["linear2"]["bias"]
        return jax.nn.relu(hooks("linear2", h, lambda a: a @ W.T + b))

    sites = [Site("linear1", "linear", nf, nh, weight=weight_at(("linear1", "kernel")))]
    sites += [Site(n, "linear", nh, nh, weight=weight_at((n, "kernel"))) for n in hidden]
    sites.append(
        Site(
            "linear2",
            "linear",
            nh,
            nf,
            weight=weight_at(("linear1", "kernel"), transpose=True),
            bias=weight_at(("linear2", "bias")),
        )
    )
    return from_function(fn, sites)


def init_tms_params(key: Array, cfg: TMSConfig) -> dict:
    """torch ``nn.Linear`` default init: ``W ~ U(±1/√n_features)``, ``b ~ U(±1/√n_hidden)``."""
    kw, kb = jax.random.split(key)
    nf, nh = cfg.n_features, cfg.n_hidden
    bw, bb = float(nf) ** -0.5, float(nh) ** -0.5
    W = jax.random.uniform(kw, (nf, nh), jnp.float32, -bw, bw)
    b = jnp.zeros((nf,), jnp.float32)
    if not cfg.init_bias_to_zero:
        b = jax.random.uniform(kb, (nf,), jnp.float32, -bb, bb)
    params = {"linear1": {"kernel": W}, "linear2": {"bias": b}}
    for name in _hidden_names(cfg):
        params[name] = {"kernel": jnp.eye(nh, dtype=jnp.float32)}
    return params


_TIED_COPY = "linear2_tied_kernel"  # double_update only: linear2's own copy of linear1's kernel


def sample_batch(cfg: TMSConfig, key: Array, batch_size: int) -> Array:
    """``[batch_size, n_features]`` sparse features ``U[0, 1)``: the target's and SPD's data."""
    return sparse_features(key, batch_size, cfg.n_features,
                           feature_probability=cfg.feature_probability, value_range=(0.0, 1.0))


def make_trainer(cfg: TMSConfig) -> target_training.TargetTrainer:
    """The paper's target recipe: AdamW on ``mean((x - out)^2)``, identity layers frozen."""
    target = tms_target(cfg)

    def init(key):
        params = init_tms_params(key, cfg)
        trainable = {"linear1": params["linear1"], "linear2": params["linear2"]}
        if cfg.double_update:
            trainable[_TIED_COPY] = params["linear1"]["kernel"]
        return trainable, {n: params[n] for n in _hidden_names(cfg)}

    def loss(trainable, frozen, x):
        replace = {}
        if cfg.double_update:  # linear2 uses its own copy of W, with its own Adam state
            W2, b = trainable[_TIED_COPY], trainable["linear2"]["bias"]
            replace = {"linear2": lambda a: a @ W2.T + b}
        out, _ = target.forward({**trainable, **frozen}, x, replace)
        return jnp.mean((x - out) ** 2)

    def apply_twice(trainable, updates):
        """torch's AdamW on two Parameters sharing W's storage, one after the other: linear1's
        step (decay, then its Adam move), then linear2's, whose decay sees the moved W."""
        W, decay = trainable["linear1"]["kernel"], cfg.lr * cfg.weight_decay
        W1 = W + updates["linear1"]["kernel"]  # = W (1 - decay) - lr a1
        W2 = W1 * (1.0 - decay) + (updates[_TIED_COPY] + decay * W)  # (... + decay W) = -lr a2
        new = optax.apply_updates(trainable, updates)
        return {**new, "linear1": {"kernel": W2}, _TIED_COPY: W2}

    def finish(trainable, frozen):
        return {"linear1": trainable["linear1"], "linear2": trainable["linear2"], **frozen}

    return target_training.TargetTrainer(
        init=init, loss=loss, sample=lambda key: sample_batch(cfg, key, cfg.batch_size),
        optimizer=optax.adamw(cfg.lr, weight_decay=cfg.weight_decay),
        apply=apply_twice if cfg.double_update else optax.apply_updates, finish=finish)


def train_tms_target(cfg: TMSConfig, seed: int, *, chunk_steps: int = 1000) -> tuple[dict, dict]:
    """Trains a TMS target from ``seed``; returns ``(params, info)`` (see
    :func:`spdjax.training.targets.train`)."""
    return target_training.train(make_trainer, cfg, cfg.steps, seed, what=f"TMS {cfg.variant}",
                                 chunk_steps=chunk_steps)


def feature_report(params: dict, cfg: TMSConfig) -> np.ndarray:
    """``[n_features]``: each feature's output on its own one-hot input of value 0.75."""
    out = tms_target(cfg)(params, PROBE_VALUE * jnp.eye(cfg.n_features, dtype=jnp.float32))
    return np.asarray(jnp.diagonal(out))


def dead_features(params: dict, cfg: TMSConfig, *, tol: float = DEFAULT_TOL) -> list[int]:
    """Features whose one-hot-0.75 output is not within ``tol`` of 0.75 (empty: all learned)."""
    report = feature_report(params, cfg)
    return [int(i) for i in np.flatnonzero(~(np.abs(report - PROBE_VALUE) < tol))]


def check_all_features(params: dict, cfg: TMSConfig, *, tol: float = DEFAULT_TOL) -> bool:
    """True if every feature is represented (see :func:`dead_features`)."""
    return not dead_features(params, cfg, tol=tol)


def train_checked_target(
    cfg: TMSConfig, seed: int, *, max_tries: int = 20, tol: float = DEFAULT_TOL
) -> tuple[dict, dict]:
    """Trains from seeds ``seed, seed + 1000, seed + 2000, ...`` until all features are learned.

    With the reference recipe most 5-2 seeds get stuck with 3 or 4 features (1 to 3 of 10 seeds
    learn all 5 here), so a failed try moves on to the next seed; the stride of 1000 keeps the
    retries of nearby requested seeds disjoint, and 20 tries leave well under 1% to chance.
    ``info`` additionally holds ``tried_seeds`` and ``feature_report``.
    """
    tried, failures = [], []
    for k in range(max_tries):
        s = seed + 1000 * k
        tried.append(s)
        params, info = train_tms_target(cfg, s)
        dead = dead_features(params, cfg, tol=tol)
        if not dead:
            info.update(tried_seeds=tried, feature_report=feature_report(params, cfg).tolist())
            return params, info
        failures.append(f"seed {s}: dead {dead}")
        log.info("TMS %s: seed %d left features %s unlearned; trying the next seed.",
                 cfg.variant, s, dead)
    raise RuntimeError(
        f"TMS {cfg.variant}: no seed learned all {cfg.n_features} features "
        f"(tol {tol} around {PROBE_VALUE}). Tried: {'; '.join(failures)}. "
        "Raise max_tries or start from another seed."
    )


def sites(cfg: TMSConfig, config) -> dict[str, int]:
    """Every site, with the run's ``config.C`` subcomponents each."""
    return {name: config.C for name in site_roles(cfg)}
