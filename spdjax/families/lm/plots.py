"""Figures of a decomposed transformer: where each subcomponent is causally important.

* ``ci_l0_per_site.png``: mean active subcomponents per token at every site (for the induction
  toy: at the induction position and elsewhere, side by side).
* ``induction_ci.png`` (induction toy): per site, the mean CI of its most important
  subcomponents at the induction position against the other positions.
* ``top_contexts.html`` (byte and text LMs): for the most-used subcomponents of every site, the
  contexts where each is most causally important, the token highlighted; open it in a browser.
  Text (BPE) targets show their tokens decoded by the corpus's tokenizer.
"""

from __future__ import annotations

import html
import pathlib
from typing import Callable, Sequence

import jax
from matplotlib.figure import Figure
import numpy as np

from spdjax.families.lm import evaluation, harvest_page
from spdjax.families.lm import model as lm_model
from spdjax.losses import make_context

TOP = 8  # subcomponents per site in the figures / report
CONTEXTS = 6  # contexts per subcomponent in the report
WINDOW = 40  # bytes of context before the token
TEXT_WINDOW = 16  # BPE tokens of context before the token (about as many characters x 4)
DEDUP = 12  # contexts that agree on this many bytes before the token are one corpus position
ACTIVE = 0.5  # the token profile counts the tokens where a subcomponent's CI is above this


def _ci(decomp, params, target_params, ids) -> dict[str, np.ndarray]:
    ctx = jax.jit(lambda p, tp, i: make_context(decomp, tp, p, i))(params, target_params, ids)
    return {n: np.asarray(c.lower) for n, c in ctx.ci.items()}


def plot_run(decomp, params, target_params, cfg: lm_model.LMConfig, figures_dir) -> list:
    """A finished run's figures on the evaluation batch: CI-L0 per site, and CI at the induction
    position (induction toy) or the top contexts per subcomponent (byte LM); their paths."""
    if decomp.causal_importance is None:
        return []
    figures_dir = pathlib.Path(figures_dir)
    ids, _ = evaluation.eval_batch(cfg)
    ci = _ci(decomp, params, target_params, ids)
    paths = [plot_ci_l0(ci, cfg, figures_dir / "ci_l0_per_site.png")]
    if cfg.data == "induction":
        paths.append(plot_induction_ci(ci, figures_dir / "induction_ci.png"))
    else:
        kwargs = {}
        if cfg.data == "text":
            tok = lm_model.text_corpus(cfg)[2]
            kwargs = {"window": TEXT_WINDOW,
                      "decode": lambda t: tok.decode([int(i) for i in t],
                                                     skip_special_tokens=False)}
        paths.append(write_top_contexts(ci, np.asarray(ids), figures_dir / "top_contexts.html",
                                        **kwargs))
    return paths


