"""Generation metrics for voxel shapes: JSD, MMD-CD, COV-CD and 1-NNA-CD, exact and fast.

One written definition (matching the course's reference script), tested against a brute-force KD-tree version:

* Point cloud of a grid: indices of voxels > 0, divided by (R - 1), so coordinates lie in [0, 1]³.
* Chamfer: CD(x, y) = mean_{q in y} min_{p in x} |p - q|² + mean_{p in x} min_{q in y} |p - q|²  (squared, no sqrt).
* D = CD matrix (N_sample × N_ref).  MMD = mean over references of the min over samples.
  COV = |{nearest reference of s : s a sample}| / N_ref.
* 1-NNA: leave-one-out 1-NN classification of samples ∪ references under CD; the accuracy is a fraction in [0, 1],
  0.5 is ideal (the two sets are indistinguishable), 1.0 means every item's nearest neighbour comes from its own set.
* JSD: P, Q = per-voxel sums of each set normalised to distributions, M = (P + Q) / 2,
  KL(p, q) = Σ (p + ε) log((p + ε) / (q + ε)) with ε = 1e-10, JSD = (KL(P, M) + KL(Q, M)) / 2 (natural log).

Why it is fast and still exact: voxel centres sit on the integer grid, so every squared distance is an integer. The
exact squared Euclidean distance transform EDT²_a of the complement of shape a (one per shape: N + M transforms, not
N × M pairs) holds min_{p in a} |p - q|² for every voxel q, and the one-sided sums H[a, b] = Σ_{q in b} EDT²_a(q) are
integers, read by a sparse gather over the union of occupied voxels. Then CD(a, b) = (H[a, b] / n_b + H[b, a] / n_a)
/ (R - 1)².  The numpy path (CPU) and the torch path (GPU; a brute-force separable min-plus EDT) produce the same
integers, so they give identical numbers. This module holds the definitions and the plain exact path;
voxdiff.metrics_backends computes the one-sided sums fast (numpy in-process or in worker processes, torch on a device).

Conventions for degenerate input (so that metrics stay finite and comparable):

* An empty sample (no occupied voxel) has CD = +inf to everything: it is never anybody's nearest neighbour, it covers
  nothing (COV), it never gives a reference its minimum (MMD), and in 1-NNA it counts as correctly classified (an empty
  shape is trivially told apart from data, so it is penalised). If *all* samples are empty, MMD = CD_MAX = 6.0 (the
  largest Chamfer distance between two non-empty shapes in the unit cube), COV = 0 and JSD = ln 2 (the maximum JSD).
* An empty reference is refused (VoxdiffError): references are data, an empty one means a broken data file.

Imports: numpy / scipy (+ the optional `edt` package, a faster CPU transform with the same integers: docs/BENCHMARKS.md,
"Evaluation metrics (eval.py / voxdiff.metrics)"), voxdiff.errors, voxdiff.logs and voxdiff.metrics_backends, which
imports torch only inside its torch path (so that eval.py starts without torch).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from voxdiff import metrics_backends as backends
from voxdiff.errors import VoxdiffError
from voxdiff.logs import Progress

try:  # optional: seung-lab's multi-label EDT, exact and faster than scipy's on these grids (module docstring)
    import edt as _edt
except ImportError:  # pragma: no cover - depends on the environment
    _edt = None

EPS = 1e-10  # JSD's epsilon, added to both arguments of the KL log-ratio
CD_MAX = 6.0  # largest CD between non-empty shapes in [0, 1]³ (3 + 3): MMD's value when every sample is empty
MAX_POINTS = 200_000_000  # total occupied voxels we agree to index (≈ 5 GB of index arrays); beyond: clear error
Engine = Literal["numpy", "torch"]
GridSet = Any  # np.ndarray (N,R,R,R), a sequence of such arrays (concatenated in order), or VoxelPoints


@dataclass
class VoxelPoints:
    """Occupied voxels of a set of shapes, as sorted flat indices (x·R² + y·R + z), concatenated.

    indices[offsets[i]:offsets[i+1]] are shape i's voxels; `occupancy` counts, per voxel, how many shapes occupy it
    (the sum of the binary grids over the set, which is all JSD needs).
    """

    resolution: int
    indices: np.ndarray  # int32/int64 (P,)
    offsets: np.ndarray  # int64 (n + 1,)
    occupancy: np.ndarray  # int64 (R³,)

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        """Occupied voxels per shape (int64, (n,))."""
        return np.diff(self.offsets)

    def shape_indices(self, i: int) -> np.ndarray:
        return self.indices[self.offsets[i] : self.offsets[i + 1]]


# ----------------------------------------------------------------------------------------------------------- input


def _as_list(grids: Any) -> list[Any]:
    if isinstance(grids, np.ndarray) or hasattr(grids, "shape"):
        return [grids]
    if isinstance(grids, Sequence) and len(grids) > 0:
        return list(grids)
    raise VoxdiffError(f"expected an (N,R,R,R) array or a list of them; got {type(grids).__name__}")


def extract_points(
    grids: GridSet,
    *,
    threshold: float | None = None,
    name: str = "samples",
    hasher: Any = None,
    progress: bool = False,
) -> VoxelPoints:
    """Validate a set of voxel grids and return their occupied voxels (streamed in chunks: memmaps stay on disk).

    Accepts bool, integer or float grids of shape (N,R,R,R). Without `threshold` the values must be exactly 0/1
    (anything else is refused with a hint); with it, `x > threshold` is the occupancy. NaN/inf are refused.
    `hasher` (e.g. hashlib.sha256()) is updated with the raw bytes of the arrays in order, for provenance.
    """
    if isinstance(grids, VoxelPoints):
        return grids
    arrays = _as_list(grids)
    res: int | None = None
    for a in arrays:
        if a.ndim != 4 or not (a.shape[1] == a.shape[2] == a.shape[3]):
            raise VoxdiffError(f"{name} must be (N,R,R,R) voxel grids; got shape {tuple(a.shape)}")
        if a.dtype.kind not in "biuf":
            raise VoxdiffError(f"{name} must be bool, integer or float grids; got dtype {a.dtype}")
        if res is not None and a.shape[1] != res:
            raise VoxdiffError(f"{name}: parts have different resolutions ({res}³ and {a.shape[1]}³)")
        res = int(a.shape[1])
    assert res is not None
    if res < 2:
        raise VoxdiffError(f"{name}: resolution must be at least 2; got {res}")
    n_total = sum(int(a.shape[0]) for a in arrays)
    if n_total == 0:
        raise VoxdiffError(f"{name}: the set is empty (0 shapes)")
    vox = res**3
    idx_dtype = np.int32 if vox < 2**31 else np.int64
    occupancy = np.zeros(vox, np.int64)
    parts: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    bar = Progress(n_total, f"reading {name}", unit="shape", enabled=progress)
    base = 0
    for a in arrays:
        step = max(1, (1 << 27) // (vox * a.dtype.itemsize))  # ≤ 128 MiB per chunk
        for i0 in range(0, a.shape[0], step):
            c = np.ascontiguousarray(a[i0 : i0 + step])
            if hasher is not None:
                hasher.update(memoryview(c).cast("B"))
            k = c.shape[0]
            flat = c.reshape(k, -1)
            if c.dtype.kind == "f":
                finite = np.isfinite(flat).all(axis=1)
                if not finite.all():
                    raise VoxdiffError(f"{name}: shape {base + i0 + int(np.argmin(finite))} contains NaN or inf")
            if c.dtype.kind == "b":
                occ = flat
            elif threshold is not None:
                occ = flat > threshold
            else:
                ok = ((flat == 0) | (flat == 1)).all(axis=1)
                if not ok.all():
                    j = int(np.argmin(ok))
                    lo, hi = float(flat[j].min()), float(flat[j].max())
                    raise VoxdiffError(
                        f"{name}: shape {base + i0 + j} has values outside {{0, 1}} (min {lo:g}, max {hi:g}); "
                        "binarise first or pass --threshold 0.5 (occupied = x > 0.5)"
                    )
                occ = flat != 0
            rows, cols = np.nonzero(occ)  # row-major: sorted by shape, then by flat index
            counts.append(np.bincount(rows, minlength=k))
            parts.append(cols.astype(idx_dtype))
            occupancy += np.bincount(cols, minlength=vox)
            bar.update(k)
        base += int(a.shape[0])
    bar.close()
    offsets = np.zeros(n_total + 1, np.int64)
    np.cumsum(np.concatenate(counts), out=offsets[1:])
    if offsets[-1] > MAX_POINTS:
        raise VoxdiffError(
            f"{name}: {offsets[-1]} occupied voxels in total (mean {offsets[-1] / n_total:.0f} per shape) is too dense "
            f"to score (limit {MAX_POINTS}); check the binarisation (e.g. --threshold)"
        )
    return VoxelPoints(res, np.concatenate(parts) if parts else np.zeros(0, idx_dtype), offsets, occupancy)


# ------------------------------------------------------------------------------------------------------------- JSD


def jsd_counts(p_counts: np.ndarray, q_counts: np.ndarray, eps: float = EPS) -> float:
    """Jensen-Shannon divergence (nats) between two per-voxel occupancy sums (the reference definition).

    1. P = p / Σp, Q = q / Σq (a set with no occupied voxel at all gives the maximum, ln 2, by convention)
    2. M = (P + Q) / 2
    3. KL(a, b) = Σ (a + ε) log((a + ε) / (b + ε))
    4. JSD = (KL(P, M) + KL(Q, M)) / 2
    """
    p = np.asarray(p_counts, np.float64).ravel()
    q = np.asarray(q_counts, np.float64).ravel()
    if p.shape != q.shape:
        raise VoxdiffError(f"JSD: grids differ in size ({p.size} vs {q.size} voxels)")
    if p.sum() == 0 or q.sum() == 0:
        return math.log(2.0)
    p = p / p.sum()  # 1.
    q = q / q.sum()
    m = (p + q) / 2  # 2.

    def kl(a: np.ndarray, b: np.ndarray) -> float:  # 3.
        return float(np.sum((a + eps) * np.log((a + eps) / (b + eps))))

    return (kl(p, m) + kl(q, m)) / 2  # 4.


def jsd(samples: GridSet, references: GridSet, *, threshold: float | None = None) -> float:
    """JSD between two sets of (N,R,R,R) grids (see `jsd_counts`); `threshold` binarises the samples (x > t)."""
    sample_pts = extract_points(samples, threshold=threshold, name="samples")
    ref_pts = extract_points(references, name="references")
    if sample_pts.resolution != ref_pts.resolution:
        raise VoxdiffError(f"samples are {sample_pts.resolution}³ but references are {ref_pts.resolution}³")
    return jsd_counts(sample_pts.occupancy, ref_pts.occupancy)


# ------------------------------------------------------------------------------------------- exact Chamfer, numpy


def edt_sq(indices: np.ndarray, resolution: int) -> np.ndarray:
    """Exact squared Euclidean distance (voxel units², integer-valued) from every voxel to the nearest occupied one.

    Flat (R³,) float array; uses the `edt` package when installed, otherwise scipy (both exact, rounded to integers).
    `indices` must be non-empty (the transform of an empty shape is undefined).
    """
    grid = np.ones(resolution**3, np.uint8)
    grid[indices] = 0
    grid = grid.reshape((resolution,) * 3)
    if _edt is not None:
        d2 = _edt.edtsq(grid, black_border=False, parallel=1)  # float32, exact integers (< 2^24)
    else:
        d = ndimage.distance_transform_edt(grid)
        d2 = d * d
    return np.rint(d2).ravel()


# ------------------------------------------------------------------------------------------------ Chamfer matrices


def resolve_engine(engine: str | None, device: Any = "cpu") -> str:
    """The engine a computation uses: `engine` when given (numpy or torch), else torch on CUDA and numpy elsewhere."""
    engine = engine or ("torch" if backends.device_type(device) == "cuda" else "numpy")
    if engine not in ("numpy", "torch"):
        raise VoxdiffError(f"engine must be numpy or torch; got {engine!r}")
    return engine


@dataclass(frozen=True)
class Backend:
    """How the one-sided sums are computed: engine "numpy" (the default on CPU; `workers` > 1 uses processes) or
    "torch" on `device` (the default on CUDA). Both give the same integers (voxdiff.metrics_backends)."""

    device: Any = "cpu"
    engine: Engine | None = None
    workers: int = 1
    progress: bool = False


def one_sided_sums(sources: VoxelPoints, targets: VoxelPoints, backend: Backend = Backend()) -> np.ndarray:
    """H (n_src × n_tgt), H[i, j] = Σ_{q in target j} min_{p in source i} |p - q|² in voxel units (exact integers).

    Rows of empty sources are NaN.
    """
    if sources.resolution != targets.resolution:
        raise VoxdiffError(f"resolutions differ: {sources.resolution}³ vs {targets.resolution}³")
    engine = resolve_engine(backend.engine, backend.device)
    tg = backends.Targets.build(targets.indices, targets.offsets)
    src = [sources.shape_indices(i) for i in range(sources.n)]
    bar = Progress(sources.n, f"chamfer ({engine})", unit="shape", enabled=backend.progress)
    try:
        if engine == "torch":
            return backends.sums_torch(src, tg, sources.resolution, backend.device, update=bar.update)
        return backends.sums_numpy(src, tg, sources.resolution, edt_sq, workers=backend.workers, update=bar.update)
    finally:
        bar.close()


def _cd_from_sums(h_ab: np.ndarray, h_ba: np.ndarray, n_a: np.ndarray, n_b: np.ndarray, res: int) -> np.ndarray:
    """CD(a, b) = (H[a,b] / n_b + H[b,a] / n_a) / (R-1)²; +inf where either shape is empty."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (h_ab / n_b[None, :] + h_ba.T / n_a[:, None]) / float((res - 1) ** 2)
    d[n_a == 0, :] = np.inf
    d[:, n_b == 0] = np.inf
    return d


