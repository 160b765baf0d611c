"""SPD on transformers: the induction-head toy (``ih``, default) and a small byte-level LM.

The argument is ``<variant>[+vpd|+answer|+answer_ci|+circuit]`` (the grammar of every config file,
``<variant>[+<modifier>]...``, spdjax.config.parse_variant). ``+vpd`` switches to VPD's recipe
(spdjax/config/vpd.py: the VPD library's canonical 4-layer LM config scaled to these models): a
causal transformer CI function over every site's input, Muon, smooth-L0 importance with nested
EMA frequency minimality, nonlinearity locality on the byte LM's MLP neurons and attention heads,
the pooled merged stochastic-subset + persistent-PGD term, faithfulness 1000 and the evaluation
suite; its steps and batch are the variant's. ``ih+answer`` reconstructs only the output the
toy was trained on, KL at the last position (``kl_answer``), with importance minimality 3e-2
(the induction-head ground truth, docs/guides/language_models.md); ``ih+answer_ci`` adds the
CI-masked reconstruction (KL at the last position, coefficient 1). ``ih+circuit`` is the recipe
that recovers the induction circuit (all seven ground-truth criteria; RESULTS.md, "Induction-head
ground truth"): ``+vpd`` with answer-only KL, the components initialised from the target's
singular pieces (``init="svd"``), smooth-L0 at 100x with the answer position counted 64 times,
Delta-L2 at 1, 5x the lr, 2000 steps (values and reasons at ``_circuit``).

Targets are trained by our own command (``python -m spdjax.cli.target --family=lm --variant=ih``;
also trained and cached by the first run below). Every site is found by tracing the model
(spdjax/core/tracing.py): ``ih`` decomposes all 8 attention projections
(``blocks_<i>/attn/{q,k,v,out}``, 16 x 16, C 32 each); ``bytes`` also the MLPs
(``blocks_<i>/mlp_in``, ``mlp_out``; C 96 each, ranks <= 64).
The output divergence is KL(target || masked) over the vocabulary at every position (the SPD
paper's choice for language models, section "Method"; the later reference implementation,
goodfire-ai/spd, uses it for its LMs).

    python -m spdjax.main --config=configs/lm.py:ih --workdir=workdir/lm_ih
    python -m spdjax.main --config=configs/lm.py:bytes --workdir=workdir/lm_bytes
    python -m spdjax.main --config=configs/lm.py:llama_2x128 --workdir=workdir/lm_llama_2x128

``llama_2x128`` / ``llama_4x192`` (Llama-style targets on BPE tokens of English text,
spdjax/families/lm/llama.py; ``--config.target_recipe.text_files='a/**/*.txt,b.md'`` trains on
your own files) decompose every attention and MLP matrix (12 / 24 sites; C 192 / 288) with
stochastic and routed-subset recon (KL). A llama_2x128 step (batch 8 x 128 tokens) took
9-10 CPU-seconds (about 20 s of wall time on 2 cores shared with ~15 other busy processes), so
1200 steps are about 2-2.5 h on 2 otherwise idle cores. llama_4x192's 400 steps were scaled by
its ~2.7x FLOPs per token; measured since (benchmarks/README.md, "The 4 x 192 Llama at full
size"), a step takes ~31 s beside one other job, its per-subcomponent ``vector_mlp`` CI
functions holding 128M parameters (34x the components), while ``llama_4x192+vpd`` (one causal
transformer CI function) takes ~1.6 s.

Outputs as for the toy models (summary.json, metrics.jsonl, figures/ with CI per site and
position; top_contexts.html for the byte LM). Numbers and timings: RESULTS.md. Shared fields:
spdjax/config/base.py.
"""

from spdjax.config import base_config, parse_variant, vpd

# variant -> (C, steps, batch, lr, importance-minimality coeff, p, CI function, hidden width)
# ih: per-subcomponent CI MLPs on inner activations (the paper's); bytes: one MLP per site from
# the site's input (vector_mlp, the reference's choice for LMs), cheaper at C = 96.
_VARIANTS = {
    "ih": (32, 10_000, 64, 1e-3, 3e-3, 1.0, "mlp", 16),
    "bytes": (96, 5000, 8, 1e-3, 1e-3, 1.0, "vector_mlp", 64),
    # Llama-style targets on English text (spdjax/families/lm/llama.py): C 1.5 x the largest rank
    # (d_model), one vector_mlp per site; steps sized to ~2.5 h on 2 CPU cores (docstring).
    "llama_2x128": (192, 1200, 8, 1e-3, 1e-3, 1.0, "vector_mlp", 64),
    "llama_4x192": (288, 400, 8, 1e-3, 1e-3, 1.0, "vector_mlp", 64),
}


_ANSWER_IMP_COEFF = 3e-2  # ih+answer: importance minimality against the answer-only recon


