"""The main job at the `tiny` preset: every stage runs through the library and every artefact is well formed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from voxdiff import runner
from voxdiff.__main__ import main
from voxdiff.checkpoint import load_checkpoint
from voxdiff.config import (
    CATEGORIES,
    GoalConfig,
    LDMTrainConfig,
    RunConfig,
    from_dict,
    to_dict,
)
from voxdiff.errors import VoxdiffError
from voxdiff.presets import RUN_PRESETS, run_preset
from voxdiff.report import goal_check, reading, summary_lines
from voxdiff.runner import resolve, run, stage_key
from voxdiff.sampling import LatentVoxelPipeline

STRUCTURE_KEYS = ("sample_stray", "ref_stray", "sample_fragmented", "ref_fragmented")
READINGS = ("close to the data", "partly there: misses ", "far from the data")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(run_dir), device="cpu")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test body runs (conftest): bit-identity holds for one thread count
    try:
        return run_dir, run(cfg, command="test", progress=False)
    finally:
        torch.set_num_threads(n)


def test_presets_roundtrip() -> None:
    for name in RUN_PRESETS:
        cfg = run_preset(name)
        assert from_dict(RunConfig, to_dict(cfg)) == cfg
        assert cfg.sample.resolution % cfg.ae.model.resolution == 0 or cfg.name == "full"


def test_tiny_pipeline_artefacts(tiny_run: tuple[Path, dict]) -> None:
    run_dir, report = tiny_run
    resolution = 32  # the tiny preset's
    for cat in CATEGORIES:
        for sub in ("samples", "oracle"):
            arr = np.load(run_dir / sub / f"{cat}.npy")
            assert arr.shape == (4, *(resolution,) * 3) and arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1}
        assert np.load(run_dir / "oracle" / f"{cat}.npy").any(axis=(1, 2, 3)).all()  # oracle shapes are never empty
        for split in ("train", "val", "test"):
            assert (run_dir / "data" / f"{cat}_voxels_{split}.npy").is_file()
        res = report["eval"][cat]
        assert {"model", "oracle", "baseline_train", "baseline_noise"} <= set(res)
        for name in ("model", "oracle", "baseline_train", "baseline_noise"):
            assert all(math.isfinite(res[name][k]) for k in ("jsd", "mmd", "cov", "nna"))
            assert res[name]["n_refs"] == 8 and res[name]["n_bloated_samples"] is not None
            assert all(0.0 <= res[name][k] <= 1.0 for k in STRUCTURE_KEYS), name
        # every set is scored against the same references: the data's own figures agree across sets
        data = {(res[n]["ref_stray"], res[n]["ref_fragmented"]) for n in ("model", "oracle", "baseline_noise")}
        assert len(data) == 1
        # noise of the training occupancy is nearly all stray voxels, far above the data's share
        assert res["baseline_noise"]["sample_stray"] > 0.5 > res["baseline_noise"]["ref_stray"]
        goal = res["goal"]
        assert {"cov", "mmd", "jsd", "nna", "bloated", "empty", "stray", "fragmented"} == set(goal)
        assert goal["stray"]["value"] == res["model"]["sample_stray"] and goal["stray"]["data"] == res["model"][
            "ref_stray"]
        assert goal["fragmented"]["data"] == res["model"]["ref_fragmented"]
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
    assert "| bloated | stray | fragmented | mean voxels |" in md and "of their voxels are stray and" in md
    assert "Goals: COV " in md and "; stray " in md and "(goal ≤ 1.5× data + 1%: " in md and "Reading: " in md
    # how it ran: one thread count for every stage (recorded in config.json), each stage's precision and why
    assert json.loads((run_dir / "config.json").read_text())["threads"] == "1"
    rt = report["runtime"]
    assert rt["pipeline"]["threads"]["threads"] == 1 and {"ae", "ldm", "sample"} <= set(rt)
    for stage in ("ae", "ldm"):
        assert rt[stage]["threads"]["threads"] == 1 and rt[stage]["skipped_steps"] == 0
        assert rt[stage]["precision"]["precision"] in ("fp32", "bf16") and rt[stage]["precision"]["reason"]
    assert "## How it ran on this machine" in md and "| ldm |" in md


def test_the_run_exports_its_model_with_the_tuned_settings(tiny_run: tuple[Path, dict]) -> None:
    """run_dir/model holds the pair for sampling, its ldm.pt the settings the tune stage picked: what from_pretrained
    and diffusion/sample.py use when not told otherwise."""
    run_dir, report = tiny_run
    pick = report["stages"]["tune"]["pick"]
    meta = load_checkpoint(run_dir / "model" / "ldm.pt", kind="ldm").meta
    assert meta.sampling["cfg_scale"] == pick["cfg_scale"] and meta.sampling["threshold"] == pick["threshold"]
    assert meta.sampling["sampler"] == "ddim" and meta.sampling["steps"] == 3
    pipe = LatentVoxelPipeline.from_pretrained(run_dir / "model", precision="fp32")
    out = pipe("chair", 2, seed=0)
    assert out.grids.shape == (2, 32, 32, 32) and out.sources["threshold"] == "model"
    assert out.settings["cfg_scale"] == pick["cfg_scale"]


def test_rerun_skips_completed_stages(tiny_run: tuple[Path, dict]) -> None:
    run_dir, first = tiny_run
    ae_mtime = (run_dir / "ae" / "last.pt").stat().st_mtime_ns
    cfg = from_dict(RunConfig, json.loads((run_dir / "config.json").read_text()))
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
        run(from_dict(RunConfig, json.loads((run_dir / "config.json").read_text())), rerun_from="ae")


def test_stage_keys_are_those_of_runs_recorded_before() -> None:
    """A stage key hashes the stage's settings without where-and-how fields (paths, device, threads, resume, the
    guard's patience: metadata "local"), the AE block under its first name "seed": the keys a run directory recorded
    before those were declared in config.py, before the starter network was renamed "course", and before the AE's LR
    schedule fields were added ("added": out of the key at their defaults), still match."""
    local = ("dataset_path", "ckpt_path", "ae_ckpt_path", "ldm_ckpt_path", "save_dir", "latent_cache_dir", "resume",
             "overwrite", "device", "threads", "max_bad_steps")
    for name in ("tiny", "full"):
        cfg = resolve(dataclasses.replace(run_preset(name), run_dir="/somewhere/run", device="cpu"))
        assert cfg.ae.model.block == "course"
        for stage in ("ae", "ldm", "tune", "sample"):
            recorded = {k: v for k, v in to_dict(getattr(cfg, stage)).items() if k not in local}
            if stage == "ae":
                recorded["model"]["block"] = "seed"
                del recorded["warmup_steps"], recorded["lr_schedule"]  # added in 0.5.0: out of the key at defaults
            if stage == "ldm":  # out of the key since 0.5.0; older records are matched through last.pt (below)
                del recorded["preview"], recorded["preview_every"], recorded["preview_threshold"]
            digest = hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()[:16]
            assert stage_key(stage, cfg, None) == digest, (name, stage)
        cosine = dataclasses.replace(cfg, ae=dataclasses.replace(cfg.ae, lr_schedule="cosine"))
        assert stage_key("ae", cosine, None) != stage_key("ae", cfg, None)  # away from its default it is keyed


def test_a_new_sampling_threshold_keeps_the_trained_models(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    """The LDM's preview threshold follows the sampling threshold but changes no weights: a rerun with another
    `--sample.threshold` samples, scores and renders again and keeps both trained networks, also in a run recorded
    before 0.5.0, whose LDM key held the preview fields."""
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run[0], run_dir)
    cfg = dataclasses.replace(from_dict(RunConfig, json.loads((run_dir / "config.json").read_text())),
                              run_dir=str(run_dir))
    cfg = resolve(cfg)
    records = json.loads((run_dir / "stages.json").read_text())
    trained = load_checkpoint(run_dir / "ldm" / "last.pt", kind="ldm").train_config
    legacy = runner._key(runner._strip(trained, LDMTrainConfig, previews=True))
    assert legacy != records["ldm"]["key"] == stage_key("ldm", cfg, None)
    records["ldm"]["key"] = legacy  # as 0.4.0 recorded it
    (run_dir / "stages.json").write_text(json.dumps(records))
    weights = {s: (run_dir / s / "last.pt").read_bytes() for s in ("ae", "ldm")}
    new = cfg.sample.threshold / 2
    again = main(["--config", str(run_dir / "config.json"), "--run_dir", str(run_dir), "--no_tune",
                  "--sample.threshold", str(new), "--device", "cpu"])
    assert {s: (run_dir / s / "last.pt").read_bytes() for s in ("ae", "ldm")} == weights
    after = json.loads((run_dir / "stages.json").read_text())
    rerun = resolve(from_dict(RunConfig, json.loads((run_dir / "config.json").read_text())))
    assert rerun.sample.threshold == new
    assert after["ae"] == records["ae"] and after["ldm"]["seconds"] == records["ldm"]["seconds"]
    assert after["ldm"]["key"] == stage_key("ldm", rerun, None)  # the record now holds the current key
    assert after["sample"]["key"] != records["sample"]["key"]  # the sample stage ran for the new threshold
    for cat in CATEGORIES:  # a lower threshold keeps more voxels
        assert again["eval"][cat]["model"]["sample_mean_voxels"] >= \
            tiny_run[1]["eval"][cat]["model"]["sample_mean_voxels"]


def test_a_record_of_0_4_0_with_the_same_settings_is_current(tmp_path: Path) -> None:
    """Without reading a checkpoint: a 0.4.0 LDM record (key with the preview fields) for the current settings gets the
    current key; one for other settings stays, and is refused as changed."""
    cfg = resolve(dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path), device="cpu"))
    legacy = runner._key(runner._strip(to_dict(cfg.ldm), LDMTrainConfig, previews=True))
    other = runner._key(runner._strip(to_dict(dataclasses.replace(cfg.ldm, lr=1.0)), LDMTrainConfig, previews=True))
    for recorded, current in ((legacy, True), (other, False)):
        (tmp_path / "stages.json").write_text(json.dumps({"ldm": {"key": recorded, "seconds": 1.0, "result": {}}}))
        done = runner._Stages(tmp_path, force=False)
        key = stage_key("ldm", cfg, None)
        done.update_legacy("ldm", key, cfg)
        assert done.changed("ldm", key) is not current


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
    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path / "again"), device="cpu")
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
    base = run_preset("tiny")
    cfg = dataclasses.replace(base, run_dir=str(tmp_path / "capped"), device="cpu",
                              ae=dataclasses.replace(base.ae, max_minutes=1e-9))
    report = run(cfg, stages=("data", "ae", "report"))
    line = "AE stopped by the time cap at step 0 of 3; these results are not the preset's"
    assert report["notes"] == [line]
    assert json.loads((tmp_path / "capped" / "stages.json").read_text())["ae"]["result"]["note"] == line
    assert line in (tmp_path / "capped" / "report.md").read_text()


# ---- goals and the console summary --------------------------------------------------------------------------------


def _result(**model: float) -> dict:
    """A category's scores: a model equal to the oracle on the distances, the data 1 % stray and never fragmented."""
    base = {"jsd": 0.02, "mmd": 0.004, "cov": 0.5, "nna": 0.6, "nna_balanced": 0.55, "n_samples": 100,
            "n_empty_samples": 0, "n_bloated_samples": 0, "sample_mean_voxels": 300.0, "ref_mean_voxels": 300.0,
            "sample_stray": 0.012, "ref_stray": 0.01, "sample_fragmented": 0.0, "ref_fragmented": 0.0}
    res = {"provenance": {"reference_count": 100}, "model": {**base, **model},
           "oracle": {**base, "sample_stray": 0.01}}
    res["goal"] = goal_check(res)
    return res


