"""What both training loops share, written once: the run's set-up (`start_run`, `open_run_dir`, `choose_runtime`),
the data order (`StepOrder`), warmup LR, and the loop skeleton (`StepLoop`: step accounting, the time cap, the guarded
optimizer step, the logging and checkpoint cadences, metric logs, the result dict). Each trainer writes the rest."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff.checkpoint import Checkpoint, Kind, check_resumable, load_checkpoint
from voxdiff.config import RENAMED, TrainConfig, to_dict
from voxdiff.device import flush_denormals, seed_everything
from voxdiff.distributed import (
    DistInfo,
    any_rank,
    check_in_sync,
    check_same_config,
    epoch_sampler,
    init_distributed,
    mean_over_ranks,
    split_batch,
    together,
)
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_path, dir_lock
from voxdiff.logs import Progress, get_logger
from voxdiff.precision import PrecisionChoice, choose_precision, gradient_probe
from voxdiff.render import plot_curves
from voxdiff.threads import BusyWatch, ThreadChoice, choose_threads


class RunLogger:
    """Append rows of scalars to `{run_dir}/{name}.jsonl`; `flush` rewrites `{name}.csv` and redraws `{name}.png`.

    Rows may have different keys (train rows vs validation rows); the CSV keeps the union, in first-seen order.
    On resume a last line cut by a kill is dropped with a warning. Only rank 0 should construct one.
    """

    def __init__(self, run_dir: str | os.PathLike[str], name: str = "log", resume: bool = False,
                 log: Any = None) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / f"{name}.jsonl"
        self.csv = self.dir / f"{name}.csv"
        self.png = self.dir / f"{name}.png"
        self.rows: list[dict[str, Any]] = []
        if resume and self.jsonl.is_file():
            self.rows, cut = read_log_rows(self.jsonl)
            if cut:
                (log or get_logger("voxdiff")).warning("%s: dropped a cut last line (a killed run)", self.jsonl)
            self._rewrite()
        else:
            self.jsonl.write_text("")

    def _rewrite(self) -> None:
        with atomic_path(self.jsonl) as tmp:  # a full disk leaves the history as it was
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def log(self, **row: Any) -> None:
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resume from an earlier checkpoint rewrites history from there)."""
        self.rows = [row for row in self.rows if row.get("step", 0) <= step]
        self._rewrite()

    def flush(self, curves: tuple[str, ...] = ("loss",)) -> None:
        """Rewrite the CSV and the PNG curve of `curves` against step."""
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with atomic_path(self.csv) as tmp, open(tmp, "w", newline="") as f:  # never a half-written CSV
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        plot_curves(self.rows, curves, self.png)


