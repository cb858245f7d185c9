"""Sample shapes from a trained latent DDPM: flags -> SampleConfig -> sample_to_files.

Example:
    python diffusion/sample.py --ldm_ckpt_path checkpoints/ldm --ae_ckpt_path checkpoints/ae --save_dir samples \
        --use_cfg --cfg_scale 1.0 --category all --num_samples 1000 --sampler ddim --steps 50 --topk auto
Writes {save_dir}/{category}.npy, (N, R, R, R) uint8 in {0, 1} (what eval.py reads), sample.json and sample.log.
An interrupted run continues where it stopped when rerun with the same flags.
CFG: eps = (1 + w) * eps_cond - w * eps_uncond with w = --cfg_scale (w = 0: plain conditional, w = -1: unconditional).
Several GPUs: `torchrun --nproc_per_node=K diffusion/sample.py ...` splits the batches over the ranks; the files are
identical to a one-process run with the same --seed.
"""

from __future__ import annotations

import argparse
import json

from voxdiff.binarize import threshold_from_flag, topk_from_flag
from voxdiff.config import CATEGORIES, SampleConfig
from voxdiff.utils import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SampleConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ldm_ckpt_path", default=d.ldm_ckpt_path, help="LDM checkpoint file or run directory")
    p.add_argument("--ae_ckpt_path", default=d.ae_ckpt_path, help="AE checkpoint file or run directory")
    p.add_argument("--save_dir", default=d.save_dir)
    p.add_argument("--category", default="all", choices=[*CATEGORIES, "all"])
    p.add_argument("--num_samples", type=int, default=d.num_samples, help="shapes per category")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--sampler", default=d.sampler, choices=["ddpm", "ddim"])
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: all T for ddpm, 50 for ddim)")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM stochasticity (0 deterministic, 1 ~ DDPM)")
    p.add_argument("--use_cfg", action="store_true", help="classifier-free guidance with --cfg_scale")
    p.add_argument("--cfg_scale", type=float, default=d.cfg_scale, help="w in (1+w) eps_c - w eps_u")
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="output grid side: the AE's resolution or a power-of-two multiple (e.g. 64 or 128)")
    p.add_argument("--threshold", default=str(d.threshold),
                   help="occupancy threshold (without --topk), or 'auto' for the AE's calibrated threshold")
    p.add_argument("--topk", default=None, help="keep K voxels per shape (at --resolution), or 'auto' for the "
                                                "AE's per-category training occupancy")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    topk, threshold = topk_from_flag(a.topk), threshold_from_flag(a.threshold)
    cfg = SampleConfig(
        ldm_ckpt_path=a.ldm_ckpt_path, ae_ckpt_path=a.ae_ckpt_path, save_dir=a.save_dir,
        categories=CATEGORIES if a.category == "all" else (a.category,), num_samples=a.num_samples,
        batch_size=a.batch_size, sampler=a.sampler, steps=a.steps or 0,
        eta=a.eta, use_cfg=a.use_cfg, cfg_scale=a.cfg_scale, resolution=a.resolution, threshold=threshold,
        topk=topk, use_ema=not a.no_ema, device=a.device, seed=a.seed,
    )
    from voxdiff.distributed import cleanup, is_main
    from voxdiff.sampling import sample_to_files

    try:
        summary = sample_to_files(cfg)
    finally:
        cleanup()
    if is_main():
        print(json.dumps({c: {k: v for k, v in s.items() if k in ("file", "shapes_per_s", "mean_occupancy", "empty")}
                          for c, s in summary["categories"].items()}))


if __name__ == "__main__":
    run_cli(main)
