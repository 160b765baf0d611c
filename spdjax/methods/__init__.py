"""Decomposition methods: :class:`Method` (what the run layer needs), :class:`MethodSpec` (how a
config builds one) and the open registry :data:`METHODS` (``config.method``).

SPD, APD and L3D register themselves when this package is imported; a method of your own registers
with :func:`register` (docs: "Extending").
"""

from spdjax.methods.base import (METHODS, DecompositionView, Method, MethodSpec, Objective,
                                 register)
from spdjax.methods import apd, l3d, spd  # noqa: E402,F401 (registers "spd", "apd", "l3d")

__all__ = ["DecompositionView", "METHODS", "Method", "MethodSpec", "Objective", "apd", "l3d",
           "register", "spd"]
