"""Score generated voxel shapes against the test+val references: JSD, MMD, COV (the reference's lines) and 1-NNA.

    python eval.py chair samples.npy [--dataset_path ./data/hdf5_data] [--threshold 0.5] [--json scores.json]

Definitions and the conventions for empty shapes: voxdiff/metrics.py. 1-NNA is printed as a fraction in [0, 1]
(0.5 is ideal).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

import voxdiff
from voxdiff import metrics
from voxdiff.config import CATEGORIES, category_index
from voxdiff.data.voxelize import open_voxels, voxel_path
from voxdiff.utils import VoxdiffError, atomic_write_json, get_logger, resolve_device, run_cli

REF_SPLITS = ("test", "val")  # the reference set is test then val, concatenated


def load_samples(path: str | Path) -> np.ndarray:
    """Memory-map a samples .npy with a clear error for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise VoxdiffError(f"samples file not found: {p}")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise VoxdiffError(f"{p} is not a readable .npy array ({e})") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("category", help=f"one of {', '.join(CATEGORIES)}")
    ap.add_argument("samples", help="(N,R,R,R) .npy of generated grids (bool/uint8, or float in {0,1})")
    ap.add_argument("--dataset_path", default="./data/hdf5_data", help="folder with {category}_voxels_{split}.npy")
    ap.add_argument("--threshold", type=float, default=None, help="binarise samples as x > T first (e.g. 0.5)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (cuda uses the torch path)")
    ap.add_argument("--workers", type=int, default=0, help="CPU worker processes (0 = all usable cores)")
    ap.add_argument("--seed", type=int, default=None, help="seed the samples were generated with (provenance only)")
    ap.add_argument("--json", default=None, help="also write metrics + provenance to this JSON file (atomic)")
    ap.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    category_index(args.category)  # clear error for unknown names
    if args.workers < 0:
        raise VoxdiffError(f"--workers must be >= 0; got {args.workers}")
    device = resolve_device(args.device)
    samples = load_samples(args.samples)
    ref_files = [voxel_path(args.dataset_path, args.category, split) for split in REF_SPLITS]
    refs = [open_voxels(p) for p in ref_files]
    log = get_logger("voxdiff.eval", Path(args.json).with_suffix(".log") if args.json else None)

    # References are read once: validated, indexed and hashed in the same pass.
    hasher = hashlib.sha256()
    ref_pts = metrics.extract_points(refs, name="references", hasher=hasher, progress=not args.no_progress)
    workers = args.workers or metrics.default_workers()
    result = metrics.evaluate(
        samples, ref_pts, device=device, progress=not args.no_progress, threshold=args.threshold, workers=workers
    )

    print(f"JSD: {result['jsd']}")
    print(f"MMD: {result['mmd']}")
    print(f"COV: {result['cov']}")
    print(f"1-NNA: {result['nna']}")
    note = "1-NNA is a fraction in [0, 1]; 0.5 is ideal"
    if result["n_empty_samples"]:
        log.warning(
            "%d of %d samples are empty (no occupied voxel): they match nothing and count as misses",
            result["n_empty_samples"],
            result["n_samples"],
        )
    log.info("%s; %s", note, {k: v for k, v in result.items()})

    if args.json:
        record = {
            "category": args.category,
            "samples_file": str(Path(args.samples).resolve()),
            **result,
            "nna_note": note,
            "threshold": args.threshold,
            "reference": {
                "files": [p.name for p in ref_files],
                "count": ref_pts.n,
                "sha256": hasher.hexdigest(),
                "sha256_of": "raw bytes of the test then val arrays, concatenated in order",
            },
            "seed": args.seed,
            "device": str(device),
            "voxdiff_version": voxdiff.__version__,
            "elapsed_s": time.perf_counter() - t0,
            "definitions": {
                "points": "indices of voxels > 0 divided by (R-1)",
                "chamfer": "mean_y min_x |x-y|^2 + mean_x min_y |x-y|^2 (squared, no sqrt)",
                "mmd": "mean over references of min over samples of CD",
                "cov": "distinct nearest references of samples / N_ref",
                "jsd": "per-voxel sums normalised; KL with eps=1e-10 on both arguments; natural log",
            },
        }
        atomic_write_json(args.json, record)
    return result


if __name__ == "__main__":
    run_cli(main)
