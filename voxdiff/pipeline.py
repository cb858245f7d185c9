"""The main job end to end: data -> AE -> LDM -> sample -> eval -> render -> report.

Every stage is a call of the library function the stage's own CLI calls (load_data.py, autoencoder.py,
diffusion/train.py, diffusion/sample.py, eval.py, visualize.py), with the configs of one named preset
(voxdiff.config.PIPELINE_PRESETS): the demo is the real pipeline at small size, not a separate toy.

    python -m voxdiff.pipeline --preset demo --run_dir runs/demo

Layout of a run directory:
    config.json            the resolved PipelineConfig (rerun it with --config)
    data/                  procedural PartSeg HDF5 + {category}_voxels_{split}.npy (unless --data_dir is given)
    ae/, ldm/              checkpoints, train.log, log.csv / log.png (loss curves)
    samples/{cat}.npy      the model's samples, exactly what eval.py scores
    oracle/{cat}.npy       a fresh procedural draw of the same size (the best a model could do)
    baselines/             trivial baselines: training shapes copied ("train"), occupancy-matched noise ("noise")
    renders/               PNG sheets: data vs samples vs oracle per category; teaser.png
    report.json, report.md per category JSD / MMD / COV / 1-NNA for samples, oracle and baselines; timings
A stage recorded as complete in `stages.json` (with its result, for the same config) is skipped on a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from voxdiff import __version__
from voxdiff.config import (
    CATEGORIES,
    PIPELINE_PRESETS,
    SPLITS,
    PipelineConfig,
    from_dict,
    pipeline_preset,
    to_dict,
)
from voxdiff.utils import VoxdiffError, atomic_memmap, atomic_write_json, atomic_write_text, get_logger

STAGES: tuple[str, ...] = ("data", "ae", "ldm", "sample", "eval", "render", "report")
# Quality goal against the oracle (issue "Quality run"): ratios of the model's metric to the oracle's.
GOALS = {"cov": ("≥", 0.9), "mmd": ("≤", 1.25), "jsd": ("≤", 2.0)}
NNA_GOAL = 0.65
ORACLE_SEED_OFFSET = 1_000_003  # the oracle's shapes come from another seed than the data's, same generator


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """Fill the stage configs from the pipeline's run_dir, data, resolution, device and seed."""
    run = Path(cfg.run_dir)
    data = cfg.data_dir or str(run / "data")
    ae = dataclasses.replace(cfg.ae, dataset_path=data, ckpt_path=str(run / "ae"), device=cfg.device, seed=cfg.seed)
    ldm = dataclasses.replace(cfg.ldm, dataset_path=data, ae_ckpt_path=str(run / "ae"), ckpt_path=str(run / "ldm"),
                              device=cfg.device, seed=cfg.seed)
    sample = dataclasses.replace(cfg.sample, ldm_ckpt_path=str(run / "ldm"), ae_ckpt_path=str(run / "ae"),
                                 save_dir=str(run / "samples"), resolution=cfg.resolution, device=cfg.device,
                                 seed=cfg.seed, use_cfg=ldm.use_cfg and cfg.sample.use_cfg)
    return dataclasses.replace(cfg, data_dir=data, ae=ae, ldm=ldm, sample=sample)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class _Stages:
    """Completion records in `stages.json`: a stage reruns when its config changed or `force` is set."""

    def __init__(self, run_dir: Path, force: bool) -> None:
        self.file = run_dir / "stages.json"
        self.done: dict[str, Any] = {} if force or not self.file.is_file() else json.loads(self.file.read_text())

    def complete(self, stage: str, key: Any) -> bool:
        return self.done.get(stage, {}).get("key") == _hash(key)

    def mark(self, stage: str, key: Any, seconds: float, result: Any) -> None:
        self.done[stage] = {"key": _hash(key), "seconds": seconds, "result": result}
        atomic_write_json(self.file, self.done)


# ---- stages -------------------------------------------------------------------------------------------------------


