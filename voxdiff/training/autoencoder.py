"""`train_autoencoder(cfg)`: the 3D conv autoencoder's training loop, read top to bottom.

`_train_autoencoder` reads in order: setup (common.start_run) -> data (the train split in RAM at the training
resolution; a held-out slice of it, never val or test) -> training occupancy -> model, AdamW -> [resume] -> the loop
(common.StepLoop: autocast in the precision checked at start-up, gradient clipping, a step guard that skips non-finite
or absurd steps) -> every `ckpt_every` steps and at the end (`_Checkpoints`): calibrate the threshold on the held-out
slice, validate there (IoU / precision / recall), write last.pt and best.pt (best calibrated held-out IoU) -> at the
end: Chamfer and top-k on the held-out slice, and the per-channel latent mean/std the LDM normalises with, stored in
both checkpoints (`_store_latent_stats`). A variational AE (cfg.model.variational) trains on reconstruction +
kl_weight × KL and logs the KL as `kl`; latent_noise then applies on top of the sampled latent.

The length is a number of steps (`num_steps`, or `num_epochs` passes); `max_minutes` is a safety cap whose stop is
reported. Exact resume: the order of epoch e is a permutation seeded by (seed, e) and step s takes its batch from
position s, so a run stopped after any step resumes with the same batches; optimizer, step and RNG states come from
last.pt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff.binarize import ThresholdCalibrator, binarize, recon_metrics
from voxdiff.checkpoint import (
    AEMeta,
    Checkpoint,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from voxdiff.config import CATEGORIES, AETrainConfig, to_dict
from voxdiff.data.dataset import VoxelDataset, downsample_max
from voxdiff.distributed import DistInfo, mean_over_ranks, wrap_ddp
from voxdiff.errors import VoxdiffError
from voxdiff.losses import pos_weight_from_occupancy, reconstruction_loss
from voxdiff.metrics import chamfer_matrix
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.precision import autocast
from voxdiff.training import common

KIND = "autoencoder"
# Training-config fields that fix the data order / model: a resume with different values cannot continue exactly.
_RESUME_FIXED = ("model", "batch_size", "seed", "categories", "holdout_fraction", "holdout_max")
EVAL_BATCH = 32
STATS_MAX_SHAPES = 2048  # latent statistics from at most this many training shapes (1M values per channel at 8³)


def training_occupancy(dataset: VoxelDataset) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """(mean, largest) occupied-voxel count per shape, per category, at every power-of-two resolution from 32 up to
    the data's, plus the dataset's own resolution.

    Keys: str(resolution) -> category -> count (e.g. {"64": {"chair": 1930.5, ...}, "128": {...}}). The means are the
    per-category k of top-k binarisation; the largest counts are the scale of a "bloated" sample.
    """
    src = dataset.source_resolution
    resolutions = sorted({r for r in (32, 64, 128) if r <= src and src % r == 0} | {dataset.resolution})
    mean: dict[str, dict[str, float]] = {str(r): {} for r in resolutions}
    most: dict[str, dict[str, int]] = {str(r): {} for r in resolutions}
    for arr, label in zip(dataset.arrays, dataset.labels):
        sums, tops = dict.fromkeys(resolutions, 0.0), dict.fromkeys(resolutions, 0)
        for s in range(0, len(arr), 256):
            g = np.asarray(arr[s : s + 256]) > 0
            for r in resolutions:
                counts = downsample_max(g, r).reshape(len(g), -1).sum(1)
                sums[r] += float(counts.sum())
                tops[r] = max(tops[r], int(counts.max(initial=0)))
        for r in resolutions:
            mean[str(r)][CATEGORIES[label]] = sums[r] / max(1, len(arr))
            most[str(r)][CATEGORIES[label]] = tops[r]
    return mean, most


def chamfer_pairs(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-shape Chamfer CD(pred_i, target_i) with the eval's definition (voxdiff.metrics.chamfer_matrix: voxel
    indices / (R-1), squared distances, mean per side); NaN where the prediction is empty (counted separately)."""
    p = pred.reshape(-1, *pred.shape[-3:]).cpu().numpy().astype(bool)
    t = target.reshape(-1, *target.shape[-3:]).cpu().numpy() > 0.5
    d = np.diag(chamfer_matrix(p, t)).copy()
    d[~np.isfinite(d)] = np.nan
    return d


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 grids (B, r, r, r) -> float (B, 1, r, r, r) on `device` (channels_last_3d on CUDA, where it is faster)."""
    x = x.to(device, non_blocking=True).unsqueeze(1).float()
    return x.contiguous(memory_format=torch.channels_last_3d) if device.type == "cuda" else x


@torch.no_grad()
def predict(model: torch.nn.Module, grids: torch.Tensor, device: torch.device, batch_size: int = EVAL_BATCH):
    """Yield (probabilities, targets) on CPU, batch by batch, in eval mode and fp32 (as sampling decodes)."""
    model.eval()
    for s in range(0, len(grids), batch_size):
        x = _to_device(grids[s : s + batch_size], device)
        yield torch.sigmoid(unwrap(model)(x).float()).cpu(), x.cpu()


def calibrate_threshold(model: torch.nn.Module, grids: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(threshold, mean IoU) maximising mean per-shape IoU on `grids` (see ThresholdCalibrator)."""
    cal = ThresholdCalibrator()
    for probs, x in predict(model, grids, device):
        cal.update(probs, x)
    return cal.best()


