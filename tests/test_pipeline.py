"""The main job at the `tiny` preset: every stage runs through the library and every artefact is well formed."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from voxdiff.__main__ import main
from voxdiff.config import CATEGORIES, PIPELINE_PRESETS, PipelineConfig, from_dict, pipeline_preset, to_dict
from voxdiff.pipeline import run
from voxdiff.utils import VoxdiffError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    cfg = dataclasses.replace(pipeline_preset("tiny"), run_dir=str(run_dir), device="cpu")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test body runs (conftest): bit-identity holds for one thread count
    try:
        return run_dir, run(cfg, command="test", progress=False)
    finally:
        torch.set_num_threads(n)


def test_presets_roundtrip() -> None:
    for name in PIPELINE_PRESETS:
        cfg = pipeline_preset(name)
        assert from_dict(PipelineConfig, to_dict(cfg)) == cfg
        assert cfg.sample.resolution % cfg.ae.model.resolution == 0 or cfg.name == "full"


def test_tiny_pipeline_artefacts(tiny_run: tuple[Path, dict]) -> None:
    run_dir, report = tiny_run
    r = 32
    for cat in CATEGORIES:
        for sub in ("samples", "oracle"):
            arr = np.load(run_dir / sub / f"{cat}.npy")
            assert arr.shape == (4, r, r, r) and arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1}
        assert np.load(run_dir / "oracle" / f"{cat}.npy").any(axis=(1, 2, 3)).all()  # oracle shapes are never empty
        for split in ("train", "val", "test"):
            assert (run_dir / "data" / f"{cat}_voxels_{split}.npy").is_file()
        res = report["eval"][cat]
        assert {"model", "oracle", "baseline_train", "baseline_noise"} <= set(res)
        for name in ("model", "oracle", "baseline_train", "baseline_noise"):
            assert all(math.isfinite(res[name][k]) for k in ("jsd", "mmd", "cov", "nna"))
            assert res[name]["n_refs"] == 8 and res[name]["n_bloated_samples"] is not None
        # The oracle is a real draw of the same family: it must beat occupancy-matched noise on MMD.
        assert res["oracle"]["mmd"] < res["baseline_noise"]["mmd"]
        # the copying check catches the baseline that copies training shapes: distance 0 to its nearest one
        mem = res["memorization"]
        assert mem["baseline_train"]["samples_median"] == 0 and mem["baseline_train"]["ratio"] == 0
        assert mem["model"]["heldout_median"] > 0 and mem["model"]["n_train"] == 8
        png = run_dir / report["renders"][cat]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("ae/best.pt", "ae/last.pt", "ldm/last.pt", "ae/log.png", "ldm/log.png", "config.json", "report.md"):
        assert (run_dir / f).is_file(), f
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["eval"]["chair"]["model"]["mmd"] == report["eval"]["chair"]["model"]["mmd"]
    md = (run_dir / "report.md").read_text()
    assert "| oracle |" in md and "## table" in md and "renders/chair.png" in md
    # how it ran: one thread count for every stage (recorded in config.json), each stage's precision and why
    assert json.loads((run_dir / "config.json").read_text())["threads"] == "1"
    rt = report["runtime"]
    assert rt["pipeline"]["threads"]["threads"] == 1 and {"ae", "ldm", "sample"} <= set(rt)
    for stage in ("ae", "ldm"):
        assert rt[stage]["threads"]["threads"] == 1 and rt[stage]["skipped_steps"] == 0
        assert rt[stage]["precision"]["precision"] in ("fp32", "bf16") and rt[stage]["precision"]["reason"]
    assert "## How it ran on this machine" in md and "| ldm |" in md


def test_rerun_skips_completed_stages(tiny_run: tuple[Path, dict]) -> None:
    run_dir, first = tiny_run
    ae_mtime = (run_dir / "ae" / "last.pt").stat().st_mtime_ns
    cfg = from_dict(PipelineConfig, json.loads((run_dir / "config.json").read_text()))
    again = run(cfg, stages=("ae", "ldm", "eval", "report"))
    assert (run_dir / "ae" / "last.pt").stat().st_mtime_ns == ae_mtime
    assert again["eval"]["table"]["model"] == first["eval"]["table"]["model"]


def test_rerun_from_eval_keeps_the_models_and_rescores(tiny_run: tuple[Path, dict]) -> None:
    """--rerun_from eval redoes eval, render and report only: the checkpoints and samples are not touched."""
    run_dir, first = tiny_run
    kept = [run_dir / "ae" / "last.pt", run_dir / "ldm" / "last.pt", run_dir / "samples" / "chair.npy"]
    mtimes = [p.stat().st_mtime_ns for p in kept]
    eval_json = run_dir / "stages.json"
    before = json.loads(eval_json.read_text())["eval"]["seconds"]
    again = main(["--config", str(run_dir / "config.json"), "--rerun_from", "eval", "--device", "cpu"])
    assert [p.stat().st_mtime_ns for p in kept] == mtimes
    assert json.loads(eval_json.read_text())["eval"]["seconds"] != before  # eval ran again
    numbers = ("jsd", "mmd", "cov", "nna", "nna_balanced", "n_empty_samples", "n_bloated_samples")
    assert {k: again["eval"]["table"]["model"][k] for k in numbers} == \
        {k: first["eval"]["table"]["model"][k] for k in numbers}
    assert again["timings"]["ae"] == first["timings"]["ae"]  # the earlier stages' records are kept
    with pytest.raises(VoxdiffError, match="rerun_from must be one of"):
        run(from_dict(PipelineConfig, json.loads((run_dir / "config.json").read_text())), rerun_from="ae")


def test_cli_rejects_bad_stage(tmp_path: Path) -> None:
    with pytest.raises(VoxdiffError, match="unknown stage"):
        main(["--preset", "tiny", "--run_dir", str(tmp_path / "x"), "--stages", "data,oops"])
    with pytest.raises(VoxdiffError, match="config file not found"):
        main(["--config", str(tmp_path / "missing.json")])


def _weights(ckpt) -> dict:
    return {**{f"model.{k}": v for k, v in ckpt.model.items()},
            **{f"ema.{k}": v for k, v in (ckpt.ema or {}).items()}}


def test_same_command_twice_is_bit_identical(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    """Training lengths are steps, so a second run of the same preset and seed gives the same weights and samples."""
    from voxdiff.checkpoint import load_checkpoint

    run_dir, _ = tiny_run
    cfg = dataclasses.replace(pipeline_preset("tiny"), run_dir=str(tmp_path / "again"), device="cpu")
    run(cfg, stages=("data", "ae", "ldm", "tune", "sample"), progress=False)
    for f in ("ae/best.pt", "ae/last.pt", "ldm/best.pt", "ldm/last.pt"):
        a, b = load_checkpoint(run_dir / f), load_checkpoint(tmp_path / "again" / f)
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and a.step == b.step > 0
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f
    for cat in CATEGORIES:
        assert np.array_equal(np.load(run_dir / "samples" / f"{cat}.npy"),
                              np.load(tmp_path / "again" / "samples" / f"{cat}.npy"))


def test_time_cap_is_reported(tmp_path: Path) -> None:
    """A stage that the safety cap stopped says so on the console, in stages.json and in report.md."""
    base = pipeline_preset("tiny")
    cfg = dataclasses.replace(base, run_dir=str(tmp_path / "capped"), device="cpu",
                              ae=dataclasses.replace(base.ae, max_minutes=1e-9))
    report = run(cfg, stages=("data", "ae", "report"))
    line = "AE stopped by the time cap at step 0 of 3; these results are not the preset's"
    assert report["notes"] == [line]
    assert json.loads((tmp_path / "capped" / "stages.json").read_text())["ae"]["result"]["note"] == line
    assert line in (tmp_path / "capped" / "report.md").read_text()
