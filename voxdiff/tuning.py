"""Pick the guidance scale and the binarisation threshold on held-out TRAINING shapes, never on the references.

For each category and guidance scale w, `num_samples` latents are drawn once (DDIM, seeded) and decoded once; every
threshold then binarises the same probabilities, and each setting is scored against the category's held-out slice of
the train split (the AE's, recorded in its checkpoint) with voxdiff.metrics: JSD, MMD, COV, 1-NNA on equal sets, the
ratio of mean voxel counts, and the stray voxels and fragmented samples beside the held-out shapes' own shares. Val and
test are the references of the reported metrics, so they are never looked at.

The pick is the setting with the lowest mean rank over six criteria, summed over categories: JSD (low), MMD (low),
COV (high), |1-NNA − 0.5| (low), |log(voxels of samples / voxels of data)| (low: the right thickness) and structure
(low: stray / max(data's stray, 0.1 %) + fragmented / max(data's fragmented, 1 %), the noise in multiples of the
data's). Chamfer distances alone reward shapes thicker than the data (they cover the reference) and barely see stray
voxels or a shape broken into specks; the voxel, structure and JSD criteria do.

The samples are the pipeline's own (`pipe(..., output="probabilities")`, one batch per category and scale, seeded like
the final sampling's batch 0 with the tune seed), binarised here once per threshold. Imports voxdiff.sampling and
voxdiff.metrics; the stage runner (voxdiff.runner) import this module, never the reverse.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from voxdiff.binarize import Binarization
from voxdiff.config import TuneConfig
from voxdiff.data.voxelize import open_voxels, voxel_path
from voxdiff.errors import VoxdiffError
from voxdiff.logs import Progress
from voxdiff.metrics import evaluate
from voxdiff.sampling import LatentVoxelPipeline

CRITERIA = ("jsd", "mmd", "cov", "nna", "voxels", "structure")
STRAY_FLOOR = 1e-3  # data stray shares below this (0.1 % of voxels) count as this: clean data divides by no zero
FRAGMENTED_FLOOR = 0.01  # the same for fragmented shares (1 % of shapes)


def _distance_from_data(row: dict[str, Any], key: str) -> float:
    """How far a row's samples are from the data on criterion `key` (one of CRITERIA), lower being closer: the
    figure itself (JSD, MMD), −COV, |1-NNA − 0.5|, |log voxel ratio|, or the noise in multiples of the data's own."""
    if key == "cov":
        return -row["cov"]
    if key == "nna":
        return abs(row["nna_balanced"] - 0.5)
    if key == "voxels":
        return abs(math.log(max(row["sample_mean_voxels"], 1e-9) / row["ref_mean_voxels"]))
    if key == "structure":
        return (row["sample_stray"] / max(row["ref_stray"], STRAY_FLOOR)
                + row["sample_fragmented"] / max(row["ref_fragmented"], FRAGMENTED_FLOOR))
    return row[key]


def _setting(row: dict[str, Any]) -> tuple[float, float, float]:
    return row["cfg_scale"], row["rescale"], row["threshold"]


def pick(rows: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(cfg_scale, rescale, threshold) with the lowest rank sum over CRITERIA and categories (ties: the first)."""
    settings = list(dict.fromkeys(_setting(row) for row in rows))
    score = dict.fromkeys(settings, 0.0)
    for cat in dict.fromkeys(row["category"] for row in rows):
        sub = [row for row in rows if row["category"] == cat]
        for key in CRITERIA:
            for rank, row in enumerate(sorted(sub, key=lambda row: _distance_from_data(row, key))):
                score[_setting(row)] += rank
    return min(settings, key=lambda s: score[s])


def heldout_shapes(dataset_path: str, category: str, pipe: LatentVoxelPipeline) -> np.ndarray:
    """The category's held-out TRAIN shapes (rows recorded in the AE checkpoint), as uint8 grids."""
    rows = pipe.ae_meta.holdout.get(category)
    if not rows or len(rows) < 2:
        raise VoxdiffError(f"the AE checkpoint records fewer than 2 held-out {category} training shapes; tuning "
                           "needs them (retrain the AE with this version of voxdiff)")
    return (np.asarray(open_voxels(voxel_path(dataset_path, category, "train"))[sorted(rows)]) > 0).astype(np.uint8)


def tune_sampling(pipe: LatentVoxelPipeline, dataset_path: str, categories: tuple[str, ...], cfg: TuneConfig,
                  resolution: int, progress: bool = True, log: Any = None) -> dict[str, Any]:
    """Score every (cfg_scale, threshold) on held-out training shapes; returns {"rows", "pick", ...} (JSON-able).

    Each row carries the setting's figures, its stray / fragmented shares (sample_*) and the held-out shapes' own
    (ref_*)."""
    thresholds = sorted({*cfg.thresholds, round(pipe.ae_meta.threshold, 3)})
    guidance = [(scale, rescale) for scale in cfg.cfg_scales for rescale in (cfg.rescales if scale else (0.0,))]
    rows: list[dict[str, Any]] = []
    bar = Progress(len(categories) * len(guidance), "tune", unit="setting", enabled=progress, log=log)
    for category in categories:
        refs = heldout_shapes(dataset_path, category, pipe)
        if refs.shape[-1] != resolution:
            raise VoxdiffError(f"held-out shapes are {refs.shape[-1]}³ but sampling runs at {resolution}³")
        for scale, rescale in guidance:
            t0 = time.perf_counter()
            # decoded once (at the AE's resolution), binarised at every threshold below
            out = pipe(category, cfg.num_samples, sampler="ddim", steps=cfg.steps, eta=0.0, guidance=scale,
                       guidance_rescale=rescale, clamp_latents=cfg.clamp_latents, binarize="threshold",
                       seed=cfg.seed, batch_size=cfg.num_samples, output="probabilities")
            probabilities, labels = torch.from_numpy(out.probabilities), torch.from_numpy(out.labels)
            for threshold in thresholds:
                grids = pipe.binarize_probabilities(probabilities, labels, Binarization(threshold=threshold),
                                                    resolution)
                res = evaluate(grids, refs, progress=False)
                rows.append({"category": category, "cfg_scale": scale, "rescale": rescale, "threshold": threshold,
                             **{k: res[k] for k in ("jsd", "mmd", "cov", "nna", "nna_balanced", "n_empty_samples",
                                                    "sample_mean_voxels", "ref_mean_voxels", "sample_stray",
                                                    "sample_fragmented", "ref_stray", "ref_fragmented")},
                             "seconds": time.perf_counter() - t0})
            bar.update(1)
    bar.close()
    scale, rescale, threshold = pick(rows)
    return {"rows": rows, "pick": {"cfg_scale": scale, "guidance_rescale": rescale, "threshold": threshold},
            "criteria": list(CRITERIA), "clamp_latents": cfg.clamp_latents,
            "num_samples": cfg.num_samples, "steps": cfg.steps, "seed": cfg.seed,
            "heldout": {c: len(pipe.ae_meta.holdout.get(c, [])) for c in categories}}
