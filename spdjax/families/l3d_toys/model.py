"""The L3D paper's toy models (Chrisman, Bushnaq, Sharkey 2025, "Toy models"), as targets with
their data and a target recipe:

* ``tms-5-2``: TMS 5 -> 2, tied: ``relu(x W Wᵀ + b)`` (sites ``linear1``, ``linear2``);
* ``tmcs``: the toy model of circuit superposition 10 -> 5 -> 10, ``relu(x W_in W_out + b)``
  trained on ``y = x A`` with ``A ~ U[0, 3]^(10 x 10)`` (kept in the params as
  ``task/A``; the forward does not read it);
* ``x2``: a GELU MLP 5 -> 5 -> 5 -> 5 -> 5 -> 5 (4 hidden layers of 5, the paper's text; its
  script uses width 10) trained on ``y_i = x_i^2`` (sites ``layer_0`` .. ``layer_4``);
* ``high-rank``: the paper's higher-rank circuits, TMCS's architecture 30 -> 10 -> 30 on
  ``y = x A`` (``A ~ U[0, 3]^(30 x 30)``) whose inputs come in 6 groups of :data:`GROUP_SIZE` = 5
  consecutive features that are always active together, so each group's circuit has rank 5.
  The sizes are the reference's (github briannachrisman/eigenestimation,
  ``scripts/3_high_rank_circuits/train_high_rank.sh``: 30 features, hidden 10, 30 outputs,
  ``correlation_set_size`` 5, and its figure of the decomposition draws 30 -> 10 -> 30
  networks); the paper's text says 25 inputs in 5 groups.

Data (the reference's ``GenerateTMSInputs``): each feature active with probability 0.05, values
``U[0, 1)`` (``x2``: times a random sign), and **no all-zero samples** (the reference discards
them; :func:`nonzero_sparse`). ``high-rank`` (the reference's ``GenerateCorrelatedData``): each
*group* active with probability 0.05, its 5 values drawn ``U[0, 1)`` independently.
Targets: AdamW (lr 1e-3, weight decay 0.01) on the output MSE. The paper trains 1000 epochs of
10k samples at batch 32; here ``steps`` batches of ``batch_size`` fresh samples (RESULTS.md,
"L3D", gives what we used).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.target import Site, Target, from_function, weight_at
from spdjax.training import targets as target_training

Array = jax.Array
KINDS = ("tms", "tmcs", "high-rank", "x2")
GROUP_SIZE = 5  # high-rank: consecutive input features that are active together


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """One of the L3D paper's toy models and its target recipe."""

    kind: str  # tms | tmcs | high-rank | x2
    n_features: int
    n_hidden: int
    n_outputs: int
    n_layers: int = 1  # x2: hidden layers
    feature_probability: float = 0.05
    signed: bool = False  # x2: inputs in (-1, 1)
    steps: int = 20_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown L3D toy kind {self.kind!r}; expected one of {KINDS}.")
        if self.n_features % self.group_size:
            raise ValueError(f"The {self.kind} toy's n_features ({self.n_features}) must be a "
                             f"multiple of its group size {self.group_size}.")

    @property
    def variant(self) -> str:
        return {"tms": "tms-5-2", "tmcs": "tmcs", "high-rank": "high-rank", "x2": "x2"}[self.kind]

    @property
    def group_size(self) -> int:
        """Consecutive input features that are active together (1: independent features)."""
        return GROUP_SIZE if self.kind == "high-rank" else 1

    @property
    def n_groups(self) -> int:
        return self.n_features // self.group_size


VARIANTS = {
    "tms-5-2": ToyConfig("tms", 5, 2, 5),
    "tmcs": ToyConfig("tmcs", 10, 5, 10),
    "x2": ToyConfig("x2", 5, 5, 5, n_layers=4, signed=True),
    "high-rank": ToyConfig("high-rank", 30, 10, 30),
}


def nonzero_sparse(key: Array, batch_size: int, n: int, p: float) -> Array:
    """``[batch, n]`` Bernoulli(p) masks conditioned on at least one 1, exactly: the first 1 is
    at ``j`` with probability ``p (1-p)^j / (1 - (1-p)^n)``, the entries after it are free."""
    kj, kr = jax.random.split(key)
    logits = jnp.log(p) + jnp.arange(n) * jnp.log1p(-p)
    first = jax.random.categorical(kj, logits, shape=(batch_size,))
    rest = jax.random.bernoulli(kr, p, (batch_size, n))
    pos = jnp.arange(n)[None, :]
    return jnp.where(pos < first[:, None], False,
                     jnp.where(pos == first[:, None], True, rest))


# Jitted (cfg and batch_size static): called eagerly (the fixed training set, the evaluation
# batch, the target's training), op-by-op dispatch compiles each of its ops on its own, seconds
# on CPU. The draws are the same bits as without jit (tests/families/test_l3d_toys.py).
@functools.partial(jax.jit, static_argnums=(0, 2))
def sample_batch(cfg: ToyConfig, key: Array, batch_size: int) -> Array:
    """``[batch, n_features]``: the reference's inputs (no all-zero samples; ``high-rank``:
    whole groups active or inactive)."""
    km, kv, ks = jax.random.split(key, 3)
    mask = nonzero_sparse(km, batch_size, cfg.n_groups, cfg.feature_probability)
    if cfg.group_size > 1:
        mask = jnp.repeat(mask, cfg.group_size, axis=1)
    x = jax.random.uniform(kv, (batch_size, cfg.n_features)) * mask
    if cfg.signed:
        x = x * jnp.where(jax.random.bernoulli(ks, 0.5, x.shape), 1.0, -1.0)
    return x


