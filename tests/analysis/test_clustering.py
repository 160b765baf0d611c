"""MDL clustering against NumPy: the merge cost on a 4-subcomponent case by hand, every step of
a merge against a brute-force recomputation of the description length, the range sampler, the
distances between clusterings against brute force over relabellings, the ResidMLP ground truth
on a constructed case, and a run clustered over seeds, resumed per seed, and its command."""

import itertools
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.analysis import clustering as K

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_format1"


def _np_length(fires, groups, alpha):
    """Description length (bits / example) of a grouping, from the firings."""
    k = len(groups)
    return sum(fires[:, g].any(1).mean() * (np.log2(k) + alpha * len(g)) for g in groups)


def test_merge_cost_of_a_four_subcomponent_case_by_hand():
    # 0 and 1 fire together on half the examples, 2 and 3 alone on a quarter each
    fires = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
    co = jnp.asarray(fires.T.astype(np.float32) @ fires.astype(np.float32) / 4)
    cost = np.asarray(K.merge_costs(co, jnp.ones(4), jnp.ones(4, bool), 1.0))
    # L = 1.5 (2 + 1) = 4.5 bits; merged {0,1}: 0.5 (log2 3 + 2) + 2 * 0.25 (log2 3 + 1)
    assert cost[0, 1] == pytest.approx(np.log2(3) + 1.5 - 4.5, abs=1e-6)
    # {2,3}: 2 * 0.5 (log2 3 + 1) + 0.5 (log2 3 + 2); {0,2}: 0.75 (log2 3 + 2) + 0.75 (log2 3 + 1)
    assert cost[2, 3] == pytest.approx(1.5 * np.log2(3) + 2 - 4.5, abs=1e-6)
    assert cost[0, 2] == pytest.approx(1.5 * np.log2(3) + 2.25 - 4.5, abs=1e-6)
    h = K.merge(fires, alpha=1.0)
    assert h.mdl[0] == pytest.approx(4.5) and h.pairs[0].tolist() == [0, 1]
    assert h.costs[0] == pytest.approx(np.log2(3) - 3, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_every_merge_is_the_cheapest_by_brute_force(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    fires = rng.uniform(size=(300, 7)) < rng.uniform(0.05, 0.5, 7)
    fires[:, 5] = fires[:, 2] | (rng.uniform(size=300) < 0.02)  # a near partner
    fires[:, 6] = False  # dead: never merged
    h = K.merge(fires, alpha=alpha)
    assert h.n_iters == 5 and h.live.tolist() == [True] * 6 + [False]
    groups = [[c] for c in range(6)]
    for t in range(h.n_iters):
        L = _np_length(fires, groups, alpha)
        assert h.mdl[t] == pytest.approx(L, rel=1e-5)
        costs = {}
        for a, b in itertools.combinations(range(len(groups)), 2):
            merged = [g for n, g in enumerate(groups) if n not in (a, b)] + [groups[a] + groups[b]]
            pair = tuple(sorted((min(groups[a]), min(groups[b]))))
            costs[pair] = _np_length(fires, merged, alpha) - L
        best = min(costs, key=costs.get)
        assert tuple(h.pairs[t]) == best and h.costs[t] == pytest.approx(costs[best], abs=1e-5)
        i, j = best
        gi, gj = (next(g for g in groups if min(g) == x) for x in (i, j))
        groups = [g for g in groups if g not in (gi, gj)] + [gi + gj]
    assert h.mdl[-1] == pytest.approx(_np_length(fires, groups, alpha), rel=1e-5)
    assert np.all(h.labels(h.n_iters)[:6] == 0) and h.labels(0)[6] == -1


def test_range_sampler_draws_among_the_near_cheapest_pairs():
    rng = np.random.default_rng(0)
    fires = rng.uniform(size=(200, 8)) < 0.2
    greedy = K.merge(fires)
    tiny = K.merge(fires, pair_threshold=1e-9, seed=3)
    np.testing.assert_array_equal(tiny.pairs, greedy.pairs)
    draws = [K.merge(fires, pair_threshold=1.0, seed=s).pairs[0].tolist() for s in range(8)]
    assert len({tuple(d) for d in draws}) > 1
    np.testing.assert_array_equal(K.merge(fires, pair_threshold=1.0, seed=5).pairs,
                                  K.merge(fires, pair_threshold=1.0, seed=5).pairs)
    with pytest.raises(ValueError, match="pair_threshold must be in"):
        K.merge(fires, pair_threshold=2.0)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            K.merge(fires, alpha=bad)


def _hamming_brute(a, b):
    """1 - best agreement over every injective relabelling of ``a``'s clusters."""
    ua, ub = np.unique(a), np.unique(b)
    best = 0
    targets = list(ub) + [None] * len(ua)
    for perm in itertools.permutations(targets, len(ua)):
        best = max(best, sum(np.sum((a == x) & (b == y)) for x, y in zip(ua, perm)
                             if y is not None))
    return 1 - best / len(a)


def test_partition_distances_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.integers(0, 3, 7), rng.integers(0, 4, 7)
        assert K.partition_distance(a, b) == pytest.approx(_hamming_brute(a, b))
        relabel = rng.permutation(3)[a] + 10
        assert K.partition_distance(relabel, b) == pytest.approx(K.partition_distance(a, b))
        assert K.partition_distance(a, relabel) == 0.0
        assert K.partition_distance(a, relabel, method="vi") == 0.0
    # VI of {0,1},{2,3} against {0,2},{1,3}: H(A|B) = H(B|A) = 1 bit
    assert K.partition_distance([0, 0, 1, 1], [0, 1, 0, 1], method="vi") == pytest.approx(2.0)
    # dead (-1) are singletons: two dead are not one cluster
    assert K.partition_distance([-1, -1, 0], [0, 0, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="method must be"):
        K.partition_distance(a, b, method="ari")


def test_a_features_mlp_in_and_mlp_out_end_in_one_cluster_on_a_constructed_case():
    """The ResidMLP ground truth in miniature: feature i's mlp_in subcomponent perm[i] and
    mlp_out subcomponent perm2[i] fire exactly when the feature is active (sparse, independent
    features). At the MDL minimum every pair is one cluster and no cluster holds two features,
    on every data seed (distance 0 between seeds)."""
    F, C = 10, 12
    rng = np.random.default_rng(0)
    perm, perm2 = rng.permutation(C)[:F], rng.permutation(C)[:F]
    labels = []
    for seed in range(3):
        x = np.random.default_rng(seed).uniform(size=(4000, F)) < 0.05
        fires = np.zeros((4000, 2 * C), bool)
        fires[:, perm], fires[:, C + perm2] = x, x
        h = K.merge(fires, alpha=1.0)
        lab = h.labels()
        assert np.all(lab[perm] == lab[C + perm2])
        assert len(set(lab[perm])) == F and h.k() == F
        labels.append(lab)
    assert np.all(K.distance_matrix(labels) == 0.0)


def test_the_converged_resid_mlp_structure_needs_alpha_2_not_1():
    """The converged ResidMLP 1-layer decomposition in miniature (RESULTS.md, "Reading a
    decomposition: clustering"): one sparse mlp_in subcomponent per feature and a dense mlp_out
    block whose members each fire on half the examples with any feature active. alpha 2 gives
    the known mechanisms, the block and every mlp_in alone, on each data seed; alpha 1 also
    pairs mlp_in subcomponents that never fire together (arbitrary pairs, so seeds disagree)."""
    F, B = 20, 10
    at_2, at_1 = [], []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        x = rng.uniform(size=(4000, F)) < 0.05
        fires = np.concatenate([x, x.any(1)[:, None] & (rng.uniform(size=(4000, B)) < 0.5)], 1)
        lab = K.merge(fires, alpha=2.0).labels()
        assert len(set(lab[F:])) == 1 and len(set(lab[:F])) == F and lab[0] != lab[F]
        at_2.append(lab)
        lab = K.merge(fires, alpha=1.0).labels()
        assert len(set(lab[F:])) == 1 and len(set(lab[:F])) == F // 2  # pairs
        at_1.append(lab)
    assert K.distance_matrix(at_2)[0, 1] == 0.0 < K.distance_matrix(at_1)[0, 1]


def test_cluster_a_run_over_seeds_resumes_per_seed(tmp_path):
    run = spdjax.load(FIXTURE)
    kw = dict(n_batches=2, batch_size=32, out_dir=tmp_path)
    computed = []
    first = K.cluster(run, seeds=(0, 1), progress=lambda s: computed.append(s), **kw)
    assert computed == [0, 1]
    lines = []
    more = K.cluster(run, seeds=(0, 1, 2), progress=lambda s: computed.append(s),
                     log=lines.append, **kw)
    assert computed == [0, 1, 2] and "seed 0: finished earlier" in lines[0]
    for s in (0, 1):
        np.testing.assert_array_equal(more.histories[s].pairs, first.histories[s].pairs)
    back = K.load_clustering(tmp_path)
    assert back.seeds == [0, 1, 2]
    np.testing.assert_array_equal(back.distances(), more.distances())
    summary = back.summary()
    assert summary["settings"]["threshold"] == run.config.l0_threshold
    assert set(summary["seeds"]) == {"0", "1", "2"} and (tmp_path / K.SUMMARY_FILE).exists()
    with pytest.raises(ValueError, match="other settings: alpha 1.0 \\(now 2.0\\)"):
        K.cluster(run, seeds=(0,), alpha=2.0, **kw)
    with pytest.raises(ValueError, match="seeds is empty"):
        K.cluster(run, seeds=(), **kw)
    with pytest.raises(ValueError, match="iteration must be in"):
        K.cluster(run, seeds=(0,), iteration=10 ** 6, **kw)
    with pytest.raises(FileNotFoundError, match="No clustering in"):
        K.load_clustering(tmp_path / "nothing")
    # fewer seeds: clustering.json lists them, and only they are read back (seed_2.npz stays)
    K.cluster(run, seeds=(1, 0), **kw)
    assert K.load_clustering(tmp_path).seeds == [1, 0] and (tmp_path / "seed_2.npz").exists()
    # resume=False (--fresh) deletes the saved seeds first
    K.cluster(run, seeds=(0,), resume=False, **kw)
    assert sorted(p.name for p in tmp_path.glob("seed_*.npz")) == ["seed_0.npz"]
    assert K.load_clustering(tmp_path).seeds == [0]


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "spdjax.cluster", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_writes_histories_distances_and_figure(tmp_path):
    p = _cli(f"--workdir={FIXTURE}", f"--out={tmp_path}", "--seeds=0,1", "--batches=2",
             "--batch_size=32")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "cluster seed 1: batch 2/2" in p.stderr and "distance between seeds" in p.stdout
    for name in ("seed_0.npz", "seed_1.npz", "clustering.json", "clustering.png"):
        assert (tmp_path / name).exists(), name
