"""``examples.html`` of a harvested language model (``python -m spdjax.harvest`` writes it):
the page of :func:`spdjax.families.lm.plots.write_top_contexts` (same style) for a harvest's
uniformly sampled examples instead of the top contexts of one batch.

Per site, every subcomponent that fired, densest first: its density and mean CI, its top input
tokens and top predicted tokens by PMI, and its sampled examples, the window around the firing
token (in bold) with every token shaded by the subcomponent's CI there.
"""

from __future__ import annotations

import html
import pathlib
from typing import Callable, Sequence

import numpy as np

from spdjax.families.lm import model as lm_model

# The head of the LM pages (this one and plots.write_top_contexts); each adds how its bold
# token is marked.
PAGE_CSS = ("body{font-family:sans-serif}"
            "pre{background:#f4f4f4;margin:2px 0;white-space:pre-wrap}")


def page_start(bold_css: str) -> str:
    """``<html>...<body>`` of an LM page, ``bold_css`` styling its ``<b>`` token."""
    return (f"<html><head><meta charset='utf-8'><style>{PAGE_CSS}b{{{bold_css}}}</style>"
            "</head><body>")


STYLE = page_start("outline:1px solid #c60")  # tokens are shaded by CI: the bold one outlined
TOP_TOKENS = 6  # input / predicted tokens listed per subcomponent


def decoder(cfg: lm_model.LMConfig) -> Callable[[Sequence[int]], str]:
    """Token ids as text: bytes for the byte LM, the corpus's BPE tokenizer for a text (Llama)
    target (:func:`spdjax.families.lm.model.text_corpus`), the ids themselves (``"12 7 "``)
    otherwise."""
    if cfg.data == "text":
        tok = lm_model.text_corpus(cfg)[2]
        return lambda ids: tok.decode([int(t) for t in ids], skip_special_tokens=False)
    if cfg.data == "bytes":
        return lambda ids: bytes(int(t) for t in ids).decode("utf-8", "replace")
    return lambda ids: "".join(f"{int(t)} " for t in ids)


def _cell(text: str, ci: float) -> str:
    shade = float(np.clip(ci, 0.0, 1.0)) if np.isfinite(ci) else 0.0
    return f"<span style='background:rgba(255,160,0,{shade:.2f})'>{html.escape(text)}</span>"


def write_harvest_examples(h, path, *, decode: Callable[[Sequence[int]], str]
                           ) -> pathlib.Path:
    """Writes the page of the harvest ``h`` (:class:`spdjax.analysis.harvest.Harvest` of token
    inputs) to ``path`` with tokens shown by ``decode`` (e.g. :func:`decoder`); returns it."""
    if h.spec.kind != "tokens":
        raise ValueError("An examples page needs a harvest of token inputs (a language model); "
                         f"this one read {h.spec.kind}.")
    parts = [STYLE + f"<h1>Harvest: {h.n} tokens, firing at CI &gt; {h.spec.threshold}</h1>"]
    w = h.spec.window
    for site, size in zip(h.spec.sites, h.spec.sizes):
        parts.append(f"<h2>{html.escape(site)}</h2>")
        fired = [h.index((site, c)) for c in range(size) if h.count[h.index((site, c))] > 0]
        for i in sorted(fired, key=lambda i: -h.density[i]):
            name = h.names[i]
            tops = {which: ", ".join(f"<code>{html.escape(repr(decode([t])))}</code> {v:.2f}"
                                     for t, v in h.top_tokens(name, TOP_TOKENS, which=which))
                    for which in ("input", "output")}
            parts.append(f"<h3>{html.escape(name)}: density {h.density[i]:.2%}, mean CI "
                         f"{h.mean_ci[i]:.3f}</h3><p>input tokens (PMI): {tops['input']}<br>"
                         f"predicted tokens (PMI): {tops['output']}</p>")
            for e in sorted(h.examples(name), key=lambda e: -e["ci"]):
                cells = [_cell(decode([t]), c) if t >= 0 else ""
                         for t, c in zip(e["tokens"], e["window_ci"])]
                cells[w] = f"<b>{cells[w]}</b>"
                parts.append(f"<pre>CI {e['ci']:.2f} | {''.join(cells)}</pre>")
    parts.append("</body></html>")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
