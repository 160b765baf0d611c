"""Optimizers per parameter group (spdjax/methods/optimizers.py, config.optimizer): the default is
the paper's Adam, number for number; Muon, lrs and options reach only their own group; a managed
run with per-group optimizers resumes from its checkpoint exactly; bad entries fail at load."""

import functools
import io
import pathlib
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

import spdjax
from spdjax.config import files as configs
from spdjax.methods import optimizers, spd
from spdjax.training import ensemble, loop
from spdjax.training.progress import log_to

from helpers import two_site_target


@functools.cache  # built once for the module's tests, which only read it
def decomposition(ci_fn="mlp"):
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 8, "b": 4}, ci_fn=ci_fn, ci_hidden=(4,))
    return d, jax.jit(d.init)(jax.random.key(0), tp)


def grads_like(params, step, prefix=""):
    """A gradient of the params' shapes, different each step; a leaf's draw depends only on its
    path (``prefix`` + its path in ``params``), so a subtree gets the whole tree's values."""
    def draw(path, x):
        key = jax.random.fold_in(jax.random.key(step), zlib.crc32(
            (prefix + jax.tree_util.keystr(path)).encode()))
        return jax.random.normal(key, x.shape)
    return jax.tree_util.tree_map_with_path(draw, params)


def updates(opt, params, steps=4, prefix=""):
    """The updates ``opt`` gives over ``steps`` steps of :func:`grads_like` (applied, jitted)."""
    state = opt.init(params)
    out = []

    @jax.jit
    def one(params, state, grads):
        u, state = opt.update(grads, state, params)
        return optax.apply_updates(params, u), state, u

    for step in range(steps):
        params, state, u = one(params, state, grads_like(params, step, prefix))
        out.append(u)
    return out, state


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def tms(**overrides):
    return spdjax.config.load("tms:5-2", {"steps": 10, "C": 6, "batch_size": 64,
                                          "log_every": 5, "checkpoint_every": 5,
                                          "eval_batch_size": 64, "figures": False, **overrides})


def test_the_default_config_is_todays_single_adam_bit_for_bit():
    config = tms()
    run = spdjax.setup(config)
    d, params = run.method.decomposition, run.params
    today = optax.chain(optax.adam(run.schedule), spd.aliased_tie_updates(d))  # TMS ties: aliased
    ours, our_state = updates(run.method.optimizer, params)
    want, want_state = updates(today, params)
    assert_trees_equal(ours, want)
    assert_trees_equal(our_state, want_state)  # same state tree: older checkpoints restore
    loop.close(run)


def test_equal_groups_share_one_optimizer_and_split_groups_train_the_same():
    """Adam acts leaf by leaf, so one Adam over both groups and one per group agree."""
    d, params = decomposition()
    shared = optimizers.groups_from_config(
        {g: {"name": "adam", "lr": 0.0, "options": {}} for g in optimizers.GROUPS}, 1e-2, 1e-2)
    assert shared["components"] is shared["ci"]
    split = optimizers.groups_from_config(
        {"components": {"name": "adam", "lr": 0.0, "options": {}},
         "ci": {"name": "adam", "lr": 0.0, "options": {"b1": 0.9}}}, 1e-2, 1e-2)
    assert split["components"] is not split["ci"]
    one, _ = updates(spd.make_optimizer(d, 1e-2, groups=shared), params)
    two, state = updates(spd.make_optimizer(d, 1e-2, groups=split), params)
    assert set(state) == {"components", "ci"}  # each group its own state
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), one, two)
    ref, _ = updates(spd.make_optimizer(d, 1e-2), params)
    assert_trees_equal(one, ref)