def evaluate(
    model: torch.nn.Module,
    grids: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    threshold: float,
    topk_by_class: dict[int, int] | None = None,
    chamfer: bool = False,
) -> dict[str, float]:
    """Mean per-shape IoU / precision / recall of reconstructions at 0.5 ("_05"), the calibrated threshold ("_cal")
    and, with `topk_by_class`, per-shape top-k ("_topk"); "empty_*" counts empty predictions; `voxel_ratio_*` is
    predicted / true occupied voxels; with `chamfer`, the mean per-shape Chamfer distance (empty predictions excluded).
    """
    acc: dict[str, list[float]] = {}
    start = 0
    for probs, x in predict(model, grids, device):
        y = labels[start : start + len(x)]
        start += len(x)
        preds = {"05": binarize(probs), "cal": binarize(probs, threshold=threshold)}
        if topk_by_class is not None:
            preds["topk"] = binarize(probs, topk=torch.tensor([topk_by_class[int(c)] for c in y]))
        for mode, pred in preds.items():
            for name, v in recon_metrics(pred, x).items():
                acc.setdefault(f"{name}_{mode}", []).extend(v.tolist())
            acc.setdefault(f"voxels_{mode}", []).extend(pred.reshape(len(pred), -1).sum(1).tolist())
            if chamfer:
                acc.setdefault(f"chamfer_{mode}", []).extend(chamfer_pairs(pred, x).tolist())
        acc.setdefault("voxels_true", []).extend((x > 0.5).reshape(len(x), -1).sum(1).tolist())
    out: dict[str, float] = {}
    for key, vals in acc.items():
        a = np.asarray(vals, dtype=np.float64)
        if key.startswith("empty"):
            out[key] = float(a.sum())
        elif key.startswith("chamfer"):
            out[key] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        elif not key.startswith("voxels"):
            out[key] = float(a.mean())
    true = max(1.0, float(np.sum(acc["voxels_true"])))
    for mode in [k[len("voxels_") :] for k in acc if k.startswith("voxels_") and k != "voxels_true"]:
        out[f"voxel_ratio_{mode}"] = float(np.sum(acc[f"voxels_{mode}"])) / true
    out["threshold"] = float(threshold)
    return out


