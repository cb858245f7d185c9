"""Prepare voxel data: ShapeNet PartSeg HDF5 (real zip, download, or procedural) -> `{category}_voxels_{split}.npy`.

Examples:
    python load_data.py --synthetic --data_preset small --dataset_path data/hdf5_data      # procedural, voxelize
    python load_data.py --zip shapenet_part_seg_hdf5_data.zip --dataset_path data/hdf5_data
    python load_data.py --dataset_path data/hdf5_data --resolution 64 --category chair table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from voxdiff.config import CATEGORIES, SPLITS
from voxdiff.data.partseg import (
    COUNT_PRESETS,
    PARTSEG_URL,
    check_may_generate,
    download_partseg,
    extract_zip,
    iter_category_points,
    write_synthetic_partseg,
)
from voxdiff.data.voxelize import check_resolution, preprocess
from voxdiff.errors import VoxdiffError, run_cli
from voxdiff.files import dir_lock


def build_parser() -> argparse.ArgumentParser:
    """The flags; every number is range-checked here, before anything is written."""
    from voxdiff.cli import (
        ArgumentParser,
        DefaultsHelpFormatter,
        non_negative_int,
        output_file,
        positive_float,
        positive_int,
    )

    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset_path", default="data/hdf5_data",
                   help="directory of ply_data_*.h5 + *_hdf5_file_list.txt (created by --synthetic/--zip/--download)")
    p.add_argument("--out_dir", default=None, help="where the .npy grids go (none: --dataset_path)")
    p.add_argument("--resolution", type=_resolution, default=128, help="grid size, a power of two >= 8")
    p.add_argument("--category", dest="categories", nargs="+", default=["all"], choices=[*CATEGORIES, "all"],
                   help="categories to voxelize")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to voxelize")
    p.add_argument("--isotropic", action="store_true",
                   help="one scale for all axes, centred (default: the reference per-axis scaling)")
    p.add_argument("--chunk", type=positive_int, default=32, help="shapes voxelized per step (bounds memory)")
    g = p.add_argument_group("procedural dataset")
    g.add_argument("--synthetic", action="store_true", help="generate the procedural PartSeg HDF5 into --dataset_path")
    g.add_argument("--data_preset", choices=sorted(COUNT_PRESETS), default="small", help="shape counts")
    for s in SPLITS:
        g.add_argument(f"--n_{s}", type=non_negative_int, default=None, help=f"override: shapes per category in {s}")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--workers", type=positive_int, default=1, help="processes generating shapes")
    g = p.add_argument_group("real ShapeNet PartSeg")
    g.add_argument("--zip", default=None, help="local shapenet_part_seg_hdf5_data.zip to extract into --dataset_path")
    g.add_argument("--sha256", type=_sha256, default=None, help="expected SHA-256 of the zip")
    g.add_argument("--download", action="store_true", help="try to download the zip first (short timeout)")
    g.add_argument("--download_url", default=PARTSEG_URL)
    g.add_argument("--timeout", type=positive_float, default=20.0, help="download timeout in seconds")
    g = p.add_argument_group("looking at it")
    g.add_argument("--preview", type=output_file, default=None,
                   help="PNG grid of the first shapes per category (point clouds)")
    g.add_argument("--preview_voxels", type=output_file, default=None,
                   help="PNG of the first voxelized shapes per category")
    g.add_argument("--preview_n", type=positive_int, default=4, help="shapes per category in the previews")
    return p


def _resolution(text: str) -> int:
    """argparse type: a power of two >= 8."""
    try:
        return check_resolution(int(text))
    except (ValueError, VoxdiffError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, VoxdiffError) else f"not an integer: {text!r}") \
            from None


def _sha256(text: str) -> str:
    """argparse type: 64 hexadecimal digits."""
    t = text.strip().lower()
    if len(t) != 64 or any(ch not in "0123456789abcdef" for ch in t):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits; got {text!r}")
    return t


def _counts(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Shapes per split and category: the preset's, with --n_{split} overriding a whole split."""
    counts = {s: dict(COUNT_PRESETS[args.data_preset][s]) for s in SPLITS}
    for s in SPLITS:
        n = getattr(args, f"n_{s}")
        if n is not None:
            counts[s] = dict.fromkeys(CATEGORIES, n)
    return counts


