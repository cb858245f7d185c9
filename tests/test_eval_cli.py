"""eval.py: the reference's output lines (+ 1-NNA on equal sets, empty / bloated counts, stray / fragmented beside the
references'), the JSON record with its provenance, `eval.py all DIR`, and one-line errors for every bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from voxdiff import metrics
from voxdiff.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _load_eval():
    spec = importlib.util.spec_from_file_location("voxdiff_eval_cli", ROOT / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def eval_cli():
    return _load_eval()


@pytest.fixture(scope="module")
def samples_file(tiny_voxel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = np.load(tiny_voxel_dir / "chair_voxels_train.npy").copy()
    s[0] = 0  # one empty sample
    p = tmp_path_factory.mktemp("samples") / "samples.npy"
    np.save(p, s)
    return p


def _refs(d: Path, cat: str = "chair") -> np.ndarray:
    return np.concatenate([np.load(d / f"{cat}_voxels_test.npy"), np.load(d / f"{cat}_voxels_val.npy")])


def _want_lines(samples: np.ndarray, refs: np.ndarray, train: np.ndarray) -> list[str]:
    """eval.py's block computed with the library: the reference's four lines, then 1-NNA (equal sets), counts, and
    the stray / fragmented shares of the samples beside the references'."""
    want = metrics.evaluate(samples, refs, progress=False)
    bound = 2 * int(train.reshape(len(train), -1).sum(1).max())
    n_bloated = int((samples.reshape(len(samples), -1).sum(1) > bound).sum())
    n = len(samples)
    return [
        f"JSD: {want['jsd']}",
        f"MMD: {want['mmd']}",
        f"COV: {want['cov']}",
        f"1-NNA: {want['nna']}",
        f"1-NNA (equal sets): {want['nna_balanced']}",
        f"empty samples: {want['n_empty_samples']} of {n}; bloated samples: {n_bloated} of {n} (over {bound} voxels)",
        f"stray voxels: {want['sample_stray']:.2%} (references {want['ref_stray']:.2%}); "
        f"fragmented samples: {want['sample_fragmented']:.1%} (references {want['ref_fragmented']:.1%})",
    ]


