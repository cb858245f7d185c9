"""The ShapeNet PartSeg HDF5 layout: writing the procedural dataset in it, reading it back, fetching the real zip.

Layout (as in `shapenet_part_seg_hdf5_data.zip`): `ply_data_{split}{k}.h5` files with `data` float32 (N,2048,3),
`label` uint8 (N,1) (airplane 0, chair 4, table 15, ...) and `pid` uint8 (N,2048) global part ids, at most 2,048 shapes
per file, categories shuffled together; plus `{split}_hdf5_file_list.txt` naming the files one per line. ShapeNet's
lists say `data/hdf5_data/ply_data_train0.h5`; entries are resolved by basename relative to the list's own directory, so
both that form and a bare file name work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from voxdiff.config import CATEGORIES, PARTSEG_LABELS, SPLITS
from voxdiff.data.shapes import NUM_POINTS, generate_shape, shape_rng
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_path, atomic_write_text, file_sha256, staging_dir
from voxdiff.logs import Progress

PARTSEG_URL = "https://shapenet.cs.stanford.edu/media/shapenet_part_seg_hdf5_data.zip"
MAX_PER_FILE = 2048
FILE_LIST = "{split}_hdf5_file_list.txt"
H5_NAME = "ply_data_{split}{k}.h5"

# Shapes per split and category. `full` follows ShapeNet PartSeg's own counts for these three categories.
COUNT_PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "full": {
        "train": {"airplane": 2658, "chair": 1958, "table": 3835},
        "val": {"airplane": 391, "chair": 396, "table": 588},
        "test": {"airplane": 341, "chair": 704, "table": 848},
    },
    # ShapeNet's training splits (procedural shapes cost milliseconds), 100 val + 100 test references per category
    "medium": {"train": {"airplane": 2658, "chair": 1958, "table": 3835}, "val": dict.fromkeys(CATEGORIES, 100),
               "test": dict.fromkeys(CATEGORIES, 100)},
    "small": {s: dict.fromkeys(CATEGORIES, n) for s, n in zip(SPLITS, (256, 16, 16))},
    "tiny": {s: dict.fromkeys(CATEGORIES, n) for s, n in zip(SPLITS, (8, 4, 4))},
}


# ----------------------------------------------------------------------------------------------------------------------
# Writing the procedural dataset
# ----------------------------------------------------------------------------------------------------------------------
def _make_rows(seed: int, split: str, entries: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate the shapes named by (category, index) entries: data (n,P,3), label (n,1), pid (n,P)."""
    n = len(entries)
    data = np.empty((n, NUM_POINTS, 3), np.float32)
    pid = np.empty((n, NUM_POINTS), np.uint8)
    label = np.empty((n, 1), np.uint8)
    for i, (cat, idx) in enumerate(entries):
        data[i], pid[i] = generate_shape(cat, shape_rng(seed, split, cat, idx))
        label[i, 0] = PARTSEG_LABELS[cat]
    return data, label, pid


PROCEDURAL_MARKER = ".voxdiff_procedural"  # written beside procedural HDF5 files: a later generation may replace them


