"""Configuration dataclasses and named presets. Standard library only (a leaf module).

Every stage is a library function taking one of these objects; the CLIs build them from flags and the pipeline builds
them from a preset, so both run the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# ShapeNet PartSeg label ids of the three categories this project models.
PARTSEG_LABELS: dict[str, int] = {"airplane": 0, "chair": 4, "table": 15}
# Model class index = position in this tuple; the null (unconditional) class for CFG is len(CATEGORIES).
CATEGORIES: tuple[str, ...] = ("airplane", "chair", "table")
SPLITS: tuple[str, ...] = ("train", "val", "test")

AELoss = Literal["bce", "weighted_bce", "dice", "bce_dice", "focal"]
BetaSchedule = Literal["linear", "cosine"]
SamplerName = Literal["ddpm", "ddim"]
Precision = Literal["auto", "fp32", "bf16"]


def check_literal(value: Any, lit: Any, name: str) -> None:
    """Raise ValueError listing the valid values when `value` is not one of the Literal `lit`."""
    valid = get_args(lit)
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(str, valid))}; got {value!r}")


def category_index(name: str) -> int:
    """Model class index of a category name, with a clear error for unknown names."""
    if name not in CATEGORIES:
        raise ValueError(f"unknown category {name!r}; choose from {', '.join(CATEGORIES)}")
    return CATEGORIES.index(name)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able dict of a (nested) config dataclass; tuples become lists."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys raise a clear error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        sub = _NESTED.get((cls.__name__, key))
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list) and "tuple" in str(hints[key]):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


@dataclass
class AEConfig:
    """3D conv autoencoder: (B,1,R,R,R) -> (B,latent_channels,R/8,R/8,R/8) -> back. Seed architecture by default."""

    resolution: int = 64
    channels: tuple[int, ...] = (12, 24, 48)
    latent_channels: int = 16
    negative_slope: float = 0.2

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"AE resolution must be a power of two >= 8; got {self.resolution}")
        if len(self.channels) != 3:
            raise ValueError(f"AE channels must have 3 entries (one per stride-2 stage); got {self.channels}")

    @property
    def latent_resolution(self) -> int:
        return self.resolution // 8


@dataclass
class UNetConfig:
    """UNet3D over the latent. Defaults are the seed's size (ch 192, mult 1,2,2, attention at level 1, 3 res blocks)."""

    in_channels: int = 16
    ch: int = 192
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 3
    attn_levels: tuple[int, ...] = (1,)
    dropout: float = 0.1
    num_classes: int = len(CATEGORIES)
    num_groups: int = 32
    num_heads: int = 4

    def __post_init__(self) -> None:
        levels = len(self.ch_mult)
        if levels < 1 or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"UNet ch_mult must be positive integers; got {self.ch_mult}")
        bad = [a for a in self.attn_levels if not 0 <= a < levels]
        if bad:
            raise ValueError(f"UNet attn_levels {bad} out of range for {levels} levels (0..{levels - 1})")
        for m in self.ch_mult:
            c = self.ch * m
            if c % self.num_groups or c % self.num_heads:
                raise ValueError(f"UNet width {c} must be divisible by num_groups={self.num_groups} and "
                                 f"num_heads={self.num_heads}")
        if self.num_classes < 1:
            raise ValueError(f"UNet num_classes must be >= 1; got {self.num_classes}")

    @property
    def downsample_factor(self) -> int:
        """The latent's side must be a multiple of this (one stride-2 step between consecutive levels)."""
        return 2 ** (len(self.ch_mult) - 1)


# Named UNet sizes (habit 8: a dict that doubles as argparse `choices`). "seed" is the seed's network; "small" is
# for CPU runs and tests.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "small": {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_levels": (1,), "num_groups": 8, "num_heads": 2},
}


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """UNetConfig of a named preset (see UNET_PRESETS), with optional field overrides."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose from {', '.join(UNET_PRESETS)}")
    return UNetConfig(**{**UNET_PRESETS[name], **overrides})


@dataclass
class SchedulerConfig:
    """DDPM noise schedule (Ho et al. 2020): linear betas 1e-4 -> 0.02 over T = 1000 steps, epsilon prediction."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"

    def __post_init__(self) -> None:
        check_literal(self.beta_schedule, BetaSchedule, "beta_schedule")


@dataclass
class AETrainConfig:
    """Autoencoder training run (`autoencoder.py`, `voxdiff.training.train_autoencoder`)."""

    dataset_path: str = "data/hdf5_data"
    ckpt_path: str = "checkpoints/ae"
    categories: tuple[str, ...] = CATEGORIES
    batch_size: int = 64
    lr: float = 1e-3
    num_steps: int | None = None  # optimizer steps; None: num_epochs passes over the training shapes
    num_epochs: int = 50
    max_minutes: float | None = None  # safety cap on wall time (the run says so when it stops there); None: none
    loss: AELoss = "weighted_bce"
    pos_weight: float | None = None  # weighted_bce's occupied-voxel weight; None: (1 - p) / p of the training data
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    precision: Precision = "auto"  # autocast dtype of training forwards; auto: bf16 where the hardware has it
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    ckpt_every: int = 500  # steps between held-out validation and last.pt / best.pt
    holdout_fraction: float = 0.05  # per category, held out of TRAIN for best.pt and threshold calibration
    holdout_max: int = 100  # at most this many held-out shapes per category
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (full-global-batch statistics; CUDA only)
    model: AEConfig = field(default_factory=AEConfig)

    def __post_init__(self) -> None:
        check_literal(self.loss, AELoss, "loss")
        check_literal(self.precision, Precision, "precision")
        for c in self.categories:
            category_index(c)
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1); got {self.holdout_fraction}")


