"""Latent diffusion training, top to bottom (nanoGPT style): `train_ldm(cfg: LDMTrainConfig) -> dict`.

setup (device, seed, run dir, resume) -> frozen AE -> latents encoded once and cached (voxdiff.latents), normalised by
the AE's per-channel statistics -> UNet3D (label dropout p = cfg_dropout with use_cfg, else 0), AdamW, EMA ->
loop: MSE to ε (DDPM eq. 14, "L_simple") or to v (`scheduler.prediction_type` v_prediction) at uniform t, optionally
min-SNR-γ weighted (`snr_gamma`), in the precision checked at start-up (voxdiff.precision), gradient clipping, a step
guard that skips non-finite or absurd steps -> every `ckpt_every` steps and at the end: held-out loss of the EMA model
(weighted like the training loss), last.pt / best.pt. At each step listed in `keep_steps` the checkpoint is also kept
as step{N}.pt (written like last.pt: atomically, the same contents), a learning curve to sample from later; a run
started with --overwrite removes the step{N}.pt files of the run it replaces.

Exact resume: the epoch order is a function of (seed, epoch); noise, timesteps, label dropout and dropout come from the
global RNG, whose state is in the checkpoint with the model, EMA (and its count), optimizer and step. The held-out loss
uses its own generator, so evaluating never shifts the training stream.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from voxdiff.binarize import Binarization
from voxdiff.checkpoint import (
    Checkpoint,
    LDMMeta,
    get_rng_state,
    load_autoencoder,
    save_checkpoint,
    set_rng_state,
)
from voxdiff.config import LDMTrainConfig, category_index, to_dict
from voxdiff.data.dataset import VoxelDataset, voxel_path
from voxdiff.distributed import (
    check_in_sync,
    mean_over_ranks,
    rank_rng,
    share_device_rng,
    together,
    wrap_ddp,
)
from voxdiff.latents import cached_latents, normalise
from voxdiff.models.unet3d import UNet3D
from voxdiff.precision import autocast
from voxdiff.render import Style, render_voxels
from voxdiff.sampling import LatentVoxelPipeline
from voxdiff.schedulers import DDPMScheduler
from voxdiff.training import common
from voxdiff.utils import Progress, VoxdiffError, file_sha256, get_logger  # noqa: F401 (get_logger: used as ldm.get_logger)

__all__ = ["train_ldm", "ema_multi_avg_fn", "diffusion_loss", "min_snr_weight", "KIND"]

KIND = "ldm"
VAL_MAX = 512  # at most this many held-out latents score best.pt


def ema_multi_avg_fn(decay: float) -> Any:
    """AveragedModel `multi_avg_fn`: EMA with warmup, d = min(decay, (1 + n) / (10 + n)) after n updates.

    Equivalent to `get_ema_multi_avg_fn(decay)` once n is large; the warmup keeps short runs from sampling with
    weights still close to the random initialisation. Depends only on n (saved), so it resumes exactly.
    """

    @torch.no_grad()
    def fn(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1 - d)

    return fn


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight per sample (Hang et al. 2023), float64 on the CPU, SNR_t = ᾱ_t / (1 − ᾱ_t):
    min(SNR_t, γ) / SNR_t for an ε target, min(SNR_t, γ) / (SNR_t + 1) for a v target. Both make the loss
    min(SNR_t, γ) · ‖x_0 − x̂_0‖² (‖Δε‖² = SNR_t ‖Δx_0‖², ‖Δv‖² = (SNR_t + 1) ‖Δx_0‖²).

    The ε weight is computed as min(γ / SNR_t, 1), so SNR_t = 0 gives 1, not 0/0. The v weight is 0 at SNR_t = 0 and
    about SNR_t near it: with zero terminal SNR, t = T − 1 (trailing sampling's first step) gets no training signal.
    """
    a = scheduler.alphas_cumprod[torch.as_tensor(t, dtype=torch.long).cpu()]
    snr = a / (1 - a)
    if scheduler.config.prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    return (gamma / snr).clamp(max=1.0)


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    amp: torch.dtype | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """L_simple = E‖target − net(√ᾱ_t z_0 + √(1−ᾱ_t) ε, t, y)‖² (DDPM eq. 14), in float32; the target is ε, or
    v = √ᾱ_t ε − √(1−ᾱ_t) z_0 when `scheduler.config.prediction_type` is v_prediction.

    `snr_gamma` None: the mean over all elements; γ: each sample's mean squared error times `min_snr_weight`, then
    the mean over the batch. `amp`: autocast dtype of the network's forward (None: fp32)."""
    zt = scheduler.add_noise(z0, noise, t)
    with autocast(z0.device, amp):
        out = model(zt, t, y)
    target = scheduler.get_velocity(z0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    if snr_gamma is None:
        return F.mse_loss(out.float(), target)
    per_sample = (out.float() - target).square().flatten(1).mean(dim=1)
    w = min_snr_weight(scheduler, t, snr_gamma).to(per_sample)
    return (w * per_sample).mean()


@torch.no_grad()
def _heldout_loss(model: torch.nn.Module, scheduler: DDPMScheduler, z: torch.Tensor, y: torch.Tensor, seed: int,
                  batch_size: int, snr_gamma: float | None = None) -> float:
    """Loss on fixed (t, noise) pairs drawn from a private generator: comparable across evaluations and resumes.

    Weighted like the training loss (`snr_gamma`), so best.pt is the model best at what the run optimises; the
    setting is fixed across a resume, so a resumed run compares like with like."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, scheduler.num_train_timesteps, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    was_training = model.training
    model.eval()
    total = 0.0
    for s in range(0, len(z), batch_size):
        sl = slice(s, s + batch_size)
        dev = z.device
        loss = diffusion_loss(model, scheduler, z[sl], y[sl], t[sl].to(dev), noise[sl].to(dev),
                              snr_gamma=snr_gamma)
        total += float(loss) * len(z[sl])
    model.train(was_training)
    return total / len(z)


def _stale_best(best: Checkpoint, last: Checkpoint) -> bool:
    """best.pt is older than the best model last.pt records: last.pt is saved first, so a run stopped between the two
    saves of an improving checkpoint leaves last.pt holding the best model and best.pt the one before."""
    return float(last.meta.best_heldout_loss) < float(best.meta.best_heldout_loss)


# Settings a resumed run must share with its checkpoint: the network, the noise process, the conditioning, the data,
# and the loss weighting (the held-out loss that picks best.pt uses it).
_RESUME_FIXED = ("model", "scheduler", "use_cfg", "cfg_dropout", "categories", "batch_size", "seed", "snr_gamma")


def train_ldm(cfg: LDMTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train the latent DDPM of `cfg`; writes `{ckpt_path}/last.pt`, `best.pt`, `train.log`, `log.csv/png`.

    Returns a summary: final step, losses, best held-out loss, checkpoint paths, throughput.
    Under torchrun (voxdiff.distributed): cfg.batch_size is global, each rank trains on its shard with DDP, rank 0
    alone writes; the step and data position are global, so last.pt resumes under any world size.
    """
    with contextlib.ExitStack() as stack:  # the run directory's lock, and its removal if the run fails at once
        return _train_ldm(cfg, progress, stack)


def _train_ldm(cfg: LDMTrainConfig, progress: bool, stack: contextlib.ExitStack) -> dict[str, Any]:
    # ---- setup ------------------------------------------------------------------------------------------------
    run = common.start_run(cfg, KIND, _RESUME_FIXED, stale_best=_stale_best)
    info, device, cap, run_dir, resume_ckpt = run.info, run.device, run.cap, run.run_dir, run.resume
    last_file, best_file = run_dir / "last.pt", run_dir / "best.pt"
    for c in cfg.categories:
        if not voxel_path(cfg.dataset_path, c, "train").is_file():
            raise VoxdiffError(f"training voxels not found: {voxel_path(cfg.dataset_path, c, 'train')}")

    # ---- frozen autoencoder and cached latents ----------------------------------------------------------------
    ae, ae_ckpt = load_autoencoder(cfg.ae_ckpt_path)
    ae = ae.to(device)  # on the run's device for good: the latent cache and the preview both use it
    ae_file = ae_ckpt.file
    ae_hash = file_sha256(ae_file)
    if resume_ckpt is not None and resume_ckpt.meta.ae_sha256 != ae_hash:
        raise VoxdiffError(f"cannot resume {last_file}: it was trained on another AE checkpoint than {ae_file}")
    if ae_ckpt.meta.latent_mean is None or ae_ckpt.meta.latent_std is None:
        raise VoxdiffError(f"AE checkpoint {ae_file} has no latent statistics (its training did not finish); rerun "
                           "autoencoder.py with --resume")
    ae.requires_grad_(False)
    latent_shape = tuple(ae.latent_shape)
    if cfg.model.in_channels != latent_shape[0]:
        raise VoxdiffError(f"UNet in_channels={cfg.model.in_channels} but the AE latent has {latent_shape[0]} channels")
    if latent_shape[1] % cfg.model.downsample_factor:
        raise VoxdiffError(f"latent side {latent_shape[1]} is not a multiple of the UNet's downsampling "
                           f"{cfg.model.downsample_factor}; use fewer ch_mult levels")
    cache_dir = Path(cfg.latent_cache_dir) if cfg.latent_cache_dir else ae_file.parent / "latents"
    # the train split's files, opened and checked (readable, whole, at a resolution the AE can pool to) before any write
    train_set = VoxelDataset(cfg.dataset_path, "train", cfg.categories, resolution=ae.cfg.resolution)
    files = common.open_run_dir(run, cfg.resume, cfg.overwrite, stack, "voxdiff.ldm")
    log = files.log
    latents = None
    with together():  # rank 0 encodes (or finds) the latent cache first, or every rank stops with its error
        if info.is_main:
            latents = cached_latents(ae, ae_hash, cfg.dataset_path, "train", cfg.categories, cache_dir, device,
                                     progress, log=log)
    if latents is None:  # the other ranks: a cache hit
        latents = cached_latents(ae, ae_hash, cfg.dataset_path, "train", cfg.categories, cache_dir, device, False,
                                 log=log)
    z_all, y_all, cache_file = latents
    latent_mean = torch.tensor(ae_ckpt.meta.latent_mean, dtype=torch.float32)  # the latent scale lives with the AE
    latent_std = torch.tensor(ae_ckpt.meta.latent_std, dtype=torch.float32)
    # the AE's held-out slice of the train split: never trained on, it picks best.pt (val and test are references)
    ae_holdout = ae_ckpt.meta.holdout
    if not ae_holdout:
        log.warning("AE checkpoint records no held-out slice; holding out 5% of each category here")
        ae_holdout = common.holdout_rows(train_set.counts, 0.05, 100, cfg.seed)
    holdout = {c: rows for c, rows in ae_holdout.items() if c in cfg.categories}
    held_idx = torch.from_numpy(train_set.global_indices(holdout))
    fit_mask = torch.ones(len(z_all), dtype=torch.bool)
    fit_mask[held_idx] = False
    z_train = normalise(z_all[fit_mask], latent_mean, latent_std).to(device)
    y_train = y_all[fit_mask].to(device)
    held_eval = held_idx[:: -(-len(held_idx) // VAL_MAX)]  # evenly thinned, so every category stays in
    z_held = normalise(z_all[held_eval], latent_mean, latent_std).to(device)
    y_held = y_all[held_eval].to(device)
    n = len(z_train)
    order = common.StepOrder(n, cfg.batch_size, info, cfg.seed)
    total_steps = cfg.total_steps(order.steps_per_epoch)
    log.info("latents %s x %d for training, %d held out (cache %s), device %s, steps/epoch %d, total %d",
             latent_shape, n, len(z_held), cache_file, device, order.steps_per_epoch, total_steps)
    log.info("world size %d, global batch %d, per-rank batch %d", info.world_size, cfg.batch_size, order.per_rank)

    # ---- model, optimizer, EMA --------------------------------------------------------------------------------
    model = UNet3D(cfg.model, class_dropout=cfg.cfg_dropout if cfg.use_cfg else 0.0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scheduler = DDPMScheduler(cfg.scheduler)
    step, smooth, best_metric = 0, None, math.inf
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt.model)
        ema.module.load_state_dict(resume_ckpt.ema)
        ema.n_averaged.fill_(int(resume_ckpt.meta.ema_n_averaged))
        optimizer.load_state_dict(resume_ckpt.optimizer)
        step = int(resume_ckpt.step)
        smooth = resume_ckpt.meta.smooth_loss
        best_metric = float(resume_ckpt.meta.best_heldout_loss)
        set_rng_state(resume_ckpt.rng)
        log.info("resumed from %s at step %d", last_file, step)
    probe_loss = _probe_loss(scheduler, z_train, y_train, order.per_rank, cfg.seed, cfg.snr_gamma)
    runtime = common.choose_runtime(cfg, info, model, probe_loss, "LDM training",
                                    resume_ckpt.meta.runtime if resume_ckpt else None, log)
    share_device_rng(info)
    net = wrap_ddp(model, info)  # training forwards go through DDP; optimizer, EMA and checkpoints use `model`
    files.commit()  # every check passed: the run's files are written from here on
    if info.is_main and cfg.overwrite and not cfg.resume:  # the replaced run's kept steps go with its other files
        for old in run_dir.glob("step*.pt"):
            if old.stem[4:].isdigit():
                old.unlink(missing_ok=True)
    keep_steps = set(cfg.keep_steps)
    runlog = common.RunLogger(run_dir, "log", resume=resume_ckpt is not None, log=log) if info.is_main else None
    if runlog is not None and resume_ckpt is not None:
        runlog.truncate_after(step)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("UNet3D %.2fM parameters; config %s", num_params / 1e6, to_dict(cfg))

    def save(file: Path, metric: float) -> None:
        meta = LDMMeta(ae_sha256=ae_hash, ae_file=ae_file.name, latent_shape=list(latent_shape),
                       categories=list(cfg.categories), use_cfg=cfg.use_cfg, scheduler=to_dict(cfg.scheduler),
                       ema_n_averaged=int(ema.n_averaged), smooth_loss=smooth, best_heldout_loss=metric,
                       holdout=holdout, num_train=n, runtime=runtime.record(with_history=True))
        save_checkpoint(file, Checkpoint(
            kind=KIND, model_config=to_dict(cfg.model), train_config=to_dict(cfg), model=model.state_dict(),
            ema=ema.module.state_dict(), optimizer=optimizer.state_dict(), step=step, rng=get_rng_state(), meta=meta))

    def checkpoint() -> None:
        nonlocal best_metric
        metric = _heldout_loss(ema.module, scheduler, z_held, y_held, cfg.seed + 1, cfg.batch_size, cfg.snr_gamma)
        improved = metric < best_metric
        best_metric = min(best_metric, metric)
        runlog.log(step=step, val_loss=metric)
        save(last_file, best_metric)
        if improved:
            save(best_file, best_metric)
        runlog.flush(("loss", "val_loss"))
        log.info("step %d: held-out loss %.5f (best %.5f)", step, metric, best_metric)

    def keep() -> None:
        """step{N}.pt: this step's checkpoint, written as last.pt is (atomically, the same contents)."""
        save(run_dir / f"step{step}.pt", best_metric)
        log.info("step %d: kept as step%d.pt", step, step)

    # ---- loop ---------------------------------------------------------------------------------------------------
    start_step, stopped, train_seconds = step, "num_steps", 0.0
    model.train()
    bar = Progress(total_steps, "ldm", initial=step, time_cap_s=cap.seconds, enabled=progress and info.is_main,
                   log=log)
    while step < total_steps:
        if cap.reached():
            stopped = "time_cap"
            break
        # data: the epoch's order depends only on (seed, epoch), so a resume picks up the same batches; this rank's
        # batch i is its shard of the global batch i (see voxdiff.distributed.epoch_sampler)
        idx = order.batch(step).to(device)
        z0, y = z_train[idx], y_train[idx]
        t0 = time.perf_counter()
        lr = common.warmup_lr(step, cfg.lr, cfg.warmup_steps, total_steps if cfg.lr_schedule == "cosine" else None)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # t and noise are drawn for the whole global batch (same stream on every rank) and each rank takes the rows
        # of its samples, so a K-rank run sees the draws of a single-process run with the same global batch
        g_batch, shard = len(idx) * info.world_size, slice(info.rank, None, info.world_size)
        t = torch.randint(0, scheduler.num_train_timesteps, (g_batch,), device=device)[shard]
        noise = torch.randn((g_batch, *z0.shape[1:]), device=device)[shard]
        with rank_rng(info, cfg.seed, step):  # per-rank dropout / label-dropout masks in a distributed run
            loss = diffusion_loss(net, scheduler, z0, y, t, noise, runtime.amp, cfg.snr_gamma)
        loss_all = mean_over_ranks(loss.detach())  # the global batch's loss: every rank decides the same below
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        skipped = runtime.guard.check(step, float(loss_all), float(grad_norm))  # norm of the all-reduced gradient
        if skipped is None:
            optimizer.step()
            ema.update_parameters(model)
        else:
            log.warning(skipped)
        step += 1
        train_seconds += time.perf_counter() - t0
        runtime.after_step(log)
        value = float(loss_all)
        if not math.isfinite(value):  # a skipped step: keep the smoothed loss and the log readable
            value = smooth if smooth is not None else 0.0
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        if runlog is not None and (step % cfg.log_every == 0 or step == total_steps):
            runlog.log(step=step, loss=value, loss_smooth=smooth, lr=lr, grad_norm=float(grad_norm))
            bar.update(1, loss=f"{smooth:.4f}")
        else:
            bar.update(1)
        if step % cfg.ckpt_every == 0 and step != total_steps:
            with together():  # a failed write (a full disk) on rank 0 stops every rank at this step
                if info.is_main:
                    checkpoint()
        if step in keep_steps and step != total_steps:  # the last step's is kept after its final checkpoint
            with together():
                if info.is_main:
                    keep()
        if info.is_main and cfg.preview and cfg.preview_every and step % cfg.preview_every == 0 \
                and step != total_steps:
            _render_preview(ema.module, ae, ae_ckpt.meta, cfg, run_dir, step, log)
    bar.close()
    if stopped == "time_cap":
        log.warning(common.cap_message("LDM", step, total_steps))
    with together():  # rank 0's last writes: a failure there stops every rank here, none waits in check_in_sync
        if info.is_main and (step > start_step or not last_file.is_file()):
            checkpoint()
            if step in keep_steps and step == total_steps:
                keep()
        if info.is_main and cfg.preview:
            _render_preview(ema.module, ae, ae_ckpt.meta, cfg, run_dir, step, log)
    seconds = cap.elapsed()
    result = {"step": step, "total_steps": total_steps, "stopped": stopped, "loss_smooth": smooth,
              "best_heldout_loss": best_metric, "last": str(last_file), "best": str(best_file),
              "num_params": num_params, "seconds": seconds, "train_seconds": train_seconds,
              "overhead_fraction": 1.0 - train_seconds / seconds if seconds > 0 else None,
              "steps_per_s": (step - start_step) / train_seconds if train_seconds > 0 else None,
              "runtime": runtime.record()}
    if stopped == "time_cap":
        result["note"] = common.cap_message("LDM", step, total_steps)
    if info.distributed:  # DDP's invariant, checked once: every rank ends with bit-identical model and EMA weights
        result.update(world_size=info.world_size, param_hash=check_in_sync(model, "UNet"),
                      ema_hash=check_in_sync(ema.module, "EMA"))
    log.info("finished: %s", result)
    return result


def _probe_loss(scheduler: DDPMScheduler, z: torch.Tensor, y: torch.Tensor, batch: int,
                seed: int, snr_gamma: float | None = None) -> Any:
    """The start-up checks' loss (precision, threads): the training loss (target and weighting) of the first `batch`
    training latents at fixed (t, ε) from a private generator, the shapes of a real training step."""
    g = torch.Generator().manual_seed(seed + 3)
    zb, yb = z[:batch], y[:batch]
    t = torch.randint(0, scheduler.num_train_timesteps, (len(zb),), generator=g).to(zb.device)
    noise = torch.randn(zb.shape, generator=g).to(zb.device)
    return lambda net: diffusion_loss(net, scheduler, zb, yb, t, noise, snr_gamma=snr_gamma)


@torch.no_grad()
def _render_preview(model: torch.nn.Module, ae: torch.nn.Module, ae_meta: Any, cfg: LDMTrainConfig, run_dir: Path,
                    step: int, log: Any) -> None:
    """PNG of 2 EMA samples per category at `{run_dir}/samples_{step}.png`: DDIM-50, guidance w = 1 when trained
    with label dropout, binarised as p > cfg.preview_threshold (what the pipeline's sampling uses), through the same
    LatentVoxelPipeline as the final samples. A private generator: rendering never shifts the training RNG streams.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pipe = LatentVoxelPipeline(unet=model, ae=ae, scheduler_config=cfg.scheduler, ae_meta=ae_meta)
    labels = torch.tensor([category_index(c) for c in cfg.categories for _ in range(2)], device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    z = pipe.sample_latents(labels, pipe.scheduler("ddim", min(50, cfg.scheduler.num_train_timesteps), clamp=True),
                            1.0 if cfg.use_cfg else 0.0, gen)
    model.train(was_training)
    grids = pipe.to_grids(z, labels, Binarization(threshold=cfg.preview_threshold))
    path = run_dir / f"samples_{step:06d}.png"
    render_voxels(grids, path, [f"{c} {i}" for c in cfg.categories for i in range(2)], style=Style(ncols=4))
    log.info("step %d: rendered %d samples to %s", step, len(grids), path)
