"""Sphinx configuration: MyST markdown guides and an API reference built from the docstrings.

Build (what .ci/run does): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's spdjax, installed or not

project = "spdjax"
author = "spdjax authors"
copyright = "spdjax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: heading anchors for links such as guides/methods.md#best-of-k-initialisation.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# autodoc / autosummary: document what each module defines, in source order, with type hints in
# the description rather than the signature (JAX-style signatures get long).
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False  # the API pages are written by hand; nothing is generated into docs/

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections as field lists: a dataclass field with a default is also a class attribute
# that autodoc documents, and two `.. attribute::` entries for it would be a duplicate object.
napoleon_use_ivar = True

html_theme = "alabaster"  # ships with Sphinx: the docs build needs no extra theme package
html_title = "spdjax"
html_theme_options = {"description": "Stochastic Parameter Decomposition in JAX",
                      "fixed_sidebar": True}


# The docstrings are written to read well as plain text: a line ending in ":" followed by an
# indented block (a list of names and meanings, a file listing), or an indented block whose
# columns are aligned with runs of spaces (a small table). reST would read such a block as a
# definition list or block quote and complain about its alignment, so it is shown as written, as
# a literal block. Field lists, directives and bullets (what napoleon and reST mean by
# indentation) are left alone, and so are existing literal blocks. ``x``s, a plural after a
# literal, gets the escape reST needs.
_LITERAL = re.compile(r"(``.+?``)([A-Za-z]?)")  # literals in order, and the letter after one
_ALIGNED = re.compile(r"\S {2,}\S")
_NOT_PROSE = re.compile(r"(\.\.|>>>|[*+|-] |:[\w ]+:(\s|$))")  # directive, doctest, bullet, field


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _plain_text_blocks(app, what, name, obj, options, lines):
    lines[:] = [_LITERAL.sub(lambda m: m[1] + (r"\ " + m[2] if m[2] else ""), line)
                for line in lines]
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        text = line.strip()
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if text and j < len(lines) and _indent(lines[j]) > _indent(line):
            k = j
            while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > _indent(line)):
                k += 1
            block = lines[j:k]
            while block and not block[-1].strip():
                block.pop()
            literal = text.endswith("::")
            colon = text.endswith(":") and not literal and not _NOT_PROSE.match(text)
            table = (j > i + 1 and not _NOT_PROSE.match(text)
                     and any(_ALIGNED.search(b.strip()) for b in block))
            if literal or colon or table:
                head = line if literal else line + (":" if colon else " ::")
                out += [head, "", *block, ""]
                i = k
                continue
        out.append(line)
        i += 1
    lines[:] = out


# Docstring warnings known to come from spdjax/ itself that the rule above does not cover. Each is
# matched by where it occurs and how its message starts, and dropped before Sphinx counts it, so
# every other warning still fails `sphinx-build -W`. Fix the docstring, then delete its entry.
KNOWN_DOCSTRING_WARNINGS: list[tuple[str, str]] = []  # none: fix a docstring, don't list it


def _drop_known_docstring_warnings(record) -> bool:
    from docutils import nodes
    from sphinx.util.logging import get_node_location

    where = getattr(record, "location", None)
    if isinstance(where, nodes.Node):
        where = get_node_location(where)
    text = f"{where or ''} {record.getMessage()}"
    return not any(w in text and m in text for w, m in KNOWN_DOCSTRING_WARNINGS)


def setup(app):
    import logging

    app.connect("autodoc-process-docstring", _plain_text_blocks)
    for handler in logging.getLogger("sphinx").handlers:
        if type(handler).__name__ == "WarningStreamHandler":
            handler.filters.insert(0, _drop_known_docstring_warnings)  # before Sphinx counts it