def test_muon_on_the_components_moves_only_them_as_optax_muon_by_hand():
    d, params = decomposition()
    groups = {"components": optimizers.make("muon", 0.02), "ci": optax.adam(1e-3)}
    ours, _ = updates(spd.make_optimizer(d, 1e-3, groups=groups), params)
    # optax's own 2-D rule on the components alone: V and U are matrices (all 2-D).
    comps, _ = updates(optax.contrib.muon(0.02), params["components"], prefix="['components']")
    cis, _ = updates(optax.adam(1e-3), params["ci"], prefix="['ci']")
    for step in range(len(ours)):
        assert_trees_equal(ours[step]["components"], comps[step])
        assert_trees_equal(ours[step]["ci"], cis[step])
    # Muon's update of a matrix is (nearly) orthogonal: its singular values are lr times optax's
    # shape factor sqrt(max(1, fan_out / fan_in)), to within the quintic Newton-Schulz iteration's
    # band (about 0.7 to 1.15).
    s = np.linalg.svd(np.asarray(ours[0]["components"]["a"]["V"]), compute_uv=False)  # (3, 8)
    s = s / (0.02 * np.sqrt(8 / 3))
    assert np.all((s > 0.6) & (s < 1.2)), s


def test_muon_on_the_ci_batches_per_component_weights_and_leaves_biases_to_adam():
    """The per-component MLP's w (C, fan_in, fan_out) is C matrices; its b (C, width) is 2-D but a
    bias, which optax's rank rule would orthogonalise."""
    _, params = decomposition()  # ci_fn "mlp": one MLP per component
    ci = params["ci"]
    dims = optimizers.muon_dims(ci)
    assert dims["a"][0]["b"] is None and dims["a"][0]["w"] is not None
    ours, _ = updates(optimizers.make("muon", 0.02), ci, steps=2)
    w = ci["b"][0]["w"]  # (4, 1, 4): one 1x4 matrix per component
    grads = [grads_like(ci, step)["b"][0]["w"] for step in range(2)]  # as updates() draws
    for c in range(w.shape[0]):  # by hand: component c alone, with optax's 2-D rule
        opt = optax.contrib.muon(0.02)
        p = {"w": w[c]}
        state = opt.init(p)
        for step in range(2):
            u, state = opt.update({"w": grads[step][c]}, state, p)
            p = optax.apply_updates(p, u)
            np.testing.assert_allclose(ours[step]["b"][0]["w"][c], u["w"], rtol=1e-5, atol=1e-7)
    # Every bias moves by muon's Adam fallback (AdamW without decay, Nesterov as muon's).
    fallback, _ = updates(optax.adamw(0.02, weight_decay=0.0, nesterov=True), ci, steps=2)
    for step in range(2):
        for site in ("a", "b"):
            for layer in range(2):
                np.testing.assert_array_equal(ours[step][site][layer]["b"],
                                              fallback[step][site][layer]["b"])


def test_each_group_gets_its_own_lr_exactly():
    d, params = decomposition()
    a, b = 0.05, 0.003
    groups = optimizers.groups_from_config(
        {"components": {"name": "sgd", "lr": a, "options": {}},
         "ci": {"name": "sgd", "lr": b, "options": {}}}, 1e-3, 1e-3)
    (u,), _ = updates(spd.make_optimizer(d, 1e-3, groups=groups), params, steps=1)
    g = grads_like(params, 0)
    assert_trees_equal(u["components"], jax.tree.map(lambda x: -a * x, g["components"]))
    assert_trees_equal(u["ci"], jax.tree.map(lambda x: -b * x, g["ci"]))


def test_a_group_lr_follows_the_run_schedule_scaled_to_its_peak():
    schedule = spdjax.training.schedules.make_schedule("cosine", 1e-3, 100, warmup_frac=0.1)
    group = optimizers.scaled(schedule, 0.02, 1e-3)
    steps = jnp.arange(100)
    np.testing.assert_allclose(jax.vmap(group)(steps), 20 * jax.vmap(schedule)(steps),
                               rtol=1e-6, atol=1e-12)
    assert optimizers.scaled(schedule, 0.0, 1e-3) is schedule
    assert optimizers.scaled(schedule, 1e-3, 1e-3) is schedule


