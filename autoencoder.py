"""Train the 3D conv voxel autoencoder (one AE over all categories): flags -> AETrainConfig -> train_autoencoder.

Example:
    python autoencoder.py --dataset_path data/voxels --ckpt_path checkpoints/ae --num_epochs 50
Writes {ckpt_path}/last.pt, best.pt (best calibrated val IoU), log.csv/.jsonl/.png and train.log.
Several GPUs: `torchrun --nproc_per_node=K autoencoder.py ... [--sync_bn]` (--batch_size stays the global batch).
"""

from __future__ import annotations

import argparse
import json
from typing import get_args

from voxdiff.config import CATEGORIES, AEConfig, AELoss, AETrainConfig
from voxdiff.utils import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = AETrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_path", default=d.dataset_path, help="directory of {category}_voxels_{split}.npy")
    p.add_argument("--ckpt_path", default=d.ckpt_path, help="run directory for checkpoints and logs")
    p.add_argument("--categories", nargs="+", default=list(d.categories), choices=CATEGORIES)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--num_epochs", type=int, default=d.num_epochs)
    p.add_argument("--num_steps", type=int, default=None, help="optimizer steps (default: num_epochs passes)")
    p.add_argument("--max_minutes", type=float, default=None, help="safety cap on wall time (default none)")
    p.add_argument("--loss", default=d.loss, choices=get_args(AELoss))
    p.add_argument("--pos_weight", type=float, default=None, help="weighted_bce weight (default: from occupancy)")
    p.add_argument("--grad_clip", type=float, default=d.grad_clip)
    p.add_argument("--resolution", type=int, default=d.model.resolution)
    p.add_argument("--channels", type=int, nargs=3, default=list(d.model.channels))
    p.add_argument("--latent_channels", type=int, default=d.model.latent_channels)
    p.add_argument("--holdout_fraction", type=float, default=d.holdout_fraction)
    p.add_argument("--holdout_max", type=int, default=d.holdout_max)
    p.add_argument("--ckpt_every", type=int, default=d.ckpt_every)
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"])
    p.add_argument("--log_every", type=int, default=d.log_every)
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue exactly from {ckpt_path}/last.pt")
    p.add_argument("--sync_bn", action="store_true", help="under torchrun: SyncBatchNorm over the global batch (CUDA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    cfg = AETrainConfig(
        dataset_path=a.dataset_path, ckpt_path=a.ckpt_path, categories=tuple(a.categories),
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, num_epochs=a.num_epochs,
        num_steps=a.num_steps, max_minutes=a.max_minutes, loss=a.loss, pos_weight=a.pos_weight,
        grad_clip=a.grad_clip, holdout_fraction=a.holdout_fraction, holdout_max=a.holdout_max,
        ckpt_every=a.ckpt_every, precision=a.precision, log_every=a.log_every, device=a.device, seed=a.seed,
        resume=a.resume,
        sync_bn=a.sync_bn,
        model=AEConfig(resolution=a.resolution, channels=tuple(a.channels), latent_channels=a.latent_channels),
    )
    from voxdiff.distributed import cleanup, is_main
    from voxdiff.training.autoencoder import train_autoencoder

    try:
        result = train_autoencoder(cfg)
    finally:
        cleanup()
    if is_main():
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    run_cli(main)
