"""The named run presets of `python -m voxdiff --preset`: tiny, demo, medium and full, each a fresh RunConfig.

Built from the configuration dataclasses of voxdiff.config, the only module this one imports (standard library
otherwise), so the layering stays: config.py is the leaf, presets.py the one step above it.
"""

from __future__ import annotations

from typing import Any

from voxdiff.config import (
    AEConfig,
    AETrainConfig,
    GoalConfig,
    LDMTrainConfig,
    RunConfig,
    SampleConfig,
    SchedulerConfig,
    TuneConfig,
    UNetConfig,
    unet_preset,
)


def _preset_tiny() -> RunConfig:
    """Seconds on a CPU: the test-sized run, so the real stage runner cannot rot."""
    return RunConfig(
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


def _preset_demo() -> RunConfig:
    """The README's main job on 2 CPU cores in under ten minutes, fp32 included: 256 train shapes per category at 32³,
    the medium preset's latent and U-Net with a recipe for its budget. Its report checks the demo's own goals
    (`goals` below; voxdiff.config.GoalConfig).

    Training lengths are steps (the same command gives the same model on a busy machine); `max_minutes` is only a
    safety cap that the report flags when it bites. The recipe was chosen by what its samples score against a fresh
    procedural draw, never against the demo's references (docs/BENCHMARKS.md, "A demo worth showing"): the AE's
    decoder sees its latents with a little noise (`latent_noise` 0.1, so the diffusion model's imperfect latents still
    decode to connected legs), and the U-Net learns at lr 2e-3 for 1,100 steps, the most that fits the budget in fp32.
    There is no tune stage: guidance w = 1 and p > 0.25 (thin legs stay connected) were picked the same way.
    """
    return RunConfig(
        name="demo", run_dir="runs/demo", data_preset="small", resolution=32, render_n=8,
        goals=GoalConfig(cov=0.6, mmd=3.0, jsd=2.0, nna=0.9, bloated=0.01, structure=2.0),
        ae=AETrainConfig(model=_cpu_ae(), batch_size=16, num_steps=800, max_minutes=8.0, lr=2e-3, log_every=10,
                         ckpt_every=400, latent_noise=0.1),
        ldm=LDMTrainConfig(model=_cpu_unet(), scheduler=_cpu_scheduler(), batch_size=32, num_steps=1100,
                           max_minutes=8.0, lr=2e-3, warmup_steps=100, lr_schedule="cosine", ckpt_every=275,
                           ema_decay=0.995),
        sample=SampleConfig(num_samples=100, batch_size=100, sampler="ddim", steps=25, resolution=32,
                            cfg_scale=1.0, threshold=0.25),
    )


def _preset_medium() -> RunConfig:
    """The CPU quality run: under 75 minutes on 2 CPU cores, ShapeNet-sized training splits, 1,000 samples per
    category. The LDM keeps its checkpoints at 1k, 2k, 4k and 8k steps for a learning curve
    (bench/learning_curve.py).

    The guidance scale and the threshold of the final sampling are picked by the tune stage on held-out training
    shapes. The `full` preset is the 64³ / 128³ configuration for a GPU.
    """
    return RunConfig(
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


def _preset_full() -> RunConfig:
    """A GPU server: the ShapeNet-sized procedural set at 128³, the starter code's AE at 64³ and U-Net, 1,000
    samples per category."""
    return RunConfig(
        name="full", run_dir="runs/full", data_preset="full", resolution=128, render_n=16,
        ae=AETrainConfig(model=AEConfig(resolution=64), batch_size=64, num_epochs=100, lr=1e-3, ckpt_every=1000),
        ldm=LDMTrainConfig(model=unet_preset("course"), batch_size=64, num_steps=100000, lr=2e-4, warmup_steps=1000,
                           ckpt_every=2000, ema_decay=0.9999),
        tune=TuneConfig(enabled=True),
        sample=SampleConfig(num_samples=1000, batch_size=500, sampler="ddim", steps=50, resolution=128),
    )


# Named run presets of `python -m voxdiff --preset` (doubles as argparse `choices`).
RUN_PRESETS: dict[str, Any] = {
    "tiny": _preset_tiny,
    "demo": _preset_demo,
    "medium": _preset_medium,
    "full": _preset_full,
}


def run_preset(name: str) -> RunConfig:
    """A fresh RunConfig of a named preset."""
    if name not in RUN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]()