def test_goals_on_stray_and_fragmented_against_the_data() -> None:
    """stray and fragmented meet their goal at ≤ structure × the data's share + 1 point (1.5× by default)."""
    ok = _result()
    assert all(g["met"] for g in ok["goal"].values()) and reading(ok) == "close to the data"
    assert ok["goal"]["stray"] == {"value": 0.012, "data": 0.01, "bound": pytest.approx(0.025),
                                   "goal": "≤ 1.5× data + 1%", "met": True}
    stray = _result(sample_stray=0.03)  # 3× the data's 1 %: above 1.5 × 1 % + 1 %
    assert not stray["goal"]["stray"]["met"] and stray["goal"]["fragmented"]["met"]
    assert reading(stray) == "partly there: misses stray"
    frag = _result(sample_fragmented=0.02)  # the data has none: 1 % allowed
    assert frag["goal"]["fragmented"]["bound"] == pytest.approx(0.01) and not frag["goal"]["fragmented"]["met"]
    assert _result(sample_fragmented=0.01)["goal"]["fragmented"]["met"]
    both = _result(sample_stray=0.03, sample_fragmented=0.02, ref_fragmented=0.005, jsd=0.05)  # JSD 2.5× too
    assert reading(both) == "partly there: misses JSD, stray, fragmented"
    # the preset's goals decide: a looser structure goal passes the same samples, a stricter one fails clean ones
    assert goal_check(stray, GoalConfig(structure=3.0))["stray"]["met"]
    assert not goal_check(ok, GoalConfig(structure=0.0))["stray"]["met"]
    loose = goal_check(both, GoalConfig(jsd=3.0, structure=4.0))
    assert all(g["met"] for g in loose.values()) and loose["jsd"]["goal"] == "≤ 3.0× oracle"
    # empty samples block every goal, these two included
    empty = _result(n_empty_samples=3)
    assert not any(g["met"] for g in empty["goal"].values())
    assert empty["goal"]["stray"]["why"] == "3 empty samples"
    # results of an older scorer carry no structure figures: those two goals are left out, the rest still judged
    old = _result()
    for k in STRUCTURE_KEYS:
        del old["model"][k]
    old["goal"] = goal_check(old)
    assert "stray" not in old["goal"] and "fragmented" not in old["goal"] and reading(old) == "close to the data"


