"""L3D (spdjax/methods/l3d.py, docs/guides/l3d.md) with the L3D paper's toy recipe: batch 32,
Adam lr 0.01 times 0.8 every 100 epochs, top-k 0.1, rank-1 subnetworks (X^2: rank 2), every
weight and bias decomposed, the first epoch(s) dense.

The argument is ``<variant>`` (spdjax.config.parse_variant). Variants:

* ``5-2`` (default): TMS 5-2 of the ``tms`` family (spdjax's own target, the one SPD and APD
  decompose), 5 subnetworks; data with all-zero samples, as SPD's;
* ``tms-5-2``, ``tmcs``, ``x2``: the L3D paper's toy models (family ``l3d_toys``: its data drop
  all-zero samples, its targets are trained on them): TMS 5-2 with 5 subnetworks; the circuit
  superposition model 10 -> 5 -> 10 with target ``x A``, 10 subnetworks; the GELU MLP
  ``x_i -> x_i^2`` (4 hidden layers of 5), 5 subnetworks of rank 2;
* ``resid-mlp-1``: the 1-layer ResidMLP of the ``resid_mlp`` family (the target SPD and APD
  decompose in configs/resid_mlp.py:1), 100 rank-1 subnetworks over ``mlp_in`` and ``mlp_out``,
  fresh samples every step (not in the L3D paper; the toy recipe otherwise).

The paper trains 1000 epochs of one fixed set of 1000 samples (``l3d.n_samples``; 32 steps of
32 an epoch, the last filled from the epoch's start: 32,000 steps), the learning rate decayed
once per 100 epochs (the reference's ``StepLR`` steps once per epoch);
``--config.l3d.n_samples=0`` draws fresh samples every step instead::

    python -m spdjax.main --config=configs/l3d.py:tmcs --workdir=workdir/l3d_tmcs
    python -m spdjax.main --config=configs/l3d.py:high-rank --config.l3d.rank=5 \\
        --workdir=workdir/l3d_high-rank_rank5
    python -m spdjax.main --config=configs/l3d.py --config.steps=3200 --workdir=/tmp/l3d

``--config.l3d.divergence=reference_mse`` trains with the reference code's gradient, the one
the paper's numbers came from (docs/guides/l3d.md).

Expected (RESULTS.md, "L3D"): the paper's draft reports relative reconstruction errors of 19%
(TMS 5-2), 6.4% (TMCS, A recovered at "r^2" 0.92, in fact r) and 0.32 (X^2); ours with both
gradients, and their runtimes, are in RESULTS.md. ``high-rank`` (RESULTS.md, "L3D on the
higher-rank toy"): with the reference code's gradient, 10 subnetworks of rank 1 or 5 find all 6
groups, recon 0.13-0.14 on the training set, 127-283 s a run on a shared 2-core CPU. Shared fields:
spdjax/config/base.py.
"""

from spdjax.config import base_config, parse_variant

N_SAMPLES = 1000  # the paper's fixed training set
EPOCH = 32  # steps per epoch of it at batch 32 (the reference loader's last batch has 8)
# variant -> (experiment, family variant, C, rank, dense warm-start epochs of the reference,
# fixed training set size: 0 = fresh samples)
_VARIANTS = {
    "5-2": ("tms", "5-2", 5, 1, 1, N_SAMPLES),
    "tms-5-2": ("l3d_toys", "tms-5-2", 5, 1, 1, N_SAMPLES),
    "tmcs": ("l3d_toys", "tmcs", 10, 1, 2, N_SAMPLES),
    "x2": ("l3d_toys", "x2", 5, 2, 11, N_SAMPLES),
    # The reference's high-rank script leaves warm-start-epochs at 0 (one dense epoch).
    "high-rank": ("l3d_toys", "high-rank", 10, 1, 1, N_SAMPLES),
    # Not in the paper: 1000 samples would show each of the 100 features ~10 times.
    "resid-mlp-1": ("resid_mlp", "1", 100, 1, 1, 0),
}


def get_config(arg: str = "5-2"):
    variant, _ = parse_variant(arg, "L3D", _VARIANTS)
    experiment, family_variant, C, rank, dense_epochs, n_samples = _VARIANTS[variant]
    c = base_config(experiment, family_variant)
    c.method = "l3d"
    c.C = C
    c.steps = 1000 * EPOCH  # the paper's 1000 epochs
    c.batch_size = 32
    c.lr = 0.01
    c.lr_schedule = "constant"  # times l3d.lr_decay every l3d.lr_decay_steps
    c.l3d.rank = rank
    c.l3d.n_samples = n_samples
    c.l3d.lr_decay_steps = 100 * EPOCH
    # The reference keeps top-k 0.999 for epochs 0..warm_start_epochs (its `<=`): TMS 0 -> 1
    # epoch, TMCS 1 -> 2, X^2 10 -> 11.
    c.l3d.dense_steps = dense_epochs * EPOCH
    c.eval_batch_size = 4096
    c.log_every = 320
    c.checkpoint_every = 3200
    if experiment == "tms":
        c.target_recipe.double_update = True  # as configs/tms.py: the same cached target
    return c
