"""The run's report: goals against the oracle and the data, report.json / report.md, and the console summary.

The quality goal per category (voxdiff.config.GoalConfig, per preset; the defaults): the model against the oracle (a
fresh procedural draw scored the same way) COV ≥ 0.9× the oracle's, MMD ≤ 1.25×, JSD ≤ 2×, 1-NNA on equal-size sets
≤ 0.65, bloated samples ≤ 1 %, no empty sample; and against the reference data itself, stray voxels and fragmented
samples ≤ 1.5× the data's share + 1 point (the noise the eye sees, which the four distances barely weigh). A set with
empty samples meets no goal: an empty shape matches nothing, and ratios over a set that is partly empty say nothing
about the shapes it does hold.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from voxdiff import __version__
from voxdiff.config import GoalConfig, RunConfig
from voxdiff.files import atomic_write_json, atomic_write_text
from voxdiff.threads import cpu_model

RATIO_GOALS: dict[str, str] = {"cov": "≥", "mmd": "≤", "jsd": "≤"}  # model / oracle, bounded by GoalConfig's figure
STRUCTURE_SLACK = 0.01  # stray / fragmented goals allow the data's share × GoalConfig.structure plus this
SET_KEYS = ("provenance", "goal", "memorization")  # per-category entries that are not sample sets
GOAL_NAMES: dict[str, str] = {"cov": "COV", "mmd": "MMD", "jsd": "JSD", "nna": "1-NNA", "bloated": "bloated",
                              "empty": "empty", "stray": "stray", "fragmented": "fragmented"}
FAR_NNA = 0.95  # 1-NNA on equal sets at or above this: samples and data are told apart almost every time
FAR_FRAGMENTED = (3.0, 0.05)  # fragmented samples above 3× the data's share + 5 points: clouds, not objects


def machine_info() -> dict[str, Any]:
    """Platform, CPU model, Python, torch, CPU count and GPU: printed in every report."""
    info = {"platform": platform.platform(), "cpu": cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def goal_check(res: dict[str, Any], goals: GoalConfig = GoalConfig()) -> dict[str, Any]:
    """Model/oracle ratios, 1-NNA, bloated and empty counts, and stray / fragmented against the reference data's own
    figures (the model row's ref_stray / ref_fragmented), each with whether it meets `goals`; every goal is unmet while
    the model has empty samples. {} without an oracle."""
    if "oracle" not in res:
        return {}
    model = res["model"]
    n, empty = model["n_samples"], model["n_empty_samples"]
    blocked = f"{empty} empty samples" if empty else None
    out: dict[str, Any] = {}
    for key, op in RATIO_GOALS.items():
        bound = getattr(goals, key)
        o = res["oracle"][key]
        ratio = model[key] / o if o > 0 else float("inf")
        ok = ratio >= bound if op == "≥" else ratio <= bound
        out[key] = {"ratio": ratio, "goal": f"{op} {bound}× oracle", "met": ok and not blocked}
    nna = model.get("nna_balanced", model["nna"])  # 1-NNA's scale assumes equal-size sets
    out["nna"] = {"value": nna, "goal": f"≤ {goals.nna}", "met": nna <= goals.nna and not blocked}
    bloated = model.get("n_bloated_samples")
    if bloated is not None:
        frac = bloated / max(1, n)
        out["bloated"] = {"value": frac, "goal": f"≤ {goals.bloated:.0%}", "met": frac <= goals.bloated and not blocked}
    for key in ("stray", "fragmented"):  # absent from results of an older scorer
        value, data = model.get(f"sample_{key}"), model.get(f"ref_{key}")
        if value is None or data is None:
            continue
        bound = goals.structure * data + STRUCTURE_SLACK
        out[key] = {"value": value, "data": data, "bound": bound,
                    "goal": f"≤ {goals.structure}× data + {STRUCTURE_SLACK:.0%}", "met": value <= bound and not blocked}
    out["empty"] = {"value": empty, "goal": "0", "met": empty == 0}
    if blocked:
        for v in out.values():
            v.setdefault("why", blocked)
    return out


def reading(res: dict[str, Any]) -> str:
    """One category's verdict in words: "far from the data" (1-NNA on equal sets ≥ 0.95, or fragmented samples above
    3× the data's share + 5 points), "close to the data" (every goal met) or "partly there: misses X, Y"."""
    model = res["model"]
    nna = model.get("nna_balanced", model["nna"])
    frag, frag_data = model.get("sample_fragmented"), model.get("ref_fragmented")
    if nna >= FAR_NNA or (frag is not None and frag_data is not None
                          and frag > FAR_FRAGMENTED[0] * frag_data + FAR_FRAGMENTED[1]):
        return "far from the data"
    goal = res.get("goal") or {}
    if not goal:
        return "no oracle scored, so no goal was checked"
    missed = [GOAL_NAMES.get(k, k) for k, v in goal.items() if not v["met"]]
    return "close to the data" if not missed else "partly there: misses " + ", ".join(missed)


def _fmt_goal(key: str, v: dict[str, Any]) -> str:
    if "ratio" in v:
        return f"{v['ratio']:.2f}× oracle"
    if key == "bloated":
        return f"{v['value']:.1%}"
    if "data" in v:  # stray, fragmented: the model's share beside the reference data's
        return f"{v['value']:.1%} (data {v['data']:.1%})"
    return f"{v['value']:.3f}" if isinstance(v["value"], float) else str(v["value"])


def _pct(row: dict[str, Any], key: str) -> str:
    """A share of a result row as a percentage, "—" for results of a scorer that did not measure it."""
    return "—" if row.get(key) is None else f"{row[key]:.1%}"


def sample_sets(res: dict[str, Any]) -> list[str]:
    """Names of the scored sets of one category's results (model, oracle, baselines), in order."""
    return [k for k in res if k not in SET_KEYS]


def write_report(cfg: RunConfig, report: dict[str, Any]) -> None:
    """report.json (everything) and report.md (tables a person reads, with links to renders and loss curves)."""
    run = Path(cfg.run_dir)
    atomic_write_json(run / "report.json", report)
    m = report["machine"]
    hw = f"GPU {m.get('gpu', '')}" if m["cuda"] else f"CPU only ({m['cpus']} cores, {m.get('cpu', '?')})"
    s = cfg.sample
    binar = {"threshold": f"p > {s.threshold}", "calibrated": "the AE's calibrated threshold",
             "topk": f"top-k {s.topk or 'training occupancy'}"}[s.binarize]
    lines = [f"# voxdiff report: `{cfg.name}`", "",
             f"voxdiff {__version__}, {report['date']}, {m['platform']}, torch {m['torch']}, {hw}.",
             f"Command: `{report['command']}`", "",
             f"Data: procedural preset `{cfg.data_preset}` at {cfg.resolution}³; samples: {s.num_samples} per "
             f"category, {s.sampler.upper()} {s.steps or 'default'} steps, guidance w = "
             f"{s.cfg_scale if s.use_cfg else 0} (ε̂ = (1 + w)·ε_c − w·ε_u), binarised as {binar}.",
             "References: test + val of each category. JSD, MMD (Chamfer, squared distances in the unit cube) lower is "
             "better; COV higher is better; 1-NNA closest to 0.5 is best (its 0.5 optimum assumes equal-size sets, "
             "hence the column on the first min(N, M) of each set). Bloated: more voxels than twice the largest "
             "training shape. Stray: the share of occupied voxels with none of their 6 face neighbours occupied; "
             "fragmented: the share of non-empty samples whose largest connected part (26-connectivity) holds less "
             "than half of their voxels. Both are compared with the references' own figures.", ""]
    lines += [f"**Warning: {note}.**" for note in report.get("notes", [])]
    if report.get("notes"):
        lines.append("")
    for cat, res in report.get("eval", {}).items():
        lines += [f"## {cat} ({res['provenance']['reference_count']} references)", "",
                  "| set | JSD | MMD | COV | 1-NNA | 1-NNA (equal sets) | empty | bloated | stray | fragmented "
                  "| mean voxels |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in sample_sets(res):
            row = res[name]
            bloated = "—" if row.get("n_bloated_samples") is None else f"{row['n_bloated_samples']}/{row['n_samples']}"
            lines.append(f"| {name} | {row['jsd']:.5f} | {row['mmd']:.6f} | {row['cov']:.3f} | {row['nna']:.3f} | "
                         f"{row['nna_balanced']:.3f} | {row['n_empty_samples']}/{row['n_samples']} | {bloated} | "
                         f"{_pct(row, 'sample_stray')} | {_pct(row, 'sample_fragmented')} | "
                         f"{row['sample_mean_voxels']:.0f} |")
        first = res[sample_sets(res)[0]]
        structure = "" if first.get("ref_stray") is None else (
            f"; {_pct(first, 'ref_stray')} of their voxels are stray and {_pct(first, 'ref_fragmented')} of them are "
            "fragmented")
        lines += ["", f"References hold {first['ref_mean_voxels']:.0f} voxels on average{structure}."]
        goal = res.get("goal") or {}
        if goal:
            parts = [f"{GOAL_NAMES.get(k, k)} {_fmt_goal(k, v)} (goal {v['goal']}: {'met' if v['met'] else 'not met'})"
                     for k, v in goal.items()]
            lines += ["", "Goals: " + "; ".join(parts) + "."]
            if any("why" in v for v in goal.values()):
                lines.append(f"No goal counts as met: {next(v['why'] for v in goal.values() if 'why' in v)}.")
        if "model" in res:
            lines += ["", f"Reading: {reading(res)}."]
        mem = res.get("memorization") or {}
        if "model" in mem:
            m, copies = mem["model"], mem.get("baseline_train")
            lines += ["", f"Copying check: the median Chamfer distance from a sample to its nearest training shape "
                          f"(of {m['n_train']}) is {m['samples_median']:.6f} over {m['n_samples']} samples, against "
                          f"{m['heldout_median']:.6f} for {m['n_heldout']} held-out test shapes "
                          f"(ratio {m['ratio']:.2f}; near 1: no copying, far below 1: training shapes reproduced"
                          + (f"; copied training shapes score {copies['ratio']:.2f})." if copies else ").")]
        if cat in report.get("renders", {}):
            lines += ["", f"![{cat}]({report['renders'][cat]})"]
        lines.append("")
    lines += ["## Training", "", "- AE loss curve: `ae/log.png`, log `ae/train.log`",
              "- LDM loss curve: `ldm/log.png`, log `ldm/train.log`", "", "## Timings (s)", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    lines += runtime_lines(report.get("runtime", {}))
    atomic_write_text(run / "report.md", "\n".join(lines) + "\n")


def runtime_lines(runtime: dict[str, Any]) -> list[str]:
    """report.md's "How it ran on this machine": per stage the precision and the thread count with why each was
    chosen, the steps the guard skipped, and whether the machine became busy (results depend on all of these)."""
    if not runtime:
        return []
    lines = ["", "## How it ran on this machine", "",
             "| stage | precision | why | threads | why | skipped steps | busy |", "|---|---|---|---|---|---|---|"]
    for stage, rt in runtime.items():
        p, t = rt.get("precision", {}), rt.get("threads", {})
        skipped = rt.get("skipped_steps", "—")
        if rt.get("skipped"):
            skipped = f"{skipped} (steps {', '.join(str(e['step']) for e in rt['skipped'][:10])})"
        lines.append(f"| {stage} | {p.get('precision', '—')} | {p.get('reason', '')} | {t.get('threads', '?')} | "
                     f"{t.get('reason', '')} | {skipped} | {rt.get('busy') or 'no'} |")
    return lines


def runtime_summary(runtime: dict[str, Any]) -> list[str]:
    """The console's lines for `runtime_lines`: one per stage, and the busy notes as warnings."""
    out = []
    for stage, rt in runtime.items():
        p, t = rt.get("precision", {}), rt.get("threads", {})
        skipped = rt.get("skipped_steps")
        if not p:  # the runner's own record: the thread count every stage uses
            out.append(f"{stage:9s} {t.get('threads', '?')} thread(s) ({t.get('reason', '')})")
            continue
        out.append(f"{stage:9s} {p.get('precision', '?')} ({p.get('reason', '')}); {t.get('threads', '?')} thread(s)"
                   + ("" if skipped is None else f"; {skipped} skipped steps"))
        if rt.get("busy"):
            out.append(f"warning: {rt['busy']}")
    return out


def _seconds(v: float) -> str:
    return f"{v / 60:.1f} min" if v >= 120 else f"{v:.0f}s" if v >= 10 else f"{v:.1f}s"


def model_figures(res: dict[str, Any]) -> str:
    """One category's model in one line: JSD, MMD and COV as multiples of the oracle's, 1-NNA on equal sets beside
    the oracle's, stray and fragmented beside the reference data's, and the empty / bloated counts when there are any.
    Plain values where no oracle was scored."""
    model, oracle = res["model"], res.get("oracle")
    nna = model.get("nna_balanced", model["nna"])
    if oracle:
        ratio = {k: model[k] / oracle[k] if oracle[k] > 0 else float("inf") for k in ("jsd", "mmd", "cov")}
        parts = [f"model/oracle JSD {ratio['jsd']:.2f}× MMD {ratio['mmd']:.2f}× COV {ratio['cov']:.2f}×",
                 f"1-NNA {nna:.2f} (oracle {oracle.get('nna_balanced', oracle['nna']):.2f})"]
    else:
        parts = [f"model JSD {model['jsd']:.5f} MMD {model['mmd']:.6f} COV {model['cov']:.3f}", f"1-NNA {nna:.2f}"]
    for key in ("stray", "fragmented"):
        if model.get(f"sample_{key}") is not None:
            parts.append(f"{key} {_pct(model, f'sample_{key}')} (data {_pct(model, f'ref_{key}')})")
    n = model["n_samples"]
    if model["n_empty_samples"]:
        parts.append(f"empty {model['n_empty_samples']}/{n}")
    if model.get("n_bloated_samples"):
        parts.append(f"bloated {model['n_bloated_samples']}/{n}")
    return "; ".join(parts)


def summary_lines(report: dict[str, Any], run_dir: Path) -> list[str]:
    """The console summary, what the run got in about a dozen lines: notes, how the stages ran, the teaser, per
    category the model's figures beside the oracle's and the data's with a one-line reading, the stage times (as
    stages.json records them) and the report's path."""
    lines: list[str] = [f"warning: {note}" for note in report.get("notes", [])]
    lines += [line for line in runtime_summary(report.get("runtime", {})) if not line.startswith("warning:")]
    teaser = (report.get("renders") or {}).get("teaser")
    if teaser:
        lines.append(f"teaser: {run_dir / teaser}")
    for cat, res in report.get("eval", {}).items():
        if "model" not in res:
            continue
        lines.append(f"{cat:9s} {model_figures(res)}")
        lines.append(f"{'':9s} reading: {reading(res)}")
    timings = report.get("timings") or {}
    if timings:
        lines.append("stage times: " + ", ".join(f"{k} {_seconds(v)}" for k, v in timings.items())
                     + f"; total {_seconds(sum(timings.values()))}")
    if (run_dir / "report.md").is_file():
        lines.append(f"report: {run_dir / 'report.md'}")
    return lines
