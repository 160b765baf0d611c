"""The fields every run config has (:func:`base_config`), the later reference's recipe, and the
one grammar of a config file's argument (:func:`parse_variant`)."""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

import ml_collections


def base_config(experiment: str, variant: str) -> ml_collections.ConfigDict:
    """The fields every run has, with the paper-era SPD defaults (one comment per field)."""
    c = ml_collections.ConfigDict()
    c.experiment = experiment  # target family (spdjax.families)
    c.variant = variant  # target variant within the family
    c.method = "spd"  # decomposition method (spdjax.methods.METHODS)
    c.seed = 0  # run seed: component/CI init, data and masks, evaluation batch
    c.target_seed = 0  # seed for training the target (cached per seed)
    c.target_steps = 0  # target training steps; 0 = the family recipe's
    c.target_cache_dir = ""  # where trained targets are cached; "" = ~/.cache/spdjax/targets
    # Fields of the family's target recipe to change (e.g. TMS double_update); a config file
    # lists the ones its users may set, so --config.target_recipe.<field>=... works for those.
    c.target_recipe = ml_collections.ConfigDict()

    c.steps = 40_000  # optimizer steps
    c.batch_size = 4096  # examples per step
    c.lr = 1e-3  # peak learning rate (of each optimizer group whose own lr is 0)
    # constant | linear (paper-era, 1 - t/T) | linear_head (later, ends at final_frac)
    # | cosine (quarter period, paper) | cosine_half (later reference)
    c.lr_schedule = "cosine"
    c.lr_warmup_frac = 0.0  # fraction of steps of linear warm-up from 0
    c.lr_final_frac = 0.0  # final lr fraction for linear / cosine_half

    c.C = 20  # subcomponents per decomposed site
    # per site: mlp (paper) | vector_mlp | shared_mlp; one network for all sites (core/ci_global):
    # global_mlp | global_transformer (VPD) | chunkwise_transformer
    c.ci_fn = "mlp"
    c.ci_hidden = (16,)  # CI-function hidden widths (mlp, vector_mlp, shared_mlp, global_mlp)
    # Options of the transformer CI functions (VPD: d_model 2048, layers 8, heads 16, ff 8192,
    # bidirectional); a CI function ignores the options it does not take.
    c.ci_options = ml_collections.ConfigDict({
        "d_model": 64,  # width of the residual stream
        "layers": 2,  # transformer blocks
        "heads": 4,  # attention heads (d_model / heads must be even: RoPE)
        "ff": 0,  # hidden width of each block's MLP; 0 = 4 * d_model
        "causal": False,  # True: position t attends to positions <= t only (VPD paper: False)
        "rope_base": 10000.0,  # RoPE frequency base
        "sites_per_chunk": 0,  # chunkwise_transformer: consecutive sites per transformer (>= 1)
        "shard_trunk": False,  # True: attention heads and MLP units on the model axis too
    })
    c.sigmoid = "leaky_hard"  # leaky_hard (paper) | leaky_hard_clamped | hard | ...
    # eps > 0: sigma_lo sees (1 + eps) r - eps U[0,1) in the objective (its losses and logged
    # ci_l0 too, as the reference's CI-L0): the later reference's binomial-sampling quirk, which
    # it pairs with sampling="binomial" (there eps = 0.05).
    c.ci_lower_noise = 0.0
    c.init = "paper"  # component init: paper | gaussian | svd
    # Tied sites (TMS linear2 = linear1ᵀ): "aliased" keeps two copies with two Adam updates per
    # step (the reference, torch Parameters sharing storage); "shared" has one pair, one update.
    c.tie_mode = "aliased"
    # False: decompose tied sites as independent ones, each with its own factors (VPD's toy
    # configs, goodfire-ai/param-decomp: "the decomposition is untied, the target is tied").
    c.tie_sites = True
    c.faithfulness_warmup_steps = 0  # later reference: 200 (AdamW lr 0.01, wd 0.1)
    c.faithfulness_warmup_lr = 0.01
    c.faithfulness_warmup_weight_decay = 0.1
    c.init_candidates = 1  # > 1: best-of-K init by loss (spdjax/training/init_selection.py)
    c.init_select_steps = 0  # steps each init candidate trains before the choice

    # Loss terms: name -> {coeff, **options} (spdjax.losses.LOSSES).
    c.losses = ml_collections.ConfigDict({
        "faithfulness": {"coeff": 1.0},
        "stochastic_recon": {"coeff": 1.0, "n_samples": 1, "sampling": "continuous"},
        "stochastic_recon_layerwise": {"coeff": 1.0, "n_samples": 1, "sampling": "continuous"},
        "importance_minimality": {"coeff": 3e-3, "pnorm": 1.0},
    })

    # Clip the gradient's L2 norm of the factors / of the CI functions before Adam (0 = off;
    # the later reference's grad_clip_norm_components / grad_clip_norm_ci_fns).
    c.grad_clip_norm_components = 0.0
    c.grad_clip_norm_ci = 0.0
    # Optimizer per parameter group (spdjax/methods/optimizers.py): name (adam | adamw | sgd |
    # muon), peak lr (0 = config.lr; the run's lr_schedule scaled to it) and the optimizer's
    # keyword options (e.g. --config.optimizer.components.options="{'beta': 0.9}"). Groups
    # with equal entries share one optimizer: the default is the paper's Adam over everything.
    c.optimizer = ml_collections.ConfigDict({
        "components": {"name": "adam", "lr": 0.0, "options": {}},
        "ci": {"name": "adam", "lr": 0.0, "options": {}},
    })
    # APD (config.method = "apd"; spdjax/methods/apd.py): C = config.C components spanning every
    # site, batch top-k fraction per example, per-site rank (0 = min(d_in, d_out)), gradient
    # attributions from the "target" (reference code) or the "apd" model, loss coefficients.
    c.apd = ml_collections.ConfigDict({
        "topk": 0.211, "rank": 0, "attribution": "target", "schatten_p": 1.0,
        "faithfulness_coeff": 1.0, "topk_recon_coeff": 1.0, "schatten_coeff": 0.7,
        "act_recon_coeff": 0.0, "act_sites": "*mlp_out",  # inputs of these sites (hidden acts)
        "unit_norm": False, "init": "xavier_normal", "init_scale": 1.0,
        # fans of the init: "component" (each component's matrix) | "torch" (the reference's
        # whole [1, C, d_in, m] tensor: fan-in C d_in m)
        "init_fans": "component",
        # "topk" (the paper's) | "lp": no top-k; minimality sum_c |A_c|^lp_p, Schatten weighted
        # by it (the APD paper's appendix alternative)
        "formulation": "topk", "lp_sparsity_coeff": 1.0, "lp_p": 1.0,
    })
    # L3D (config.method = "l3d"; spdjax/methods/l3d.py, docs/guides/l3d.md): C = config.C
    # subnetworks spanning every site; defaults are the L3D paper's toy recipe (bs 32, lr 0.01).
    c.l3d = ml_collections.ConfigDict({
        "topk": 0.1,  # batch top-k fraction of |z| over samples and subnetworks
        "rank": 1,  # Tucker rank of each subnetwork's weight tensors (biases: rank 1)
        "biases": True,  # decompose the sites' biases too (the paper: every parameter tensor)
        "divergence": "mse",  # D: mse (toys) | kl (logits) | reference_mse (L3D code's gradient)
        "reference": "sample",  # y_r: sample (another sample's output, the paper's) | mean
        "normalisation": "reference",  # decoder renormalisation: reference (code's) | unit
        "lr_decay": 0.8,  # lr x lr_decay every lr_decay_steps (the reference's StepLR)
        "lr_decay_steps": 3200,  # 100 epochs of 1000 samples at batch 32
        "dense_steps": 32,  # first steps with top-k 0.999 (the reference's warm-start epochs)
        # 0: fresh samples every step; N: epochs over one fixed set of N samples (the paper: 1000)
        "n_samples": 0,
    })
    # Terms computed only by the final evaluation, reported as eval_loss/<name>: {name: options}
    # (no coeff), e.g. {"stochastic_hidden_acts_recon": {}, "pgd_recon": {"n_steps": 20,
    # "step_size": 0.1}} (the later reference's eval metrics).
    c.eval_losses = ml_collections.ConfigDict()
    c.microbatches = 1  # split each batch into chunks, average grads (same gradient)
    # Steps per jitted call (a scan; log_every / checkpoint_every must be multiples of it): > 1
    # keeps small models from being dispatch-bound on an accelerator.
    c.steps_per_call = 1
    # Matmul precision in the train step: highest (float32, the default) | tensorfloat32 |
    # bfloat16 (one bf16 pass, float32 accumulation) | default (the platform's: TF32 on GPU).
    c.matmul_precision = "highest"
    # Cost at language-model size (docs/guides/language_models.md, "Memory and precision"):
    # batch rows per chunk of every output divergence (reconstruction and PGD terms), each
    # chunk's masked forward rematerialised, so [chunk, seq, vocab] logits live at a time
    # (0 = the whole batch at once; the same value)
    c.output_chunk = 0
    c.remat_ci = False  # recompute the CI functions in the backward pass (less memory, same values)
    # float32 | bfloat16: dtype of the forwards and CI functions (params, CI, losses: float32)
    c.compute_dtype = "float32"
    c.mesh_model = 1  # devices along the component axis C (the rest go to the data axis)
    # Train this many decompositions of the target as one vmapped program, seeds seed ..
    # seed + ensemble - 1 (spdjax/training/ensemble.py); each member equals its seed's run alone.
    c.ensemble = 1
    # How the members share the program: vmap (one batched step) | map (in turn, lax.map) |
    # auto (vmap on GPU/TPU, map on CPU, where vmap measured slower).
    c.ensemble_mode = "auto"
    # A coefficient sweep in the same program: "dotted.key=v1,v2,..." (a float field, e.g.
    # "losses.importance_minimality.coeff=1e-3,3e-3"); the members are every (value, seed) pair.
    c.ensemble_sweep = ""
    c.log_every = 500  # steps between metric lines / progress reports
    c.checkpoint_every = 5000  # steps between checkpoints (and always at the end)
    c.eval_batch_size = 20_000  # examples for final CI-L0 / alive counts / loss terms
    c.eval_microbatches = 1  # evaluate the eval batch in this many chunks (bounds its memory)
    # The evaluation suite (spdjax/analysis/suite.py, docs/guides/evaluation.md) in summary.json
    # "suite": output loss per masking, PGD ladder, L0 per site/layer, alive counts, CI figures.
    c.eval_suite = False
    c.eval_pgd_ladder = (20, 40, 80, 160, 320)  # PGD step counts of the suite (VPD's table)
    c.eval_pgd_step_size = 0.1  # the suite's PGD signed-ascent step
    c.figures = True  # draw the figures at the end (python -m spdjax.cli.plot redraws them)
    c.tensorboard = False  # also write TensorBoard events to workdir/tensorboard (tensorboardX)
    c.wandb_project = ""  # also log to this Weights & Biases project ("" = off; needs wandb)
    # Stop when the logged total loss exceeds this many times the run's lowest logged total
    # (a jump or a steady climb); 0 disables. Non-finite losses or params always stop a run.
    c.divergence_factor = 1e3
    c.l0_threshold = 0.1  # CI above this counts as active (L0, alive)
    return c


