"""Train the latent UNet3D DDPM (classifier-free guidance with --use_cfg): flags -> LDMTrainConfig -> train_ldm.

Example:
    python diffusion/train.py --dataset_path data/voxels --ae_ckpt_path checkpoints/ae --ckpt_path checkpoints/ldm \
        --use_cfg --preset seed --num_steps 100000
Writes {ckpt_path}/last.pt, best.pt (lowest held-out loss of the EMA model), log.csv/.jsonl/.png and train.log.
Training latents are encoded once by the frozen AE and cached beside its checkpoint (or in --latent_cache_dir).
Several GPUs: `torchrun --nproc_per_node=K diffusion/train.py ...` (--batch_size stays the global batch; resume works
under any K).
"""

from __future__ import annotations

import argparse
import json

from voxdiff.config import CATEGORIES, UNET_PRESETS, LDMTrainConfig, SchedulerConfig, unet_preset
from voxdiff.utils import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = LDMTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_path", default=d.dataset_path, help="directory of {category}_voxels_{split}.npy")
    p.add_argument("--ae_ckpt_path", default=d.ae_ckpt_path, help="trained AE checkpoint file or run directory")
    p.add_argument("--ckpt_path", default=d.ckpt_path, help="run directory for checkpoints and logs")
    p.add_argument("--categories", nargs="+", default=list(d.categories), choices=CATEGORIES)
    p.add_argument("--use_cfg", action="store_true", help="train with label dropout so CFG can be used at sampling")
    p.add_argument("--cfg_dropout", type=float, default=d.cfg_dropout, help="label dropout with --use_cfg")
    p.add_argument("--preset", default="seed", choices=list(UNET_PRESETS), help="UNet size")
    p.add_argument("--dropout", type=float, default=None, help="residual-block dropout (default: the preset's)")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    p.add_argument("--num_epochs", type=int, default=None, help="epochs over the training latents")
    p.add_argument("--num_steps", type=int, default=None,
                   help=f"optimizer steps (default {d.num_steps}, or no step limit when --num_epochs is given)")
    p.add_argument("--max_minutes", type=float, default=None, help="safety cap on wall time (default none)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"])
    p.add_argument("--ema_decay", type=float, default=d.ema_decay)
    p.add_argument("--grad_clip", type=float, default=d.grad_clip, help="max gradient norm (0 = off)")
    p.add_argument("--num_train_timesteps", type=int, default=SchedulerConfig().num_train_timesteps)
    p.add_argument("--ckpt_every", type=int, default=d.ckpt_every, help="steps between last.pt / held-out checks")
    p.add_argument("--log_every", type=int, default=d.log_every)
    p.add_argument("--preview_every", type=int, default=None, help="steps between preview renders (default: end)")
    p.add_argument("--no_preview", action="store_true", help="no preview renders")
    p.add_argument("--latent_cache_dir", default=d.latent_cache_dir, help="default: latents/ beside the AE checkpoint")
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue exactly from {ckpt_path}/last.pt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    num_steps = a.num_steps if a.num_steps is not None else (None if a.num_epochs else LDMTrainConfig().num_steps)
    overrides = {} if a.dropout is None else {"dropout": a.dropout}
    cfg = LDMTrainConfig(
        dataset_path=a.dataset_path, ae_ckpt_path=a.ae_ckpt_path, ckpt_path=a.ckpt_path,
        categories=tuple(a.categories), use_cfg=a.use_cfg, cfg_dropout=a.cfg_dropout if a.use_cfg else 0.0,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        num_epochs=a.num_epochs, num_steps=num_steps, max_minutes=a.max_minutes, ema_decay=a.ema_decay,
        grad_clip=a.grad_clip, ckpt_every=a.ckpt_every, log_every=a.log_every, preview_every=a.preview_every,
        preview=not a.no_preview, precision=a.precision,
        latent_cache_dir=a.latent_cache_dir,
        device=a.device, seed=a.seed, resume=a.resume, model=unet_preset(a.preset, **overrides),
        scheduler=SchedulerConfig(num_train_timesteps=a.num_train_timesteps),
    )
    from voxdiff.distributed import cleanup, is_main
    from voxdiff.training.ldm import train_ldm

    try:
        result = train_ldm(cfg)
    finally:
        cleanup()
    if is_main():
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    run_cli(main)