@torch.no_grad()
def latent_stats(model: torch.nn.Module, grids: torch.Tensor,
                 device: torch.device) -> tuple[list[float], list[float], list[float]]:
    """Per-channel mean, population std and largest normalised magnitude max |z − mean| / std of the latents of
    `grids`, in one streaming pass (float64 sums, and per-channel extremes: max |z − mean| is at one of them)."""
    model.eval()
    enc = unwrap(model)
    s = s2 = lo = hi = None
    n = 0
    for i in range(0, len(grids), EVAL_BATCH):
        z = enc.encode(_to_device(grids[i : i + EVAL_BATCH], device)).double()
        zs = z.transpose(0, 1).reshape(z.shape[1], -1)
        if s is None:
            s, s2, lo, hi = zs.sum(1), (zs**2).sum(1), zs.amin(1), zs.amax(1)
        else:
            s, s2 = s + zs.sum(1), s2 + (zs**2).sum(1)
            lo, hi = torch.minimum(lo, zs.amin(1)), torch.maximum(hi, zs.amax(1))
        n += zs.shape[1]
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(0).sqrt().clamp_min(1e-8)
    absmax = torch.maximum(hi - mean, mean - lo) / std
    return mean.cpu().tolist(), std.cpu().tolist(), absmax.cpu().tolist()


def training_loss(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, cfg: AETrainConfig,
                  pos_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, KL or None) of a training forward's output: the logits, or (logits, KL) for a variational AE, whose loss
    is reconstruction + kl_weight × KL. The one definition for the loop and the start-up checks."""
    if isinstance(out, tuple):
        logits, kl = out
        return reconstruction_loss(logits, x, cfg.loss, pos_weight) + cfg.kl_weight * kl, kl
    return reconstruction_loss(out, x, cfg.loss, pos_weight), None


def _stale_best(best: Checkpoint, last: Checkpoint) -> bool:
    """best.pt is older than the best model last.pt records: last.pt is saved first, so a run stopped between the two
    saves of an improving validation leaves last.pt holding the best model and best.pt the one before."""
    return float(last.meta.best_iou) > float(best.meta.best_iou)


def train_autoencoder(cfg: AETrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train the voxel autoencoder described by `cfg`; returns the final metrics (also in best.pt / last.pt extra)."""
    with contextlib.ExitStack() as stack:  # the run directory's lock, and its removal if the run fails at once
        return _train_autoencoder(cfg, progress, stack)


