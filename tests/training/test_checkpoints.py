"""Self-describing checkpoints: arrays by name, metadata, the format-1 fixture, format 0."""

import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import spdjax
from spdjax.training import checkpoints
from spdjax.training.checkpoints import Checkpointer, CheckpointFormatError

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_format1"


def _state():
    return {"step": jnp.int32(3),
            "params": {"components": {"layers_0/mlp_in": {"V": jnp.ones((3, 2)),
                                                          "U": jnp.arange(4.0).reshape(2, 2)}},
                       "ci": {"a.b": [{"w": jnp.full((2,), 2.0)}]}}}


def test_leaf_names_escape_site_names_and_round_trip():
    names = checkpoints.leaf_names(_state())
    assert "params.components.layers_0%2Fmlp_in.V" in names
    assert "params.ci.a%2Eb.0.w" in names
    tree = checkpoints.unflatten_names(dict(zip(names, jax.tree.leaves(_state()))))
    assert set(tree["params"]["components"]) == {"layers_0/mlp_in"}
    assert set(tree["params"]["ci"]) == {"a.b"}


def test_save_restore_by_name_with_meta(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(3, _state(), {"method": "spd", "config": {"lr": 1e-3}})
    ckpt.wait()
    meta = ckpt.read_meta()
    assert (meta["format_version"], meta["step"], meta["method"]) == (1, 3, "spd")
    assert meta["config"] == {"lr": 1e-3}
    template = jax.tree.map(jnp.zeros_like, _state())
    chex.assert_trees_all_equal(ckpt.restore(template), _state())
    raw = ckpt.restore_arrays()
    np.testing.assert_array_equal(raw["params"]["components"]["layers_0/mlp_in"]["U"],
                                  np.arange(4.0).reshape(2, 2))
    sub = ckpt.restore_subtree(template["params"], "params")
    chex.assert_trees_all_equal(sub, _state()["params"])
    ckpt.close()


def test_restore_into_a_different_state_names_the_differences(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(3, _state())
    ckpt.wait()
    other = _state()
    other["params"]["components"]["renamed"] = other["params"]["components"].pop("layers_0/mlp_in")
    with pytest.raises(CheckpointFormatError, match=r"missing \['params.components.renamed.U'"):
        ckpt.restore(other)
    ckpt.close()


def test_format0_positional_checkpoints_still_restore(tmp_path):
    """Checkpoints written before format 1 (a list of leaves, no meta) restore by position."""
    manager = ocp.CheckpointManager(tmp_path / "c",
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(7, args=ocp.args.StandardSave(jax.tree.leaves(_state())))
    manager.wait_until_finished()
    manager.close()
    ckpt = Checkpointer(tmp_path / "c")
    assert ckpt.read_meta() == {"format_version": 0, "step": 7}
    chex.assert_trees_all_equal(ckpt.restore(jax.tree.map(jnp.zeros_like, _state())), _state())
    with pytest.raises(CheckpointFormatError, match="format 0"):
        ckpt.restore_arrays()
    ckpt.close()


def test_the_format1_fixture_loads_for_analysis_evaluates_as_recorded_and_resumes(tmp_path):
    # One test for both readers of the fixture: they share the load and its compiled programs.
    wd = tmp_path / "run"
    shutil.copytree(FIXTURE, wd)
    loaded = spdjax.load(wd)
    recorded = json.loads((FIXTURE / "summary.json").read_text())
    assert loaded.step == 20 and loaded.config.C == 6 and loaded.config.variant == "5-2"
    assert set(loaded.params["components"]) == {"linear1", "linear2"}
    chex.assert_shape(loaded.params["components"]["linear1"]["V"], (5, 6))
    again = loaded.evaluate()
    for key in ("mmcs", "mmcs_std", "ml2r", "ml2r_std"):
        np.testing.assert_allclose(again[key], recorded[key], rtol=1e-6, err_msg=key)
    assert again["ci_errors"] == recorded["ci_errors"]

    # Its full train state resumes. Fields added since the fixture was written get their
    # defaults (and only change reporting).
    config = spdjax.config.from_dict(Checkpointer(wd / "checkpoints").read_meta()["config"])
    run = spdjax.setup(config, wd)  # restores step, params and optimizer state by name
    assert run.step == 20
    chex.assert_trees_all_close(jax.device_get(run.params), loaded.params)
    summary = spdjax.evaluate(run)
    np.testing.assert_allclose(summary["loss"]["total"], recorded["loss"]["total"], rtol=1e-5)
    spdjax.training.loop.close(run)
