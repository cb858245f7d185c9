"""Score generated voxel shapes against the test+val references: JSD, MMD, COV (the reference's lines) and 1-NNA.

    python eval.py chair samples.npy [--dataset_path ./data/hdf5_data] [--threshold 0.5] [--json scores.json]
    python eval.py all samples/            # samples/{airplane,chair,table}.npy, one block per category

Prints the reference's four lines (JSD, MMD, COV, 1-NNA), then 1-NNA on equal-size sets, the counts of empty and
bloated samples (more occupied voxels than twice the category's largest training shape), and the stray voxels (no face
neighbour occupied) and fragmented samples (largest connected part under half the shape) beside the references' own
shares; --json records them all (sample_stray, ref_stray, sample_fragmented, ref_fragmented). Definitions and the
conventions for empty shapes: voxdiff/metrics.py; the scorer and its provenance record: voxdiff/scoring.py. 1-NNA is
printed as a fraction in [0, 1] (0.5 is ideal).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter, output_file, positive_int, probability
from voxdiff.config import CATEGORIES
from voxdiff.device import resolve_device
from voxdiff.errors import VoxdiffError, run_cli
from voxdiff.files import atomic_write_json
from voxdiff.logs import get_logger
from voxdiff.metrics_backends import default_workers
from voxdiff.scoring import References, open_samples, score_sets

ALL = "all"


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    ap.add_argument("category", help=f"one of {', '.join(CATEGORIES)}, or {ALL} (SAMPLES is then a directory)")
    ap.add_argument("samples", help="(N,R,R,R) .npy of generated grids (bool/uint8, or float in {0,1})")
    ap.add_argument("--dataset_path", default="./data/hdf5_data", help="folder with {category}_voxels_{split}.npy")
    ap.add_argument("--threshold", type=probability, default=None,
                    help="binarise samples as x > T first, T in [0, 1) (e.g. 0.5); none: samples must be 0/1")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (cuda uses the torch path)")
    ap.add_argument("--workers", type=positive_int, default=None, help="CPU worker processes (none: every usable core)")
    ap.add_argument("--seed", type=int, default=None, help="seed the samples were generated with (provenance only)")
    ap.add_argument("--json", type=output_file, default=None,
                    help="also write metrics + provenance to this JSON file (atomic)")
    ap.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return ap


def sample_files(category: str, samples: str) -> dict[str, Path]:
    """category -> samples .npy: the file itself, or {cat}.npy in the directory for `all` (each checked up front)."""
    if category != ALL:
        files = {category: Path(samples)}
    elif not Path(samples).is_dir():
        raise VoxdiffError(f"with category {ALL}, SAMPLES must be a directory holding {{category}}.npy; got {samples}")
    else:
        files = {cat: Path(samples) / f"{cat}.npy" for cat in CATEGORIES}
    for path in files.values():
        open_samples(path)  # a missing or unreadable file fails before any reference is read
    return files


def report_lines(result: dict[str, Any]) -> list[str]:
    """The printed block: the reference's four lines (full repr), 1-NNA on equal sets, empty and bloated counts, and
    stray / fragmented shares of the samples beside the references' own (what the eye sees as noise)."""
    n = result["n_samples"]
    if result["bloated_above_voxels"] is None:
        bloated = "bloated: not counted (no train split)"
    else:
        over = result["bloated_above_voxels"]
        bloated = f"bloated samples: {result['n_bloated_samples']} of {n} (over {over} voxels)"
    return [
        f"JSD: {result['jsd']}",
        f"MMD: {result['mmd']}",
        f"COV: {result['cov']}",
        f"1-NNA: {result['nna']}",
        f"1-NNA (equal sets): {result['nna_balanced']}",
        f"empty samples: {result['n_empty_samples']} of {n}; {bloated}",
        f"stray voxels: {result['sample_stray']:.2%} (references {result['ref_stray']:.2%}); "
        f"fragmented samples: {result['sample_fragmented']:.1%} (references {result['ref_fragmented']:.1%})",
    ]


def main(argv: list[str] | None = None) -> dict:
    """Score SAMPLES; returns the result dict (one category) or {category: record} (`all`)."""
    args = build_parser().parse_args(argv)
    if args.category != ALL and args.category not in CATEGORIES:
        raise VoxdiffError(f"unknown category {args.category!r}; choose from {', '.join(CATEGORIES)} or {ALL}")
    device = resolve_device(args.device)
    files = sample_files(args.category, args.samples)
    progress = not args.no_progress
    # every input is read and checked before the first output (the log next to --json, the JSON itself)
    references = {cat: References.load(args.dataset_path, cat, progress=progress) for cat in files}
    log = get_logger("voxdiff.eval", Path(args.json).with_suffix(".log") if args.json else None)
    records: dict[str, dict[str, Any]] = {}
    for cat, path in files.items():
        out = score_sets(
            references[cat],
            {"samples": path},
            threshold=args.threshold,
            device=device,
            workers=args.workers or default_workers(),  # none: every usable core
            seed=args.seed,
            progress=progress,
        )
        result = out["sets"]["samples"]
        if args.category == ALL:
            print(f"== {cat}")
        print("\n".join(report_lines(result)), flush=True)
        if result["n_empty_samples"]:
            log.warning(
                "%s: %d of %d samples are empty (no occupied voxel): they match nothing and count as misses",
                cat,
                result["n_empty_samples"],
                result["n_samples"],
            )
        log.info("%s: %s", cat, result)
        records[cat] = {"category": cat, "samples_file": str(path.resolve()), "provenance": out["provenance"], **result}

    if args.category != ALL:
        if args.json:
            atomic_write_json(args.json, records[args.category])
        return records[args.category]
    if args.json:
        samples_dir = str(Path(args.samples).resolve())
        atomic_write_json(args.json, {"category": ALL, "samples_dir": samples_dir, "categories": records})
    return records


if __name__ == "__main__":
    run_cli(main)