def stage_data(cfg: PipelineConfig) -> dict[str, Any]:
    """Generate the procedural PartSeg HDF5 set (unless the directory already holds voxel files) and voxelize it."""
    from voxdiff.data.partseg import COUNT_PRESETS, write_synthetic_partseg
    from voxdiff.data.voxelize import preprocess, voxel_path

    data = Path(cfg.data_dir)
    if all(voxel_path(data, c, s).is_file() for c in CATEGORIES for s in SPLITS):
        r = int(np.load(voxel_path(data, CATEGORIES[0], "test"), mmap_mode="r").shape[-1])
        if r != cfg.resolution:
            raise VoxdiffError(f"{data} holds {r}³ grids but the pipeline runs at {cfg.resolution}³")
        return {"reused": str(data)}
    if cfg.data_preset not in COUNT_PRESETS:
        raise VoxdiffError(f"unknown data preset {cfg.data_preset!r}; choose from {', '.join(COUNT_PRESETS)}")
    write_synthetic_partseg(data, COUNT_PRESETS[cfg.data_preset], seed=cfg.seed, progress=False)
    return preprocess(data, data, resolution=cfg.resolution, categories=CATEGORIES, splits=SPLITS, progress=False)


def make_oracle(cfg: PipelineConfig, category: str, n: int, path: Path) -> Path:
    """A fresh procedural draw of `n` shapes (another seed), voxelized like the data: the best a model could do."""
    from voxdiff.data.shapes import generate_split
    from voxdiff.data.voxelize import voxelize_points

    chunk = 64
    with atomic_memmap(path, (n, cfg.resolution, cfg.resolution, cfg.resolution)) as out:
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            pts, _ = generate_split(category, m, seed=cfg.seed + ORACLE_SEED_OFFSET, split="test", start=i)
            voxelize_points(pts, cfg.resolution, out=out[i : i + m])
    return path


def make_baselines(cfg: PipelineConfig, category: str, n: int, out_dir: Path) -> dict[str, Path]:
    """Trivial baselines scored like samples: copies of training shapes, and i.i.d. noise of the training occupancy."""
    from voxdiff.data.voxelize import open_voxels, voxel_path

    train = open_voxels(voxel_path(cfg.data_dir, category, "train"))
    paths: dict[str, Path] = {}
    if "train" in cfg.baselines:
        idx = np.arange(n) % len(train)
        paths["train"] = out_dir / f"train_{category}.npy"
        with atomic_memmap(paths["train"], (n, *train.shape[1:])) as out:
            for i in range(0, n, 64):
                out[i : i + 64] = train[idx[i : i + 64]] > 0
    if "noise" in cfg.baselines:
        k = min(len(train), 64)
        occ = float(np.mean([np.count_nonzero(train[i]) for i in range(k)])) / np.prod(train.shape[1:])
        rng = np.random.default_rng(cfg.seed + 7)
        paths["noise"] = out_dir / f"noise_{category}.npy"
        with atomic_memmap(paths["noise"], (n, *train.shape[1:])) as out:
            for i in range(n):
                out[i] = rng.random(train.shape[1:], dtype=np.float32) < occ
    return paths


def stage_eval(cfg: PipelineConfig, log: Any) -> dict[str, Any]:
    """Score samples, oracle and baselines per category against test+val with voxdiff.metrics (eval.py's code)."""
    from voxdiff.data.voxelize import open_voxels, voxel_path
    from voxdiff.metrics import evaluate, sha256_of

    run = Path(cfg.run_dir)
    results: dict[str, Any] = {}
    for cat in tqdm(cfg.sample.categories, desc="eval", unit="category"):
        refs = [open_voxels(voxel_path(cfg.data_dir, cat, s)) for s in ("test", "val")]
        samples = open_voxels(Path(cfg.sample.save_dir) / f"{cat}.npy")
        n = len(samples)
        sets: dict[str, Path] = {"model": Path(cfg.sample.save_dir) / f"{cat}.npy"}
        if cfg.oracle:
            sets["oracle"] = make_oracle(cfg, cat, n, run / "oracle" / f"{cat}.npy")
        for name, path in make_baselines(cfg, cat, n, run / "baselines").items():
            sets[f"baseline_{name}"] = path
        results[cat] = {"references": {"files": [f"{cat}_voxels_test.npy", f"{cat}_voxels_val.npy"],
                                       "count": sum(len(r) for r in refs), "sha256": sha256_of(refs)}}
        for name, path in sets.items():
            arr = np.load(path, mmap_mode="r")
            res = evaluate(arr, refs, device=_eval_device(cfg.device), progress=False)
            res["file"] = str(path.relative_to(run)) if path.is_relative_to(run) else str(path)
            results[cat][name] = res
            log.info("eval %s %s: JSD %.5f MMD %.6f COV %.3f 1-NNA %.3f (%.1fs)", cat, name, res["jsd"], res["mmd"],
                     res["cov"], res["nna"], res["elapsed_s"])
    return results


