"""Configuration dataclasses and named presets. Standard library only (a leaf module).

Every stage is a library function taking one of these objects; the CLIs build them from flags and the pipeline builds
them from a preset, so both run the same code.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# ShapeNet PartSeg label ids of the three categories this project models.
PARTSEG_LABELS: dict[str, int] = {"airplane": 0, "chair": 4, "table": 15}
# Model class index = position in this tuple; the null (unconditional) class for CFG is len(CATEGORIES).
CATEGORIES: tuple[str, ...] = ("airplane", "chair", "table")
SPLITS: tuple[str, ...] = ("train", "val", "test")

AELoss = Literal["bce", "weighted_bce", "dice", "bce_dice", "focal"]
AEBlock = Literal["seed", "resnet"]
AENorm = Literal["batch", "group"]
AEUpsample = Literal["transpose", "nearest"]
BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing"]
SamplerName = Literal["ddpm", "ddim"]
Precision = Literal["auto", "fp32", "bf16"]
BinarizeMode = Literal["threshold", "calibrated", "topk"]
SDSWeighting = Literal["sds", "uniform"]
SDSInit = Literal["noise", "ddim"]
LRSchedule = Literal["constant", "cosine"]


def check_literal(value: Any, lit: Any, name: str) -> None:
    """Raise ValueError listing the valid values when `value` is not one of the Literal `lit`."""
    valid = get_args(lit)
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(str, valid))}; got {value!r}")


def check_threads(value: Any) -> None:
    """Raise ValueError unless `value` is "auto" or a whole number >= 1 (as text, the way flags and JSON carry it)."""
    if value != "auto" and not (isinstance(value, str) and value.isdigit() and int(value) >= 1):
        raise ValueError(f"threads must be auto or a whole number >= 1; got {value!r}")


def category_index(name: str) -> int:
    """Model class index of a category name, with a clear error for unknown names."""
    if name not in CATEGORIES:
        raise ValueError(f"unknown category {name!r}; choose from {', '.join(CATEGORIES)}")
    return CATEGORIES.index(name)


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, optional: bool = False) -> None:
    """Raise ValueError unless `value` is a finite number in [lo, hi] (open ends with lo_open / hi_open); None passes
    when `optional`. Every numeric setting is checked before any work starts."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (_INF, -_INF):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}; got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}; got {value}")


