"""Toy Model of Superposition (TMS) targets: model, training recipe, feature check and cache.

The model (reference spec sections 6.2 and 9.1), in Flax layout with ``W`` of shape
``(n_features, n_hidden)``::

    h   = x @ W                       # site "linear1", no bias
    h   = h @ I                       # site "hidden_<k>", +ID variants only (frozen identity)
    out = ReLU(h @ W.T + b)           # site "linear2", weight tied to linear1's transpose

Trained with AdamW (lr 5e-3 constant, weight decay 0.01) on ``mean((x - out)^2)`` over sparse
features ``U[0, 1)`` kept with probability 0.05. The tied gradient of ``W`` is the sum of both
usages; ``double_update=True`` instead mimics the PyTorch reference, where the two usages are
separate Parameters sharing storage, so each gets its own Adam update and its own weight decay.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax import target_cache
from spdjax.data import sparse_features
from spdjax.target import Site, Target, from_function, weight_at

Array = jax.Array

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
    double_update: bool = False  # mimic torch's two Adam updates of the tied weight

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


def tms_target(cfg: TMSConfig) -> Target:
    """The TMS model as a :class:`~spdjax.target.Target`; input/output ``[..., n_features]``."""
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


@functools.lru_cache(maxsize=None)
def _make_chunk(cfg: TMSConfig, n_steps: int):
    """Jitted ``(trainable, frozen, opt_state, root_key, start) -> (..., losses[n_steps])``.

    Cached per recipe so that retries with other seeds do not recompile.
    """
    target = tms_target(cfg)
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)

    def loss_fn(trainable, frozen, x):
        replace = {}
        if cfg.double_update:  # linear2 uses its own copy of W, with its own Adam state
            W2, b = trainable[_TIED_COPY], trainable["linear2"]["bias"]
            replace = {"linear2": lambda a: a @ W2.T + b}
        out, _ = target.forward({**trainable, **frozen}, x, replace)
        return jnp.mean((x - out) ** 2)

    def step(carry, i):
        trainable, frozen, opt_state, root = carry
        x = sparse_features(
            jax.random.fold_in(root, i),
            cfg.batch_size,
            cfg.n_features,
            feature_probability=cfg.feature_probability,
            value_range=(0.0, 1.0),
        )
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if cfg.double_update:  # both updates land on the one shared tensor
            W = trainable["linear1"]["kernel"] + updates[_TIED_COPY]
            trainable = {**trainable, "linear1": {"kernel": W}, _TIED_COPY: W}
        return (trainable, frozen, opt_state, root), loss

    @jax.jit
    def chunk(trainable, frozen, opt_state, root, start):
        xs = start + jnp.arange(n_steps, dtype=jnp.int32)
        carry, losses = jax.lax.scan(step, (trainable, frozen, opt_state, root), xs)
        return carry[0], carry[2], losses

    return opt, chunk


def train_tms_target(
    cfg: TMSConfig, seed: int, *, chunk_steps: int = 1000, verbose: bool = False
) -> tuple[dict, dict]:
    """Trains a TMS target from ``seed``; returns ``(params, info)``.

    ``info`` holds ``seed``, ``final_loss`` (mean over the last chunk), ``losses`` (one mean per
    chunk) and ``seconds``. Step ``i`` draws its batch from ``fold_in(data_key, i)``.
    """
    t0 = time.perf_counter()
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = init_tms_params(k_init, cfg)
    frozen = {n: params[n] for n in _hidden_names(cfg)}
    trainable = {"linear1": params["linear1"], "linear2": params["linear2"]}
    if cfg.double_update:
        trainable[_TIED_COPY] = params["linear1"]["kernel"]
    chunk_steps = min(chunk_steps, cfg.steps)
    opt, chunk = _make_chunk(cfg, chunk_steps)
    opt_state = opt.init(trainable)
    losses, done = [], 0
    while done < cfg.steps:
        if cfg.steps - done < chunk_steps:  # the remainder compiles once more
            _, chunk = _make_chunk(cfg, cfg.steps - done)
        trainable, opt_state, ls = chunk(trainable, frozen, opt_state, k_data, jnp.int32(done))
        done += ls.shape[0]
        losses.append(float(jnp.mean(ls)))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"TMS {cfg.variant} seed {seed}: loss {losses[-1]} at {done}.")
        if verbose:
            print(json.dumps({"variant": cfg.variant, "step": done, "loss": losses[-1]}))
    params = {"linear1": trainable["linear1"], "linear2": trainable["linear2"], **frozen}
    info = {"seed": seed, "final_loss": losses[-1], "losses": losses}
    info["seconds"] = time.perf_counter() - t0
    return params, info


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
        print(f"TMS {cfg.variant}: seed {s} left features {dead} unlearned; trying next seed.")
    raise RuntimeError(
        f"TMS {cfg.variant}: no seed learned all {cfg.n_features} features "
        f"(tol {tol} around {PROBE_VALUE}). Tried: {'; '.join(failures)}. "
        "Raise max_tries or start from another seed."
    )


def load_or_train_target(
    cfg_name_or_cfg: str | TMSConfig, seed: int, cache_dir: str | os.PathLike, **train_kwargs
) -> dict:
    """Trained TMS params, from ``cache_dir/tms_<variant>_seed<seed>.npz`` if its recipe matches.

    Otherwise trains with :func:`train_checked_target` and writes the ``.npz`` plus a ``.json``
    sidecar (recipe, seed actually used, final loss, feature report).
    """
    cfg = get_tms_config(cfg_name_or_cfg)
    stem = os.path.join(os.fspath(cache_dir), f"tms_{cfg.variant}_seed{seed}")
    recipe = dataclasses.asdict(cfg)
    cached = target_cache.load(stem, recipe, "TMS")
    if cached is not None:
        return cached
    params, info = train_checked_target(cfg, seed, **train_kwargs)
    meta = {"recipe": recipe, "requested_seed": seed, "trained_seed": info["seed"]}
    meta.update({k: info[k] for k in ("tried_seeds", "final_loss", "feature_report", "seconds")})
    target_cache.save(stem, params, meta)
    return params


def main(argv: list[str] | None = None) -> None:
    """``python -m spdjax.tms --variant=5-2 --seed=0``: train (or load) a target, plot it."""
    import argparse

    from spdjax import figures

    parser = argparse.ArgumentParser(description="Train a TMS target with the paper's recipe.")
    parser.add_argument("--variant", default="5-2", choices=sorted(TMS_VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(target_cache.default_cache_dir()))
    args = parser.parse_args(argv)
    cfg = get_tms_config(args.variant)
    params = load_or_train_target(cfg, args.seed, args.cache_dir)
    stem = os.path.join(args.cache_dir, f"tms_{cfg.variant}_seed{args.seed}")
    meta = target_cache.read_meta(stem)
    report = np.round(feature_report(params, cfg), 3).tolist()
    print(f"TMS {cfg.variant}: trained seed {meta['trained_seed']} (tried {meta['tried_seeds']}), "
          f"loss {meta['final_loss']:.3e}; one-hot 0.75 read-back per feature: {report}")
    path = figures.plot_tms_vectors(np.asarray(params["linear1"]["kernel"]), stem + ".png",
                                    title=f"TMS {cfg.variant} target")
    print(f"Saved {stem}.npz and {path}")


if __name__ == "__main__":
    main()
