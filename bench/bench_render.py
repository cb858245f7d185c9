"""Bench: render_voxels on n shapes of a memory-mapped 1,000 × 128³ file vs. a plain mplot3d scatter of all voxels.

    python bench/bench_render.py [--n_file 1000] [--n 8] [--res 128]

The file is written as a sparse .npy (only the first `n` shapes are filled: solid boxes, balls and table-like shapes),
so it costs no disk time; both methods read the same `n` shapes from the memmap. The baseline is what one writes
first: a 3D axes per shape, `ax.scatter` of every occupied voxel with matplotlib's depth shading, same PNG size.
Prints seconds for each and the ratio baseline / ours, measured in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from voxdiff.render import Style, render_voxels  # noqa: E402


def toy_shape(res: int, t: int) -> np.ndarray:
    """Solid test shapes with large surfaces (the worst case for point counts): box, ball or table."""
    i, j, k = np.ogrid[:res, :res, :res]
    c = res / 2
    kind = t % 3
    if kind == 0:
        return (abs(i - c) < res * 0.35) & (abs(j - c * 0.7) < res * 0.15) & (abs(k - c) < res * 0.25)
    if kind == 1:
        return (i - c) ** 2 + (j - c) ** 2 + (k - c) ** 2 < (res * 0.38) ** 2
    top = (abs(j - res * 0.7) < res * 0.03) & (abs(i - c) < res * 0.4) & (abs(k - c) < res * 0.3)
    legs = (j < res * 0.7) & (abs(abs(i - c) - res * 0.35) < res * 0.03) & (abs(abs(k - c) - res * 0.25) < res * 0.03)
    return top | legs


def baseline(grids: np.ndarray, path: Path, ncols: int) -> None:
    n = len(grids)
    nrows = -(-n // ncols)
    fig = plt.figure(figsize=(ncols * 2.4, nrows * 2.4), dpi=100)
    for t in range(n):
        ax = fig.add_subplot(nrows, ncols, t + 1, projection="3d")
        x, y, z = np.nonzero(np.asarray(grids[t]) > 0.5)
        ax.scatter(x, z, y, s=1, c=y, cmap="viridis", depthshade=True)  # y up: plot z-axis is the grid's y
        ax.set_axis_off()
        ax.set_title(str(t))
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n_file", type=int, default=1000)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--res", type=int, default=128)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "samples.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.n_file, *(args.res,) * 3))
        for t in range(args.n):
            mm[t] = toy_shape(args.res, t)
        mm.flush()
        del mm
        grids = np.load(path, mmap_mode="r")
        occupied = int(sum(int(np.count_nonzero(grids[t])) for t in range(args.n)))
        t0 = time.perf_counter()
        render_voxels(grids[: args.n], Path(d) / "ours.png", style=Style(ncols=8))
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        baseline(grids[: args.n], Path(d) / "base.png", ncols=8)
        base = time.perf_counter() - t0
    print(f"file: {args.n_file} x {args.res}^3 uint8 (memory-mapped); drawn: {args.n} shapes, {occupied:,} voxels")
    print(f"render_voxels (surface points, lit)     : {ours:6.2f} s")
    print(f"baseline mplot3d scatter of all voxels  : {base:6.2f} s")
    print(f"speed-up baseline / ours                : {base / ours:6.1f}x")


if __name__ == "__main__":
    main()