_INF = float("inf")


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able dict of a (nested) config dataclass (tuples stay tuples; JSON writes them as lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output (or its JSON); unknown keys raise a clear error.

    Nested configs and tuples are recognised from the field annotations, so a new nested config needs no table.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif isinstance(value, list) and typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


@dataclass
class AEConfig:
    """3D conv autoencoder: (B,1,R,R,R) -> (B,latent_channels,r,r,r), r = R / 2^len(channels) -> back.

    The defaults are the network of the course's starter code ("seed": three stride-2 stages at 64³ -> 16×8³,
    BatchNorm, transposed convolutions).
    """

    resolution: int = 64  # input grid side (a power of two)
    channels: tuple[int, ...] = (12, 24, 48)  # width of each stride-2 stage; their number sets the latent side
    latent_channels: int = 16
    negative_slope: float = 0.2  # LeakyReLU slope
    block: AEBlock = "seed"  # seed: the starter code's conv stack; resnet: a residual block at every resolution
    norm: AENorm = "batch"  # batch: BatchNorm3d (starter code); group: GroupNorm (batch-size independent)
    upsample: AEUpsample = "transpose"  # transpose: ConvTranspose3d (starter code); nearest: nearest upsample + conv
    variational: bool = False  # the encoder predicts a mean and a log-variance (AutoencoderKL); the latent is the mean

    def __post_init__(self) -> None:
        check_literal(self.block, AEBlock, "block")
        check_literal(self.norm, AENorm, "norm")
        check_literal(self.upsample, AEUpsample, "upsample")
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"AE resolution must be a power of two >= 8; got {self.resolution}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"AE channels must be one or more positive widths; got {self.channels}")
        if self.resolution >> len(self.channels) < 1:
            raise ValueError(f"{len(self.channels)} stride-2 stages are too many for {self.resolution}³ input")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1; got {self.latent_channels}")

    @property
    def latent_resolution(self) -> int:
        return self.resolution >> len(self.channels)


@dataclass
class UNetConfig:
    """UNet3D over the latent. Defaults are the starter code's size (ch 192, mult 1,2,2, attention at level 1, 3 res
    blocks): the "seed" preset."""

    in_channels: int = 16  # latent channels (set from the AE)
    ch: int = 192  # base width
    ch_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level (one stride-2 step between levels)
    num_res_blocks: int = 3  # residual blocks per level
    attn_levels: tuple[int, ...] = (1,)  # levels with self-attention after each block
    dropout: float = 0.1  # residual-block dropout
    num_classes: int = len(CATEGORIES)  # class labels (+1 null class for guidance)
    num_groups: int = 32  # GroupNorm groups
    num_heads: int = 4  # attention heads

    def __post_init__(self) -> None:
        levels = len(self.ch_mult)
        if levels < 1 or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"UNet ch_mult must be positive integers; got {self.ch_mult}")
        bad = [a for a in self.attn_levels if not 0 <= a < levels]
        if bad:
            raise ValueError(f"UNet attn_levels {bad} out of range for {levels} levels (0..{levels - 1})")
        for name in ("in_channels", "ch", "num_res_blocks", "num_classes", "num_groups", "num_heads"):
            check_range(name, getattr(self, name), lo=1)
        check_range("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        for m in self.ch_mult:
            c = self.ch * m
            if c % self.num_groups or c % self.num_heads:
                raise ValueError(f"UNet width {c} must be divisible by num_groups={self.num_groups} and "
                                 f"num_heads={self.num_heads}")

    @property
    def downsample_factor(self) -> int:
        """The latent's side must be a multiple of this (one stride-2 step between consecutive levels)."""
        return 2 ** (len(self.ch_mult) - 1)


# Named U-Net sizes (the dict doubles as argparse `choices`). "seed" is the network of the course's starter code (the
# "seed" this project grew from); "small" is for CPU runs and tests.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "small": {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_levels": (2,), "num_groups": 8,
              "num_heads": 2},
}


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """UNetConfig of a named preset (see UNET_PRESETS), with optional field overrides."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose from {', '.join(UNET_PRESETS)}")
    return UNetConfig(**{**UNET_PRESETS[name], **overrides})


@dataclass
class SchedulerConfig:
    """DDPM noise schedule (Ho et al. 2020): linear betas 1e-4 -> 0.02 over T = 1000 steps, epsilon prediction."""

    num_train_timesteps: int = 1000  # diffusion steps T
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"  # linear (DDPM), scaled_linear (linear in √β: Stable Diffusion) or cosine
    # (Nichol & Dhariwal 2021)
    prediction_type: PredictionType = "epsilon"  # the network predicts the noise ε, or v = √ᾱ·ε − √(1−ᾱ)·x_0
    # (Salimans & Ho 2022)
    timestep_spacing: TimestepSpacing = "leading"  # inference timesteps: leading (T−k, ..., 0; DDIM's) or trailing
    # (T−1, ..., k−1: sampling starts at the last trained step; Lin et al. 2024)
    rescale_betas_zero_snr: bool = False  # rescale the schedule so ᾱ_T = 0: the last step is pure noise, as sampling
    # assumes (Lin et al. 2024; needs v_prediction)

    def __post_init__(self) -> None:
        check_literal(self.beta_schedule, BetaSchedule, "beta_schedule")
        check_literal(self.prediction_type, PredictionType, "prediction_type")
        check_literal(self.timestep_spacing, TimestepSpacing, "timestep_spacing")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError("rescale_betas_zero_snr needs prediction_type v_prediction (ε is undefined at SNR 0)")
        check_range("num_train_timesteps", self.num_train_timesteps, lo=2)
        check_range("beta_start", self.beta_start, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_range("beta_end", self.beta_end, lo=self.beta_start, hi=1.0, hi_open=True)


@dataclass
class TrainConfig:
    """What every training run has: data, run directory, length, optimiser, precision, device, seed and resume.

    The length is `num_steps` optimizer steps, or `num_epochs` passes over the training set when num_steps is none;
    `max_minutes` is only a safety cap, and a run it stops says so.
    """

    dataset_path: str = "data/hdf5_data"  # directory of {category}_voxels_{split}.npy
    ckpt_path: str = "checkpoints/run"  # run directory: last.pt, best.pt, train.log, log.csv/png
    categories: tuple[str, ...] = CATEGORIES
    batch_size: int = 64  # global batch (split across ranks under torchrun)
    lr: float = 1e-3
    num_steps: int | None = None  # optimizer steps; none: num_epochs passes over the training set
    num_epochs: int | None = 50  # passes over the training set when num_steps is none
    max_minutes: float | None = None  # safety cap on wall time (the run says so when it stops there); none: no cap
    grad_clip: float = 1.0  # max gradient norm (0: off)
    weight_decay: float = 0.0
    precision: Precision = "auto"  # autocast dtype of training forwards; auto: bf16 only where a start-up check of
    # this network's forward and backward against fp32 passes on this machine, else fp32
    threads: str = "auto"  # CPU intra-op threads; auto: timed at start-up on this network (1, 2, 4 ... cores)
    max_bad_steps: int = 10  # steps in a row with a non-finite or absurd loss or gradient before the run stops
    # (each such step is skipped: parameters, optimizer and EMA unchanged)
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    seed: int = 0
    resume: bool = False  # continue exactly from {ckpt_path}/last.pt
    overwrite: bool = False  # replace an existing run in ckpt_path (without it, an existing checkpoint is refused)
    log_every: int = 10  # steps between loss rows in log.csv
    ckpt_every: int = 500  # steps between held-out validation, last.pt and best.pt

    def __post_init__(self) -> None:
        for c in self.categories:
            category_index(c)
        check_literal(self.precision, Precision, "precision")
        check_threads(self.threads)
        check_range("max_bad_steps", self.max_bad_steps, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0.0, lo_open=True)
        check_range("num_steps", self.num_steps, lo=1, optional=True)
        check_range("num_epochs", self.num_epochs, lo=1, optional=True)
        check_range("max_minutes", self.max_minutes, lo=0.0, lo_open=True, optional=True)
        check_range("grad_clip", self.grad_clip, lo=0.0)
        check_range("weight_decay", self.weight_decay, lo=0.0)
        check_range("log_every", self.log_every, lo=1)
        check_range("ckpt_every", self.ckpt_every, lo=1)
        if self.num_steps is None and self.num_epochs is None:
            raise ValueError("give a training length: num_steps or num_epochs")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in optimizer steps."""
        return self.num_steps if self.num_steps is not None else int(self.num_epochs) * steps_per_epoch


