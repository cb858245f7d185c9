"""Latent cache: encode a voxel split with the frozen AE once, keep it on disk, reuse it across LDM runs.

A cache file is keyed by the AE checkpoint's content hash, the AE resolution, the split, the categories and the identity
(name, size, mtime) of the voxel files, so a retrained AE or regenerated data never reuses stale latents. Latents are
stored raw (unnormalised); the per-channel statistics that normalise them are data of the AE checkpoint
(`AEMeta.latent_mean` / `latent_std`), applied by `normalise` / `denormalise`. A cache file that cannot be read
(truncated by an interrupted copy, damaged) or does not fit the split is encoded again, with one warning line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from voxdiff.data.dataset import VoxelDataset, voxel_path
from voxdiff.files import atomic_path
from voxdiff.logs import Progress

__all__ = ["normalise", "denormalise", "encode_dataset", "cached_latents"]


def _per_channel(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return v.to(z.device, z.dtype).reshape(1, -1, *([1] * (z.ndim - 2)))


def normalise(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(z − mean) / std per channel (channel axis 1): roughly unit-variance latents for the diffusion model."""
    return (z - _per_channel(mean, z)) / _per_channel(std, z)


def denormalise(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalise`: z · std + mean per channel."""
    return z * _per_channel(std, z) + _per_channel(mean, z)


@torch.no_grad()
def encode_dataset(
    ae: torch.nn.Module, dataset: VoxelDataset, device: torch.device, batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Encode every grid of `dataset` with the (eval-mode) AE: float32 (N, C, r, r, r) latents and int64 labels."""
    ae = ae.eval().to(device)
    out: list[np.ndarray] = []
    n = len(dataset)
    bar = Progress(n, "encode latents", unit="shape", enabled=progress)
    for s in range(0, n, batch_size):
        grids = np.stack([dataset.grid(i) for i in range(s, min(n, s + batch_size))])
        x = torch.from_numpy(grids).to(device=device, dtype=torch.float32).unsqueeze(1)
        out.append(ae.encode(x).float().cpu().numpy())
        bar.update(len(grids))
    bar.close()
    return np.concatenate(out), dataset.class_indices()


def _cache_key(ae_hash: str, resolution: int, root: Path, split: str, categories: Sequence[str]) -> str:
    files = []
    for c in categories:
        p = voxel_path(root, c, split)
        st = p.stat()
        files.append([p.name, st.st_size, st.st_mtime_ns])
    ident = {"ae": ae_hash, "resolution": resolution, "split": split, "categories": list(categories), "files": files}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_latents(
    ae: torch.nn.Module,
    ae_hash: str,
    dataset_path: str | os.PathLike[str],
    split: str,
    categories: Sequence[str],
    cache_dir: str | os.PathLike[str],
    device: torch.device,
    progress: bool = True,
    log: logging.Logger | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """Raw latents (N,C,r,r,r) float32 and labels (N,) of one split, from `cache_dir` or encoded once and cached.

    Returns (latents, labels, cache file). The cache file appears atomically, so an interrupted encode leaves nothing;
    one that cannot be read or does not match the split is rebuilt, saying so on `log` (default: the LDM trainer's
    logger, "voxdiff.ldm", which writes train.log and stderr).
    """
    log = log if log is not None else logging.getLogger("voxdiff.ldm")
    resolution = int(ae.cfg.resolution)
    dataset = VoxelDataset(dataset_path, split, tuple(categories), resolution=resolution)
    key = _cache_key(ae_hash, resolution, Path(dataset_path), split, categories)
    file = Path(cache_dir) / f"{split}_r{resolution}_{key}.npz"
    if file.is_file():
        try:
            z, y = _read_cache(file, dataset.class_indices())
            return torch.from_numpy(z), torch.from_numpy(y), file
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("latent cache %s cannot be used (%s); encoding the %s split again", file, why, split)
    z, y = encode_dataset(ae, dataset, device, progress=progress)
    with atomic_path(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, latents=z, labels=y)
    return torch.from_numpy(z), torch.from_numpy(y), file


def _read_cache(file: Path, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latents and labels of a cache file, read in full (so a truncated or damaged member fails here, on its CRC),
    checked against the split's labels; ValueError when they do not fit."""
    with np.load(file, allow_pickle=False) as data:
        z, y = np.asarray(data["latents"]), np.asarray(data["labels"])
    if z.ndim != 5 or len(z) != len(labels) or not np.array_equal(y, labels):
        raise ValueError(f"it holds {z.shape} latents for {len(y)} labels, the split has {len(labels)} shapes")
    if not np.isfinite(z).all():
        raise ValueError("it holds non-finite latents")
    return z, y
