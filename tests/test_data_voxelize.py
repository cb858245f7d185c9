"""Voxelization: the reference definition, the vectorised version, degenerate axes, isotropic scaling, streaming."""

from __future__ import annotations

import numpy as np
import pytest

from voxdiff.data.shapes import generate_split
from voxdiff.data.voxelize import voxel_indices, voxelize_points, voxelize_reference
from voxdiff.errors import VoxdiffError


def test_hand_built_cloud_exact_indices() -> None:
    # x extent 1, y extent 2, z extent 4; R - 1 = 7.
    pts = np.array([[0, 0, 0], [1, 2, 4], [0.5, 1, 1], [0.99, 0.3, 3.99]], np.float32)
    want = {(0, 0, 0), (7, 7, 7), (3, 3, 1), (6, 1, 6)}  # floor(.99*7)=6, floor(.15*7)=1, floor(.9975*7)=6
    grid = voxelize_points(pts[None], 8)[0]
    assert grid.dtype == np.uint8 and grid.shape == (8, 8, 8)
    assert set(map(tuple, np.argwhere(grid))) == want
    np.testing.assert_array_equal(grid, voxelize_reference(pts, 8))


@pytest.mark.parametrize("resolution", [8, 32, 128])
def test_vectorised_equals_reference(resolution: int) -> None:
    rng = np.random.default_rng(resolution)
    clouds = [rng.normal(size=(300, 3)).astype(np.float32) * [1, 0.3, 2]]
    clouds += list(generate_split("chair", 2, seed=0, split="val")[0][:, :400])
    clouds.append(np.round(rng.uniform(-1, 1, (300, 3)), 1).astype(np.float32))  # many points exactly on cell edges
    batch = voxelize_points(np.stack([c[:300] for c in clouds]), resolution)
    for i, c in enumerate(clouds):
        np.testing.assert_array_equal(batch[i], voxelize_reference(c[:300], resolution))


def test_degenerate_axis() -> None:
    pts = np.array([[0, 5, 0], [1, 5, 1], [0.5, 5, 0.25]], np.float32)  # y constant
    with np.errstate(all="raise"):
        idx = voxel_indices(pts, 16)
        grid = voxelize_points(pts, 16)[0]
    assert (idx[:, 1] == 0).all()
    assert set(map(tuple, np.argwhere(grid))) == {(0, 0, 0), (15, 0, 15), (7, 0, 3)}
    np.testing.assert_array_equal(grid, voxelize_reference(pts, 16))
    same = np.ones((10, 3), np.float32)  # every axis degenerate
    assert set(map(tuple, np.argwhere(voxelize_points(same, 8)[0]))) == {(0, 0, 0)}
    iso = voxel_indices(same, 8, isotropic=True)
    assert (iso == 3).all()  # centred: floor(0.5 * 7)


def test_isotropic_keeps_aspect_and_centres() -> None:
    pts = np.array([[-2, -1, 0], [2, 1, 0], [0, 0, 0]], np.float32)  # x extent 4, y extent 2, z 0
    iso = voxel_indices(pts, 9, isotropic=True)  # R - 1 = 8
    np.testing.assert_array_equal(iso, [[0, 2, 4], [8, 6, 4], [4, 4, 4]])
    ref = voxel_indices(pts, 9)
    np.testing.assert_array_equal(ref[:, :2], [[0, 0], [8, 8], [4, 4]])  # per-axis: y stretched to the full cube


def test_out_into_memmap(tmp_path) -> None:
    pts = generate_split("table", 3, seed=0, split="test")[0]
    arr = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.uint8, shape=(5, 16, 16, 16))
    voxelize_points(pts, 16, out=arr[1:4])
    arr.flush()
    back = np.load(tmp_path / "g.npy")
    np.testing.assert_array_equal(back[1:4], voxelize_points(pts, 16))
    assert back[0].sum() == 0 and back[4].sum() == 0 and back[1:4].sum() > 0


@pytest.mark.parametrize("bad", [0, 7, 12, 100])
def test_bad_resolution(bad: int) -> None:
    with pytest.raises(VoxdiffError, match="power of two"):
        voxelize_points(np.zeros((1, 4, 3), np.float32), bad)