def test_cli_prints_reference_lines_and_writes_json(python, tiny_voxel_dir, samples_file, tmp_path):
    out_json = tmp_path / "scores.json"
    cmd = [python, str(ROOT / "eval.py"), "chair", str(samples_file), "--dataset_path", str(tiny_voxel_dir)]
    cmd += ["--json", str(out_json), "--seed", "7", "--no_progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines[:5]] == ["JSD", "MMD", "COV", "1-NNA", "1-NNA (equal sets)"]
    values = [float(ln.split(": ")[1]) for ln in lines[:4]]
    # same numbers as the library on test-then-val references, printed with Python's repr
    train = np.load(tiny_voxel_dir / "chair_voxels_train.npy")
    assert lines == _want_lines(np.load(samples_file), _refs(tiny_voxel_dir), train)
    assert lines[5].startswith("empty samples: 1 of 8; bloated samples: 0 of 8 (over ")
    assert lines[6].startswith("stray voxels: ") and "; fragmented samples: " in lines[6]
    assert 0.0 <= values[3] <= 1.0
    assert "1 of 8 samples are empty" in proc.stderr
    rec = json.loads(out_json.read_text())
    assert rec["jsd"] == values[0] and rec["nna"] == values[3]
    assert rec["category"] == "chair" and rec["samples_file"] == str(samples_file.resolve())
    assert rec["n_samples"] == 8 and rec["n_empty_samples"] == 1 and rec["resolution"] == 32
    assert rec["n_bloated_samples"] == 0 and rec["bloated_above_voxels"] > 0
    prov = rec["provenance"]
    assert prov["reference_files"] == ["chair_voxels_test.npy", "chair_voxels_val.npy"]
    assert prov["reference_count"] == 8
    assert prov["reference_sha256"] == hashlib.sha256(_refs(tiny_voxel_dir).tobytes()).hexdigest()
    assert prov["seed"] == 7 and prov["voxdiff_version"] and rec["elapsed_s"] > 0
    assert prov["train_max_voxels"] * 2 == rec["bloated_above_voxels"] and "chamfer" in prov["definitions"]
    assert rec["sample_mean_occupancy"] > 0 and rec["ref_mean_occupancy"] > 0
    want = metrics.evaluate(np.load(samples_file), _refs(tiny_voxel_dir), progress=False)
    for key in ("sample_stray", "ref_stray", "sample_fragmented", "ref_fragmented"):
        assert rec[key] == want[key] and 0.0 <= rec[key] <= 1.0, key
    assert "stray" in prov["definitions"] and "fragmented" in prov["definitions"]


def test_cli_all_scores_each_category(eval_cli, tiny_voxel_dir, tmp_path, capsys):
    sdir = tmp_path / "samples"
    sdir.mkdir()
    for cat in ("airplane", "chair", "table"):
        np.save(sdir / f"{cat}.npy", np.load(tiny_voxel_dir / f"{cat}_voxels_train.npy")[:5])
    out_json = tmp_path / "all.json"
    argv = ["all", str(sdir), "--dataset_path", str(tiny_voxel_dir), "--no_progress", "--device", "cpu"]
    got = eval_cli.main(argv + ["--json", str(out_json), "--workers", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert [ln for ln in out if ln.startswith("==")] == ["== airplane", "== chair", "== table"]
    rec = json.loads(out_json.read_text())
    assert rec["category"] == "all" and list(rec["categories"]) == ["airplane", "chair", "table"]
    for k, cat in enumerate(("airplane", "chair", "table")):
        train = np.load(tiny_voxel_dir / f"{cat}_voxels_train.npy")
        want = _want_lines(train[:5], _refs(tiny_voxel_dir, cat), train)
        assert out[8 * k : 8 * k + 8] == [f"== {cat}", *want]
        cat_rec = rec["categories"][cat]
        assert cat_rec["provenance"]["category"] == cat and got[cat]["jsd"] == cat_rec["jsd"]
        assert cat_rec["sample_fragmented"] == got[cat]["sample_fragmented"] and "ref_stray" in cat_rec
    # a directory missing one category fails before anything is scored, in one line
    (sdir / "table.npy").unlink()
    with pytest.raises(SystemExit) as e:
        run_cli(eval_cli.main, argv)
    err = capsys.readouterr()
    assert e.value.code == 2 and err.out == "" and "samples file not found" in err.err and "table.npy" in err.err
    with pytest.raises(SystemExit):
        run_cli(eval_cli.main, ["all", str(sdir / "chair.npy"), "--dataset_path", str(tiny_voxel_dir)])
    assert "must be a directory" in capsys.readouterr().err


def _write(tmp_path: Path, arr: np.ndarray) -> str:
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    return str(p)


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda res: np.full((2, res, res, res), np.nan, np.float32), "NaN"),
        (lambda res: np.zeros((2, res, res), np.uint8), r"\(N,R,R,R\)"),
        (lambda res: np.full((2, res, res, res), 0.7, np.float32), "--threshold 0.5"),
        (lambda res: np.zeros((2, 16, 16, 16), np.uint8), "16³ but references are 32³"),
    ],
)
def test_cli_bad_samples(eval_cli, tiny_voxel_dir, tmp_path, capsys, make, msg):
    path = _write(tmp_path, make(32))
    out_json = tmp_path / "o.json"
    argv = ["chair", path, "--dataset_path", str(tiny_voxel_dir), "--no_progress", "--json", str(out_json)]
    with pytest.raises(SystemExit) as e:
        run_cli(eval_cli.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and re.search(msg, err), err
    assert not out_json.exists() and not list(tmp_path.glob(".o.json*"))


def test_cli_missing_files(eval_cli, tiny_voxel_dir, samples_file, tmp_path, capsys):
    for argv, msg in [
        (["chair", str(tmp_path / "nope.npy"), "--dataset_path", str(tiny_voxel_dir)], "samples file not found"),
        (["chair", str(samples_file), "--dataset_path", str(tmp_path)], "voxel file not found"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_cli(eval_cli.main, argv + ["--no_progress"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count("\n") == 0 and msg in err, err


def test_cli_threshold_accepts_probabilities(eval_cli, tiny_voxel_dir, samples_file, tmp_path, capsys):
    prob = np.load(samples_file).astype(np.float32) * 0.8 + 0.1
    argv = ["chair", _write(tmp_path, prob), "--dataset_path", str(tiny_voxel_dir), "--no_progress"]
    got = eval_cli.main(argv + ["--threshold", "0.5", "--device", "cpu"])
    want = metrics.evaluate(np.load(samples_file), _refs(tiny_voxel_dir), progress=False)
    assert (got["jsd"], got["mmd"], got["cov"], got["nna"]) == (want["jsd"], want["mmd"], want["cov"], want["nna"])
    assert capsys.readouterr().out.startswith("JSD: ")
