"""Shared fixtures. Tests run on CPU with tiny data the tests make themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


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
