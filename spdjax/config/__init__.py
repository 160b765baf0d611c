"""Configs, and the one place names become values.

* :mod:`~spdjax.config.base`: the fields every run has (:func:`base_config`) and the one
  grammar of a config file's argument (:func:`parse_variant`);
* :mod:`~spdjax.config.files`: config files by name or path, overrides, recorded configs;
* :mod:`~spdjax.config.runs`: runs by name: :func:`setup`, :func:`train_and_evaluate` and
  :func:`load` resolve ``config.experiment`` / ``config.method`` in the registries and call the
  value-taking run layer (:mod:`spdjax.training`).
"""

from spdjax.config import vpd
from spdjax.config.base import base_config, later_reference, parse_variant
from spdjax.config.files import (apply_overrides, from_dict, load, parse_assignments, to_dict)

__all__ = ["apply_overrides", "base_config", "from_dict", "later_reference", "load", "vpd",
           "parse_assignments", "parse_variant", "to_dict"]
