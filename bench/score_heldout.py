r"""Score runs' samples against a fresh procedural draw, never against the run's own references: how the demo's recipe
was chosen (docs/BENCHMARKS.md, "A demo worth showing").

Per category: `--n_refs` shapes of a procedural draw with `--ref_seed` are the references; an oracle of `--n_oracle`
shapes with `--oracle_seed` gives the ratios. Prints one line per run and category: JSD, MMD, COV as multiples of the
oracle's, 1-NNA on equal sets, stray voxels, fragmented samples beside the two draws' own share, mean voxels beside the
references'. Then how many of six of the demo preset's goals (JSD, MMD, COV, 1-NNA, stray, fragmented; the report's
goal check also counts empty and bloated samples) the run meets on this draw. The structure bounds are the goal's
multiple of the two draws' pooled shares (164 shapes by default, where a run's report has only its references), plus
voxdiff.report.STRUCTURE_SLACK. The draws are cached in `--cache`.

    python bench/score_heldout.py runs/demo runs/demo_fp32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff.cli import ArgumentParser, HelpFormatter
from voxdiff.config import CATEGORIES, GoalConfig
from voxdiff.data.shapes import generate_split
from voxdiff.data.voxelize import voxelize_points
from voxdiff.errors import VoxdiffError, run_cli
from voxdiff.files import atomic_save_npy, atomic_write_json
from voxdiff.metrics import evaluate
from voxdiff.presets import run_preset
from voxdiff.report import STRUCTURE_SLACK


def draw(cache: Path, category: str, n: int, seed: int, res: int) -> np.ndarray:
    """`n` procedural shapes of `category` (split "test" of generator seed `seed`) voxelized at `res`³, cached."""
    path = cache / f"{category}_{seed}_{n}_{res}.npy"
    if not path.is_file():
        pts, _ = generate_split(category, n, seed=seed, split="test")
        atomic_save_npy(path, voxelize_points(pts, res).astype(np.uint8))
    return np.load(path)


def score_run(run: Path, refs: dict[str, np.ndarray], oracle: dict[str, dict[str, Any]], goals: GoalConfig,
              n_oracle: int) -> tuple[list[str], int]:
    """One line per category for the samples in `run`/samples, and the number of goals met."""
    lines, met_total = [], 0
    for cat in CATEGORIES:
        path = run / "samples" / f"{cat}.npy"
        if not path.is_file():
            raise VoxdiffError(f"{path} does not exist (is {run} a finished run directory?)")
        e = evaluate(np.load(path, mmap_mode="r"), refs[cat], progress=False)
        o = oracle[cat]
        n_ref = len(refs[cat])
        data_frag = (o["ref_fragmented"] * n_ref + o["sample_fragmented"] * n_oracle) / (n_ref + n_oracle)
        data_stray = (o["ref_stray"] * n_ref + o["sample_stray"] * n_oracle) / (n_ref + n_oracle)
        ratio = {k: e[k] / o[k] if o[k] > 0 else float("inf") for k in ("jsd", "mmd", "cov")}
        met = [ratio["jsd"] <= goals.jsd, ratio["mmd"] <= goals.mmd, ratio["cov"] >= goals.cov,
               e["nna_balanced"] <= goals.nna,
               e["sample_fragmented"] <= goals.structure * data_frag + STRUCTURE_SLACK,
               e["sample_stray"] <= goals.structure * data_stray + STRUCTURE_SLACK]
        met_total += sum(met)
        lines.append(f"{run.name:16s} {cat:8s} JSD {ratio['jsd']:.2f}× MMD {ratio['mmd']:.2f}× COV {ratio['cov']:.2f}× "
                     f"1-NNA {e['nna_balanced']:.3f}  stray {100 * e['sample_stray']:.1f}% "
                     f"(draws {100 * data_stray:.1f}%)  fragmented "
                     f"{100 * e['sample_fragmented']:.0f}% (draws {100 * data_frag:.1f}%)  voxels "
                     f"{e['sample_mean_voxels']:.0f} (refs {e['ref_mean_voxels']:.0f})  "
                     f"goals met {sum(met)}/{len(met)}")
    return lines, met_total


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories with samples/{category}.npy")
    p.add_argument("--n_refs", type=int, default=64, help="references per category (default: 64)")
    p.add_argument("--n_oracle", type=int, default=100, help="oracle shapes per category (default: 100)")
    p.add_argument("--ref_seed", type=int, default=4242, help="generator seed of the references (default: 4242)")
    p.add_argument("--oracle_seed", type=int, default=5353, help="generator seed of the oracle (default: 5353)")
    p.add_argument("--resolution", type=int, default=32, help="grid side of the samples (default: 32)")
    p.add_argument("--cache", type=Path, default=Path("runs/heldout_draws"), help="where the draws are kept")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    goals = run_preset("demo").goals
    refs = {c: draw(args.cache, c, args.n_refs, args.ref_seed, args.resolution) for c in CATEGORIES}
    oracle = {}
    for c in CATEGORIES:
        cached = args.cache / (f"oracle_{c}_{args.oracle_seed}_{args.n_oracle}_vs_{args.ref_seed}_{args.n_refs}_"
                               f"{args.resolution}.json")
        if not cached.is_file():
            o = evaluate(draw(args.cache, c, args.n_oracle, args.oracle_seed, args.resolution), refs[c],
                         progress=False)
            atomic_write_json(cached, o)
        oracle[c] = json.loads(cached.read_text())
    for run in args.runs:
        lines, met = score_run(run, refs, oracle, goals, args.n_oracle)
        print("\n".join(lines))
        print(f"{run.name:16s} goals met on this draw: {met} of {6 * len(CATEGORIES)}", flush=True)


if __name__ == "__main__":
    run_cli(main, prog="bench/score_heldout.py")
