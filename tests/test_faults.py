"""Fault injection, in the spirit of SQLite's I/O-error tests: break what the CLIs read and write, on purpose.

For each CLI (load_data.py, eval.py, python -m voxdiff): every kind of file it reads, corrupted or truncated; a disk
that fills up (ENOSPC, monkeypatched); a bad value for its numeric flags. Every case asserts one line on stderr that
names the file or the flag, a non-zero exit, and that no file that existed before changed (sha256 of every file
under the case's directory, before and after). Then what the library loads: checkpoints (garbage, truncation, a
flipped bit inside an intact zip, NaN weights), the latent cache (rebuilt), and the pipeline's stage records (a stage
is complete only while its outputs exist; an unreadable record file is rebuilt).

Fast (tiny fixtures from conftest, one tiny pipeline run shared by the module), CPU only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from faultlib import (
    CORRUPTIONS,
    ROOT,
    VOXDIFF,
    assert_unchanged,
    cli,
    flip_tensor_byte,
    no_logs,
    no_space,
    one_line,
    snapshot,
    with_nan_weights,
)
from helpers import ENV, make_ae_ckpt, make_ldm_ckpt, make_voxel_dir

from voxdiff.checkpoint import load_autoencoder, load_checkpoint, load_unet, save_checkpoint
from voxdiff.cli import load_script
from voxdiff.config import to_dict
from voxdiff.data.partseg import write_synthetic_partseg
from voxdiff.data.voxelize import preprocess
from voxdiff.errors import VoxdiffError, cli_name
from voxdiff.presets import run_preset
from voxdiff.runner import resolve, run

H5_COUNTS = {"train": {"airplane": 3, "chair": 3, "table": 3}, "val": {"airplane": 2, "chair": 2, "table": 2},
             "test": {"airplane": 2, "chair": 2, "table": 2}}
PIPELINE_STAGES = ("data", "ae", "ldm", "tune", "sample", "eval")  # render costs seconds and reads nothing new


# ---- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h5_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Procedural PartSeg HDF5 files with a complete 8³ voxel set and preprocess.json beside them."""
    d = tmp_path_factory.mktemp("h5set") / "data"
    write_synthetic_partseg(d, H5_COUNTS, seed=3, progress=False)
    preprocess(d, d, resolution=8, progress=False)
    return d


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline run through eval (one thread, as every test body runs)."""
    d = tmp_path_factory.mktemp("faults") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = run_preset("tiny")  # without tuning and the LDM's preview: seconds less, no other file kinds
        cfg = dataclasses.replace(cfg, run_dir=str(d), device="cpu", tune=dataclasses.replace(cfg.tune, enabled=False),
                                  ldm=dataclasses.replace(cfg.ldm, preview=False))
        run(cfg, stages=PIPELINE_STAGES, progress=False)
    finally:
        torch.set_num_threads(n)
    return d


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, for one case to break; its config.json names the copy, as if it had been
    made there (a rerun with the same settings then writes the same bytes)."""
    d = Path(shutil.copytree(finished_run, tmp_path / "run"))
    moved = to_dict(dataclasses.replace(resolve(_config(d)), dataset_path=None))  # as the pipeline writes it
    (d / "config.json").write_text(json.dumps(moved, indent=2) + "\n")
    return d


def _voxdiff_argv(run_dir: Path, *more: str) -> list[str]:
    """Rerun a run from its config.json, as the README says (--run_dir: the copy, not where the run was made)."""
    return ["--config", str(run_dir / "config.json"), "--run_dir", str(run_dir), "--stages", ",".join(PIPELINE_STAGES),
            *more]


# ---- load_data.py ----------------------------------------------------------------------------------------------------