def get_config(arg: str = "ih"):
    arg, modifiers = parse_variant(arg, "LM", _VARIANTS, ["vpd", "answer", "answer_ci", "circuit"],
                                   max_modifiers=1)
    if modifiers and modifiers[0] in ("answer", "answer_ci", "circuit") and arg != "ih":
        raise ValueError(f"+{modifiers[0]} is for the induction toy (ih) only, got {arg!r}: the "
                         "other LMs are trained on every position.")
    C, steps, batch, lr, imp_coeff, pnorm, ci_fn, ci_hidden = _VARIANTS[arg]
    c = base_config("lm", arg)
    c.C, c.steps, c.batch_size, c.lr = C, steps, batch, lr
    c.lr_schedule, c.lr_warmup_frac = "cosine", 0.0
    c.ci_fn, c.ci_hidden = ci_fn, (ci_hidden,)
    c.tie_mode = "shared"  # no ties in these models
    kl = {"coeff": 1.0, "n_samples": 1, "sampling": "continuous", "divergence": "kl"}
    c.losses.stochastic_recon = dict(kl)
    c.losses.stochastic_recon_layerwise = dict(kl)
    if arg.startswith("llama"):
        # The reference's LlamaSimpleMLP decompositions replace the layerwise term (one forward
        # per site: 6 per layer) by the routed-subset term (one forward): ~4x cheaper here.
        del c.losses["stochastic_recon_layerwise"]
        c.losses.stochastic_recon_subset = {**kl, "router": "uniform_k"}
    c.losses.importance_minimality.coeff = imp_coeff
    c.losses.importance_minimality.pnorm = pnorm
    # Target fields a user may change (a changed target is trained and cached apart):
    c.target_recipe.seq_len = 64 if arg == "ih" else 128  # positions of the model and its data
    if arg == "ih":
        c.target_recipe.n_tokens = 128  # V: the model's vocabulary is V + 2
        c.target_recipe.prefix_window = 61  # "S M" starts in [1, prefix_window) (< seq_len - 1)
    elif arg == "bytes":
        c.target_recipe.corpus_bytes = 8_000_000  # bytes of standard-library source to train on
    else:  # llama_*: BPE tokens of text files
        c.target_recipe.text_files = ""  # comma-separated glob patterns; "": the Python docs
        c.target_recipe.corpus_bytes = 0  # at most this many bytes of text; 0: every file
    c.eval_batch_size = 256 if arg == "ih" else 32
    c.log_every = 250
    c.checkpoint_every = 1000
    if modifiers in (["answer"], ["answer_ci"]):
        # The toy is trained on the last position only: reconstruct that output (KL there,
        # spdjax/families/lm/induction.py), so CI elsewhere is free to vanish; importance
        # minimality is a mean over all 64 positions, hence a larger coefficient.
        for term in ("stochastic_recon", "stochastic_recon_layerwise"):
            c.losses[term].divergence = "kl_answer"
        c.losses.importance_minimality.coeff = _ANSWER_IMP_COEFF
    if modifiers == ["answer_ci"]:
        # Stochastic masks in [CI, 1] rarely switch a query or key off, and a sharp attention
        # pattern survives a scaled query: the CI-masked term makes the CI itself suffice.
        c.losses.ci_masked_recon = {"coeff": 1.0, "divergence": "kl_answer"}
    if modifiers in (["vpd"], ["circuit"]):
        vpd.language_model(c, units=_UNITS[arg])
        if not _UNITS[arg]:  # one head and no MLP: every subcomponent touches one unit
            del c.losses["nonlinearity_locality"]
    if modifiers == ["circuit"]:
        _circuit(c)
    return c


def _circuit(c) -> None:
    """``ih+circuit``: VPD's recipe changed where the toy differs from VPD's language models
    (each change measured on its own in RESULTS.md, "Induction-head ground truth")."""
    # The toy is trained on its last position only: reconstruct the answer there.
    c.losses.stochastic_pgd_recon_subset.divergence = "kl_answer"
    # VPD's lr (Muon, 2.8e-4) has not reconstructed anything after 2000 steps; 5x has.
    c.lr = 1.4e-3
    c.steps = 2000
    # VPD's smooth-L0 coefficient is tuned for LMs of many positions (100x here), and with an
    # answer-only KL the answer position's CI is counted 64 times (= T, the positions the
    # penalty averages over), so a subcomponent's saving there is on its KL cost's footing.
    c.losses.smooth_l0_importance_minimality.coeff = 1.275e-2
    c.losses.smooth_l0_importance_minimality.answer_weight = 64.0
    # Faithfulness 1 (VPD: 1000), and components that start as the target's singular pieces:
    # random starts keep ~30 of 32 layer-1 `out` subcomponents saturated at the answer.
    c.losses.delta_l2.coeff = 1.0
    c.init = "svd"


# Nonlinearity-facing sides for VPD's locality term: the MLP's hidden neurons (rows of mlp_in's U,
# columns of mlp_out's V) and the attention heads (the q/k/v outputs, the out projection's input),
# for the variant's model (bytes: 4 heads); a run that changes target_recipe.n_heads sets
# --config.losses.nonlinearity_locality.units to match.
def _block_units(i: int, heads: int) -> dict:
    head = lambda side: {"side": side, "heads": heads, "kind": "attention_head"}  # noqa: E731
    return {f"blocks_{i}/mlp_in": "output", f"blocks_{i}/mlp_out": "input",
            **{f"blocks_{i}/attn/{p}": head("output") for p in ("q", "k", "v")},
            f"blocks_{i}/attn/out": head("input")}


def _llama_units(layers: int, heads: int, kv_heads: int) -> dict:
    """As _block_units, with grouped-query attention: k and v have ``kv_heads`` heads."""
    units = {}
    for i in range(layers):
        units.update(_block_units(i, heads))
        for p in ("k", "v"):
            units[f"blocks_{i}/attn/{p}"] = {**units[f"blocks_{i}/attn/{p}"], "heads": kv_heads}
    return units


_UNITS = {"ih": {}, "bytes": {**_block_units(0, 4), **_block_units(1, 4)},
          "llama_2x128": _llama_units(2, 4, 2), "llama_4x192": _llama_units(4, 6, 3)}
