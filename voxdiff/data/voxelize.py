"""Point clouds -> binary voxel grids, and the streamed preprocessing of a PartSeg HDF5 directory into `.npy` splits.

The reference voxelization (the seed's `load_data.py`) scales every shape into the grid separately per axis:
    i_a = floor((p_a - min_a) / (max_a - min_a) * (R - 1)),  a in {x, y, z},
and marks voxel (i_x, i_y, i_z) occupied. This stretches each shape to fill the cube (it is kept as the default so
numbers stay comparable); `isotropic=True` uses one scale for all axes (the largest extent) and centres the shape.
A degenerate axis (max == min) maps to index 0 (reference) or to the centre (isotropic) instead of dividing by zero.
Arithmetic is done in the points' floating dtype (float32 for PartSeg), exactly like a per-point loop over the array.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voxdiff.config import CATEGORIES, PARTSEG_LABELS, SPLITS
from voxdiff.data.partseg import PARTSEG_NUM_CATEGORIES, iter_category_points, scan_split
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_memmap, atomic_save_npy, atomic_write_json, atomic_write_text, open_npy, staging_dir
from voxdiff.logs import Progress, get_logger


def voxel_path(root: str | os.PathLike[str], category: str, split: str) -> Path:
    """Path of one preprocessed split: `{root}/{category}_voxels_{split}.npy` (the seed's naming).

    Defined here, where the grids are written, so preprocessing does not import torch; `voxdiff.data.dataset`
    re-exports it.
    """
    return Path(root) / f"{category}_voxels_{split}.npy"


def open_voxels(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a (N,R,R,R) voxel file, validating rank and cubic shape with a clear error."""
    p = Path(path)
    if not p.exists():
        raise VoxdiffError(f"voxel file not found: {p} (run load_data.py first)")
    arr = open_npy(p)
    if arr.ndim != 4 or not (arr.shape[1] == arr.shape[2] == arr.shape[3]):
        raise VoxdiffError(f"{p} must hold (N,R,R,R) grids; got shape {arr.shape}")
    return arr


def downsample_max(grid: np.ndarray, resolution: int) -> np.ndarray:
    """Max-pool the last three axes of `grid` (R³) down to `resolution`³; R must be a multiple of it."""
    src_res = grid.shape[-1]
    if src_res == resolution:
        return np.asarray(grid)
    if src_res % resolution:
        raise VoxdiffError(f"cannot pool a {src_res}³ grid to {resolution}³ (not a divisor)")
    f = src_res // resolution
    lead = grid.shape[:-3]
    g = np.asarray(grid).reshape(*lead, resolution, f, resolution, f, resolution, f)
    return g.max(axis=(-5, -3, -1))


def check_resolution(resolution: int) -> int:
    """`resolution` as int if it is a power of two >= 8, else a VoxdiffError."""
    res = int(resolution)
    if res != resolution or res < 8 or res & (res - 1):
        raise VoxdiffError(f"resolution must be a power of two >= 8; got {resolution}")
    return res


def voxel_indices(points: np.ndarray, resolution: int, isotropic: bool = False) -> np.ndarray:
    """Integer voxel coordinates (B,P,3) in [0, R-1] of points (B,P,3) (or (P,3) -> (P,3)), per-shape scaling.

    1. per shape and axis: mn, mx over the points; ext = mx - mn (1 where ext == 0, where p - mn == 0 anyway);
    2. reference: q = (p - mn) / ext;  isotropic: q = (p - (mn + mx) / 2) / max_a(ext) + 1/2;
    3. i = floor(q * (R - 1)), clipped to [0, R-1] against rounding.
    """
    pts = np.asarray(points)
    if pts.ndim not in (2, 3) or pts.shape[-1] != 3:
        raise ValueError(f"points must be (B,P,3) or (P,3); got {pts.shape}")
    if not np.issubdtype(pts.dtype, np.floating):
        pts = pts.astype(np.float64)
    one = pts.dtype.type(1)
    mn = pts.min(axis=-2, keepdims=True)
    mx = pts.max(axis=-2, keepdims=True)
    ext = mx - mn
    if isotropic:
        big = ext.max(axis=-1, keepdims=True)
        big = np.where(big == 0, one, big)
        q = (pts - (mn + mx) / pts.dtype.type(2)) / big + pts.dtype.type(0.5)
    else:
        q = (pts - mn) / np.where(ext == 0, one, ext)
    idx = np.floor(q * pts.dtype.type(resolution - 1)).astype(np.int64)
    return np.clip(idx, 0, resolution - 1, out=idx)


def voxelize_points(
    points: np.ndarray, resolution: int, isotropic: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Binary uint8 grids (B,R,R,R) of point clouds (B,P,3), all shapes of the batch in one vectorised assignment.

    `out` (e.g. a slice of a memmap, assumed zero-filled) receives the ones in place and is returned.
    Index order is (x, y, z) as in the reference: grid[b, i_x, i_y, i_z].
    """
    pts = np.asarray(points)
    if pts.ndim == 2:
        pts = pts[None]
    res = check_resolution(resolution)
    b = pts.shape[0]
    if out is None:
        out = np.zeros((b, res, res, res), np.uint8)
    elif out.shape != (b, res, res, res):
        raise ValueError(f"out must have shape {(b, res, res, res)}; got {out.shape}")
    if b == 0:
        return out
    idx = voxel_indices(pts, res, isotropic)
    batch = np.broadcast_to(np.arange(b)[:, None], idx.shape[:2])
    flat = np.ravel_multi_index((batch, idx[..., 0], idx[..., 1], idx[..., 2]), out.shape)
    out.reshape(-1)[flat.reshape(-1)] = 1
    return out


def voxelize_reference(points: np.ndarray, resolution: int) -> np.ndarray:
    """The reference definition as a per-point Python loop (tests and the bench baseline): uint8 (R,R,R)."""
    pts = np.asarray(points)
    grid = np.zeros((resolution,) * 3, np.uint8)
    mn, mx = pts.min(axis=0), pts.max(axis=0)
    for p in pts:
        ijk = []
        for a in range(3):
            ext = mx[a] - mn[a]
            ijk.append(0 if ext == 0 else int(np.floor((p[a] - mn[a]) / ext * (resolution - 1))))
        grid[ijk[0], ijk[1], ijk[2]] = 1
    return grid


def _release(arr: np.ndarray) -> None:
    """Flush a memmap and drop its pages from this process (they stay in the page cache): keeps peak RSS bounded."""
    mm = getattr(arr, "_mmap", None)
    if isinstance(arr, np.memmap):
        arr.flush()
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def preprocess(
    hdf5_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    resolution: int = 128,
    categories: Sequence[str] = CATEGORIES,
    splits: Sequence[str] = SPLITS,
    isotropic: bool = False,
    chunk: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Voxelize every (category, split) of a PartSeg HDF5 dir into `{out_dir}/{category}_voxels_{split}.npy`.

    1. validate the flags, then every file of every split in full (keys, shapes, labels, every point finite:
       partseg.scan_split), before anything is written;
    2. per (category, split): stream `chunk` shapes at a time from HDF5 into a uint8 memmap, so peak memory is a few
       chunks whatever the split's size;
    3. write `preprocess.json` (counts, resolution, mean occupancy, seconds); log to `preprocess.log`.
    The grids, preprocess.json and the log are written into a staging directory inside `out_dir` and moved into place
    only when the whole set is complete (preprocess.json last): a failure part-way (a bad file, a full disk) leaves
    the previous set as it was, never a mix of old and new grids. Returns the summary dict.
    """
    t0 = time.perf_counter()
    res = check_resolution(resolution)
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise VoxdiffError(f"unknown category {bad[0]!r}; choose from {', '.join(CATEGORIES)}")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise VoxdiffError(f"unknown split {bad[0]!r}; choose from {', '.join(SPLITS)}")
    if chunk < 1:
        raise VoxdiffError(f"chunk must be >= 1; got {chunk}")
    hdf5_dir = Path(hdf5_dir)
    out = Path(out_dir) if out_dir is not None else hdf5_dir
    if out.exists() and not out.is_dir():
        raise VoxdiffError(f"{out} is a file, not a directory")
    per_label = {s: scan_split(hdf5_dir, s) for s in splits}  # every file validated before the first write
    counts = {(c, s): per_label[s].get(PARTSEG_LABELS[c], 0) for s in splits for c in categories}
    summary: dict[str, Any] = {
        "hdf5_dir": str(hdf5_dir), "out_dir": str(out), "resolution": res, "isotropic": bool(isotropic), "outputs": {},
        "skipped": {},
    }
    with staging_dir(out, names_last=("preprocess.log", "preprocess.json")) as stage:
        log = get_logger("voxdiff.preprocess", stage / "preprocess.log")
        try:
            _voxelize_all(hdf5_dir, out, stage, res, categories, splits, isotropic, chunk, progress, counts, per_label,
                          summary, log)
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            log.info("done in %.2f s", summary["seconds"])
        finally:
            for h in list(log.handlers):
                log.removeHandler(h)
                h.close()
        old_log = out / "preprocess.log"  # the log keeps its history: this run's lines are appended to it
        new_log = (old_log.read_text() if old_log.is_file() else "") + (stage / "preprocess.log").read_text()
        atomic_write_text(stage / "preprocess.log", new_log)
        atomic_write_json(stage / "preprocess.json", summary)
    return summary


def _voxelize_all(hdf5_dir: Path, out: Path, stage: Path, res: int, categories: Sequence[str], splits: Sequence[str],
                  isotropic: bool, chunk: int, progress: bool | None, counts: dict[tuple[str, str], int],
                  per_label: dict[str, dict[int, int]], summary: dict[str, Any], log: Any) -> None:
    """Write every (category, split) grid file into `stage` (named as in `out`), filling `summary`."""
    log.info("preprocess %s -> %s at %d^3 (%s), counts %s", hdf5_dir, out, res,
             "isotropic" if isotropic else "per-axis", {f"{c}/{s}": n for (c, s), n in counts.items()})
    kept = {PARTSEG_LABELS[c] for c in categories}
    for s in splits:  # say what is not voxelized: other PartSeg categories, and labels that are not PartSeg's at all
        per = per_label[s]
        other = sum(n for i, n in per.items() if i not in kept and 0 <= i < PARTSEG_NUM_CATEGORIES)
        invalid = {i: n for i, n in per.items() if not 0 <= i < PARTSEG_NUM_CATEGORIES}
        summary["skipped"][s] = {"other_categories": other, "invalid_labels": invalid}
        if other:
            log.info("%s: %d shapes of other PartSeg categories skipped", s, other)
        if invalid:
            log.warning("%s: %d shapes with labels outside PartSeg's 0..15 (%s) skipped", s, sum(invalid.values()),
                        ", ".join(f"{i}: {n}" for i, n in sorted(invalid.items())))
    for s in splits:
        for c in categories:
            n, path, t1 = counts[(c, s)], voxel_path(out, c, s), time.perf_counter()
            try:
                occupied = _voxelize_one(hdf5_dir, stage / path.name, c, s, n, res, isotropic, chunk, progress, log)
            except OSError as e:  # name the file the user will look for, not its staging copy
                what = (e.strerror or str(e)).replace(str(stage / path.name), str(path))
                raise OSError(e.errno, what, str(path)) from None
            occ = occupied / (n * res**3) if n else 0.0
            sec = time.perf_counter() - t1
            summary["outputs"].setdefault(c, {})[s] = {
                "path": path.name, "count": n, "mean_occupancy": occ, "seconds": round(sec, 3)}
            log.info("%s %s: %d shapes -> %s, mean occupancy %.5f, %.2f s", c, s, n, path.name, occ, sec)


def _voxelize_one(hdf5_dir: Path, path: Path, c: str, s: str, n: int, res: int, isotropic: bool, chunk: int,
                  progress: bool | None, log: Any) -> int:
    """Voxelize the `n` shapes of category `c` in split `s` into `path`; returns the count of occupied voxels."""
    if n == 0:
        log.warning("%s %s: no shapes in %s; writing an empty (0,%d,%d,%d) array", c, s, hdf5_dir, res, res, res)
        atomic_save_npy(path, np.zeros((0, res, res, res), np.uint8))
        return 0
    occupied = 0
    bar = Progress(n, f"voxelize {c} {s}", unit="shape", enabled=progress is not False)
    with atomic_memmap(path, (n, res, res, res), np.uint8) as arr:
        row = 0
        for pts in iter_category_points(hdf5_dir, s, c, chunk):
            b = len(pts)
            if row + b > n:
                raise VoxdiffError(f"{hdf5_dir}: {c} {s} has more rows than counted (file changed?)")
            flat = voxelize_points(pts, res, isotropic, out=arr[row : row + b])
            occupied += int(np.count_nonzero(flat))
            del flat
            _release(arr)
            row += b
            bar.update(b)
        if row != n:
            raise VoxdiffError(f"{hdf5_dir}: {c} {s} has {row} rows, counted {n} (file changed?)")
    bar.close()
    return occupied
