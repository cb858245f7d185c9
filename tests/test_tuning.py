"""The tune stage: the pick is the setting with the lowest rank sum over JSD, MMD, COV, 1-NNA and thickness; held-out
TRAIN shapes only; the pipeline samples with the pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from voxdiff.tuning import CRITERIA, pick


def _row(cat: str, w: float, t: float, jsd: float, mmd: float, cov: float, nna: float, voxels: float) -> dict:
    return {"category": cat, "cfg_scale": w, "rescale": 0.0, "threshold": t, "jsd": jsd, "mmd": mmd, "cov": cov,
            "nna_balanced": nna, "sample_mean_voxels": voxels, "ref_mean_voxels": 100.0}


def test_pick_weighs_thickness_and_jsd_not_only_chamfer() -> None:
    """A thick setting with the best MMD loses to one with the data's voxel count and better JSD / 1-NNA."""
    assert CRITERIA == ("jsd", "mmd", "cov", "nna", "voxels")
    rows = []
    for cat in ("chair", "table"):
        rows += [_row(cat, 3.0, 0.3, jsd=0.20, mmd=0.0040, cov=0.50, nna=0.80, voxels=250),  # thick, best MMD
                 _row(cat, 1.0, 0.5, jsd=0.10, mmd=0.0045, cov=0.50, nna=0.70, voxels=101),  # right thickness
                 _row(cat, 0.0, 0.7, jsd=0.15, mmd=0.0050, cov=0.45, nna=0.75, voxels=60)]
    assert pick(rows) == (1.0, 0.0, 0.5)


def test_tiny_pipeline_samples_with_the_pick(tmp_path: Path) -> None:
    import dataclasses

    from voxdiff.config import pipeline_preset
    from voxdiff.pipeline import run

    cfg = dataclasses.replace(pipeline_preset("tiny"), run_dir=str(tmp_path / "run"), device="cpu")
    report = run(cfg, stages=("data", "ae", "ldm", "tune", "sample"), progress=False)
    chosen = report["stages"]["tune"]["pick"]
    assert {r["category"] for r in report["stages"]["tune"]["rows"]} == {"airplane", "chair", "table"}
    sample_cfg = json.loads((tmp_path / "run" / "samples" / "sample.json").read_text())["config"]
    assert sample_cfg["cfg_scale"] == chosen["cfg_scale"] and sample_cfg["threshold"] == pytest.approx(
        chosen["threshold"])
    assert report["config"]["sample"]["threshold"] == pytest.approx(chosen["threshold"])
