"""voxdiff.metrics against a brute-force KD-tree implementation of the written definitions (float64), and the one
scorer voxdiff.scoring (references extracted once, provenance, empty / bloated counts)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from voxdiff import metrics, metrics_backends, scoring
from voxdiff.errors import VoxdiffError

# ------------------------------------------------------------------------------------------ brute-force reference


def _points(grid: np.ndarray) -> np.ndarray:
    return np.argwhere(grid > 0).astype(np.float64) / (grid.shape[-1] - 1)


def _cd(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) == 0 or len(y) == 0:
        return math.inf
    dy, _ = cKDTree(x).query(y)  # each point of y to its nearest in x
    dx, _ = cKDTree(y).query(x)
    return float(np.mean(dy**2) + np.mean(dx**2))


def _brute_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    pa, pb = [_points(g) for g in a], [_points(g) for g in b]
    return np.array([[_cd(x, y) for y in pb] for x in pa])


def _brute_jsd(s: np.ndarray, refs: np.ndarray, eps: float = 1e-10) -> float:
    p = s.sum(0).astype(np.float64).ravel()
    q = refs.sum(0).astype(np.float64).ravel()
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.sum((u + eps) * np.log((u + eps) / (v + eps))))

    return (kl(p, m) + kl(q, m)) / 2


def _brute_all(s: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    d = _brute_matrix(np.concatenate([s, refs]), np.concatenate([s, refs]))
    n = len(s)
    d_sr = d[:n, n:]
    mmd = float(np.mean(d_sr.min(axis=0)))
    live = np.isfinite(d_sr).any(axis=1)
    cov = len(set(np.argmin(d_sr[live], axis=1).tolist())) / len(refs)
    np.fill_diagonal(d, np.inf)
    lab = np.r_[np.zeros(n), np.ones(len(refs))]
    nn = np.argmin(d, axis=1)
    correct = (lab[nn] == lab) | ~np.isfinite(d.min(axis=1))
    return {"jsd": _brute_jsd(s, refs), "mmd": mmd, "cov": cov, "nna": float(correct.mean())}


# ------------------------------------------------------------------------------------------------------- fixtures


def _sparse_set(n: int, res: int, rng: np.random.Generator, density: float = 0.01) -> np.ndarray:
    """Random sparse shapes: a few blobs of surface-like points plus noise voxels (never empty)."""
    g = np.zeros((n, res, res, res), np.uint8)
    for i in range(n):
        c = rng.uniform(0.3, 0.7, 3) * (res - 1)
        k = max(4, int(density * res**3))
        p = rng.normal(size=(k, 3))
        p = c + p / np.linalg.norm(p, axis=1, keepdims=True) * rng.uniform(0.1, 0.35) * res
        p = np.clip(np.rint(p), 0, res - 1).astype(int)
        g[i][tuple(p.T)] = 1
    return g


@pytest.fixture(scope="module")
def sets() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {res: (_sparse_set(14, res, rng), _sparse_set(11, res, rng)) for res in (16, 32)}


# ------------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("res", [16, 32])
def test_evaluate_matches_brute_force(sets, res):
    s, ref = sets[res]
    got = metrics.evaluate(s, ref, progress=False)
    want = _brute_all(s, ref)
    for key in ("jsd", "mmd", "cov", "nna"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=0), key
    assert got["n_samples"] == len(s) and got["n_refs"] == len(ref) and got["n_empty_samples"] == 0


def test_chamfer_matrix_matches_brute_force(sets):
    s, ref = sets[16]
    d = metrics.chamfer_matrix(s[:5], ref[:7])
    np.testing.assert_allclose(d, _brute_matrix(s[:5], ref[:7]), rtol=1e-12)
    d_ss, d_sr, d_rr = metrics.chamfer_blocks(s[:5], ref[:7])
    np.testing.assert_array_equal(d_sr, d)
    np.testing.assert_allclose(d_ss, _brute_matrix(s[:5], s[:5]), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(d_rr, d_rr.T)


@pytest.mark.parametrize("res", [16, 32])
def test_torch_engine_equals_numpy(sets, res):
    s, ref = sets[res]
    a = metrics.chamfer_blocks(s, ref, metrics.Backend(engine="numpy"))
    b = metrics.chamfer_blocks(s, ref, metrics.Backend(engine="torch", device="cpu"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_edt_backends_agree_with_kdtree():
    rng = np.random.default_rng(3)
    res = 20
    idx = np.unique(rng.integers(0, res**3, 30))
    d2 = metrics.edt_sq(idx, res)
    grid = np.stack(np.unravel_index(np.arange(res**3), (res,) * 3), 1)
    want, _ = cKDTree(np.stack(np.unravel_index(idx, (res,) * 3), 1)).query(grid)
    np.testing.assert_array_equal(d2, np.rint(want**2))


def test_workers_give_same_result(sets, monkeypatch):
    s, ref = sets[16]
    monkeypatch.setattr(metrics_backends, "MIN_PARALLEL_SHAPES", 0)  # really start the process pool
    a = metrics.chamfer_blocks(s[:6], ref[:6], metrics.Backend(workers=1))[1]
    b = metrics.chamfer_blocks(s[:6], ref[:6], metrics.Backend(workers=2))[1]
    np.testing.assert_array_equal(a, b)


def test_float_and_bool_inputs_equal_uint8(sets):
    s, ref = sets[16]
    base = metrics.evaluate(s, ref, progress=False)
    for conv in (lambda x: x.astype(bool), lambda x: x.astype(np.float32)):
        got = metrics.evaluate(conv(s), ref, progress=False)
        assert [got[k] for k in ("jsd", "mmd", "cov", "nna")] == [base[k] for k in ("jsd", "mmd", "cov", "nna")]


def test_threshold_binarises_probabilities(sets):
    s, ref = sets[16]
    prob = s.astype(np.float32) * 0.9 + 0.05  # occupied 0.95, empty 0.05
    with pytest.raises(VoxdiffError, match="--threshold 0.5"):
        metrics.evaluate(prob, ref, progress=False)
    got = metrics.evaluate(prob, ref, progress=False, threshold=0.5)
    assert got["mmd"] == metrics.evaluate(s, ref, progress=False)["mmd"]


def test_list_of_references_is_concatenation(sets):
    s, ref = sets[16]
    a = metrics.evaluate(s, ref, progress=False)
    b = metrics.evaluate(s, [ref[:4], ref[4:]], progress=False)
    assert (a["mmd"], a["cov"], a["nna"], a["jsd"]) == (b["mmd"], b["cov"], b["nna"], b["jsd"])


def test_empty_samples_are_counted_and_metrics_stay_finite(sets):
    s, ref = sets[16]
    s = s.copy()
    s[[1, 4]] = 0
    got = metrics.evaluate(s, ref, progress=False)
    want = _brute_all(s, ref)
    assert got["n_empty_samples"] == 2
    for key in ("jsd", "mmd", "cov", "nna"):
        assert math.isfinite(got[key])
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    d = metrics.chamfer_matrix(s[:3], ref[:3])
    assert np.isinf(d[1]).all() and np.isfinite(d[[0, 2]]).all()


def test_all_samples_empty_convention(sets):
    _, ref = sets[16]
    got = metrics.evaluate(np.zeros((3, 16, 16, 16), np.uint8), ref, progress=False)
    assert got["all_samples_empty"] and got["n_empty_samples"] == 3
    assert got["mmd"] == metrics.CD_MAX and got["cov"] == 0.0 and got["jsd"] == pytest.approx(math.log(2))
    assert got["nna"] == 1.0  # empty samples are trivially told apart; references find each other


def test_empty_reference_is_refused(sets):
    s, ref = sets[16]
    ref = ref.copy()
    ref[2] = 0
    with pytest.raises(VoxdiffError, match="empty"):
        metrics.evaluate(s, ref, progress=False)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (np.full((2, 16, 16, 16), np.nan, np.float32), "NaN"),
        (np.zeros((2, 16, 16), np.uint8), r"\(N,R,R,R\)"),
        (np.zeros((2, 16, 16, 8), np.uint8), r"\(N,R,R,R\)"),
        (np.full((2, 16, 16, 16), 2, np.uint8), "outside"),
        (np.zeros((2, 8, 8, 8), np.uint8), "8³ but references are 16³"),
        (np.zeros((0, 16, 16, 16), np.uint8), "0 shapes"),
    ],
)
def test_bad_inputs_are_refused(sets, bad, msg):
    _, ref = sets[16]
    with pytest.raises(VoxdiffError, match=msg):
        metrics.evaluate(bad, ref, progress=False)


def test_mmd_cov_and_one_nna_on_hand_matrices():
    d = np.array([[1.0, 5.0, 9.0], [2.0, 0.5, 9.0]])
    mmd, cov = metrics.mmd_cov(d)
    assert mmd == pytest.approx((1.0 + 0.5 + 9.0) / 3) and cov == pytest.approx(2 / 3)
    # samples far from references, each set tight: every item's neighbour is in its own set -> 1.0
    d_ss = np.array([[0, 1.0], [1.0, 0]])
    d_rr = np.array([[0, 1.0], [1.0, 0]])
    assert metrics.one_nna(d_ss, np.full((2, 2), 10.0), d_rr) == 1.0
    # each sample sits on a reference: every neighbour is from the other set -> 0.0
    assert metrics.one_nna(d_ss, np.array([[0.1, 5], [5, 0.1]]), d_rr) == 0.0


def test_jsd_is_zero_for_identical_sets_and_symmetric(sets):
    s, ref = sets[32]
    assert metrics.jsd(s, s) == pytest.approx(0.0, abs=1e-12)
    assert metrics.jsd(s, ref) == pytest.approx(metrics.jsd(ref, s), rel=1e-12)
    assert 0 < metrics.jsd(s, ref) <= math.log(2)


def test_one_nna_balanced_uses_equal_sets():
    # 3 samples far from 2 references; the third sample is the odd one out and only the first k=2 of each set count.
    rng = np.random.default_rng(0)
    pts = np.r_[rng.normal(0, 1, (3, 2)), rng.normal(0, 1, (2, 2))]
    d = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    d_ss, d_sr, d_rr = d[:3, :3], d[:3, 3:], d[3:, 3:]
    bal = metrics.one_nna_balanced(d_ss, d_sr, d_rr)
    assert bal == metrics.one_nna(d_ss[:2, :2], d_sr[:2], d_rr)
    # Equal sizes: identical to the plain definition.
    assert metrics.one_nna_balanced(d_ss[:2, :2], d_sr[:2], d_rr) == metrics.one_nna(d_ss[:2, :2], d_sr[:2], d_rr)
    # Same distribution, 10:1 sizes: the plain score is inflated by the majority set, the balanced one is not.
    x = rng.normal(0, 1, (220, 3))
    dd = ((x[:, None] - x[None]) ** 2).sum(-1)
    plain = metrics.one_nna(dd[:200, :200], dd[:200, 200:], dd[200:, 200:])
    balanced = metrics.one_nna_balanced(dd[:200, :200], dd[:200, 200:], dd[200:, 200:])
    assert plain > 0.8 and abs(balanced - 0.5) < 0.2


# ------------------------------------------------------------------------------------------------------ structure


def _grid(res: int, *voxels: tuple[int, int, int]) -> np.ndarray:
    g = np.zeros((res, res, res), np.uint8)
    for v in voxels:
        g[v] = 1
    return g


def _structure(*grids: np.ndarray) -> dict[str, float]:
    return metrics.structure(metrics.extract_points(np.stack(grids)))


def _box(g: np.ndarray, lo: tuple[int, int, int], side: int) -> None:
    g[lo[0] : lo[0] + side, lo[1] : lo[1] + side, lo[2] : lo[2] + side] = 1


@pytest.mark.parametrize(
    "voxels, stray",
    [
        ([(3, 3, 3)], 1.0),  # an isolated voxel
        ([(3, 3, 3), (3, 3, 4)], 0.0),  # a face pair: each has a face neighbour
        ([(3, 3, 3), (4, 4, 3)], 1.0),  # edge-only neighbours: still stray
        ([(3, 3, 3), (4, 4, 4)], 1.0),  # corner-only neighbours: still stray
        ([(3, 3, 3), (3, 3, 4), (6, 6, 6)], 1 / 3),  # a face pair and one speck
        ([(0, 0, 0), (7, 0, 0)], 1.0),  # opposite borders of the grid are not neighbours (no wrap-around)
    ],
)
def test_structure_stray_counts_voxels_without_a_face_neighbour(voxels, stray):
    got = _structure(_grid(8, *voxels))
    assert got["stray"] == pytest.approx(stray)
    assert got["fragmented"] == 0.0  # one part holds at least half of each of these shapes


def test_structure_fragmented_and_empty_shapes():
    """Two equal far-apart blobs plus specks: the largest part holds under half the voxels (fragmented). One big blob
    plus a few specks: not fragmented. Exactly half is not "less than half". Empty shapes are skipped."""
    res = 16
    two_blobs = np.zeros((res, res, res), np.uint8)
    _box(two_blobs, (1, 1, 1), 2)
    _box(two_blobs, (10, 10, 10), 2)  # 8 + 8 voxels, far apart
    two_blobs[5, 12, 2] = two_blobs[12, 3, 7] = 1  # two specks: the largest part is 8 of 18
    big_blob = np.zeros((res, res, res), np.uint8)
    _box(big_blob, (4, 4, 4), 3)  # 27 voxels
    for v in ((0, 0, 15), (15, 0, 0), (0, 15, 0)):
        big_blob[v] = 1  # 27 of 30
    halves = np.zeros((res, res, res), np.uint8)
    _box(halves, (1, 1, 1), 2)
    _box(halves, (10, 10, 10), 2)  # 8 of 16: exactly half
    empty = np.zeros((res, res, res), np.uint8)
    assert _structure(two_blobs)["fragmented"] == 1.0
    assert _structure(big_blob)["fragmented"] == 0.0
    assert _structure(halves)["fragmented"] == 0.0
    # parts are 26-connected: a diagonal chain touching by edges and corners is one part (3 of 5 voxels), though every
    # voxel of it is stray
    chain = _grid(res, (2, 2, 2), (3, 3, 2), (4, 4, 3), (12, 2, 2), (2, 12, 12))
    assert _structure(chain) == {"stray": 1.0, "fragmented": 0.0}
    got = _structure(two_blobs, empty, big_blob, empty)
    assert got["fragmented"] == 0.5  # 1 of the 2 non-empty shapes; the empty ones count nowhere
    assert got["stray"] == pytest.approx(5 / 48)  # 2 + 3 specks among 18 + 30 voxels
    assert _structure(empty, empty) == {"stray": 0.0, "fragmented": 0.0}


def test_evaluate_carries_structure_of_both_sets(sets):
    s, ref = sets[16]
    noisy = s.copy()
    noisy[:, 0, 0, ::2] = 1  # isolated voxels along one border edge of every sample
    got = metrics.evaluate(noisy, ref, progress=False)
    want_s, want_r = metrics.structure(metrics.extract_points(noisy)), metrics.structure(metrics.extract_points(ref))
    assert got["sample_stray"] == want_s["stray"] and got["sample_fragmented"] == want_s["fragmented"]
    assert got["ref_stray"] == want_r["stray"] and got["ref_fragmented"] == want_r["fragmented"]
    assert got["sample_stray"] > metrics.evaluate(s, ref, progress=False)["sample_stray"]
    assert all(0.0 <= got[k] <= 1.0 for k in ("sample_stray", "ref_stray", "sample_fragmented", "ref_fragmented"))


# -------------------------------------------------------------------------------------------- voxdiff.scoring


def _ref_arrays(d: Path, cat: str = "chair") -> np.ndarray:
    return np.concatenate([np.load(d / f"{cat}_voxels_test.npy"), np.load(d / f"{cat}_voxels_val.npy")])


def test_score_sets_extracts_references_once_and_matches_evaluate(tiny_voxel_dir, monkeypatch):
    calls: list[str] = []
    real = metrics.extract_points

    def counting(grids, **kw):
        if not isinstance(grids, metrics.VoxelPoints):  # a real extraction, not a pass-through
            calls.append(kw.get("name", "samples"))
        return real(grids, **kw)

    monkeypatch.setattr(metrics, "extract_points", counting)
    refs = scoring.References.load(tiny_voxel_dir, "chair")
    train = np.load(tiny_voxel_dir / "chair_voxels_train.npy")
    out = scoring.score_sets(refs, {"a": train[:5], "b": train[3:]})
    assert calls.count("references") == 1 and sorted(calls) == ["a", "b", "references"]
    monkeypatch.setattr(metrics, "extract_points", real)
    ref_arrays = _ref_arrays(tiny_voxel_dir)
    for name, part in (("a", train[:5]), ("b", train[3:])):
        want = metrics.evaluate(part, ref_arrays, progress=False)
        got = out["sets"][name]
        for key in want.keys() - {"elapsed_s"}:
            assert got[key] == want[key], (name, key)
    assert refs.count == len(ref_arrays) and refs.resolution == 32
    assert refs.files == ["chair_voxels_test.npy", "chair_voxels_val.npy"]
    assert refs.sha256 == metrics.sha256_of([ref_arrays])  # the raw bytes of test then val, in order


def test_score_sets_provenance(tiny_voxel_dir):
    refs = scoring.References.load(tiny_voxel_dir, "table")
    out = scoring.score_sets(refs, {"x": np.load(tiny_voxel_dir / "table_voxels_train.npy")}, seed=3, device="cpu")
    prov = out["provenance"]
    assert set(prov) == {
        "category", "reference_files", "reference_count", "reference_sha256", "sha256_of", "resolution", "threshold",
        "seed", "voxdiff_version", "device", "engine", "train_max_voxels", "definitions",
    }  # fmt: skip
    assert prov["category"] == "table" and prov["reference_count"] == 8 and prov["seed"] == 3
    assert prov["engine"] == "numpy" and prov["device"] == "cpu" and prov["threshold"] is None
    assert prov["reference_sha256"] == refs.sha256 and "table_voxels_test.npy then" in prov["sha256_of"]
    defs = prov["definitions"]
    assert {"points", "chamfer", "mmd", "cov", "jsd", "nna", "nna_balanced", "bloated", "stray",
            "fragmented"} <= set(defs)
    assert list(out["sets"]) == ["x"] and "file" not in out["sets"]["x"]
    assert {"sample_stray", "ref_stray", "sample_fragmented", "ref_fragmented"} <= set(out["sets"]["x"])


def test_score_sets_counts_empty_and_bloated(tiny_voxel_dir, tmp_path):
    train = np.load(tiny_voxel_dir / "airplane_voxels_train.npy")
    train_max = int(train.reshape(len(train), -1).sum(1).max())
    s = train[:4].copy()
    s[1] = 0  # empty
    s[2] = 1  # full grid: 32³ voxels, far above twice the largest training shape
    path = tmp_path / "airplane.npy"
    np.save(path, s)
    refs = scoring.References.load(tiny_voxel_dir, "airplane")
    assert refs.train_max_voxels == train_max
    res = scoring.score_sets(refs, {"gen": path})["sets"]["gen"]
    assert res["n_empty_samples"] == 1 and res["n_bloated_samples"] == 1
    assert res["bloated_above_voxels"] == 2 * train_max and res["file"] == str(path)
    # without a train split: nothing to compare against, so bloat is not counted (the metrics are the same)
    no_train = tmp_path / "no_train"
    no_train.mkdir()
    for split in ("test", "val"):
        shutil.copy(tiny_voxel_dir / f"airplane_voxels_{split}.npy", no_train)
    refs2 = scoring.References.load(no_train, "airplane")
    res2 = scoring.score_sets(refs2, {"gen": path})["sets"]["gen"]
    assert refs2.train_max_voxels is None and refs2.sha256 == refs.sha256
    assert res2["n_bloated_samples"] is None and res2["bloated_above_voxels"] is None
    assert (res2["jsd"], res2["mmd"], res2["cov"], res2["nna"]) == (res["jsd"], res["mmd"], res["cov"], res["nna"])


def test_scoring_bad_input_is_one_line(tiny_voxel_dir, tmp_path):
    refs = scoring.References.load(tiny_voxel_dir, "chair")
    np.save(tmp_path / "ok.npy", np.zeros((2, 32, 32, 32), np.uint8))
    (tmp_path / "broken.npy").write_bytes(b"not an npy")
    for sets, msg in [
        ({}, "no sample sets"),
        ({"ok": tmp_path / "ok.npy", "gone": tmp_path / "missing.npy"}, "samples file not found"),
        ({"b": tmp_path / "broken.npy"}, "not a readable .npy"),
        ({"d": tmp_path}, "is a directory"),
    ]:
        with pytest.raises(VoxdiffError, match=msg) as e:
            scoring.score_sets(refs, sets)
        assert "\n" not in str(e.value)
    with pytest.raises(VoxdiffError, match="unknown category 'sofa'"):
        scoring.References.load(tiny_voxel_dir, "sofa")
    with pytest.raises(VoxdiffError, match="voxel file not found"):
        scoring.References.load(tmp_path, "chair")


def _boxes(n: int, seed: int, res: int = 16) -> np.ndarray:
    """n random boxes in a res³ grid (a family of shapes: new draws are new shapes)."""
    rng = np.random.default_rng(seed)
    g = np.zeros((n, res, res, res), np.uint8)
    for i in range(n):
        lo = rng.integers(0, res // 2, 3)
        hi = lo + rng.integers(2, res // 2, 3)
        g[i, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return g


def test_copying_check_catches_copies_anywhere_in_the_training_set():
    """Copies of training shapes are at distance 0 from the training set (ratio 0), whichever rows they came from;
    fresh draws of the same family are as far as held-out shapes (ratio near 1)."""
    train, heldout, fresh = _boxes(300, 0), _boxes(40, 1), _boxes(40, 2)
    copies = train[-40:]  # the last rows: a subset of the first rows would miss them
    res = scoring.copying_check(copies, train, heldout)
    assert res["samples_median"] == 0.0 and res["ratio"] == 0.0 and res["n_train"] == 300
    assert res["n_samples"] == 40 and res["heldout_median"] > 0
    fair = scoring.copying_check(fresh, train, heldout)
    assert 0.5 < fair["ratio"] < 2.0
    sub = scoring.copying_check(copies, train, heldout, max_train=30, seed=0)  # a bounded pool can miss copies
    assert sub["n_train"] == 30 and sub["ratio"] > res["ratio"]
