"""load_data.py end to end: procedural HDF5 -> voxel .npy files, real-zip handling, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from voxdiff.config import CATEGORIES, SPLITS
from voxdiff.data.partseg import iter_category_points, write_synthetic_partseg
from voxdiff.data.voxelize import voxelize_points
from voxdiff.errors import run_cli
from voxdiff.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import load_data  # noqa: E402

COUNTS = {"train": {"airplane": 3, "chair": 2, "table": 4}, "val": {"airplane": 1, "chair": 1, "table": 1},
          "test": {"airplane": 1, "chair": 2, "table": 1}}


@pytest.fixture(scope="module")
def h5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("h5")
    write_synthetic_partseg(d, COUNTS, seed=1)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run_in_process(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    """Run load_data's CLI in-process as the user would see it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(load_data.main, argv)
    return int(exc.value.code), capsys.readouterr().err


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.suffix in (".npy", ".tmp") or p.name.endswith(".tmp"))


def test_synthetic_round_trip_subprocess(tmp_path: Path, python: str) -> None:
    h5, vox = tmp_path / "h5", tmp_path / "vox"
    cmd = [python, str(ROOT / "load_data.py"), "--synthetic", "--data_preset", "tiny", "--n_train", "3",
           "--n_test", "1", "--resolution", "16", "--dataset_path", str(h5), "--out_dir", str(vox), "--seed", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    want = {"train": 3, "val": 4, "test": 1}  # tiny preset for val, overrides for train/test
    for c in CATEGORIES:
        for s in SPLITS:
            arr = np.load(vox / f"{c}_voxels_{s}.npy")
            assert arr.shape == (want[s], 16, 16, 16) and arr.dtype == np.uint8
            assert set(np.unique(arr)) == {0, 1}
    summary = json.loads((vox / "preprocess.json").read_text())
    assert summary["resolution"] == 16 and summary["outputs"]["chair"]["val"]["count"] == 4
    assert 0 < summary["outputs"]["table"]["train"]["mean_occupancy"] < 0.5
    assert (vox / "preprocess.log").is_file() and _leftovers(h5) == []
    # Grids equal the voxelization of the HDF5 rows of that category, in order.
    pts = np.concatenate(list(iter_category_points(h5, "train", "airplane")))
    np.testing.assert_array_equal(np.load(vox / "airplane_voxels_train.npy"), voxelize_points(pts, 16))


def test_existing_dir_options_and_bare_file_list(h5_dir: Path, tmp_path: Path, capsys) -> None:
    h5 = _copy(h5_dir, tmp_path / "h5")
    (h5 / "val_hdf5_file_list.txt").write_text("ply_data_val0.h5\n")  # bare names resolve too
    load_data.main(["--dataset_path", str(h5), "--resolution", "8", "--category", "table", "chair",
                    "--splits", "val", "train", "--isotropic"])
    names = sorted(p.name for p in h5.glob("*.npy"))
    assert names == sorted(f"{c}_voxels_{s}.npy" for c in ("table", "chair") for s in ("val", "train"))
    assert np.load(h5 / "table_voxels_train.npy").shape == (4, 8, 8, 8)
    pts = np.concatenate(list(iter_category_points(h5, "val", "chair")))
    np.testing.assert_array_equal(np.load(h5 / "chair_voxels_val.npy"), voxelize_points(pts, 8, isotropic=True))


def _bad_h5(path: Path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(b"this is not an hdf5 file" * 100)
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "keys":
        path.unlink()
        with h5py.File(path, "w") as f:
            f["points"] = np.zeros((2, 2048, 3), np.float32)
            f["label"] = np.zeros((2, 1), np.uint8)
    elif kind == "shape":
        path.unlink()
        with h5py.File(path, "w") as f:
            f["data"] = np.zeros((2, 2048, 2), np.float32)
            f["label"] = np.zeros((2, 1), np.uint8)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing_dir", "not found"),
        ("missing_list", "file list"),
        ("missing_file", "does not exist"),
        ("garbage", "not a readable HDF5"),
        ("truncated", "truncated"),
        ("keys", "lacks dataset"),
        ("shape", "must be \\(N,P,3\\)"),
        ("category", "invalid choice: .lamp."),
        ("resolution", "power of two"),
        ("split", "unknown split"),
    ],
)
def test_bad_inputs(case: str, pattern: str, h5_dir: Path, tmp_path: Path, capsys) -> None:
    import re

    h5 = _copy(h5_dir, tmp_path / "h5")
    out = tmp_path / "out"
    argv = ["--dataset_path", str(h5), "--out_dir", str(out), "--resolution", "8"]
    if case == "missing_dir":
        argv[1] = str(tmp_path / "nope")
    elif case == "missing_list":
        (h5 / "test_hdf5_file_list.txt").unlink()
    elif case == "missing_file":
        (h5 / "val_hdf5_file_list.txt").write_text("data/hdf5_data/ply_data_val0.h5\ndata/hdf5_data/ply_data_val9.h5\n")
    elif case in ("garbage", "truncated", "keys", "shape"):
        _bad_h5(h5 / "ply_data_test0.h5", case)
    elif case == "category":
        argv += ["--category", "chair", "lamp"]
    elif case == "resolution":
        argv[-1] = "48"
    elif case == "split":
        argv += ["--splits", "training"]
    code, err = _run_in_process(capsys, argv)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert lines[0].startswith("load_data.py: error:") or "error:" in lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert _leftovers(tmp_path) == []


def _make_zip(h5_dir: Path, path: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(h5_dir.iterdir()):
            if p.suffix in (".h5", ".txt"):
                z.write(p, f"hdf5_data/{p.name}")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def test_zip_extract_with_checksum(h5_dir: Path, tmp_path: Path, capsys) -> None:
    zp = _make_zip(h5_dir, tmp_path / "shapenet_part_seg_hdf5_data.zip")
    dest = tmp_path / "data" / "hdf5_data"
    load_data.main(["--zip", str(zp), "--sha256", file_sha256(zp), "--dataset_path", str(dest), "--resolution", "8"])
    assert np.load(dest / "chair_voxels_test.npy").shape == (2, 8, 8, 8)
    assert [p.name for p in dest.parent.iterdir()] == ["hdf5_data"]  # no temp dirs left


@pytest.mark.parametrize("case", ["sha", "traversal", "notzip", "layout"])
def test_bad_zip(case: str, h5_dir: Path, tmp_path: Path, capsys) -> None:
    zp = tmp_path / "in.zip"
    sha = None
    if case == "sha":
        _make_zip(h5_dir, zp)
        sha = "0" * 64
    elif case == "traversal":
        _make_zip(h5_dir, zp, {"../../evil.txt": b"x"})
    elif case == "notzip":
        zp.write_bytes(b"PK not really")
    else:
        with zipfile.ZipFile(zp, "w") as z:
            z.writestr("readme.txt", "hello")
    dest = tmp_path / "d" / "hdf5_data"
    argv = ["--zip", str(zp), "--dataset_path", str(dest)] + (["--sha256", sha] if sha else [])
    code, err = _run_in_process(capsys, argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []
