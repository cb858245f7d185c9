"""Sampling: classifier-free guidance in one batched forward, the reverse-diffusion loop, and the pipeline object that
turns a trained LDM + AE into voxel grids (`LatentVoxelPipeline`), used by sampling-to-files, SDS, the tuning, the
trainer's preview and the main pipeline alike.

As a library (diffusers' pipelines are the model):

    pipe = LatentVoxelPipeline.from_pretrained("models/medium")     # an exported model, or a run directory
    out = pipe("chair", num_samples=16, seed=0)                      # out.grids: (16, R, R, R) bool

Every setting left unset takes the model's stored sampling settings (what its tune stage picked, `LDMMeta.sampling`),
else the library defaults (SampleConfig's). Step by step:

    z = pipe.sample_latents(labels, pipe.scheduler("ddim", 50), cfg_scale=1.0, generator=g)
    grids = pipe.to_grids(z, labels, pipe.binarization("threshold", 0.5), resolution=64)   # uint8 (B, 64, 64, 64)

The network and the scheduler are arguments of the loop: nothing here builds or knows a noise process. Per-batch seeds
make every batch a pure function of (settings, seed, category, batch index): an interrupted `sample_to_files` job that
is rerun writes exactly the arrays an uninterrupted one would, and `pipe(category, n, seed=s)` returns exactly the
shapes `sample_to_files` writes with seed s (same settings and batch size; on a CPU, same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from voxdiff import __version__
from voxdiff.binarize import Binarization
from voxdiff.checkpoint import (
    SAMPLING_KEYS,
    AEMeta,
    LDMMeta,
    check_sampling,
    load_autoencoder,
    load_unet,
    resolve_checkpoint_file,
    unwrap,
)
from voxdiff.config import (
    ACTS_ONLY_WITH,
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
    resolve_device,
)

__all__ = ["guided_eps", "sample_latents", "upsample_nearest", "batch_seed", "resolve_sampling", "SamplingPlan",
           "VoxelPipelineOutput", "LatentVoxelPipeline", "sample_to_files"]

OutputKind = Literal["grids", "probabilities", "latents"]
OUTPUT_KINDS: tuple[str, ...] = ("grids", "probabilities", "latents")


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


def resolve_sampling(cfg: SampleConfig, stored: Mapping[str, Any],
                     unset: Collection[str] = ()) -> tuple[SampleConfig, dict[str, str]]:
    """`cfg` with each setting named in `unset` (of SAMPLING_KEYS) taken from the model's stored sampling settings
    where it has one (else cfg's value is kept: the library default), and where each of SAMPLING_KEYS came from:
    "given" (set by the caller), "model" or "default".

    The model's steps and eta go with its sampler: they are not taken when another sampler is used. A given setting
    that acts only with another one's value (config.ACTS_ONLY_WITH: threshold with binarize "threshold") is refused
    when the model's stored value of that other setting says otherwise, instead of being silently ignored.
    """
    unknown = sorted(set(unset) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"not sampling settings: {unknown}; known: {', '.join(SAMPLING_KEYS)}")
    sampler = stored.get("sampler", cfg.sampler) if "sampler" in unset else cfg.sampler
    stored_sampler = stored.get("sampler", SampleConfig.sampler)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in SAMPLING_KEYS:
        if key not in unset:
            sources[key] = "given"
        elif key in stored and (key not in ("steps", "eta") or stored_sampler == sampler):
            values[key], sources[key] = stored[key], "model"
        else:
            sources[key] = "default"
    try:
        out = dataclasses.replace(cfg, **values)
    except (TypeError, ValueError) as e:
        raise VoxdiffError(f"the model's stored sampling settings are unusable ({e})") from None
    for key, (other, needed) in ACTS_ONLY_WITH.items():
        if sources.get(key) == "given" and sources.get(other) == "model" and getattr(out, other) != needed:
            raise VoxdiffError(f"{key} acts only with {other} {needed!r}, but the model's stored {other} is "
                               f"{getattr(out, other)!r}: set {other} {needed!r} too, or leave {key} unset")
    return out, sources


@dataclass
class SamplingPlan:
    """What every batch of one sampling job shares, made once from its settings (`LatentVoxelPipeline.plan`): the
    scheduler, the guidance scale w and rescale φ in effect, the binarisation and the output resolution."""

    scheduler: DDPMScheduler | DDIMScheduler
    scale: float
    rescale: float
    binarization: Binarization
    resolution: int


@dataclass
class VoxelPipelineOutput:
    """What `LatentVoxelPipeline.__call__` returns: one of grids / probabilities / latents (the `output` asked for; the
    others None), as numpy arrays on the CPU, row i of the class `labels[i]`.

    grids: (N, R, R, R) bool, occupied voxels. probabilities: (N, R, R, R) float32, the decoder's occupancy
    probabilities (nearest-upsampled to R like the grids). latents: (N, *latent_shape) float32, normalised latents
    (`pipe.decode` takes them back). `settings`: the values used (`steps` the number of denoising steps run, `cfg_scale`
    the guidance scale w in effect, `seed` None when a generator was given); `sources`: where each stored-able setting
    came from, "given", "model" (the model's stored settings) or "default".
    """

    labels: np.ndarray
    settings: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    grids: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    latents: np.ndarray | None = None


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

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, device: Any = None, precision: Precision = "auto",
                        use_ema: bool = True) -> LatentVoxelPipeline:
        """Load a model for sampling: a directory holding `ae.pt` and `ldm.pt` (an exported model, `export_model`,
        like models/medium) or a run directory holding `ae/` and `ldm/` (each's best.pt, else last.pt).

        `device`: None picks CUDA when available, else the CPU. `precision`: the U-Net's autocast dtype; "auto" uses
        bf16 only where a start-up check against fp32 passes on this machine (see `from_checkpoints`).
        """
        root = Path(path)
        if (root / "ae.pt").is_file() and (root / "ldm.pt").is_file():
            ae, ldm = root / "ae.pt", root / "ldm.pt"
        elif (root / "ae").is_dir() and (root / "ldm").is_dir():
            ae, ldm = root / "ae", root / "ldm"
        elif not root.exists():
            raise VoxdiffError(f"model not found: {root}")
        else:
            raise VoxdiffError(f"{root} is not a voxdiff model: expected ae.pt and ldm.pt (an exported model) or ae/ "
                               "and ldm/ (a run directory)")
        return cls.from_checkpoints(ae, ldm, device=resolve_device(device), use_ema=use_ema, precision=precision)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.ae.latent_shape

    @property
    def ae_resolution(self) -> int:
        return self.ae.cfg.resolution

    @property
    def stored_sampling(self) -> dict[str, Any]:
        """The sampling settings stored with the LDM (what its tune stage picked; {} when none). Keys this version
        does not know are left out; a stored value it cannot use is a VoxdiffError naming the file."""
        stored = self.ldm_meta.sampling if self.ldm_meta is not None else {}
        if not isinstance(stored, dict):
            raise VoxdiffError(f"{self.ldm_file}: its stored sampling settings are unreadable ({stored!r})")
        try:
            return check_sampling({k: v for k, v in stored.items() if k in SAMPLING_KEYS})
        except (TypeError, ValueError) as e:
            raise VoxdiffError(f"{self.ldm_file}: its stored sampling settings are unusable ({e})") from None

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

    def plan(self, cfg: SampleConfig) -> SamplingPlan:
        """The scheduler, guidance, binarisation and resolution of `cfg`'s settings, checked against this model (a
        VoxdiffError before any sampling when they do not fit it)."""
        scale = self.guidance(cfg.use_cfg, cfg.cfg_scale)
        scheduler = self.scheduler(cfg.sampler, cfg.steps, cfg.eta, clamp=cfg.clamp_latents)
        binarization = self.binarization(cfg.binarize, cfg.threshold, cfg.topk, cfg.resolution)
        R = cfg.resolution
        if self.ae_resolution > R or R % self.ae_resolution:
            raise VoxdiffError(f"--resolution {R} is impossible: it must be a multiple of the AE's "
                               f"{self.ae_resolution}")
        return SamplingPlan(scheduler, scale, cfg.guidance_rescale if scale else 0.0, binarization, R)

    def category_batch(self, plan: SamplingPlan, seed: int, category: int, batch: int,
                       n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `batch` (n shapes) of the seeded stream of class `category`: its labels and normalised latents, a pure
        function of (plan, seed, category, batch, n). The unit `sample_to_files` and `__call__` both sample in."""
        gen = torch.Generator(device=self.device).manual_seed(batch_seed(seed, category, batch))
        labels = torch.full((n,), category, dtype=torch.long, device=self.device)
        return labels, self.sample_latents(labels, plan.scheduler, plan.scale, gen, rescale=plan.rescale)

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

    @torch.no_grad()
    def __call__(
        self,
        category_or_labels: str | Sequence[str] | Sequence[int] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_rescale: float | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        clamp_latents: bool | None = None,
        binarize: BinarizeMode | None = None,
        threshold: float | None = None,
        topk: int | None = None,
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output: OutputKind = "grids",
        batch_size: int | None = None,
        progress: bool = False,
    ) -> VoxelPipelineOutput:
        """Sample shapes: `num_samples` (default 1) of each entry of `category_or_labels` (a category name or class
        index, or a sequence / array / tensor of them), entries in order, each repeated `num_samples` times.

        Every setting left None takes the model's stored sampling settings, else the library defaults (SampleConfig's;
        `resolution` the AE's, `batch_size` 100). `guidance` is w in ε̂ = (1 + w)·ε_c − w·ε_u (0: the plain
        conditional model; for an LDM trained without label dropout the default is 0). `output`: "grids" (bool),
        "probabilities" or "latents" (see VoxelPipelineOutput).

        Randomness: with `seed`, each category's shapes come in batches of `batch_size` seeded by
        `batch_seed(seed, category, batch)`, exactly as `sample_to_files` writes them (`pipe("chair", 100, seed=0)` is
        diffusion/sample.py's chair.npy with --seed 0 at the same settings), and the k-th chair of a call does not
        depend on the other categories asked for. With `generator`, the batches follow the labels in order and draw
        from it. With neither, a seed is drawn from torch's global generator (recorded in `settings`).
        """
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {', '.join(OUTPUT_KINDS)}; got {output!r}")
        if generator is not None and seed is not None:
            raise ValueError("give a generator or a seed, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
        labels = _labels(category_or_labels, num_samples)
        self.check_categories([CATEGORIES[c] for c in sorted(set(labels.tolist()))])
        given = {k: v for k, v in {"sampler": sampler, "steps": steps, "eta": eta, "cfg_scale": guidance,
                                   "guidance_rescale": guidance_rescale, "clamp_latents": clamp_latents,
                                   "binarize": binarize, "threshold": threshold, "topk": topk}.items() if v is not None}
        if generator is None and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        base = SampleConfig(**given, resolution=self.ae_resolution if resolution is None else resolution,
                            batch_size=SampleConfig.batch_size if batch_size is None else batch_size,
                            seed=0 if seed is None else seed)
        cfg, sources = resolve_sampling(base, self.stored_sampling, [k for k in SAMPLING_KEYS if k not in given])
        if self.ldm_meta is not None and not self.ldm_meta.use_cfg and sources["cfg_scale"] != "given":
            cfg = dataclasses.replace(cfg, use_cfg=False)  # no unconditional model: plain conditional by default
        plan = self.plan(cfg)
        flush_denormals(self.device)  # as sample_to_files computes
        R, bs, n = plan.resolution, cfg.batch_size, len(labels)
        shape = (n, *self.latent_shape) if output == "latents" else (n, R, R, R)
        result = np.empty(shape, dtype=bool if output == "grids" else np.float32)
        bar = Progress(n, "sample", unit="shape", enabled=progress)
        for rows, y, z in self._batches(labels, plan, bs, seed, generator):
            if output == "grids":
                result[rows] = self.to_grids(z, y, plan.binarization, R).astype(bool)
            elif output == "probabilities":
                result[rows] = upsample_nearest(self.decode(z), R // self.ae_resolution).float().cpu().numpy()
            else:
                result[rows] = z.float().cpu().numpy()
            bar.update(len(rows))
        bar.close()
        settings = {**{k: getattr(cfg, k) for k in SAMPLING_KEYS}, "steps": len(plan.scheduler.timesteps),
                    "cfg_scale": plan.scale, "guidance_rescale": plan.rescale, "resolution": R, "batch_size": bs,
                    "seed": seed if generator is None else None}
        return VoxelPipelineOutput(labels=labels, settings=settings, sources=sources, **{output: result})

    def _batches(self, labels: np.ndarray, plan: SamplingPlan, batch_size: int, seed: int | None,
                 generator: torch.Generator | None) -> Any:
        """(rows, labels, latents) per batch of `__call__`: each category's seeded stream (`category_batch`), or the
        labels in order drawing from `generator`."""
        if generator is not None:
            for s in range(0, len(labels), batch_size):
                rows = np.arange(s, min(len(labels), s + batch_size))
                y = torch.as_tensor(labels[rows], device=self.device)
                yield rows, y, self.sample_latents(y, plan.scheduler, plan.scale, generator, rescale=plan.rescale)
            return
        assert seed is not None
        for c in sorted(set(labels.tolist())):
            where = np.flatnonzero(labels == c)
            for b, s in enumerate(range(0, len(where), batch_size)):
                rows = where[s : s + batch_size]
                y, z = self.category_batch(plan, seed, c, b, len(rows))
                yield rows, y, z


def _labels(category_or_labels: Any, num_samples: int | None) -> np.ndarray:
    """Class indices (N,) int64 of `__call__`'s request: each entry (a category name or an index) `num_samples`
    times. A ValueError names what is wrong (an unknown category, an index out of range, nothing asked for)."""
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be an integer >= 1; got {num_samples!r}")
    one = isinstance(category_or_labels, (str, int, np.integer)) and not isinstance(category_or_labels, bool)
    entries = [category_or_labels] if one else category_or_labels
    if isinstance(entries, torch.Tensor):
        entries = entries.detach().cpu().numpy()
    entries = list(np.asarray(entries).reshape(-1)) if isinstance(entries, np.ndarray) else list(entries)
    if not entries:
        raise ValueError("no category or label given")
    out = []
    for e in entries:
        if isinstance(e, str):
            out.append(category_index(e))
        elif isinstance(e, (int, np.integer)) and not isinstance(e, bool) and 0 <= int(e) < len(CATEGORIES):
            out.append(int(e))
        else:
            raise ValueError(f"label {e!r} is neither a category ({', '.join(CATEGORIES)}) nor a class index "
                             f"0..{len(CATEGORIES) - 1}")
    return np.repeat(np.asarray(out, dtype=np.int64), num_samples or 1)


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


def sample_to_files(cfg: SampleConfig, progress: bool = True, max_batches: int | None = None, *,
                    unset: Collection[str] = ()) -> dict[str, Any]:
    """Sample `cfg.num_samples` shapes per category into `{save_dir}/{category}.npy`: (N, R, R, R) uint8 in {0, 1}.

    `unset` names the sampling settings (SAMPLING_KEYS) the caller left open: each takes the LDM's stored setting
    where it has one, else cfg's value (the library default); see `resolve_sampling`. The others are cfg's as given.

    Resumable: batches go into `.{category}.partial.npy` (a memmap) with `.{category}.progress.json` (the run's key
    and finished batches); a rerun with the same settings skips finished batches and categories, and the final file
    appears by rename only when complete. `max_batches` stops after that many new batches (a time-sliced run).
    Writes `{save_dir}/sample.json` (config, checkpoints, timings, occupancy, and `settings`: each sampling setting's
    value and where it came from, "given", "model" or "default") and `sample.log`; returns that summary.
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
    cfg, sources = resolve_sampling(cfg, pipe.stored_sampling, unset)
    plan = pipe.plan(cfg)
    save_dir = Path(cfg.save_dir)
    probe = _unet_probe(pipe.unet, pipe.latent_shape, cfg.batch_size * (1 + (plan.scale != 0)))  # a guided batch
    threads = choose_threads(cfg.threads, lambda: probe(pipe.amp), device)
    with contextlib.ExitStack() as stack:
        with together():  # a lock refused on rank 0 stops every rank here, none waits in a later collective
            if info.is_main:  # one sampling job per directory; leftovers of killed jobs are cleared
                stack.enter_context(dir_lock(save_dir, "sampling job"))
        return _sample_all(cfg, pipe, plan, sources, info, progress, max_batches, threads)


def _sample_all(cfg: SampleConfig, pipe: LatentVoxelPipeline, plan: SamplingPlan, sources: dict[str, str],
                info: Any, progress: bool, max_batches: int | None, threads: ThreadChoice) -> dict[str, Any]:
    """The body of `sample_to_files`, with the save directory locked."""
    save_dir, device = Path(cfg.save_dir), pipe.device
    log = get_logger("voxdiff.sample", save_dir / "sample.log" if info.is_main else None)
    precision = pipe.precision or PrecisionChoice(cfg.precision, pipe.amp, "set by the caller")
    log.info("precision %s: %s", precision.name, precision.reason)
    log.info("threads %d: %s", threads.threads, threads.reason)
    watch = BusyWatch(threads, "sampling", steps_per_probe_step=len(plan.scheduler.timesteps))
    if not pipe.ae_matches:
        log.warning("AE checkpoint %s differs from the one the LDM was trained with (%s)", pipe.ae_file,
                    pipe.ldm_meta.ae_file if pipe.ldm_meta else "?")
    nb = -(-cfg.num_samples // cfg.batch_size)
    summary: dict[str, Any] = {"config": to_dict(cfg), "version": __version__, "device": str(device),
                               "ldm_ckpt": str(pipe.ldm_file), "ldm_step": pipe.ldm_step, "ae_ckpt": str(pipe.ae_file),
                               "settings": {k: {"value": getattr(cfg, k), "from": sources[k]} for k in SAMPLING_KEYS},
                               "cfg_scale_effective": plan.scale, "binarization": plan.binarization.describe(),
                               "timesteps": len(plan.scheduler.timesteps), "categories": {}, "complete": True,
                               "runtime": {"precision": precision.record(), "threads": threads.record()}}
    if info.distributed:
        summary["world_size"] = info.world_size
    budget = max_batches
    for cat in cfg.categories:
        result = _sample_category(cfg, cat, pipe, plan, info, log, progress, nb, budget, watch)
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


def _sample_category(cfg: SampleConfig, cat: str, pipe: LatentVoxelPipeline, plan: SamplingPlan, info: Any,
                     log: logging.Logger, progress: bool, nb: int, budget: int | None,
                     watch: BusyWatch) -> tuple[dict[str, Any], int] | None:
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
            labels, z = pipe.category_batch(plan, cfg.seed, c, b, e - s)
            grids = pipe.to_grids(z, labels, plan.binarization, R)
            arr[s:e] = grids
            arr.flush()
            note = watch.update(len(plan.scheduler.timesteps))
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