def _eval_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def goal_check(res: dict[str, Any]) -> dict[str, Any]:
    """Model/oracle ratios and whether each meets the quality goal (COV ≥ 0.9×, MMD ≤ 1.25×, JSD ≤ 2×, 1-NNA ≤ 65%)."""
    if "oracle" not in res:
        return {}
    out: dict[str, Any] = {}
    for key, (op, bound) in GOALS.items():
        o = res["oracle"][key]
        ratio = res["model"][key] / o if o > 0 else float("inf")
        out[key] = {"ratio": ratio, "goal": f"{op} {bound}", "met": ratio >= bound if op == "≥" else ratio <= bound}
    nna = res["model"].get("nna_balanced", res["model"]["nna"])  # 1-NNA's scale assumes equal-size sets
    out["nna"] = {"value": nna, "goal": f"≤ {NNA_GOAL}", "met": nna <= NNA_GOAL}
    return out


def stage_render(cfg: PipelineConfig) -> dict[str, str]:
    """PNG sheets per category (data / samples / oracle) and a teaser of samples of every category."""
    from voxdiff.data.voxelize import open_voxels, voxel_path
    from voxdiff.render import render_samples_sheet

    run = Path(cfg.run_dir)
    out: dict[str, str] = {}
    for cat in cfg.sample.categories:
        sets = {f"{cat} data": open_voxels(voxel_path(cfg.data_dir, cat, "test")),
                f"{cat} samples": np.load(Path(cfg.sample.save_dir) / f"{cat}.npy", mmap_mode="r")}
        if (run / "oracle" / f"{cat}.npy").is_file():
            sets[f"{cat} oracle"] = np.load(run / "oracle" / f"{cat}.npy", mmap_mode="r")
        out[cat] = str(render_samples_sheet(sets, run / "renders" / f"{cat}.png", n_per_row=cfg.render_n,
                                            seed=cfg.seed).relative_to(run))
    teaser = {cat: np.load(Path(cfg.sample.save_dir) / f"{cat}.npy", mmap_mode="r") for cat in cfg.sample.categories}
    out["teaser"] = str(render_samples_sheet(teaser, run / "renders" / "teaser.png", n_per_row=min(8, cfg.render_n),
                                             seed=cfg.seed).relative_to(run))
    return out


def machine_info() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": __import__("os").cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt_goal(v: dict[str, Any]) -> str:
    return f"{v['ratio']:.2f}× oracle" if "ratio" in v else f"{v['value']:.3f}"