@dataclass
class LDMTrainConfig:
    """Latent diffusion training run (`diffusion/train.py`, `voxdiff.training.train_ldm`)."""

    dataset_path: str = "data/hdf5_data"
    ae_ckpt_path: str = "checkpoints/ae"
    ckpt_path: str = "checkpoints/ldm"
    categories: tuple[str, ...] = CATEGORIES
    use_cfg: bool = True
    cfg_dropout: float = 0.1
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 500
    num_epochs: int | None = None  # passes over the training latents; None: num_steps decides
    num_steps: int | None = 10000  # optimizer steps; None: num_epochs decides (with both, the first reached)
    max_minutes: float | None = None  # safety cap on wall time (the run says so when it stops there); None: none
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    preview: bool = True  # render 2 samples per category at the end (and every preview_every steps)
    preview_every: int | None = None  # steps between preview renders; None: only at the end
    ckpt_every: int = 500  # steps between last.pt saves (and held-out evaluations for best.pt)
    weight_decay: float = 0.0
    precision: Precision = "auto"  # autocast dtype of training forwards; auto: bf16 where the hardware has it
    latent_cache_dir: str = ""  # "" = `latents/` beside the AE checkpoint
    model: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        for c in self.categories:
            category_index(c)
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1); got {self.cfg_dropout}")
        check_literal(self.precision, Precision, "precision")
        if not (self.num_steps or self.num_epochs):
            raise ValueError("give a training length: num_steps or num_epochs > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")


@dataclass
class SampleConfig:
    """Sampling run (`diffusion/sample.py`, `voxdiff.sampling.sample_to_files`)."""

    ldm_ckpt_path: str = "checkpoints/ldm"
    ae_ckpt_path: str = "checkpoints/ae"
    save_dir: str = "samples"
    categories: tuple[str, ...] = CATEGORIES
    num_samples: int = 1000
    batch_size: int = 100
    sampler: SamplerName = "ddim"
    steps: int = 50
    eta: float = 0.0
    use_cfg: bool = True
    cfg_scale: float = 1.0
    resolution: int = 128
    threshold: float = 0.5  # <0: the AE's calibrated threshold ("auto")
    topk: int = 0  # >0: keep the k most probable voxels per shape (at `resolution`); -1: k from the AE's occupancy
    use_ema: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_literal(self.sampler, SamplerName, "sampler")
        for c in self.categories:
            category_index(c)
        if self.num_samples < 1 or self.batch_size < 1 or self.steps < 0:
            raise ValueError("num_samples and batch_size must be >= 1, steps >= 0 (0: all T for ddpm, 50 for ddim)")
        if self.topk < -1:
            raise ValueError(f"topk must be > 0, 0 (threshold) or -1 (auto); got {self.topk}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1]; got {self.eta}")


@dataclass
class PipelineConfig:
    """The main job end to end: data -> AE -> LDM -> sample -> eval -> render -> report (`voxdiff.pipeline.run`)."""

    name: str = "demo"
    run_dir: str = "runs/demo"
    data_dir: str = ""  # "" = {run_dir}/data; an existing preprocessed directory is reused
    data_preset: str = "small"  # procedural count preset (voxdiff.data.partseg.COUNT_PRESETS)
    resolution: int = 64  # preprocessing / sample resolution (eval runs at this resolution)
    seed: int = 0
    device: str = "auto"
    baselines: tuple[str, ...] = ("train", "noise")
    oracle: bool = True
    render_n: int = 16
    ae: AETrainConfig = field(default_factory=AETrainConfig)
    ldm: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _preset_tiny() -> PipelineConfig:
    """Seconds on a CPU: the test-sized pipeline, so the real pipeline cannot rot."""
    return PipelineConfig(
        name="tiny", run_dir="runs/tiny", data_preset="tiny", resolution=32, render_n=4,
        ae=AETrainConfig(model=AEConfig(resolution=32, channels=(4, 8, 8)), batch_size=8, num_steps=3, lr=1e-3,
                         log_every=1, ckpt_every=2, holdout_fraction=0.25),
        ldm=LDMTrainConfig(model=unet_preset("small", ch=16, num_groups=4), batch_size=8, num_steps=4,
                           warmup_steps=1, ckpt_every=2, log_every=1),
        sample=SampleConfig(num_samples=4, batch_size=4, sampler="ddim", steps=3, resolution=32),
    )


