"""Decomposition methods: :class:`Method` (what the loop needs) and the registry by name.

A method is built from a config and a target problem by a function registered in
:data:`METHODS` (``config.method``): ``build(config, problem, learning_rate) -> Method``.
"""

from spdjax.methods.base import Method, Objective
from spdjax.methods import spd
from spdjax.registry import Registry

METHODS: Registry = Registry("method", {"spd": spd.from_config})

__all__ = ["METHODS", "Method", "Objective", "spd"]