def _train_autoencoder(cfg: AETrainConfig, progress: bool, stack: contextlib.ExitStack) -> dict[str, Any]:
    """The run, top to bottom (see the module docstring); `stack` holds the run directory's lock."""
    # ---- setup -------------------------------------------------------------------------------------------------
    run = common.start_run(cfg, KIND, _RESUME_FIXED, stale_best=_stale_best)
    info, device = run.info, run.device
    if cfg.sync_bn and info.distributed and device.type != "cuda":
        raise VoxdiffError("--sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
    # ---- data: the train split in RAM, minus a held-out slice (checkpoint selection, threshold calibration) ------
    res = cfg.model.resolution
    train_set = VoxelDataset(cfg.dataset_path, "train", cfg.categories, resolution=res)  # checked before any write
    holdout = common.holdout_rows(train_set.counts, cfg.holdout_fraction, cfg.holdout_max, cfg.seed)
    held_idx = train_set.global_indices(holdout)
    fit_idx = np.setdiff1d(np.arange(len(train_set)), held_idx)
    if run.resume is not None and run.resume.meta.holdout != holdout:
        raise VoxdiffError(f"cannot resume from {run.run_dir / 'last.pt'}: the train split changed since it was "
                           "written")
    files = common.open_run_dir(run, cfg.resume, cfg.overwrite, stack, "voxdiff.ae")
    log = files.log
    log.info("config %s", to_dict(cfg))
    grids = train_set.load(progress=progress and info.is_main)
    labels = torch.from_numpy(train_set.class_indices())
    order = common.StepOrder(len(fit_idx), cfg.batch_size, info, cfg.seed)
    total_steps = cfg.total_steps(order.steps_per_epoch)

    # ---- model, optimizer, loss weighting, resume --------------------------------------------------------------
    model = _model(cfg, info)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    occupancy, max_voxels = training_occupancy(train_set)
    mean_frac = float(np.mean(list(occupancy[str(res)].values()))) / res**3
    pos_weight = cfg.pos_weight if cfg.pos_weight is not None else pos_weight_from_occupancy(mean_frac)
    meta = AEMeta(occupancy=occupancy, max_voxels=max_voxels, holdout=holdout, pos_weight=pos_weight)
    step, meta = _resume(run, model, opt, meta, log)
    probe_x = _to_device(grids[fit_idx[: order.per_rank]], device)  # the start-up checks' batch: real shapes
    variational = cfg.model.variational
    runtime = common.choose_runtime(
        cfg, info, unwrap(model),
        lambda m: training_loss(m(probe_x, return_kl=variational), probe_x, cfg, pos_weight)[0],
        "AE training", run.resume.meta.runtime if run.resume else None, log)
    log.info("train %d (fit %d, held out %d); occupancy %.5f; loss %s; %d steps",
             len(train_set), len(fit_idx), len(held_idx), mean_frac, _loss_desc(cfg, pos_weight), total_steps)
    net = wrap_ddp(model, info)  # training forwards go through DDP; optimizer, evaluation and checkpoints use `model`
    files.commit()  # every check passed: the run's files are written from here on
    curves = ("loss", "kl") if variational else ("loss",)
    loop = common.StepLoop("AE", cfg, run, runtime, log, step, total_steps, curves, progress)
    ckpt = _Checkpoints(cfg, run.run_dir, model, opt, meta, runtime, loop, grids[held_idx], labels[held_idx], device)

    # ---- loop --------------------------------------------------------------------------------------------------
    model.train()
    for step in loop:
        x = _to_device(grids[fit_idx[order.batch(step).numpy()]], device)
        for group in opt.param_groups:
            group["lr"] = common.warmup_lr(step, cfg.lr, cfg.warmup_steps,
                                           total_steps if cfg.lr_schedule == "cosine" else None)
        with loop.timed():
            with autocast(device, runtime.autocast_dtype):
                out = net(x, latent_noise=cfg.latent_noise, return_kl=variational)
            loss, kl = training_loss(out, x, cfg, pos_weight)
            kl_all = mean_over_ranks(kl.detach()) if kl is not None else None  # every rank: a collective
            done = loop.update(loss, model, opt, cfg.grad_clip)
        if loop.log_due():
            row = {"loss": done.loss} if kl_all is None else {"loss": done.loss, "kl": float(kl_all)}
            loop.log({k: f"{v:.4g}" for k, v in row.items()}, **row)
        if loop.due(cfg.ckpt_every):
            loop.on_main(ckpt.validate_and_save)

    # ---- final validation, latent statistics for the LDM (both checkpoints) ----------------------------------------
    topk_by_class = {CATEGORIES.index(c): int(round(k)) for c, k in occupancy[str(res)].items()}
    final = loop.on_main(ckpt.finish, topk_by_class, grids, fit_idx) or {}
    return loop.result({"best_iou_cal": meta.best_iou, **{f"heldout_{k}": v for k, v in final.items()}},
                       {"param_hash": (model, "AE")}, per_step=cfg.batch_size)


def _model(cfg: AETrainConfig, info: DistInfo) -> torch.nn.Module:
    """The autoencoder on the run's device (channels_last_3d on CUDA; SyncBatchNorm with `sync_bn` under torchrun:
    BatchNorm statistics over the global batch instead of each rank's shard)."""
    model = VoxelAutoencoder(cfg.model).to(info.device)
    if info.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    if cfg.sync_bn and info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _resume(run: common.RunStart, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: AEMeta,
            log: Any) -> tuple[int, AEMeta]:
    """(step, metadata) to continue from: last.pt's weights, optimizer, step, metadata and RNG states when the run
    resumes; else step 0 and `meta`."""
    if run.resume is None:
        return 0, meta
    unwrap(model).load_state_dict(run.resume.model)
    opt.load_state_dict(run.resume.optimizer)
    set_rng_state(run.resume.rng)
    log.info("resumed from %s at step %d", run.run_dir / "last.pt", run.resume.step)
    return run.resume.step, run.resume.meta


def _loss_desc(cfg: AETrainConfig, pos_weight: float) -> str:
    """The training loss in words, for the log."""
    desc = f"{cfg.loss} (pos_weight {pos_weight:.1f})" if cfg.loss == "weighted_bce" else cfg.loss
    return desc + (f" + {cfg.kl_weight:g} × KL (variational)" if cfg.model.variational else "")


@dataclass
class _Checkpoints:
    """The AE's checkpoints, written on rank 0: validation on the held-out slice, then last.pt and best.pt; at the end
    the final metrics and the latent statistics in both files. `meta` is the run's metadata, updated here; the
    held-out slice of the train split is all that calibration, validation and best.pt look at."""

    cfg: AETrainConfig
    run_dir: Path
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    meta: AEMeta
    runtime: common.Runtime
    loop: common.StepLoop
    held_grids: torch.Tensor
    held_labels: torch.Tensor
    device: torch.device

    def save(self, name: str) -> None:
        """Everything an exact resume needs (weights, optimizer, step, RNG states, metadata), into run_dir/name."""
        self.meta.runtime = self.runtime.record(with_history=True)
        save_checkpoint(self.run_dir / name, Checkpoint(
            kind=KIND, model_config=to_dict(self.cfg.model), train_config=to_dict(self.cfg),
            model=unwrap(self.model).state_dict(), optimizer=self.opt.state_dict(), step=self.loop.step,
            rng=get_rng_state(), meta=self.meta))

    def validate_and_save(self) -> None:
        """Calibrate the threshold and validate on the held-out slice, log it, write last.pt (and best.pt when the
        calibrated IoU improved); the other ranks wait at the next collective."""
        meta = self.meta
        meta.threshold, _ = calibrate_threshold(self.model, self.held_grids, self.device)
        meta.heldout = evaluate(self.model, self.held_grids, self.held_labels, self.device, meta.threshold)
        self.loop.record(**{f"val_{k}": v for k, v in meta.heldout.items()})
        self.loop.flush()
        self.loop.logger.info("step %d held-out %s", self.loop.step, {k: round(v, 5) for k, v in meta.heldout.items()})
        improved = meta.heldout["iou_cal"] > meta.best_iou
        meta.best_iou = max(meta.best_iou, meta.heldout["iou_cal"])
        self.save("last.pt")  # first: a run stopped before best.pt is written resumes from it and restores best.pt
        if improved:
            self.save("best.pt")
        self.model.train()

    def finish(self, topk_by_class: dict[int, int], grids: torch.Tensor, fit_idx: np.ndarray) -> dict[str, float]:
        """The last checkpoint (when steps are unsaved), the final held-out metrics (Chamfer and top-k too), and the
        latent statistics of each checkpoint's own weights on (at most STATS_MAX_SHAPES of) the training shapes
        `grids[fit_idx]`, written into it (last.pt also gets the final metrics)."""
        if self.loop.unsaved():
            self.validate_and_save()
        final = evaluate(self.model, self.held_grids, self.held_labels, self.device, self.meta.threshold,
                         topk_by_class, chamfer=True)
        stats_grids = grids[fit_idx[:: max(1, -(-len(fit_idx) // STATS_MAX_SHAPES))]]
        for name in ("last.pt", "best.pt"):
            _store_latent_stats(self.run_dir / name, self.cfg, stats_grids, self.device,
                                final if name == "last.pt" else None)
        self.loop.flush()
        return final


def _store_latent_stats(file: Path, cfg: AETrainConfig, grids: torch.Tensor, device: torch.device,
                        final: dict[str, float] | None) -> None:
    """Rewrite checkpoint `file` with the per-channel latent mean / std / largest magnitude of its own weights on
    `grids` (what the LDM normalises with), and `final` (the run's final held-out metrics) when given."""
    ck = load_checkpoint(file, kind=KIND, map_location="cpu")
    probe = VoxelAutoencoder(cfg.model).to(device)
    probe.load_state_dict(ck.model)
    ck.meta.latent_mean, ck.meta.latent_std, ck.meta.latent_absmax = latent_stats(probe, grids, device)
    ck.meta.final = final if final is not None else ck.meta.final
    save_checkpoint(file, ck)