def read_log_rows(jsonl: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a run's `log.jsonl` and whether its last line was cut (a killed run: dropped). Any other line that
    is not a JSON object is a VoxdiffError naming the file: the history of the run cannot be kept."""
    try:
        lines = [line for line in jsonl.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise VoxdiffError(f"{jsonl} is not a text file; move it away to resume (its history is then lost)") from None
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if i != len(lines) - 1:
                raise VoxdiffError(f"{jsonl}: line {i + 1} is not a JSON object; move the file away to resume (its "
                                   "history is then lost)")
            return rows, True
        rows.append(row)
    return rows, False


@dataclass
class RunStart:
    """What `start_run` sets up for a trainer."""

    info: DistInfo  # rank, world size, device
    time_cap: TimeCap  # the safety cap on wall time
    run_dir: Path
    resume: Checkpoint | None  # last.pt to continue from, when cfg.resume
    restore_best: str | None = None  # why best.pt is to be restored from last.pt before the run goes on (see start_run)

    @property
    def device(self) -> torch.device:
        return self.info.device


def start_run(cfg: TrainConfig, kind: Kind, fixed: tuple[str, ...],
              stale_best: Callable[[Checkpoint, Checkpoint], bool] | None = None) -> RunStart:
    """The setup both trainers share: torchrun's environment, the time cap, the same config on every rank, the batch
    split, flushed denormals, the seeds, and the checkpoint to resume, refused when one of the
    `fixed` settings (the network, the data order) differs from the run's.

    A resume also reads what it will continue, before anything is written: log.jsonl (a line that is not JSON, other
    than a cut last one, is refused) and best.pt (refused when it cannot be loaded; when it is missing, or
    `stale_best(best, last)` says it is older than the best model last.pt records, `restore_best` says why
    `RunDir.commit` will copy last.pt onto it)."""
    info = init_distributed(cfg.device)  # under torchrun: batch_size is global, rank 0 alone writes (distributed.py)
    time_cap = TimeCap(cfg.max_minutes, info.device)
    check_same_config(to_dict(cfg), f"{kind} training config")
    split_batch(cfg.batch_size, info.world_size)
    flush_denormals(info.device)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.ckpt_path)
    if run_dir.exists() and not run_dir.is_dir():
        raise VoxdiffError(f"--ckpt_path {run_dir} is a file, not a directory")
    last = run_dir / "last.pt"
    resume, restore_best = None, None
    if cfg.resume:
        if not last.is_file():
            raise VoxdiffError(f"--resume: no checkpoint at {last}")
        resume = load_checkpoint(last, kind=kind, map_location="cpu")
        check_resumable(resume)
        now = to_dict(cfg)
        diff = [k for k in fixed if _norm(resume.train_config.get(k)) != _norm(now.get(k))]
        if diff:
            parts = [f"{k}: checkpoint {resume.train_config.get(k)} vs now {now.get(k)}" for k in diff]
            raise VoxdiffError(f"cannot resume from {last}: config mismatch ({'; '.join(parts)})")
        if (run_dir / "log.jsonl").is_file():
            read_log_rows(run_dir / "log.jsonl")
        best = run_dir / "best.pt"
        if not best.is_file():
            restore_best = f"{best} is missing; a copy of {last} (step {resume.step}) stands in for it"
        else:
            best_ckpt = load_checkpoint(best, kind=kind, map_location="cpu")
            if stale_best is not None and stale_best(best_ckpt, resume):
                restore_best = (f"{best} (step {best_ckpt.step}) is older than the best model that {last} records "
                                "(a run stopped between the two saves); replaced by a copy of "
                                f"{last} (step {resume.step}), which holds that model")
    return RunStart(info, time_cap, run_dir, resume, restore_best)


def _norm(x: Any) -> Any:
    """Tuples and lists compare equal (JSON and torch.save keep different sequence types), and a renamed setting's
    old value equals its new one (config.RENAMED: the AE block "seed" of runs from before is "course")."""
    if isinstance(x, dict):
        return {k: RENAMED.get(v, v) if k == "block" and isinstance(v, str) else _norm(v) for k, v in x.items()}
    return [_norm(v) for v in x] if isinstance(x, (list, tuple)) else x


RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "log.csv", "log.png", "train.log")


class _Held(logging.Handler):
    """Keeps log records until the run directory's train.log may be written (RunDir.commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class RunDir:
    """A trainer's run directory, locked and checked (`open_run_dir`). Until `commit` nothing in it is written: the
    trainer's `log` prints warnings and holds its lines for train.log, so a run refused by a later check (a damaged data
    file, a full disk at the latent cache, a precision the machine cannot run) leaves every file as it was."""

    path: Path
    log: logging.Logger
    is_main: bool
    clear: tuple[str, ...]  # the replaced run's files, removed at commit (--overwrite)
    restore_best: str | None  # why commit copies last.pt onto best.pt (RunStart.restore_best)
    _held: _Held | None

    def commit(self) -> None:
        """Every check passed, the run writes from here on: the replaced run's files go, train.log gets the lines
        logged so far, and a missing or stale best.pt is restored from last.pt (one warning line saying so)."""
        if not self.is_main:
            return
        for name in self.clear:
            (self.path / name).unlink(missing_ok=True)
        if self._held is not None:
            records, self._held = self._held.records, None
            get_logger(self.log.name, self.path / "train.log")  # the same logger object: file + stderr handlers
            for handler in self.log.handlers:
                if isinstance(handler, logging.FileHandler):
                    for record in records:  # already on stderr: into the file alone, with their own times
                        handler.handle(record)
        if self.restore_best is not None:
            self.log.warning(self.restore_best)
            with atomic_path(self.path / "best.pt") as tmp:
                shutil.copyfile(self.path / "last.pt", tmp)


def open_run_dir(run: RunStart, resume: bool, overwrite: bool, stack: contextlib.ExitStack,
                 logger: str) -> RunDir:
    """Make a trainer's run directory safe to write, for as long as `stack` is open; the trainer's logger `logger`.

    1. rank 0 takes the directory's lock (a second trainer on it stops with one line) and clears killed runs'
       temporary files; 2. a directory that holds a checkpoint is refused unless the run resumes it, or `overwrite`
       says to replace it (then the old run's files go at `RunDir.commit`, so no stale best.pt survives, and a run
       refused before it keeps the old one); 3. a directory this run creates is removed again if the run fails before
       writing its first checkpoint.
    """
    run_dir, is_main = run.run_dir, run.info.is_main
    if run_dir.exists() and not run_dir.is_dir():
        raise VoxdiffError(f"--ckpt_path {run_dir} is a file, not a directory")
    created = not run_dir.exists()
    with together():  # a lock refused on rank 0 stops every rank here, none waits in a later collective
        if is_main:
            stack.enter_context(dir_lock(run_dir, "training run"))

    def remove_if_failed_early(exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and created and is_main and not (run_dir / "last.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)

    stack.push(remove_if_failed_early)
    existing = [n for n in ("last.pt", "best.pt") if (run_dir / n).is_file()]
    if existing and not resume and not overwrite:
        raise VoxdiffError(f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --ckpt_path")
    log = get_logger(logger, None)  # stderr only; train.log at commit
    held = None
    if is_main:
        held = _Held()
        log.addHandler(held)
    return RunDir(run_dir, log, is_main, RUN_FILES if overwrite and not resume else (), run.restore_best, held)


class StepGuard:
    """Skips a training step whose loss or gradient norm is non-finite or absurd against the run's recent history,
    as torch.amp.GradScaler skips a step with inf gradients: the caller leaves parameters, optimizer and EMA untouched.

    "Absurd" is more than `factor` times the median of the last `window` accepted values, once `warmup` values are in:
    a kernel that returns garbage (1e30) or a corrupted batch, never the ordinary spread of a loss. Clipping alone would
    rescale garbage into a unit-norm step, and AdamW's second moments would absorb it: the run would learn less and
    nobody would know. `max_in_row` skipped steps in a row stop the run with one line. The state (counts, history) is
    JSON-able and saved in checkpoints, so a resumed run decides exactly as an uninterrupted one.
    """

    def __init__(self, max_in_row: int = 10, factor: float = 100.0, window: int = 100, warmup: int = 20,
                 state: dict[str, Any] | None = None) -> None:
        self.max_in_row, self.factor, self.window, self.warmup = max_in_row, factor, window, warmup
        state = state or {}
        self.skipped = int(state.get("skipped_steps", 0))
        self.in_row = int(state.get("in_row", 0))
        self.events: list[dict[str, Any]] = list(state.get("skipped", []))
        self.history: dict[str, list[float]] = {k: list(v) for k, v in state.get("history", {}).items()}

    def _absurd(self, name: str, value: float) -> bool:
        past = self.history.get(name, [])
        return len(past) >= self.warmup and value > self.factor * float(np.median(past))

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """None when the step may be applied; else why it is skipped (for the log). Raises VoxdiffError when
        `max_in_row` steps in a row were skipped."""
        values = {"loss": loss, "grad_norm": grad_norm}
        reason = None
        for name, v in values.items():
            if not math.isfinite(v):
                reason = f"non-finite {name} ({v})"
                break
            if self._absurd(name, v):
                reason = f"{name} {v:.3g} is over {self.factor:g}x the recent median"
                break
        if reason is None:
            self.in_row = 0
            for name, v in values.items():
                self.history[name] = (self.history.get(name, []) + [v])[-self.window :]
            return None
        self.skipped += 1
        self.in_row += 1
        self.events = (self.events + [{"step": step, "reason": reason}])[-20:]
        if self.in_row >= self.max_in_row:
            raise VoxdiffError(
                f"{self.in_row} training steps in a row were skipped (last at step {step}: {reason}); try "
                "--precision fp32 (bench/numerics_check.py tests this machine), a lower --lr, or --resume from the "
                "last good checkpoint")
        return f"step {step} skipped: {reason} (parameters, optimizer and EMA unchanged; {self.skipped} so far)"

    def state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped, "in_row": self.in_row, "skipped": self.events,
                "history": self.history}


@dataclass
class Runtime:
    """How a trainer runs on this machine: the verified precision, the thread count, the step guard and the busy
    watch. `record()` goes into the checkpoint metadata, the result (stages.json) and the report."""

    precision: PrecisionChoice
    threads: ThreadChoice
    guard: StepGuard
    watch: BusyWatch

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The training forwards' autocast dtype (None: fp32)."""
        return self.precision.dtype

    def after_step(self, log: Any) -> None:
        """Per finished step: the busy watch (one warning line, once)."""
        note = self.watch.update()
        if note is not None:
            log.warning(note)

    def record(self, with_history: bool = False) -> dict[str, Any]:
        """JSON-able: precision and threads (with their reasons and timings), skipped steps, the busy note; with
        `with_history` also the guard's full state (what a checkpoint needs to resume it exactly)."""
        guard = self.guard.state()
        out = {"precision": self.precision.record(), "threads": self.threads.record(),
               "skipped_steps": self.guard.skipped, "skipped": guard["skipped"], "busy": self.watch.note}
        if with_history:
            out["guard"] = guard
        return out


def choose_runtime(cfg: TrainConfig, info: DistInfo, model: torch.nn.Module,
                   loss_fn: Callable[[torch.nn.Module], torch.Tensor], what: str,
                   resumed: dict[str, Any] | None, log: Any) -> Runtime:
    """Decide precision and threads where the run is, with the run's own network and batch (`loss_fn(net)` computes
    a training loss on fixed inputs), and set up the step guard.

    1. precision: `choose_precision` checks bf16 against fp32 on this network's forward and backward;
    2. threads: a resumed run with `auto` keeps the count it was trained with (results are bit-identical for a fixed
       count only); otherwise `choose_threads` times the same step at each candidate count;
    3. the guard continues from the resumed run's state. Everything is logged and recorded.
    """
    resumed = resumed or {}
    probe, names = gradient_probe(model, loss_fn)
    try:
        precision = choose_precision(cfg.precision, info.device, probe, names)
    except ValueError as e:
        raise VoxdiffError(str(e)) from None
    if any_rank(precision.dtype is None, info.device) and precision.dtype is not None:  # every rank the same
        precision = PrecisionChoice(cfg.precision, None, "another rank's bf16 check failed; using fp32 on every rank",
                                    precision.check)
    setting = cfg.threads
    recorded = resumed.get("threads", {}).get("threads")
    if setting == "auto" and recorded and info.device.type == "cpu":
        setting = str(recorded)  # results are bit-identical for a fixed count only: a resume keeps the run's
    with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
        threads = choose_threads(setting, lambda: probe(precision.dtype), info.device)
    if setting != cfg.threads:
        threads.setting, threads.reason = cfg.threads, "the count the resumed run was trained with"
    log.info("precision %s: %s", precision.name, precision.reason)
    log.info("threads %d: %s", threads.threads, threads.reason)
    if recorded and int(recorded) != threads.threads:
        log.warning("resumed with %d thread(s) where the run trained with %s: its numbers will differ in the last bits "
                    "from an uninterrupted run's", threads.threads, recorded)
    guard = StepGuard(cfg.max_bad_steps, state=resumed.get("guard"))
    return Runtime(precision, threads, guard, BusyWatch(threads, what))


def warmup_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int | None = None,
              final_ratio: float = 0.1) -> float:
    """Linear warmup from 0 to base_lr over `warmup_steps`; then constant, or, with `total_steps`, a cosine decay
    to `final_ratio` · base_lr at the last step (a lower LR at the end settles the weights the checkpoint keeps)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def holdout_rows(counts: dict[str, int], fraction: float, max_per_category: int, seed: int) -> dict[str, list[int]]:
    """The held-out slice of a TRAIN split: per category, a seeded random `fraction` of its rows (at least 1, at most
    `max_per_category`, always leaving one to train on). Sorted row numbers per category.

    Checkpoint selection and threshold calibration look at these shapes only, never at val or test (which are the
    references the metrics score against). The LDM reads the AE's slice from its checkpoint and never trains on it.
    """
    out: dict[str, list[int]] = {}
    for i, (cat, n) in enumerate(counts.items()):
        if n < 2:
            raise VoxdiffError(f"the {cat} train split has {n} shape(s); need at least 2 (one is held out)")
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i, n]).generate_state(1)[0]))
        k = min(n - 1, max_per_category, max(1, round(fraction * n)))
        out[cat] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return out


class StepOrder:
    """The training order: step s of a run uses the s-th batch of a seeded per-epoch permutation of `n` items.

    Epoch e's global order is randperm(n) seeded by (seed, e) (DistributedSampler's convention); this rank takes its
    shard of every global batch. The position depends on the global step only, so a resume (under any world size)
    continues with exactly the batches an uninterrupted run would take.
    """

    def __init__(self, n: int, batch_size: int, info: DistInfo, seed: int) -> None:
        self.n, self.batch_size, self.info = n, batch_size, info
        self.per_rank = batch_size // info.world_size
        self.steps_per_epoch = -(-n // batch_size)
        self._sampler = epoch_sampler(n, info, seed * 1_000_003)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        """This rank's item positions (int64) for global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._sampler.set_epoch(epoch)
            self._perm = torch.tensor(list(self._sampler), dtype=torch.long)
            self._epoch = epoch
        return self._perm[i * self.per_rank : (i + 1) * self.per_rank]


class TimeCap:
    """A safety cap on a stage's wall time. Training lengths are steps; the cap only stops a run that would otherwise
    overrun (a loaded machine), and the stop is reported as such. Every rank decides together."""

    def __init__(self, minutes: float | None, device: torch.device) -> None:
        self.seconds = None if minutes is None else 60.0 * minutes
        self.device = device
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def reached(self) -> bool:
        return self.seconds is not None and any_rank(self.elapsed() > self.seconds, self.device)


def cap_message(stage: str, step: int, total: int) -> str:
    """The one line every report prints when the time cap, not the step count, ended a training stage."""
    return f"{stage} stopped by the time cap at step {step} of {total}; these results are not the preset's"


@dataclass
class StepOutcome:
    """What `StepLoop.update` saw of one step."""

    loss: float  # the global batch's loss (the mean over ranks)
    grad_norm: float  # the norm of the all-reduced gradient, before clipping
    applied: bool  # False: the step guard skipped it (parameters and optimizer unchanged)


class StepLoop:
    """The loop skeleton both trainers share; the trainer writes each step's body, top to bottom:

        for step in loop:                   # the global step to run, until total_steps or the time cap
            batch = ...
            with loop.timed():              # forward, backward, optimizer: train_seconds; then the step counts
                loss = ...
                out = loop.update(loss, model, optimizer, cfg.grad_clip)
            if loop.log_due():
                loop.log({"loss": ...}, loss=out.loss)
            if loop.due(cfg.ckpt_every):
                loop.on_main(save_checkpoints)
        loop.on_main(final_writes)          # `loop.unsaved()`: the last checkpoint is still to write
        return loop.result(...)

    After `timed()`, `loop.step` is the number of finished steps: what the logs and checkpoints record. Rank 0 alone
    writes log.jsonl / log.csv / log.png (`log`, `record`, `flush`).
    """

    def __init__(self, stage: str, cfg: TrainConfig, run: RunStart, runtime: Runtime, log: logging.Logger,
                 step: int, total_steps: int, curves: tuple[str, ...], progress: bool = True,
                 log_last: bool = False) -> None:
        """`stage`: "AE" or "LDM" (messages; the progress bar's name is its lower case); `step`: the resumed step;
        `curves`: what log.png draws; `log_last`: the last step is a logging step too, whatever `cfg.log_every`."""
        self.stage, self.cfg, self.info, self.time_cap = stage, cfg, run.info, run.time_cap
        self.runtime, self.logger = runtime, log
        self.last_file = run.run_dir / "last.pt"
        self.step = self.start_step = step
        self.total_steps, self.curves, self.log_last = total_steps, curves, log_last
        self.stopped, self.train_seconds = "num_steps", 0.0
        self.runlog = RunLogger(run.run_dir, "log", resume=cfg.resume, log=log) if self.info.is_main else None
        if self.runlog is not None and cfg.resume:
            self.runlog.truncate_after(step)  # a resume from an earlier checkpoint rewrites the history from there
        self.bar = Progress(total_steps, stage.lower(), initial=min(step, total_steps),
                            time_cap_s=self.time_cap.seconds, enabled=progress and self.info.is_main, log=log)
        self._shown: dict[str, str] = {}

    def __iter__(self) -> Iterator[int]:
        while self.step < self.total_steps:
            if self.time_cap.reached():
                self.stopped = "time_cap"
                break
            step = self.step
            yield step
            if self.step != step + 1:
                raise RuntimeError("a training step's body must run `with loop.timed():` once")
            self.bar.update(1, **self._shown)
            self._shown = {}
        self.bar.close()
        if self.stopped == "time_cap":
            self.logger.warning(cap_message(self.stage, self.step, self.total_steps))

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """The step's work (train_seconds counts it); when it ends, the step is done: `step` counts it and the busy
        watch sees it. A step that raises is not counted."""
        t0 = time.perf_counter()
        yield
        self.step += 1
        self.train_seconds += time.perf_counter() - t0
        self.runtime.after_step(self.logger)

    def update(self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               grad_clip: float) -> StepOutcome:
        """The guarded optimizer step: backward, gradient clipping (`grad_clip` 0: none, the norm still measured),
        then `optimizer.step()` unless the step guard skips the step (one warning line; parameters and optimizer
        untouched, and the caller leaves its EMA alone when `applied` is False). Every rank decides the same: the
        guard sees the global batch's loss and the all-reduced gradient's norm."""
        loss_all = mean_over_ranks(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        skipped = self.runtime.guard.check(self.step, float(loss_all), float(grad_norm))
        if skipped is None:
            optimizer.step()
        else:
            self.logger.warning(skipped)
        return StepOutcome(float(loss_all), float(grad_norm), skipped is None)

    def log_due(self) -> bool:
        """The step just finished is a logging step: every `log_every` steps (and the last one, with `log_last`)."""
        return self.step % self.cfg.log_every == 0 or (self.log_last and self.step == self.total_steps)

    def log(self, shown: dict[str, str], **row: float) -> None:
        """A logging step's row into log.jsonl (rank 0) and `shown` beside the progress bar."""
        self.record(**row)
        self._shown = shown

    def record(self, **row: Any) -> None:
        """A row of scalars at the current step into log.jsonl (rank 0; a no-op elsewhere)."""
        if self.runlog is not None:
            self.runlog.log(step=self.step, **row)

    def flush(self) -> None:
        """Rewrite log.csv and redraw log.png (rank 0)."""
        if self.runlog is not None:
            self.runlog.flush(self.curves)

    def due(self, every: int | None) -> bool:
        """A periodic event (a checkpoint, a preview) falls on the step just finished: every `every` steps (None or
        0: never), but not on the last step, whose writes come after the loop."""
        return bool(every) and self.step % every == 0 and self.step != self.total_steps

    def unsaved(self) -> bool:
        """The run has steps last.pt does not hold (or no last.pt at all): the final checkpoint is to be written."""
        return self.step > self.start_step or not self.last_file.is_file()

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on rank 0 alone (its result there, None elsewhere); a failure there (a full disk) stops every
        rank here, so none waits at a later collective (voxdiff.distributed.together)."""
        with together():
            if self.info.is_main:
                return fn(*args)
        return None

    def result(self, metrics: dict[str, Any], in_sync: dict[str, tuple[torch.nn.Module, str]],
               per_step: int | None = None) -> dict[str, Any]:
        """The run's summary (logged, and returned by the trainer): the step reached and why the loop stopped, the
        trainer's `metrics`, wall and training seconds, the throughput (steps/s, or samples/s with `per_step` samples
        per step), the runtime record, the time cap's note. Under torchrun also the world size and, per key of
        `in_sync`, the hash of a (module, name) every rank must hold bit-identically (a check and a barrier)."""
        seconds, done = self.time_cap.elapsed(), self.step - self.start_step
        rate = (done * (per_step or 1) / self.train_seconds) if self.train_seconds > 0 else None
        result = {"step": self.step, "total_steps": self.total_steps, "stopped": self.stopped, **metrics,
                  "seconds": seconds, "train_seconds": self.train_seconds,
                  "overhead_fraction": 1.0 - self.train_seconds / seconds if seconds > 0 else None,
                  "samples_per_s" if per_step else "steps_per_s": rate, "runtime": self.runtime.record()}
        if self.stopped == "time_cap":
            result["note"] = cap_message(self.stage, self.step, self.total_steps)
        if self.info.distributed:
            result["world_size"] = self.info.world_size
            result.update({key: check_in_sync(module, name) for key, (module, name) in in_sync.items()})
        self.logger.info("finished: %s", result)
        return result
