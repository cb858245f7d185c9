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
from voxdiff.errors import VoxdiffError
from voxdiff.logs import Progress


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
        self.categories = tuple(categories)
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

    @property
    def counts(self) -> dict[str, int]:
        """Shapes per category, in the dataset's order."""
        return {c: len(a) for c, a in zip(self.categories, self.arrays)}

    def global_indices(self, rows: dict[str, list[int]]) -> np.ndarray:
        """Dataset indices of per-category row numbers (e.g. a held-out slice), in category order."""
        unknown = set(rows) - set(self.categories)
        if unknown:
            raise VoxdiffError(f"rows given for categories {sorted(unknown)} that this dataset does not hold")
        parts = [np.asarray(rows.get(c, []), dtype=np.int64) + off for c, off in zip(self.categories, self.offsets)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def load(self, indices: np.ndarray | None = None, progress: bool = False) -> torch.Tensor:
        """uint8 tensor (n, r, r, r) of the items `indices` (default all) at the dataset's resolution, in RAM.

        Training reads batches from this tensor instead of re-reading and pooling the files every epoch
        (8,451 shapes at 32³ are 277 MB; at 64³, 2.2 GB).
        """
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        res = self.resolution
        out = torch.empty((len(idx), res, res, res), dtype=torch.uint8)
        arr_of = np.searchsorted(self.offsets, idx, side="right") - 1
        chunk = 256
        bar = Progress(len(idx), "loading grids", unit="shape", enabled=progress)
        for s in range(0, len(idx), chunk):  # consecutive rows of one file are read in one slice
            for a in np.unique(arr_of[s : s + chunk]):
                sel = np.nonzero(arr_of[s : s + chunk] == a)[0] + s
                rows = idx[sel] - self.offsets[a]
                grids = downsample_max(np.asarray(self.arrays[a][np.sort(rows)]) > 0, res)
                order = np.argsort(np.argsort(rows))  # back from sorted rows to the requested order
                out[torch.from_numpy(sel)] = torch.from_numpy(grids[order].astype(np.uint8))
            bar.update(min(chunk, len(idx) - s))
        bar.close()
        return out

    def class_indices(self) -> np.ndarray:
        """Class index of every item, in order (for samplers and latent caches)."""
        return np.concatenate([np.full(len(a), lab, dtype=np.int64) for a, lab in zip(self.arrays, self.labels)])