def _preview_points(args: argparse.Namespace, split: str) -> None:
    from voxdiff import render

    pts, titles = [], []
    for c in args.categories:
        got = next(iter_category_points(args.dataset_path, split, c, chunk=args.preview_n), np.zeros((0, 1, 3)))
        pts += list(got)
        titles += [f"{c} {i}" for i in range(len(got))]
    if not pts:
        raise VoxdiffError(f"--preview: no shapes in {split}")
    render.plot_pointclouds(np.stack(pts), args.preview, titles, render.Style(ncols=args.preview_n))


def _preview_voxels(args: argparse.Namespace, out_dir: Path, split: str) -> None:
    from voxdiff import render
    from voxdiff.data.voxelize import open_voxels, voxel_path

    grids, titles = [], []
    for c in args.categories:
        g = np.asarray(open_voxels(voxel_path(out_dir, c, split))[: args.preview_n])
        grids.append(g)
        titles += [f"{c} {i} ({args.resolution}³)" for i in range(len(g))]
    render.render_voxels(np.concatenate(grids), args.preview_voxels, titles,
                         style=render.Style(ncols=args.preview_n))


def main(argv: list[str] | None = None) -> dict:
    """Check every flag and input path, then fetch / generate, voxelize and preview under the output's lock."""
    args = build_parser().parse_args(argv)
    args.categories = list(CATEGORIES) if "all" in args.categories else list(dict.fromkeys(args.categories))
    bad = [s for s in args.splits if s not in SPLITS]
    if bad:
        raise VoxdiffError(f"unknown split {bad[0]!r}; choose from {', '.join(SPLITS)}")
    if sum([args.synthetic, args.zip is not None, args.download]) > 1:
        raise VoxdiffError("choose at most one of --synthetic, --zip and --download")
    dataset = Path(args.dataset_path)
    out_dir = Path(args.out_dir) if args.out_dir else dataset
    if args.synthetic:
        check_may_generate(dataset)
    if args.zip is not None and not Path(args.zip).is_file():
        raise VoxdiffError(f"--zip {args.zip}: file not found")
    if out_dir.exists() and not out_dir.is_dir():
        raise VoxdiffError(f"--out_dir {out_dir} is a file, not a directory")
    if args.out_dir is None and not (args.synthetic or args.zip or args.download) and not dataset.is_dir():
        raise VoxdiffError(f"--dataset_path {dataset} is not a directory (give --synthetic, --zip or --download to "
                           "create it)")
    with dir_lock(out_dir, "data preparation", remove_created_on_error=True):
        return _prepare(args, dataset)


def _prepare(args: argparse.Namespace, dataset: Path) -> dict:
    """Fetch or generate the HDF5 files, voxelize them, preview; the output directory is locked."""
    if args.download:
        zip_path = dataset.parent / "shapenet_part_seg_hdf5_data.zip"
        print(f"downloading {args.download_url} (timeout {args.timeout:g} s) -> {zip_path}")
        args.zip = str(download_partseg(zip_path, args.download_url, args.timeout))
    if args.zip is not None:
        extract_zip(args.zip, dataset, args.sha256)
        print(f"extracted {args.zip} -> {dataset}")
    elif args.synthetic:
        counts = _counts(args)
        files = write_synthetic_partseg(dataset, counts, seed=args.seed, workers=args.workers)
        print(f"wrote {len(files)} procedural HDF5 file(s) -> {dataset} ({json.dumps(counts)})")
    summary = preprocess(dataset, args.out_dir, args.resolution, args.categories, args.splits, args.isotropic,
                         chunk=args.chunk)
    out_dir = Path(summary["out_dir"])
    for c, per in summary["outputs"].items():
        for s, info in per.items():
            print(f"{c:8s} {s:5s} {info['count']:6d} shapes  occupancy {info['mean_occupancy']:.4f}  -> {info['path']}")
    print(f"{args.resolution}^3 grids in {out_dir} ({summary['seconds']:.1f} s); summary in preprocess.json")
    split = args.splits[0]
    if args.preview:
        _preview_points(args, split)
        print(f"preview -> {args.preview}")
    if args.preview_voxels:
        _preview_voxels(args, out_dir, split)
        print(f"voxel preview -> {args.preview_voxels}")
    return summary


if __name__ == "__main__":
    run_cli(main)
