"""One scorer for eval.py and the pipeline: load a category's references once, score any number of sample sets.

    refs = References.load("data/hdf5_data", "chair")            # test then val, extracted and hashed in one pass
    out = score_sets(refs, {"model": "samples/chair.npy", "oracle": oracle_array}, workers=4)
    out["provenance"], out["sets"]["model"]["mmd"]

The numbers are voxdiff.metrics.evaluate's (the definitions live there); this module adds what a report needs around
them: one provenance record (what was compared, hashed and how) and a count of "bloated" samples, i.e. shapes with
more than twice the occupied voxels of the largest training shape (a generator that fills space scores badly on
Chamfer-based metrics for a reason the four numbers do not name). Every set also carries evaluate's stray and
fragmented shares, its own (sample_*) beside the references' (ref_*). Torch is never imported here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxdiff import __version__, metrics
from voxdiff.config import category_index
from voxdiff.data.voxelize import open_voxels, voxel_path
from voxdiff.errors import VoxdiffError
from voxdiff.files import open_npy
from voxdiff.metrics import GridSet, VoxelPoints

REF_SPLITS: tuple[str, ...] = ("test", "val")  # the reference set is test then val, concatenated
BLOAT_FACTOR = 2  # a sample is bloated above BLOAT_FACTOR × the largest training shape's occupied voxels

DEFINITIONS: dict[str, str] = {
    "points": "indices of voxels > 0 divided by (R-1)",
    "chamfer": "mean_y min_x |x-y|^2 + mean_x min_y |x-y|^2 (squared, no sqrt)",
    "mmd": "mean over references of min over samples of CD",
    "cov": "distinct nearest references of samples / N_ref",
    "jsd": "per-voxel sums normalised; KL with eps=1e-10 on both arguments; natural log",
    "nna": "leave-one-out 1-NN accuracy over samples and references under CD; a fraction in [0, 1], 0.5 is ideal",
    "nna_balanced": "1-NNA on the first min(N_sample, N_ref) items of each set (its 0.5 optimum assumes equal sizes)",
    "bloated": f"samples with more occupied voxels than {BLOAT_FACTOR} x the largest training shape of the category",
    "stray": "share of the set's occupied voxels with none of their 6 face neighbours occupied (sample_stray; "
             "ref_stray for the references)",
    "fragmented": "share of the set's non-empty shapes whose largest 26-connected component holds less than half of "
                  "their voxels (sample_fragmented; ref_fragmented for the references)",
}


@dataclass
class References:
    """A category's reference shapes (test then val), extracted once and hashed, plus the train split's size bound."""

    category: str
    files: list[str]  # file names, in order: ["chair_voxels_test.npy", "chair_voxels_val.npy"]
    sha256: str  # sha256 of the raw bytes of the arrays, in order
    points: VoxelPoints  # occupied voxels of every reference, extracted once
    train_max_voxels: int | None  # largest occupied-voxel count among the TRAIN shapes; None without a train split

    @property
    def count(self) -> int:
        return self.points.n

    @property
    def resolution(self) -> int:
        return self.points.resolution

    @classmethod
    def load(
        cls,
        dataset_path: str | os.PathLike[str],
        category: str,
        splits: Sequence[str] = REF_SPLITS,
        progress: bool = False,
    ) -> References:
        """Read `{category}_voxels_{split}.npy` for each split (validated, indexed and hashed in one streamed pass).

        The train split, when present, is only streamed to find its largest shape (the bound for "bloated").
        """
        try:
            category_index(category)
        except ValueError as e:
            raise VoxdiffError(str(e)) from None
        if not splits:
            raise VoxdiffError("references: no splits given")
        paths = [voxel_path(dataset_path, category, split) for split in splits]
        arrays = [open_voxels(p) for p in paths]
        hasher = hashlib.sha256()
        points = metrics.extract_points(arrays, name="references", hasher=hasher, progress=progress)
        train = voxel_path(dataset_path, category, "train")
        train_max = _max_voxels(open_voxels(train), points.resolution) if train.is_file() else None
        return cls(category, [p.name for p in paths], hasher.hexdigest(), points, train_max)


def _max_voxels(arr: np.ndarray, resolution: int) -> int | None:
    """Largest count of non-zero voxels per shape in a (N,R,R,R) array, streamed in ≤ 128 MiB chunks (None if N = 0)."""
    if arr.shape[1] != resolution:
        raise VoxdiffError(f"the train split is {arr.shape[1]}³ but the references are {resolution}³")
    if arr.shape[0] == 0:
        return None
    step = max(1, (1 << 27) // (resolution**3 * arr.dtype.itemsize))
    chunks = (arr[i0 : i0 + step].reshape(-1, resolution**3) for i0 in range(0, arr.shape[0], step))
    return max(int(np.count_nonzero(c, axis=1).max()) for c in chunks)


def open_samples(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a samples .npy with a clear one-line error for a missing or unreadable file (files.open_npy: a text
    file or an archive named .npy is "not a .npy file", never numpy's "pickled (object) data")."""
    p = Path(path)
    if p.is_dir():
        raise VoxdiffError(f"{p} is a directory; expected a samples .npy file")
    if not p.is_file():
        raise VoxdiffError(f"samples file not found: {p}")
    return open_npy(p)


