"""Generate shapes by score distillation (SDS) on the latent diffusion model: flags -> SDSConfig -> run_sds.

Example:
    python sds/main.py --ldm_ckpt_path checkpoints/ldm --ae_ckpt_path checkpoints/ae --category chair \
        --num_samples 100 --steps 200 --lr 0.02 --guidance_scale 1.0 --init ddim --topk auto --save_dir samples_sds
Writes {save_dir}/{category}.npy, (N, R, R, R) uint8 in {0, 1} (what eval.py reads), sds.json, sds.log and renders/.
Gradient: w(t) (eps_cfg(z_t, t, c) - eps), w = 1 - alpha_bar_t (--weighting sds) or 1 (uniform);
eps_cfg = (1 + w) eps_cond - w eps_uncond with w = --guidance_scale (0: plain conditional).
"""

from __future__ import annotations

import argparse
import json

from voxdiff.binarize import threshold_from_flag, topk_from_flag
from voxdiff.config import CATEGORIES, SDSConfig
from voxdiff.utils import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SDSConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ldm_ckpt_path", default=d.ldm_ckpt_path, help="LDM checkpoint file or run directory")
    p.add_argument("--ae_ckpt_path", default=d.ae_ckpt_path, help="AE checkpoint file or run directory")
    p.add_argument("--category", default=d.category, help=f"one of {', '.join(CATEGORIES)}")
    p.add_argument("--num_samples", type=int, default=d.num_samples, help="shapes to generate")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="latents optimised at once")
    p.add_argument("--steps", type=int, default=d.steps, help="SDS optimisation steps per batch")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate on the (normalised) latents")
    p.add_argument("--guidance_scale", type=float, default=d.guidance_scale, help="w in (1+w) eps_c - w eps_u")
    p.add_argument("--t_min", type=float, default=d.t_min, help="lowest noise level, as a fraction of T")
    p.add_argument("--t_max", type=float, default=d.t_max, help="highest noise level, as a fraction of T")
    p.add_argument("--anneal", action="store_true", help="lower the upper t bound linearly to t_min over the run")
    p.add_argument("--weighting", default=d.weighting, help="w(t): sds (1 - alpha_bar_t) or uniform (1)")
    p.add_argument("--init", default=d.init, help="noise (N(0, I)) or ddim (DDIM samples)")
    p.add_argument("--init_steps", type=int, default=d.init_steps, help="DDIM steps (eta 0) for --init ddim")
    p.add_argument("--save_dir", default=d.save_dir)
    p.add_argument("--resolution", type=int, default=d.resolution, help="output grid side (a multiple of the AE's)")
    p.add_argument("--threshold", default=str(d.threshold),
                   help="threshold without --topk, or 'auto' for the AE's calibrated threshold")
    p.add_argument("--topk", default=None, help="keep K voxels per shape (at --resolution), or 'auto' for the "
                                                "AE's per-category training occupancy")
    p.add_argument("--no_ema", action="store_true", help="use the raw LDM weights instead of the EMA weights")
    p.add_argument("--render_every", type=int, default=d.render_every, help="render the first batch every K steps "
                                                                            "(0: never)")
    p.add_argument("--render_n", type=int, default=d.render_n, help="shapes per render")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    topk, threshold = topk_from_flag(a.topk), threshold_from_flag(a.threshold)
    cfg = SDSConfig(
        ldm_ckpt_path=a.ldm_ckpt_path, ae_ckpt_path=a.ae_ckpt_path, category=a.category, num_samples=a.num_samples,
        batch_size=a.batch_size, steps=a.steps, lr=a.lr, guidance_scale=a.guidance_scale, t_min=a.t_min,
        t_max=a.t_max, anneal=a.anneal, weighting=a.weighting, init=a.init, init_steps=a.init_steps,
        save_dir=a.save_dir, resolution=a.resolution, threshold=threshold, topk=topk, use_ema=not a.no_ema,
        render_every=a.render_every, render_n=a.render_n, device=a.device, seed=a.seed,
    )
    from voxdiff.sds import run_sds

    s = run_sds(cfg)
    print(json.dumps({k: s[k] for k in ("file", "final_grad_norm_mean", "mean_occupancy", "empty", "s_per_step")}))


if __name__ == "__main__":
    run_cli(main)
