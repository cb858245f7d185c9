"""Memory-mapped voxel datasets over `{category}_voxels_{split}.npy` files.

Grids are stored at their preprocessing resolution (128³ by default) as uint8/bool; a dataset can serve them at a lower
power-of-two resolution by max-pooling one shape at a time, so a split is never materialised in RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from voxdiff.config import CATEGORIES, SPLITS, category_index

# Re-exported: file naming and opening live with the code that writes the grids (numpy only, so CLIs start fast).
from voxdiff.data.voxelize import downsample_max, open_voxels, voxel_path  # noqa: F401
from voxdiff.utils import VoxdiffError


class VoxelDataset(Dataset):
    """(grid, class index) pairs from one split of several categories, memory-mapped.

    grid: float32 tensor (1, r, r, r) in {0, 1} at `resolution` (max-pooled from the file's resolution).
    class index: position of the category in `voxdiff.config.CATEGORIES` (not the PartSeg label).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        categories: tuple[str, ...] | list[str] = CATEGORIES,
        resolution: int | None = 64,
    ) -> None:
        if split not in SPLITS:
            raise VoxdiffError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        root = Path(root)
        if not root.is_dir():
            raise VoxdiffError(f"dataset directory not found: {root}")
        self.arrays: list[np.ndarray] = []
        self.labels: list[int] = []
        self.offsets: list[int] = [0]
        for c in categories:
            label = category_index(c)
            arr = open_voxels(voxel_path(root, c, split))
            if self.arrays and arr.shape[1:] != self.arrays[0].shape[1:]:
                raise VoxdiffError(f"{c} {split} grids are {arr.shape[1:]}, others {self.arrays[0].shape[1:]}")
            self.arrays.append(arr)
            self.labels.append(label)
            self.offsets.append(self.offsets[-1] + len(arr))
        if not self.arrays:
            raise VoxdiffError("no categories given")
        self.source_resolution = int(self.arrays[0].shape[-1])
        self.resolution = int(resolution or self.source_resolution)
        if self.source_resolution % self.resolution:
            raise VoxdiffError(f"resolution {self.resolution} does not divide the data's {self.source_resolution}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(array number, row) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        a = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return a, index - self.offsets[a]

    def grid(self, index: int) -> np.ndarray:
        """uint8 (r,r,r) grid of one item at the dataset's resolution."""
        a, row = self.locate(index)
        return downsample_max(np.asarray(self.arrays[a][row]) > 0, self.resolution).astype(np.uint8)

    def class_index(self, index: int) -> int:
        return self.labels[self.locate(index)[0]]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.from_numpy(self.grid(index).astype(np.float32))
        return g.unsqueeze(0), self.class_index(index)

    def class_indices(self) -> np.ndarray:
        """Class index of every item, in order (for samplers and latent caches)."""
        return np.concatenate([np.full(len(a), lab, dtype=np.int64) for a, lab in zip(self.arrays, self.labels)])
