"""The built-in target families, each registered in
:data:`spdjax.training.family.FAMILIES` when imported:

* :mod:`~spdjax.families.tms`: the toy model of superposition (SPD paper, section 4.1);
* :mod:`~spdjax.families.resid_mlp`: the toy model of compressed computation (section 4.2);
* :mod:`~spdjax.families.lm`: small transformers (an induction-head toy, a byte-level LM);
* :mod:`~spdjax.families.l3d_toys`: the L3D paper's toy models (TMS 5-2, TMCS, higher-rank
  circuits, X^2).

A family of your own is a :class:`~spdjax.training.family.Family` value (docs: "Extending").
"""

from spdjax.families import l3d_toys, lm, resid_mlp, tms

__all__ = ["l3d_toys", "lm", "resid_mlp", "tms"]