def test_reading_far_from_the_data() -> None:
    """Far: 1-NNA on equal sets ≥ 0.95, or fragmented above 3× the data's share + 5 points; else the goals decide."""
    assert reading(_result(nna_balanced=0.95)) == "far from the data"
    assert reading(_result(nna_balanced=0.94)) == "partly there: misses 1-NNA"
    assert reading(_result(sample_fragmented=0.06)) == "far from the data"  # data 0 %: above 5 %
    assert reading(_result(sample_fragmented=0.05)) == "partly there: misses fragmented"
    assert reading(_result(sample_fragmented=0.34, ref_fragmented=0.10)) == "partly there: misses fragmented"
    assert reading(_result(sample_fragmented=0.36, ref_fragmented=0.10)) == "far from the data"
    no_oracle = _result()
    del no_oracle["oracle"]
    no_oracle["goal"] = goal_check(no_oracle)
    assert no_oracle["goal"] == {} and not reading(no_oracle).startswith(READINGS)


def test_summary_says_what_the_run_got(tmp_path: Path) -> None:
    """The console summary: the teaser, per category the model beside the oracle and the data and a reading, the
    stage times, the report; a dozen lines for three categories."""
    report = {"notes": [], "renders": {"teaser": "renders/teaser.png"},
              "eval": {"airplane": _result(), "chair": _result(sample_stray=0.03, jsd=0.05, nna_balanced=0.7),
                       "table": _result(nna_balanced=0.97, n_bloated_samples=4)},
              "timings": {"data": 2.0, "ae": 300.0, "ldm": 45.2, "sample": 0.4}}
    (tmp_path / "report.md").write_text("x")
    lines = summary_lines(report, tmp_path)
    assert lines[0] == f"teaser: {tmp_path / 'renders' / 'teaser.png'}"
    assert lines[1] == ("airplane  model/oracle JSD 1.00× MMD 1.00× COV 1.00×; 1-NNA 0.55 (oracle 0.55); "
                        "stray 1.2% (data 1.0%); fragmented 0.0% (data 0.0%)")
    assert lines[2].split() == ["reading:", "close", "to", "the", "data"]
    assert "JSD 2.50×" in lines[3] and "stray 3.0% (data 1.0%)" in lines[3]
    assert lines[4].strip() == "reading: partly there: misses JSD, 1-NNA, stray"
    assert lines[5].endswith("; bloated 4/100") and lines[6].strip() == "reading: far from the data"
    assert lines[7] == "stage times: data 2.0s, ae 5.0 min, ldm 45s, sample 0.4s; total 5.8 min"
    assert lines[8] == f"report: {tmp_path / 'report.md'}" and len(lines) == 9