def check_may_generate(out_dir: Path) -> None:
    """Refuse to write procedural shapes into a directory holding PartSeg HDF5 files that voxdiff did not generate
    there (someone's ShapeNet copy): generating would replace them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise VoxdiffError(f"{out_dir} is a file, not a directory")
    theirs = sorted(out_dir.glob("ply_data_*.h5")) if out_dir.is_dir() else []
    if theirs and not (out_dir / PROCEDURAL_MARKER).is_file():
        raise VoxdiffError(f"{out_dir} holds PartSeg HDF5 files that voxdiff did not generate ({theirs[0].name}, ...); "
                           "procedural data would replace them: choose another directory")


def write_synthetic_partseg(
    out_dir: str | os.PathLike[str],
    counts: dict[str, dict[str, int]],
    seed: int = 0,
    workers: int = 1,
    progress: bool | None = None,
) -> list[Path]:
    """Write the procedural dataset in the PartSeg layout; returns the h5 files written (all splits).

    `counts[split][category]` shapes per split (splits absent from `counts` are skipped). The order of shapes within a
    split is a seeded shuffle across categories; each shape depends only on (seed, split, category, index), so the
    contents do not depend on `workers`. The whole set is written into a staging directory inside `out_dir` and moved
    into place only when every file is complete (the marker first, the split file lists last), so a failure (a full
    disk, an interrupt) leaves the previous files as they were.
    """
    out = Path(out_dir)
    check_may_generate(out)
    for split, per_cat in counts.items():  # every count checked before anything is written
        if split not in SPLITS:
            raise VoxdiffError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        for cat, n in per_cat.items():
            if cat not in PARTSEG_LABELS:
                raise VoxdiffError(f"unknown category {cat!r}; choose from {', '.join(CATEGORIES)}")
            if n < 0:
                raise VoxdiffError(f"negative count {n} for {cat} {split}")
    lists = tuple(FILE_LIST.format(split=s) for s in SPLITS)
    written: list[Path] = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        with staging_dir(out, names_last=lists) as stage:
            atomic_write_text(stage / PROCEDURAL_MARKER, f"procedural PartSeg data written by voxdiff, seed {seed}\n")
            for split, per_cat in counts.items():
                written += _write_split(stage, out, split, per_cat, seed, workers, pool, progress)
    finally:
        if pool:
            pool.shutdown()
    return written


def _write_split(stage: Path, out: Path, split: str, per_cat: dict[str, int], seed: int, workers: int,
                 pool: ProcessPoolExecutor | None, progress: bool | None) -> list[Path]:
    """Write one split's h5 files and file list into `stage`; returns their final paths in `out`."""
    entries = [(cat, i) for cat, n in per_cat.items() for i in range(n)]
    order = np.random.default_rng([int(seed), SPLITS.index(split), 7919]).permutation(len(entries))
    entries = [entries[i] for i in order]
    names, written = [], []
    bar = Progress(len(entries), f"generate {split}", unit="shape", enabled=progress is not False)
    for k, start in enumerate(range(0, max(len(entries), 1), MAX_PER_FILE)):
        part = entries[start : start + MAX_PER_FILE]  # empty only for an empty split: one empty file
        step = max(1, len(part) // (4 * workers) if pool else len(part))
        jobs = [part[i : i + step] for i in range(0, len(part), step)]
        results = pool.map(_make_rows, [seed] * len(jobs), [split] * len(jobs), jobs) if pool else (
            _make_rows(seed, split, j) for j in jobs)
        data, label, pid = [np.empty((0, NUM_POINTS, 3), np.float32)], [np.empty((0, 1), np.uint8)], [
            np.empty((0, NUM_POINTS), np.uint8)]
        for d, lab, p in results:
            data.append(d)
            label.append(lab)
            pid.append(p)
            bar.update(len(d))
        name = H5_NAME.format(split=split, k=k)
        with atomic_path(stage / name) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=np.concatenate(data))
            f.create_dataset("label", data=np.concatenate(label))
            f.create_dataset("pid", data=np.concatenate(pid))
        written.append(out / name)
        names.append(f"data/hdf5_data/{name}")
    bar.close()
    atomic_write_text(stage / FILE_LIST.format(split=split), "".join(n + "\n" for n in names))
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------
def read_file_list(hdf5_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """The h5 files of `split`, from `{split}_hdf5_file_list.txt` (entries resolved by basename in `hdf5_dir`)."""
    root = Path(hdf5_dir)
    if not root.is_dir():
        raise VoxdiffError(f"HDF5 directory not found: {root} (use --synthetic, --zip or --download to create it)")
    lst = root / FILE_LIST.format(split=split)
    if not lst.is_file():
        raise VoxdiffError(f"file list {lst} not found: {root} is not a ShapeNet PartSeg hdf5 directory")
    files = []
    for line in lst.read_text().splitlines():
        if not line.strip():
            continue
        path = root / Path(line.strip()).name
        if not path.is_file():
            raise VoxdiffError(f"{lst.name} lists {line.strip()!r} but {path} does not exist")
        files.append(path)
    if not files:
        raise VoxdiffError(f"{lst} lists no files")
    return files


def _open_checked(path: Path):  # noqa: ANN202
    """Open an h5 file and check its `data`/`label` keys, shapes and dtypes; a clear VoxdiffError otherwise."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise VoxdiffError(f"{path} is not a readable HDF5 file (corrupt or truncated?): {e}") from None
    try:
        missing = [k for k in ("data", "label") if k not in f]
        if missing:
            raise VoxdiffError(f"{path} lacks dataset(s) {missing}; has {sorted(f.keys())}")
        d, lab = f["data"], f["label"]
        if not isinstance(d, h5py.Dataset) or not isinstance(lab, h5py.Dataset):
            raise VoxdiffError(f"{path}: 'data' and 'label' must be datasets, not groups")
        if d.ndim != 3 or d.shape[2] != 3:
            raise VoxdiffError(f"{path}: 'data' must be (N,P,3); got {d.shape}")
        if d.shape[0] and not d.shape[1]:
            raise VoxdiffError(f"{path}: 'data' holds {d.shape[0]} shapes of 0 points (shape {d.shape}); every "
                               "shape needs at least one point")
        if not np.issubdtype(d.dtype, np.number):
            raise VoxdiffError(f"{path}: 'data' must hold numbers; got dtype {d.dtype}")
        if lab.shape not in ((d.shape[0], 1), (d.shape[0],)):
            raise VoxdiffError(f"{path}: 'label' must be (N,1) with N={d.shape[0]}; got {lab.shape}")
        if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.floating)):
            raise VoxdiffError(f"{path}: 'label' must hold integers; got dtype {lab.dtype}")
    except BaseException:
        f.close()
        raise
    return f


def _labels(f, path: Path) -> np.ndarray:  # noqa: ANN001
    """The file's labels as int64 (N,): float labels must be finite whole numbers."""
    try:
        lab = np.asarray(f["label"][()]).reshape(-1)
    except (OSError, KeyError) as e:
        raise VoxdiffError(f"{path}: cannot read 'label' (corrupt or truncated?): {e}") from None
    if np.issubdtype(lab.dtype, np.floating) and (not np.isfinite(lab).all() or (lab != np.round(lab)).any()):
        raise VoxdiffError(f"{path}: 'label' holds values that are not whole numbers (NaN or fractions)")
    return lab.astype(np.int64)


def scan_split(hdf5_dir: str | os.PathLike[str], split: str, chunk: int = 256) -> dict[int, int]:
    """Validate every file of `split` in full (keys, shapes, dtypes, labels, and every point finite), reading the
    points `chunk` shapes at a time; returns the shapes per label id (all labels, not only the modelled categories).

    Preprocessing calls this for every split before it writes anything, so a bad file, even the last one, stops it
    while the previous outputs are untouched.
    """
    out: dict[int, int] = {}
    for path in read_file_list(hdf5_dir, split):
        with _open_checked(path) as f:
            _add_label_counts(out, _labels(f, path))
            d = f["data"]
            for s in range(0, d.shape[0], chunk):
                try:
                    pts = np.asarray(d[s : s + chunk])
                except (OSError, ValueError) as e:
                    raise VoxdiffError(f"{path}: cannot read 'data' (corrupt or truncated?): {e}") from None
                if np.issubdtype(pts.dtype, np.floating) and not np.isfinite(pts).all():
                    bad = s + int(np.flatnonzero(~np.isfinite(pts).reshape(len(pts), -1).all(axis=1))[0])
                    raise VoxdiffError(f"{path}: 'data' holds non-finite coordinates (NaN or inf), first in shape "
                                       f"{bad}")
    return out


def count_category(hdf5_dir: str | os.PathLike[str], split: str, category: str) -> int:
    """Number of shapes of `category` in `split`, reading (and validating) every file's labels only."""
    label = _label_of(category)
    total = 0
    for path in read_file_list(hdf5_dir, split):
        with _open_checked(path) as f:
            total += int(np.count_nonzero(_labels(f, path) == label))
    return total


PARTSEG_NUM_CATEGORIES = 16  # ShapeNet PartSeg labels are 0..15; voxdiff models three of them


def label_counts(hdf5_dir: str | os.PathLike[str], split: str) -> dict[int, int]:
    """Shapes per label id in `split` (all labels, not only the modelled categories)."""
    out: dict[int, int] = {}
    for path in read_file_list(hdf5_dir, split):
        with _open_checked(path) as f:
            _add_label_counts(out, _labels(f, path))
    return out


def _add_label_counts(out: dict[int, int], labels: np.ndarray) -> None:
    """Add the shapes per label id of `labels` to `out`."""
    ids, n = np.unique(labels, return_counts=True)
    for i, k in zip(ids.tolist(), n.tolist()):
        out[int(i)] = out.get(int(i), 0) + int(k)


def _label_of(category: str) -> int:
    if category not in PARTSEG_LABELS:
        raise VoxdiffError(f"unknown category {category!r}; choose from {', '.join(PARTSEG_LABELS)}")
    return PARTSEG_LABELS[category]


def iter_category_points(
    hdf5_dir: str | os.PathLike[str], split: str, category: str, chunk: int = 256
) -> Iterator[np.ndarray]:
    """Yield float32 (b, P, 3) point chunks (b <= `chunk`) of `category` in `split`, file by file, in file order.

    Only the rows of the category are read (h5py selection with increasing indices), so memory is bounded by `chunk`.
    """
    label = _label_of(category)
    for path in read_file_list(hdf5_dir, split):
        with _open_checked(path) as f:
            rows = np.flatnonzero(_labels(f, path) == label)
            for s in range(0, len(rows), chunk):
                sel = rows[s : s + chunk]
                try:
                    if sel[-1] - sel[0] + 1 == len(sel):  # contiguous: a plain slice is much faster
                        pts = f["data"][int(sel[0]) : int(sel[-1]) + 1]
                    else:
                        pts = f["data"][sel]
                except (OSError, ValueError) as e:
                    raise VoxdiffError(f"{path}: cannot read 'data' (corrupt or truncated?): {e}") from None
                pts = np.asarray(pts, np.float32)
                if not np.isfinite(pts).all():
                    raise VoxdiffError(f"{path}: 'data' holds non-finite coordinates (NaN or inf)")
                yield pts


# ----------------------------------------------------------------------------------------------------------------------
# The real dataset: local zip (checked, safely extracted) or a best-effort download
# ----------------------------------------------------------------------------------------------------------------------
def extract_zip(zip_path: str | os.PathLike[str], dest: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """Extract a ShapeNet PartSeg zip's h5 files and file lists into `dest` (flat); returns `dest`.

    1. optional SHA-256 check; 2. refuse absolute or `..` member names (no path traversal) and zips without a
    `train_hdf5_file_list.txt`; 3. extract into a temporary directory beside `dest`, validate every listed file in
    full (scan_split), and move the files into place only then, so a bad member leaves `dest` as it was.
    """
    zp = Path(zip_path)
    if not zp.is_file():
        raise VoxdiffError(f"zip file not found: {zp}")
    if sha256:
        got = file_sha256(zp)
        if got.lower() != sha256.strip().lower():
            raise VoxdiffError(f"SHA-256 mismatch for {zp}: expected {sha256.strip()}, got {got}")
    try:
        zf = zipfile.ZipFile(zp)
    except (zipfile.BadZipFile, OSError) as e:
        raise VoxdiffError(f"{zp} is not a valid zip file: {e}") from None
    dest = Path(dest)
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for m in members:
            parts = Path(m.filename).parts
            if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise VoxdiffError(f"{zp}: refusing unsafe member name {m.filename!r}")
        wanted = [m for m in members if m.filename.endswith((".h5", "_hdf5_file_list.txt"))]
        if not any(Path(m.filename).name == FILE_LIST.format(split="train") for m in wanted):
            raise VoxdiffError(f"{zp} does not look like shapenet_part_seg_hdf5_data.zip (no train_hdf5_file_list.txt)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for m in wanted:
                target = tmp / Path(m.filename).name
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            for split in SPLITS:  # every file checked in full before one replaces a file of `dest`
                if (tmp / FILE_LIST.format(split=split)).is_file():
                    try:
                        scan_split(tmp, split)
                    except VoxdiffError as e:
                        raise VoxdiffError(f"{zp}: {str(e).replace(str(tmp) + os.sep, '')}") from None
            dest.mkdir(parents=True, exist_ok=True)
            for p in sorted(tmp.iterdir(), key=lambda p: p.name.endswith(".txt")):  # file lists last
                os.replace(p, dest / p.name)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise VoxdiffError(f"cannot extract {zp}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download_partseg(dest_zip: str | os.PathLike[str], url: str = PARTSEG_URL, timeout: float = 20.0) -> Path:
    """Download the PartSeg zip to `dest_zip` (atomically); on any network failure one clear VoxdiffError."""
    dest_zip = Path(dest_zip)
    hint = (f"download shapenet_part_seg_hdf5_data.zip yourself (ShapeNet PartSeg HDF5, e.g. from {PARTSEG_URL} "
            "or a mirror) and pass --zip PATH [--sha256 HEX]")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest_zip) as tmp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise VoxdiffError(f"could not download {url} ({reason}); {hint}") from None
    return dest_zip
