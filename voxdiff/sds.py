"""Score distillation sampling (SDS, Poole et al. 2022, "DreamFusion") on the latents of the trained LDM.

Instead of running the reverse process, SDS treats a batch of latents z as parameters and follows the denoiser's score:
for a random t and ε ~ N(0, I),

    ∇_z L_SDS = w(t) · (ε̂_cfg(z_t, t, c) − ε),    z_t = √ᾱ_t z + √(1 − ᾱ_t) ε        (DreamFusion eq. 3)

with the U-Net Jacobian dropped (the U-Net gets no gradient) and ∂z/∂θ = I (the latents are the parameters; no
renderer). An LDM trained with v-prediction has its (guided) output turned into ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) z_t first
(`pred_x0_and_eps` of its scheduler), so the gradient is the same ε-residual for either kind of model.

Weighting w(t): "sds" = 1 − ᾱ_t (DreamFusion's choice, the noise variance σ_t²; it mutes the small-t
terms whose ε-residual is mostly noise) or "uniform" = 1. The gradient is applied through the usual surrogate loss
`(grad.detach() * z).sum()`, whose derivative in z is exactly `grad`, so any torch optimizer (Adam here) can step z.

The model, the CFG helper, the schedulers, checkpoint loading and decode/binarise all come from the same
`LatentVoxelPipeline` as `diffusion/sample.py`, so SDS shapes are decoded and binarised exactly like its samples.
With `init="ddim"` the starting latents are the pipeline's own samples (`pipe(..., output="latents")`, DDIM η = 0):
with the same seed, bit-identical to `sample_to_files`' DDIM samples.

Imports voxdiff.sampling and voxdiff.render (the PNGs of the optimisation); no voxdiff module imports it (its entry
point is sds/main.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff import __version__
from voxdiff.binarize import Binarization
from voxdiff.config import CATEGORIES, SDSConfig, category_index, to_dict
from voxdiff.device import flush_denormals, resolve_device
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_memmap, atomic_write_json, dir_lock
from voxdiff.logs import Progress, get_logger
from voxdiff.precision import autocast
from voxdiff.render import render_voxels
from voxdiff.sampling import LatentVoxelPipeline, batch_seed, guided_eps
from voxdiff.schedulers import DDIMScheduler, DDPMScheduler, expand_as_sample

__all__ = ["sds_weight", "sds_grad", "sds_surrogate", "timestep_range", "run_sds"]


def sds_weight(scheduler: DDPMScheduler | DDIMScheduler, t: torch.Tensor, weighting: str = "sds") -> torch.Tensor:
    """w(t) per sample (float64, CPU): "sds" = 1 − ᾱ_t (DreamFusion), "uniform" = 1."""
    t = torch.as_tensor(t, dtype=torch.long).cpu().reshape(-1)
    if weighting == "sds":
        return 1.0 - scheduler.alphas_cumprod[t]
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float64)
    raise ValueError(f"weighting must be one of sds, uniform; got {weighting!r}")


def sds_grad(
    model: torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    z: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cfg_scale: float,
    weighting: str = "sds",
) -> torch.Tensor:
    """The SDS gradient w(t) · (ε̂_cfg(z_t, t, c) − ε) for latents z (B, C, r, r, r), detached (no graph).

    t (B,) integer timesteps, noise ε (like z), labels (B,) class ids; cfg_scale w as in `guided_eps`
    ((1 + w) ε_c − w ε_u; 0 = plain conditional). The U-Net runs under no_grad: it receives no gradient. When
    `scheduler.config.prediction_type` is v_prediction the guided output is v̂, converted to ε̂ before the residual.
    """
    with torch.no_grad():
        # 1. forward process z_t = √ᾱ_t z + √(1 − ᾱ_t) ε (DDPM eq. 4)
        z_t = scheduler.add_noise(z.detach(), noise, t)
        # 2. guided noise prediction ε̂ (CFG, both branches in one forward); a v-prediction model's v̂ -> ε̂
        eps_hat = guided_eps(model, z_t, t.to(z.device), labels, cfg_scale).to(z.dtype)
        if scheduler.config.prediction_type == "v_prediction":
            eps_hat = scheduler.pred_x0_and_eps(eps_hat, t, z_t)[1]
        # 3. per-sample weight w(t), broadcast to z's rank
        w = expand_as_sample(sds_weight(scheduler, t, weighting), z)
        # 4. DreamFusion eq. 3 with ∂z/∂θ = I: w(t) (ε̂ − ε)
        return w * (eps_hat - noise)


def sds_surrogate(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(grad.detach() · z).sum(): its derivative in z is exactly `grad`, so loss.backward() + any torch optimizer
    step the latents along the SDS gradient."""
    return (grad.detach() * z).sum()