@dataclass
class AETrainConfig(TrainConfig):
    """Autoencoder training run (`autoencoder.py`, `voxdiff.training.train_autoencoder`)."""

    ckpt_path: str = "checkpoints/ae"  # run directory: last.pt, best.pt, train.log, log.csv/png
    loss: AELoss = "bce"  # reconstruction loss (voxdiff/losses.py); bce gives the data's thickness at p > 0.5
    pos_weight: float | None = None  # weighted_bce's occupied-voxel weight; none: (1 - p) / p of the training data
    latent_noise: float = 0.0  # σ: decode latents + σ·(batch std)·ε in training, a decoder robust to imperfect latents
    kl_weight: float = 0.0  # weight of the KL term to N(0, I) per latent number (needs model.variational; Stable
    # Diffusion's AutoencoderKL uses about 1e-6 of a sum over pixels)
    holdout_fraction: float = 0.05  # per category, held out of TRAIN for best.pt and threshold calibration
    holdout_max: int = 100  # at most this many held-out shapes per category
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (full-global-batch statistics; CUDA only)
    model: AEConfig = field(default_factory=AEConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self.loss, AELoss, "loss")
        check_range("pos_weight", self.pos_weight, lo=0.0, lo_open=True, optional=True)
        check_range("latent_noise", self.latent_noise, lo=0.0, hi=10.0)
        check_range("kl_weight", self.kl_weight, lo=0.0)
        if self.kl_weight > 0 and not self.model.variational:
            raise ValueError("kl_weight needs a variational AE (model.variational)")
        check_range("holdout_fraction", self.holdout_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_range("holdout_max", self.holdout_max, lo=1)


@dataclass
class LDMTrainConfig(TrainConfig):
    """Latent diffusion training run (`diffusion/train.py`, `voxdiff.training.train_ldm`)."""

    ckpt_path: str = "checkpoints/ldm"  # run directory: last.pt, best.pt, train.log, log.csv/png, previews
    batch_size: int = 16  # global batch (split across ranks under torchrun)
    lr: float = 2e-4
    num_steps: int | None = 10000  # optimizer steps; none: num_epochs passes over the training latents
    num_epochs: int | None = None  # passes over the training latents when num_steps is none
    ae_ckpt_path: str = "checkpoints/ae"  # trained AE checkpoint file or run directory
    use_cfg: bool = True  # train with label dropout, so classifier-free guidance can be used when sampling
    cfg_dropout: float = 0.1  # label dropout probability (with use_cfg)
    warmup_steps: int = 500  # linear LR warmup
    lr_schedule: LRSchedule = "constant"  # after warmup: constant, or cosine decay to lr/10
    ema_decay: float = 0.999
    snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al. 2023; 5 in the paper); none: plain MSE
    keep_steps: tuple[int, ...] = ()  # also keep the checkpoint of these steps as step{N}.pt (a learning curve)
    preview: bool = True  # render 2 samples per category at the end (and every preview_every steps)
    preview_every: int | None = None  # steps between preview renders; none: only at the end
    preview_threshold: float = 0.5  # previews binarise as p > this (the pipeline sets its sampling threshold)
    latent_cache_dir: str | None = None  # none: latents/ beside the AE checkpoint
    model: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("cfg_dropout", self.cfg_dropout, lo=0.0, hi=1.0, hi_open=True)
        check_range("warmup_steps", self.warmup_steps, lo=0)
        check_literal(self.lr_schedule, LRSchedule, "lr_schedule")
        check_range("ema_decay", self.ema_decay, lo=0.0, hi=1.0, hi_open=True)
        check_range("snr_gamma", self.snr_gamma, lo=0.0, lo_open=True, optional=True)
        for k in self.keep_steps:
            check_range("keep_steps", k, lo=1)
        check_range("preview_every", self.preview_every, lo=1, optional=True)
        check_range("preview_threshold", self.preview_threshold, lo=0.0, hi=1.0, hi_open=True)


