"""Harvest maths against NumPy (counts, co-occurrence, token precision / recall / PMI exact),
the blocked co-occurrence against the dense one, reservoir uniformity, the ground-truth
reading on a constructed case, and a run harvested, saved and read back."""

import contextlib
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.analysis import harvest as H
from spdjax.cli import common
from spdjax.core.target import Site, from_function, weight_at

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_format1"


def _np_stats(ci, present, out_tok, thr, n_out):
    f = (ci > thr).astype(np.int64)
    joint_in, joint_out = f.T @ present, f.T @ np.eye(n_out, dtype=np.int64)[out_tok]
    return f, joint_in, joint_out


def test_observe_equals_numpy_on_features():
    spec = H.HarvestSpec(sites=("a", "b"), sizes=(3, 4), kind="features", n_in=5, n_out=4,
                         threshold=0.3, examples=4, block=2)
    rng = np.random.default_rng(0)
    state, batches = H.init_state(spec), []
    obs = jax.jit(lambda s, g, x, o, k, i: H.observe(spec, s, g, x, o, k, i))
    for i in range(3):
        ci = rng.uniform(0, 1, (16, 7)).astype(np.float32) ** 2
        x = (rng.uniform(-1, 1, (16, 5)) * (rng.uniform(size=(16, 5)) < 0.4)).astype(np.float32)
        out = rng.integers(0, 4, 16).astype(np.int32)
        batches.append((ci, x, out))
        state = obs(state, ci, x, out, jax.random.key(i), i)
    ci, x, out = (np.concatenate(v) for v in zip(*batches))
    present = (x != 0).astype(np.int64)
    f, joint_in, joint_out = _np_stats(ci, present, out, 0.3, 4)
    h = H.Harvest.from_state(spec, state, {})
    assert h.n == 48
    np.testing.assert_array_equal(h.count, f.sum(0))
    np.testing.assert_allclose(h.mean_ci, ci.mean(0), rtol=1e-5)
    np.testing.assert_array_equal(h.cooccurrence, f.T @ f)
    np.testing.assert_array_equal(h.state["in_fire"], joint_in)
    np.testing.assert_array_equal(h.state["out_fire"], joint_out)
    st = h.token_stats("input")
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_allclose(st["precision"], joint_in / f.sum(0)[:, None])
        np.testing.assert_allclose(st["recall"], joint_in / present.sum(0)[None])
        np.testing.assert_allclose(st["pmi"], np.log(joint_in * 48 / (
            f.sum(0)[:, None] * present.sum(0)[None])))
    so = h.token_stats("output")
    np.testing.assert_allclose(so["recall"], joint_out / np.bincount(out, minlength=4)[None])
    # computed once per harvest: pages and summaries ask for them per subcomponent
    assert h.token_stats("input") is st and h.token_stats("output") is so
    for c in range(7):  # every kept example is a real firing of that subcomponent
        for e in h.examples(h.names[c]):
            n = e["batch"] * 16 + e["pos"]
            assert ci[n, c] > 0.3 and e["ci"] == pytest.approx(ci[n, c])
            np.testing.assert_array_equal(e["inputs"], x[n])
        assert len(h.examples(h.names[c])) == min(4, f[:, c].sum())


def test_token_windows_and_blocked_cooccurrence():
    spec = H.HarvestSpec(sites=("s",), sizes=(6,), kind="tokens", n_in=9, n_out=9,
                         threshold=0.5, examples=3, window=2)
    rng = np.random.default_rng(1)
    ci = rng.uniform(0, 1, (2, 7, 6)).astype(np.float32)
    ids = rng.integers(0, 9, (2, 7)).astype(np.int32)
    state = H.observe(spec, H.init_state(spec), ci, ids, ids, jax.random.key(0), 0)
    h = H.Harvest.from_state(spec, state, {})
    np.testing.assert_array_equal(h.state["in_count"], np.bincount(ids.ravel(), minlength=9))
    pad = np.pad(ids, ((0, 0), (2, 2)), constant_values=-1)
    cpad = np.pad(ci, ((0, 0), (2, 2), (0, 0)), constant_values=np.nan)
    for c in range(6):
        for e in h.examples(f"s:{c}"):
            b, t = divmod(e["pos"], 7)
            np.testing.assert_array_equal(e["tokens"], pad[b, t:t + 5])
            np.testing.assert_array_equal(e["window_ci"], cpad[b, t:t + 5, c])
    fires = jnp.asarray(rng.uniform(size=(50, 37)) < 0.3)
    np.testing.assert_array_equal(H.cooccurrence(fires, 8), H.cooccurrence(fires, 1024))