def write_report(cfg: PipelineConfig, report: dict[str, Any]) -> None:
    """report.json (everything) and report.md (tables a person reads, with links to renders and loss curves)."""
    run = Path(cfg.run_dir)
    atomic_write_json(run / "report.json", report)
    m = report["machine"]
    hw = f"GPU {m.get('gpu', '')}" if m["cuda"] else f"CPU only ({m['cpus']} cores)"
    lines = [f"# voxdiff report: `{cfg.name}`", "",
             f"voxdiff {__version__}, {report['date']}, {m['platform']}, torch {m['torch']}, {hw}.",
             f"Command: `{report['command']}`", "",
             f"Data: procedural preset `{cfg.data_preset}` at {cfg.resolution}³; samples: {cfg.sample.num_samples} per "
             f"category, {cfg.sample.sampler.upper()} {cfg.sample.steps} steps, CFG scale {cfg.sample.cfg_scale} "
             f"(ε = (1+w)·ε_c − w·ε_u), threshold {cfg.sample.threshold}"
             f"{', top-k ' + str(cfg.sample.topk) if cfg.sample.topk else ''}.",
             "References: test + val of each category. JSD, MMD (Chamfer, squared distances in the unit cube) lower is "
             "better; COV higher is better; 1-NNA closest to 0.5 is best (its 0.5 optimum assumes equal-size sets, "
             "hence the column on the first min(N, M) of each set).", ""]
    lines += [f"**Warning: {note}.**" for note in report.get("notes", [])]
    if report.get("notes"):
        lines.append("")
    for cat, res in report.get("eval", {}).items():
        lines += [f"## {cat} ({res['references']['count']} references)", "",
                  "| set | JSD | MMD | COV | 1-NNA | 1-NNA (equal sets) | empty | mean voxels |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in [k for k in res if k not in ("references", "goal")]:
            r = res[name]
            bal = f"{r['nna_balanced']:.3f}" if "nna_balanced" in r else "—"
            lines.append(f"| {name} | {r['jsd']:.5f} | {r['mmd']:.6f} | {r['cov']:.3f} | {r['nna']:.3f} | {bal} | "
                         f"{r['n_empty_samples']}/{r['n_samples']} | {r['sample_mean_voxels']:.0f} |")
        goal = res.get("goal") or {}
        if goal:
            parts = [f"{k.upper()} {_fmt_goal(v)} (goal {v['goal']}: {'met' if v['met'] else 'not met'})"
                     for k, v in goal.items()]
            lines += ["", "Against the oracle: " + "; ".join(parts) + "."]
        if cat in report.get("renders", {}):
            lines += ["", f"![{cat}]({report['renders'][cat]})"]
        lines.append("")
    lines += ["## Training", "", "- AE loss curve: `ae/log.png`, log `ae/train.log`",
              "- LDM loss curve: `ldm/log.png`, log `ldm/train.log`", "", "## Timings (s)", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    atomic_write_text(run / "report.md", "\n".join(lines) + "\n")


def run(cfg: PipelineConfig, stages: tuple[str, ...] = STAGES, force: bool = False, command: str = "") -> dict:
    """Run the pipeline stages in order; returns the report dict (also written to report.json / report.md)."""
    from voxdiff.sampling import sample_to_files
    from voxdiff.training.autoencoder import train_autoencoder
    from voxdiff.training.ldm import train_ldm

    cfg = resolve(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    log = get_logger("voxdiff.pipeline", run_dir / "pipeline.log")
    log.info("pipeline %s stages %s", cfg.name, stages)
    done = _Stages(run_dir, force)
    report: dict[str, Any] = {"name": cfg.name, "version": __version__, "command": command,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
                              "config": to_dict(cfg), "timings": {}}
    keys = {"data": [cfg.data_dir, cfg.data_preset, cfg.resolution, cfg.seed], "ae": to_dict(cfg.ae)}
    keys["ldm"] = [keys["ae"], to_dict(cfg.ldm)]
    keys["sample"] = [keys["ldm"], to_dict(cfg.sample)]
    keys["eval"] = [keys["sample"], cfg.oracle, list(cfg.baselines)]
    keys["render"] = [keys["eval"], cfg.render_n]
    actions = {
        "data": lambda: stage_data(cfg),
        "ae": lambda: train_autoencoder(dataclasses.replace(cfg.ae, resume=(run_dir / "ae" / "last.pt").is_file())),
        "ldm": lambda: train_ldm(dataclasses.replace(cfg.ldm, resume=(run_dir / "ldm" / "last.pt").is_file())),
        "sample": lambda: sample_to_files(cfg.sample),
        "eval": lambda: stage_eval(cfg, log),
        "render": lambda: stage_render(cfg),
    }
    report["stages"] = {}
    for stage in STAGES[:-1]:  # results of earlier invocations that are still valid for this config
        if done.complete(stage, keys[stage]):
            report["stages"][stage] = done.done[stage]["result"]
            report["timings"][stage] = done.done[stage]["seconds"]
    bar = tqdm([s for s in STAGES if s in stages and s != "report"], desc=f"pipeline {cfg.name}", unit="stage")
    for stage in bar:
        bar.set_postfix_str(stage)
        if stage in report["stages"]:
            log.info("stage %s: up to date, skipped", stage)
            continue
        t0 = time.perf_counter()
        out = actions[stage]()
        dt = time.perf_counter() - t0
        report["timings"][stage] = dt
        report["stages"][stage] = _jsonable(out)
        done.mark(stage, keys[stage], dt, report["stages"][stage])
        log.info("stage %s done in %.1fs", stage, dt)
        if isinstance(out, dict) and out.get("note"):
            print(f"warning: {out['note']}", file=sys.stderr)
    stages_out = report.get("stages", {})
    report["notes"] = [r["note"] for r in stages_out.values() if isinstance(r, dict) and r.get("note")]
    if "eval" in stages_out:
        report["eval"] = stages_out["eval"]
        for res in report["eval"].values():
            res["goal"] = goal_check(res)
    if "render" in stages_out:
        report["renders"] = stages_out["render"]
    if "report" in stages:
        write_report(cfg, report)
    return report


def _jsonable(obj: Any) -> Any:
    """Drop what JSON can't hold (tensors, paths become strings)."""
    return json.loads(json.dumps(obj, default=lambda o: str(o) if isinstance(o, Path) else None))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m voxdiff.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PIPELINE_PRESETS), default="demo", help="named configuration (config.py)")
    p.add_argument("--config", help="a config.json written by an earlier run (overrides --preset)")
    p.add_argument("--run_dir", help="output directory (default runs/<preset>)")
    p.add_argument("--data_dir", help="reuse an existing preprocessed data directory")
    p.add_argument("--device", default=None, help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--ae_minutes", type=float, default=None, help="AE training time budget (minutes)")
    p.add_argument("--ldm_minutes", type=float, default=None, help="LDM training time budget (minutes)")
    p.add_argument("--num_samples", type=int, default=None, help="samples per category")
    p.add_argument("--cfg_scale", type=float, default=None, help="guidance w in ε = (1+w)ε_c − wε_u (0 = conditional)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if recorded as complete")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise VoxdiffError(f"config file not found: {path}")
        cfg = from_dict(PipelineConfig, json.loads(path.read_text()))
    else:
        cfg = pipeline_preset(args.preset)
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir or f"runs/{args.preset}")
    if args.config and args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    if args.device is not None:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.ae_minutes is not None:
        cfg.ae.max_minutes = args.ae_minutes
    if args.ldm_minutes is not None:
        cfg.ldm.max_minutes = args.ldm_minutes
    if args.num_samples is not None:
        cfg.sample.num_samples = args.num_samples
        cfg.sample.batch_size = min(cfg.sample.batch_size, args.num_samples)
    if args.cfg_scale is not None:
        cfg.sample.cfg_scale = args.cfg_scale
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise VoxdiffError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    command = "python -m voxdiff.pipeline " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(cfg, stages, force=args.force, command=command)
    summarize(report, Path(cfg.run_dir))
    return report


def summarize(report: dict[str, Any], run_dir: Path) -> None:
    """Print the final summary: one line per category and set, then where the report is."""
    for cat, res in report.get("eval", {}).items():
        for name in [k for k in res if k not in ("references", "goal")]:
            r = res[name]
            print(f"{cat:9s} {name:15s} JSD {r['jsd']:.5f}  MMD {r['mmd']:.6f}  COV {r['cov']:.3f}  "
                  f"1-NNA {r['nna']:.3f}")
    if (run_dir / "report.md").is_file():
        print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    from voxdiff.utils import run_cli

    run_cli(main)