def _preset_demo() -> PipelineConfig:
    """The README's main job on 2 CPU cores in under ten minutes: 64 train shapes per category at 32³.

    Training lengths are steps (the same command gives the same model on a busy machine); `max_minutes` is only a
    safety cap that the report flags when it bites.
    """
    return PipelineConfig(
        name="demo", run_dir="runs/demo", data_preset="small", resolution=32, render_n=8,
        ae=AETrainConfig(model=AEConfig(resolution=32), batch_size=16, num_steps=1000, max_minutes=6.0, lr=2e-3,
                         log_every=10, ckpt_every=250),
        ldm=LDMTrainConfig(model=unet_preset("small", ch=32), batch_size=32, num_steps=1500, max_minutes=6.0,
                           lr=1e-3, warmup_steps=100, ckpt_every=250, ema_decay=0.995),
        sample=SampleConfig(num_samples=100, batch_size=100, sampler="ddim", steps=50, resolution=32),
    )


def _preset_medium() -> PipelineConfig:
    """The CPU quality run: about an hour on 2 CPU cores, 1,000 samples per category.

    The CPU preset uses 32³ grids: a 3D conv AE trains several times faster there than at 64³. The `full` preset is
    the 64³ / 128³ configuration for a GPU.
    """
    return PipelineConfig(
        name="medium", run_dir="runs/medium", data_preset="medium", resolution=32, render_n=16,
        ae=AETrainConfig(model=AEConfig(resolution=32), batch_size=16, num_steps=10000, max_minutes=60, lr=2e-3,
                         log_every=20, ckpt_every=1000),
        ldm=LDMTrainConfig(model=unet_preset("small", ch=32), batch_size=32, num_steps=15000, max_minutes=60,
                           lr=1e-3, warmup_steps=200, ckpt_every=1000, ema_decay=0.998, log_every=20),
        sample=SampleConfig(num_samples=1000, batch_size=250, sampler="ddim", steps=50, resolution=32, cfg_scale=3.0,
                            threshold=0.5),
    )


def _preset_full() -> PipelineConfig:
    """A GPU server: the ShapeNet-sized procedural set at 128³, the seed's U-Net, 1,000 samples per category."""
    return PipelineConfig(
        name="full", run_dir="runs/full", data_preset="full", resolution=128, render_n=16,
        ae=AETrainConfig(model=AEConfig(resolution=64), batch_size=64, num_epochs=100, lr=1e-3, ckpt_every=1000),
        ldm=LDMTrainConfig(model=unet_preset("seed"), batch_size=64, num_steps=100000, lr=2e-4, warmup_steps=1000,
                           ckpt_every=2000, ema_decay=0.9999),
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


SDSWeighting = Literal["sds", "uniform"]
SDSInit = Literal["noise", "ddim"]


@dataclass
class SDSConfig:
    """Score distillation on latents (`sds/main.py`, `voxdiff.sds.run_sds`); w(t) = 1 − ᾱ_t ("sds") or 1 ("uniform").

    t ~ U[t_min·T, t_max·T] per sample per step (with `anneal`, the upper bound falls linearly to t_min over the run).
    guidance_scale w: ε̂ = (1 + w) ε_c − w ε_u (0 = plain conditional). topk as SampleConfig (0 = threshold, -1 auto).
    """

    ldm_ckpt_path: str = "checkpoints/ldm"
    ae_ckpt_path: str = "checkpoints/ae"
    category: str = "chair"
    num_samples: int = 100
    batch_size: int = 100
    steps: int = 200  # optimisation steps per batch (0 = return the initial latents)
    lr: float = 0.02
    guidance_scale: float = 1.0
    t_min: float = 0.02
    t_max: float = 0.98
    anneal: bool = False
    weighting: SDSWeighting = "sds"
    init: SDSInit = "noise"
    init_steps: int = 50  # DDIM steps (eta 0) for init="ddim"
    save_dir: str = "samples_sds"
    resolution: int = 64
    threshold: float = 0.5
    topk: int = 0
    use_ema: bool = True
    render_every: int = 50  # 0 = no periodic renders
    render_n: int = 8
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        category_index(self.category)
        check_literal(self.weighting, SDSWeighting, "weighting")
        check_literal(self.init, SDSInit, "init")
        if self.num_samples < 1 or self.batch_size < 1 or self.steps < 0 or self.init_steps < 1:
            raise ValueError("num_samples, batch_size and init_steps must be >= 1, steps >= 0")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={self.t_min}, t_max={self.t_max}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.topk < -1:
            raise ValueError(f"topk must be > 0, 0 (threshold) or -1 (auto); got {self.topk}")
        if self.render_every < 0 or self.render_n < 1:
            raise ValueError("render_every must be >= 0 and render_n >= 1")


_NESTED: dict[tuple[str, str], type] = {
    ("AETrainConfig", "model"): AEConfig,
    ("LDMTrainConfig", "model"): UNetConfig,
    ("LDMTrainConfig", "scheduler"): SchedulerConfig,
    ("PipelineConfig", "ae"): AETrainConfig,
    ("PipelineConfig", "ldm"): LDMTrainConfig,
    ("PipelineConfig", "sample"): SampleConfig,
}
