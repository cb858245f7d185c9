"""Does the gap close with compute? Score one run's kept LDM checkpoints (step{N}.pt) and plot the goal's figures.

A run whose LDM config has `keep_steps` leaves ldm/step{N}.pt beside last.pt. For each kept step (and
last.pt), `--n` samples per category are drawn with the run's final sampling settings (guidance, rescale, threshold,
DDIM steps, clipping: stored in the run's model/ldm.pt) and scored against the references of the run's report (test +
val), next to the run's oracle (a fresh procedural draw, the best a model can do) scored the same way. Only the
final sampling settings are used, so nothing here is tuned on the references. Prints a table, writes
`--out`.json and a plot of model ÷ oracle (JSD, MMD, COV), 1-NNA on equal sets and stray / fragmented ÷ data.

    python bench/learning_curve.py --run_dir runs/medium --n 200 --plot assets/learning_curve.png
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from voxdiff.binarize import Binarization  # noqa: E402
from voxdiff.checkpoint import load_checkpoint  # noqa: E402
from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter  # noqa: E402
from voxdiff.config import CATEGORIES, RunConfig, category_index, from_dict  # noqa: E402
from voxdiff.data.voxelize import open_voxels, voxel_path  # noqa: E402
from voxdiff.metrics import evaluate  # noqa: E402
from voxdiff.sampling import LatentVoxelPipeline, batch_seed  # noqa: E402

KEYS = ("jsd", "mmd", "cov", "nna_balanced", "sample_stray", "ref_stray", "sample_fragmented", "ref_fragmented",
        "sample_mean_voxels", "ref_mean_voxels", "n_empty_samples")


def _checkpoints(ldm_dir: Path) -> list[tuple[int, Path]]:
    kept = {int(m.group(1)): f for f in ldm_dir.glob("step*.pt") if (m := re.fullmatch(r"step(\d+)\.pt", f.name))}
    if kept and (ldm_dir / "last.pt").is_file():  # the run's last step, when no kept step is it
        kept.setdefault(load_checkpoint(ldm_dir / "last.pt", kind="ldm").step, ldm_dir / "last.pt")
    return sorted(kept.items())


def _score(grids: Any, refs: np.ndarray) -> dict[str, Any]:
    res = evaluate(grids, refs, progress=False)
    return {k: res[k] for k in KEYS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a run directory whose ldm/ holds step{N}.pt checkpoints")
    p.add_argument("--n", type=int, default=200, help="samples per category and checkpoint")
    p.add_argument("--out", default=None, help="JSON of every row (none: {run_dir}/learning_curve.json)")
    p.add_argument("--plot", default=None, help="PNG of the curves (none: {run_dir}/learning_curve.png)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    cfg: RunConfig = from_dict(RunConfig, json.loads((run / "config.json").read_text()))
    # the final sampling's settings: those the run stored with its exported model (after its tune stage)
    stored = load_checkpoint(run / "model" / "ldm.pt", kind="ldm").meta.sampling
    s = dataclasses.replace(cfg.sample, **{k: v for k, v in stored.items() if hasattr(cfg.sample, k)})
    data = Path(cfg.dataset_path) if cfg.dataset_path else run / "data"
    kept = _checkpoints(run / "ldm")
    if not kept:
        p.error(f"no step{{N}}.pt in {run / 'ldm'}: train the LDM with keep_steps")
    refs = {c: np.concatenate([(np.asarray(open_voxels(voxel_path(str(data), c, sp))) > 0).astype(np.uint8)
                               for sp in ("test", "val")]) for c in CATEGORIES}
    oracle = {c: _score(np.load(run / "oracle" / f"{c}.npy", mmap_mode="r")[: a.n], refs[c]) for c in CATEGORIES}
    rows: list[dict[str, Any]] = []
    print(f"{a.n} samples per category; DDIM {s.steps}, w {s.cfg_scale}, φ {s.guidance_rescale}, p > {s.threshold}; "
          "against test + val; model ÷ oracle", flush=True)
    for step, file in kept:
        t0 = time.perf_counter()
        pipe = LatentVoxelPipeline.from_checkpoints(run / "ae", file, precision=s.precision, device=a.device)
        sched = pipe.make_scheduler(s.sampler, s.steps, s.eta, clamp=s.clamp_latents)
        for cat in CATEGORIES:
            c = category_index(cat)
            labels = torch.full((a.n,), c, dtype=torch.long)
            gen = torch.Generator(device=pipe.device).manual_seed(batch_seed(cfg.seed, c, 0))
            z = pipe.sample_latents(labels, sched, pipe.guidance(s.use_cfg, s.cfg_scale), gen,
                                    rescale=s.guidance_rescale)
            res = _score(pipe.to_grids(z, labels, Binarization(threshold=s.threshold)), refs[cat])
            o = oracle[cat]
            row = {"step": step, "category": cat, **res, "oracle": o,
                   "jsd_ratio": res["jsd"] / o["jsd"], "mmd_ratio": res["mmd"] / o["mmd"],
                   "cov_ratio": res["cov"] / o["cov"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"step {step:6d} {cat:8s} JSD {row['jsd_ratio']:5.2f}× MMD {row['mmd_ratio']:5.2f}× "
                  f"COV {row['cov_ratio']:4.2f}× 1-NNA {res['nna_balanced']:.3f} stray {res['sample_stray']:.1%} "
                  f"(data {res['ref_stray']:.1%}) fragmented {res['sample_fragmented']:.1%} "
                  f"(data {res['ref_fragmented']:.1%})", flush=True)
    out = Path(a.out) if a.out else run / "learning_curve.json"
    result = {"run_dir": str(run), "n": a.n, "sampling": {"steps": s.steps, "cfg_scale": s.cfg_scale,
                                                          "rescale": s.guidance_rescale, "threshold": s.threshold},
              "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    _plot(rows, Path(a.plot) if a.plot else run / "learning_curve.png", cfg.goals)
    return result


def _plot(rows: list[dict[str, Any]], path: Path, goals: Any) -> None:
    panels = [("jsd_ratio", "JSD ÷ oracle", goals.jsd), ("mmd_ratio", "MMD ÷ oracle", goals.mmd),
              ("cov_ratio", "COV ÷ oracle", goals.cov), ("nna_balanced", "1-NNA, equal sets", goals.nna),
              ("stray_ratio", "stray voxels ÷ data", goals.structure),
              ("frag", "fragmented samples (dashed: data)", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title, goal) in zip(axes, panels):
        for cat in CATEGORIES:
            sub = [row for row in rows if row["category"] == cat]
            x = [row["step"] for row in sub]
            if key == "stray_ratio":
                y = [row["sample_stray"] / max(row["ref_stray"], 1e-9) for row in sub]
            elif key == "frag":
                y = [row["sample_fragmented"] for row in sub]
            else:
                y = [row[key] for row in sub]
            (line,) = ax.plot(x, y, marker="o", label=cat)
            if key == "frag":
                ax.axhline(sub[0]["ref_fragmented"], ls="--", lw=0.8, color=line.get_color())
        if goal is not None:
            ax.axhline(goal, color="k", lw=0.8, ls=":", label="goal")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LDM steps")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