@dataclass
class GenerateConfig:
    """What sampling and SDS share: the checkpoints, where the files go, how many shapes, guidance, output resolution
    and binarisation (decode -> p > threshold, or top-k, at the AE's resolution -> nearest upsampling)."""

    ldm_ckpt_path: str = "checkpoints/ldm"  # LDM checkpoint file or run directory (best.pt, else last.pt)
    ae_ckpt_path: str = "checkpoints/ae"  # AE checkpoint file or run directory (best.pt, else last.pt)
    save_dir: str = "samples"  # gets {category}.npy and a JSON summary with a log
    categories: tuple[str, ...] = CATEGORIES
    num_samples: int = 1000  # shapes per category
    batch_size: int = 100
    use_cfg: bool = True  # classifier-free guidance; --no_use_cfg samples the plain conditional model (w = 0)
    cfg_scale: float = 1.0  # guidance w in (1 + w)·ε_c − w·ε_u: 0 = plain conditional;
    # the same as a "guidance scale" of 1 + w in the other common convention
    resolution: int = 128  # output grid side: the AE's or a power-of-two multiple of it
    binarize: BinarizeMode = "threshold"  # threshold: p > --threshold; calibrated: the AE's held-out threshold;
    # topk: the k most probable voxels
    threshold: float = 0.5  # occupied = probability > threshold (with --binarize threshold)
    topk: int | None = None  # voxels kept per shape at --resolution (with --binarize topk);
    # none: the category's mean training count
    guidance_rescale: float = 0.0  # φ of Lin et al. 2024: pull the guided ε̂ back to the conditional one's scale
    clamp_latents: bool = True  # clip each predicted latent to the range of the training latents (per channel)
    use_ema: bool = True  # the EMA weights of the LDM
    precision: Precision = "auto"  # autocast dtype of the U-Net's forward; auto: bf16 only where a start-up check
    # against fp32 passes on this machine, else fp32
    threads: str = "auto"  # CPU intra-op threads; auto: timed at start-up on the U-Net (1, 2, 4 ... cores)
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    seed: int = 0

    def __post_init__(self) -> None:
        check_literal(self.binarize, BinarizeMode, "binarize")
        check_literal(self.precision, Precision, "precision")
        check_threads(self.threads)
        for c in self.categories:
            category_index(c)
        check_range("num_samples", self.num_samples, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("cfg_scale", self.cfg_scale, lo=-1.0, hi=100.0)
        check_range("guidance_rescale", self.guidance_rescale, lo=0.0, hi=1.0)
        check_range("threshold", self.threshold, lo=0.0, hi=1.0, hi_open=True)
        check_range("topk", self.topk, lo=1, optional=True)
        check_range("resolution", self.resolution, lo=8)


@dataclass
class SampleConfig(GenerateConfig):
    """Sampling run (`diffusion/sample.py`, `voxdiff.sampling.sample_to_files`)."""

    sampler: SamplerName = "ddim"
    steps: int | None = None  # denoising steps; none: all T for ddpm, 50 for ddim
    eta: float = 0.0  # DDIM stochasticity (0 deterministic, 1 ~ DDPM)
    render: int | None = 16  # PNG of the first N shapes of each category ({category}.png); none: no PNG

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self.sampler, SamplerName, "sampler")
        check_range("render", self.render, lo=1, optional=True)
        check_range("steps", self.steps, lo=1, optional=True)
        check_range("eta", self.eta, lo=0.0, hi=1.0)


