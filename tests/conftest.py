"""Shared fixtures. Tests run on CPU with tiny data the tests make themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from voxdiff.checkpoint import AEMeta, Checkpoint, LDMMeta, save_checkpoint
from voxdiff.config import AEConfig, LDMTrainConfig, SchedulerConfig, UNetConfig, to_dict
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread for everything the tests run (here and in subprocesses): the cores are shared, and "auto" thread
# choices then have one candidate, so runs that are compared bit for bit use the same count. Tests of the choice
# itself pass their own core counts.
os.environ["OMP_NUM_THREADS"] = "1"


def _toy_grid(category: str, r: int, rng: np.random.Generator) -> np.ndarray:
    """A crude but category-specific shape (plates and bars) on an r³ grid, as uint8."""
    g = np.zeros((r, r, r), np.uint8)
    j = lambda lo, hi: int(rng.integers(lo, hi))  # noqa: E731
    m = r // 8
    if category == "table":
        h = j(r // 2, 3 * r // 4)
        g[m : r - m, m : r - m, h] = 1  # top
        for x in (m, r - m - 1):
            for y in (m, r - m - 1):
                g[x, y, m:h] = 1  # legs
    elif category == "chair":
        s = j(r // 3, r // 2)
        g[m : r - m, m : r - m, s] = 1  # seat
        g[m : r - m, m, s : r - m] = 1  # back
        for x in (m, r - m - 1):
            for y in (m, r - m - 1):
                g[x, y, m:s] = 1
    else:  # airplane
        c = r // 2 + j(-2, 3)
        g[m : r - m, c, c] = 1  # fuselage
        w = j(r // 3, r // 2)
        g[c - 1 : c + 1, c - w // 1 + m : c + w - m, c] = 1  # wings
        g[m : m + 2, c - r // 6 : c + r // 6, c] = 1  # tail
    return g


def make_voxel_dir(root: Path, r: int = 32, n: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write `{category}_voxels_{split}.npy` (uint8, (N,r,r,r)) for the three categories into `root`."""
    n = n or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for cat in ("airplane", "chair", "table"):
        for split, count in n.items():
            arr = np.stack([_toy_grid(cat, r, rng) for _ in range(count)])
            np.save(root / f"{cat}_voxels_{split}.npy", arr)
    return root


@pytest.fixture(scope="session")
def tiny_voxel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention directory of tiny 32³ toy voxel splits (8 train / 4 val / 4 test per category)."""
    return make_voxel_dir(tmp_path_factory.mktemp("voxels32"))


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (use it to launch the CLIs in subprocesses)."""
    return sys.executable


# ---- tiny networks and checkpoints, written the way the trainers write them ------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # for CLIs run in subprocesses
TINY_AE = AEConfig(resolution=32, channels=(4, 8, 8))
TINY_UNET = UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_groups=4, num_heads=2,
                       dropout=0.0)
OCC = {"airplane": 40.0, "chair": 120.0, "table": 90.0}  # training occupancy recorded in tiny AE checkpoints


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: one intra-op thread is faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_ae_ckpt(path: Path, resolution: int = 32, latent_channels: int = 16, with_stats: bool = True,
                 holdout: dict[str, list[int]] | None = None) -> Path:
    """A randomly initialised tiny AE saved as the AE trainer saves it (latent stats, threshold, occupancy)."""
    torch.manual_seed(0)
    cfg = AEConfig(resolution=resolution, channels=(4, 8, 8), latent_channels=latent_channels)
    meta = AEMeta(threshold=0.5, occupancy={str(resolution): OCC}, holdout=holdout or {},
                  latent_mean=[0.05] * latent_channels if with_stats else None,
                  latent_std=[0.5] * latent_channels if with_stats else None)
    save_checkpoint(path, Checkpoint(kind="autoencoder", model_config=to_dict(cfg), model=VoxelAutoencoder(cfg)
                                     .state_dict(), meta=meta))
    return path


def make_ldm_ckpt(path: Path, use_cfg: bool = True, num_classes: int = 3, side: int = 4,
                  timesteps: int = 100) -> Path:
    """A randomly initialised tiny LDM checkpoint (no training needed to test the plumbing)."""
    torch.manual_seed(1)
    unet = UNetConfig(**{**to_dict(TINY_UNET), "ch_mult": (1, 2), "attn_levels": (1,), "num_classes": num_classes})
    model = UNet3D(unet)
    cfg = LDMTrainConfig(use_cfg=use_cfg, cfg_dropout=0.1 if use_cfg else 0.0, model=unet,
                         scheduler=SchedulerConfig(num_train_timesteps=timesteps))
    meta = LDMMeta(latent_shape=[16, side, side, side], use_cfg=use_cfg, scheduler=to_dict(cfg.scheduler))
    save_checkpoint(path, Checkpoint(kind="ldm", model_config=to_dict(unet), train_config=to_dict(cfg),
                                     model=model.state_dict(), ema=model.state_dict(), step=7, meta=meta))
    return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints: an AE at 32³ and 64³, LDMs with and without label dropout, one with 5 classes."""
    d = tmp_path_factory.mktemp("ckpts")
    return {"ae": make_ae_ckpt(d / "ae.pt"), "ldm": make_ldm_ckpt(d / "ldm.pt"),
            "ldm_nocfg": make_ldm_ckpt(d / "ldm_nocfg.pt", use_cfg=False),
            "ldm_5cls": make_ldm_ckpt(d / "ldm_5cls.pt", num_classes=5),
            "ae64": make_ae_ckpt(d / "ae64.pt", resolution=64)}
