"""Sites found by tracing: any JAX function ``fn(params, x)`` decomposes by parameter path.

:func:`from_jax` traces ``fn`` to a jaxpr and finds every *weight application*: an equation
whose weight operand is a float parameter leaf (possibly after reshapes, transposes, dtype
casts, or a slice of a ``lax.scan`` over stacked layers). An interpreter then evaluates the jaxpr,
recording each site's input and calling the replacement where one is given. So linen, nnx,
equinox models and plain functions decompose alike, with no hooks in the model:

``dot_general``
    a ``linear`` site. The weight's contracted axes (in contraction order) form ``d_in``, its
    free axes ``d_out``: a ``DenseGeneral`` kernel ``(d_model, heads, head_dim)`` contracted on
    axis 0 is the matrix ``(d_model, heads*head_dim)``; an attention ``out`` kernel ``(heads,
    head_dim, d_model)`` contracted on axes 0, 1 is ``(heads*head_dim, d_model)``; a weight
    stored ``(out, in)`` and transposed before use (torch-style ``Conv1D``, ``Embed.attend``) is
    seen the right way round. The site input is the other operand with its free axes first and
    the contracted ones flattened last: ``[..., d_in]``.
``gather`` of rows
    an ``embed`` site (``W[ids]``, ``d_in`` = vocabulary).
``conv_general_dilated``
    a ``conv`` site: the kernel as its im2col matrix, (window x in-channels, out-channels); the
    site input is the image, and the masked site is the same convolution with the factors as
    kernels (``Site.apply``).

Names: the leaf's path without its last key (``"layers_0/mlp_in"`` for
``layers_0/mlp_in/kernel``; the full path where that would be ambiguous or the path has one key).
A ``lax.scan`` over stacked parameters (``nn.scan``, ``nnx.scan``) is unrolled and each layer is
its own site, the layer index inserted after the path the stacked leaves share:
``layers/attn/query/kernel`` of shape ``(L, ...)`` gives ``layers/0/attn/query`` ...
``layers/{L-1}/attn/query``. A weight applied more than once in one forward is one site per
application: the first keeps the name, later ones are ``name#2``, ``name#3`` (a tied embedding:
``embed`` is the lookup and ``embed#2`` the unembedding).

Not sites: weights used inside ``lax.cond``/``while_loop`` bodies, a ``dot_general`` of two
parameters, a weight with batch axes shared with the input (a per-head einsum that keeps the
head axis on both sides) and a grouped (depthwise) convolution; the last two are listed in
``Target.unsupported`` with the reason, which a pattern that matches only them reports.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from spdjax.core.target import Site, Target

Array = jax.Array

# Equations that only move or re-type a weight: the result is still "the weight".
_WEIGHT_VIEWS = {"transpose", "reshape", "convert_element_type", "copy", "squeeze",
                 "expand_dims", "copy_p"}
# Call-like equations whose body is inlined when a weight flows into it.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class _Src:
    """Where a value comes from: parameter leaf ``leaf`` passed through ``chain`` (views, casts
    and scan slices, in order); ``layers`` names the scan slices (``(insert position in the
    path, index)`` per scan, outermost first)."""

    leaf: int
    layers: tuple[tuple[int, int], ...] = ()
    chain: tuple[Callable[[Array], Array], ...] = ()

    def then(self, fn) -> "_Src":
        return dataclasses.replace(self, chain=self.chain + (fn,))

    def layer(self, pos: int, i: int) -> "_Src":
        """This value's slice ``i`` along axis 0, as a scan step sees it."""
        return dataclasses.replace(self, layers=self.layers + ((pos, i),),
                                   chain=self.chain + (lambda w: w[i],))

    def value(self, leaves: list[Array]) -> Array:
        w = leaves[self.leaf]
        for fn in self.chain:
            w = fn(w)
        return w


@dataclasses.dataclass(frozen=True)
class _Found:
    """A weight application seen while tracing: its key, kind and matrix shape."""

    key: tuple  # (leaf, layers, application number)
    kind: str  # "linear" | "embed" | "unsupported"
    d_in: int
    d_out: int
    src: _Src
    to_matrix: Callable[[Array], Array] | None
    reason: str = ""  # why an "unsupported" application cannot be a site
    conv: Callable[[Array, Array], Array] | None = None  # a conv site's (M, image) -> [..., k]