def test_a_changed_goal_rewrites_the_report_only(tiny_run: tuple[Path, dict],
                                                 capsys: pytest.CaptureFixture) -> None:
    """Goals are in no stage key: a rerun with other goals runs no stage (stages.json untouched) and judges the same
    scores anew; the console summary names the teaser, reads each category and gives the stage times."""
    run_dir, _ = tiny_run
    cfg = from_dict(RunConfig, json.loads((run_dir / "config.json").read_text()))
    strict = dataclasses.replace(cfg, goals=GoalConfig(structure=0.0, nna=1.0))
    assert all(stage_key(s, cfg, None) == stage_key(s, strict, None)
               for s in ("data", "ae", "ldm", "tune", "sample", "eval", "render"))
    records = (run_dir / "stages.json").read_bytes()
    capsys.readouterr()
    again = main(["--config", str(run_dir / "config.json"), "--structure", "0", "--nna", "1.0", "--device", "cpu"])
    assert (run_dir / "stages.json").read_bytes() == records  # nothing ran
    assert json.loads((run_dir / "config.json").read_text())["goals"]["structure"] == 0.0
    for cat in CATEGORIES:
        model, goal = again["eval"][cat]["model"], again["eval"][cat]["goal"]
        assert model == json.loads(records)["eval"]["result"][cat]["model"]  # the recorded scores, judged anew
        assert goal["stray"]["goal"] == "≤ 0.0× data + 1%" and goal["nna"]["goal"] == "≤ 1.0"
        assert goal["stray"]["met"] == (model["sample_stray"] <= 0.01 and model["n_empty_samples"] == 0)
    assert "(goal ≤ 0.0× data + 1%: " in (run_dir / "report.md").read_text()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) <= 15
    assert f"teaser: {run_dir / 'renders' / 'teaser.png'}" in out
    for cat in CATEGORIES:
        i = next(i for i, line in enumerate(out) if line.startswith(f"{cat} "))
        assert "model/oracle JSD " in out[i] and "1-NNA " in out[i] and "(data " in out[i]
        assert out[i + 1].strip().startswith("reading: ") and out[i + 1].split("reading: ")[1].startswith(READINGS)
    times = next(line for line in out if line.startswith("stage times: "))
    assert all(f"{s} " in times for s in ("data", "ae", "ldm", "tune", "sample", "eval", "render"))
    assert out[-1] == f"report: {run_dir / 'report.md'}"
