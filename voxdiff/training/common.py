"""What both training loops share: metric logging to files, loss curves, non-finite checks, warmup LR, EMA."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from voxdiff.utils import VoxdiffError


class RunLogger:
    """Append rows of scalars to `{run_dir}/{name}.csv` (+ `.jsonl`) and redraw `{name}.png` on demand.

    Rows may have different keys (train rows vs validation rows); the CSV keeps the union, in first-seen order.
    Only rank 0 should construct one.
    """

    def __init__(self, run_dir: str | os.PathLike[str], name: str = "log", resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / f"{name}.jsonl"
        self.csv = self.dir / f"{name}.csv"
        self.png = self.dir / f"{name}.png"
        self.rows: list[dict[str, Any]] = []
        if resume and self.jsonl.is_file():
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        else:
            self.jsonl.write_text("")

    def log(self, **row: Any) -> None:
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resume from an earlier checkpoint rewrites history from there)."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def flush(self, curves: tuple[str, ...] = ("loss",)) -> None:
        """Rewrite the CSV and the PNG curve of `curves` against step."""
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        from voxdiff.render import plot_curves

        plot_curves(self.rows, curves, self.png)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop with a clear message on a NaN/inf loss instead of training on garbage for hours."""
    if not torch.isfinite(loss).all():
        raise VoxdiffError(
            f"non-finite loss ({float(loss)}) at step {step}; lower --lr, keep gradient clipping on, "
            "or resume from the last good checkpoint"
        )


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup from 0 to base_lr over `warmup_steps`, constant afterwards."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to `min_ratio * base_lr` at `total_steps`."""
    if step < warmup_steps:
        return warmup_lr(step, base_lr, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
