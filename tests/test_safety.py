"""Never lose a user's data, never mislead: one test per failure a careful user found, and the outputs that misled.
That every command refuses bad input with one line on stderr, exit status 2 and nothing written is checked for all of
them in tests/test_one_line_errors.py."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faultlib import cli, one_line
from helpers import TINY_AE, make_ae_ckpt, make_voxel_dir

from voxdiff.cli import load_script
from voxdiff.config import AETrainConfig, SampleConfig
from voxdiff.data.partseg import COUNT_PRESETS, PROCEDURAL_MARKER, write_synthetic_partseg
from voxdiff.errors import VoxdiffError, run_cli
from voxdiff.files import dir_lock
from voxdiff.presets import run_preset
from voxdiff.runner import run
from voxdiff.training.autoencoder import train_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ae_cfg(data: Path, run_dir: Path, **kw: Any) -> AETrainConfig:
    base = dict(dataset_path=str(data), ckpt_path=str(run_dir), batch_size=8, num_steps=2, ckpt_every=1, device="cpu",
                holdout_fraction=0.25, log_every=1, model=TINY_AE)
    return AETrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline run up to the samples (no eval), with one thread as every test body."""
    d = tmp_path_factory.mktemp("safety") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(d), device="cpu")
        run(cfg, stages=("data", "ae", "ldm", "tune", "sample"), progress=False)
    finally:
        torch.set_num_threads(n)
    return d


# ---- the pipeline never writes over a user's HDF5 files --------------------------------------------------------------


def test_load_data_and_the_pipeline_never_write_over_a_users_hdf5(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    theirs = tmp_path / "shapenet"
    write_synthetic_partseg(theirs, COUNT_PRESETS["tiny"], seed=9)
    (theirs / PROCEDURAL_MARKER).unlink()  # now it is somebody's ShapeNet copy
    before = {p.name: _sha(p) for p in theirs.glob("*.h5")}
    code, err = cli(capsys, "load_data.py", ["--synthetic", "--dataset_path", str(theirs)])
    one_line(code, err, "did not generate", "choose another directory")
    # the pipeline voxelizes the user's files beside them instead of generating procedural shapes over them
    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path / "run"), dataset_path=str(theirs),
                              device="cpu")
    run(cfg, stages=("data",), progress=False)
    assert {p.name: _sha(p) for p in theirs.glob("*.h5")} == before
    assert (theirs / "chair_voxels_train.npy").is_file()
    # a dataset_path that does not exist is refused, not created and filled
    missing = dataclasses.replace(cfg, run_dir=str(tmp_path / "run2"), dataset_path=str(tmp_path / "nope"))
    with pytest.raises(VoxdiffError, match="is not a directory"):
        run(missing, progress=False)
    assert not (tmp_path / "nope").exists() and not (tmp_path / "run2").exists()


# ---- a rerun without --resume does not destroy a finished run --------------------------------------------------------


def test_a_rerun_without_resume_is_refused_and_keeps_the_finished_run(tiny_voxel_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "ae"
    train_autoencoder(_ae_cfg(tiny_voxel_dir, run_dir), progress=False)
    files = {n: _sha(run_dir / n) for n in ("last.pt", "best.pt", "log.jsonl")}
    argv = ["--dataset_path", str(tiny_voxel_dir), "--ckpt_path", str(run_dir), "--device", "cpu", "--num_steps", "1",
            "--resolution", "32", "--channels", "4", "8", "8"]
    code, err = cli(capsys, "autoencoder.py", argv)
    one_line(code, err, "already holds a run", "--resume", "--overwrite")
    assert {n: _sha(run_dir / n) for n in files} == files
    # --overwrite replaces it on purpose: a new run of 1 step, no stale best.pt of the old one
    train_autoencoder(_ae_cfg(tiny_voxel_dir, run_dir, num_steps=1, overwrite=True), progress=False)
    assert torch.load(run_dir / "best.pt", weights_only=True)["step"] == 1


# ---- two writers in one directory ------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_until_the_first_releases_the_directory(tiny_voxel_dir: Path, tmp_path: Path,
                                                                           ckpts: dict[str, Path]) -> None:
    from voxdiff.sampling import sample_to_files

    # as if another process were writing there
    with dir_lock(tmp_path / "ae", "training run"), pytest.raises(VoxdiffError, match="in use by another training"):
        train_autoencoder(_ae_cfg(tiny_voxel_dir, tmp_path / "ae"), progress=False)
    with dir_lock(tmp_path / "s", "sampling job"), pytest.raises(VoxdiffError, match="in use by another sampling"):
        sample_to_files(SampleConfig(ldm_ckpt_path=str(ckpts["ldm"]), ae_ckpt_path=str(ckpts["ae"]),
                                     save_dir=str(tmp_path / "s"), num_samples=1, resolution=32, device="cpu"),
                        progress=False)
    with dir_lock(tmp_path / "p", "pipeline"), pytest.raises(VoxdiffError, match="in use by another pipeline"):
        run(dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path / "p"), device="cpu"),
            progress=False)
    # once released, the directory is usable again
    assert train_autoencoder(_ae_cfg(tiny_voxel_dir, tmp_path / "ae", num_steps=1), progress=False)["step"] == 1


