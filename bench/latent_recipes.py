"""Which recipe makes the diffusion model learn the latent? Ranked by what its samples score, not by reconstruction.

Each recipe names an AE (latent shape and regularisation) and an LDM (U-Net size, target, loss weighting, schedule,
timestep spacing, batch, learning rate, EMA). For each: train the AE (runs with the same AE settings share one AE),
train the LDM on its latents, draw `--n` samples per category (DDIM `--steps`, guidance w, p > threshold) and score
them with voxdiff.metrics against the category's held-out slice of the TRAIN split (recorded in the AE checkpoint;
never val or test, which the reports use). One row per recipe and category: CPU minutes (AE, LDM, sampling), the AE's
held-out IoU, the LDM's held-out loss, JSD / MMD / COV / 1-NNA on equal sets, stray voxels and fragmented samples
beside the held-out data's own, and the mean voxel count. Rows are appended to `--out`/rows.jsonl as they finish, so
a long screen can be read while it runs and resumed (recipes with rows are skipped).

    python bench/latent_recipes.py --dataset_path runs/demo/data --out runs/recipes --recipes base_16x8 lat_4x8
    python bench/latent_recipes.py --list
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from voxdiff.binarize import Binarization
from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter
from voxdiff.config import (
    CATEGORIES,
    AEConfig,
    AETrainConfig,
    LDMTrainConfig,
    SchedulerConfig,
    category_index,
    to_dict,
    unet_preset,
)
from voxdiff.metrics import evaluate
from voxdiff.sampling import LatentVoxelPipeline, batch_seed
from voxdiff.training.autoencoder import train_autoencoder
from voxdiff.training.ldm import train_ldm
from voxdiff.tuning import heldout_shapes

# The AE of the CPU presets (32³, two stride-2 stages -> 8³) and a third stage (-> 4³).
_AE8 = {"resolution": 32, "channels": (24, 48)}
_AE4 = {"resolution": 32, "channels": (24, 48, 96)}
# U-Nets: "small" at 8³ (levels 8, 4, 2; attention at 2³); at 4³ two levels (4, 2; attention at 2³).
_UNET8 = {"name": "small"}
_UNET4 = {"name": "small", "ch_mult": (1, 2), "attn_levels": (1,)}

BASE: dict[str, Any] = {
    "ae_model": _AE8, "ae": {"latent_noise": 0.0}, "latent_channels": 16,
    "unet": _UNET8, "sched": {}, "ldm": {"batch_size": 32, "lr": 1e-3, "ema_decay": 0.995, "warmup_steps": 100},
}


def _r(**changes: Any) -> dict[str, Any]:
    """BASE with nested changes: keys ae_model/ae/unet/sched/ldm are merged, others replaced."""
    out = copy.deepcopy(BASE)
    for k, v in changes.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_V = {"prediction_type": "v_prediction"}
_ZT = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
RECIPES: dict[str, dict[str, Any]] = {
    # the latent's shape (the demo's and medium's today: 16×8³)
    "base_16x8": _r(),
    "lat_8x8": _r(latent_channels=8),
    "lat_4x8": _r(latent_channels=4),
    "lat_16x4": _r(ae_model=_AE4, unet=_UNET4),
    "lat_8x4": _r(ae_model=_AE4, unet=_UNET4, latent_channels=8),
    # the latent's regularisation
    "noise_4x8": _r(latent_channels=4, ae={"latent_noise": 0.3}),
    "kl_4x8": _r(latent_channels=4, ae_model={**_AE8, "variational": True}, ae={"kl_weight": 1e-3}),
    "noise_16x4": _r(ae_model=_AE4, unet=_UNET4, ae={"latent_noise": 0.3}),
    "kl_16x4": _r(ae_model={**_AE4, "variational": True}, unet=_UNET4, ae={"kl_weight": 1e-3}),
    # the LDM's target, loss weighting, schedule and spacing (on the 4×8³ latent)
    "v_4x8": _r(latent_channels=4, sched=_V),
    "minsnr_4x8": _r(latent_channels=4, ldm={"snr_gamma": 5.0}),
    "vminsnr_4x8": _r(latent_channels=4, sched=_V, ldm={"snr_gamma": 5.0}),
    "zsnr_4x8": _r(latent_channels=4, sched=_ZT),
    "cosine_4x8": _r(latent_channels=4, sched={"beta_schedule": "cosine"}),
    "scaled_4x8": _r(latent_channels=4, sched={"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012}),
    "trailing_4x8": _r(latent_channels=4, sched={"timestep_spacing": "trailing"}),
    # the U-Net's width and depth, batch, learning rate, EMA (on the 4×8³ latent)
    "wide_4x8": _r(latent_channels=4, unet={"name": "small", "ch": 64}),
    "deep_4x8": _r(latent_channels=4, unet={"name": "small", "num_res_blocks": 2}),
    "batch64_4x8": _r(latent_channels=4, ldm={"batch_size": 64}),
    "lr3e-4_4x8": _r(latent_channels=4, ldm={"lr": 3e-4}),
    "ema999_4x8": _r(latent_channels=4, ldm={"ema_decay": 0.999}),
}


def _ae_key(recipe: dict[str, Any]) -> str:
    blob = json.dumps([recipe["ae_model"], recipe["ae"], recipe["latent_channels"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _unet(spec: dict[str, Any], in_channels: int) -> Any:
    spec = dict(spec)
    return unet_preset(spec.pop("name"), in_channels=in_channels, **spec)


def run_recipe(name: str, recipe: dict[str, Any], a: Any, root: Path) -> list[dict[str, Any]]:
    """Train (or reuse) the recipe's AE, train its LDM, sample and score; one row per category."""
    ae_dir = root / "ae" / _ae_key(recipe)
    ae_model = AEConfig(**{**recipe["ae_model"], "latent_channels": recipe["latent_channels"]})
    ae_cfg = AETrainConfig(dataset_path=a.dataset_path, ckpt_path=str(ae_dir), model=ae_model, batch_size=16, lr=2e-3,
                           num_steps=a.ae_steps, ckpt_every=max(1, a.ae_steps // 3), holdout_fraction=a.holdout,
                           device=a.device, seed=a.seed, **recipe["ae"])
    t0 = time.perf_counter()
    if (ae_dir / "best.pt").exists():
        ae = json.loads((ae_dir / "summary.json").read_text())
    else:
        ae = train_autoencoder(ae_cfg, progress=False)
        (ae_dir / "summary.json").write_text(json.dumps({"best_iou_cal": ae["best_iou_cal"],
                                                         "minutes": (time.perf_counter() - t0) / 60}))
        ae = {"best_iou_cal": ae["best_iou_cal"], "minutes": (time.perf_counter() - t0) / 60}
    ldm_dir = root / "ldm" / name
    steps = a.ldm_steps
    ldm_cfg = LDMTrainConfig(dataset_path=a.dataset_path, ae_ckpt_path=str(ae_dir), ckpt_path=str(ldm_dir),
                             model=_unet(recipe["unet"], recipe["latent_channels"]),
                             scheduler=SchedulerConfig(**recipe["sched"]), num_steps=steps,
                             ckpt_every=max(1, steps // 4), preview=False, device=a.device, seed=a.seed,
                             overwrite=True, lr_schedule="cosine", **recipe["ldm"])
    t1 = time.perf_counter()
    ldm = train_ldm(ldm_cfg, progress=False)
    ldm_minutes = (time.perf_counter() - t1) / 60
    pipe = LatentVoxelPipeline.from_checkpoints(ae_dir, ldm_dir, precision="auto", device=a.device)
    sched = pipe.make_scheduler("ddim", a.steps, clamp=True)
    rows = []
    for cat in CATEGORIES:
        t2 = time.perf_counter()
        refs = heldout_shapes(a.dataset_path, cat, pipe)
        c = category_index(cat)
        labels = torch.full((a.n,), c, dtype=torch.long)
        gen = torch.Generator(device=pipe.device).manual_seed(batch_seed(a.seed + 1234, c, 0))
        z = pipe.sample_latents(labels, sched, pipe.guidance(True, a.cfg_scale), gen)
        grids = pipe.to_grids(z, labels, Binarization(threshold=a.threshold))
        res = evaluate(grids, refs, progress=False)
        rows.append({"recipe": name, "category": cat, "ae_minutes": ae["minutes"], "ldm_minutes": ldm_minutes,
                     "sample_minutes": (time.perf_counter() - t2) / 60, "ae_iou": ae["best_iou_cal"],
                     "ldm_loss": ldm["best_heldout_loss"], "ldm_steps": steps, "n_refs": len(refs),
                     "latent": list(pipe.latent_shape), "spec": to_dict(ldm_cfg.scheduler) | {"recipe": recipe},
                     **{k: res[k] for k in ("jsd", "mmd", "cov", "nna_balanced", "n_empty_samples",
                                            "sample_mean_voxels", "ref_mean_voxels", "sample_stray", "ref_stray",
                                            "sample_fragmented", "ref_fragmented")}})
    return rows


def _line(row: dict[str, Any]) -> str:
    lat = "×".join(map(str, row["latent"][:2])) + "³"
    return (f"{row['recipe']:14s} {row['category']:8s} {lat:6s} AE {row['ae_minutes']:4.1f}m IoU {row['ae_iou']:.3f} | "
            f"LDM {row['ldm_minutes']:4.1f}m loss {row['ldm_loss']:.4f} | JSD {row['jsd']:.4f} MMD {row['mmd']:.5f} "
            f"COV {row['cov']:.3f} 1-NNA {row['nna_balanced']:.3f} | "
            f"stray {row['sample_stray']:.1%}/{row['ref_stray']:.1%} "
            f"frag {row['sample_fragmented']:.0%}/{row['ref_fragmented']:.0%} vox {row['sample_mean_voxels']:.0f}/"
            f"{row['ref_mean_voxels']:.0f}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset_path", help="32³ voxel data (e.g. a demo or medium run's data/)")
    p.add_argument("--out", default="runs/recipes", help="run directories and rows.jsonl")
    p.add_argument("--recipes", nargs="+", default=["base_16x8", "lat_4x8", "lat_16x4"], choices=list(RECIPES))
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--ae_steps", type=int, default=1000)
    p.add_argument("--ldm_steps", type=int, default=1000)
    p.add_argument("--holdout", type=float, default=0.125, help="share of TRAIN held out per category for scoring")
    p.add_argument("--n", type=int, default=64, help="samples per category")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg_scale", type=float, default=1.0)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.list:
        for name, recipe in RECIPES.items():
            print(name, json.dumps(recipe))
        return []
    if not a.dataset_path:
        p.error("--dataset_path is required")
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    rows_file = root / "rows.jsonl"
    done = {json.loads(line)["recipe"] for line in rows_file.read_text().splitlines()} if rows_file.exists() else set()
    print(f"AE {a.ae_steps} steps, LDM {a.ldm_steps} steps, {a.n} samples per category, DDIM {a.steps}, "
          f"w {a.cfg_scale}, p > {a.threshold}; scored against held-out TRAIN shapes", flush=True)
    rows: list[dict[str, Any]] = []
    for name in a.recipes:
        if name in done:
            continue
        for row in run_recipe(name, RECIPES[name], a, root):
            rows.append(row)
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(_line(row), flush=True)
    return rows


if __name__ == "__main__":
    main()

