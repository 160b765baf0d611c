"""The browser viewer of a run: ``python -m spdjax.view --workdir=DIR`` serves it,
``--export=OUT`` writes a static copy, :func:`serve_in_notebook` shows it in a notebook.

* :mod:`~spdjax.view.data`: a workdir -> the JSON-able dict of each view (pure functions);
* :mod:`~spdjax.view.server`: the local HTTP server (static page, JSON views, graph API);
* :mod:`~spdjax.view.errors`: the graph API's bad-input error (HTTP 400);
* :mod:`~spdjax.view.export`: the static copy;
* :mod:`~spdjax.view.notebook`: the server in a notebook's output (Colab or Jupyter);
* ``static/``: the page (plain JavaScript, no build step).

The top layer beside :mod:`spdjax.cli` (docs/guides/viewer.md).
"""

from spdjax.view.notebook import serve_in_notebook

__all__ = ["serve_in_notebook"]