def test_reservoir_is_uniform_over_all_firings():
    """A subcomponent firing on each of 10 positions in each of 8 batches: over 3000 passes
    with other keys, each of the 80 firings is kept about 3000 * 4 / 80 = 150 times. Chi-square
    with 79 degrees of freedom has mean 79 and sd 12.6; the bound 79 + 6 sd fails with
    probability below 1e-6 for a uniform sampler, and catches e.g. a bias to later batches."""
    spec = H.HarvestSpec(sites=("s",), sizes=(1,), kind="features", n_in=1, n_out=1,
                         examples=4)
    trials = 3000
    obs = jax.jit(jax.vmap(lambda s, k, i: H.observe(
        spec, s, jnp.ones((10, 1)), jnp.ones((10, 1)), jnp.zeros(10, jnp.int32), k, i),
        in_axes=(0, 0, None)))
    state = jax.vmap(lambda _: H.init_state(spec))(jnp.arange(trials))
    for i in range(8):
        state = obs(state, jax.random.split(jax.random.key(i), trials), i)
    cell = np.asarray(state["ex_batch"][:, 0] * 10 + state["ex_pos"][:, 0]).ravel()
    counts = np.bincount(cell, minlength=80)
    expected = trials * 4 / 80
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert counts.sum() == trials * 4 and chi2 < 79 + 6 * 12.6, chi2


def test_feature_subcomponents_are_read_off_a_constructed_case():
    """The ResidMLP ground truth in miniature: mlp_in subcomponent perm[i] fires exactly when
    feature i is active, mlp_out subcomponent perm2[i] too (plus rare noise); the harvest's
    best subcomponent by recall per feature is that one, with precision 1 (mlp_in) and near 1
    (mlp_out), and the two co-occur."""
    n, C = 6, 8
    spec = H.HarvestSpec(sites=("mlp_in", "mlp_out"), sizes=(C, C), kind="features", n_in=n,
                         n_out=n)
    rng = np.random.default_rng(0)
    perm, perm2 = rng.permutation(C)[:n], rng.permutation(C)[:n]
    state = H.init_state(spec)
    for i in range(4):
        x = (rng.uniform(-1, 1, (256, n)) * (rng.uniform(size=(256, n)) < 0.1)).astype(np.float32)
        ci = np.zeros((256, 2 * C), np.float32)
        ci[:, perm] = (x != 0)
        ci[:, C + perm2] = (x != 0) | (rng.uniform(size=(256, n)) < 0.002)
        state = H.observe(spec, state, ci, x, np.argmax(np.abs(x), -1), jax.random.key(i), i)
    h = H.Harvest.from_state(spec, state, {})
    for site, p, exact in (("mlp_in", perm, True), ("mlp_out", perm2, False)):
        best, recall, precision = h.best_by_recall(site)
        np.testing.assert_array_equal(best, p)
        assert np.all(recall == 1.0)
        assert np.all(precision == 1.0) if exact else np.all(precision > 0.9)
    pairs = h.cooccurrence[perm, C + perm2] / h.count[perm]
    assert np.all(pairs == 1.0)
    # the benchmark's read-off (benchmarks/reproduce/harvest_resid_mlp.py) of the same harvest
    from benchmarks.reproduce import harvest_resid_mlp

    r = harvest_resid_mlp.read_off(h, None, "mlp_in", "mlp_out")
    assert r["distinct_best_mlp_in"] == r["distinct_best_mlp_out"] == n
    assert r["shared_best_mlp_in"] == 0 and r["precision_ge_90"] == n
    assert r["recall_min"] == r["p_out_given_in_min"] == 1.0 and r["partner_is_best_out"] == n
    assert r["live_mlp_out"] == n and r["live_mlp_out_density_ge_90"] == 0
    assert "attribution_top_source_is_feature" not in r


def test_harvest_of_a_run_saves_and_loads(tmp_path):
    run = spdjax.load(ROOT / "tests" / "fixtures" / "checkpoint_format1")
    h = H.harvest(run, n_batches=2, batch_size=32, out_dir=tmp_path, examples=3)
    back = H.load_harvest(tmp_path)
    assert back.spec == h.spec and back.n == h.n == 64
    np.testing.assert_array_equal(back.cooccurrence, h.cooccurrence)
    assert back.spec.threshold == run.config.l0_threshold
    assert (tmp_path / "summary.json").exists()
    with pytest.raises(ValueError, match="No subcomponent 'linear1:99'"):
        back.examples("linear1:99")


