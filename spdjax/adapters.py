"""Adapters that turn unmodified Flax models (linen or nnx) into :class:`~spdjax.target.Target`.

Sites are the model's standard layers: ``nn.Dense``/``nnx.Linear`` (``x @ kernel + bias``) and
``nn.Embed``/``nnx.Embed`` (``embedding[ids]``), named by their module path joined with ``/``
(linen: ``"layers_0/mlp_in"``; nnx: ``"layers/0/mlp_in"``). Both adapters return target params as a
plain nested dict of arrays, so the rest of the library never sees a Flax object.
"""

from __future__ import annotations

import contextvars

import flax.linen as nn
import jax
from flax import nnx

from spdjax.target import Site, SiteHooks, Target, weight_at


def _path_name(path) -> str:
    return "/".join(str(p) for p in path)


def _sites_from_param_tree(params, leaf_names=("kernel", "embedding")) -> dict[str, Site]:
    """Finds every 2-D ``kernel`` (linear) and ``embedding`` (embed) in a nested param dict."""
    sites: dict[str, Site] = {}

    def visit(node, path):
        if not isinstance(node, dict):
            return
        for kind, leaf in (("linear", leaf_names[0]), ("embed", leaf_names[1])):
            w = node.get(leaf)
            if w is not None and not isinstance(w, dict) and getattr(w, "ndim", 0) == 2:
                bias = node.get("bias") if kind == "linear" else None
                name = _path_name(path)
                sites[name] = Site(
                    name=name,
                    kind=kind,
                    d_in=int(w.shape[0]),
                    d_out=int(w.shape[1]),
                    weight=weight_at(path + (leaf,)),
                    bias=None if bias is None else weight_at(path + ("bias",)),
                )
        for key, child in node.items():
            visit(child, path + (key,))

    visit(params, ())
    return sites


_TWICE = ("Weight sharing across calls is not supported by the adapter; write the model as a "
          "pure target (spdjax.from_function) with one site name per application.")


# ----------------------------------------------------------------------------------------- linen


def from_linen(module: nn.Module, variables: dict, **apply_kwargs) -> tuple[Target, dict]:
    """Wraps a linen module and its variables. Returns ``(target, target_params)``.

    ``apply_kwargs`` are passed to every ``module.apply`` (e.g. ``train=False``).
    """
    if "params" not in variables:
        raise ValueError("from_linen expects variables with a 'params' collection, as from init().")
    params = jax.tree.map(lambda a: a, dict(variables["params"]))
    params = _to_plain_dict(params)
    other = {k: v for k, v in variables.items() if k != "params"}
    sites = _sites_from_param_tree(params)

    def forward(p, x, replace):
        hooks = SiteHooks(replace, twice_hint=_TWICE)

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Embed)):
                return next_fun(*args, **kwargs)
            name = _path_name(mod.path)
            if name not in sites:
                return next_fun(*args, **kwargs)
            return hooks(name, args[0], lambda a: next_fun(a, *args[1:], **kwargs))

        with nn.intercept_methods(interceptor):
            out = module.apply({**other, "params": p}, x, **apply_kwargs)
        return out, hooks.inputs

    return Target(forward=forward, sites=sites), params


def _to_plain_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_plain_dict(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------------------------- nnx

# The SiteHooks of the nnx forward pass in progress.
_NNX_HOOKS: contextvars.ContextVar[SiteHooks] = contextvars.ContextVar("spdjax_nnx_hooks")


class _HookedLinear(nnx.Linear):
    """An ``nnx.Linear`` that reports to the forward's :class:`SiteHooks` as ``_spdjax_site``."""

    def __call__(self, x):
        return _NNX_HOOKS.get()(self._spdjax_site, x, super().__call__)


class _HookedEmbed(nnx.Embed):
    def __call__(self, ids):
        return _NNX_HOOKS.get()(self._spdjax_site, ids, super().__call__)


_HOOKED = {nnx.Linear: _HookedLinear, nnx.Embed: _HookedEmbed}


def from_nnx(model: nnx.Module, **call_kwargs) -> tuple[Target, dict]:
    """Wraps an nnx module. Returns ``(target, target_params)``; the module itself is not changed.

    The hooks are installed once, on a clone: its Linear/Embed layers become subclasses that
    report their input, and the graph definition split from it rebuilds them on every forward.
    ``call_kwargs`` are passed to every ``model(x, ...)`` call.
    """
    hooked = nnx.clone(model)
    names = []
    for path, node in nnx.iter_graph(hooked):
        if type(node) in _HOOKED:
            node.__class__ = _HOOKED[type(node)]
            node._spdjax_site = _path_name(path)
            names.append(node._spdjax_site)
    graphdef, param_state, rest = nnx.split(hooked, nnx.Param, ...)
    params = _to_plain_dict(nnx.to_pure_dict(param_state))
    sites = {name: s for name, s in _sites_from_param_tree(params).items() if name in names}

    def forward(p, x, replace):
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, p)
        m = nnx.merge(graphdef, state, rest)
        hooks = SiteHooks(replace, twice_hint=_TWICE)
        token = _NNX_HOOKS.set(hooks)
        try:
            out = m(x, **call_kwargs)
        finally:
            _NNX_HOOKS.reset(token)
        return out, hooks.inputs

    return Target(forward=forward, sites=sites), params