# Flags that only act together with another field's value: the CLIs refuse them otherwise (no silently ignored flag).
ACTS_ONLY_WITH: dict[str, tuple[str, Any]] = {
    "threshold": ("binarize", "threshold"),
    "topk": ("binarize", "topk"),
    "cfg_scale": ("use_cfg", True),
    "guidance_rescale": ("use_cfg", True),
}


@dataclass
class SDSConfig(GenerateConfig):
    """Score distillation on latents (`sds/main.py`, `voxdiff.sds.run_sds`); w(t) = 1 − ᾱ_t ("sds") or 1 ("uniform").

    t ~ U[t_min·T, t_max·T] per sample per step (with `anneal`, the upper bound falls linearly to t_min over the run).
    """

    save_dir: str = "samples_sds"  # gets {category}.npy, sds.json, sds.log, renders/
    categories: tuple[str, ...] = ("chair",)
    num_samples: int = 100  # shapes per category
    batch_size: int = 100  # latents optimised at once
    resolution: int = 64  # output grid side: the AE's or a power-of-two multiple of it
    num_steps: int = 200  # SDS optimisation steps per batch (0: keep the initial latents)
    lr: float = 0.02  # Adam learning rate on the (normalised) latents
    t_min: float = 0.02  # lowest noise level, as a fraction of T
    t_max: float = 0.98  # highest noise level, as a fraction of T
    anneal: bool = False  # lower the upper t bound linearly to t_min over the run
    weighting: SDSWeighting = "sds"  # w(t): sds = 1 − ᾱ_t (DreamFusion), uniform = 1
    init: SDSInit = "noise"  # initial latents: noise (N(0, I)) or ddim (DDIM samples, η = 0)
    steps: int = 50  # DDIM steps of --init ddim
    render_every: int | None = 50  # render the first batch every K steps; none: no renders
    render_n: int = 8  # shapes per render

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self.weighting, SDSWeighting, "weighting")
        check_literal(self.init, SDSInit, "init")
        check_range("num_steps", self.num_steps, lo=0)
        check_range("steps", self.steps, lo=1)
        check_range("lr", self.lr, lo=0.0, lo_open=True)
        check_range("render_every", self.render_every, lo=1, optional=True)
        check_range("render_n", self.render_n, lo=1)
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={self.t_min}, t_max={self.t_max}")


@dataclass
class TuneConfig:
    """Pick the guidance scale and the threshold of the final sampling on the held-out slice of the TRAIN split
    (`voxdiff.tuning`): never on val or test, which are the references the reported metrics use."""

    enabled: bool = False  # run the tune stage; its pick replaces the sample stage's cfg_scale and threshold
    cfg_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)  # guidance scales w tried
    rescales: tuple[float, ...] = (0.0,)  # guidance rescale φ tried with every w > 0
    clamp_latents: bool = True  # clip predicted latents to the training latents' range (as the sampling does)
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)  # thresholds tried (with the AE's calibrated one)
    num_samples: int = 100  # samples per category and scale, scored against the category's held-out shapes
    steps: int = 50  # DDIM steps
    seed: int = 1234  # another stream than the final samples'

    def __post_init__(self) -> None:
        if not self.cfg_scales or not self.thresholds:
            raise ValueError("tune needs at least one cfg_scale and one threshold")
        for w in self.cfg_scales:
            check_range("cfg_scales", w, lo=-1.0, hi=100.0)
        for t in self.thresholds:
            check_range("thresholds", t, lo=0.0, hi=1.0, hi_open=True)
        for r in self.rescales:
            check_range("rescales", r, lo=0.0, hi=1.0)
        check_range("num_samples", self.num_samples, lo=2)
        check_range("steps", self.steps, lo=1)


