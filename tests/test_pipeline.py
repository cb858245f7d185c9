"""The main job at the `tiny` preset: every stage runs through the library and every artefact is well formed."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from voxdiff.config import CATEGORIES, PIPELINE_PRESETS, PipelineConfig, from_dict, pipeline_preset, to_dict
from voxdiff.pipeline import main, run
from voxdiff.utils import VoxdiffError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    cfg = dataclasses.replace(pipeline_preset("tiny"), run_dir=str(run_dir), device="cpu")
    return run_dir, run(cfg, command="test")


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
            assert res[name]["n_refs"] == 8
        # The oracle is a real draw of the same family: it must beat occupancy-matched noise on MMD.
        assert res["oracle"]["mmd"] < res["baseline_noise"]["mmd"]
        png = run_dir / report["renders"][cat]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("ae/best.pt", "ae/last.pt", "ldm/last.pt", "ae/log.png", "ldm/log.png", "config.json", "report.md"):
        assert (run_dir / f).is_file(), f
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["eval"]["chair"]["model"]["mmd"] == report["eval"]["chair"]["model"]["mmd"]
    md = (run_dir / "report.md").read_text()
    assert "| oracle |" in md and "## table" in md and "renders/chair.png" in md


def test_rerun_skips_completed_stages(tiny_run: tuple[Path, dict]) -> None:
    run_dir, first = tiny_run
    ae_mtime = (run_dir / "ae" / "last.pt").stat().st_mtime_ns
    cfg = from_dict(PipelineConfig, json.loads((run_dir / "config.json").read_text()))
    again = run(cfg, stages=("ae", "ldm", "eval", "report"))
    assert (run_dir / "ae" / "last.pt").stat().st_mtime_ns == ae_mtime
    assert again["eval"]["table"]["model"] == first["eval"]["table"]["model"]


def test_cli_rejects_bad_stage(tmp_path: Path) -> None:
    with pytest.raises(VoxdiffError, match="unknown stage"):
        main(["--preset", "tiny", "--run_dir", str(tmp_path / "x"), "--stages", "data,oops"])
    with pytest.raises(VoxdiffError, match="config file not found"):
        main(["--config", str(tmp_path / "missing.json")])