def timestep_range(cfg: SDSConfig, num_train_timesteps: int, step: int = 0) -> tuple[int, int]:
    """Inclusive integer range [lo, hi] of t at optimisation step `step`: [t_min·T, t_max·T] clipped to 0..T−1.

    With `cfg.anneal` the upper bound falls linearly from t_max·T (first step) to t_min·T (last step): large noise
    levels shape the coarse form early, small ones refine it late.
    """
    T = num_train_timesteps
    hi = min(T - 1, round(cfg.t_max * T))
    lo = min(hi, round(cfg.t_min * T))
    if cfg.anneal and cfg.num_steps > 1:
        p = step / (cfg.num_steps - 1)
        hi = round(hi - (hi - lo) * p)
    return lo, hi


def _render(grids: np.ndarray, path: Path, title: str) -> None:
    render_voxels(grids, path, titles=[f"{title} #{i}" for i in range(len(grids))])


def _write_summary(path: Path, category: str, summary: dict[str, Any], log: Any) -> None:
    """sds.json holds one entry per category (runs of other categories into the same save_dir are kept); one that
    cannot be read is written afresh, with one line saying so."""
    data: Any = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not all(c in CATEGORIES for c in data):
                raise ValueError("not an SDS summary")
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            log.warning("%s is unreadable (%s); written afresh with %s alone", path,
                        str(e).splitlines()[0] if str(e) else type(e).__name__, category)
            data = {}
    data[category] = summary
    atomic_write_json(path, data)


def run_sds(cfg: SDSConfig, progress: bool = True) -> dict[str, Any]:
    """Optimise `cfg.num_samples` latents per category by SDS (batches of `batch_size` at once) and decode them.

    Writes `{save_dir}/{category}.npy` ((N, R, R, R) uint8 in {0, 1}, for eval.py; atomic), `sds.json` (one entry
    per category: config, timings, final mean per-sample SDS-gradient norm, occupancy), `sds.log`, and renders of the
    first batch's first `render_n` shapes every `render_every` steps (`renders/{category}_step_XXXXX.png`).
    Returns {category: summary}. Every checkpoint/flag error is raised before anything is written.
    """
    device = resolve_device(cfg.device)
    flush_denormals(device)
    pipe = LatentVoxelPipeline.from_checkpoints(cfg.ae_ckpt_path, cfg.ldm_ckpt_path, device=device,
                                                use_ema=cfg.use_ema, precision=cfg.precision)
    pipe.check_categories(cfg.categories)
    pipe.unet.requires_grad_(False)
    pipe.ae.requires_grad_(False)
    scale = pipe.guidance(cfg.use_cfg, cfg.cfg_scale)
    binarization = pipe.binarization(cfg.binarize, cfg.threshold, cfg.topk, cfg.resolution)
    if cfg.resolution < pipe.ae_resolution or cfg.resolution % pipe.ae_resolution:
        raise VoxdiffError(f"--resolution {cfg.resolution} is impossible: it must be a multiple of the AE's "
                           f"{pipe.ae_resolution}")
    if cfg.init == "ddim":
        pipe.make_scheduler("ddim", cfg.steps)  # the DDIM init's --steps refused here, before anything is written
    save_dir = Path(cfg.save_dir)
    with dir_lock(save_dir, "SDS job"):  # one writer per directory; leftovers of killed jobs are cleared
        log = get_logger("voxdiff.sds", save_dir / "sds.log")
        if not pipe.ae_matches:
            log.warning("AE checkpoint %s differs from the one the LDM was trained with", pipe.ae_file)
        return {category: _sds_category(cfg, category, pipe, scale, binarization, log, progress)
                for category in cfg.categories}


