"""`train_autoencoder(cfg)`: the 3D conv autoencoder's training loop, read top to bottom.

setup -> data (train split minus a held-out calibration slice; val split) -> training occupancy -> model, AdamW ->
[resume] -> loop (tqdm, bf16 autocast + channels_last_3d on CUDA only, gradient clipping, non-finite check) ->
per epoch: calibrate the threshold on the held-out slice, validate (IoU / precision / recall / Chamfer at 0.5,
calibrated threshold and per-shape top-k), write last.pt and best.pt -> at the end: per-channel latent mean/std over
the train split, stored in both checkpoints.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e), so a run stopped after any step resumes
by skipping the batches of the current epoch it already took; optimizer, step, epoch and RNG states come from last.pt.
The loop is plain enough for a DistributedSampler + DDP wrap to slot in (state dicts are saved from `unwrap(model)`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from voxdiff.binarize import ThresholdCalibrator, binarize, recon_metrics
from voxdiff.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state, unwrap
from voxdiff.config import CATEGORIES, AETrainConfig, to_dict
from voxdiff.data.dataset import VoxelDataset, downsample_max
from voxdiff.distributed import (
    any_rank,
    check_in_sync,
    check_same_config,
    epoch_sampler,
    init_distributed,
    mean_over_ranks,
    split_batch,
    wrap_ddp,
)
from voxdiff.losses import pos_weight_from_occupancy, reconstruction_loss
from voxdiff.metrics import chamfer_matrix
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.training.common import RunLogger, autocast, check_finite
from voxdiff.utils import VoxdiffError, get_logger, seed_everything

KIND = "autoencoder"
# Training-config fields that fix the data order / model: a resume with different values cannot continue exactly.
_RESUME_FIXED = ("model", "batch_size", "seed", "categories", "calib_fraction")
_MODES = ("05", "cal", "topk")  # binarisation modes reported in validation


def calibration_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out calibration) indices of a train split of size n: a seeded random `fraction` is held out."""
    if n < 2:
        raise VoxdiffError(f"the train split has {n} shape(s); need at least 2 (one is held out for calibration)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_cal = min(n - 1, max(1, round(fraction * n)))
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch `epoch`: a permutation seeded by (seed, epoch) (DistributedSampler's convention)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return indices[torch.randperm(len(indices), generator=g).numpy()]


def training_occupancy(dataset: VoxelDataset) -> dict[str, dict[str, float]]:
    """Mean occupied-voxel count per shape, per category, at every power-of-two resolution from 64 up to the data's.

    Keys: str(resolution) -> category -> mean count (e.g. {"64": {"chair": 1930.5, ...}, "128": {...}}), plus the
    dataset's own resolution. These are the per-category k of top-k binarisation.
    """
    src = dataset.source_resolution
    resolutions = sorted({r for r in (64, 128) if r <= src and src % r == 0} | {dataset.resolution})
    out: dict[str, dict[str, float]] = {str(r): {} for r in resolutions}
    for arr, label in zip(dataset.arrays, dataset.labels):
        sums = dict.fromkeys(resolutions, 0.0)
        for i in range(len(arr)):
            g = np.asarray(arr[i]) > 0
            for r in resolutions:
                sums[r] += float(downsample_max(g, r).sum())
        for r in resolutions:
            out[str(r)][CATEGORIES[label]] = sums[r] / max(1, len(arr))
    return out


def _loader(dataset: VoxelDataset, indices: np.ndarray, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader over `indices` in the given order (the generator only seeds workers; no global RNG is used)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices.tolist(),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def chamfer_pairs(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-shape Chamfer CD(pred_i, target_i) with the eval's definition (voxdiff.metrics.chamfer_matrix: voxel
    indices / (R-1), squared distances, mean per side); NaN where the prediction is empty (counted separately)."""
    p = pred.reshape(-1, *pred.shape[-3:]).cpu().numpy().astype(bool)
    t = target.reshape(-1, *target.shape[-3:]).cpu().numpy() > 0.5
    d = np.diag(chamfer_matrix(p, t)).copy()
    d[~np.isfinite(d)] = np.nan
    return d


@torch.no_grad()
def _predict(model: torch.nn.Module, loader: DataLoader, device: torch.device):
    """Yield (probabilities, targets, class indices) on CPU, batch by batch, in eval mode."""
    model.eval()
    for x, y in loader:
        with autocast(device):
            logits = model(_to_device(x, device))
        yield torch.sigmoid(logits.float()).cpu(), x, y


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.to(device, non_blocking=True, memory_format=torch.channels_last_3d)
    return x.to(device)


def calibrate_threshold(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(threshold, mean IoU) maximising mean per-shape IoU on the shapes of `loader` (see ThresholdCalibrator)."""
    cal = ThresholdCalibrator()
    for probs, x, _ in _predict(model, loader, device):
        cal.update(probs, x)
    return cal.best()


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    threshold: float,
    topk_by_class: dict[int, int],
) -> dict[str, float]:
    """Mean per-shape IoU / precision / recall / Chamfer of reconstructions at 0.5 ("_05"), the calibrated threshold
    ("_cal") and per-shape top-k ("_topk"); "empty_*" counts empty predictions (excluded from the Chamfer mean)."""
    acc: dict[str, list[float]] = {}
    for probs, x, y in _predict(model, loader, device):
        ks = torch.tensor([topk_by_class[int(c)] for c in y])
        preds = {"05": binarize(probs), "cal": binarize(probs, threshold=threshold), "topk": binarize(probs, topk=ks)}
        for mode, pred in preds.items():
            for name, v in recon_metrics(pred, x).items():
                acc.setdefault(f"{name}_{mode}", []).extend(v.tolist())
            acc.setdefault(f"chamfer_{mode}", []).extend(chamfer_pairs(pred, x).tolist())
    out: dict[str, float] = {}
    for key, vals in acc.items():
        a = np.asarray(vals, dtype=np.float64)
        if key.startswith("empty"):
            out[key] = float(a.sum())
        elif key.startswith("chamfer"):
            out[key] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        else:
            out[key] = float(a.mean())
    out["threshold"] = float(threshold)
    return out


@torch.no_grad()
def latent_stats(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the latents of every shape in `loader` (float64 sums over batch and space)."""
    model.eval()
    enc = unwrap(model)
    s = s2 = None
    n = 0
    for x, _ in loader:
        z = enc.encode(_to_device(x, device)).double()
        zs = z.transpose(0, 1).reshape(z.shape[1], -1)
        s = zs.sum(1) if s is None else s + zs.sum(1)
        s2 = (zs**2).sum(1) if s2 is None else s2 + (zs**2).sum(1)
        n += zs.shape[1]
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(0).sqrt().clamp_min(1e-8)
    return mean.cpu().tolist(), std.cpu().tolist()


def _check_resume(saved: dict[str, Any], cfg: AETrainConfig, file: Path) -> None:
    """Refuse a resume whose model (or data-order) settings differ from the checkpoint's, naming the fields."""
    now = to_dict(cfg)
    diff = [k for k in _RESUME_FIXED if _norm(saved.get(k)) != _norm(now.get(k))]
    if diff:
        parts = [f"{k}: checkpoint {saved.get(k)} vs now {now.get(k)}" for k in diff]
        raise VoxdiffError(f"cannot resume from {file}: config mismatch ({'; '.join(parts)})")


def _norm(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    return [_norm(v) for v in x] if isinstance(x, (list, tuple)) else x


def train_autoencoder(cfg: AETrainConfig) -> dict[str, Any]:
    """Train the voxel autoencoder described by `cfg`; returns the final metrics (also in best.pt / last.pt extra)."""
    # ---- setup -------------------------------------------------------------------------------------------------
    t_start = time.monotonic()
    info = init_distributed(cfg.device)  # under torchrun: batch_size is global, rank 0 alone writes (distributed.py)
    device = info.device
    check_same_config(to_dict(cfg), "AE training config")
    per_rank = split_batch(cfg.batch_size, info.world_size)
    if cfg.sync_bn and info.distributed and device.type != "cuda":
        raise VoxdiffError("--sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
    seed_everything(cfg.seed)
    run_dir = Path(cfg.ckpt_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = get_logger("voxdiff.ae", run_dir / "train.log" if info.is_main else None)
    log.info("config %s", to_dict(cfg))

    # ---- data --------------------------------------------------------------------------------------------------
    res = cfg.model.resolution
    train_set = VoxelDataset(cfg.dataset_path, "train", cfg.categories, resolution=res)
    val_set = VoxelDataset(cfg.dataset_path, "val", cfg.categories, resolution=res)
    fit_idx, cal_idx = calibration_split(len(train_set), cfg.calib_fraction, cfg.seed)
    val_idx = np.arange(len(val_set))
    if cfg.max_val_shapes > 0:
        per = max(1, cfg.max_val_shapes // len(val_set.arrays))
        val_idx = np.concatenate([np.arange(o, min(o + per, e)) for o, e in zip(val_set.offsets, val_set.offsets[1:])])
    eval_bs = max(1, min(cfg.batch_size, 16))
    cal_loader = _loader(train_set, cal_idx, eval_bs, cfg.num_workers, cfg.seed)
    val_loader = _loader(val_set, val_idx, eval_bs, cfg.num_workers, cfg.seed)
    steps_per_epoch = math.ceil(len(fit_idx) / cfg.batch_size)
    total_steps = cfg.num_epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    # ---- model, optimizer, resume --------------------------------------------------------------------------------
    model = VoxelAutoencoder(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    if cfg.sync_bn and info.distributed:  # BatchNorm statistics over the global batch instead of each rank's shard
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = epoch = 0
    best_iou = -1.0
    val: dict[str, float] = {}
    threshold = 0.5
    occupancy: dict[str, dict[str, float]] | None = None
    last_file = run_dir / "last.pt"
    if cfg.resume:
        if not last_file.is_file():
            raise VoxdiffError(f"--resume: no checkpoint at {last_file}")
        ckpt = load_checkpoint(last_file, kind=KIND, map_location="cpu")
        _check_resume(ckpt["config"], cfg, last_file)
        if ckpt["extra"].get("num_fit") != len(fit_idx):
            raise VoxdiffError(f"cannot resume from {last_file}: the train split changed size since it was written")
        unwrap(model).load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch = ckpt["step"], ckpt["epoch"]
        extra = ckpt["extra"]
        best_iou, val = extra.get("best_iou", -1.0), extra.get("val", {})
        threshold, occupancy = extra.get("threshold", 0.5), extra.get("occupancy")
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d (epoch %d)", last_file, step, epoch)
    if occupancy is None:
        occupancy = training_occupancy(train_set)
    topk_by_class = {CATEGORIES.index(c): int(round(k)) for c, k in occupancy[str(res)].items()}
    mean_frac = float(np.mean(list(occupancy[str(res)].values()))) / res**3
    pos_weight = cfg.pos_weight if cfg.pos_weight > 0 else pos_weight_from_occupancy(mean_frac)
    log.info("train %d (fit %d, calibration %d), val %d; occupancy %.5f -> pos_weight %.1f",
             len(train_set), len(fit_idx), len(cal_idx), len(val_idx), mean_frac, pos_weight)
    net = wrap_ddp(model, info)  # training forwards go through DDP; optimizer, evaluation and checkpoints use `model`
    runlog = RunLogger(run_dir, "log", resume=cfg.resume) if info.is_main else None
    if runlog is not None and cfg.resume:
        runlog.truncate_after(step)

    def extra(**more: Any) -> dict[str, Any]:
        return {"threshold": threshold, "occupancy": occupancy, "val": val, "best_iou": best_iou,
                "pos_weight": pos_weight, "num_fit": len(fit_idx), **more}

    def save(name: str) -> None:
        save_checkpoint(run_dir / name, kind=KIND, config=to_dict(cfg), model=unwrap(model).state_dict(),
                        optimizer=opt.state_dict(), step=step, epoch=epoch, rng=get_rng_state(), extra=extra())

    # ---- loop --------------------------------------------------------------------------------------------------
    def out_of_time() -> bool:  # decided together: every rank stops at the same step
        return cfg.max_minutes > 0 and any_rank(time.monotonic() - t_start > 60 * cfg.max_minutes, device)

    # epoch e's order is epoch_order(fit_idx, seed, e); this rank takes its shard of every global batch
    sampler = epoch_sampler(len(fit_idx), info, cfg.seed * 1_000_003)
    pbar = tqdm(total=total_steps, initial=min(step, total_steps), desc="ae", dynamic_ncols=True,
                disable=None if info.is_main else True)
    samples, train_seconds = 0, 0.0
    stopped = "max_steps" if 0 < cfg.max_steps <= step else "done"
    while step < total_steps and epoch < cfg.num_epochs:
        skip = step - epoch * steps_per_epoch
        sampler.set_epoch(epoch)
        order = fit_idx[list(sampler)][skip * per_rank :]
        model.train()
        t0 = time.monotonic()
        for x, _ in _loader(train_set, order, per_rank, cfg.num_workers, cfg.seed + epoch):
            x = _to_device(x, device)
            with autocast(device):
                logits = net(x)
            loss = reconstruction_loss(logits, x, cfg.loss, pos_weight)
            loss_all = mean_over_ranks(loss.detach())  # the global batch's loss; every rank stops together on NaN
            check_finite(loss_all, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            samples += x.shape[0] * info.world_size
            pbar.update(1)
            if runlog is not None and step % cfg.log_every == 0:
                lv = float(loss_all)
                pbar.set_postfix(loss=f"{lv:.4g}")
                runlog.log(step=step, epoch=epoch, loss=lv)
            if step >= total_steps or out_of_time():
                stopped = "max_steps" if cfg.max_steps > 0 and step >= cfg.max_steps else stopped
                break
        train_seconds += time.monotonic() - t0
        if step - epoch * steps_per_epoch >= steps_per_epoch:
            epoch += 1
        # ---- per-epoch validation and checkpoints ------------------------------------------------------------
        if runlog is not None:  # rank 0 validates and writes; the other ranks wait at the next collective
            threshold, cal_iou = calibrate_threshold(model, cal_loader, device)
            val = evaluate(model, val_loader, device, threshold, topk_by_class)
            val["calib_iou"] = cal_iou
            runlog.log(step=step, epoch=epoch, **{f"val_{k}": v for k, v in val.items()})
            runlog.flush(("loss",))
            log.info("step %d epoch %d val %s", step, epoch, {k: round(v, 5) for k, v in val.items()})
            if val["iou_cal"] > best_iou:
                best_iou = val["iou_cal"]
                save("best.pt")
            save("last.pt")
        if out_of_time() and step < total_steps:
            stopped = "max_minutes"
            log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
            break
    pbar.close()

    # ---- latent statistics for the LDM (both checkpoints) --------------------------------------------------------
    if info.is_main and not last_file.is_file():
        save("last.pt")
    stats_loader = _loader(train_set, np.arange(len(train_set)), eval_bs, cfg.num_workers, cfg.seed)
    for name in ("last.pt", "best.pt") if info.is_main else ():  # rank 0 alone rewrites the checkpoints
        file = run_dir / name
        if not file.is_file():
            continue
        ck = load_checkpoint(file, kind=KIND, map_location="cpu")
        probe = VoxelAutoencoder(cfg.model).to(device)
        probe.load_state_dict(ck["model"])
        mean, std = latent_stats(probe, stats_loader, device)
        ck["extra"].update(latent_mean=mean, latent_std=std)
        save_checkpoint(file, kind=KIND, config=ck["config"], model=ck["model"], optimizer=ck["optimizer"],
                        step=ck["step"], epoch=ck["epoch"], rng=ck["rng"], extra=ck["extra"])
    if runlog is not None:
        runlog.flush(("loss",))
    result = {"step": step, "epoch": epoch, "stopped": stopped, "best_iou_cal": best_iou,
              "samples_per_s": samples / train_seconds if train_seconds > 0 else float("nan"), **val}
    if info.distributed:  # DDP's invariant, checked once (also a barrier: rank 0 has finished the checkpoints)
        result.update(world_size=info.world_size, param_hash=check_in_sync(model, "AE"))
    log.info("finished: %s", result)
    return result