def _nan_in_last_shape(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        x = f["data"][()]
        x[-1, 5, 1] = np.nan
        f["data"][...] = x


def _replace_dataset(path: Path, key: str, value: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        del f[key]
        f[key] = value


def _zero_points(path: Path) -> None:
    with h5py.File(path, "r") as f:
        n = len(f["data"])
    _replace_dataset(path, "data", np.zeros((n, 0, 3), np.float32))


def _float_labels_with_nan(path: Path) -> None:
    with h5py.File(path, "r") as f:
        lab = f["label"][()].astype(np.float32)
    lab[0] = np.nan
    _replace_dataset(path, "label", lab)


H5_FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "nan_coordinate_in_last_file": (_nan_in_last_shape, "non-finite"),
    "zero_points": (_zero_points, "0 points"),
    "nan_label": (_float_labels_with_nan, "label"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:3000]), "truncated"),
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(5000)), "not a readable HDF5"),
    "points_not_xyz": (lambda p: _replace_dataset(p, "data", np.zeros((6, 16, 2), np.float32)), "(N,P,3)"),
}


@pytest.mark.parametrize("fault", H5_FAULTS)
def test_load_data_bad_h5_leaves_the_previous_set(fault: str, h5_set: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Re-voxelizing at 16³ over a complete 8³ set, with one bad HDF5 file (the test split's, voxelized last): one
    line naming the file, and every previous grid, preprocess.json and the log exactly as they were."""
    d = Path(shutil.copytree(h5_set, tmp_path / "data"))
    corrupt, needle = H5_FAULTS[fault]
    corrupt(d / "ply_data_test0.h5")
    before = snapshot(d)
    code, err = cli(capsys, "load_data.py", ["--dataset_path", str(d), "--resolution", "16"])
    one_line(code, err, "ply_data_test0.h5", needle)
    assert "zero-size array" not in err
    assert_unchanged(d, before)  # no staging directory left either
    # the rerun over good files completes
    shutil.copy(h5_set / "ply_data_test0.h5", d / "ply_data_test0.h5")
    cli_ok = load_script(ROOT / "load_data.py").main(["--dataset_path", str(d), "--resolution", "16"])
    assert cli_ok["resolution"] == 16 and np.load(d / "chair_voxels_test.npy").shape[1:] == (16, 16, 16)
    assert json.loads((d / "preprocess.json").read_text())["resolution"] == 16


def test_load_data_full_disk_names_the_file_and_keeps_the_set(h5_set: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    d = Path(shutil.copytree(h5_set, tmp_path / "data"))
    before = snapshot(d)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    code, err = cli(capsys, "load_data.py", ["--dataset_path", str(d), "--resolution", "16"])
    line = one_line(code, err, "no space left", str(d / "airplane_voxels_train.npy"))
    assert code == 28 and ".tmp" not in line
    assert_unchanged(d, before)


LOAD_DATA_FLAGS = [("--resolution", "48"), ("--resolution", "0"), ("--resolution", "x"), ("--chunk", "0"),
                   ("--n_train", "-1"), ("--seed", "-1"), ("--workers", "0"), ("--timeout", "0"),
                   ("--timeout", "nan"), ("--preview_n", "0"), ("--sha256", "abc")]


@pytest.mark.parametrize(("flag", "value"), LOAD_DATA_FLAGS)
def test_load_data_bad_numbers_are_refused_before_any_write(flag: str, value: str, h5_set: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    d = Path(shutil.copytree(h5_set, tmp_path / "data"))
    before = snapshot(d)
    argv = ["--synthetic", "--data_preset", "tiny", "--dataset_path", str(d), "--resolution", "8", flag, value]
    one_line(*cli(capsys, "load_data.py", argv), flag)
    assert_unchanged(d, before)


def test_load_data_bad_member_of_a_zip_replaces_nothing(h5_set: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = Path(shutil.copytree(h5_set, tmp_path / "bad"))
    _nan_in_last_shape(bad / "ply_data_val0.h5")
    zp = tmp_path / "shapenet.zip"
    with zipfile.ZipFile(zp, "w") as z:
        for f in sorted(bad.iterdir()):
            if f.suffix in (".h5", ".txt"):
                z.write(f, f"hdf5_data/{f.name}")
    d = Path(shutil.copytree(h5_set, tmp_path / "data"))
    (d / ".voxdiff_procedural").unlink()  # someone's own copy, extracted earlier
    before = snapshot(d)
    one_line(*cli(capsys, "load_data.py", ["--zip", str(zp), "--dataset_path", str(d), "--resolution", "8"]),
             "shapenet.zip", "ply_data_val0.h5", "non-finite")
    assert_unchanged(d, before)


def test_load_data_clears_what_a_killed_run_left(h5_set: Path, tmp_path: Path) -> None:
    """A kill during voxelization leaves a staging directory with half a set: the next run removes it, and the old
    set was never touched."""
    d = Path(shutil.copytree(h5_set, tmp_path / "data"))
    stage = d / ".staging.k1ll3d.tmp"
    stage.mkdir()
    (stage / "chair_voxels_train.npy").write_bytes(b"half a file")
    (d / ".preprocess.json.x.tmp").write_text("{")
    before = snapshot(d, lambda p: ".tmp" in str(p))
    assert json.loads((d / "preprocess.json").read_text())["resolution"] == 8
    load_script(ROOT / "load_data.py").main(["--dataset_path", str(d), "--resolution", "8"])
    assert not list(d.glob(".*.tmp"))
    assert snapshot(d, lambda p: ".tmp" in str(p) or p.suffix == ".log" or p.name in (".lock", "preprocess.json")) \
        == {k: v for k, v in before.items() if not k.endswith(".log") and k != "preprocess.json"}  # same grids


# ---- eval.py ---------------------------------------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


SAMPLE_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "text": (lambda: b"0 1 0 1\n1 0 1 0\n", "not a .npy file"),
    "empty": (lambda: b"", "empty"),
    "npz_renamed": (lambda: (lambda b: (np.savez(b, x=np.zeros(3)), b.getvalue())[1])(io.BytesIO()), ".npz"),
    "truncated": (lambda: _npy_bytes(np.zeros((2, 32, 32, 32), np.uint8))[:5000], "truncated"),
    "header_only": (lambda: _npy_bytes(np.zeros((2, 32, 32, 32), np.uint8))[:60], "truncated"),
    "object_array": (lambda: (lambda b: (np.save(b, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                                         b.getvalue())[1])(io.BytesIO()), "Python objects"),
}


@pytest.mark.parametrize("kind", SAMPLE_FILES)
def test_eval_bad_samples_file(kind: str, tiny_voxel_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    make, needle = SAMPLE_FILES[kind]
    samples = tmp_path / "samples.npy"
    samples.write_bytes(make())
    (tmp_path / "scores.json").write_text('{"kept": true}\n')  # an earlier result, not to be touched
    before = snapshot(tmp_path)
    line = one_line(*cli(capsys, "eval.py", ["chair", str(samples), "--dataset_path", str(tiny_voxel_dir),
                                             "--json", str(tmp_path / "scores.json")]), "samples.npy", needle)
    assert "pickled" not in line
    assert_unchanged(tmp_path, before)  # no scores.log either


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_eval_bad_reference_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_voxel_dir(tmp_path / "data")
    ref = data / "chair_voxels_val.npy"
    ref.write_bytes(SAMPLE_FILES[kind][0]())
    np.save(tmp_path / "samples.npy", np.zeros((2, 32, 32, 32), np.uint8))
    before = snapshot(tmp_path)
    one_line(*cli(capsys, "eval.py", ["chair", str(tmp_path / "samples.npy"), "--dataset_path", str(data),
                                      "--json", str(tmp_path / "out" / "scores.json")]), "chair_voxels_val.npy")
    assert_unchanged(tmp_path, before)
    assert not (tmp_path / "out").exists()


def test_eval_full_disk_names_the_json(tiny_voxel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "samples.npy", np.load(tiny_voxel_dir / "chair_voxels_test.npy")[:2])
    (tmp_path / "scores.json").write_text('{"kept": true}\n')
    before = snapshot(tmp_path)
    monkeypatch.setattr(Path, "write_text", no_space)
    code, err = cli(capsys, "eval.py", ["chair", str(tmp_path / "samples.npy"), "--dataset_path",
                                        str(tiny_voxel_dir), "--json", str(tmp_path / "scores.json"), "--workers", "1",
                                        "--no_progress"])
    line = one_line(code, err, str(tmp_path / "scores.json"), "no space left")
    assert code == 28 and ".tmp" not in line
    assert_unchanged(tmp_path, before, no_logs)


@pytest.mark.parametrize(("flag", "value"), [("--threshold", "1.5"), ("--threshold", "nan"), ("--workers", "0"),
                                             ("--seed", "x")])
def test_eval_bad_numbers(flag: str, value: str, tiny_voxel_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "samples.npy", np.zeros((2, 32, 32, 32), np.uint8))
    before = snapshot(tmp_path)
    one_line(*cli(capsys, "eval.py", ["chair", str(tmp_path / "samples.npy"), "--dataset_path", str(tiny_voxel_dir),
                                      "--json", str(tmp_path / "s.json"), flag, value]), flag)
    assert_unchanged(tmp_path, before)


# ---- python -m voxdiff: refusals write nothing -----------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needles"), [
    (["--ldm.ch", "32"], ["stage ldm", "settings changed"]),
    (["--ae.latent_channels", "8"], ["stage ae", "settings changed"]),
    (["--resolution", "64"], ["holds 32³ grids", "64³"]),
])
def test_voxdiff_refused_rerun_changes_no_file(flags: list[str], needles: list[str], run_copy: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The README's way back (`--config RUN/config.json`) must still work after a refused rerun."""
    before = snapshot(run_copy)
    line = one_line(*cli(capsys, VOXDIFF, _voxdiff_argv(run_copy, *flags)), *needles)
    assert line.startswith(f"{VOXDIFF}: error:")
    assert_unchanged(run_copy, before)  # config.json, stages.json, pipeline.log: byte-identical
    report = run(_config(run_copy), stages=PIPELINE_STAGES, progress=False)  # the way back: up to date
    assert set(report["stages"]) >= set(PIPELINE_STAGES)
    assert_unchanged(run_copy, {k: v for k, v in before.items() if not k.endswith(".log")}, no_logs)


def _config(run_dir: Path) -> Any:
    from voxdiff.config import RunConfig, from_dict

    cfg = from_dict(RunConfig, json.loads((run_dir / "config.json").read_text()))
    return dataclasses.replace(cfg, run_dir=str(run_dir))


CONFIG_FILES: dict[str, tuple[Callable[[str], str], str]] = {
    "truncated": (lambda text: text[: len(text) // 2], "config.json"),
    "not_an_object": (lambda text: "[1, 2]", "config.json"),
    "stage_not_an_object": (lambda text: json.dumps({**json.loads(text), "ae": 5}), "config.json"),
    "bad_value": (lambda text: json.dumps({**json.loads(text), "resolution": "abc"}), "config.json"),
}


@pytest.mark.parametrize("kind", CONFIG_FILES)
def test_voxdiff_bad_config_file(kind: str, run_copy: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    edit, needle = CONFIG_FILES[kind]
    bad = tmp_path / "config.json"  # beside the run, so the run's own files are the ones compared
    bad.write_text(edit((run_copy / "config.json").read_text()))
    before = snapshot(run_copy)
    one_line(*cli(capsys, VOXDIFF, ["--config", str(bad), "--run_dir", str(run_copy)]), needle)
    assert_unchanged(run_copy, before)


@pytest.mark.parametrize(("flag", "value"), [
    ("--seed", "-1"), ("--render_n", "0"), ("--resolution", "48"), ("--ae.num_steps", "0"), ("--ldm.lr", "-1"),
    ("--sample.cfg_scale", "nan"), ("--sample.num_samples", "0"), ("--tune.num_samples", "0"), ("--baselines", "x"),
    ("--data_preset", "huge"),
])
def test_voxdiff_bad_numbers_are_refused_before_any_write(flag: str, value: str, run_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_copy)
    one_line(*cli(capsys, VOXDIFF, _voxdiff_argv(run_copy, flag, value)), flag)
    assert_unchanged(run_copy, before)
    fresh = tmp_path / "fresh"  # a new run directory is not even created
    one_line(*cli(capsys, VOXDIFF, ["--preset", "tiny", "--run_dir", str(fresh), flag, value]), flag)
    assert not fresh.exists()


def test_voxdiff_full_disk_names_the_file(run_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_copy)
    monkeypatch.setattr(Path, "write_text", no_space)
    code, err = cli(capsys, VOXDIFF, _voxdiff_argv(run_copy))
    one_line(code, err, str(run_copy / "config.json"), "no space left")
    assert code == 28
    assert_unchanged(run_copy, before)


def test_voxdiff_errors_name_the_command(tmp_path: Path) -> None:
    assert cli_name("/x/voxdiff/__main__.py") == VOXDIFF and cli_name("/x/eval.py") == "eval.py"
    res = subprocess.run([sys.executable, "-m", "voxdiff", "--stages", "bogus", "--run_dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert res.returncode == 2 and res.stderr.startswith(f"{VOXDIFF}: error: unknown stage"), res.stderr


# ---- python -m voxdiff: what it loads --------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "fault"), [("ldm/best.pt", "nan_weights"), ("ldm/best.pt", "flipped_byte"),
                                             ("ae/best.pt", "random_bytes"), ("ae/best.pt", "truncated")])
def test_voxdiff_bad_checkpoint_stops_sampling(file: str, fault: str, run_copy: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An ldm.pt whose weights hold NaNs must not sample empty shapes and exit 0."""
    CORRUPTIONS[fault](run_copy / file)
    before = snapshot(run_copy, no_logs)
    line = one_line(*cli(capsys, VOXDIFF, _voxdiff_argv(run_copy, "--rerun_from", "sample")), file)
    assert "weights_only" not in line
    assert_unchanged(run_copy, before, no_logs)


@pytest.mark.parametrize("content", ['{"data": {"key": "0123', "[]", "\x00\xff"])
def test_voxdiff_unreadable_stage_records_are_rebuilt(content: str, run_copy: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """stages.json cut by a kill (or damaged) is rebuilt from the run's files: the trained models are kept as they
    are (retraining, or re-saving the AE under its LDM, would be wrong), the stages after them run again."""
    (run_copy / "stages.json").write_text(content)
    models = snapshot(run_copy, lambda p: p.suffix != ".pt")
    run(_config(run_copy), stages=("data", "ae", "ldm"), progress=False)
    line = one_line(1, capsys.readouterr().err, "stages.json cannot be read", "rebuilding")
    assert "kept: data, ae, ldm" in line
    assert set(json.loads((run_copy / "stages.json").read_text())) == {"data", "ae", "ldm"}
    assert snapshot(run_copy, lambda p: p.suffix != ".pt") == models
    if content.startswith("{"):  # and the rest of the job completes from there
        report = run(_config(run_copy), stages=PIPELINE_STAGES, progress=False)
        assert set(report["stages"]) >= set(PIPELINE_STAGES)
        assert snapshot(run_copy, lambda p: p.suffix != ".pt") == models


def test_voxdiff_rebuilt_records_still_refuse_changed_settings(run_copy: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / "stages.json").write_text("")
    before = snapshot(run_copy)
    one_line(*cli(capsys, VOXDIFF, _voxdiff_argv(run_copy, "--ae.lr", "0.5")), "stage ae", "settings changed")
    assert_unchanged(run_copy, before)


# ---- done means every output exists ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("lost", "reran"), [("oracle/chair.npy", "eval"), ("baselines/noise_table.npy", "eval"),
                                             ("samples/chair.npy", "sample")])
def test_a_stage_whose_output_is_missing_runs_again(lost: str, reran: str, run_copy: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / lost).unlink()
    models = snapshot(run_copy / "ldm", no_logs)
    run(_config(run_copy), stages=PIPELINE_STAGES, progress=False)
    assert (run_copy / lost).is_file()
    assert f"stage {reran} was recorded complete but" in capsys.readouterr().err
    assert f"stage {reran}: running" in (run_copy / "pipeline.log").read_text()
    assert snapshot(run_copy / "ldm", no_logs) == models  # nothing retrained


def test_a_stage_is_not_recorded_without_its_outputs(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from voxdiff import runner

    real = runner.stage_eval

    def loses_one(cfg: Any, log: Any, progress: bool = True) -> dict[str, Any]:
        out = real(cfg, log, progress)
        (run_copy / "baselines" / "noise_table.npy").unlink()  # written, then lost before the record (a fault)
        return out

    monkeypatch.setattr(runner, "stage_eval", loses_one)
    records = (run_copy / "stages.json").read_text()
    with pytest.raises(VoxdiffError, match="stage eval ended without writing .*noise_table.npy"):
        run(_config(run_copy), stages=PIPELINE_STAGES, progress=False, rerun_from="eval")
    assert (run_copy / "stages.json").read_text() == records  # nothing recorded for the rerun that lost a file
    monkeypatch.undo()
    run(_config(run_copy), stages=PIPELINE_STAGES, progress=False)  # a plain rerun finishes the job
    assert (run_copy / "baselines" / "noise_table.npy").is_file()


# ---- checkpoints -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fault_ckpts")
    return {"ae": make_ae_ckpt(d / "ae.pt"), "ldm": make_ldm_ckpt(d / "ldm.pt")}


@pytest.mark.parametrize("fault", ["random_bytes", "truncated", "text", "empty"])
def test_unreadable_checkpoint_is_one_line_without_torch_advice(fault: str, tiny_ckpts: dict[str, Path],
                                                                tmp_path: Path) -> None:
    path = Path(shutil.copy(tiny_ckpts["ae"], tmp_path / "ae.pt"))
    CORRUPTIONS[fault](path)
    with pytest.raises(VoxdiffError) as e:
        load_autoencoder(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is corrupt or not a voxdiff checkpoint (") and "\n" not in msg
    assert "weights_only" not in msg


def test_checkpoint_digest_catches_a_flipped_byte(tiny_ckpts: dict[str, Path], tmp_path: Path) -> None:
    raw = torch.load(tiny_ckpts["ldm"], weights_only=True)
    assert set(raw["digest"]) >= {"model", "ema"}
    path = Path(shutil.copy(tiny_ckpts["ldm"], tmp_path / "ldm.pt"))
    flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(VoxdiffError, match=f"{path} is corrupt: its (model|ema) tensors do not match the digest"):
        load_checkpoint(path)


@pytest.mark.parametrize(("part", "digest"), [("model", True), ("ema", True), ("ema", False)])
def test_non_finite_weights_are_refused(part: str, digest: bool, tiny_ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = Path(shutil.copy(tiny_ckpts["ldm"], tmp_path / "ldm.pt"))
    with_nan_weights(path, part, digest)
    with pytest.raises(VoxdiffError, match=f"{path}: its {part} weights hold 16 non-finite"):
        load_unet(path, use_ema=part == "ema")


def test_checkpoints_written_before_the_digest_still_load(tiny_ckpts: dict[str, Path], tmp_path: Path) -> None:
    raw = torch.load(tiny_ckpts["ae"], weights_only=True)
    raw.pop("digest")
    torch.save(raw, tmp_path / "old.pt")
    model, ckpt = load_autoencoder(tmp_path / "old.pt")
    save_checkpoint(tmp_path / "new.pt", ckpt)  # saved again: now with a digest, same weights
    assert "digest" in torch.load(tmp_path / "new.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  load_autoencoder(tmp_path / "new.pt")[0].state_dict().values()))


# ---- latent cache ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["truncated", "text", "empty", "wrong_rows"])
def test_unreadable_latent_cache_is_rebuilt(fault: str, tiny_ckpts: dict[str, Path], tiny_voxel_dir: Path,
                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from voxdiff.latents import cached_latents

    ae, _ = load_autoencoder(tiny_ckpts["ae"])
    args = (ae, "hash", tiny_voxel_dir, "train", ("chair", "table"), tmp_path / "cache", torch.device("cpu"))
    log = logging.getLogger("test_faults.latents")  # propagates to caplog (the trainer's logger writes its files)
    z, y, file = cached_latents(*args, progress=False, log=log)
    if fault == "wrong_rows":
        with open(file, "wb") as f:
            np.savez(f, latents=z.numpy()[:3], labels=y.numpy()[:3])
    else:
        CORRUPTIONS[fault](file)
    with caplog.at_level(logging.WARNING):
        z2, y2, file2 = cached_latents(*args, progress=False, log=log)
    assert file2 == file and torch.equal(z2, z) and torch.equal(y2, y)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(file) in warnings[0] and "encoding the train split again" in warnings[0]
    caplog.clear()
    cached_latents(*args, progress=False, log=log)  # rebuilt: read back silently
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
