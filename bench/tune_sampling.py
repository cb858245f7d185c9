"""Tune the guidance scale and the binarisation on a held-out slice of the TRAINING split (never the references).

For each category and guidance scale w, draws N latents once (DDIM, seeded), decodes them once, then binarises the same
probabilities three ways (threshold 0.5, the AE's calibrated threshold, top-k with k = the AE's training occupancy) and
scores each against the last N training shapes of the category with voxdiff.metrics (JSD / MMD / COV / 1-NNA).
Prints a table and writes `{out}/tune.json`; the pick is the lowest mean rank over MMD, COV and 1-NNA.

    python bench/tune_sampling.py --ldm_ckpt_path runs/medium/ldm --ae_ckpt_path runs/medium/ae \
        --dataset_path runs/medium/data --n 100 --cfg_scales 0 1 3 --out runs/medium/tune
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from voxdiff.binarize import binarize
from voxdiff.config import CATEGORIES, SampleConfig, category_index
from voxdiff.data.voxelize import open_voxels, voxel_path
from voxdiff.metrics import evaluate
from voxdiff.sampling import batch_seed, decode_latents, load_models, sample_latents, upsample_nearest
from voxdiff.schedulers import make_scheduler
from voxdiff.utils import atomic_write_json, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ldm_ckpt_path", required=True)
    p.add_argument("--ae_ckpt_path", required=True)
    p.add_argument("--dataset_path", required=True)
    p.add_argument("--n", type=int, default=100, help="samples per setting and held-out training shapes per category")
    p.add_argument("--cfg_scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--resolution", type=int, default=None, help="default: the data's")
    p.add_argument("--seed", type=int, default=1234, help="different from the evaluation run's seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    device = resolve_device(a.device)
    train = {c: open_voxels(voxel_path(a.dataset_path, c, "train")) for c in CATEGORIES}
    R = a.resolution or int(train[CATEGORIES[0]].shape[-1])
    cfg = SampleConfig(ldm_ckpt_path=a.ldm_ckpt_path, ae_ckpt_path=a.ae_ckpt_path, resolution=R, topk=-1,
                       threshold=-1.0, use_cfg=True, device=str(device))
    m = load_models(cfg, device)
    f = R // m["ae_res"]
    modes = {"thr0.5": {"threshold": 0.5}, f"thr_cal{m['threshold']:.3f}": {"threshold": m["threshold"]},
             "topk_auto": "topk"}
    scheduler = make_scheduler("ddim", m["ldm_cfg"].scheduler, a.steps)
    rows = []
    for cat in CATEGORIES:
        held_out = np.asarray(train[cat][-a.n :])
        c = category_index(cat)
        for w in a.cfg_scales:
            t0 = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(batch_seed(a.seed, c, 0))
            labels = torch.full((a.n,), c, dtype=torch.long, device=device)
            with torch.no_grad():
                z = sample_latents(m["model"], scheduler, labels, gen, w, latent_shape=m["latent_shape"])
                probs = decode_latents(m["ae"], z, m["mean"], m["std"])
            for name, mode in modes.items():
                if mode == "topk":
                    grids = binarize(probs, topk=m["topk"][cat])
                else:
                    grids = binarize(probs, threshold=mode["threshold"])
                grids = upsample_nearest(grids.to(torch.uint8), f).cpu().numpy()
                res = evaluate(grids, held_out, progress=False)
                rows.append({"category": cat, "cfg_scale": w, "binarize": name, **{k: res[k] for k in
                             ("jsd", "mmd", "cov", "nna", "n_empty_samples", "sample_mean_voxels", "ref_mean_voxels")},
                             "seconds": time.perf_counter() - t0})
                r = rows[-1]
                print(f"{cat:9s} w={w:<4g} {name:14s} JSD {r['jsd']:.4f} MMD {r['mmd']:.5f} COV {r['cov']:.3f} "
                      f"1-NNA {r['nna']:.3f} voxels {r['sample_mean_voxels']:.0f}/{r['ref_mean_voxels']:.0f}",
                      flush=True)
    # Pick: lowest mean rank over MMD (low), COV (high), 1-NNA (|x - 0.5| low), per (w, binarize) across categories.
    settings = sorted({(r["cfg_scale"], r["binarize"]) for r in rows})
    score = {s: 0.0 for s in settings}
    for cat in CATEGORIES:
        sub = [r for r in rows if r["category"] == cat]
        for key, sign in (("mmd", 1), ("cov", -1), ("nna", 1)):
            vals = sorted(sub, key=lambda r: sign * (abs(r[key] - 0.5) if key == "nna" else r[key]))
            for rank, r in enumerate(vals):
                score[(r["cfg_scale"], r["binarize"])] += rank
    best = min(settings, key=lambda s: score[s])
    print(f"pick (lowest mean rank over MMD, COV, 1-NNA on held-out training shapes): cfg_scale {best[0]}, {best[1]}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(a.out) / "tune.json", {"rows": rows, "pick": {"cfg_scale": best[0], "binarize": best[1]},
                                                  "n": a.n, "seed": a.seed, "steps": a.steps})


if __name__ == "__main__":
    main()