def test_a_killed_owners_lock_is_taken_over_with_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock").write_text("4242 on elsewhere")  # its owner was killed: the entry stayed, the kernel lock did not
    with dir_lock(d, "training run"):
        assert (d / ".lock").read_text() == f"{os.getpid()} on {socket.gethostname()}"
        owner = f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(VoxdiffError, match=owner), dir_lock(d, "training run"):  # a second writer
            pass
    assert "taking over" in capsys.readouterr().err and "4242 on elsewhere" not in (d / ".lock").read_text()
    with dir_lock(d, "training run"):  # released cleanly: no notice this time
        pass
    assert "taking over" not in capsys.readouterr().err


# ---- a moved run directory, or its path spelled differently, resumes -------------------------------------------------


def test_a_moved_or_respelled_run_dir_retrains_and_resamples_nothing(tiny_pipeline: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(tiny_pipeline, moved)
    before = {f: _sha(moved / f) for f in ("ae/best.pt", "ldm/last.pt", "samples/chair.npy")}
    old_log = len((moved / "pipeline.log").read_text())
    stages = ("data", "ae", "ldm", "tune", "sample")
    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(moved), device="cpu")
    report = run(cfg, stages=stages, progress=False)
    assert set(report["stages"]) >= set(stages)
    assert {f: _sha(moved / f) for f in before} == before  # nothing retrained or resampled
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same directory spelled relative
    rel = dataclasses.replace(cfg, run_dir="run")
    run(rel, stages=stages, progress=False)
    assert {f: _sha(moved / f) for f in before} == before
    log = (moved / "pipeline.log").read_text()[old_log:]  # what the two reruns logged
    assert log.count("stage ae: up to date, skipped") == 2 and "running" not in log


# ---- labels the data should not hold ---------------------------------------------------------------------------------


def test_labels_outside_partseg_are_skipped_counted_and_logged(tmp_path: Path) -> None:
    import h5py

    from voxdiff.data.voxelize import preprocess

    d = tmp_path / "h5"
    write_synthetic_partseg(d, {"train": {"chair": 3}}, seed=0)
    with h5py.File(next(d.glob("ply_data_train*.h5")), "r+") as f:
        lab = f["label"][()]
        lab[0, 0] = 99  # not a PartSeg category at all
        f["label"][...] = lab
    summary = preprocess(d, d, resolution=8, splits=("train",), progress=False)
    assert summary["skipped"]["train"]["invalid_labels"] == {99: 1}
    assert "labels outside PartSeg's 0..15" in (d / "preprocess.log").read_text()


# ---- a full disk and a cut write -------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from voxdiff import checkpoint
    from voxdiff.files import open_npy_memmap

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", no_space)
    with pytest.raises(OSError) as err:
        open_npy_memmap(tmp_path / "big.npy", (10, 32, 32, 32))
    assert err.value.errno == errno.ENOSPC and "big.npy" in str(err.value)

    def torch_save_fails(*a: Any, **k: Any) -> None:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_fails)

    def main(argv: Any) -> None:
        checkpoint.save_checkpoint(tmp_path / "last.pt", checkpoint.Checkpoint(
            kind="autoencoder", model_config={"a": 1}, model={}, meta=checkpoint.AEMeta()))

    with pytest.raises(SystemExit) as exc:
        run_cli(main, [])
    err_text = capsys.readouterr().err
    one_line(int(exc.value.code), err_text, "last.pt", "disk full")
    assert not list(tmp_path.glob(".*.tmp"))  # the half-written file is gone

    def full(argv: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))

    with pytest.raises(SystemExit) as exc:
        run_cli(full, [])
    assert exc.value.code == 28 and "no space left on the device" in capsys.readouterr().err