def later_reference(c: ml_collections.ConfigDict, losses: Mapping[str, Any], *,
                    warmup_weight_decay: float = 0.1) -> ml_collections.ConfigDict:
    """Switches ``c`` to the toy recipe of the later reference implementation (goodfire-ai/spd: its
    toy YAML configs): gaussian init with a 200-step faithfulness warm-up, the clamped lower-leaky
    sigmoid, ``losses`` (its stochastic terms with the delta component instead of faithfulness)
    and its eval metrics."""
    c.init = "gaussian"
    c.faithfulness_warmup_steps = 200
    c.faithfulness_warmup_lr = 0.01
    c.faithfulness_warmup_weight_decay = warmup_weight_decay
    c.sigmoid = "leaky_hard_clamped"
    c.losses = ml_collections.ConfigDict(dict(losses))
    c.eval_losses = ml_collections.ConfigDict({
        "stochastic_hidden_acts_recon": {"delta": True},
        "pgd_recon": {"n_steps": 20, "step_size": 0.1, "delta": True},
    })
    return c


def parse_variant(arg: str, family: str, variants: Collection[str],
                  modifiers: Sequence[str] = (), *,
                  max_modifiers: int | None = None) -> tuple[str, list[str]]:
    """``"<variant>[+<modifier>]..."`` (a config file's ``get_config`` argument, e.g. TMS's
    ``5-2-id+head+pgd``) -> ``(variant, [modifier, ...])``, modifiers in the order given.

    ``family`` names the config in errors; ``variants`` and ``modifiers`` are the accepted names
    (``modifiers`` without their ``+``), ``max_modifiers`` how many one argument may have (None:
    any number). An unknown name fails as ``Unknown <family> variant|modifier X in 'arg';
    expected one of [...]``. Which modifiers combine is the config file's business.
    """
    variant, *given = arg.split("+")
    options = [f"+{m}" for m in modifiers]
    if variant not in variants:
        then = f", optionally followed by {' / '.join(options)}" if options else ""
        raise ValueError(f"Unknown {family} variant {variant!r} in {arg!r}; expected one of "
                         f"{sorted(variants)}{then}.")
    for name in given:
        if name not in modifiers:
            raise ValueError(f"Unknown {family} modifier {'+' + name!r} in {arg!r}; expected "
                             f"one of {options}.")
    if max_modifiers is not None and len(given) > max_modifiers:
        raise ValueError(f"Too many {family} modifiers in {arg!r}: at most {max_modifiers} of "
                         f"{options}.")
    return variant, given