def chamfer_matrix(a: GridSet, b: GridSet, backend: Backend = Backend()) -> np.ndarray:
    """Exact Chamfer matrix D[i, j] = CD(a_i, b_j) (float64, unit-cube coordinates, squared distances).

    One EDT per shape (len(a) + len(b) transforms). Empty shapes give +inf rows/columns.
    """
    pa = extract_points(a, name="a")
    pb = extract_points(b, name="b")
    h_ab, h_ba = one_sided_sums(pa, pb, backend), one_sided_sums(pb, pa, backend)
    return _cd_from_sums(h_ab, h_ba, pa.counts, pb.counts, pa.resolution)


def _concat(first: VoxelPoints, second: VoxelPoints) -> VoxelPoints:
    idx = np.concatenate([first.indices, second.indices.astype(first.indices.dtype)])
    off = np.concatenate([first.offsets, second.offsets[1:] + first.offsets[-1]])
    return VoxelPoints(first.resolution, idx, off, first.occupancy + second.occupancy)


def chamfer_blocks(samples: GridSet, references: GridSet,
                   backend: Backend = Backend()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D_ss, D_sr, D_rr): every Chamfer distance among samples ∪ references, from N + M transforms.

    D_sr is the (N_sample × N_ref) matrix of MMD/COV; all three feed 1-NNA.
    """
    sample_pts = extract_points(samples, name="samples")
    ref_pts = extract_points(references, name="references")
    if sample_pts.resolution != ref_pts.resolution:
        raise VoxdiffError(f"samples are {sample_pts.resolution}³ but references are {ref_pts.resolution}³")
    both = _concat(sample_pts, ref_pts)
    h = one_sided_sums(both, both, backend)
    d = _cd_from_sums(h, h, both.counts, both.counts, sample_pts.resolution)
    n = sample_pts.n
    return d[:n, :n], d[:n, n:], d[n:, n:]


# --------------------------------------------------------------------------------------------- scores from matrices


def mmd_cov(d: np.ndarray) -> tuple[float, float]:
    """(MMD, COV) from D (N_sample × N_ref).

    1. MMD = mean over references j of min_i D[i, j]; a reference with only +inf (every sample empty) counts CD_MAX.
    2. COV = |{argmin_j D[i, j] : sample i not empty}| / N_ref  (ties: the first reference).
    """
    d = np.asarray(d, np.float64)
    col_min = d.min(axis=0)
    mmd = float(np.where(np.isfinite(col_min), col_min, CD_MAX).mean())  # 1.
    live = np.isfinite(d).any(axis=1)
    nearest = np.argmin(d[live], axis=1) if live.any() else np.zeros(0, np.int64)
    cov = len(np.unique(nearest)) / d.shape[1]  # 2.
    return mmd, float(cov)


def one_nna(d_ss: np.ndarray, d_sr: np.ndarray, d_rr: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy over samples ∪ references (fraction in [0, 1]; 0.5 is ideal).

    1. Full matrix [[D_ss, D_sr], [D_srᵀ, D_rr]] with +inf on the diagonal (an item is not its own neighbour).
    2. Each item's nearest other item (ties: the first, samples before references).
    3. Accuracy = fraction whose nearest neighbour carries the same set label; an item with no finite distance
       (an empty sample) counts as correctly classified.
    """
    n, m = d_sr.shape
    full = np.block([[d_ss, d_sr], [d_sr.T, d_rr]]).astype(np.float64, copy=True)  # 1.
    np.fill_diagonal(full, np.inf)
    label = np.r_[np.zeros(n, bool), np.ones(m, bool)]
    nn = np.argmin(full, axis=1)  # 2.
    correct = (label[nn] == label) | ~np.isfinite(full.min(axis=1))  # 3.
    return float(correct.mean())


