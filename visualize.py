"""Look at voxel shapes: a PNG grid of shapes from a (N,R,R,R) .npy (data split or samples), optional mesh export.

    python visualize.py samples/chair.npy                      # first 16 shapes -> samples/chair.png
    python visualize.py data/hdf5_data/chair_voxels_test.npy --n 4 --start 10 --views 22,-55 22,35 85,-90
    python visualize.py samples/chair.npy --n 8 --mesh_dir meshes --mesh_format obj   # meshes/chair_00000.obj, ...

The file is memory-mapped: only the shapes drawn are read. Float arrays (probabilities) are binarised at --threshold.
Meshes are named {prefix}_{index:05d}.{ply,obj} (+ {prefix}_{index:05d}_points.ply with --points), where the prefix is
the category when the file is named after one (samples/chair.npy -> chair_00003.ply) and "shape" otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter, probability
from voxdiff.config import CATEGORIES
from voxdiff.data.voxelize import open_voxels
from voxdiff.errors import VoxdiffError, run_cli
from voxdiff.mesh import export_mesh, export_pointcloud
from voxdiff.render import DEFAULT_VIEW, DEFAULT_VIEWS, Style, render_voxels


def parse_view(text: str) -> tuple[float, float]:
    """'ELEV,AZIM' in degrees -> (elev, azim)."""
    try:
        e, a = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a view is ELEV,AZIM in degrees (e.g. 22,-55); got {text!r}") from None
    return e, a


def mesh_prefix(samples: str | Path) -> str:
    """Prefix of mesh file names: the category when the samples file is named after one (chair.npy), else "shape"."""
    stem = Path(samples).stem
    return stem if stem in CATEGORIES else "shape"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("samples", help="(N,R,R,R) .npy of voxel grids (uint8/bool, or float probabilities)")
    p.add_argument("--out", default=None, help="PNG to write (default: the input path with .png)")
    p.add_argument("--n", type=int, default=16, help="number of shapes to draw")
    p.add_argument("--start", type=int, default=0, help="index of the first shape drawn")
    p.add_argument("--ncols", type=int, default=None, help="panels per row for a single view (default min(n, 8))")
    p.add_argument(
        "--views",
        nargs="+",
        type=parse_view,
        default=None,
        metavar="ELEV,AZIM",
        help=f"camera views; several draw one row per shape (default {DEFAULT_VIEW[0]:g},{DEFAULT_VIEW[1]:g})",
    )
    p.add_argument("--all_views", action="store_true", help="shorthand for three views: front, side and top")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="occupancy = value > threshold, in [0, 1) (for probabilities)")
    p.add_argument("--color_by", choices=("height", "depth", "solid"), default="height")
    p.add_argument("--max_points", type=int, default=16_000, help="surface voxels drawn per panel (subsampled above)")
    p.add_argument("--panel_px", type=int, default=240, help="pixel size of one square panel")
    p.add_argument("--mesh_dir", default=None, help="also export a marching-cubes mesh of each drawn shape here")
    p.add_argument("--mesh_format", choices=("ply", "obj"), default="ply")
    p.add_argument("--smooth", type=float, default=0.7, help="mesh smoothing sigma in voxels (0 = blocky)")
    p.add_argument("--points", action="store_true", help="with --mesh_dir, also write voxel-centre .ply point clouds")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # 1. open (memory-mapped) and pick the slice to draw
    arr = open_voxels(args.samples)
    n_all, res = len(arr), arr.shape[-1]
    if args.n < 1:
        raise VoxdiffError(f"--n must be >= 1; got {args.n}")
    if not 0 <= args.start < n_all:
        raise VoxdiffError(f"--start {args.start} is outside the file's {n_all} shapes")
    stop = min(args.start + args.n, n_all)
    grids = np.asarray(arr[args.start : stop])  # reads only these shapes
    if grids.dtype.kind == "f" and not np.isfinite(grids).all():
        raise VoxdiffError(f"{args.samples} holds NaN or inf values in shapes {args.start}..{stop - 1}")
    occ = (grids > args.threshold).reshape(len(grids), -1).mean(1)
    titles = [f"#{args.start + i}  {100 * o:.2g}%" if o > 0 else f"#{args.start + i}" for i, o in enumerate(occ)]
    views = list(DEFAULT_VIEWS) if args.all_views else args.views
    # 2. render
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".png")
    style = Style(ncols=args.ncols, views=views, max_points=args.max_points, color_by=args.color_by,
                  panel_px=args.panel_px)
    render_voxels(grids, out, titles, threshold=args.threshold, style=style)
    # 3. meshes of exactly the shapes drawn
    n_mesh = 0
    if args.mesh_dir:
        mesh_dir = Path(args.mesh_dir)
        prefix = mesh_prefix(args.samples)
        for i in tqdm(range(len(grids)), desc="meshes", unit="shape", leave=False):
            if occ[i] == 0:
                continue  # nothing to mesh; the PNG shows it as "empty"
            stem = mesh_dir / f"{prefix}_{args.start + i:05d}"
            export_mesh(grids[i], stem.with_suffix(f".{args.mesh_format}"), args.threshold, args.smooth)
            if args.points:
                export_pointcloud(grids[i], stem.with_name(stem.name + "_points.ply"), args.threshold)
            n_mesh += 1
    # 4. report
    empty = int((occ == 0).sum())
    msg = f"wrote {out}: shapes {args.start}..{stop - 1} of {n_all} at {res}^3, mean occupancy {100 * occ.mean():.2g}%"
    msg += f", {empty} empty"
    if args.mesh_dir:
        msg += f"; {n_mesh} {args.mesh_format} meshes in {args.mesh_dir}"
    print(msg)


if __name__ == "__main__":
    run_cli(main)