def test_an_interrupted_and_resumed_harvest_equals_an_uninterrupted_one(tmp_path):
    run = spdjax.load(ROOT / "tests" / "fixtures" / "checkpoint_format1")
    kw = dict(n_batches=5, batch_size=16, examples=3)
    whole = H.harvest(run, **kw)

    def stop_after_3(done, total, seconds):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        H.harvest(run, out_dir=tmp_path, save_every=2, report=stop_after_3, **kw)
    assert spdjax.analysis.streaming.read_meta(tmp_path / H.STATE_FILE)["done"] == 3
    seen = []
    resumed = H.harvest(run, out_dir=tmp_path, report=lambda d, t, s: seen.append(d), **kw)
    assert seen == [4, 5]
    for k, v in whole.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)
    with pytest.raises(ValueError, match="other settings: examples 3 \\(now 4\\)"):
        H.harvest(run, out_dir=tmp_path, **dict(kw, examples=4))
    # fewer batches than the saved state holds: refused, the state untouched
    with pytest.raises(ValueError, match="holds 5 finished batches, more than the 4 asked for: "
                                         "pass --batches >= 5"):
        H.harvest(run, out_dir=tmp_path, **dict(kw, n_batches=4))
    assert spdjax.analysis.streaming.read_meta(tmp_path / H.STATE_FILE)["done"] == 5
    # more batches: continues from 5 to exactly the uninterrupted 7
    seen.clear()
    longer = H.harvest(run, out_dir=tmp_path, report=lambda d, t, s: seen.append(d),
                       **dict(kw, n_batches=7))
    assert seen == [6, 7]
    for k, v in H.harvest(run, **dict(kw, n_batches=7)).state.items():
        np.testing.assert_array_equal(longer.state[k], v, err_msg=k)


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_harvests_a_run(tmp_path):
    p = _cli("-m", "spdjax.harvest", f"--workdir={FIXTURE}", f"--out={tmp_path}", "--batches=2",
             "--batch_size=16", "--save_every=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "harvest: batch 2/2" in p.stderr and "32 examples;" in p.stdout
    assert H.load_harvest(tmp_path).n == 32


def _pass(tmp_path, compute, workdir=FIXTURE):
    """``common.resumable_pass`` in this process: ``(exit code or None, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.resumable_pass(label="t", workdir=str(workdir), step=None,
                                  out=str(tmp_path), subdir="t", state_file=H.STATE_FILE,
                                  compute=compute, describe=lambda r: f"result {r}")
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_the_commands_shared_main_reports_errors_and_what_an_interrupt_saved(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(common, "stop_on_signals", lambda: None)  # no process-wide handler
    assert _pass(tmp_path, lambda run, out, progress: 7)[:2] == (None, f"{tmp_path}\nresult 7\n")
    code, _, err = _pass(tmp_path, None, workdir=tmp_path / "nothing")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'nothing'} holds no run"), err

    def interrupted_after(batches):
        def compute(run, out, progress):
            if batches:
                spdjax.analysis.streaming.save_state(out / H.STATE_FILE, {}, {"done": batches})
            raise KeyboardInterrupt
        return compute

    code, _, err = _pass(tmp_path, interrupted_after(0))
    assert code == 130 and err == "error: interrupted before the first batch finished: no state " \
        "saved (t).\n"
    code, _, err = _pass(tmp_path, interrupted_after(3))
    assert code == 130 and "the state after 3 batches is saved" in err
    code, _, err = _pass(tmp_path, interrupted_after(0))
    assert code == 130 and "the earlier state of 3 batches" in err and "resume" in err
    with pytest.raises(ValueError, match="--seeds must be comma-separated ints, e.g. "
                                         "--seeds=0,1,2; got '0,x'"):
        common.int_list("--seeds", ["0", "x"])


def test_token_ids_beyond_the_output_width_are_counted():
    """A sequence model reading 7 token ids and predicting 3 outputs: the input vocabulary is
    the embedding's 7, so ids 3..6 are counted (not dropped)."""
    target = from_function(
        lambda p, ids, hooks: hooks("w", hooks("embed", ids, lambda i: jnp.take(
            p["E"], i, axis=0)), lambda h: h @ p["w"]),
        [Site("embed", "embed", 7, 4, weight_at(("E",))), Site("w", "linear", 4, 3,
                                                               weight_at(("w",)))])
    tp = {"E": jax.random.normal(jax.random.key(0), (7, 4)),
          "w": jax.random.normal(jax.random.key(1), (4, 3))}
    d = spdjax.decompose(target, {"w": 2})
    run = types.SimpleNamespace(
        decomposition=d, params=d.init(jax.random.key(2), tp), target_params=tp, step=0,
        experiment=types.SimpleNamespace(
            sample=lambda key, n: jax.random.randint(key, (n, 5), 0, 7)))
    h = H.harvest(run, n_batches=2, batch_size=8, threshold=0.0)
    assert h.spec.n_in == 7 and h.spec.n_out == 3
    counts = h.state["in_count"]
    assert counts.sum() == 2 * 8 * 5 and counts[3:].sum() > 0
    np.testing.assert_array_equal(h.state["in_fire"].sum(1), h.count)  # one token per firing


@pytest.mark.slow  # three processes; the library test above covers the resume itself
def test_cli_killed_with_sigterm_resumes_to_the_uninterrupted_result(tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "checkpoint_format1", wd)
    args = ["-m", "spdjax.harvest", f"--workdir={wd}", "--batches=40", "--batch_size=64",
            "--save_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    for line in proc.stderr:
        if "harvest: batch" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "batches is saved" in err, err[-2000:]
    done = spdjax.analysis.streaming.read_meta(wd / "analysis" / "harvest" / H.STATE_FILE)["done"]
    assert 0 < done < 40
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _cli(*args, f"--out={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = H.load_harvest(wd), H.load_harvest(tmp_path / "whole")
    for k, v in b.state.items():
        np.testing.assert_array_equal(a.state[k], v, err_msg=k)
