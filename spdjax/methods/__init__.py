"""Decomposition methods: :class:`Method` (what the loop needs) and the registry by name.

A method is built from a config and a target problem by a function registered in
:data:`METHODS` (``config.method``): ``build(config, problem, learning_rate) -> Method``.
"""

from spdjax.methods.base import Method, Objective
from spdjax.methods import apd, spd
from spdjax.registry import Registry

METHODS: Registry = Registry("method", {"spd": spd.from_config, "apd": apd.from_config})
# Each method's own config checks (the loop's validation runs the one of config.method).
CONFIG_CHECKS = {"spd": spd.check_config, "apd": apd.check_config}

__all__ = ["CONFIG_CHECKS", "METHODS", "Method", "Objective", "apd", "spd"]