def one_nna_balanced(d_ss: np.ndarray, d_sr: np.ndarray, d_rr: np.ndarray) -> float:
    """1-NNA on equal-size sets: the first k = min(N_sample, N_ref) items of each set, then `one_nna`.

    1-NNA's 0.5 optimum assumes |S| = |R| (PointFlow, LION); with 1,000 samples against 200 references even a perfect
    generator scores well above 0.5 because most nearest neighbours come from the larger set. Taking the first k of
    each set (deterministic: samples are already i.i.d.) restores the intended scale.
    """
    k = min(d_sr.shape)
    return one_nna(d_ss[:k, :k], d_sr[:k, :k], d_rr[:k, :k])



# ------------------------------------------------------------------------------------------------------- structure

# 26-connectivity: voxels sharing a face, an edge or a corner belong to one component.
_FULL = np.ones((3, 3, 3), dtype=bool)


def structure(points: VoxelPoints) -> dict[str, Any]:
    """What the eye sees as noise: stray voxels and fragmented shapes, per set.

    * stray: the share of all occupied voxels of the set that have none of their 6 face neighbours occupied.
    * fragmented: the share of non-empty shapes whose largest 26-connected component holds less than half of their
      voxels (a cloud of specks rather than one object). Empty shapes are counted by `n_empty_samples`, not here.
    """
    res = points.resolution
    stray = 0
    fragmented = 0
    nonempty = 0
    for i in range(points.n):
        idx = points.shape_indices(i)
        if len(idx) == 0:
            continue
        nonempty += 1
        grid = np.zeros(res**3, dtype=bool)
        grid[idx] = True
        grid = grid.reshape(res, res, res)
        padded = np.pad(grid, 1)
        neighbours = np.zeros_like(grid)
        for axis in range(3):
            for shift in (-1, 1):
                neighbours |= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        stray += int((grid & ~neighbours).sum())
        labels, n_comp = ndimage.label(grid, structure=_FULL)
        largest = int(np.bincount(labels.ravel())[1:].max()) if n_comp else 0
        fragmented += int(2 * largest < len(idx))
    total = int(points.counts.sum())
    return {"stray": stray / total if total else 0.0, "fragmented": fragmented / nonempty if nonempty else 0.0}