@dataclass
class GoalConfig:
    """What a run's report calls good enough, per category, against the oracle (a fresh draw of the data) and the
    reference data itself. The defaults are the quality goal of the medium and full presets."""

    cov: float = 0.9  # COV ≥ this × the oracle's
    mmd: float = 1.25  # MMD ≤ this × the oracle's
    jsd: float = 2.0  # JSD ≤ this × the oracle's
    nna: float = 0.65  # 1-NNA on equal sets ≤ this (0.5 is indistinguishable from the data)
    bloated: float = 0.01  # share of samples with more voxels than twice the largest training shape ≤ this
    structure: float = 1.5  # stray voxels and fragmented samples ≤ this × the reference data's (+ 1 point of slack,
    # so a data figure of 0 % allows 1 %)

    def __post_init__(self) -> None:
        for name in ("cov", "mmd", "jsd", "nna", "bloated", "structure"):
            check_range(name, getattr(self, name), lo=0.0)


@dataclass
class PipelineConfig:
    """The main job end to end: data -> AE -> LDM -> sample -> eval -> render -> report (`voxdiff.pipeline.run`)."""

    name: str = "demo"
    run_dir: str = "runs/demo"
    dataset_path: str | None = None  # preprocessed voxels to use; none: procedural data generated into {run_dir}/data
    data_preset: str = "small"  # procedural shape counts (voxdiff.data.partseg.COUNT_PRESETS)
    resolution: int = 64  # grid side of the data, the samples and the evaluation
    seed: int = 0
    device: str = "auto"
    threads: str = "auto"  # CPU intra-op threads of every stage; auto: timed once at start-up on the preset's AE and
    # U-Net (1, 2, 4 ... cores), and the count chosen is written into the run's config.json
    baselines: tuple[str, ...] = ("train", "noise")  # trivial sets scored beside the model: train copies, noise
    oracle: bool = True  # score a fresh procedural draw: the best a model could do
    render_n: int = 16  # shapes per row in the PNG sheets
    goals: GoalConfig = field(default_factory=GoalConfig)
    ae: AETrainConfig = field(default_factory=AETrainConfig)
    ldm: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _preset_tiny() -> PipelineConfig:
    """Seconds on a CPU: the test-sized pipeline, so the real pipeline cannot rot."""
    return PipelineConfig(
        name="tiny", run_dir="runs/tiny", data_preset="tiny", resolution=32, render_n=4,
        ae=AETrainConfig(model=AEConfig(resolution=32, channels=(4, 8)), batch_size=8, num_steps=3, lr=1e-3,
                         log_every=1, ckpt_every=2, holdout_fraction=0.25),
        ldm=LDMTrainConfig(model=unet_preset("small", ch=16, num_groups=4), batch_size=8, num_steps=4,
                           warmup_steps=1, ckpt_every=2, log_every=1),
        tune=TuneConfig(enabled=True, cfg_scales=(0.0, 1.0), thresholds=(0.5,), num_samples=2, steps=2),
        sample=SampleConfig(num_samples=4, batch_size=4, sampler="ddim", steps=3, resolution=32),
    )


def _cpu_ae() -> AEConfig:
    """The CPU presets' AE, a fresh object per preset: 32³ grids -> a (4, 8, 8, 8) latent (two stride-2 stages of
    24 and 48 channels), the starter code's BatchNorm and transposed convolutions, plain BCE. Four latent channels,
    not 16: a 16×8³ latent (8,192 numbers for a 32³ shape) reconstructs better but its diffusion model makes clouds at
    CPU budgets; the sample-quality screen in docs/BENCHMARKS.md ("Quality run 3") chose 4×8³."""
    return AEConfig(resolution=32, channels=(24, 48), latent_channels=4)


def _cpu_unet() -> UNetConfig:
    """The CPU presets' U-Net: "small" (ch 32, levels 8³ / 4³ / 2³) over the 4-channel latent."""
    return unet_preset("small", in_channels=4)


