"""Small shared fixtures for tests: a two-site pure target, NumPy reference maths, a run
finished in one call and the environment of a CLI child process."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import spdjax
from spdjax.core.target import Site, weight_at
from spdjax.training import loop
from spdjax.training.workdir import config_dict


def two_site_target(d_in=3, d_hidden=4, d_out=2, seed=0):
    """relu(x @ Wa + ba) @ Wb as a pure target with sites "a" and "b"."""

    def fn(p, x, hooks):
        h = jax.nn.relu(hooks("a", x, lambda a: a @ p["a"]["kernel"] + p["a"]["bias"]))
        return hooks("b", h, lambda a: a @ p["b"]["kernel"])

    sites = [
        Site("a", "linear", d_in, d_hidden, weight_at(("a", "kernel")), weight_at(("a", "bias"))),
        Site("b", "linear", d_hidden, d_out, weight_at(("b", "kernel"))),
    ]
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_hidden)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(d_hidden,)) * 0.1, jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(d_hidden, d_out)), jnp.float32)},
    }
    return spdjax.from_function(fn, sites), params


def np_gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_mlp_ci(layers, h):
    """Per-component scalar MLP (one hidden layer) in NumPy: h [B, C] -> [B, C]."""
    w1 = np.asarray(layers[0]["w"])[:, 0, :]  # (C, H)
    b1 = np.asarray(layers[0]["b"])  # (C, H)
    w2 = np.asarray(layers[1]["w"])[:, :, 0]  # (C, H)
    b2 = np.asarray(layers[1]["b"])[:, 0]  # (C,)
    a = np_gelu(h[:, :, None] * w1[None] + b1[None])
    return np.sum(a * w2[None], axis=-1) + b2[None]


def np_lower(x):
    return np.where(x <= 0, 0.01 * x, np.minimum(x, 1.0))


def np_upper(x):
    return np.where(x <= 0, 0.0, np.where(x <= 1, x, 1 + 0.01 * (x - 1)))


def exact_params(d, tp):
    """Factors with V U = W exactly: V = [W, 0], U = [I; 0] (needs C >= d_out)."""
    params = d.init(jax.random.key(0), tp)
    for name in d.owners:
        W = d.site(name).weight(tp)
        pad = d.C[name] - W.shape[1]
        params["components"][name] = {
            "V": jnp.pad(W, ((0, 0), (0, pad))),
            "U": jnp.pad(jnp.eye(W.shape[1]), ((0, pad), (0, 0))),
        }
    return params


def assert_reproduces_target(d, tp, x, layerwise=True):
    """With V U = W and all masks 1 the decomposed model equals the target (and, if
    ``layerwise``, so does each site alone: one forward per site, costly to compile)."""
    params = exact_params(d, tp)
    layerwise_check = layerwise

    @jax.jit
    def compute(params, x):
        ctx = spdjax.make_context(d, tp, params, x)
        ones = {n: jnp.ones_like(c.lower) for n, c in ctx.ci.items()}
        # Layerwise: one site at a time, the rest keep target weights; each equals the target.
        layerwise = [d.forward(tp, params, x, {n: ones[n]}) for n in d.site_names
                     if layerwise_check]
        return (d.target(tp, x), d.forward(tp, params, x, ones), layerwise,
                spdjax.unmasked_recon(params, ctx), spdjax.faithfulness(params, ctx))

    want, all_masked, layerwise, unmasked, faith = compute(params, x)
    np.testing.assert_allclose(all_masked, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unmasked, 0.0, atol=1e-10)
    np.testing.assert_allclose(faith, 0.0, atol=1e-12)
    for out in layerwise:
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def finish(config, workdir, **kwargs):
    """Sets up, trains and evaluates the run of ``config`` in ``workdir``, then closes it:
    ``(summary, step)``."""
    run = spdjax.setup(config, workdir, **kwargs)
    try:
        loop.train(run)
        return loop.evaluate(run), run.step
    finally:
        loop.close(run)


def cli_env() -> dict:
    """The environment a CLI child process gets: one CPU device, like a user's (the session's
    target cache from conftest), unbuffered output."""
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("XLA_FLAGS", None)
    return e


def config_key(config) -> str:
    """Every field of a run's config, as one string."""
    return json.dumps(config_dict(config), sort_keys=True)


@contextlib.contextmanager
def shared_train_steps(key=config_key):
    """Runs whose configs give the same ``key`` share one jitted train step, as one process
    running them in turn would wish: ``setup`` builds an equal step each time, and each build
    traces and lowers it again before the persistent compilation cache can serve it (about a
    second of CPU per build). Every run still goes through ``setup``, ``train`` and its
    checkpoints; only the compiled step is reused. The step takes the run's state, target and
    keys (and the loss coefficients, ``Method.hparams``) as arguments, so a ``key`` may leave
    those out."""
    build, steps = loop.build_step, {}

    def shared(run, **kwargs):
        k = (key(run.config), tuple(sorted(kwargs.items())))
        if k not in steps:
            steps[k] = build(run, **kwargs)
        return steps[k]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "build_step", shared)
        yield


# The child of cli_cases: each argument list through the entry's run(), between markers.
_CASES_CHILD = """
import importlib, json, sys
from absl import flags
entry, prog = importlib.import_module(sys.argv[1]), sys.argv[2]
for argv in json.loads(sys.argv[3]):
    flags.FLAGS.unparse_flags()
    sys.argv = [prog, *argv]
    for stream in (sys.stdout, sys.stderr):
        print("@@case", file=stream, flush=True)
    try:
        entry.run()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    print(f"@@exit {code}", flush=True)
"""


def cli_cases(module: str, prog: str, argvs, *, cwd, timeout=300):
    """Each argument list run through console entry ``module.run()`` in ONE child process
    (importing spdjax is most of a case's time): ``(completed process, [(exit code, stdout,
    stderr) per case])``. A case that ends the process itself (``os._exit``, as a run's errors
    do) gets exit code None and must be the last; the process's exit code is then its own."""
    p = subprocess.run([sys.executable, "-c", _CASES_CHILD, module, prog, json.dumps(argvs)],
                       cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    outs, errs = p.stdout.split("@@case\n")[1:], p.stderr.split("@@case\n")[1:]
    assert len(outs) == len(errs) == len(argvs), (p.stdout[-2000:], p.stderr[-2000:])
    results = []
    for out, err in zip(outs, errs):
        body, sep, code = out.rpartition("@@exit ")
        results.append((int(code) if sep else None, body if sep else out, err))
    return p, results
