"""Sampling: classifier-free guidance in one batched forward, the reverse-diffusion loop, latent decoding, binarisation,
and the resumable `sample_to_files` job behind `diffusion/sample.py`.

The network and the scheduler are arguments (habit 2 of ARCHITECTURE.md): nothing here builds or knows a noise process.
Per-batch seeds make every batch a pure function of (seed, category, batch index), so an interrupted job that is rerun
writes exactly the arrays an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from voxdiff import __version__
from voxdiff.binarize import binarize
from voxdiff.checkpoint import resolve_checkpoint_file, unwrap
from voxdiff.config import CATEGORIES, LDMTrainConfig, SampleConfig, category_index, from_dict, to_dict
from voxdiff.distributed import all_gather_object, barrier, broadcast_object, check_same_config, init_distributed
from voxdiff.latents import denormalise, file_sha256
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.schedulers import DDIMScheduler, DDPMScheduler, make_scheduler
from voxdiff.utils import VoxdiffError, atomic_write_json, get_logger

__all__ = [
    "guided_eps",
    "sample_latents",
    "decode_latents",
    "upsample_nearest",
    "batch_seed",
    "load_models",
    "sample_to_files",
]


def guided_eps(
    model: torch.nn.Module, x: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor, scale: float
) -> torch.Tensor:
    """Classifier-free guided noise prediction (Ho & Salimans 2022), both branches in ONE batched forward.

        ε̂ = (1 + w) · ε_θ(x, t, y) − w · ε_θ(x, t, ∅)

    Scale convention (the seed's): w = 0 is exactly the plain conditional prediction (the unconditional branch is then
    skipped, not just weighted by zero), w = −1 is the unconditional model, w > 0 strengthens the condition. In the
    other common convention ε_u + s (ε_c − ε_u), s = 1 + w. The null class ∅ is the model's `null_class` id.
    Shared by the sampler and SDS.
    """
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    if scale == 0:
        return model(x, t, y)
    null = torch.full_like(y, unwrap(model).null_class)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    eps_c, eps_u = eps.chunk(2)
    return (1 + scale) * eps_c - scale * eps_u


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    labels: torch.Tensor,
    generator: torch.Generator | None,
    cfg_scale: float = 0.0,
    num_steps: int | None = None,
    progress: bool = False,
    *,
    latent_shape: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
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
    for t in tqdm(scheduler.timesteps, desc="denoise", disable=not progress, leave=False):
        eps = guided_eps(model, x, int(t), labels, cfg_scale)
        x = scheduler.step(eps.float(), int(t), x, generator).prev_sample
    return x


@torch.no_grad()
def decode_latents(
    ae: VoxelAutoencoder,
    z_normalised: torch.Tensor,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    resolution: int | None = None,
) -> torch.Tensor:
    """Normalised latents -> occupancy probabilities (B, R, R, R): z · std + mean per channel, then the AE decoder.

    `resolution` (a multiple of the AE's) upsamples by nearest neighbour; None keeps the AE's resolution.
    """
    z = denormalise(z_normalised, latent_mean, latent_std)
    return ae.decode(z, resolution=resolution).squeeze(1)


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


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _topk_per_category(cfg: SampleConfig, ae_ckpt: dict[str, Any], ae_res: int) -> dict[str, int]:
    """k at the AE resolution per category (0 = threshold): --topk K is given at the output resolution, so K / f³;
    --topk auto reads the AE's training occupancy (mean occupied voxels per shape) at its own resolution."""
    f3 = (cfg.resolution // ae_res) ** 3
    if cfg.topk == 0:
        return dict.fromkeys(cfg.categories, 0)
    if cfg.topk > 0:
        return dict.fromkeys(cfg.categories, max(1, round(cfg.topk / f3)))
    occ = (ae_ckpt.get("extra") or {}).get("occupancy") or {}
    per_cat = occ.get(str(ae_res)) or {}
    missing = [c for c in cfg.categories if c not in per_cat]
    if missing:
        raise VoxdiffError(f"--topk auto: the AE checkpoint has no training occupancy at {ae_res}³ for {missing}; "
                           "pass --topk K or --threshold")
    return {c: max(1, round(float(per_cat[c]))) for c in cfg.categories}


def load_models(cfg: SampleConfig, device: torch.device) -> dict[str, Any]:
    """Load and cross-check the LDM and AE checkpoints (also used by `voxdiff.sds`); user errors raise VoxdiffError
    before anything is written.

    Returns model, ae (on `device`), ldm_cfg, ldm_ckpt, ae_ckpt, ldm_file, ae_file, latent_shape, ae_res, mean, std,
    topk (k per category at the AE resolution).
    """
    ldm_file = resolve_checkpoint_file(cfg.ldm_ckpt_path)
    ae_file = resolve_checkpoint_file(cfg.ae_ckpt_path)
    model, ldm_ckpt = UNet3D.from_checkpoint(ldm_file, use_ema=cfg.use_ema)
    ae, ae_ckpt = VoxelAutoencoder.from_checkpoint(ae_file)
    ldm_cfg = from_dict(LDMTrainConfig, ldm_ckpt["config"])
    extra = ldm_ckpt.get("extra") or {}
    if ldm_cfg.model.num_classes != len(CATEGORIES):
        raise VoxdiffError(f"LDM has {ldm_cfg.model.num_classes} classes but voxdiff has {len(CATEGORIES)} "
                           f"({', '.join(CATEGORIES)}): checkpoint mismatch")
    untrained = [c for c in cfg.categories if c not in ldm_cfg.categories]
    if untrained:
        raise VoxdiffError(f"LDM was not trained on {untrained} (trained on {list(ldm_cfg.categories)})")
    if tuple(extra.get("latent_shape", ())) != tuple(ae.latent_shape):
        raise VoxdiffError(f"LDM latent shape {tuple(extra.get('latent_shape', ()))} does not match the AE's "
                           f"{tuple(ae.latent_shape)}: wrong --ae_ckpt_path?")
    if cfg.use_cfg and not ldm_cfg.use_cfg:
        raise VoxdiffError("--use_cfg given but the LDM was trained without label dropout (no unconditional model)")
    ae_res = ae.cfg.resolution
    if cfg.resolution < ae_res or cfg.resolution % ae_res:
        raise VoxdiffError(f"--resolution {cfg.resolution} is impossible: it must be a multiple of the AE's {ae_res}")
    if cfg.steps and cfg.steps > ldm_cfg.scheduler.num_train_timesteps:
        raise VoxdiffError(f"--steps {cfg.steps} exceeds the {ldm_cfg.scheduler.num_train_timesteps} training steps")
    return {
        "model": model.to(device), "ae": ae.to(device), "ldm_cfg": ldm_cfg, "ldm_ckpt": ldm_ckpt, "ae_ckpt": ae_ckpt,
        "ldm_file": ldm_file, "ae_file": ae_file, "latent_shape": tuple(ae.latent_shape), "ae_res": ae_res,
        "mean": torch.as_tensor(extra["latent_mean"], dtype=torch.float32),
        "std": torch.as_tensor(extra["latent_std"], dtype=torch.float32),
        "topk": _topk_per_category(cfg, ae_ckpt, ae_res),
        "threshold": effective_threshold(cfg.threshold, ae_ckpt),
    }


def effective_threshold(threshold: float, ae_ckpt: dict[str, Any]) -> float:
    """The occupancy threshold to use: `threshold`, or when it is negative ("auto") the AE's threshold calibrated for
    IoU on a held-out slice of the training split (checkpoint extra "threshold"), falling back to 0.5."""
    if threshold >= 0:
        return float(threshold)
    return float((ae_ckpt.get("extra") or {}).get("threshold", 0.5))


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
    check_same_config(to_dict(cfg), "sampling config")
    m = load_models(cfg, device)
    save_dir = Path(cfg.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    log = get_logger("voxdiff.sample", save_dir / "sample.log" if info.is_main else None)
    recorded = m["ldm_ckpt"]["extra"].get("ae_hash")
    if recorded and recorded != file_sha256(m["ae_file"]):
        log.warning("AE checkpoint %s differs from the one the LDM was trained with (%s)", m["ae_file"],
                    m["ldm_ckpt"]["extra"].get("ae_ckpt_path"))
    model, ae = m["model"], m["ae"]
    scheduler = make_scheduler(cfg.sampler, m["ldm_cfg"].scheduler, cfg.steps, cfg.eta)
    scale = cfg.cfg_scale if cfg.use_cfg else 0.0
    R, f = cfg.resolution, cfg.resolution // m["ae_res"]
    nb = -(-cfg.num_samples // cfg.batch_size)
    summary: dict[str, Any] = {"config": to_dict(cfg), "version": __version__, "device": str(device),
                               "ldm_ckpt": str(m["ldm_file"]), "ldm_step": int(m["ldm_ckpt"]["step"]),
                               "ae_ckpt": str(m["ae_file"]), "cfg_scale_effective": scale,
                               "timesteps": len(scheduler.timesteps), "categories": {}, "complete": True}
    if info.distributed:
        summary["world_size"] = info.world_size
    budget = max_batches
    for cat in cfg.categories:
        c = category_index(cat)
        final, partial = save_dir / f"{cat}.npy", save_dir / f".{cat}.partial.npy"
        prog_file = save_dir / f".{cat}.progress.json"
        key_src = {**to_dict(cfg), "categories": [cat], "device": None, "ldm": _identity(m["ldm_file"]),
                   "ae": _identity(m["ae_file"])}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
        prog = json.loads(prog_file.read_text()) if prog_file.is_file() else {}
        if prog.get("key") != key:
            prog = {"key": key, "done": {}, "complete": False}
        prog = broadcast_object(prog)  # rank 0's reading of the progress file decides for every rank
        if prog["complete"] and final.is_file():
            log.info("%s: complete from an earlier run, skipped", cat)
            summary["categories"][cat] = {**prog["stats"], "skipped": True}
            continue
        if budget is not None and budget <= 0:
            summary["complete"] = False
            break
        if broadcast_object(not prog["done"] or not partial.is_file()):
            prog["done"] = {}
            if info.is_main:
                np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(cfg.num_samples, R, R, R)).flush()
        else:
            log.info("%s: resuming, %d of %d batches done", cat, len(prog["done"]), nb)
        barrier()  # the partial file exists: every rank writes its batches' rows into it
        arr = np.lib.format.open_memmap(partial, mode="r+")
        t0, new, new_shapes = time.perf_counter(), 0, 0
        pbar = tqdm(total=cfg.num_samples, initial=sum(v["n"] for v in prog["done"].values()), unit="shape",
                    desc=f"sample {cat}", disable=not (progress and info.is_main), dynamic_ncols=True)
        pending = [b for b in range(nb) if str(b) not in prog["done"]]
        if budget is not None:
            pending = pending[: max(0, budget)]
        for first in range(0, len(pending), info.world_size):
            chunk = pending[first : first + info.world_size]  # a round: one batch per rank, in batch order
            record: dict[str, Any] = {}
            for b in chunk[info.rank : info.rank + 1]:  # this rank's batch (none in a short last round)
                s, e = b * cfg.batch_size, min(cfg.num_samples, (b + 1) * cfg.batch_size)
                gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, c, b))
                labels = torch.full((e - s,), c, dtype=torch.long, device=device)
                z = sample_latents(model, scheduler, labels, gen, scale, latent_shape=m["latent_shape"])
                probs = decode_latents(ae, z, m["mean"], m["std"])  # at the AE's resolution
                k = m["topk"][cat]
                grids = binarize(probs, threshold=m["threshold"], topk=k if k > 0 else None)
                grids = upsample_nearest(grids.to(torch.uint8), f).cpu().numpy()
                arr[s:e] = grids
                arr.flush()
                occ = grids.reshape(len(grids), -1).sum(1)
                record[str(b)] = {"n": e - s, "occ_sum": float(occ.sum()), "empty": int((occ == 0).sum())}
            for rec in all_gather_object(record):  # every rank learns the round's finished batches, in batch order
                prog["done"].update(rec)
                new += len(rec)
                new_shapes += sum(v["n"] for v in rec.values())
                pbar.update(sum(v["n"] for v in rec.values()))
            if info.is_main:
                atomic_write_json(prog_file, prog)
        if budget is not None:
            budget -= new
        pbar.close()
        seconds = time.perf_counter() - t0
        done = len(prog["done"]) == nb
        arr.flush()
        del arr
        stats = {"num_samples": cfg.num_samples, "resolution": R, "batches_new": new,
                 "batches_total": nb, "seconds": seconds,
                 "shapes_per_s": new_shapes / seconds if new_shapes and seconds > 0 else None,
                 "mean_occupancy": sum(v["occ_sum"] for v in prog["done"].values()) / max(1, cfg.num_samples) / R**3,
                 "empty": sum(v["empty"] for v in prog["done"].values()), "topk_at_ae_res": m["topk"][cat]}
        if done:
            prog.update(complete=True, stats=stats)
            if info.is_main:  # every rank's rows were flushed before the last gather: rank 0 publishes the file
                os.replace(partial, final)
                atomic_write_json(prog_file, prog)
            log.info("%s: wrote %s %s, %.1fs, %s", cat, final, (cfg.num_samples, R, R, R), seconds, stats)
        else:
            summary["complete"] = False
            log.info("%s: stopped after %d new batches (%d/%d done); rerun to continue", cat, new,
                     len(prog["done"]), nb)
        summary["categories"][cat] = {**stats, "file": str(final) if done else None}
    if info.is_main:
        atomic_write_json(save_dir / "sample.json", summary)
    barrier()  # every rank returns once the files exist
    return summary
