r"""Tune the guidance scale and the threshold on the held-out slice of the TRAINING split (never the references).

The same library function the stage runner's tune stage calls (voxdiff.tuning.tune_sampling), for checkpoints trained
outside a run. Prints one row per (category, w, threshold) and the pick; writes `{out}/tune.json`.

    python bench/tune_sampling.py --ldm_ckpt_path runs/medium/ldm --ae_ckpt_path runs/medium/ae \
        --dataset_path runs/medium/data --cfg_scales 0 1 2 4 --out runs/medium/tune
"""

from __future__ import annotations

import argparse
from pathlib import Path

from voxdiff.cli import ArgumentParser, HelpFormatter, add_config_arguments, config_from_args
from voxdiff.config import CATEGORIES, TuneConfig
from voxdiff.data.voxelize import open_voxels, voxel_path
from voxdiff.device import flush_denormals, resolve_device
from voxdiff.errors import run_cli
from voxdiff.files import atomic_write_json
from voxdiff.sampling import LatentVoxelPipeline
from voxdiff.tuning import tune_sampling


def build_parser() -> tuple[argparse.ArgumentParser, list]:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ldm_ckpt_path", required=True, help="LDM checkpoint file or run directory (default: none)")
    p.add_argument("--ae_ckpt_path", required=True, help="AE checkpoint file or run directory (default: none)")
    p.add_argument("--dataset_path", required=True, help="the voxel data the AE was trained on (default: none)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda (default: auto)")
    p.add_argument("--out", required=True, help="directory for tune.json (default: none)")
    return p, add_config_arguments(p, TuneConfig, skip=("enabled",))


def main(argv: list[str] | None = None) -> None:
    p, flags = build_parser()
    a = p.parse_args(argv)
    cfg = config_from_args(TuneConfig, a, flags)
    device = resolve_device(a.device)
    flush_denormals(device)
    pipe = LatentVoxelPipeline.from_checkpoints(a.ae_ckpt_path, a.ldm_ckpt_path, device=device)
    resolution = int(open_voxels(voxel_path(a.dataset_path, CATEGORIES[0], "train")).shape[-1])
    out = tune_sampling(pipe, a.dataset_path, CATEGORIES, cfg, resolution)
    for row in out["rows"]:
        print(f"{row['category']:9s} w={row['cfg_scale']:<4g} φ={row['rescale']:<4g} t={row['threshold']:<5g} "
              f"JSD {row['jsd']:.4f} "
              f"MMD {row['mmd']:.5f} COV {row['cov']:.3f} 1-NNA(eq) {row['nna_balanced']:.3f} "
              f"voxels {row['sample_mean_voxels']:.0f}/{row['ref_mean_voxels']:.0f}")
    print(f"pick: {out['pick']}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(a.out) / "tune.json", out)


if __name__ == "__main__":
    run_cli(main)