# --------------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    samples: GridSet,
    references: GridSet,
    device: Any = "cpu",
    progress: bool = True,
    *,
    threshold: float | None = None,
    engine: Engine | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Score generated grids against reference grids: JSD, MMD, COV, 1-NNA (+ counts and occupancy).

    samples / references: (N,R,R,R) arrays (bool/uint8/float in {0,1}; memmaps are streamed), lists of them
    (concatenated in order), or VoxelPoints. `threshold` binarises the samples as x > threshold. Empty samples are
    counted in `n_empty_samples` and handled as documented in the module docstring; empty references are refused.
    Returns a JSON-able dict; `nna` is a fraction in [0, 1] (0.5 ideal).
    """
    t0 = time.perf_counter()
    sample_pts = extract_points(samples, threshold=threshold, name="samples", progress=progress)
    ref_pts = extract_points(references, name="references", progress=progress)
    if sample_pts.resolution != ref_pts.resolution:
        raise VoxdiffError(f"samples are {sample_pts.resolution}³ but references are {ref_pts.resolution}³; resample "
                           "one of them")
    empty_refs = np.flatnonzero(ref_pts.counts == 0)
    if len(empty_refs):
        raise VoxdiffError(f"{len(empty_refs)} reference shape(s) are empty (first: index {empty_refs[0]})")
    d_ss, d_sr, d_rr = chamfer_blocks(sample_pts, ref_pts, Backend(device, engine, workers, progress))
    mmd, cov = mmd_cov(d_sr)
    vox = sample_pts.resolution**3
    n_empty = int((sample_pts.counts == 0).sum())
    sample_struct, ref_struct = structure(sample_pts), structure(ref_pts)
    return {
        "jsd": jsd_counts(sample_pts.occupancy, ref_pts.occupancy),
        "mmd": mmd,
        "cov": cov,
        "nna": one_nna(d_ss, d_sr, d_rr),
        "nna_balanced": one_nna_balanced(d_ss, d_sr, d_rr),
        "n_samples": sample_pts.n,
        "n_refs": ref_pts.n,
        "n_empty_samples": n_empty,
        "all_samples_empty": n_empty == sample_pts.n,
        "resolution": sample_pts.resolution,
        "sample_mean_occupancy": float(sample_pts.counts.mean() / vox),
        "ref_mean_occupancy": float(ref_pts.counts.mean() / vox),
        "sample_mean_voxels": float(sample_pts.counts.mean()),
        "ref_mean_voxels": float(ref_pts.counts.mean()),
        "sample_stray": sample_struct["stray"],
        "ref_stray": ref_struct["stray"],
        "sample_fragmented": sample_struct["fragmented"],
        "ref_fragmented": ref_struct["fragmented"],
        "engine": resolve_engine(engine, device),
        "elapsed_s": time.perf_counter() - t0,
    }


def sha256_of(arrays: Sequence[np.ndarray]) -> str:
    """sha256 of the arrays' raw bytes, concatenated in order (== the bytes of np.concatenate for one dtype)."""
    h = hashlib.sha256()
    for a in arrays:
        for i0 in range(0, a.shape[0], 64):
            h.update(memoryview(np.ascontiguousarray(a[i0 : i0 + 64])).cast("B"))
    return h.hexdigest()