def _cpu_scheduler() -> SchedulerConfig:
    """v-prediction with zero terminal SNR and trailing timesteps (Lin et al. 2024): sampling starts from pure noise
    at the last trained step, as training saw it."""
    return SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)


def _preset_demo() -> PipelineConfig:
    """The README's main job on 2 CPU cores in under ten minutes, fp32 included: 256 train shapes per category at 32³,
    the medium preset's recipe scaled down. Its report checks the demo's own goals (GoalConfig below).

    Training lengths are steps (the same command gives the same model on a busy machine); `max_minutes` is only a
    safety cap that the report flags when it bites. Samples are binarised at the AE's calibrated threshold (the one
    that gives held-out training shapes their own voxel count), since the demo has no tune stage.
    """
    return PipelineConfig(
        name="demo", run_dir="runs/demo", data_preset="small", resolution=32, render_n=8,
        goals=GoalConfig(cov=0.6, mmd=3.0, jsd=2.0, nna=0.9, bloated=0.01, structure=2.0),
        ae=AETrainConfig(model=_cpu_ae(), batch_size=16, num_steps=800, max_minutes=8.0, lr=2e-3, log_every=10,
                         ckpt_every=400),
        ldm=LDMTrainConfig(model=_cpu_unet(), scheduler=_cpu_scheduler(), batch_size=32, num_steps=1000,
                           max_minutes=8.0, lr=1e-3, warmup_steps=100, lr_schedule="cosine", ckpt_every=250,
                           ema_decay=0.995),
        sample=SampleConfig(num_samples=100, batch_size=100, sampler="ddim", steps=30, resolution=32,
                            binarize="calibrated"),
    )


def _preset_medium() -> PipelineConfig:
    """The CPU quality run: under 75 minutes on 2 CPU cores, ShapeNet-sized training splits, 1,000 samples per
    category. The LDM keeps its checkpoints at 1k, 2k, 4k and 8k steps for a learning curve
    (bench/learning_curve.py).

    The guidance scale and the threshold of the final sampling are picked by the tune stage on held-out training
    shapes. The `full` preset is the 64³ / 128³ configuration for a GPU.
    """
    return PipelineConfig(
        name="medium", run_dir="runs/medium", data_preset="medium", resolution=32, render_n=16,
        ae=AETrainConfig(model=_cpu_ae(), batch_size=16, num_steps=3500, max_minutes=25, lr=2e-3, log_every=20,
                         ckpt_every=500),
        ldm=LDMTrainConfig(model=_cpu_unet(), scheduler=_cpu_scheduler(), batch_size=32, num_steps=9000,
                           max_minutes=40, lr=1e-3, warmup_steps=200, lr_schedule="cosine", ckpt_every=500,
                           ema_decay=0.998, log_every=20, keep_steps=(1000, 2000, 4000, 8000)),
        tune=TuneConfig(enabled=True, cfg_scales=(0.5, 1.0, 2.0), rescales=(0.0,), thresholds=(0.3, 0.4, 0.5),
                        num_samples=100, steps=50),
        sample=SampleConfig(num_samples=1000, batch_size=250, sampler="ddim", steps=50, resolution=32),
    )


def _preset_full() -> PipelineConfig:
    """A GPU server: the ShapeNet-sized procedural set at 128³, the starter code's AE at 64³ and U-Net, 1,000
    samples per category."""
    return PipelineConfig(
        name="full", run_dir="runs/full", data_preset="full", resolution=128, render_n=16,
        ae=AETrainConfig(model=AEConfig(resolution=64), batch_size=64, num_epochs=100, lr=1e-3, ckpt_every=1000),
        ldm=LDMTrainConfig(model=unet_preset("seed"), batch_size=64, num_steps=100000, lr=2e-4, warmup_steps=1000,
                           ckpt_every=2000, ema_decay=0.9999),
        tune=TuneConfig(enabled=True),
        sample=SampleConfig(num_samples=1000, batch_size=500, sampler="ddim", steps=50, resolution=128),
    )


# Named pipeline presets (doubles as argparse `choices`).
PIPELINE_PRESETS: dict[str, Any] = {
    "tiny": _preset_tiny,
    "demo": _preset_demo,
    "medium": _preset_medium,
    "full": _preset_full,
}


def pipeline_preset(name: str) -> PipelineConfig:
    """A fresh PipelineConfig of a named preset."""
    if name not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PIPELINE_PRESETS)}")
    return PIPELINE_PRESETS[name]()
