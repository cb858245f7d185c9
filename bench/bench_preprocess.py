"""Bench the data stage: procedural generation (shapes/s), voxelization (ms/shape, voxdiff vs a per-point Python loop
run in the same process), and the peak RSS of preprocessing one split at 128³ (in a child process).

    python bench/bench_preprocess.py [--n_rss 2000] [--n_loop 6] [--workdir /tmp/voxdiff_bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voxdiff.data.partseg import write_synthetic_partseg  # noqa: E402
from voxdiff.data.shapes import generate_split  # noqa: E402
from voxdiff.data.voxelize import voxelize_points  # noqa: E402


def loop_baseline(points: np.ndarray, resolution: int) -> np.ndarray:
    """The seed-style baseline: per-point Python loop with per-axis min/max scaling (one shape)."""
    grid = np.zeros((resolution,) * 3, np.uint8)
    mn, mx = points.min(axis=0), points.max(axis=0)
    for p in points:
        ijk = [0 if mx[a] == mn[a] else int((p[a] - mn[a]) / (mx[a] - mn[a]) * (resolution - 1)) for a in range(3)]
        grid[ijk[0], ijk[1], ijk[2]] = 1
    return grid


_CHILD = """
import json, resource, sys, time
from voxdiff.data.voxelize import preprocess
t = time.perf_counter()
s = preprocess(sys.argv[1], sys.argv[2], 128, ["chair"], ["train"], chunk=32, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "count": s["outputs"]["chair"]["train"]["count"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_gen", type=int, default=150, help="shapes per category for the generation timing")
    ap.add_argument("--n_vox", type=int, default=256, help="shapes for the voxdiff voxelization timing")
    ap.add_argument("--n_loop", type=int, default=6, help="shapes for the per-point loop baseline")
    ap.add_argument("--n_rss", type=int, default=2000, help="shapes in the split preprocessed for peak RSS (0: skip)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    # 1. Generation throughput (one process).
    for cat in ("airplane", "chair", "table"):
        t = time.perf_counter()
        generate_split(cat, args.n_gen, seed=0, split="train")
        dt = time.perf_counter() - t
        print(f"generate {cat:8s}: {args.n_gen / dt:7.1f} shapes/s ({dt / args.n_gen * 1e3:.2f} ms/shape)")

    # 2. Voxelization: vectorised (chunks of 32) vs per-point loop, same shapes, same process.
    pts = np.concatenate([generate_split(c, args.n_vox // 3 + 1, seed=1, split="val")[0] for c in
                          ("airplane", "chair", "table")])[: args.n_vox]
    for resolution in (64, 128):
        t = time.perf_counter()
        for s in range(0, len(pts), 32):
            voxelize_points(pts[s : s + 32], resolution)
        fast = (time.perf_counter() - t) / len(pts) * 1e3
        t = time.perf_counter()
        for p in pts[: args.n_loop]:
            loop_baseline(p, resolution)
        slow = (time.perf_counter() - t) / args.n_loop * 1e3
        ok = all(np.array_equal(loop_baseline(p, resolution), voxelize_points(p[None], resolution)[0]) for p in pts[:3])
        print(f"voxelize {resolution:3d}^3: voxdiff {fast:7.3f} ms/shape, per-point loop {slow:7.2f} ms/shape, "
              f"ratio {slow / fast:6.1f}x (same grids: {ok})")

    # 3. Peak RSS of preprocessing one split of n_rss shapes at 128^3 (child process; output is n_rss × 2 MiB).
    if args.n_rss > 0:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="voxdiff_bench_"))
        try:
            h5 = work / "h5"
            t = time.perf_counter()
            write_synthetic_partseg(h5, {"train": {"chair": args.n_rss}}, seed=0, progress=False)
            print(f"wrote {args.n_rss} chairs to HDF5 in {time.perf_counter() - t:.1f} s")
            res = subprocess.run([sys.executable, "-c", _CHILD, str(h5), str(work / "vox")], capture_output=True,
                                 text=True, cwd=ROOT, check=True)
            info = json.loads(res.stdout.strip().splitlines()[-1])
            size = (work / "vox" / "chair_voxels_train.npy").stat().st_size / 2**30
            print(f"preprocess {info['count']} shapes at 128^3 ({size:.2f} GiB .npy): {info['seconds']:.1f} s, "
                  f"{info['seconds'] / info['count'] * 1e3:.2f} ms/shape, peak RSS {info['peak_rss_mib']:.0f} MiB")
        finally:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
