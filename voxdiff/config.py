"""Configuration dataclasses. Standard library only (a leaf module).

Every stage is a library function taking one of these objects; the CLIs build them from flags and the stage runner
(`python -m voxdiff`, voxdiff.runner) builds them from a named preset (voxdiff.presets), so both run the same code.

Each field says what it is in its metadata, written once here (`setting(default, help, **tags)`, `nested(cls, help)`:
`dataclasses.field` with `metadata={"help": help, **tags}`) and read everywhere else:
    "help"      its --help text (the CLIs' flags are generated from the fields: voxdiff/cli.py)
    "derived"   set by the program from other settings (the U-Net's input width from the AE, the class count from
                CATEGORIES): never a flag
    "from_run"  the stage runner fills it in from the run's own settings (run_dir, data, device, seed, threads,
                resolution: voxdiff.runner.resolve), so `python -m voxdiff` has no --ae. / --ldm. / --sample. flag
                for it
    "local"     where files are and how this machine runs the stage (paths, device, threads, resume, the guard's
                patience), not what the stage makes: left out of the runner's stage keys, so a moved run directory or
                another machine resumes the run
    "switch"    a boolean that turns its whole config on or off: under a prefix its flags are the prefix's word
                (`--tune` / `--no_tune`)
    "added"     a field added after runs were recorded with its class: left out of the runner's stage keys while it
                holds its default, so those runs stay up to date
    "preview"   changes only the stage's preview images, never its checkpoints: left out of the runner's stage keys
                (a new sampling threshold does not refuse a trained LDM)
A subclass that redefines a field (a new default) repeats its metadata.
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
AEBlock = Literal["course", "resnet"]
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


def tagged_fields(cls: type, tag: str) -> tuple[str, ...]:
    """Names of the fields of the config dataclass `cls` whose metadata sets `tag` ("derived", "from_run", "local",
    "switch", "added", "preview": see the module docstring)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(tag))


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


def setting(default: Any, help_text: str, **tags: bool) -> Any:
    """A config field: its default, its --help text and its tags (see the module docstring), as
    `field(default=default, metadata={"help": help_text, **tags})`."""
    return field(default=default, metadata={"help": help_text, **tags})


def nested(cls: type, help_text: str) -> Any:
    """A config field holding a fresh config object of class `cls` (`field(default_factory=cls, metadata=...)`)."""
    return field(default_factory=cls, metadata={"help": help_text})


def _precision_setting(forward: str, check: str) -> Any:
    """The `precision` field of a stage: the autocast dtype of its `forward`, "auto" meaning bf16 where `check`
    passes."""
    return setting("auto", f"autocast dtype of {forward}; auto: bf16 only where {check} passes on this machine, "
                           "else fp32")


def _threads_setting(timed_on: str) -> Any:
    """The `threads` field of a stage: "auto" is timed at start-up on `timed_on`."""
    return setting("auto", f"CPU intra-op threads; auto: timed at start-up on {timed_on} (1, 2, 4 ... cores)",
                   from_run=True, local=True)


def _device_setting() -> Any:
    """The `device` field of a stage."""
    return setting("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...", from_run=True, local=True)


# Old name -> name. The course's starter network was first called "seed", which reads as the RNG seed; checkpoints and
# config.json files written before it was renamed "course" still say so. AEConfig (its block) and unet_preset read the
# old name; the stage runner keys its records by it (voxdiff.runner._strip), so runs recorded before stay up to date.
RENAMED: dict[str, str] = {"seed": "course"}