class _Run:
    """One interpretation of a jaxpr: ``replace`` by site key; records inputs and found sites."""

    def __init__(self, replace: dict, paths: list[tuple[str, ...]]):
        self.replace = replace
        self.paths = paths
        self.inputs: dict[tuple, Array] = {}
        self.found: list[_Found] = []
        self._count: dict[tuple, int] = {}

    def application(self, src: _Src) -> tuple:
        base = (src.leaf, src.layers)
        self._count[base] = self._count.get(base, 0) + 1
        return base + (self._count[base],)

    # -- the interpreter ---------------------------------------------------------------------
    def eval(self, jaxpr, consts, args, srcs) -> tuple[list, list]:
        env: dict = {}
        src_of: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def src(v):
            return None if isinstance(v, jcore.Literal) else src_of.get(v)

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a, s in zip(jaxpr.invars, args, srcs):
            env[v] = a
            if s is not None:
                src_of[v] = s
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            insrcs = [src(v) for v in eqn.invars]
            outs, outsrcs = self.eqn(eqn, invals, insrcs)
            for v, o, s in zip(eqn.outvars, outs, outsrcs):
                env[v] = o
                if s is not None:
                    src_of[v] = s
        return [read(v) for v in jaxpr.outvars], [src(v) for v in jaxpr.outvars]

    def eqn(self, eqn, invals, insrcs):
        prim, n_out = eqn.primitive, len(eqn.outvars)
        if all(s is None for s in insrcs):
            return _bind(eqn, invals), [None] * n_out
        name = prim.name
        if name in _WEIGHT_VIEWS and len(invals) == 1:
            params = _bind_params(eqn)
            return _bind(eqn, invals), [insrcs[0].then(lambda w: prim.bind(w, **params))]
        if name == "dot_general":
            return self.dot(eqn, invals, insrcs)
        if name == "gather":
            return self.gather(eqn, invals, insrcs)
        if name == "conv_general_dilated":
            return self.conv(eqn, invals, insrcs)
        if name in _CALLS:
            jaxpr, consts = _body(eqn)
            return self.eval(jaxpr, consts, invals, insrcs)
        if name == "scan":
            return self.scan(eqn, invals, insrcs)
        return _bind(eqn, invals), [None] * n_out

    # -- sites ---------------------------------------------------------------------------------
    def dot(self, eqn, invals, insrcs):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if (insrcs[0] is None) == (insrcs[1] is None):  # two weights (or none): not a site
            return _bind(eqn, invals), [None]
        w_side = 0 if insrcs[0] is not None else 1
        w, x = invals[w_side], invals[1 - w_side]
        cw, cx = (lc, rc) if w_side == 0 else (rc, lc)
        if lb or rb:
            self.site(insrcs[w_side], "unsupported", 0, 0, None, reason=(
                "the weight is applied with batch axes shared with its input (dot_general batch "
                f"dims {(tuple(lb), tuple(rb))}), so it is a stack of matrices, not one matrix; "
                "write the model with one weight per matrix"))
            return _bind(eqn, invals), [None]
        fw = [a for a in range(w.ndim) if a not in cw]
        fx = [a for a in range(x.ndim) if a not in cx]
        d_in = math.prod(w.shape[a] for a in cw)
        d_out = math.prod(w.shape[a] for a in fw)
        w_free = tuple(w.shape[a] for a in fw)
        x_free = tuple(x.shape[a] for a in fx)
        perm = tuple(cw) + tuple(fw)

        def to_matrix(weight):
            return jnp.transpose(weight, perm).reshape(d_in, d_out)

        out_aval = eqn.outvars[0].aval
        key = self.site(insrcs[w_side], "linear", d_in, d_out, to_matrix)
        site_x = jnp.transpose(x, tuple(fx) + tuple(cx)).reshape(x_free + (d_in,))
        fn = self.record(key, site_x)
        if fn is None:
            return _bind(eqn, invals), [None]
        y = fn(site_x).reshape(x_free + w_free).astype(out_aval.dtype)
        if w_side == 0:  # dot_general puts the lhs (weight) free axes first
            nx, nw = len(x_free), len(w_free)
            y = jnp.transpose(y, tuple(range(nx, nx + nw)) + tuple(range(nx)))
        return [y], [None]

    def gather(self, eqn, invals, insrcs):
        table, ids = invals
        dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
        is_row_lookup = (insrcs[1] is None and table.ndim == 2
                         and tuple(sizes) == (1, table.shape[1])
                         and tuple(dn.collapsed_slice_dims) == (0,)
                         and tuple(dn.start_index_map) == (0,) and ids.shape[-1] == 1
                         and tuple(dn.offset_dims) == (ids.ndim - 1,)
                         and not dn.operand_batching_dims)
        if insrcs[0] is None or not is_row_lookup:
            return _bind(eqn, invals), [None]
        key = self.site(insrcs[0], "embed", table.shape[0], table.shape[1], lambda w: w)
        site_x = ids[..., 0]
        fn = self.record(key, site_x)
        if fn is None:
            return _bind(eqn, invals), [None]
        return [fn(site_x).astype(eqn.outvars[0].aval.dtype)], [None]

    def conv(self, eqn, invals, insrcs):
        image, w = invals
        if insrcs[1] is None or insrcs[0] is not None:
            return _bind(eqn, invals), [None]
        p = _bind_params(eqn)
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            self.site(insrcs[1], "unsupported", 0, 0, None, reason=(
                "a grouped (e.g. depthwise) convolution is a stack of matrices, not one"))
            return _bind(eqn, invals), [None]
        dn = p["dimension_numbers"]
        o_dim, i_dim, *spatial = dn.rhs_spec
        perm = (*spatial, i_dim, o_dim)  # kernel -> (window..., in, out)
        d_in = math.prod(w.shape[a] for a in perm[:-1])
        d_out = w.shape[o_dim]
        window = tuple(w.shape[a] for a in perm[:-1])
        unperm = tuple(int(i) for i in np.argsort(perm))
        channel = dn.out_spec[1]
        out_dtype = eqn.outvars[0].aval.dtype

        def to_matrix(weight):
            return jnp.transpose(weight, perm).reshape(d_in, d_out)

        def conv_with(M, x):  # the same convolution with M (d_in, k) as its kernel, channels last
            kernel = jnp.transpose(M.reshape(*window, M.shape[1]), unperm)
            with eqn.ctx.manager:
                y = eqn.primitive.bind(x, kernel.astype(w.dtype), **p)
            return jnp.moveaxis(y, channel, -1)

        key = self.site(insrcs[1], "conv", d_in, d_out, to_matrix, conv=conv_with)
        fn = self.record(key, image)
        if fn is None:
            return _bind(eqn, invals), [None]
        return [jnp.moveaxis(fn(image), -1, channel).astype(out_dtype)], [None]

    def site(self, src, kind, d_in, d_out, to_matrix, reason="", conv=None) -> tuple:
        key = self.application(src)
        self.found.append(_Found(key, kind, int(d_in), int(d_out), src, to_matrix, reason, conv))
        return key

    def record(self, key, site_x):
        self.inputs[key] = site_x
        return self.replace.get(key)

    # -- scan: unrolled when weights flow in --------------------------------------------------
    def scan(self, eqn, invals, insrcs):
        p = eqn.params
        n_c, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, carry, xs = invals[:n_c], invals[n_c:n_c + n_carry], invals[n_c + n_carry:]
        c_srcs, carry_srcs = insrcs[:n_c], insrcs[n_c:n_c + n_carry]
        xs_srcs = insrcs[n_c + n_carry:]
        if any(s is not None for s in carry_srcs):
            return _bind(eqn, invals), [None] * len(eqn.outvars)
        stacked = [self.paths[s.leaf] for s in xs_srcs if s is not None]
        if not stacked:  # weights only as loop constants: a loop over time, not over layers
            if length:
                self.loop_constants(body, consts + carry + [x[0] for x in xs], c_srcs, n_c)
            return _bind(eqn, invals), [None] * len(eqn.outvars)
        pos = _shared_prefix(stacked)
        ys_steps = []
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for i in order:
            x_i = [x[i] for x in xs]
            s_i = [None if s is None else s.layer(pos, i) for s in xs_srcs]
            outs, _ = self.eval(body.jaxpr, body.consts, consts + carry + x_i,
                                c_srcs + [None] * n_carry + s_i)
            carry, ys = outs[:n_carry], outs[n_carry:]
            ys_steps.append(ys)
        if p["reverse"]:
            ys_steps = ys_steps[::-1]
        stacked_ys = [jnp.stack(parts) for parts in zip(*ys_steps)] if ys_steps and ys_steps[0] \
            else [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[n_carry:]]
        return list(carry) + stacked_ys, [None] * len(eqn.outvars)


    def loop_constants(self, body, args, c_srcs, n_c):
        """Lists the weights a scan body applies as loop constants (an RNN cell, a
        ``fori_loop``) as unsupported: applied once per iteration, their sites would depend on
        the sequence length."""
        probe = _Run({}, self.paths)
        probe.eval(body.jaxpr, body.consts, args, list(c_srcs) + [None] * (len(args) - n_c))
        seen = set()
        for f in probe.found:
            if f.src.leaf not in seen:
                seen.add(f.src.leaf)
                self.site(f.src, "unsupported", 0, 0, None, reason=(
                    "applied inside a lax.scan / fori_loop as a loop constant (e.g. an RNN cell "
                    "unrolled over time), once per iteration: one site per step would depend on "
                    "the sequence length"))


