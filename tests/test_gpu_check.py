"""bench/gpu_check.py, the prepared GPU check, runs end to end at tiny size on the CPU and reports the metrics paths
as identical."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ROOT

from voxdiff.cli import load_script


def test_gpu_check_runs_tiny_on_cpu(tmp_path: Path) -> None:
    report = load_script(ROOT / "bench" / "gpu_check.py").main(["--tiny", "--device", "cpu", "--out",
                                                                str(tmp_path / "check.json")])
    on_disk = json.loads((tmp_path / "check.json").read_text())
    assert on_disk["tiny"] and on_disk["device"] == "cpu" and report["metrics"]["identical"]
    assert report["ae"]["shapes_per_s"] > 0 and report["unet"]["steps_per_s"] > 0
    assert set(report["sampling"]["per_category_s"]) == {"airplane", "chair", "table"}
    paths = report["paths"]
    assert paths["all_ok"], {k: v for k, v in paths.items() if isinstance(v, dict) and not v["ok"]}
    assert paths["ldm_resume_cache_hit_preview"]["result"]["precision"]["precision"] in ("fp32", "bf16")
