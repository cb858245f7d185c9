"""Sampling: classifier-free guidance in one batched forward, the reverse-diffusion loop, and the pipeline object that
turns a trained LDM + AE into voxel grids (`LatentVoxelPipeline`), used by sampling-to-files, SDS, the tuning, the
trainer's preview and the main pipeline alike.

    pipe = LatentVoxelPipeline.from_checkpoints("runs/medium/ae", "runs/medium/ldm", device="cpu")
    z = pipe.sample_latents(labels, pipe.scheduler("ddim", 50), cfg_scale=1.0, generator=g)
    grids = pipe.to_grids(z, labels, pipe.binarization("threshold", 0.5), resolution=64)   # uint8 (B, 64, 64, 64)

The network and the scheduler are arguments of the loop: nothing here builds or knows a noise process. Per-batch seeds
make every batch of `sample_to_files` a pure function of (seed, category, batch index), so an interrupted job that is
rerun writes exactly the arrays an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff import __version__
from voxdiff.binarize import Binarization
from voxdiff.checkpoint import AEMeta, LDMMeta, load_autoencoder, load_unet, resolve_checkpoint_file, unwrap
from voxdiff.config import (
    CATEGORIES,
    BinarizeMode,
    Precision,
    SampleConfig,
    SchedulerConfig,
    category_index,
    from_dict,
    to_dict,
)
from voxdiff.distributed import all_gather_object, broadcast_object, check_same_config, init_distributed, together
from voxdiff.latents import denormalise
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.precision import PrecisionChoice, autocast, choose_precision, forward_probe
from voxdiff.render import Style, render_voxels
from voxdiff.schedulers import DDIMScheduler, DDPMScheduler, make_scheduler
from voxdiff.threads import BusyWatch, ThreadChoice, choose_threads
from voxdiff.utils import (
    Progress,
    VoxdiffError,
    atomic_write_json,
    dir_lock,
    file_sha256,
    flush_denormals,
    get_logger,
    open_npy,
    open_npy_memmap,
)

__all__ = ["guided_eps", "sample_latents", "upsample_nearest", "batch_seed", "LatentVoxelPipeline", "sample_to_files"]


def guided_eps(
    model: torch.nn.Module, x: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor, scale: float,
    rescale: float = 0.0,
) -> torch.Tensor:
    """Classifier-free guided noise prediction (Ho & Salimans 2022), both branches in ONE batched forward.

        ε̂ = (1 + w) · ε_θ(x, t, y) − w · ε_θ(x, t, ∅)

    `rescale` φ (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", eq. 15-16):
    ε̂ ← φ · ε̂ · std(ε_c) / std(ε̂) + (1 − φ) · ε̂, per sample: large w inflates ε̂'s scale (over-saturated, bloated
    shapes); rescaling brings it back to the conditional prediction's. φ = 0 is plain guidance.

    Scale convention: w = 0 is exactly the plain conditional prediction (the unconditional branch is then skipped,
    not just weighted by zero), w = −1 is the unconditional model, w > 0 strengthens the condition. In the other
    common convention ε_u + s (ε_c − ε_u), s = 1 + w. The null class ∅ is the model's `null_class` id.
    Shared by the sampler and SDS.
    """
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    if scale == 0:
        return model(x, t, y)
    null = torch.full_like(y, unwrap(model).null_class)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    eps_c, eps_u = eps.chunk(2)
    guided = (1 + scale) * eps_c - scale * eps_u
    if rescale > 0:
        dims = tuple(range(1, guided.ndim))
        ratio = eps_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    labels: torch.Tensor,
    generator: torch.Generator | None,
    cfg_scale: float = 0.0,
    num_steps: int | None = None,
    *,
    latent_shape: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    rescale: float = 0.0,
) -> torch.Tensor:
    """Run the reverse process from x_T ~ N(0, I) to (normalised) latents z_0 of shape (B, *latent_shape).

    labels (B,) on the device to sample on; `noise` (B, *latent_shape) replaces the draw of x_T when given.
    num_steps: call `scheduler.set_timesteps(num_steps)` first (None: keep the scheduler's current timesteps).
    """
    device = labels.device
    if noise is None:
        if latent_shape is None:
            raise ValueError("sample_latents needs latent_shape or noise")
        gen_device = generator.device if generator is not None else device
        noise = torch.randn((len(labels), *latent_shape), generator=generator, device=gen_device)
    x = noise.to(device=device, dtype=torch.float32)
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        eps = guided_eps(model, x, int(t), labels, cfg_scale, rescale)
        x = scheduler.step(eps.float(), int(t), x, generator).prev_sample
    return x


def upsample_nearest(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each voxel of (B, r, r, r) `factor` times along every axis (any dtype, incl. bool/uint8)."""
    if factor == 1:
        return grid
    for dim in (1, 2, 3):
        grid = grid.repeat_interleave(factor, dim=dim)
    return grid


def batch_seed(seed: int, category: int, batch: int) -> int:
    """The seed of one batch: independent streams per (seed, category, batch index), stable across resumes."""
    return int(np.random.SeedSequence([seed, category, batch]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(eq=False)
class LatentVoxelPipeline:
    """A trained latent diffusion model and its autoencoder, and every step from noise to voxel grids.

    Built from checkpoints (`from_checkpoints`) or from networks in memory (the trainer's preview). The latent scale,
    the calibrated threshold and the training occupancy come from the AE's metadata; the noise schedule from the LDM's.
    """

    unet: torch.nn.Module
    ae: VoxelAutoencoder
    scheduler_config: SchedulerConfig
    ae_meta: AEMeta
    ldm_meta: LDMMeta | None = None
    ae_file: Path | None = None
    ldm_file: Path | None = None
    ldm_step: int = 0
    ae_matches: bool = True  # the AE file is the one the LDM was trained with
    amp: torch.dtype | None = None  # autocast dtype of the U-Net's forward (None: fp32)
    precision: PrecisionChoice | None = None  # how `amp` was chosen (from_checkpoints), for the run's records

    def __post_init__(self) -> None:
        devices = {p.device for p in (*self.unet.parameters(), *self.ae.parameters())}
        if len(devices) > 1:  # a module left behind fails here, not at the first decode of a long run
            raise VoxdiffError(f"the U-Net and the AE are on different devices ({', '.join(map(str, devices))}); "
                               "move both to one device")
        if self.ae_meta.latent_mean is None or self.ae_meta.latent_std is None:
            raise VoxdiffError(f"AE checkpoint {self.ae_file or ''} has no latent statistics (its training did not "
                               "finish); rerun autoencoder.py with --resume")
        self.latent_mean = torch.as_tensor(self.ae_meta.latent_mean, dtype=torch.float32)
        self.latent_std = torch.as_tensor(self.ae_meta.latent_std, dtype=torch.float32)
        if self.latent_mean.numel() != self.ae.cfg.latent_channels or not bool((self.latent_std > 0).all()):
            raise VoxdiffError("AE latent statistics do not fit its latent (one positive std per channel expected)")

    @classmethod
    def from_checkpoints(cls, ae_ckpt_path: str | os.PathLike[str], ldm_ckpt_path: str | os.PathLike[str], *,
                         device: Any = "cpu", use_ema: bool = True, precision: Precision = "fp32",
                         probe_batch: int = 8) -> LatentVoxelPipeline:
        """Load and cross-check the AE and LDM checkpoints (files or run directories); user errors raise VoxdiffError
        before anything is written. `precision` "auto" (or "bf16") is checked on this machine: the U-Net's forward at
        `probe_batch` latents in bf16 against fp32 (voxdiff.precision.choose_precision)."""
        ldm_file, ae_file = resolve_checkpoint_file(ldm_ckpt_path), resolve_checkpoint_file(ae_ckpt_path)
        unet, ldm_ckpt = load_unet(ldm_file, use_ema=use_ema)
        ae, ae_ckpt = load_autoencoder(ae_file)
        meta: LDMMeta = ldm_ckpt.meta  # type: ignore[assignment]
        if unet.num_classes != len(CATEGORIES):
            raise VoxdiffError(f"LDM has {unet.num_classes} classes but voxdiff has {len(CATEGORIES)} "
                               f"({', '.join(CATEGORIES)}): checkpoint mismatch")
        if tuple(meta.latent_shape) != tuple(ae.latent_shape):
            raise VoxdiffError(f"LDM latent shape {tuple(meta.latent_shape)} does not match the AE's "
                               f"{tuple(ae.latent_shape)}: wrong --ae_ckpt_path?")
        matches = not meta.ae_sha256 or meta.ae_sha256 == file_sha256(ae_file)
        device = torch.device(device)
        unet, ae = unet.to(device), ae.to(device)
        try:
            choice = choose_precision(precision, device, _unet_probe(unet, tuple(ae.latent_shape), probe_batch))
        except ValueError as e:
            raise VoxdiffError(str(e)) from None
        return cls(unet=unet, ae=ae, scheduler_config=from_dict(SchedulerConfig, meta.scheduler),
                   ae_meta=ae_ckpt.meta, ldm_meta=meta, ae_file=ae_file, ldm_file=ldm_file, ldm_step=ldm_ckpt.step,
                   ae_matches=matches, amp=choice.dtype, precision=choice)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.ae.latent_shape

    @property
    def ae_resolution(self) -> int:
        return self.ae.cfg.resolution

    def scheduler(self, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
                  clamp: bool = False) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of this LDM's noise process (None steps: all T for DDPM, 50 for DDIM). With `clamp`, every
        predicted latent is clipped to the training latents' range (the AE's `latent_absmax`, normalised units)."""
        T = self.scheduler_config.num_train_timesteps
        if steps is not None and steps > T:
            raise VoxdiffError(f"--steps {steps} exceeds the {T} training steps")
        sched = make_scheduler(sampler, self.scheduler_config, steps, eta)
        if clamp and self.ae_meta.latent_absmax is not None:
            sched.set_clip(torch.as_tensor(self.ae_meta.latent_absmax))
        return sched

    def guidance(self, use_cfg: bool, cfg_scale: float) -> float:
        """The guidance scale w to sample with: `cfg_scale` with use_cfg, else 0 (plain conditional). Refuses guidance
        from an LDM trained without label dropout (it has no unconditional model)."""
        w = float(cfg_scale) if use_cfg else 0.0
        if w != 0 and self.ldm_meta is not None and not self.ldm_meta.use_cfg:
            raise VoxdiffError("this LDM was trained without label dropout, so it has no unconditional model: sample "
                               "it with --no_use_cfg")
        return w

    def check_categories(self, categories: Sequence[str]) -> None:
        trained = self.ldm_meta.categories if self.ldm_meta is not None else list(CATEGORIES)
        untrained = [c for c in categories if c not in trained]
        if untrained:
            raise VoxdiffError(f"LDM was not trained on {untrained} (trained on {list(trained)})")

    def sample_latents(self, labels: torch.Tensor, scheduler: DDPMScheduler | DDIMScheduler, cfg_scale: float,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                       rescale: float = 0.0) -> torch.Tensor:
        """Normalised latents (B, *latent_shape) of the classes `labels`, by the reverse process of `scheduler`
        (the U-Net's forward in `amp`, the scheduler's arithmetic in fp32); `rescale`: see `guided_eps`."""
        with autocast(self.device, self.amp):
            return sample_latents(self.unet, scheduler, labels.to(self.device), generator, cfg_scale,
                                  latent_shape=self.latent_shape, noise=noise, rescale=rescale)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> occupancy probabilities (B, r, r, r) at the AE's resolution, in fp32."""
        return self.ae.decode(denormalise(z, self.latent_mean, self.latent_std)).squeeze(1)

    def binarization(self, mode: BinarizeMode = "threshold", threshold: float = 0.5, topk: int | None = None,
                     resolution: int | None = None) -> Binarization:
        """The binarisation rule at the AE's resolution: "threshold" (p > threshold), "calibrated" (the AE's
        held-out threshold) or "topk" (`topk` voxels per shape at `resolution`, i.e. topk / f³ at the AE's; None: the
        category's mean training count)."""
        if mode == "threshold":
            return Binarization(threshold=float(threshold))
        if mode == "calibrated":
            return Binarization(threshold=float(self.ae_meta.threshold))
        if mode != "topk":
            raise ValueError(f"binarize must be threshold, calibrated or topk; got {mode!r}")
        r = self.ae_resolution
        f3 = ((resolution or r) // r) ** 3
        if topk is not None:
            if topk > (resolution or r) ** 3 // 2:
                raise VoxdiffError(f"--topk {topk} would fill more than half of a {resolution or r}³ grid; give the "
                                   "number of occupied voxels a shape should have (the data hold a few percent)")
            return Binarization(topk=dict.fromkeys(range(len(CATEGORIES)), max(1, round(topk / f3))))
        per_cat = self.ae_meta.occupancy.get(str(r)) or {}
        missing = [c for c in CATEGORIES if c not in per_cat]
        if missing:
            raise VoxdiffError(f"top-k: the AE checkpoint has no training occupancy at {r}³ for {missing}; "
                               "pass --topk K")
        return Binarization(topk={category_index(c): max(1, round(float(k))) for c, k in per_cat.items()})

    def to_grids(self, z: torch.Tensor, labels: torch.Tensor, binarization: Binarization,
                 resolution: int | None = None) -> np.ndarray:
        """Normalised latents -> uint8 grids (B, R, R, R) in {0, 1}: decode, binarise at the AE's resolution, then
        nearest-upsample to `resolution` (a multiple of the AE's; None keeps it)."""
        r = self.ae_resolution
        resolution = resolution or r
        if resolution < r or resolution % r:
            raise VoxdiffError(f"resolution {resolution} is impossible: it must be a multiple of the AE's {r}")
        grids = binarization(self.decode(z.detach()), labels)
        return upsample_nearest(grids.to(torch.uint8), resolution // r).cpu().numpy()


def _unet_probe(unet: torch.nn.Module, latent_shape: tuple[int, ...], batch: int) -> Any:
    """A forward of `unet` on `batch` fixed latents (a private generator), guided-batch style: conditional and null
    labels, the shapes the reverse loop runs."""
    g = torch.Generator().manual_seed(0)
    device = next(unet.parameters()).device
    z = torch.randn((batch, *latent_shape), generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.arange(batch, device=device) % (getattr(unet, "num_classes", 1) + 1)
    return forward_probe(unet, lambda m: m(z, t, y))


def _progress_key(cfg: SampleConfig, category: str, pipe: LatentVoxelPipeline) -> str:
    """What a partial file depends on: the settings that change samples, the checkpoints' content (so a moved
    or renamed run directory resumes, and a retrained model never does), and the device kind and precision the
    batches are computed in (another device draws other noise: a partial file never mixes the two)."""
    src = {k: v for k, v in to_dict(cfg).items()
           if k not in ("ldm_ckpt_path", "ae_ckpt_path", "save_dir", "device", "threads")}
    src.update(categories=[category], ldm=file_sha256(pipe.ldm_file), ae=file_sha256(pipe.ae_file),
               device=pipe.device.type, amp=str(pipe.amp))
    if pipe.device.type == "cuda":
        src["gpu"] = torch.cuda.get_device_name(pipe.device)
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def sample_to_files(cfg: SampleConfig, progress: bool = True, max_batches: int | None = None) -> dict[str, Any]:
    """Sample `cfg.num_samples` shapes per category into `{save_dir}/{category}.npy`: (N, R, R, R) uint8 in {0, 1}.

    Resumable: batches go into `.{category}.partial.npy` (a memmap) with `.{category}.progress.json` (the run's key
    and finished batches); a rerun with the same settings skips finished batches and categories, and the final file
    appears by rename only when complete. `max_batches` stops after that many new batches (a time-sliced run).
    Writes `{save_dir}/sample.json` (config, checkpoints, timings, occupancy) and `sample.log`; returns that summary.
    Under torchrun each rank samples whole batches (rank r the r-th pending batch of every round) with the same
    per-batch seeds into rank 0's memmap (save_dir must be shared by the ranks): the file equals a one-process run's.
    """
    info = init_distributed(cfg.device)
    device = info.device
    flush_denormals(device)
    check_same_config(to_dict(cfg), "sampling config")
    pipe = LatentVoxelPipeline.from_checkpoints(cfg.ae_ckpt_path, cfg.ldm_ckpt_path, device=device,
                                                use_ema=cfg.use_ema, precision=cfg.precision)
    pipe.check_categories(cfg.categories)
    scale = pipe.guidance(cfg.use_cfg, cfg.cfg_scale)
    scheduler = pipe.scheduler(cfg.sampler, cfg.steps, cfg.eta, clamp=cfg.clamp_latents)
    binarization = pipe.binarization(cfg.binarize, cfg.threshold, cfg.topk, cfg.resolution)
    R = cfg.resolution
    if pipe.ae_resolution > R or R % pipe.ae_resolution:
        raise VoxdiffError(f"--resolution {R} is impossible: it must be a multiple of the AE's {pipe.ae_resolution}")
    save_dir = Path(cfg.save_dir)
    probe = _unet_probe(pipe.unet, pipe.latent_shape, cfg.batch_size * (1 + (scale != 0)))  # a guided batch
    threads = choose_threads(cfg.threads, lambda: probe(pipe.amp), device)
    with contextlib.ExitStack() as stack:
        with together():  # a lock refused on rank 0 stops every rank here, none waits in a later collective
            if info.is_main:  # one sampling job per directory; leftovers of killed jobs are cleared
                stack.enter_context(dir_lock(save_dir, "sampling job"))
        return _sample_all(cfg, pipe, scheduler, scale, binarization, info, progress, max_batches, threads)


def _sample_all(cfg: SampleConfig, pipe: LatentVoxelPipeline, scheduler: Any, scale: float,
                binarization: Binarization, info: Any, progress: bool, max_batches: int | None,
                threads: ThreadChoice) -> dict[str, Any]:
    """The body of `sample_to_files`, with the save directory locked."""
    save_dir, device = Path(cfg.save_dir), pipe.device
    log = get_logger("voxdiff.sample", save_dir / "sample.log" if info.is_main else None)
    precision = pipe.precision or PrecisionChoice(cfg.precision, pipe.amp, "set by the caller")
    log.info("precision %s: %s", precision.name, precision.reason)
    log.info("threads %d: %s", threads.threads, threads.reason)
    watch = BusyWatch(threads, "sampling", steps_per_probe_step=len(scheduler.timesteps))
    if not pipe.ae_matches:
        log.warning("AE checkpoint %s differs from the one the LDM was trained with (%s)", pipe.ae_file,
                    pipe.ldm_meta.ae_file if pipe.ldm_meta else "?")
    nb = -(-cfg.num_samples // cfg.batch_size)
    summary: dict[str, Any] = {"config": to_dict(cfg), "version": __version__, "device": str(device),
                               "ldm_ckpt": str(pipe.ldm_file), "ldm_step": pipe.ldm_step, "ae_ckpt": str(pipe.ae_file),
                               "cfg_scale_effective": scale, "binarization": binarization.describe(),
                               "timesteps": len(scheduler.timesteps), "categories": {}, "complete": True,
                               "runtime": {"precision": precision.record(), "threads": threads.record()}}
    if info.distributed:
        summary["world_size"] = info.world_size
    budget = max_batches
    for cat in cfg.categories:
        result = _sample_category(cfg, cat, pipe, scheduler, scale, binarization, info, log, progress, nb, budget,
                                  watch)
        if result is None:
            summary["complete"] = False
            break
        stats, new = result
        if budget is not None:
            budget -= new
        summary["categories"][cat] = stats
        summary["complete"] &= stats.get("file") is not None
    summary["runtime"]["busy"] = watch.note
    with together():  # every rank returns once the files exist, or raises with rank 0
        if info.is_main:
            atomic_write_json(save_dir / "sample.json", summary)
    return summary


def _sample_category(cfg: SampleConfig, cat: str, pipe: LatentVoxelPipeline, scheduler: Any, scale: float,
                     binarization: Binarization, info: Any, log: logging.Logger, progress: bool, nb: int,
                     budget: int | None, watch: BusyWatch) -> tuple[dict[str, Any], int] | None:
    """One category of `sample_to_files`; None when the batch budget is already spent."""
    save_dir, R, c = Path(cfg.save_dir), cfg.resolution, category_index(cat)
    final, partial = save_dir / f"{cat}.npy", save_dir / f".{cat}.partial.npy"
    prog_file = save_dir / f".{cat}.progress.json"
    key = _progress_key(cfg, cat, pipe)
    shape = (cfg.num_samples, R, R, R)
    prog = _read_progress(prog_file, nb, log) if info.is_main else {}
    if prog.get("key") != key:
        prog = {"key": key, "done": {}, "complete": False}
    if info.is_main and prog["complete"] and final.is_file() and not _whole_npy(final, shape, log):
        prog = {"key": key, "done": {}, "complete": False}  # the samples were damaged after they were complete
    prog = broadcast_object(prog)  # rank 0's reading of the progress file decides for every rank
    if prog["complete"] and final.is_file():
        if cfg.render and info.is_main and not final.with_suffix(".png").is_file():
            _render_first(final, cfg.render, cat)  # an output lost after the samples were complete
        log.info("%s: complete from an earlier run, skipped", cat)
        return {**prog["stats"], "skipped": True, "file": str(final)}, 0
    if budget is not None and budget <= 0:
        return None
    fresh = not prog["done"] or not partial.is_file() or (info.is_main and not _whole_npy(partial, shape, log))
    fresh_all = broadcast_object(fresh)
    if fresh_all:
        prog = {"key": key, "done": {}, "complete": False}
    with together():  # the partial file exists before any rank writes its rows into it (or every rank stops)
        if fresh_all and info.is_main:
            # the old record goes first: a partial file (re)made below never meets a record of batches it does not hold
            prog_file.unlink(missing_ok=True)
            try:
                open_npy_memmap(partial, shape).flush()  # disk space reserved up front
            except OSError as e:  # a full disk: no half-reserved file left behind, and the error names the samples
                partial.unlink(missing_ok=True)
                what = (e.strerror or str(e)).replace(str(partial), str(final))
                raise OSError(e.errno, what, str(final)) from None
    if not fresh_all:
        log.info("%s: resuming, %d of %d batches done", cat, len(prog["done"]), nb)
    arr = np.lib.format.open_memmap(partial, mode="r+")
    t0, new, new_shapes = time.perf_counter(), 0, 0
    bar = Progress(cfg.num_samples, f"sample {cat}", unit="shape", initial=sum(v["n"] for v in prog["done"].values()),
                   enabled=progress and info.is_main, log=log)
    pending = [b for b in range(nb) if str(b) not in prog["done"]]
    if budget is not None:
        pending = pending[: max(0, budget)]
    for first in range(0, len(pending), info.world_size):
        chunk = pending[first : first + info.world_size]  # a round: one batch per rank, in batch order
        record: dict[str, Any] = {}
        for b in chunk[info.rank : info.rank + 1]:  # this rank's batch (none in a short last round)
            s, e = b * cfg.batch_size, min(cfg.num_samples, (b + 1) * cfg.batch_size)
            gen = torch.Generator(device=pipe.device).manual_seed(batch_seed(cfg.seed, c, b))
            labels = torch.full((e - s,), c, dtype=torch.long, device=pipe.device)
            z = pipe.sample_latents(labels, scheduler, scale, gen, rescale=cfg.guidance_rescale if scale else 0.0)
            grids = pipe.to_grids(z, labels, binarization, R)
            arr[s:e] = grids
            arr.flush()
            note = watch.update(len(scheduler.timesteps))
            if note is not None:
                log.warning(note)
            occ = grids.reshape(len(grids), -1).sum(1)
            record[str(b)] = {"n": e - s, "occ_sum": float(occ.sum()), "empty": int((occ == 0).sum())}
        for rec in all_gather_object(record):  # every rank learns the round's finished batches, in batch order
            prog["done"].update(rec)
            new += len(rec)
            new_shapes += sum(v["n"] for v in rec.values())
            bar.update(sum(v["n"] for v in rec.values()))
        if info.is_main:
            atomic_write_json(prog_file, prog)
    bar.close()
    seconds = time.perf_counter() - t0
    done = len(prog["done"]) == nb
    arr.flush()
    del arr
    stats = {"num_samples": cfg.num_samples, "resolution": R, "batches_new": new, "batches_total": nb,
             "seconds": seconds, "shapes_per_s": new_shapes / seconds if new_shapes and seconds > 0 else None,
             "mean_occupancy": sum(v["occ_sum"] for v in prog["done"].values()) / max(1, cfg.num_samples) / R**3,
             "empty": sum(v["empty"] for v in prog["done"].values())}
    if done:
        prog.update(complete=True, stats=stats)
        if info.is_main:  # every rank's rows were flushed before the last gather: rank 0 publishes the file
            if cfg.render:  # every output exists before the category is recorded complete
                _render_first(partial, cfg.render, cat, final.with_suffix(".png"))
            os.replace(partial, final)
            atomic_write_json(prog_file, prog)
        log.info("%s: wrote %s %s, %.1fs, %s", cat, final, (cfg.num_samples, R, R, R), seconds, stats)
    else:
        log.info("%s: stopped after %d new batches (%d/%d done); rerun to continue", cat, new, len(prog["done"]), nb)
    return {**stats, "file": str(final) if done else None}, new


def _read_progress(path: Path, nb: int, log: logging.Logger) -> dict[str, Any]:
    """A category's progress record; one that cannot be read or does not hold a record of `nb` batches (a cut or
    corrupted file) starts the category afresh, with one line saying so, instead of failing every rerun the same way."""
    if not path.is_file():
        return {}
    try:
        prog = json.loads(path.read_text())
        if not isinstance(prog, dict) or not isinstance(prog.get("key"), str) or \
                not isinstance(prog.get("done"), dict) or not isinstance(prog.get("complete"), bool):
            raise ValueError("not a progress record")
        for b, rec in prog["done"].items():
            if not (b.isdigit() and int(b) < nb and isinstance(rec, dict)
                    and all(isinstance(rec.get(k), (int, float)) for k in ("n", "occ_sum", "empty"))):
                raise ValueError(f"batch {b!r} holds no record of a batch")
        if prog["complete"] and not isinstance(prog.get("stats"), dict):
            raise ValueError("complete without statistics")
        return prog
    except (ValueError, OSError, UnicodeDecodeError) as e:
        log.warning("%s is unreadable (%s); sampling this category afresh", path, str(e).splitlines()[0] if str(e)
                    else type(e).__name__)
        return {}


def _whole_npy(path: Path, shape: tuple[int, ...], log: logging.Logger) -> bool:
    """Whether `path` is a whole uint8 .npy array of `shape` (a partial or a finished samples file); says why not in one
    line (the category is then sampled afresh: a damaged file is never trusted, and never fatal)."""
    try:
        arr = open_npy(path)
        if arr.shape != shape or arr.dtype != np.uint8:
            raise VoxdiffError(f"{path} holds {arr.dtype} {arr.shape}, not uint8 {shape}")
    except VoxdiffError as e:
        log.warning("%s; sampling this category afresh", e)
        return False
    return True


def _render_first(path: Path, n: int, category: str, png: Path | None = None) -> Path:
    """`{category}.png` beside the samples: the first n shapes, exactly as saved (what eval.py scores)."""
    arr = np.load(path, mmap_mode="r")
    k = min(n, len(arr))
    occ = np.asarray(arr[:k]).reshape(k, -1).mean(1)
    titles = [f"{category} #{i}  {100 * o:.2g}%" for i, o in enumerate(occ)]
    return render_voxels(arr[:k], png or path.with_suffix(".png"), titles, style=Style(ncols=min(k, 8), panel_px=200))