def _bind_params(eqn) -> dict:
    return eqn.primitive.get_bind_params(eqn.params)


def _bind(eqn, invals) -> list:
    """Evaluates one equation as ``jax.core.eval_jaxpr`` does (its own context included)."""
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **_bind_params(eqn))
    return list(out) if eqn.primitive.multiple_results else [out]


def _body(eqn):
    """The inlined body of a call-like equation: ``(open jaxpr, consts)``."""
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(body, jcore.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, []


def _shared_prefix(paths: list[tuple[str, ...]]) -> int:
    """Length of the path prefix all ``paths`` share, kept short of a whole path (the leaf key)."""
    n = min(len(p) for p in paths)
    k = 0
    while k < n - 1 and all(p[k] == paths[0][k] for p in paths):
        k += 1
    if n == 1:  # a top-level stacked array: index after its name
        return 1
    return k if len(paths) > 1 else n - 1


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _site_names(found: list[_Found], paths) -> dict[tuple, str]:
    """Readable, unique names for the found applications (module docstring)."""
    def with_layers(src, drop_leaf):
        parts = list(paths[src.leaf])
        # deepest position first, and at one position the inner scan first, so that the
        # outermost index ends up leftmost
        for _, (pos, i) in sorted(enumerate(src.layers), key=lambda t: (-t[1][0], -t[0])):
            parts.insert(pos, str(i))
        if drop_leaf and len(parts) > 1:
            parts = parts[:-1]
        return "/".join(parts)

    bases = {}
    for f in found:
        bases.setdefault((f.src.leaf, f.src.layers), with_layers(f.src, True))
    counts: dict[str, int] = {}
    for b in bases.values():
        counts[b] = counts.get(b, 0) + 1
    names = {}
    for f in found:
        leaf_key = (f.src.leaf, f.src.layers)
        base = bases[leaf_key]
        if counts[base] > 1:
            base = with_layers(f.src, False)
        n = f.key[2]
        names[f.key] = base if n == 1 else f"{base}#{n}"
    taken: dict[str, tuple] = {}
    for key, name in list(names.items()):  # two paths that print alike (e.g. "a/b" vs "a", "b")
        if name in taken and taken[name] != key:
            names[key] = f"{name}~leaf{key[0]}"
        taken.setdefault(names[key], key)
    return names


def from_jax(fn: Callable[[Any, Any], Any], params: Any, example_input: Any) -> tuple[Target, Any]:
    """Makes a :class:`~spdjax.core.target.Target` of any JAX function ``fn(params, x) -> output``.

    ``example_input`` is traced once to find the sites (the module docstring says which
    equations are sites and how they are named); the forward re-traces for each new input shape.
    Returns ``(target, params)``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(_key_str(k) for k in path) for path, _ in flat]
    floats = [jnp.issubdtype(jnp.result_type(leaf), jnp.floating) for _, leaf in flat]
    n_leaves = len(flat)
    traces: dict = {}

    def trace(p, x):
        spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                            (p, x))
        key = (jax.tree.structure(spec), tuple((s.shape, s.dtype) for s in jax.tree.leaves(spec)))
        if key not in traces:
            closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*spec)
            traces[key] = (closed, jax.tree.structure(out_shape))
        return traces[key]

    def interpret(p, x, replace):
        leaves = jax.tree.leaves(p)
        if len(leaves) != n_leaves:
            raise ValueError(f"Target params have {len(leaves)} leaves; the traced model has "
                             f"{n_leaves}: pass the params this target was built from.")
        closed, out_tree = trace(p, x)
        run = _Run(replace, paths)
        srcs = [_Src(i) if floats[i] else None for i in range(n_leaves)]
        args = leaves + jax.tree.leaves(x)
        outs, _ = run.eval(closed.jaxpr, closed.consts, args,
                           srcs + [None] * (len(args) - n_leaves))
        return jax.tree.unflatten(out_tree, outs), run

    probe = {}

    def discover(p, x):
        probe["run"] = interpret(p, x, {})[1]
        return 0

    jax.eval_shape(discover, params, example_input)
    found = probe["run"].found
    names = _site_names(found, paths)
    keys = {names[f.key]: f.key for f in found}
    sites, unsupported = {}, {}
    for f in found:
        name = names[f.key]
        if f.kind == "unsupported":
            unsupported[name] = f.reason
            continue
        sites[name] = Site(name=name, kind=f.kind, d_in=f.d_in, d_out=f.d_out,
                           weight=_matrix_getter(f.src, f.to_matrix), conv=f.conv)

    def forward(p, x, replace):
        unknown = [n for n in replace if n not in keys]
        if unknown:
            raise ValueError(f"Sites {unknown} are not in this target; it has {sorted(keys)}.")
        out, run = interpret(p, x, {keys[n]: f for n, f in replace.items()})
        return out, {names[k]: v for k, v in run.inputs.items() if k in names}

    target_params = jax.tree.unflatten(treedef, [leaf for _, leaf in flat])
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                           example_input)
    return Target(forward=forward, sites=sites, unsupported=unsupported,
                  example=example), target_params


def _matrix_getter(src: _Src, to_matrix):
    def weight(params):
        return to_matrix(src.value(jax.tree.leaves(params)))

    return weight
