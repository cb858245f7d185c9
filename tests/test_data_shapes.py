"""Procedural shapes and the PartSeg HDF5 writer/reader."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from voxdiff.config import CATEGORIES, PARTSEG_LABELS
from voxdiff.data import partseg
from voxdiff.data.shapes import PART_IDS, generate_shape, generate_split, shape_rng


@pytest.mark.parametrize("category", CATEGORIES)
def test_determinism_and_subsets(category: str) -> None:
    pts, pids = generate_split(category, 5, seed=3, split="train")
    again, again_p = generate_split(category, 5, seed=3, split="train")
    np.testing.assert_array_equal(pts, again)
    np.testing.assert_array_equal(pids, again_p)
    # Any subset is reproducible on its own (shape i depends only on (seed, split, category, i)).
    sub, _ = generate_split(category, 2, seed=3, split="train", start=3)
    np.testing.assert_array_equal(sub, pts[3:5])
    other, _ = generate_split(category, 5, seed=4, split="train")
    assert not np.array_equal(other, pts)
    val, _ = generate_split(category, 5, seed=3, split="val")
    assert not np.array_equal(val, pts)


@pytest.mark.parametrize("category", CATEGORIES)
def test_points_in_unit_sphere_with_part_ids(category: str) -> None:
    pts, pids = generate_split(category, 20, seed=0, split="test")
    assert pts.shape == (20, 2048, 3) and pts.dtype == np.float32
    assert pids.shape == (20, 2048) and pids.dtype == np.uint8
    norms = np.linalg.norm(pts, axis=-1)
    assert norms.max() <= 1.0 and norms.max(axis=1).min() > 0.99  # scaled to touch the sphere
    assert set(np.unique(pids)) <= set(PART_IDS[category].values())
    centre = (pts.max(1) + pts.min(1)) / 2
    assert np.abs(centre).max() < 1e-5


@pytest.mark.parametrize("category", CATEGORIES)
def test_variety(category: str) -> None:
    pts, pids = generate_split(category, 100, seed=0, split="train")
    keys = {np.round(p, 3).tobytes() for p in pts}
    assert len(keys) == 100
    ext = pts.max(1) - pts.min(1)  # (100, 3) bounding-box extents
    assert (ext.std(0) / ext.mean(0)).min() > 0.03, "extents barely vary on some axis"
    assert len({tuple(sorted(np.unique(p))) for p in pids}) >= 2, "optional parts never vary"


def test_y_is_up() -> None:
    """Seats/table tops sit above legs; airplanes are longer along z than tall along y."""
    for category, up, down in (("chair", "seat", "leg"), ("table", "top", "leg")):
        pts, pids = generate_split(category, 10, seed=1, split="train")
        ids = PART_IDS[category]
        for p, q in zip(pts, pids):
            assert p[q == ids[up], 1].mean() > p[q == ids[down], 1].mean()
    pts, _ = generate_split("airplane", 10, seed=1, split="train")
    ext = pts.max(1) - pts.min(1)
    assert (ext[:, 2] > 2 * ext[:, 1]).all() and (ext[:, 0] > 2 * ext[:, 1]).all()


def test_area_uniform_sampling() -> None:
    """Points on a unit cube split 1:1 by area between its top half and bottom half (uniform by area)."""
    from voxdiff.data.shapes import ShapeBuilder, box

    sb = ShapeBuilder()
    sb.add(box([0, 0, 0], [1, 4, 1]), 0)  # side faces: 4x more area than top + bottom together / 2
    p, _ = sb.sample(np.random.default_rng(0), 20000)
    on_caps = np.isclose(np.abs(p[:, 1]), np.abs(p[:, 1]).max(), atol=1e-6).mean()
    assert abs(on_caps - 2 / 18) < 0.01  # caps: 2 of 18 unit areas


def test_unknown_category() -> None:
    with pytest.raises(ValueError, match="unknown category"):
        generate_shape("lamp", shape_rng(0, "train", "chair", 0))


def test_write_and_read_partseg(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(partseg, "MAX_PER_FILE", 10)
    counts = {"train": {"airplane": 7, "chair": 5, "table": 3}, "val": {"chair": 2}, "test": {"chair": 0}}
    files = partseg.write_synthetic_partseg(tmp_path, counts, seed=5)
    names = ["ply_data_train0.h5", "ply_data_train1.h5", "ply_data_val0.h5", "ply_data_test0.h5"]
    assert [f.name for f in files] == names
    assert partseg.count_category(tmp_path, "test", "chair") == 0  # an empty split is still a valid layout
    assert partseg.read_file_list(tmp_path, "train") == files[:2]
    labels = []
    for f in files[:2]:
        with h5py.File(f) as h:
            assert h["data"].dtype == np.float32 and h["data"].shape[1:] == (2048, 3)
            assert h["label"].dtype == np.uint8 and h["label"].shape[1] == 1
            assert h["pid"].dtype == np.uint8 and h["pid"].shape == h["data"].shape[:2]
            assert len(h["data"]) <= 10
            labels.append(h["label"][:, 0])
    labels = np.concatenate(labels)
    for cat, n in counts["train"].items():
        assert (labels == PARTSEG_LABELS[cat]).sum() == n
    assert not (np.diff(labels.astype(int)) >= 0).all(), "categories should be shuffled together"
    # Category rows come back in file order, equal to the generator's shapes.
    got = np.concatenate(list(partseg.iter_category_points(tmp_path, "train", "chair", chunk=2)))
    want, _ = generate_split("chair", 5, seed=5, split="train")
    assert {g.tobytes() for g in got} == {w.tobytes() for w in want}
    assert partseg.count_category(tmp_path, "val", "chair") == 2
    assert partseg.count_category(tmp_path, "val", "table") == 0


def test_workers_give_identical_files(tmp_path) -> None:
    counts = {"test": {"airplane": 3, "chair": 3, "table": 3}}
    a = partseg.write_synthetic_partseg(tmp_path / "a", counts, seed=2, workers=1)
    b = partseg.write_synthetic_partseg(tmp_path / "b", counts, seed=2, workers=2)
    with h5py.File(a[0]) as fa, h5py.File(b[0]) as fb:
        for k in ("data", "label", "pid"):
            np.testing.assert_array_equal(fa[k][()], fb[k][()])


def test_presets() -> None:
    full = partseg.COUNT_PRESETS["full"]
    assert full["train"] == {"airplane": 2658, "chair": 1958, "table": 3835}
    for name in ("tiny", "small", "medium"):
        p = partseg.COUNT_PRESETS[name]
        assert set(p) == {"train", "val", "test"} and all(set(v) == set(CATEGORIES) for v in p.values())
        assert p["train"]["chair"] > p["val"]["chair"] > 0