def _layer_names(cfg: ToyConfig) -> list[str]:
    return [f"layer_{i}" for i in range(cfg.n_layers + 1)]


def toy_target(cfg: ToyConfig) -> Target:
    """The model as a :class:`~spdjax.core.target.Target`."""
    if cfg.kind == "x2":
        names = _layer_names(cfg)
        dims = [cfg.n_features] + [cfg.n_hidden] * cfg.n_layers + [cfg.n_outputs]

        def mlp(params, x, hooks):
            h = x
            for i, n in enumerate(names):
                W, b = params[n]["kernel"], params[n]["bias"]
                h = hooks(n, h, lambda a, W=W, b=b: a @ W + b)
                if i < len(names) - 1:
                    h = jax.nn.gelu(h, approximate=False)
            return h

        sites = [Site(n, "linear", dims[i], dims[i + 1], weight_at((n, "kernel")),
                      weight_at((n, "bias"))) for i, n in enumerate(names)]
        return from_function(mlp, sites)

    tied = cfg.kind == "tms"

    def fn(params, x, hooks):
        W1 = params["linear1"]["kernel"]
        W2 = W1.T if tied else params["linear2"]["kernel"]
        b = params["linear2"]["bias"]
        h = hooks("linear1", x, lambda a: a @ W1)
        return jax.nn.relu(hooks("linear2", h, lambda a: a @ W2 + b))

    w2 = (weight_at(("linear1", "kernel"), transpose=True) if tied
          else weight_at(("linear2", "kernel")))
    sites = [Site("linear1", "linear", cfg.n_features, cfg.n_hidden,
                  weight_at(("linear1", "kernel"))),
             Site("linear2", "linear", cfg.n_hidden, cfg.n_outputs, w2,
                  weight_at(("linear2", "bias")))]
    return from_function(fn, sites)


def init_params(key: Array, cfg: ToyConfig) -> tuple[dict, dict]:
    """``(trainable, frozen)`` as the reference initialises them: TMS xavier-normal ``W``, zero
    bias; TMCS and higher-rank ``N(0, 1)`` weights, zero bias, ``A ~ U[0, 3]`` (frozen); X^2
    kaiming-normal weights (fan-in), biases ``U(0.01, 1)``."""
    ks = jax.random.split(key, 2 * (cfg.n_layers + 2))
    if cfg.kind == "tms":
        std = np.sqrt(2.0 / (cfg.n_features + cfg.n_hidden))
        return {"linear1": {"kernel": jax.random.normal(ks[0], (cfg.n_features, cfg.n_hidden))
                            * std},
                "linear2": {"bias": jnp.zeros(cfg.n_features)}}, {}
    if cfg.kind in ("tmcs", "high-rank"):
        A = jax.random.uniform(ks[2], (cfg.n_features, cfg.n_outputs), minval=0.0, maxval=3.0)
        return ({"linear1": {"kernel": jax.random.normal(ks[0], (cfg.n_features, cfg.n_hidden))},
                 "linear2": {"kernel": jax.random.normal(ks[1], (cfg.n_hidden, cfg.n_outputs)),
                             "bias": jnp.zeros(cfg.n_outputs)}},
                {"task": {"A": A}})
    dims = [cfg.n_features] + [cfg.n_hidden] * cfg.n_layers + [cfg.n_outputs]
    params = {}
    for i, n in enumerate(_layer_names(cfg)):
        params[n] = {"kernel": jax.random.normal(ks[2 * i], (dims[i], dims[i + 1]))
                     * np.sqrt(2.0 / dims[i]),
                     "bias": jax.random.uniform(ks[2 * i + 1], (dims[i + 1],), minval=0.01,
                                                maxval=1.0)}
    return params, {}


def labels(cfg: ToyConfig, params: dict, x: Array) -> Array:
    """The task: ``x`` (TMS), ``x A`` (TMCS, higher-rank), ``x^2`` (X^2)."""
    if cfg.kind == "tms":
        return x
    if cfg.kind in ("tmcs", "high-rank"):
        return x @ params["task"]["A"]
    return x**2


def make_trainer(cfg: ToyConfig) -> target_training.TargetTrainer:
    """AdamW on the output MSE against :func:`labels`."""
    target = toy_target(cfg)

    def loss(trainable, frozen, x):
        params = {**trainable, **frozen}
        return jnp.mean((target(params, x) - labels(cfg, params, x)) ** 2)

    return target_training.TargetTrainer(
        init=lambda key: init_params(key, cfg), loss=loss,
        sample=lambda key: sample_batch(cfg, key, cfg.batch_size),
        optimizer=optax.adamw(cfg.lr, weight_decay=cfg.weight_decay))


def train_target(cfg: ToyConfig, seed: int) -> tuple[dict, dict]:
    """Trains the toy target from ``seed``; ``(params, info)``."""
    return target_training.train(make_trainer, cfg, cfg.steps, seed,
                                 what=f"L3D toy {cfg.variant}", chunk_steps=2000)


def sites(cfg: ToyConfig, config) -> dict[str, int]:
    """Every site (L3D's C subnetworks span them all)."""
    return {"*": config.C}
