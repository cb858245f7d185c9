"""The pipeline object that turns a trained LDM + AE into voxel grids (`LatentVoxelPipeline`), its output
(`VoxelPipelineOutput`), and what sampling jobs share: the per-batch seeds, the resolution of settings against the
model's stored ones, the plan of a job.

As a library (diffusers' pipelines are the model):

    pipe = LatentVoxelPipeline.from_pretrained("models/medium")     # an exported model, or a run directory
    out = pipe("chair", num_samples=16, seed=0)                      # out.grids: (16, R, R, R) bool

Every setting left unset takes the model's stored sampling settings (what its tune stage picked, `LDMMeta.sampling`),
else the library defaults (SampleConfig's). Step by step:

    z = pipe.sample_latents(labels, pipe.make_scheduler("ddim", 50), cfg_scale=1.0, generator=g)
    grids = pipe.to_grids(z, labels, pipe.binarization("threshold", 0.5), resolution=64)   # uint8 (B, 64, 64, 64)

Per-batch seeds make every batch a pure function of (settings, seed, category, batch index): `pipe(category, n,
seed=s)` returns exactly the shapes `sample_to_files` (voxdiff.sampling.writer) writes with seed s (same settings and
batch size; on a CPU, same thread count).

Imports voxdiff.sampling.guidance and the layers below (checkpoint, config, binarize, latents, models, precision,
schedulers, errors, files, logs, device); never the writer, and no plotting library.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from voxdiff import schedulers
from voxdiff.binarize import Binarization
from voxdiff.checkpoint import (
    SAMPLING_KEYS,
    AEMeta,
    LDMMeta,
    check_sampling,
    load_autoencoder,
    load_unet,
    resolve_checkpoint_file,
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
)
from voxdiff.device import flush_denormals, resolve_device
from voxdiff.errors import VoxdiffError
from voxdiff.files import file_sha256
from voxdiff.latents import denormalise
from voxdiff.logs import Progress
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.precision import PrecisionChoice, autocast, choose_precision, forward_probe
from voxdiff.sampling.guidance import sample_latents
from voxdiff.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["upsample_nearest", "batch_seed", "resolve_sampling", "SamplingPlan", "VoxelPipelineOutput",
           "LatentVoxelPipeline", "OutputKind", "OUTPUT_KINDS"]

OutputKind = Literal["grids", "probabilities", "latents"]
OUTPUT_KINDS: tuple[str, ...] = ("grids", "probabilities", "latents")


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
    autocast_dtype: torch.dtype | None = None  # the U-Net's forward runs under autocast to this dtype (None: fp32)
    precision: PrecisionChoice | None = None  # how `autocast_dtype` was chosen (from_checkpoints), for the records

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
                   ae_matches=matches, autocast_dtype=choice.dtype, precision=choice)

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

    def make_scheduler(self, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
                       clamp: bool = False) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of this LDM's noise process (None steps: all T for DDPM, 50 for DDIM). With `clamp`, every
        predicted latent is clipped to the training latents' range (the AE's `latent_absmax`, normalised units).

        A factory, not an attribute (diffusers' `pipe.scheduler` is one): each job gets its own scheduler, since
        `set_timesteps` and `set_clip` change it."""
        num_train_timesteps = self.scheduler_config.num_train_timesteps
        if steps is not None and steps > num_train_timesteps:
            raise VoxdiffError(f"--steps {steps} exceeds the {num_train_timesteps} training steps")
        scheduler = schedulers.make_scheduler(sampler, self.scheduler_config, steps, eta)
        if clamp and self.ae_meta.latent_absmax is not None:
            scheduler.set_clip(torch.as_tensor(self.ae_meta.latent_absmax))
        return scheduler

    def guidance(self, use_cfg: bool, cfg_scale: float) -> float:
        """The guidance scale w to sample with: `cfg_scale` with use_cfg, else 0 (plain conditional). Refuses guidance
        from an LDM trained without label dropout (it has no unconditional model)."""
        scale = float(cfg_scale) if use_cfg else 0.0
        if scale != 0 and self.ldm_meta is not None and not self.ldm_meta.use_cfg:
            raise VoxdiffError("this LDM was trained without label dropout, so it has no unconditional model: sample "
                               "it with --no_use_cfg")
        return scale

    def plan(self, cfg: SampleConfig) -> SamplingPlan:
        """The scheduler, guidance, binarisation and resolution of `cfg`'s settings, checked against this model (a
        VoxdiffError before any sampling when they do not fit it)."""
        scale = self.guidance(cfg.use_cfg, cfg.cfg_scale)
        scheduler = self.make_scheduler(cfg.sampler, cfg.steps, cfg.eta, clamp=cfg.clamp_latents)
        binarization = self.binarization(cfg.binarize, cfg.threshold, cfg.topk, cfg.resolution)
        if self.ae_resolution > cfg.resolution or cfg.resolution % self.ae_resolution:
            raise VoxdiffError(f"--resolution {cfg.resolution} is impossible: it must be a multiple of the AE's "
                               f"{self.ae_resolution}")
        return SamplingPlan(scheduler, scale, cfg.guidance_rescale if scale else 0.0, binarization, cfg.resolution)

    def category_batch(self, plan: SamplingPlan, seed: int, category: int, batch: int,
                       n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `batch` (n shapes) of the seeded stream of class `category`: its labels and normalised latents, a pure
        function of (plan, seed, category, batch, n). The unit `sample_to_files` and `__call__` both sample in."""
        generator = torch.Generator(device=self.device).manual_seed(batch_seed(seed, category, batch))
        labels = torch.full((n,), category, dtype=torch.long, device=self.device)
        return labels, self.sample_latents(labels, plan.scheduler, plan.scale, generator, rescale=plan.rescale)

    def check_categories(self, categories: Sequence[str]) -> None:
        trained = self.ldm_meta.categories if self.ldm_meta is not None else list(CATEGORIES)
        untrained = [c for c in categories if c not in trained]
        if untrained:
            raise VoxdiffError(f"LDM was not trained on {untrained} (trained on {list(trained)})")

    def sample_latents(self, labels: torch.Tensor, scheduler: DDPMScheduler | DDIMScheduler, cfg_scale: float = 0.0,
                       generator: torch.Generator | None = None, *, rescale: float = 0.0,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised latents (B, *latent_shape) of the classes `labels`, by the reverse process of `scheduler`: the
        module's `sample_latents` (same arguments, same order) with this pipeline's U-Net, its forward under autocast
        to `autocast_dtype`, the scheduler's arithmetic in fp32. cfg_scale w and `rescale` φ: see `guided_eps`."""
        with autocast(self.device, self.autocast_dtype):
            return sample_latents(self.unet, labels.to(self.device), scheduler, cfg_scale, generator, rescale=rescale,
                                  noise=noise, latent_shape=self.latent_shape)

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
        ae_resolution = self.ae_resolution
        out_resolution = resolution or ae_resolution
        voxels_per_ae_voxel = (out_resolution // ae_resolution) ** 3  # what nearest upsampling makes of one voxel
        if topk is not None:
            if topk > out_resolution**3 // 2:
                raise VoxdiffError(f"--topk {topk} would fill more than half of a {out_resolution}³ grid; give the "
                                   "number of occupied voxels a shape should have (the data hold a few percent)")
            return Binarization(topk=dict.fromkeys(range(len(CATEGORIES)), max(1, round(topk / voxels_per_ae_voxel))))
        per_category = self.ae_meta.occupancy.get(str(ae_resolution)) or {}
        missing = [c for c in CATEGORIES if c not in per_category]
        if missing:
            raise VoxdiffError(f"top-k: the AE checkpoint has no training occupancy at {ae_resolution}³ for {missing}; "
                               "pass --topk K")
        return Binarization(topk={category_index(c): max(1, round(float(k))) for c, k in per_category.items()})

    def to_grids(self, z: torch.Tensor, labels: torch.Tensor, binarization: Binarization,
                 resolution: int | None = None) -> np.ndarray:
        """Normalised latents -> uint8 grids (B, R, R, R) in {0, 1}: decode, binarise at the AE's resolution, then
        nearest-upsample to `resolution` (a multiple of the AE's; None keeps it)."""
        return self.binarize_probabilities(self.decode(z.detach()), labels, binarization, resolution)

    def binarize_probabilities(self, probabilities: torch.Tensor, labels: torch.Tensor, binarization: Binarization,
                               resolution: int | None = None) -> np.ndarray:
        """Occupancy probabilities (B, r, r, r) at the AE's resolution -> uint8 grids (B, R, R, R) in {0, 1}: the second
        half of `to_grids`, for a caller that decodes once and binarises several ways (the tuning's thresholds)."""
        ae_resolution = self.ae_resolution
        resolution = resolution or ae_resolution
        if resolution < ae_resolution or resolution % ae_resolution:
            raise VoxdiffError(f"resolution {resolution} is impossible: it must be a multiple of the AE's "
                               f"{ae_resolution}")
        grids = binarization(probabilities, labels)
        return upsample_nearest(grids.to(torch.uint8), resolution // ae_resolution).cpu().numpy()

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
        side = plan.resolution
        shape = (len(labels), *self.latent_shape) if output == "latents" else (len(labels), side, side, side)
        result = np.empty(shape, dtype=bool if output == "grids" else np.float32)
        bar = Progress(len(labels), "sample", unit="shape", enabled=progress)
        for rows, batch_labels, latents in self._batches(labels, plan, cfg.batch_size, seed, generator):
            if output == "grids":
                result[rows] = self.to_grids(latents, batch_labels, plan.binarization, side).astype(bool)
            elif output == "probabilities":
                probabilities = self.decode(latents)
                result[rows] = upsample_nearest(probabilities, side // self.ae_resolution).float().cpu().numpy()
            else:
                result[rows] = latents.float().cpu().numpy()
            bar.update(len(rows))
        bar.close()
        settings = {**{k: getattr(cfg, k) for k in SAMPLING_KEYS}, "steps": len(plan.scheduler.timesteps),
                    "cfg_scale": plan.scale, "guidance_rescale": plan.rescale, "resolution": side,
                    "batch_size": cfg.batch_size, "seed": seed if generator is None else None}
        return VoxelPipelineOutput(labels=labels, settings=settings, sources=sources, **{output: result})

    def _batches(self, labels: np.ndarray, plan: SamplingPlan, batch_size: int, seed: int | None,
                 generator: torch.Generator | None) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(rows, labels, latents) per batch of `__call__`: each category's seeded stream (`category_batch`), or the
        labels in order drawing from `generator`."""
        if generator is not None:
            for start in range(0, len(labels), batch_size):
                rows = np.arange(start, min(len(labels), start + batch_size))
                batch_labels = torch.as_tensor(labels[rows], device=self.device)
                yield rows, batch_labels, self.sample_latents(batch_labels, plan.scheduler, plan.scale, generator,
                                                              rescale=plan.rescale)
            return
        assert seed is not None
        for class_id in sorted(set(labels.tolist())):
            where = np.flatnonzero(labels == class_id)
            for batch, start in enumerate(range(0, len(where), batch_size)):
                rows = where[start : start + batch_size]
                batch_labels, latents = self.category_batch(plan, seed, class_id, batch, len(rows))
                yield rows, batch_labels, latents


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