def plot_ci_l0(ci: dict, cfg, path) -> pathlib.Path:
    """Bar chart of active subcomponents per token (CI above the L0 threshold) per site; the
    induction toy splits the induction position from the others. Returns ``path``."""
    names = list(ci)
    fig = Figure(figsize=(max(6, 0.7 * len(names)), 3.5))
    ax = fig.subplots()
    x = np.arange(len(names))
    t = evaluation.L0_THRESHOLD
    if cfg.data == "induction":
        ax.bar(x - 0.2, [np.mean(np.sum(ci[n][:, -1] > t, -1)) for n in names], 0.4,
               label="induction position")
        ax.bar(x + 0.2, [np.mean(np.sum(ci[n][:, :-1] > t, -1)) for n in names], 0.4,
               label="other positions")
        ax.legend()
    else:
        ax.bar(x, [np.mean(np.sum(ci[n] > t, -1)) for n in names])
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"active subcomponents\nper token (CI > {t})")
    ax.set_title("CI-L0 per site")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_induction_ci(ci: dict, path) -> pathlib.Path:
    """Per site: mean CI of the TOP subcomponents (by CI at the induction position, then
    elsewhere) at the induction position vs the other positions."""
    names = list(ci)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        at = ci[name][:, -1].mean(0)
        other = ci[name][:, :-1].mean((0, 1))
        order = np.lexsort((-other, -at))[:TOP]
        x = np.arange(len(order))
        ax.bar(x - 0.2, at[order], 0.4, label="induction position")
        ax.bar(x + 0.2, other[order], 0.4, label="other positions")
        ax.set_xticks(x, [str(c) for c in order], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supylabel("mean CI")
    fig.supxlabel("subcomponent")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_ci_per_token(ci: dict, tokens: list[str], path=None, *, top: int = TOP):
    """Heatmaps of one sequence's CI: per site (``ci[site]`` of shape ``[T, C]``), the ``top``
    subcomponents with the largest CI anywhere, over the positions labelled by ``tokens``.
    Saved to ``path`` if given; returns the figure."""
    names = list(ci)
    fig = Figure(figsize=(max(6, 0.18 * len(tokens)), 1.1 * len(names)
                          + 0.4 * top * len(names) / 4))
    axes = fig.subplots(len(names), 1, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        c = np.asarray(ci[name])
        order = np.argsort(-c.max(0))[:top]
        ax.imshow(c[:, order].T, aspect="auto", cmap="Blues", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_yticks(range(len(order)), [str(i) for i in order], fontsize=6)
        ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        ax.set_xticks([])
    axes[-1, 0].set_xticks(range(len(tokens)), tokens, fontsize=6, rotation=90)
    fig.suptitle("causal importance per token (rows: subcomponents)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _byte_text(tokens: Sequence[int]) -> str:
    """Byte ids as text (the byte LM's tokens), undecodable bytes replaced."""
    return bytes(int(t) for t in tokens).decode("utf-8", "replace")


def _token_profile(tokens: np.ndarray, ci: np.ndarray, n: int = 6,
                   decode: Callable[[Sequence[int]], str] = _byte_text) -> str:
    """One line: the tokens a subcomponent is important on most often (share of its tokens with
    CI > ACTIVE), e.g. whether it is an indentation or a newline component."""
    active = tokens[ci > ACTIVE]
    if active.size == 0:
        return f"<p>never above CI {ACTIVE}</p>"
    values, counts = np.unique(active, return_counts=True)
    top = np.argsort(-counts, kind="stable")[:n]
    items = ", ".join(f"<code>{html.escape(repr(decode([int(values[i])])))}</code> "
                      f"{counts[i] / active.size:.0%}" for i in top)
    return f"<p>tokens with CI &gt; {ACTIVE}: {items}</p>"


def write_top_contexts(ci: dict, ids: np.ndarray, path, *,
                       decode: Callable[[Sequence[int]], str] = _byte_text,
                       window: int = WINDOW) -> pathlib.Path:
    """An HTML page: per site, the TOP subcomponents by mean CI, each with the CONTEXTS tokens
    where its CI is highest (the preceding ``window`` tokens, the token in bold); ``decode``
    turns token ids into text (default: bytes)."""
    text = lambda t: html.escape(decode(t))  # noqa: E731
    parts = [harvest_page.page_start("background:#fc6") +
             "<h1>Top contexts per subcomponent</h1>"]
    for name, c in ci.items():
        flat = c.reshape(-1, c.shape[-1])
        parts.append(f"<h2>{html.escape(name)}</h2>")
        tokens = ids.reshape(-1)
        for comp in np.argsort(-flat.mean(0))[:TOP]:
            parts.append(f"<h3>subcomponent {comp}: mean CI {flat[:, comp].mean():.3f}, "
                         f"active on {np.mean(flat[:, comp] > 0.1):.1%} of tokens</h3>")
            parts.append(_token_profile(tokens, flat[:, comp], decode=decode))
            seen, shown = set(), 0
            for idx in np.argsort(-flat[:, comp], kind="stable"):
                if shown == CONTEXTS or flat[idx, comp] <= 0:
                    break
                seq, pos = divmod(int(idx), c.shape[1])
                # overlapping eval windows repeat one corpus position: show it once
                where = ids[seq, max(0, pos - DEDUP):pos + 1].tobytes()
                if where in seen:
                    continue
                seen.add(where)
                shown += 1
                before = text(ids[seq, max(0, pos - window):pos])
                parts.append(f"<pre>CI {flat[idx, comp]:.2f} | {before}<b>"
                             f"{text(ids[seq, pos:pos + 1]) or ' '}</b></pre>")
    parts.append("</body></html>")
    path = pathlib.Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
