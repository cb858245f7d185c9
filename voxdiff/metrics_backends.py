"""How the one-sided Chamfer sums of voxdiff.metrics are computed fast: numpy in-process, numpy in worker processes,
or torch on a device. All three give the same exact integers; the definitions live in voxdiff.metrics.

H[i, j] = Σ_{q in target j} EDT²_i(q), where EDT²_i is the squared distance transform of source shape i (the
`transform` the caller passes in: voxdiff.metrics.edt_sq on the numpy paths; a min-plus transform here on torch).
Each backend fills the rows of H for a list of source shapes (sorted flat voxel indices); rows of empty sources are
NaN. `update(k)` is called after every k rows (a progress bar's update).

Imports run one way: voxdiff.metrics imports this module, never the reverse (the transform is passed in, and a
`Targets` is built from plain arrays). Torch is imported only inside the torch path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
from scipy import sparse

MIN_PARALLEL_SHAPES = 64  # below this many source shapes the CPU path stays in-process
Transform = Callable[[np.ndarray, int], np.ndarray]  # (indices, R) -> flat (R³,) squared EDT, integer-valued
Update = Callable[[int], Any]


@dataclass
class Targets:
    """The shapes whose voxels the transforms are read at: union U of their voxels and a (n × |U|) 0/1 CSR matrix."""

    union: np.ndarray  # sorted flat voxel indices (|U|,)
    inverse: np.ndarray  # position in `union` of each target point (P,), int64
    offsets: np.ndarray  # (n + 1,)
    matrix: Any = None  # scipy CSR, built lazily (numpy engine)

    @classmethod
    def build(cls, indices: np.ndarray, offsets: np.ndarray) -> Targets:
        """From concatenated sorted flat indices and their (n + 1,) offsets (a VoxelPoints' arrays)."""
        union, inverse = np.unique(indices, return_inverse=True)
        return cls(union, inverse.astype(np.int64).ravel(), offsets)

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def csr(self) -> Any:
        if self.matrix is None:
            data = np.ones(len(self.inverse), np.float64)
            self.matrix = sparse.csr_matrix((data, self.inverse, self.offsets), shape=(self.n, len(self.union)))
        return self.matrix


def device_type(device: Any) -> str:
    """'cpu', 'cuda', ... of a device given as a string, a torch.device or None (= cpu), without importing torch."""
    return str(device).split(":")[0] if device is not None else "cpu"


def default_workers() -> int:
    """Worker processes for the CPU path: the usable cores (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- numpy, in this process


_WORKER: dict[str, Any] = {}  # the targets / resolution / transform of this process (set by _init_worker)


def _init_worker(targets: Targets, resolution: int, transform: Transform) -> None:
    _WORKER["targets"] = targets
    _WORKER["resolution"] = resolution
    _WORKER["transform"] = transform
    targets.csr()


def _rows_numpy(sources: list[np.ndarray]) -> np.ndarray:
    """H rows for some source shapes: H[i, j] = Σ_{q in target j} EDT²_i(q), exact integers in float64."""
    targets: Targets = _WORKER["targets"]
    res: int = _WORKER["resolution"]
    transform: Transform = _WORKER["transform"]
    out = np.full((len(sources), targets.n), np.nan)
    for k, idx in enumerate(sources):
        if len(idx):
            out[k] = targets.csr() @ transform(idx, res)[targets.union]  # Σ over each target's voxels
    return out


def sums_numpy(
    sources: list[np.ndarray], targets: Targets, resolution: int, transform: Transform, *, workers: int, update: Update
) -> np.ndarray:
    """H on the CPU: in this process for small jobs or workers <= 1, else in `workers` spawned processes."""
    h = np.empty((len(sources), targets.n), np.float64)
    if workers <= 1 or len(sources) < MIN_PARALLEL_SHAPES:  # small jobs: process start-up costs more than it saves
        _init_worker(targets, resolution, transform)
        try:
            for i0 in range(0, len(sources), 16):
                h[i0 : i0 + 16] = _rows_numpy(sources[i0 : i0 + 16])
                update(len(sources[i0 : i0 + 16]))
        finally:
            _WORKER.clear()
        return h
    step = max(1, min(32, math.ceil(len(sources) / (4 * workers))))
    ctx = get_context("spawn")  # never fork a process that may hold torch/OpenMP threads
    initargs = (targets, resolution, transform)  # the transform is pickled by reference (a module-level function)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool:
        futures = {pool.submit(_rows_numpy, sources[i0 : i0 + step]): i0 for i0 in range(0, len(sources), step)}
        for fut in as_completed(futures):
            rows = fut.result()
            i0 = futures[fut]
            h[i0 : i0 + len(rows)] = rows
            update(len(rows))
    return h


# ------------------------------------------------------------------------------------------------------- torch


def _edt_sq_torch(sources: list[np.ndarray], resolution: int, device: Any, budget: int) -> Any:
    """Exact squared EDT of a batch of non-empty shapes on `device`: three separable min-plus passes.

    Felzenszwalb & Huttenlocher's decomposition, d²(x,y,z) = min_i [(x-i)² + min_j [(y-j)² + min_k [(z-k)² + f]]],
    each pass evaluated brute force (O(R) per voxel) in int32, so the integers equal the CPU transform's.
    """
    import torch  # lazily: eval.py and the numpy paths must start without importing torch

    res = resolution
    b = len(sources)
    big = 1 << 30  # "no site yet"; big + 3·(R-1)² stays below 2^31 for R ≤ 256
    g = torch.full((b, res**3), big, dtype=torch.int32, device=device)
    rows = torch.repeat_interleave(torch.arange(b), torch.tensor([len(s) for s in sources]))
    cols = torch.from_numpy(np.concatenate(sources).astype(np.int64))
    g[rows.to(device), cols.to(device)] = 0
    g = g.view(b, res, res, res)
    ar = torch.arange(res, device=device, dtype=torch.int32)
    sq = (ar[:, None] - ar[None, :]) ** 2  # (i, j) -> (i - j)²
    chunk = max(1, min(res, budget // (b * res**3 * 4)))  # (b, R, R, chunk, R) int32 per step
    for axis in (3, 2, 1):  # 1. along z, 2. along y, 3. along x
        x = g.movedim(axis, -1).contiguous()
        out = torch.empty_like(x)
        for i0 in range(0, res, chunk):
            out[..., i0 : i0 + chunk] = (x.unsqueeze(-2) + sq[i0 : i0 + chunk]).amin(dim=-1)
        g = out.movedim(-1, axis)
    return g.reshape(b, -1)


def _rows_torch(sources: list[np.ndarray], targets: Targets, resolution: int, device: Any, batch: int) -> np.ndarray:
    """Same H rows as `_rows_numpy`, computed with torch on `device` (int64 segment sums, then float64)."""
    import torch  # lazily: eval.py and the numpy paths must start without importing torch

    union = torch.from_numpy(targets.union.astype(np.int64)).to(device)
    inverse = torch.from_numpy(targets.inverse).to(device)
    starts = torch.from_numpy(targets.offsets[:-1]).to(device)
    ends = torch.from_numpy(targets.offsets[1:]).to(device)
    budget = (1 << 31) if torch.device(device).type == "cuda" else (1 << 27)
    out = np.full((len(sources), targets.n), np.nan)
    todo = [k for k, s in enumerate(sources) if len(s)]
    for i0 in range(0, len(todo), batch):
        ks = todo[i0 : i0 + batch]
        d2 = _edt_sq_torch([sources[k] for k in ks], resolution, device, budget)
        vals = d2.index_select(1, union).to(torch.int64).index_select(1, inverse)  # (b, P) at every target point
        csum = torch.nn.functional.pad(torch.cumsum(vals, dim=1), (1, 0))
        h = csum.index_select(1, ends) - csum.index_select(1, starts)  # segment sums, exact int64
        out[ks] = h.cpu().numpy().astype(np.float64)
    return out


def sums_torch(
    sources: list[np.ndarray], targets: Targets, resolution: int, device: Any, *, update: Update
) -> np.ndarray:
    """H with torch on `device` (batches of 8 transforms on CUDA, 2 elsewhere); same integers as `sums_numpy`."""
    batch = 8 if device_type(device) == "cuda" else 2
    step = batch * 8
    h = np.empty((len(sources), targets.n), np.float64)
    for i0 in range(0, len(sources), step):
        h[i0 : i0 + step] = _rows_torch(sources[i0 : i0 + step], targets, resolution, device, batch)
        update(len(sources[i0 : i0 + step]))
    return h