def provenance(
    references: References,
    *,
    threshold: float | None = None,
    device: Any = "cpu",
    engine: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The record of what a score compared against and how: the same keys for eval.py and the pipeline."""
    return {
        "category": references.category,
        "reference_files": list(references.files),
        "reference_count": references.count,
        "reference_sha256": references.sha256,
        "sha256_of": f"raw bytes of the arrays in {' then '.join(references.files)}, concatenated in order",
        "resolution": references.resolution,
        "threshold": threshold,
        "seed": seed,
        "voxdiff_version": __version__,
        "device": str(device),
        "engine": metrics.resolve_engine(engine, device),
        "train_max_voxels": references.train_max_voxels,
        "definitions": dict(DEFINITIONS),
    }


def score_sets(
    references: References,
    sets: Mapping[str, GridSet | str | os.PathLike[str]],
    *,
    threshold: float | None = None,
    device: Any = "cpu",
    engine: str | None = None,
    workers: int = 1,
    seed: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score any number of sample sets against the same references (extracted once).

    sets: name -> (N,R,R,R) array / list of arrays / VoxelPoints, or the path of a .npy (memory-mapped). Each result
    is metrics.evaluate's dict (sample_stray / ref_stray, sample_fragmented / ref_fragmented included) plus
    `n_bloated_samples` and `bloated_above_voxels` (None when the references have no
    train bound), and `file` for a set given as a path. `threshold` binarises every set (x > threshold); `seed` is
    recorded only. Returns {"provenance": {...}, "sets": {name: result}} in the order of `sets`.
    """
    if not sets:
        raise VoxdiffError("no sample sets to score")
    prov = provenance(references, threshold=threshold, device=device, engine=engine, seed=seed)
    paths = {name: Path(s) for name, s in sets.items() if isinstance(s, (str, os.PathLike))}
    opened = {name: open_samples(p) for name, p in paths.items()}  # every file checked before any is scored
    bound = BLOAT_FACTOR * references.train_max_voxels if references.train_max_voxels is not None else None
    results: dict[str, Any] = {}
    for name, s in sets.items():
        pts = metrics.extract_points(opened.get(name, s), threshold=threshold, name=name, progress=progress)
        res = metrics.evaluate(pts, references.points, device=device, progress=progress, engine=engine, workers=workers)
        res["n_bloated_samples"] = int((pts.counts > bound).sum()) if bound is not None else None
        res["bloated_above_voxels"] = bound
        if name in paths:
            res["file"] = str(paths[name])
        results[name] = res
    return {"provenance": prov, "sets": results}


def copying_check(samples: GridSet, train: GridSet, heldout: GridSet, *, max_train: int | None = None,
                  max_samples: int = 100, seed: int = 0, workers: int = 1) -> dict[str, Any]:
    """Is the generator reproducing its training shapes? Median Chamfer distance from each sample to its nearest
    training shape, next to the same figure for held-out shapes (test) that the model never saw.

    A ratio near 1 means samples are as far from the training set as new shapes of the family are; a ratio far below 1
    means training shapes are being reproduced (a copied training shape is at distance 0). Every training shape is a
    candidate by default, so no copy can hide in a part of the training set that was left out; `max_train` bounds the
    cost with a seeded subset (the same for both figures). The first `max_samples` samples and held-out shapes are used.
    """
    n_train = len(_as_array(train))
    if max_train is not None and max_train < n_train:
        keep = np.sort(np.random.default_rng(seed).choice(n_train, max_train, replace=False))
        train_grids = _subset(train, keep)
    else:
        keep, train_grids = np.arange(n_train), train
    backend = metrics.Backend(workers=workers)

    def nearest(grids: GridSet) -> np.ndarray:
        d = metrics.chamfer_matrix(_first(grids, max_samples), train_grids, backend)
        return d.min(axis=1)

    s, h = nearest(samples), nearest(heldout)
    s_med, h_med = float(np.median(s[np.isfinite(s)])) if np.isfinite(s).any() else float("inf"), float(np.median(h))
    return {"samples_median": s_med, "heldout_median": h_med, "ratio": s_med / h_med if h_med > 0 else float("inf"),
            "n_samples": int(len(s)), "n_heldout": int(len(h)), "n_train": int(len(keep))}


def _as_array(grids: GridSet) -> np.ndarray:
    return np.concatenate([np.asarray(a) for a in grids]) if isinstance(grids, (list, tuple)) else grids


def _subset(grids: GridSet, rows: np.ndarray) -> np.ndarray:
    return np.asarray(_as_array(grids)[rows])


def _first(grids: GridSet, n: int) -> np.ndarray:
    return np.asarray(_as_array(grids)[:n])