# ~18 s; Muon's update is tested against optax by hand above, resuming by the checkpoint tests
@pytest.mark.slow
def test_a_managed_muon_run_resumes_from_its_checkpoint_to_the_same_params(tmp_path):
    overrides = {"optimizer.components.name": "muon", "optimizer.components.lr": 0.01,
                 "optimizer.components.options": {"beta": 0.9},
                 "optimizer.ci.name": "adamw", "optimizer.ci.options": {"weight_decay": 1e-3}}
    whole = spdjax.setup(tms(**overrides))
    loop.train(whole)
    first = spdjax.setup(tms(**overrides), tmp_path / "run")
    loop.train(first, 5)
    loop.close(first)
    again = spdjax.setup(tms(**overrides), tmp_path / "run")
    assert again.step == 5
    loop.train(again)
    loop.close(again)
    assert_trees_equal(jax.device_get(again.params), jax.device_get(whole.params))
    assert_trees_equal(jax.device_get(again.state.opt_state), jax.device_get(whole.state.opt_state))
    assert set(whole.state.opt_state[0]) == {"components", "ci"}  # per group (no clipping here)


@pytest.mark.slow  # ~20 s; Muon's state is per member like Adam's (test_ensemble.py)
def test_a_vmapped_ensemble_member_with_muon_equals_its_seed_run_alone():
    muon = {"optimizer.components.name": "muon", "optimizer.components.lr": 0.01, "steps": 5}
    with log_to(io.StringIO()):
        ens = spdjax.setup_ensemble(tms(ensemble=2, seed=4, ensemble_mode="vmap", **muon))
        ensemble.train(ens)
        alone = spdjax.setup(tms(seed=5, **muon))
        loop.train(alone)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(ens.member_params(ens.state, 1)), jax.device_get(alone.params))


def test_the_command_line_sets_a_group_and_its_options():
    argv = ["spdjax", f"--config={configs.config_path('tms')}:5-2",
            "--config.optimizer.components.name=muon", "--config.optimizer.components.lr=0.02",
            "--config.optimizer.ci.options={'b1': 0.8}"]
    fv = flags.FlagValues()  # the CLI's flag, parsed apart from the process's own flags
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    specs = optimizers.parse_groups(holder.value.optimizer.to_dict())
    assert specs["components"] == optimizers.GroupSpec("muon", 0.02, {})
    assert specs["ci"] == optimizers.GroupSpec("adam", 0.0, {"b1": 0.8})


@pytest.mark.parametrize("override, message", [
    ({"optimizer.components.name": "lion"}, r"Unknown optimizer 'lion'; expected one of"),
    ({"optimizer.ci.options": {"beta": 0.9}},
     r"optimizer.ci: Optimizer 'adam' takes no options \['beta'\]"),
    ({"optimizer.ci.lr": -0.1}, r"optimizer.ci.lr must be a number > 0 .* got -0.1"),
])
def test_bad_entries_fail_at_setup_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        spdjax.setup(tms(**override))


def test_bad_values_are_refused_by_the_registry_and_make_optimizer():
    with pytest.raises(ValueError, match=r"learning rate must be a positive number .* got 0.0"):
        optimizers.make("sgd", 0.0)
    with pytest.raises(ValueError, match="must have exactly the groups"):
        optimizers.parse_groups({"components": {"name": "adam"}})
    with pytest.raises(ValueError, match=r"takes name, lr and options; got also \['b1'\]"):
        optimizers.parse_groups({g: {"name": "adam", "b1": 0.9} for g in optimizers.GROUPS})
    d, _ = decomposition()
    with pytest.raises(ValueError, match=r"groups \['adversary'\]"):
        spd.make_optimizer(d, 1e-3, groups={"adversary": optax.adam(1e-3)})


def test_the_guides_example_runs_as_written():
    guide = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guides" / "methods.md"
    section = guide.read_text().split("### Optimizers", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(code, str(guide), "exec"), namespace)
    assert set(namespace["state"]) == {"components", "ci"}