def _ddim_init(cfg: SDSConfig, category: str, pipe: LatentVoxelPipeline, scale: float) -> np.ndarray:
    """The DDIM (η = 0) samples SDS starts from with `init="ddim"`: normalised latents (num_samples, *latent_shape),
    from the pipeline's call with the job's seed and batch size, so batch b starts from batch b of `sample_to_files`'
    DDIM samples (the same per-batch seeds)."""
    return pipe(category, cfg.num_samples, sampler="ddim", steps=cfg.steps, eta=0.0, guidance=scale,
                guidance_rescale=cfg.guidance_rescale, clamp_latents=cfg.clamp_latents,
                binarize="threshold",  # latents only: SDS binarises its own latents at the end
                seed=cfg.seed, batch_size=cfg.batch_size, output="latents").latents


def _start_latents(pipe: LatentVoxelPipeline, generator: torch.Generator, n: int,
                   init: np.ndarray | None) -> torch.Tensor:
    """A batch's starting latents, a leaf that requires grad: x_T ~ N(0, I), or the DDIM samples `init` that start
    from this same draw. The draw is made either way, so the SDS steps after it draw the same t and ε after either
    init (DDIM with η = 0 draws nothing more)."""
    z0 = torch.randn((n, *pipe.latent_shape), generator=generator, device=pipe.device)
    if init is not None:
        z0 = torch.from_numpy(init).to(pipe.device)
    return z0.detach().clone().requires_grad_(True)


def _sds_step(cfg: SDSConfig, pipe: LatentVoxelPipeline, noise_scheduler: DDPMScheduler, z: torch.Tensor,
              labels: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator, scale: float,
              step: int, batch: int) -> torch.Tensor:
    """One SDS step on a batch: t ~ U[lo, hi] per sample then ε ~ N(0, I) (in that order, from `generator`), the SDS
    gradient (float32), refused when non-finite, applied through the surrogate loss by `optimizer`. Returns the
    gradient, for the norms `_sds_category` records."""
    device, n = pipe.device, len(z)
    lo, hi = timestep_range(cfg, pipe.scheduler_config.num_train_timesteps, step)
    t = torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
    noise = torch.randn(z.shape, generator=generator, device=device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, pipe.autocast_dtype):
        grad = sds_grad(pipe.unet, noise_scheduler, z, labels, t, noise, scale, cfg.weighting).float()
    if not torch.isfinite(grad).all():
        raise VoxdiffError(f"non-finite SDS gradient at step {step} of batch {batch}; check the checkpoints")
    sds_surrogate(z, grad).backward()
    optimizer.step()
    return grad


def _run_facts(cfg: SDSConfig, pipe: LatentVoxelPipeline, out: Path, scale: float,
               binarization: Binarization) -> dict[str, Any]:
    """The parts of a category's sds.json entry fixed before it runs (config, checkpoints, t range, guidance,
    binarisation, weighting), in the order the entry lists them."""
    num_train_timesteps = pipe.scheduler_config.num_train_timesteps
    return {
        "config": to_dict(cfg), "version": __version__, "device": str(pipe.device), "file": str(out),
        "ldm_ckpt": str(pipe.ldm_file), "ldm_step": pipe.ldm_step, "ae_ckpt": str(pipe.ae_file),
        "num_train_timesteps": num_train_timesteps, "t_range": list(timestep_range(cfg, num_train_timesteps)),
        "cfg_scale_effective": scale, "binarization": binarization.describe(),
        "weighting": "1 - alpha_bar_t (DreamFusion)" if cfg.weighting == "sds" else "1",
    }


