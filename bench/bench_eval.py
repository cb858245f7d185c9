"""Benchmark voxdiff.metrics.evaluate against the course's per-pair cKDTree Chamfer, in one process.

    python bench/bench_eval.py --resolution 64 --n_samples 100 --n_refs 100
    python bench/bench_eval.py --resolution 64 --n_samples 1000 --n_refs 1000 --baseline_pairs 400

Shapes are realistic and sparse: 2,048 random surface points of a box or an ellipsoid, voxelised (≤ 2,048 voxels).
The baseline builds two cKDTrees per (sample, reference) pair and queries both ways (D_sr only, as the course script);
voxdiff computes D_sr, D_ss and D_rr (for 1-NNA) too. When the set has more pairs than --baseline_pairs, the baseline
runs on that many random pairs and its full time is extrapolated from the per-pair time (printed as such).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxdiff import metrics  # noqa: E402
from voxdiff.metrics_backends import default_workers  # noqa: E402


def surface_points(rng: np.random.Generator, n: int = 2048) -> np.ndarray:
    """n points on the surface of a random box or ellipsoid inside the unit cube."""
    centre = rng.uniform(0.45, 0.55, 3)
    half = rng.uniform(0.15, 0.45, 3)
    if rng.random() < 0.5:
        p = rng.normal(size=(n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    else:
        p = rng.uniform(-1, 1, (n, 3))
        face = rng.integers(0, 3, n)
        p[np.arange(n), face] = np.sign(p[np.arange(n), face])
    return p * half + centre


def write_set(path: Path, n: int, res: int, rng: np.random.Generator) -> np.ndarray:
    """Voxelise n random shapes into an (n,res,res,res) uint8 .npy memmap at `path` and return it read-only."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, res, res, res))
    for i in range(n):
        idx = np.clip(np.rint(surface_points(rng) * (res - 1)), 0, res - 1).astype(np.int64)
        arr[i][tuple(idx.T)] = 1
    arr.flush()
    del arr
    return np.load(path, mmap_mode="r")


def baseline_cd(a: np.ndarray, b: np.ndarray) -> float:
    """Course-style Chamfer of two grids: points / (R-1), a cKDTree per shape per pair, squared NN distances."""
    res = a.shape[-1]
    x = np.argwhere(a > 0) / (res - 1)
    y = np.argwhere(b > 0) / (res - 1)
    dy, _ = cKDTree(x).query(y)
    dx, _ = cKDTree(y).query(x)
    return float(np.mean(dy**2) + np.mean(dx**2))


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished workers (the wall time depends on other load)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--n_samples", type=int, default=100)
    ap.add_argument("--n_refs", type=int, default=100)
    ap.add_argument("--baseline_pairs", type=int, default=10_000, help="max pairs the baseline really runs")
    ap.add_argument("--workers", type=int, default=0, help="voxdiff CPU processes (0 = all usable cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    resolution = args.resolution
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_set(Path(tmp) / "s.npy", args.n_samples, resolution, rng)
        refs = write_set(Path(tmp) / "r.npy", args.n_refs, resolution, rng)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        res = metrics.evaluate(samples, refs, device=args.device, progress=False, workers=workers)
        t_vox = time.perf_counter() - t0
        cpu_vox = _cpu_seconds() - cpu0
        rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20

        n_pairs = args.n_samples * args.n_refs
        full = n_pairs <= args.baseline_pairs
        if full:
            pairs = [(i, j) for i in range(args.n_samples) for j in range(args.n_refs)]
        else:
            flat = rng.choice(n_pairs, args.baseline_pairs, replace=False)
            pairs = [(int(k // args.n_refs), int(k % args.n_refs)) for k in flat]
        t0 = time.perf_counter()
        d_base = np.full((args.n_samples, args.n_refs), np.nan)
        for i, j in pairs:
            d_base[i, j] = baseline_cd(samples[i], refs[j])
        t_pairs = time.perf_counter() - t0
        t_base = t_pairs / len(pairs) * n_pairs

    print(f"resolution {resolution}³, {args.n_samples} samples × {args.n_refs} references, workers={workers}")
    print(f"mean voxels/shape: samples {res['sample_mean_voxels']:.0f}, refs {res['ref_mean_voxels']:.0f}")
    print(f"voxdiff evaluate (JSD+MMD+COV+1-NNA, D_sr+D_ss+D_rr): {t_vox:.2f} s wall, {cpu_vox:.1f} CPU-s")
    how = "measured" if full else f"extrapolated from {len(pairs)} pairs"
    print(f"baseline per-pair cKDTree (D_sr only): {t_base:.2f} s ({how}; {t_pairs / len(pairs) * 1e3:.2f} ms/pair)")
    print(f"speed-up: {t_base / t_vox:.1f}x")
    if full:
        d_sr = metrics.chamfer_blocks(samples, refs, metrics.Backend(workers=1))[1] if n_pairs <= 2500 else None
        mmd_b, cov_b = metrics.mmd_cov(d_base)
        print(f"MMD voxdiff {res['mmd']!r} baseline {mmd_b!r} rel.diff {abs(res['mmd'] - mmd_b) / mmd_b:.1e}")
        print(f"COV voxdiff {res['cov']!r} baseline {cov_b!r}")
        if d_sr is not None:
            print(f"max rel. diff of D_sr: {np.max(np.abs(d_sr - d_base) / d_base):.1e}")
    print(f"peak RSS: main process {rss_self:.2f} GiB (after data generation {rss_before:.2f}), "
          f"largest worker {rss_child:.2f} GiB")


if __name__ == "__main__":
    main()
