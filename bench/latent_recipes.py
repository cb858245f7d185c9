"""Which latent does the diffusion model learn best at equal CPU steps? AE recipe × LDM, scored on held-out shapes.

For each recipe: train the AE (`--ae_steps`), train the LDM on its latents (`--ldm_steps`), then draw `--n` samples per
category (DDIM 50, guidance w, p > threshold) and score them with voxdiff.metrics against the category's held-out
slice of the TRAIN split (never the references). Prints one row per recipe and category: the AE's held-out IoU, the
LDM's held-out loss, JSD, MMD, COV, 1-NNA on equal sets, and the samples' mean voxel count against the data's.

    python bench/latent_recipes.py --dataset_path runs/medium/data --ae_steps 3000 --ldm_steps 2500
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter
from voxdiff.config import CATEGORIES, AEConfig, AETrainConfig, LDMTrainConfig, TuneConfig, unet_preset
from voxdiff.sampling import LatentVoxelPipeline
from voxdiff.training.autoencoder import train_autoencoder
from voxdiff.training.ldm import train_ldm
from voxdiff.tuning import tune_sampling

# name -> changes to the AE training config (the 32³ → 16×8³ AE of the CPU presets otherwise)
_AE4 = AEConfig(resolution=32, channels=(24, 48, 96))  # a third stride-2 stage: 16×4³
RECIPES: dict[str, dict[str, Any]] = {
    "plain_8": {},
    "noise0.3_8": {"latent_noise": 0.3},
    "plain_4": {"model": _AE4},
    "noise0.3_4": {"model": _AE4, "latent_noise": 0.3},
}
# A U-Net step on 4³ latents costs about a third of one on 8³ here (docs/BENCHMARKS.md): the 4³ recipes get
# `--ldm_steps_4` steps (default 1.5× --ldm_steps), still less CPU time than the 8³ ones.


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset_path", required=True, help="32³ voxel data (e.g. a medium run's data/)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--ae_steps", type=int, default=3000)
    p.add_argument("--ldm_steps", type=int, default=2500, help="LDM steps of the 8³ recipes")
    p.add_argument("--ldm_steps_4", type=int, default=None, help="LDM steps of the 4³ recipes (none: 1.5× --ldm_steps)")
    p.add_argument("--n", type=int, default=100, help="samples per category")
    p.add_argument("--cfg_scale", type=float, default=2.0)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--out", default=None, help="keep the runs here (none: a temporary directory)")
    a = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        print(f"AE {a.ae_steps} steps, LDM {a.ldm_steps} steps, {a.n} samples per category, DDIM 50, "
              f"w {a.cfg_scale}, p > {a.threshold}; scored against held-out TRAIN shapes")
        for name in a.recipes:
            t0 = time.perf_counter()
            ae_cfg = dataclasses.replace(
                AETrainConfig(dataset_path=a.dataset_path, ckpt_path=str(root / name / "ae"),
                              model=AEConfig(resolution=32, channels=(24, 48)), batch_size=16, lr=2e-3,
                              num_steps=a.ae_steps, ckpt_every=max(1, a.ae_steps // 3), device="cpu"),
                **RECIPES[name])
            ae = train_autoencoder(ae_cfg, progress=False)
            four = ae_cfg.model.latent_resolution == 4
            steps = (a.ldm_steps_4 or round(1.5 * a.ldm_steps)) if four else a.ldm_steps
            ldm_cfg = LDMTrainConfig(dataset_path=a.dataset_path, ae_ckpt_path=ae_cfg.ckpt_path,
                                     ckpt_path=str(root / name / "ldm"), batch_size=32,
                                     model=unet_preset("small", ch_mult=(1, 2), attn_levels=(1,)) if four else
                                     unet_preset("small"),
                                     lr=1e-3, warmup_steps=200, num_steps=steps, ema_decay=0.998,
                                     ckpt_every=max(1, steps // 5), preview=False, device="cpu")
            ldm = train_ldm(ldm_cfg, progress=False)
            pipe = LatentVoxelPipeline.from_checkpoints(ae_cfg.ckpt_path, ldm_cfg.ckpt_path, precision="auto")
            tune = TuneConfig(enabled=True, cfg_scales=(a.cfg_scale,), thresholds=(a.threshold,), num_samples=a.n)
            out = tune_sampling(pipe, a.dataset_path, CATEGORIES, tune, 32, progress=False)
            minutes = (time.perf_counter() - t0) / 60
            for r in out["rows"]:
                if r["threshold"] != a.threshold:
                    continue
                row = {"recipe": name, "ae_iou": ae["best_iou_cal"], "ldm_loss": ldm["best_heldout_loss"],
                       "ldm_steps": steps, "minutes": minutes, **r}
                rows.append(row)
                print(f"{name:12s} {r['category']:8s} LDM {steps} steps AE IoU {row['ae_iou']:.3f} "
                      f"LDM loss {row['ldm_loss']:.4f} "
                      f"JSD {r['jsd']:.4f} MMD {r['mmd']:.5f} COV {r['cov']:.3f} 1-NNA(eq) {r['nna_balanced']:.3f} "
                      f"voxels {r['sample_mean_voxels']:.0f}/{r['ref_mean_voxels']:.0f}  ({minutes:.0f} min)",
                      flush=True)
    return rows


if __name__ == "__main__":
    main()
