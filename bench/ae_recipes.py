"""Autoencoder recipes at equal training steps: latent 4³ vs 8³, loss, width, GroupNorm / nearest upsampling, blocks.

Every recipe trains with the real trainer (voxdiff.training.train_autoencoder) on the same procedural data, the same
number of steps, batch and seed, then reports what its held-out slice of the train split says: the calibrated IoU,
the IoU at p > 0.5, and the predicted / true voxel count at 0.5 (1.0 = the data's thickness), with the wall time.

    python bench/ae_recipes.py --steps 1500                     # all recipes (about 30 min on 2 CPU cores)
    python bench/ae_recipes.py --steps 300 --recipes course_4 bce_8
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter
from voxdiff.config import AEConfig, AETrainConfig
from voxdiff.data.partseg import COUNT_PRESETS, write_synthetic_partseg
from voxdiff.data.voxelize import preprocess
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.training.autoencoder import train_autoencoder

# name -> (model config, loss): the starter network ("course") at 4³ and 8³ latents, then one change at a time
# from "bce_8"
RECIPES: dict[str, tuple[AEConfig, str]] = {
    "course_4": (AEConfig(resolution=32, channels=(12, 24, 48)), "weighted_bce"),
    "course_8": (AEConfig(resolution=32, channels=(12, 24)), "weighted_bce"),
    "wide_8": (AEConfig(resolution=32, channels=(24, 48)), "weighted_bce"),
    "bce_8": (AEConfig(resolution=32, channels=(24, 48)), "bce"),
    "bce_dice_8": (AEConfig(resolution=32, channels=(24, 48)), "bce_dice"),
    "group_nearest_8": (AEConfig(resolution=32, channels=(24, 48), norm="group", upsample="nearest"), "bce"),
    "resnet_8": (AEConfig(resolution=32, channels=(24, 48), block="resnet"), "bce"),
}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dataset_path", default=None, help="voxel data at 32³ (none: the medium preset's, generated)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = a.dataset_path
        if data is None:
            data = str(Path(tmp) / "data")
            write_synthetic_partseg(data, COUNT_PRESETS["medium"], seed=0, progress=False)
            preprocess(data, data, resolution=32, progress=False)
        print(f"{a.steps} steps, batch {a.batch_size}, lr 2e-3, seed 0, precision auto; held-out slice of train")
        print("recipe            latent   params  IoU(cal)  thr   IoU(0.5)  voxels/true(0.5)  seconds")
        for name in a.recipes:
            model, loss = RECIPES[name]
            cfg = AETrainConfig(dataset_path=data, ckpt_path=str(Path(tmp) / name), model=model, loss=loss,
                                batch_size=a.batch_size, num_steps=a.steps, lr=2e-3, ckpt_every=a.steps, device="cpu")
            t0 = time.perf_counter()
            result = train_autoencoder(dataclasses.replace(cfg), progress=False)
            net = VoxelAutoencoder(model)
            row = {"recipe": name, "latent": "×".join(map(str, net.latent_shape)),
                   "params": sum(q.numel() for q in net.parameters()), "iou_cal": result["best_iou_cal"],
                   "threshold": result["heldout_threshold"], "iou_05": result["heldout_iou_05"],
                   "voxel_ratio_05": result["heldout_voxel_ratio_05"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name:17s} {row['latent']:8s} {row['params']:7d}  {row['iou_cal']:.3f}   {row['threshold']:.3f} "
                  f" {row['iou_05']:.3f}     {row['voxel_ratio_05']:.2f}              {row['seconds']:.0f}",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
