"""Latent diffusion training, top to bottom (nanoGPT style): `train_ldm(cfg: LDMTrainConfig) -> dict`.

`_train_ldm` reads in order: setup (device, seed, run dir, resume: common.start_run) -> the frozen AE (`_frozen_ae`)
-> latents encoded once and cached (voxdiff.latents), normalised by the AE's per-channel statistics, minus the AE's
held-out slice (`_latents`) -> UNet3D (label dropout p = cfg_dropout with use_cfg, else 0), AdamW, EMA -> the loop
(common.StepLoop): MSE to ε (DDPM eq. 14, "L_simple") or to v (`scheduler.prediction_type` v_prediction) at uniform t,
optionally min-SNR-γ weighted (`snr_gamma`), in the precision checked at start-up (voxdiff.precision), gradient
clipping, a step guard that skips non-finite or absurd steps -> every `ckpt_every` steps and at the end
(`_Checkpoints`): held-out loss of the EMA model (weighted like the training loss), last.pt / best.pt. At each step
listed in `keep_steps` the checkpoint is also kept as step{N}.pt (written like last.pt: atomically, the same contents),
a learning curve to sample from later; a run started with --overwrite removes the step{N}.pt files of the run it
replaces. Previews (`_render_preview`) sample through the public LatentVoxelPipeline call.

Exact resume: the epoch order is a function of (seed, epoch); noise, timesteps, label dropout and dropout come from the
global RNG, whose state is in the checkpoint with the model, EMA (and its count), optimizer and step. The held-out loss
uses its own generator, so evaluating never shifts the training stream.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from voxdiff.checkpoint import (
    Checkpoint,
    LDMMeta,
    get_rng_state,
    load_autoencoder,
    save_checkpoint,
    set_rng_state,
)
from voxdiff.config import LDMTrainConfig, to_dict
from voxdiff.data.dataset import VoxelDataset, voxel_path
from voxdiff.distributed import DistInfo, rank_rng, share_device_rng, together, wrap_ddp
from voxdiff.errors import VoxdiffError
from voxdiff.files import file_sha256
from voxdiff.latents import cached_latents, normalise
from voxdiff.logs import get_logger  # noqa: F401 (get_logger: used as ldm.get_logger)
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.precision import autocast
from voxdiff.render import Style, render_voxels
from voxdiff.sampling import LatentVoxelPipeline
from voxdiff.schedulers import DDPMScheduler
from voxdiff.training import common

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
    autocast_dtype: torch.dtype | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """L_simple = E‖target − net(√ᾱ_t z_0 + √(1−ᾱ_t) ε, t, y)‖² (DDPM eq. 14), in float32; the target is ε, or
    v = √ᾱ_t ε − √(1−ᾱ_t) z_0 when `scheduler.config.prediction_type` is v_prediction.

    `snr_gamma` None: the mean over all elements; γ: each sample's mean squared error times `min_snr_weight`, then
    the mean over the batch. `autocast_dtype`: the network's forward runs in it (None: fp32)."""
    zt = scheduler.add_noise(z0, noise, t)
    with autocast(z0.device, autocast_dtype):
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
    """The run, top to bottom (see the module docstring); `stack` holds the run directory's lock."""
    # ---- setup ------------------------------------------------------------------------------------------------
    run = common.start_run(cfg, KIND, _RESUME_FIXED, stale_best=_stale_best)
    info, device = run.info, run.device
    for c in cfg.categories:
        if not voxel_path(cfg.dataset_path, c, "train").is_file():
            raise VoxdiffError(f"training voxels not found: {voxel_path(cfg.dataset_path, c, 'train')}")
    ae, ae_ckpt, ae_hash = _frozen_ae(cfg, run)
    # the train split's files, opened and checked (readable, whole, at a resolution the AE can pool to) before any write
    train_set = VoxelDataset(cfg.dataset_path, "train", cfg.categories, resolution=ae.cfg.resolution)
    files = common.open_run_dir(run, cfg.resume, cfg.overwrite, stack, "voxdiff.ldm")
    log = files.log
    data = _latents(cfg, info, ae, ae_ckpt, ae_hash, train_set, progress, log)
    order = common.StepOrder(len(data.z_train), cfg.batch_size, info, cfg.seed)
    total_steps = cfg.total_steps(order.steps_per_epoch)
    log.info("latents %s x %d for training, %d held out (cache %s), device %s, steps/epoch %d, total %d",
             tuple(ae.latent_shape), len(data.z_train), len(data.z_held), data.cache_file, device,
             order.steps_per_epoch, total_steps)
    log.info("world size %d, global batch %d, per-rank batch %d", info.world_size, cfg.batch_size, order.per_rank)

    # ---- model, optimizer, EMA, resume --------------------------------------------------------------------------
    model = UNet3D(cfg.model, class_dropout=cfg.cfg_dropout if cfg.use_cfg else 0.0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scheduler = DDPMScheduler(cfg.scheduler)
    step, smooth, best = _resume(run, model, ema, optimizer, log)
    probe_loss = _probe_loss(scheduler, data.z_train, data.y_train, order.per_rank, cfg.seed, cfg.snr_gamma)
    runtime = common.choose_runtime(cfg, info, model, probe_loss, "LDM training",
                                    run.resume.meta.runtime if run.resume else None, log)
    share_device_rng(info)
    net = wrap_ddp(model, info)  # training forwards go through DDP; optimizer, EMA and checkpoints use `model`
    files.commit()  # every check passed: the run's files are written from here on
    if info.is_main and cfg.overwrite and not cfg.resume:
        _remove_kept_steps(run.run_dir)  # the replaced run's kept steps go with its other files
    loop = common.StepLoop("LDM", cfg, run, runtime, log, step, total_steps, ("loss", "val_loss"), progress,
                           log_last=True)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("UNet3D %.2fM parameters; config %s", num_params / 1e6, to_dict(cfg))
    ckpt = _Checkpoints(cfg, run.run_dir, model, ema, optimizer, scheduler, runtime, loop, data, best, ae_hash,
                        ae_ckpt.file.name, list(ae.latent_shape))
    preview = functools.partial(_render_preview, ema.module, ae, ae_ckpt.meta, cfg, run.run_dir, log=log)

    # ---- loop ---------------------------------------------------------------------------------------------------
    model.train()
    for step in loop:
        # data: the epoch's order depends only on (seed, epoch), so a resume picks up the same batches; this rank's
        # batch i is its shard of the global batch i (see voxdiff.distributed.epoch_sampler)
        idx = order.batch(step).to(device)
        z0, y = data.z_train[idx], data.y_train[idx]
        with loop.timed():
            lr = common.warmup_lr(step, cfg.lr, cfg.warmup_steps, total_steps if cfg.lr_schedule == "cosine" else None)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t, noise = _draw_t_noise(scheduler, z0, info)  # this rank's rows of the global batch's draws
            with rank_rng(info, cfg.seed, step):  # per-rank dropout / label-dropout masks in a distributed run
                loss = diffusion_loss(net, scheduler, z0, y, t, noise, runtime.autocast_dtype, cfg.snr_gamma)
            done = loop.update(loss, model, optimizer, cfg.grad_clip)
            if done.applied:
                ema.update_parameters(model)
        value, smooth = _smoothed(done.loss, smooth)
        if loop.log_due():
            loop.log({"loss": f"{smooth:.4f}"}, loss=value, loss_smooth=smooth, lr=lr, grad_norm=done.grad_norm)
        if loop.due(cfg.ckpt_every):
            loop.on_main(ckpt.checkpoint, smooth)
        if loop.step in cfg.keep_steps and loop.step != total_steps:  # the last step's is kept after its checkpoint
            loop.on_main(ckpt.keep, smooth)
        if cfg.preview and loop.due(cfg.preview_every):
            loop.on_main(preview, loop.step)

    # ---- the last checkpoint (and kept step), the last preview ----------------------------------------------------
    loop.on_main(ckpt.finish, smooth)
    if cfg.preview:
        loop.on_main(preview, loop.step)
    return loop.result({"loss_smooth": smooth, "best_heldout_loss": ckpt.best, "last": str(run.run_dir / "last.pt"),
                        "best": str(run.run_dir / "best.pt"), "num_params": num_params},
                       {"param_hash": (model, "UNet"), "ema_hash": (ema.module, "EMA")})


def _frozen_ae(cfg: LDMTrainConfig, run: common.RunStart) -> tuple[VoxelAutoencoder, Checkpoint, str]:
    """(AE, its checkpoint, the file's SHA-256): the frozen autoencoder on the run's device for good (the latent cache
    and the previews use it), checked against the run: the AE a resumed run was trained on, finished (its latent
    statistics), a latent the U-Net takes."""
    ae, ae_ckpt = load_autoencoder(cfg.ae_ckpt_path)
    ae = ae.to(run.device)
    ae_file = ae_ckpt.file
    ae_hash = file_sha256(ae_file)
    if run.resume is not None and run.resume.meta.ae_sha256 != ae_hash:
        raise VoxdiffError(f"cannot resume {run.run_dir / 'last.pt'}: it was trained on another AE checkpoint than "
                           f"{ae_file}")
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
    return ae, ae_ckpt, ae_hash


@dataclass
class _Latents:
    """The LDM's data on the run's device, normalised by the AE's per-channel statistics: the train split's latents
    minus the AE's held-out slice, and that slice thinned to at most VAL_MAX (the held-out loss that picks best.pt)."""

    z_train: torch.Tensor
    y_train: torch.Tensor
    z_held: torch.Tensor
    y_held: torch.Tensor
    holdout: dict[str, list[int]]  # the held-out rows per category
    cache_file: Path


def _latents(cfg: LDMTrainConfig, info: DistInfo, ae: VoxelAutoencoder, ae_ckpt: Checkpoint, ae_hash: str,
             train_set: VoxelDataset, progress: bool, log: Any) -> _Latents:
    """The train split encoded once by the frozen AE and cached (voxdiff.latents; beside the AE checkpoint unless
    cfg.latent_cache_dir), split into training and held-out latents by the AE's held-out slice, which the AE never
    trained on either (val and test are references, never used to pick a checkpoint)."""
    cache_dir = Path(cfg.latent_cache_dir) if cfg.latent_cache_dir else ae_ckpt.file.parent / "latents"
    args = (ae, ae_hash, cfg.dataset_path, "train", cfg.categories, cache_dir, info.device)
    latents = None
    with together():  # rank 0 encodes (or finds) the latent cache first, or every rank stops with its error
        if info.is_main:
            latents = cached_latents(*args, progress, log=log)
    if latents is None:  # the other ranks: a cache hit
        latents = cached_latents(*args, False, log=log)
    z_all, y_all, cache_file = latents
    latent_mean = torch.tensor(ae_ckpt.meta.latent_mean, dtype=torch.float32)  # the latent scale lives with the AE
    latent_std = torch.tensor(ae_ckpt.meta.latent_std, dtype=torch.float32)
    ae_holdout = ae_ckpt.meta.holdout
    if not ae_holdout:
        log.warning("AE checkpoint records no held-out slice; holding out 5% of each category here")
        ae_holdout = common.holdout_rows(train_set.counts, 0.05, 100, cfg.seed)
    holdout = {c: rows for c, rows in ae_holdout.items() if c in cfg.categories}
    held_idx = torch.from_numpy(train_set.global_indices(holdout))
    fit_mask = torch.ones(len(z_all), dtype=torch.bool)
    fit_mask[held_idx] = False
    held_eval = held_idx[:: -(-len(held_idx) // VAL_MAX)]  # evenly thinned, so every category stays in
    to = info.device
    return _Latents(z_train=normalise(z_all[fit_mask], latent_mean, latent_std).to(to), y_train=y_all[fit_mask].to(to),
                    z_held=normalise(z_all[held_eval], latent_mean, latent_std).to(to), y_held=y_all[held_eval].to(to),
                    holdout=holdout, cache_file=cache_file)


def _resume(run: common.RunStart, model: UNet3D, ema: AveragedModel, optimizer: torch.optim.Optimizer,
            log: Any) -> tuple[int, float | None, float]:
    """(step, smoothed loss, best held-out loss) to continue from: last.pt's weights, EMA (and its count), optimizer
    and RNG states when the run resumes; else a fresh start."""
    ck = run.resume
    if ck is None:
        return 0, None, math.inf
    model.load_state_dict(ck.model)
    ema.module.load_state_dict(ck.ema)
    ema.n_averaged.fill_(int(ck.meta.ema_n_averaged))
    optimizer.load_state_dict(ck.optimizer)
    set_rng_state(ck.rng)
    log.info("resumed from %s at step %d", run.run_dir / "last.pt", int(ck.step))
    return int(ck.step), ck.meta.smooth_loss, float(ck.meta.best_heldout_loss)


def _remove_kept_steps(run_dir: Path) -> None:
    """Remove the step{N}.pt files of the run an --overwrite replaces (its last.pt and best.pt go at commit)."""
    for old in run_dir.glob("step*.pt"):
        if old.stem[4:].isdigit():
            old.unlink(missing_ok=True)


def _draw_t_noise(scheduler: DDPMScheduler, z0: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's timesteps t ~ U{0..T-1} and noise ε from the global RNG. They are drawn for the whole global
    batch (the same stream on every rank) and each rank takes the rows of its samples, so a K-rank run sees the draws
    of a single-process run with the same global batch."""
    g_batch, shard = len(z0) * info.world_size, slice(info.rank, None, info.world_size)
    t = torch.randint(0, scheduler.num_train_timesteps, (g_batch,), device=z0.device)[shard]
    noise = torch.randn((g_batch, *z0.shape[1:]), device=z0.device)[shard]
    return t, noise


def _smoothed(loss: float, smooth: float | None) -> tuple[float, float]:
    """(the step's loss to log, the running average 0.98·s + 0.02·loss). A skipped step's non-finite loss stands in
    as the average so far, so the log and the average stay readable."""
    value = loss if math.isfinite(loss) else (smooth if smooth is not None else 0.0)
    return value, value if smooth is None else 0.98 * smooth + 0.02 * value


@dataclass
class _Checkpoints:
    """The LDM's checkpoints, written on rank 0: the EMA model's held-out loss, then last.pt, and best.pt when the
    loss improved on `best` (the best so far); step{N}.pt for the steps cfg.keep_steps lists. The metadata names the
    AE the run trains on (its file's SHA-256 and name) and its latent shape."""

    cfg: LDMTrainConfig
    run_dir: Path
    model: UNet3D
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: DDPMScheduler
    runtime: common.Runtime
    loop: common.StepLoop
    data: _Latents
    best: float
    ae_sha256: str
    ae_file: str
    latent_shape: list[int]

    def save(self, file: Path, smooth: float | None) -> None:
        """Everything an exact resume needs (weights, EMA, optimizer, step, RNG states, metadata), into `file`."""
        cfg = self.cfg
        meta = LDMMeta(ae_sha256=self.ae_sha256, ae_file=self.ae_file, latent_shape=self.latent_shape,
                       categories=list(cfg.categories), use_cfg=cfg.use_cfg, scheduler=to_dict(cfg.scheduler),
                       ema_n_averaged=int(self.ema.n_averaged), smooth_loss=smooth, best_heldout_loss=self.best,
                       holdout=self.data.holdout, num_train=len(self.data.z_train),
                       runtime=self.runtime.record(with_history=True))
        save_checkpoint(file, Checkpoint(
            kind=KIND, model_config=to_dict(cfg.model), train_config=to_dict(cfg), model=self.model.state_dict(),
            ema=self.ema.module.state_dict(), optimizer=self.optimizer.state_dict(), step=self.loop.step,
            rng=get_rng_state(), meta=meta))

    def checkpoint(self, smooth: float | None) -> None:
        """The held-out loss of the EMA model (logged as val_loss), last.pt, and best.pt when it improved."""
        cfg, data = self.cfg, self.data
        metric = _heldout_loss(self.ema.module, self.scheduler, data.z_held, data.y_held, cfg.seed + 1,
                               cfg.batch_size, cfg.snr_gamma)
        improved = metric < self.best
        self.best = min(self.best, metric)
        self.loop.record(val_loss=metric)
        self.save(self.run_dir / "last.pt", smooth)  # first: a run stopped before best.pt resumes from it
        if improved:
            self.save(self.run_dir / "best.pt", smooth)
        self.loop.flush()
        self.loop.logger.info("step %d: held-out loss %.5f (best %.5f)", self.loop.step, metric, self.best)

    def keep(self, smooth: float | None) -> None:
        """step{N}.pt: this step's checkpoint, written as last.pt is (atomically, the same contents)."""
        step = self.loop.step
        self.save(self.run_dir / f"step{step}.pt", smooth)
        self.loop.logger.info("step %d: kept as step%d.pt", step, step)

    def finish(self, smooth: float | None) -> None:
        """After the loop: the last checkpoint when steps are unsaved, and the last step's step{N}.pt if it is kept."""
        if self.loop.unsaved():
            self.checkpoint(smooth)
            if self.loop.step in self.cfg.keep_steps and self.loop.step == self.loop.total_steps:
                self.keep(smooth)


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
    """PNG of 2 EMA samples per category at `{run_dir}/samples_{step}.png`, sampled by the LatentVoxelPipeline call
    that samples the final shapes: DDIM-50 with clamped latents, guidance w = 1 when trained with label dropout,
    binarised as p > cfg.preview_threshold (what the pipeline's sampling uses). A private generator: rendering never
    shifts the training RNG streams.
    """
    was_training = model.training
    model.eval()
    pipe = LatentVoxelPipeline(unet=model, ae=ae, scheduler_config=cfg.scheduler, ae_meta=ae_meta)
    gen = torch.Generator(device=pipe.device).manual_seed(cfg.seed + 2)
    out = pipe(list(cfg.categories), 2, sampler="ddim", steps=min(50, cfg.scheduler.num_train_timesteps), eta=0.0,
               clamp_latents=True, guidance=1.0 if cfg.use_cfg else 0.0, guidance_rescale=0.0, binarize="threshold",
               threshold=cfg.preview_threshold, generator=gen, batch_size=2 * len(cfg.categories), output="grids")
    model.train(was_training)
    path = run_dir / f"samples_{step:06d}.png"
    render_voxels(out.grids, path, [f"{c} {i}" for c in cfg.categories for i in range(2)], style=Style(ncols=4))
    log.info("step %d: rendered %d samples to %s", step, len(out.grids), path)
