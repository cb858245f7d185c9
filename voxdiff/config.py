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
    num_epochs: int = 50
    max_steps: int = 0  # 0 = no limit beyond num_epochs
    max_minutes: float = 0.0  # 0 = no time budget
    loss: AELoss = "weighted_bce"
    pos_weight: float = 0.0  # 0 = derive from training occupancy
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    log_every: int = 10
    model: AEConfig = field(default_factory=AEConfig)

    def __post_init__(self) -> None:
        check_literal(self.loss, AELoss, "loss")
        for c in self.categories:
            category_index(c)


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
    num_epochs: int = 0
    num_steps: int = 10000
    max_minutes: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    sample_every: int = 0  # 0 = render samples only at the end
    model: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


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
    threshold: float = 0.5
    topk: int = 0  # >0: keep the k most probable voxels per shape instead of thresholding
    use_ema: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_literal(self.sampler, SamplerName, "sampler")
        for c in self.categories:
            category_index(c)


_NESTED: dict[tuple[str, str], type] = {
    ("AETrainConfig", "model"): AEConfig,
    ("LDMTrainConfig", "model"): UNetConfig,
    ("LDMTrainConfig", "scheduler"): SchedulerConfig,
}
