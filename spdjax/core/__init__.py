"""The core: targets as values and their sites (:mod:`~spdjax.core.target`,
:mod:`~spdjax.core.tracing`, :mod:`~spdjax.core.adapters`; Hugging Face checkpoints from
disk: :mod:`~spdjax.core.pretrained`), the SPD decomposition
(:mod:`~spdjax.core.decomposition`: factors, CI functions, masked forwards), its parts
(:mod:`~spdjax.core.ci`, :mod:`~spdjax.core.ci_global`, :mod:`~spdjax.core.components`,
:mod:`~spdjax.core.masks`, :mod:`~spdjax.core.routing`, :mod:`~spdjax.core.sigmoids`), toy data
(:mod:`~spdjax.core.data`) and the name -> value :class:`~spdjax.core.registry.Registry`.
Nothing here imports any other layer of spdjax.
"""