def test_a_cut_last_log_line_is_dropped_and_resume_completes(tiny_voxel_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ae"
    train_autoencoder(_ae_cfg(tiny_voxel_dir, run_dir), progress=False)
    log = run_dir / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # a kill in the middle of a write
    res = train_autoencoder(_ae_cfg(tiny_voxel_dir, run_dir, num_steps=3, resume=True), progress=False)
    assert res["step"] == 3
    rows = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses again
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert "dropped a cut last line" in (run_dir / "train.log").read_text()


# ---- leftovers -------------------------------------------------------------------------------------------------------


def test_leftovers_of_killed_runs_are_cleaned_and_failed_runs_leave_no_folder(
        tiny_voxel_dir: Path, ckpts: dict[str, Path], tmp_path: Path) -> None:
    from voxdiff.sampling import sample_to_files

    run_dir = tmp_path / "ae"
    train_autoencoder(_ae_cfg(tiny_voxel_dir, run_dir), progress=False)
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    train_autoencoder(_ae_cfg(tiny_voxel_dir, run_dir, num_steps=3, resume=True), progress=False)
    assert not list(run_dir.glob(".*.tmp"))
    # failures before the first result leave nothing behind
    with pytest.raises(VoxdiffError):
        train_autoencoder(_ae_cfg(tmp_path / "no_data", tmp_path / "new_run"), progress=False)
    with pytest.raises(VoxdiffError):
        sample_to_files(SampleConfig(ldm_ckpt_path=str(ckpts["ldm"]), ae_ckpt_path=str(ckpts["ae64"]),
                                     save_dir=str(tmp_path / "new_samples"), device="cpu"), progress=False)
    bad = make_voxel_dir(tmp_path / "bad", n={"train": 1})  # one shape: none left after the held-out slice
    with pytest.raises(VoxdiffError, match="need at least 2"):
        train_autoencoder(_ae_cfg(bad, tmp_path / "new_run2"), progress=False)
    assert not any((tmp_path / d).exists() for d in ("new_run", "new_samples", "new_run2"))


# ---- what misled ----------------------------------------------------------------------------------------------------


def test_cfg_scale_alone_turns_guidance_on(ckpts: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    main = load_script(ROOT / "diffusion" / "sample.py").main
    main(["--ldm_ckpt_path", str(ckpts["ldm"]), "--ae_ckpt_path", str(ckpts["ae"]), "--save_dir",
          str(tmp_path / "s"), "--cfg_scale", "3", "--num_samples", "1", "--steps", "2", "--resolution", "32",
          "--category", "chair", "--device", "cpu"])
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["cfg_scale_effective"] == 3.0
    help_text = load_script(ROOT / "diffusion" / "sample.py").build_parser()[0].format_help()
    assert '"guidance scale" of 1 + w' in " ".join(help_text.split())


def test_report_counts_empty_and_bloated_and_meets_no_goal(tmp_path: Path) -> None:
    """A set with an empty and a bloated sample: both are counted, on the console and in report.md, and no goal is
    marked met for it (though its other numbers equal the oracle's)."""
    from voxdiff.report import goal_check, summary_lines, write_report
    from voxdiff.scoring import References, score_sets

    data = make_voxel_dir(tmp_path / "data", n={"train": 6, "val": 3, "test": 3})
    refs = References.load(data, "chair")
    oracle = np.concatenate([np.load(data / "chair_voxels_test.npy"), np.load(data / "chair_voxels_val.npy")])
    model = oracle.copy()
    model[0] = 0  # empty
    model[1] = 1  # bloated: every voxel occupied
    out = score_sets(refs, {"model": model, "oracle": oracle})
    res = {"provenance": out["provenance"], **out["sets"]}
    assert res["model"]["n_empty_samples"] == 1 and res["model"]["n_bloated_samples"] == 1
    res["goal"] = goal_check(res)
    assert not any(g["met"] for g in res["goal"].values())
    report = {"eval": {"chair": res}, "machine": {"platform": "test", "torch": "-", "cuda": False, "cpus": 2},
              "date": "today", "command": "test", "timings": {}, "notes": []}
    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path))
    write_report(cfg, report)
    md = (tmp_path / "report.md").read_text()
    assert "| model |" in md and "| 1/6 | 1/6 |" in md and ": met" not in md and "1 empty samples" in md
    line = next(x for x in summary_lines(report, tmp_path) if "model" in x)
    assert "empty 1/6" in line and "bloated 1/6" in line


def test_trainer_preview_binarises_like_the_final_sampling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The pipeline gives the LDM's preview the sampling threshold, and the preview goes through the same
    LatentVoxelPipeline.to_grids as sample.py with that threshold."""
    from voxdiff.runner import resolve
    from voxdiff.sampling import LatentVoxelPipeline
    from voxdiff.training import ldm

    base = run_preset("tiny")
    cfg = resolve(dataclasses.replace(base, sample=dataclasses.replace(base.sample, threshold=0.37)))
    assert cfg.ldm.preview_threshold == 0.37
    seen: list[Any] = []
    real = LatentVoxelPipeline.to_grids

    def spy(self: Any, z: Any, labels: Any, binarization: Any, resolution: Any = None) -> Any:
        seen.append(binarization)
        return real(self, z, labels, binarization, resolution)

    monkeypatch.setattr(LatentVoxelPipeline, "to_grids", spy)
    from voxdiff.checkpoint import load_autoencoder
    from voxdiff.models.unet3d import UNet3D

    ae_path = make_ae_ckpt(tmp_path / "ae.pt")
    ae, ck = load_autoencoder(ae_path)
    unet = UNet3D(dataclasses.replace(cfg.ldm.model, num_classes=3))
    ldm._render_preview(unet, ae, ck.meta, dataclasses.replace(cfg.ldm, preview_threshold=0.37), tmp_path, 0,
                        ldm.get_logger("test"))
    assert seen and seen[0].threshold == 0.37 and seen[0].topk is None
    assert (tmp_path / "samples_000000.png").is_file()  # in the run directory it was given, nowhere else