@dataclass
class AEConfig:
    """3D conv autoencoder: (B,1,R,R,R) -> (B,latent_channels,r,r,r), r = R / 2^len(channels) -> back.

    The defaults are the network of the course's starter code ("course": three stride-2 stages at 64³ -> 16×8³,
    BatchNorm, transposed convolutions).
    """

    resolution: int = setting(64, "input grid side (a power of two)")
    channels: tuple[int, ...] = setting((12, 24, 48), "width of each stride-2 stage; their number sets the latent side")
    latent_channels: int = setting(16, "channels of the latent (the LDM's input width)")
    negative_slope: float = setting(0.2, "LeakyReLU slope")
    block: AEBlock = setting(
        "course", "course: the starter code's conv stack; resnet: a residual block at every resolution")
    norm: AENorm = setting("batch", "batch: BatchNorm3d (starter code); group: GroupNorm (batch-size independent)")
    upsample: AEUpsample = setting(
        "transpose", "transpose: ConvTranspose3d (starter code); nearest: nearest upsample + conv")
    variational: bool = setting(
        False, "the encoder predicts a mean and a log-variance (AutoencoderKL); the latent is the mean")

    def __post_init__(self) -> None:
        if isinstance(self.block, str) and self.block in RENAMED:  # checkpoints, config.json files from before
            self.block = RENAMED[self.block]
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
    blocks): the "course" preset."""

    in_channels: int = setting(16, "latent channels (set from the AE)", derived=True)
    ch: int = setting(192, "base width")
    ch_mult: tuple[int, ...] = setting(
        (1, 2, 2), "width multiplier per resolution level (one stride-2 step between levels)")
    num_res_blocks: int = setting(3, "residual blocks per level")
    attn_levels: tuple[int, ...] = setting((1,), "levels with self-attention after each block")
    dropout: float = setting(0.1, "residual-block dropout")
    num_classes: int = setting(len(CATEGORIES), "class labels (+1 null class for guidance)", derived=True)
    num_groups: int = setting(32, "GroupNorm groups")
    num_heads: int = setting(4, "attention heads")

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


# Named U-Net sizes (the dict doubles as argparse `choices`). "course" is the network of the course's starter code
# (the code this project grew from); "small" is for CPU runs and tests.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "course": {},
    "small": {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_levels": (2,), "num_groups": 8,
              "num_heads": 2},
}


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """UNetConfig of a named preset (see UNET_PRESETS; the old name "seed" reads as "course"), with optional field
    overrides."""
    name = RENAMED.get(name, name)
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose from {', '.join(UNET_PRESETS)}")
    return UNetConfig(**{**UNET_PRESETS[name], **overrides})


@dataclass
class SchedulerConfig:
    """DDPM noise schedule (Ho et al. 2020): linear betas 1e-4 -> 0.02 over T = 1000 steps, epsilon prediction."""

    num_train_timesteps: int = setting(1000, "diffusion steps T")
    beta_start: float = setting(1e-4, "β of the first diffusion step")
    beta_end: float = setting(0.02, "β of the last diffusion step")
    beta_schedule: BetaSchedule = setting(
        "linear", "linear (DDPM), scaled_linear (linear in √β: Stable Diffusion) or cosine (Nichol & Dhariwal 2021)")
    prediction_type: PredictionType = setting(
        "epsilon", "the network predicts the noise ε, or v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022)")
    timestep_spacing: TimestepSpacing = setting(
        "leading", "inference timesteps: leading (T−k, ..., 0; DDIM's) or trailing (T−1, ..., k−1: sampling starts at "
        "the last trained step; Lin et al. 2024)")
    rescale_betas_zero_snr: bool = setting(
        False, "rescale the schedule so ᾱ_T = 0: the last step is pure noise, as sampling assumes (Lin et al. 2024; "
        "needs v_prediction)")

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

    dataset_path: str = setting(
        "data/hdf5_data", "directory of {category}_voxels_{split}.npy", from_run=True, local=True)
    ckpt_path: str = setting(
        "checkpoints/run", "run directory: last.pt, best.pt, train.log, log.csv/png", from_run=True, local=True)
    categories: tuple[str, ...] = setting(CATEGORIES, "categories trained on (all: every one)")
    batch_size: int = setting(64, "global batch (split across ranks under torchrun)")
    lr: float = setting(1e-3, "AdamW learning rate")
    num_steps: int | None = setting(None, "optimizer steps; none: num_epochs passes over the training set")
    num_epochs: int | None = setting(50, "passes over the training set when num_steps is none")
    max_minutes: float | None = setting(
        None, "safety cap on wall time (the run says so when it stops there); none: no cap")
    grad_clip: float = setting(1.0, "max gradient norm (0: off)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    precision: Precision = _precision_setting(
        "training forwards", "a start-up check of this network's forward and backward against fp32")
    threads: str = _threads_setting("this network")
    max_bad_steps: int = setting(
        10, "steps in a row with a non-finite or absurd loss or gradient before the run stops (each such step is "
        "skipped: parameters, optimizer and EMA unchanged)", local=True)
    device: str = _device_setting()
    seed: int = setting(0, "random seed: initial weights, data order, noise", from_run=True)
    resume: bool = setting(False, "continue exactly from {ckpt_path}/last.pt", from_run=True, local=True)
    overwrite: bool = setting(
        False, "replace an existing run in ckpt_path (without it, an existing checkpoint is refused)",
        from_run=True, local=True)
    log_every: int = setting(10, "steps between loss rows in log.csv")
    ckpt_every: int = setting(500, "steps between held-out validation, last.pt and best.pt")

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

    ckpt_path: str = setting(
        "checkpoints/ae", "run directory: last.pt, best.pt, train.log, log.csv/png", from_run=True, local=True)
    loss: AELoss = setting("bce", "reconstruction loss (voxdiff/losses.py); bce gives the data's thickness at p > 0.5")
    pos_weight: float | None = setting(
        None, "weighted_bce's occupied-voxel weight; none: (1 - p) / p of the training data")
    latent_noise: float = setting(
        0.0, "σ: decode latents + σ·(batch std)·ε in training, a decoder robust to imperfect latents")
    kl_weight: float = setting(
        0.0, "weight of the KL term to N(0, I) per latent number (needs model.variational; Stable Diffusion's "
        "AutoencoderKL uses about 1e-6 of a sum over pixels)")
    warmup_steps: int = setting(0, "linear LR warmup", added=True)
    lr_schedule: LRSchedule = setting("constant", "after warmup: constant, or cosine decay to lr/10", added=True)
    holdout_fraction: float = setting(0.05, "per category, held out of TRAIN for best.pt and threshold calibration")
    holdout_max: int = setting(100, "at most this many held-out shapes per category")
    sync_bn: bool = setting(False, "under torchrun: SyncBatchNorm (full-global-batch statistics; CUDA only)")
    model: AEConfig = nested(AEConfig, "the autoencoder network")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_literal(self.loss, AELoss, "loss")
        check_range("pos_weight", self.pos_weight, lo=0.0, lo_open=True, optional=True)
        check_range("latent_noise", self.latent_noise, lo=0.0, hi=10.0)
        check_range("kl_weight", self.kl_weight, lo=0.0)
        check_range("warmup_steps", self.warmup_steps, lo=0)
        check_literal(self.lr_schedule, LRSchedule, "lr_schedule")
        if self.kl_weight > 0 and not self.model.variational:
            raise ValueError("kl_weight needs a variational AE (model.variational)")
        check_range("holdout_fraction", self.holdout_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_range("holdout_max", self.holdout_max, lo=1)


@dataclass
class LDMTrainConfig(TrainConfig):
    """Latent diffusion training run (`diffusion/train.py`, `voxdiff.training.train_ldm`)."""

    ckpt_path: str = setting(
        "checkpoints/ldm", "run directory: last.pt, best.pt, train.log, log.csv/png, previews",
        from_run=True, local=True)
    batch_size: int = setting(16, "global batch (split across ranks under torchrun)")
    lr: float = setting(2e-4, "AdamW learning rate (reached after warmup_steps)")
    num_steps: int | None = setting(10000, "optimizer steps; none: num_epochs passes over the training latents")
    num_epochs: int | None = setting(None, "passes over the training latents when num_steps is none")
    ae_ckpt_path: str = setting(
        "checkpoints/ae", "trained AE checkpoint file or run directory", from_run=True, local=True)
    use_cfg: bool = setting(True, "train with label dropout, so classifier-free guidance can be used when sampling")
    cfg_dropout: float = setting(0.1, "label dropout probability (with use_cfg)")
    warmup_steps: int = setting(500, "linear LR warmup")
    lr_schedule: LRSchedule = setting("constant", "after warmup: constant, or cosine decay to lr/10")
    ema_decay: float = setting(
        0.999, "decay of the exponential moving average of the weights (what sampling uses by default)")
    snr_gamma: float | None = setting(
        None, "min-SNR-γ loss weighting (Hang et al. 2023; 5 in the paper); none: plain MSE")
    keep_steps: tuple[int, ...] = setting(
        (), "also keep the checkpoint of these steps as step{N}.pt (a learning curve)")
    preview: bool = setting(True, "render 2 samples per category at the end (and every preview_every steps)",
                            preview=True)
    preview_every: int | None = setting(None, "steps between preview renders; none: only at the end", preview=True)
    preview_threshold: float = setting(
        0.5, "previews binarise as p > this (the stage runner sets its sampling threshold)", from_run=True,
        preview=True)
    latent_cache_dir: str | None = setting(None, "none: latents/ beside the AE checkpoint", local=True)
    model: UNetConfig = nested(UNetConfig, "the U-Net over the latent")
    scheduler: SchedulerConfig = nested(SchedulerConfig, "the noise schedule")

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
class SamplingBaseConfig:
    """What sampling and SDS share: the checkpoints, where the files go, how many shapes, guidance, output resolution
    and binarisation (decode -> p > threshold, or top-k, at the AE's resolution -> nearest upsampling)."""

    ldm_ckpt_path: str = setting(
        "checkpoints/ldm", "LDM checkpoint file or run directory (best.pt, else last.pt)", from_run=True, local=True)
    ae_ckpt_path: str = setting(
        "checkpoints/ae", "AE checkpoint file or run directory (best.pt, else last.pt)", from_run=True, local=True)
    save_dir: str = setting("samples", "gets {category}.npy and a JSON summary with a log", from_run=True, local=True)
    categories: tuple[str, ...] = setting(CATEGORIES, "categories sampled (all: every one)")
    num_samples: int = setting(1000, "shapes per category")
    batch_size: int = setting(100, "shapes denoised at once")
    use_cfg: bool = setting(True, "classifier-free guidance; --no_use_cfg samples the plain conditional model (w = 0)")
    cfg_scale: float = setting(
        1.0, "guidance w in (1 + w)·ε_c − w·ε_u: 0 = plain conditional; the same as a \"guidance scale\" of 1 + w in "
        "the other common convention")
    resolution: int = setting(128, "output grid side: the AE's or a power-of-two multiple of it", from_run=True)
    binarize: BinarizeMode = setting(
        "threshold", "threshold: p > --threshold; calibrated: the AE's held-out threshold; topk: the k most probable "
        "voxels")
    threshold: float = setting(0.5, "occupied = probability > threshold (with --binarize threshold)")
    topk: int | None = setting(
        None, "voxels kept per shape at --resolution (with --binarize topk); none: the category's mean training count")
    guidance_rescale: float = setting(
        0.0, "φ of Lin et al. 2024: pull the guided ε̂ back to the conditional one's scale")
    clamp_latents: bool = setting(True, "clip each predicted latent to the range of the training latents (per channel)")
    use_ema: bool = setting(True, "the EMA weights of the LDM")
    precision: Precision = _precision_setting("the U-Net's forward", "a start-up check against fp32")
    threads: str = _threads_setting("the U-Net")
    device: str = _device_setting()
    seed: int = setting(0, "random seed of the sampling noise", from_run=True)

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
class SampleConfig(SamplingBaseConfig):
    """Sampling run (`diffusion/sample.py`, `voxdiff.sampling.sample_to_files`)."""

    sampler: SamplerName = setting("ddim", "reverse process: ddpm (all T steps) or ddim")
    steps: int | None = setting(None, "denoising steps; none: all T for ddpm, 50 for ddim")
    eta: float = setting(0.0, "DDIM stochasticity (0 deterministic, 1 ~ DDPM)")
    render: int | None = setting(
        16, "PNG of the first N shapes of each category ({category}.png); none: no PNG", from_run=True)

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
class SDSConfig(SamplingBaseConfig):
    """Score distillation on latents (`sds/main.py`, `voxdiff.sds.run_sds`); w(t) = 1 − ᾱ_t ("sds") or 1 ("uniform").

    t ~ U[t_min·T, t_max·T] per sample per step (with `anneal`, the upper bound falls linearly to t_min over the run).
    """

    save_dir: str = setting(
        "samples_sds", "gets {category}.npy, sds.json, sds.log, renders/", from_run=True, local=True)
    categories: tuple[str, ...] = setting(("chair",), "categories distilled (all: every one)")
    num_samples: int = setting(100, "shapes per category")
    batch_size: int = setting(100, "latents optimised at once")
    resolution: int = setting(64, "output grid side: the AE's or a power-of-two multiple of it", from_run=True)
    num_steps: int = setting(200, "SDS optimisation steps per batch (0: keep the initial latents)")
    lr: float = setting(0.02, "Adam learning rate on the (normalised) latents")
    t_min: float = setting(0.02, "lowest noise level, as a fraction of T")
    t_max: float = setting(0.98, "highest noise level, as a fraction of T")
    anneal: bool = setting(False, "lower the upper t bound linearly to t_min over the run")
    weighting: SDSWeighting = setting("sds", "w(t): sds = 1 − ᾱ_t (DreamFusion), uniform = 1")
    init: SDSInit = setting("noise", "initial latents: noise (N(0, I)) or ddim (DDIM samples, η = 0)")
    steps: int = setting(50, "DDIM steps of --init ddim")
    render_every: int | None = setting(50, "render the first batch every K steps; none: no renders")
    render_n: int = setting(8, "shapes per render")

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

    enabled: bool = setting(
        False, "run the tune stage; its pick replaces the sample stage's cfg_scale and threshold", switch=True)
    cfg_scales: tuple[float, ...] = setting((0.0, 1.0, 2.0, 4.0), "guidance scales w tried")
    rescales: tuple[float, ...] = setting((0.0,), "guidance rescale φ tried with every w > 0")
    clamp_latents: bool = setting(True, "clip predicted latents to the training latents' range (as the sampling does)")
    thresholds: tuple[float, ...] = setting(
        (0.3, 0.4, 0.5, 0.6, 0.7), "thresholds tried (with the AE's calibrated one)")
    num_samples: int = setting(100, "samples per category and scale, scored against the category's held-out shapes")
    steps: int = setting(50, "DDIM steps")
    seed: int = setting(1234, "another stream than the final samples'")

    def __post_init__(self) -> None:
        if not self.cfg_scales or not self.thresholds:
            raise ValueError("tune needs at least one cfg_scale and one threshold")
        for w in self.cfg_scales:
            check_range("cfg_scales", w, lo=-1.0, hi=100.0)
        for t in self.thresholds:
            check_range("thresholds", t, lo=0.0, hi=1.0, hi_open=True)
        for rescale in self.rescales:
            check_range("rescales", rescale, lo=0.0, hi=1.0)
        check_range("num_samples", self.num_samples, lo=2)
        check_range("steps", self.steps, lo=1)


@dataclass
class GoalConfig:
    """What a run's report calls good enough, per category, against the oracle (a fresh draw of the data) and the
    reference data itself. The defaults are the quality goal of the medium and full presets."""

    cov: float = setting(0.9, "COV ≥ this × the oracle's")
    mmd: float = setting(1.25, "MMD ≤ this × the oracle's")
    jsd: float = setting(2.0, "JSD ≤ this × the oracle's")
    nna: float = setting(0.65, "1-NNA on equal sets ≤ this (0.5 is indistinguishable from the data)")
    bloated: float = setting(0.01, "share of samples with more voxels than twice the largest training shape ≤ this")
    structure: float = setting(
        1.5, "stray voxels and fragmented samples ≤ this × the reference data's (+ 1 point of slack, so a data figure "
        "of 0 % allows 1 %)")

    def __post_init__(self) -> None:
        for name in ("cov", "mmd", "jsd", "nna", "bloated", "structure"):
            check_range(name, getattr(self, name), lo=0.0)


@dataclass
class RunConfig:
    """The main job end to end, run by the stage runner (`python -m voxdiff`, `voxdiff.runner.run`): data -> AE -> LDM
    -> tune -> sample -> eval -> render -> report."""

    name: str = setting("demo", "the preset's name, written into the report")
    run_dir: str = setting(
        "runs/demo", "directory of the run: data, checkpoints, samples, report (its config.json reruns it)")
    dataset_path: str | None = setting(
        None, "preprocessed voxels to use; none: procedural data generated into {run_dir}/data")
    data_preset: str = setting("small", "procedural shape counts (voxdiff.data.partseg.COUNT_PRESETS)")
    resolution: int = setting(64, "grid side of the data, the samples and the evaluation")
    seed: int = setting(0, "random seed of the data and of every stage")
    device: str = setting("auto", "device of every stage: auto (cuda when available), cpu, cuda, cuda:1, ...")
    threads: str = setting(
        "auto", "CPU intra-op threads of every stage; auto: timed once at start-up on the preset's AE and U-Net (1, "
        "2, 4 ... cores), and the count chosen is written into the run's config.json")
    baselines: tuple[str, ...] = setting(
        ("train", "noise"), "trivial sets scored beside the model: train copies, noise")
    oracle: bool = setting(True, "score a fresh procedural draw: the best a model could do")
    render_n: int = setting(16, "shapes per row in the PNG sheets")
    goals: GoalConfig = nested(GoalConfig, "what the report calls good enough")
    ae: AETrainConfig = nested(AETrainConfig, "the ae stage (autoencoder.py)")
    ldm: LDMTrainConfig = nested(LDMTrainConfig, "the ldm stage (diffusion/train.py)")
    tune: TuneConfig = nested(TuneConfig, "the tune stage (voxdiff/tuning.py)")
    sample: SampleConfig = nested(SampleConfig, "the sample stage (diffusion/sample.py)")
