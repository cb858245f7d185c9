"""The tune stage: the pick is the setting with the lowest rank sum over JSD, MMD, COV, 1-NNA, thickness and structure
(stray voxels, fragmented samples against the data's); held-out TRAIN shapes only; the pipeline samples with the
pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from voxdiff import tuning
from voxdiff.tuning import CRITERIA, pick

STRUCTURE_KEYS = ("sample_stray", "sample_fragmented", "ref_stray", "ref_fragmented")


def _row(cat: str, w: float, t: float, jsd: float, mmd: float, cov: float, nna: float, voxels: float,
         stray: float = 0.01, fragmented: float = 0.0) -> dict:
    """A tune row; the held-out data has 1 % stray voxels and no fragmented shape."""
    return {"category": cat, "cfg_scale": w, "rescale": 0.0, "threshold": t, "jsd": jsd, "mmd": mmd, "cov": cov,
            "nna_balanced": nna, "sample_mean_voxels": voxels, "ref_mean_voxels": 100.0, "sample_stray": stray,
            "sample_fragmented": fragmented, "ref_stray": 0.01, "ref_fragmented": 0.0}


def test_pick_weighs_thickness_and_jsd_not_only_chamfer() -> None:
    """A thick setting with the best MMD loses to one with the data's voxel count and better JSD / 1-NNA."""
    assert CRITERIA == ("jsd", "mmd", "cov", "nna", "voxels", "structure")
    rows = []
    for cat in ("chair", "table"):
        rows += [_row(cat, 3.0, 0.3, jsd=0.20, mmd=0.0040, cov=0.50, nna=0.80, voxels=250, stray=0.02),  # thick
                 _row(cat, 1.0, 0.5, jsd=0.10, mmd=0.0045, cov=0.50, nna=0.70, voxels=101, stray=0.01),  # right
                 _row(cat, 0.0, 0.7, jsd=0.15, mmd=0.0050, cov=0.45, nna=0.75, voxels=60, stray=0.03)]
    assert pick(rows) == (1.0, 0.0, 0.5)


def test_structure_distance_is_noise_in_multiples_of_the_data() -> None:
    """stray / data's stray + fragmented / max(data's fragmented, 1 %); clean data (0 %) divides by the floors."""
    row = _row("chair", 1.0, 0.5, 0.1, 0.004, 0.5, 0.6, 100, stray=0.03, fragmented=0.05)
    assert tuning._distance_from_data(row, "structure") == pytest.approx(0.03 / 0.01 + 0.05 / 0.01)
    row.update(ref_stray=0.02, ref_fragmented=0.10)
    assert tuning._distance_from_data(row, "structure") == pytest.approx(1.5 + 0.5)
    row.update(ref_stray=0.0, ref_fragmented=0.0)
    assert tuning._distance_from_data(row, "structure") == pytest.approx(0.03 / tuning.STRAY_FLOOR + 0.05 / 0.01)


def test_structure_turns_the_pick_away_from_noisy_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting a little better on JSD, MMD and 1-NNA but with stray voxels around and shapes broken into specks
    wins on the five distance criteria; with structure among the criteria the clean setting wins."""
    rows = []
    for cat in ("chair", "table"):
        rows += [_row(cat, 4.0, 0.3, jsd=0.10, mmd=0.0040, cov=0.48, nna=0.60, voxels=110, stray=0.06,
                      fragmented=0.30),  # noisy
                 _row(cat, 2.0, 0.5, jsd=0.11, mmd=0.0042, cov=0.50, nna=0.62, voxels=100, stray=0.012,
                      fragmented=0.02),  # clean
                 _row(cat, 0.0, 0.7, jsd=0.20, mmd=0.0050, cov=0.40, nna=0.80, voxels=60, stray=0.03,
                      fragmented=0.10)]
    assert pick(rows) == (2.0, 0.0, 0.5)
    monkeypatch.setattr(tuning, "CRITERIA", tuple(c for c in CRITERIA if c != "structure"))
    assert pick(rows) == (4.0, 0.0, 0.3)


def test_tune_scores_the_pipelines_own_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (scale, rescale, threshold) row scores exactly `pipe(category, n, seed=tune seed, batch_size=n, ...)`'s
    grids at that threshold: the tune decodes once per scale and binarises the call's probabilities itself."""
    import numpy as np
    from helpers import make_ae_ckpt, make_ldm_ckpt, make_voxel_dir

    from voxdiff.config import TuneConfig
    from voxdiff.sampling import LatentVoxelPipeline

    ae = make_ae_ckpt(tmp_path / "ae.pt", holdout={"chair": [0, 1, 2]})
    pipe = LatentVoxelPipeline.from_checkpoints(ae, make_ldm_ckpt(tmp_path / "ldm.pt"))
    data = make_voxel_dir(tmp_path / "data", res=32, n={"train": 3})
    scored: list[np.ndarray] = []

    def spy(grids: np.ndarray, refs: np.ndarray, progress: bool = False) -> dict:
        scored.append(grids.copy())
        return {**dict.fromkeys(("jsd", "mmd", "cov", "nna", "nna_balanced", "n_empty_samples", "sample_stray",
                                 "sample_fragmented", "ref_stray", "ref_fragmented"), 0.0),
                "sample_mean_voxels": 1.0, "ref_mean_voxels": 1.0}

    monkeypatch.setattr(tuning, "evaluate", spy)
    cfg = TuneConfig(cfg_scales=(0.0, 1.0), rescales=(0.5,), thresholds=(0.488, 0.49), num_samples=3, steps=3)
    report = tuning.tune_sampling(pipe, str(data), ("chair",), cfg, 32, progress=False)
    assert len(scored) == len(report["rows"]) == 2 * 3  # the AE's calibrated threshold 0.5 joins the two
    for row, grids in zip(report["rows"], scored):
        out = pipe("chair", 3, seed=cfg.seed, batch_size=3, sampler="ddim", steps=3, eta=0.0,
                   guidance=row["cfg_scale"], guidance_rescale=row["rescale"], clamp_latents=cfg.clamp_latents,
                   threshold=row["threshold"])
        assert np.array_equal(grids, out.grids.astype(np.uint8)), row
    assert any(g.any() for g in scored) and not all(g.all() for g in scored)  # thresholds that tell shapes apart


def test_tiny_pipeline_samples_with_the_pick(tmp_path: Path) -> None:
    import dataclasses

    from voxdiff.presets import run_preset
    from voxdiff.runner import run

    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path / "run"), device="cpu")
    report = run(cfg, stages=("data", "ae", "ldm", "tune", "sample"), progress=False)
    chosen = report["stages"]["tune"]["pick"]
    rows = report["stages"]["tune"]["rows"]
    assert {row["category"] for row in rows} == {"airplane", "chair", "table"}
    assert "structure" in report["stages"]["tune"]["criteria"]
    for row in rows:  # each setting's noise, beside the held-out shapes' own
        assert all(0.0 <= row[k] <= 1.0 for k in STRUCTURE_KEYS), row
    for cat in ("airplane", "chair", "table"):  # one held-out set per category: the same data figures in every row
        assert len({(row["ref_stray"], row["ref_fragmented"]) for row in rows if row["category"] == cat}) == 1
    sample_cfg = json.loads((tmp_path / "run" / "samples" / "sample.json").read_text())["config"]
    assert sample_cfg["cfg_scale"] == chosen["cfg_scale"] and sample_cfg["threshold"] == pytest.approx(
        chosen["threshold"])
    assert report["config"]["sample"]["threshold"] == pytest.approx(chosen["threshold"])
