"""The command-line entry points, each a thin layer over :mod:`spdjax.config`:

* ``python -m spdjax.main`` (:mod:`~spdjax.cli.main`; installed: ``spdjax``): train, evaluate
  and plot the run of a config file;
* ``python -m spdjax.cli.plot`` (:mod:`~spdjax.cli.plot`): redraw every figure of a run;
* ``python -m spdjax.cli.target`` (:mod:`~spdjax.cli.target`): train or load a family's target.
"""
