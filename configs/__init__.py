"""The config files, one per experiment: ``tms.py``, ``resid_mlp.py``, ``lm.py``.

In a checkout they are run by path (``--config=configs/tms.py:5-2``); installed, this directory is
the package ``spdjax.presets`` (pyproject.toml), where ``spdjax.config.load("tms:5-2")`` and
``--config=tms`` find them by name from any directory. Each defines ``get_config(arg)``.
"""
