"""The resumable, sharded sampling job: `sample_to_files` writes `{save_dir}/{category}.npy` batch by batch through a
`LatentVoxelPipeline`, with a progress record per category that lets a rerun resume where a killed job stopped.

Per-batch seeds make every batch a pure function of (settings, seed, category, batch index): an interrupted job that
is rerun writes exactly the arrays an uninterrupted one would, under torchrun as in one process.

The top of voxdiff.sampling: imports the pipeline (voxdiff.sampling.pipeline) and the layers below (config,
checkpoint, distributed, threads, errors, files, logs, device). PNGs of the samples come from voxdiff.render,
imported only when a job renders: importing voxdiff.sampling never imports matplotlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff import __version__
from voxdiff.checkpoint import SAMPLING_KEYS
from voxdiff.config import SampleConfig, category_index, to_dict
from voxdiff.device import flush_denormals
from voxdiff.distributed import all_gather_object, broadcast_object, check_same_config, init_distributed, together
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_write_json, dir_lock, file_sha256, open_npy, open_npy_memmap
from voxdiff.logs import Progress, get_logger
from voxdiff.precision import PrecisionChoice
from voxdiff.sampling.pipeline import LatentVoxelPipeline, SamplingPlan, _unet_probe, resolve_sampling
from voxdiff.threads import BusyWatch, ThreadChoice, choose_threads

__all__ = ["sample_to_files"]


def _progress_key(cfg: SampleConfig, category: str, pipe: LatentVoxelPipeline) -> str:
    """What a partial file depends on: the settings that change samples, the checkpoints' content (so a moved
    or renamed run directory resumes, and a retrained model never does), and the device kind and precision the
    batches are computed in (another device draws other noise: a partial file never mixes the two)."""
    src = {k: v for k, v in to_dict(cfg).items()
           if k not in ("ldm_ckpt_path", "ae_ckpt_path", "save_dir", "device", "threads")}
    src.update(categories=[category], ldm=file_sha256(pipe.ldm_file), ae=file_sha256(pipe.ae_file),
               device=pipe.device.type, amp=str(pipe.autocast_dtype))  # "amp": the key old partial files hold
    if pipe.device.type == "cuda":
        src["gpu"] = torch.cuda.get_device_name(pipe.device)
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def sample_to_files(cfg: SampleConfig, progress: bool = True, max_batches: int | None = None, *,
                    unset: Collection[str] = ()) -> dict[str, Any]:
    """Sample `cfg.num_samples` shapes per category into `{save_dir}/{category}.npy`: (N, R, R, R) uint8 in {0, 1}.

    `unset` names the sampling settings (SAMPLING_KEYS) the caller left open: each takes the LDM's stored setting
    where it has one, else cfg's value (the library default); see `resolve_sampling`. The others are cfg's as given.

    Resumable: batches go into `.{category}.partial.npy` (a memmap) with `.{category}.progress.json` (the run's key
    and finished batches); a rerun with the same settings skips finished batches and categories, and the final file
    appears by rename only when complete. `max_batches` stops after that many new batches (a time-sliced run).
    Writes `{save_dir}/sample.json` (config, checkpoints, timings, occupancy, and `settings`: each sampling setting's
    value and where it came from, "given", "model" or "default") and `sample.log`; returns that summary.
    Under torchrun each rank samples whole batches (rank r the r-th pending batch of every round) with the same
    per-batch seeds into rank 0's memmap (save_dir must be shared by the ranks): the file equals a one-process run's.
    """
    info = init_distributed(cfg.device)
    device = info.device
    flush_denormals(device)
    check_same_config(to_dict(cfg), "sampling config")
    pipe = LatentVoxelPipeline.from_checkpoints(cfg.ae_ckpt_path, cfg.ldm_ckpt_path, device=device,
                                                use_ema=cfg.use_ema, precision=cfg.precision)
    pipe.check_categories(cfg.categories)
    cfg, sources = resolve_sampling(cfg, pipe.stored_sampling, unset)
    plan = pipe.plan(cfg)
    save_dir = Path(cfg.save_dir)
    probe = _unet_probe(pipe.unet, pipe.latent_shape, cfg.batch_size * (1 + (plan.scale != 0)))  # a guided batch
    threads = choose_threads(cfg.threads, lambda: probe(pipe.autocast_dtype), device)
    with contextlib.ExitStack() as stack:
        with together():  # a lock refused on rank 0 stops every rank here, none waits in a later collective
            if info.is_main:  # one sampling job per directory; leftovers of killed jobs are cleared
                stack.enter_context(dir_lock(save_dir, "sampling job"))
        return _sample_all(cfg, pipe, plan, sources, info, progress, max_batches, threads)


def _sample_all(cfg: SampleConfig, pipe: LatentVoxelPipeline, plan: SamplingPlan, sources: dict[str, str],
                info: Any, progress: bool, max_batches: int | None, threads: ThreadChoice) -> dict[str, Any]:
    """The body of `sample_to_files`, with the save directory locked."""
    save_dir, device = Path(cfg.save_dir), pipe.device
    log = get_logger("voxdiff.sample", save_dir / "sample.log" if info.is_main else None)
    precision = pipe.precision or PrecisionChoice(cfg.precision, pipe.autocast_dtype, "set by the caller")
    log.info("precision %s: %s", precision.name, precision.reason)
    log.info("threads %d: %s", threads.threads, threads.reason)
    watch = BusyWatch(threads, "sampling", steps_per_probe_step=len(plan.scheduler.timesteps))
    if not pipe.ae_matches:
        log.warning("AE checkpoint %s differs from the one the LDM was trained with (%s)", pipe.ae_file,
                    pipe.ldm_meta.ae_file if pipe.ldm_meta else "?")
    num_batches = -(-cfg.num_samples // cfg.batch_size)
    summary: dict[str, Any] = {"config": to_dict(cfg), "version": __version__, "device": str(device),
                               "ldm_ckpt": str(pipe.ldm_file), "ldm_step": pipe.ldm_step, "ae_ckpt": str(pipe.ae_file),
                               "settings": {k: {"value": getattr(cfg, k), "from": sources[k]} for k in SAMPLING_KEYS},
                               "cfg_scale_effective": plan.scale, "binarization": plan.binarization.describe(),
                               "timesteps": len(plan.scheduler.timesteps), "categories": {}, "complete": True,
                               "runtime": {"precision": precision.record(), "threads": threads.record()}}
    if info.distributed:
        summary["world_size"] = info.world_size
    budget = max_batches
    for category in cfg.categories:
        result = _sample_category(cfg, category, pipe, plan, info, log, progress, num_batches, budget, watch)
        if result is None:
            summary["complete"] = False
            break
        stats, new = result
        if budget is not None:
            budget -= new
        summary["categories"][category] = stats
        summary["complete"] &= stats.get("file") is not None
    summary["runtime"]["busy"] = watch.note
    with together():  # every rank returns once the files exist, or raises with rank 0
        if info.is_main:
            atomic_write_json(save_dir / "sample.json", summary)
    return summary


def _sample_category(cfg: SampleConfig, category: str, pipe: LatentVoxelPipeline, plan: SamplingPlan, info: Any,
                     log: logging.Logger, progress: bool, num_batches: int, budget: int | None,
                     watch: BusyWatch) -> tuple[dict[str, Any], int] | None:
    """One category of `sample_to_files`; None when the batch budget is already spent."""
    save_dir, side, class_id = Path(cfg.save_dir), cfg.resolution, category_index(category)
    final, partial = save_dir / f"{category}.npy", save_dir / f".{category}.partial.npy"
    record_file = save_dir / f".{category}.progress.json"
    key = _progress_key(cfg, category, pipe)
    shape = (cfg.num_samples, side, side, side)
    record = _agreed_record(record_file, final, key, shape, num_batches, info, log)
    if record["complete"] and final.is_file():
        if cfg.render and info.is_main and not final.with_suffix(".png").is_file():
            _render_samples(final, cfg.render, category)  # an output lost after the samples were complete
        log.info("%s: complete from an earlier run, skipped", category)
        return {**record["stats"], "skipped": True, "file": str(final)}, 0
    if budget is not None and budget <= 0:
        return None
    fresh = not record["done"] or not partial.is_file() or (info.is_main and not _whole_npy(partial, shape, log))
    fresh_all = broadcast_object(fresh)
    if fresh_all:
        record = {"key": key, "done": {}, "complete": False}
    with together():  # the partial file exists before any rank writes its rows into it (or every rank stops)
        if fresh_all and info.is_main:
            # the old record goes first: a partial file (re)made below never meets a record of batches it does not hold
            record_file.unlink(missing_ok=True)
            _reserve_partial(partial, final, shape)
    if not fresh_all:
        log.info("%s: resuming, %d of %d batches done", category, len(record["done"]), num_batches)
    samples = np.lib.format.open_memmap(partial, mode="r+")
    t0, new, new_shapes = time.perf_counter(), 0, 0
    bar = Progress(cfg.num_samples, f"sample {category}", unit="shape",
                   initial=sum(v["n"] for v in record["done"].values()), enabled=progress and info.is_main, log=log)
    pending = [b for b in range(num_batches) if str(b) not in record["done"]]
    if budget is not None:
        pending = pending[: max(0, budget)]
    for first in range(0, len(pending), info.world_size):
        round_batches = pending[first : first + info.world_size]  # a round: one batch per rank, in batch order
        finished: dict[str, Any] = {}
        for batch in round_batches[info.rank : info.rank + 1]:  # this rank's batch (none in a short last round)
            start, end = batch * cfg.batch_size, min(cfg.num_samples, (batch + 1) * cfg.batch_size)
            labels, latents = pipe.category_batch(plan, cfg.seed, class_id, batch, end - start)
            grids = pipe.to_grids(latents, labels, plan.binarization, side)
            samples[start:end] = grids
            samples.flush()
            note = watch.update(len(plan.scheduler.timesteps))
            if note is not None:
                log.warning(note)
            occupied = grids.reshape(len(grids), -1).sum(1)
            finished[str(batch)] = {"n": end - start, "occ_sum": float(occupied.sum()),
                                    "empty": int((occupied == 0).sum())}
        for rank_finished in all_gather_object(finished):  # every rank learns the round's batches, in batch order
            record["done"].update(rank_finished)
            new += len(rank_finished)
            new_shapes += sum(v["n"] for v in rank_finished.values())
            bar.update(sum(v["n"] for v in rank_finished.values()))
        if info.is_main:
            atomic_write_json(record_file, record)
    bar.close()
    seconds = time.perf_counter() - t0
    done = len(record["done"]) == num_batches
    samples.flush()
    del samples
    stats = {"num_samples": cfg.num_samples, "resolution": side, "batches_new": new, "batches_total": num_batches,
             "seconds": seconds, "shapes_per_s": new_shapes / seconds if new_shapes and seconds > 0 else None,
             "mean_occupancy": sum(v["occ_sum"] for v in record["done"].values()) / max(1, cfg.num_samples) / side**3,
             "empty": sum(v["empty"] for v in record["done"].values())}
    if done:
        record.update(complete=True, stats=stats)
        if info.is_main:  # every rank's rows were flushed before the last gather: rank 0 publishes the file
            if cfg.render:  # every output exists before the category is recorded complete
                _render_samples(partial, cfg.render, category, final.with_suffix(".png"))
            os.replace(partial, final)
            atomic_write_json(record_file, record)
        log.info("%s: wrote %s %s, %.1fs, %s", category, final, shape, seconds, stats)
    else:
        log.info("%s: stopped after %d new batches (%d/%d done); rerun to continue", category, new,
                 len(record["done"]), num_batches)
    return {**stats, "file": str(final) if done else None}, new


def _agreed_record(record_file: Path, final: Path, key: str, shape: tuple[int, ...], num_batches: int, info: Any,
                   log: logging.Logger) -> dict[str, Any]:
    """The category's progress record every rank works from: rank 0's reading of the progress file, or a fresh record
    when it is for other settings (`key`) or the complete samples were damaged since, broadcast to every rank.

    A record is {"key", "done": {batch index: its figures}, "complete", "stats" once complete}."""
    record = _read_progress(record_file, num_batches, log) if info.is_main else {}
    if record.get("key") != key:
        record = {"key": key, "done": {}, "complete": False}
    if info.is_main and record["complete"] and final.is_file() and not _whole_npy(final, shape, log):
        record = {"key": key, "done": {}, "complete": False}  # the samples were damaged after they were complete
    return broadcast_object(record)  # rank 0's reading of the progress file decides for every rank


def _reserve_partial(partial: Path, final: Path, shape: tuple[int, ...]) -> None:
    """Create the zeroed partial samples file, reserving its disk space up front; on a full disk no half-reserved file
    is left behind, and the error names the samples file (`final`) the user asked for, not the partial one."""
    try:
        open_npy_memmap(partial, shape).flush()  # disk space reserved up front
    except OSError as e:  # a full disk: no half-reserved file left behind, and the error names the samples
        partial.unlink(missing_ok=True)
        what = (e.strerror or str(e)).replace(str(partial), str(final))
        raise OSError(e.errno, what, str(final)) from None


def _read_progress(path: Path, num_batches: int, log: logging.Logger) -> dict[str, Any]:
    """A category's progress record; one that cannot be read or does not hold a record of `num_batches` batches (a cut
    or corrupted file) starts the category afresh, with one line saying so, instead of failing every rerun the same
    way."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("key"), str) or \
                not isinstance(record.get("done"), dict) or not isinstance(record.get("complete"), bool):
            raise ValueError("not a progress record")
        for batch, figures in record["done"].items():
            if not (batch.isdigit() and int(batch) < num_batches and isinstance(figures, dict)
                    and all(isinstance(figures.get(k), (int, float)) for k in ("n", "occ_sum", "empty"))):
                raise ValueError(f"batch {batch!r} holds no record of a batch")
        if record["complete"] and not isinstance(record.get("stats"), dict):
            raise ValueError("complete without statistics")
        return record
    except (ValueError, OSError, UnicodeDecodeError) as e:
        log.warning("%s is unreadable (%s); sampling this category afresh", path, str(e).splitlines()[0] if str(e)
                    else type(e).__name__)
        return {}


def _whole_npy(path: Path, shape: tuple[int, ...], log: logging.Logger) -> bool:
    """Whether `path` is a whole uint8 .npy array of `shape` (a partial or a finished samples file); says why not in one
    line (the category is then sampled afresh: a damaged file is never trusted, and never fatal)."""
    try:
        arr = open_npy(path)
        if arr.shape != shape or arr.dtype != np.uint8:
            raise VoxdiffError(f"{path} holds {arr.dtype} {arr.shape}, not uint8 {shape}")
    except VoxdiffError as e:
        log.warning("%s; sampling this category afresh", e)
        return False
    return True




def _render_samples(path: Path, n: int, category: str, png: Path | None = None) -> Path:
    """The PNG of a samples file's first n shapes (voxdiff.render, imported here: sampling without renders never loads
    matplotlib)."""
    from voxdiff.render import render_samples_file

    return render_samples_file(path, n, category, png)
