"""What many test files share, as plain functions and constants (the fixtures live in conftest.py): the repository
root, the environment for CLIs run in subprocesses, tiny network configs, toy voxel data and tiny checkpoints written
the way the trainers write them.

Import from here (`from helpers import make_ae_ckpt`), not from conftest: pytest puts tests/ on sys.path, and so do
the bench scripts that reuse these helpers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from voxdiff.checkpoint import AEMeta, Checkpoint, LDMMeta, save_checkpoint
from voxdiff.config import AEConfig, LDMTrainConfig, SchedulerConfig, UNetConfig, to_dict
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D

ROOT = Path(__file__).resolve().parents[1]
# For CLIs run in subprocesses: one intra-op thread (the cores are shared) and a backend that needs no display.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": os.environ.get("MPLBACKEND", "Agg")}
TINY_AE = AEConfig(resolution=32, channels=(4, 8, 8))
TINY_UNET = UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_groups=4, num_heads=2,
                       dropout=0.0)
OCC = {"airplane": 40.0, "chair": 120.0, "table": 90.0}  # training occupancy recorded in tiny AE checkpoints


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous, or as a port nothing listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_grid(category: str, res: int, rng: np.random.Generator) -> np.ndarray:
    """A crude but category-specific shape (plates and bars) on a res³ grid, as uint8."""
    g = np.zeros((res, res, res), np.uint8)
    j = lambda lo, hi: int(rng.integers(lo, hi))  # noqa: E731
    m = res // 8
    if category == "table":
        h = j(res // 2, 3 * res // 4)
        g[m : res - m, m : res - m, h] = 1  # top
        for x in (m, res - m - 1):
            for y in (m, res - m - 1):
                g[x, y, m:h] = 1  # legs
    elif category == "chair":
        s = j(res // 3, res // 2)
        g[m : res - m, m : res - m, s] = 1  # seat
        g[m : res - m, m, s : res - m] = 1  # back
        for x in (m, res - m - 1):
            for y in (m, res - m - 1):
                g[x, y, m:s] = 1
    else:  # airplane
        c = res // 2 + j(-2, 3)
        g[m : res - m, c, c] = 1  # fuselage
        w = j(res // 3, res // 2)
        g[c - 1 : c + 1, c - w // 1 + m : c + w - m, c] = 1  # wings
        g[m : m + 2, c - res // 6 : c + res // 6, c] = 1  # tail
    return g


def make_voxel_dir(root: Path, res: int = 32, n: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write `{category}_voxels_{split}.npy` (uint8, (N,res,res,res)) for the three categories into `root`."""
    n = n or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for cat in ("airplane", "chair", "table"):
        for split, count in n.items():
            arr = np.stack([_toy_grid(cat, res, rng) for _ in range(count)])
            np.save(root / f"{cat}_voxels_{split}.npy", arr)
    return root


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