def _sds_category(cfg: SDSConfig, category: str, pipe: LatentVoxelPipeline, scale: float,
                  binarization: Binarization, log: Any, progress: bool) -> dict[str, Any]:
    """SDS for one category: batches of latents optimised, decoded like diffusion/sample.py, written atomically."""
    t_start = time.perf_counter()
    device, save_dir = pipe.device, Path(cfg.save_dir)
    noise_scheduler = pipe.make_scheduler("ddpm")  # add_noise and ᾱ only
    num_train_timesteps = pipe.scheduler_config.num_train_timesteps
    class_id, side = category_index(category), cfg.resolution
    log.info("SDS %s: %d samples, %d steps, t in [%s, %s] of T=%d, w(t)=%s, guidance %s, init=%s", category,
             cfg.num_samples, cfg.num_steps, *timestep_range(cfg, num_train_timesteps), num_train_timesteps,
             cfg.weighting, scale, cfg.init)
    num_batches = -(-cfg.num_samples // cfg.batch_size)
    timing = {"init_s": 0.0, "optimise_s": 0.0, "decode_s": 0.0, "render_s": 0.0}
    step_norm = np.zeros(cfg.num_steps)  # mean per-sample ‖grad‖ at each step, averaged over batches
    final_norms: list[np.ndarray] = []
    occupied_sum, empty = 0.0, 0
    out = save_dir / f"{category}.npy"
    t0 = time.perf_counter()
    init_latents = _ddim_init(cfg, category, pipe, scale) if cfg.init == "ddim" else None
    timing["init_s"] += time.perf_counter() - t0
    bar = Progress(num_batches * cfg.num_steps, f"sds {category}", enabled=progress, log=log)
    with atomic_memmap(out, (cfg.num_samples, side, side, side), np.uint8) as samples:
        for batch in range(num_batches):
            start, end = batch * cfg.batch_size, min(cfg.num_samples, (batch + 1) * cfg.batch_size)
            generator = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, class_id, batch))
            labels = torch.full((end - start,), class_id, dtype=torch.long, device=device)
            t0 = time.perf_counter()  # 1. initial latents
            z = _start_latents(pipe, generator, end - start, None if init_latents is None else init_latents[start:end])
            optimizer = torch.optim.Adam([z], lr=cfg.lr)
            timing["init_s"] += time.perf_counter() - t0

            def render(z: torch.Tensor, labels: torch.Tensor, name: str, title: str) -> None:
                t0 = time.perf_counter()
                grids = pipe.to_grids(z[: cfg.render_n], labels[: cfg.render_n], binarization, side)
                _render(grids, save_dir / "renders" / f"{category}_step_{name}.png", title)
                timing["render_s"] += time.perf_counter() - t0

            render_here = batch == 0 and cfg.render_every is not None  # none: only the final decode
            if render_here:
                render(z, labels, "00000", "init")
            # 2. SDS steps: t ~ U[lo, hi] per sample, ε ~ N(0, I), surrogate loss -> Adam
            norms = torch.zeros(end - start)
            for i in range(cfg.num_steps):
                t0 = time.perf_counter()
                grad = _sds_step(cfg, pipe, noise_scheduler, z, labels, optimizer, generator, scale, i, batch)
                norms = grad.flatten(1).norm(dim=1).cpu()
                step_norm[i] += float(norms.mean()) * (end - start) / cfg.num_samples
                timing["optimise_s"] += time.perf_counter() - t0
                bar.update(1)
                if render_here and (i + 1) % cfg.render_every == 0:
                    render(z, labels, f"{i + 1:05d}", f"step {i + 1}")
            final_norms.append(norms.numpy())
            # 3. decode + binarise exactly like diffusion/sample.py, into the memmap
            t0 = time.perf_counter()
            grids = pipe.to_grids(z, labels, binarization, side)
            samples[start:end] = grids
            occupied = grids.reshape(len(grids), -1).sum(1)
            occupied_sum += float(occupied.sum())
            empty += int((occupied == 0).sum())
            timing["decode_s"] += time.perf_counter() - t0
            log.info("batch %d/%d: mean final grad norm %.4f, mean occupancy %.5f", batch + 1, num_batches,
                     float(norms.mean()) if cfg.num_steps else float("nan"), float(occupied.mean()) / side**3)
        bar.close()
    timing["total_s"] = time.perf_counter() - t_start
    final = float(np.concatenate(final_norms).mean()) if cfg.num_steps else None
    summary: dict[str, Any] = {
        **_run_facts(cfg, pipe, out, scale, binarization),
        "timings": timing, "s_per_step": timing["optimise_s"] / max(1, num_batches * cfg.num_steps),
        "final_grad_norm_mean": final, "grad_norm_per_step": [round(float(x), 6) for x in step_norm],
        "mean_occupancy": occupied_sum / cfg.num_samples / side**3, "empty": empty,
    }
    _write_summary(save_dir / "sds.json", category, summary, log)
    log.info("wrote %s %s in %.1fs", out, (cfg.num_samples, side, side, side), timing["total_s"])
    return summary
