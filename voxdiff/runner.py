"""The stage runner: the main job end to end, data -> AE -> LDM -> tune -> sample -> eval -> render -> report.

Every stage is a call of the library function the stage's own CLI calls (load_data.py, autoencoder.py,
diffusion/train.py, diffusion/sample.py, eval.py, visualize.py), with the configs of one named preset
(voxdiff.presets.RUN_PRESETS): the demo is the real run at small size, not a separate toy.
Its command line is `python -m voxdiff` (voxdiff/__main__.py). Which settings of a stage the runner fills in, and which
stay out of the stage keys, is declared once, in the field metadata of voxdiff/config.py ("from_run", "local",
"added", "preview").

Layout of a run directory:
    config.json            the resolved RunConfig (rerun it with --config)
    data/                  procedural PartSeg HDF5 + {category}_voxels_{split}.npy (unless --dataset_path is given)
    ae/, ldm/              checkpoints, train.log, log.csv / log.png (loss curves)
    tune.log               the tune stage (when on): guidance scale and threshold picked on held-out TRAIN shapes
    model/ae.pt, ldm.pt    the trained pair for sampling, with the final sampling settings stored in ldm.pt
                           (`LatentVoxelPipeline.from_pretrained(run_dir + "/model")`, diffusion/sample.py)
    samples/{cat}.npy      the model's samples, exactly what eval.py scores
    oracle/{cat}.npy       a fresh procedural draw of the same size (the best a model could do)
    baselines/             trivial baselines: training shapes copied ("train"), occupancy-matched noise ("noise")
    renders/               PNG sheets: data vs samples vs oracle per category; teaser.png
    report.json, report.md per category JSD / MMD / COV / 1-NNA, stray voxels and fragmented shapes for samples,
                           oracle and baselines; the goals (cfg.goals) met or missed; timings
A stage recorded as complete in `stages.json` for the same settings, whose outputs (`stage_outputs`) all exist, is
skipped on a rerun; a stage that ran makes every later stage run again. A stage is recorded only once all its outputs
exist. A `stages.json` that cannot be read is rebuilt from the run's files (`_Stages.recover`).
The record keys hold no paths, so a run directory that is moved or copied resumes where it was. A rerun is checked
(changed settings of trained stages, the data's resolution) before anything is written: a refused rerun leaves every
file of the run as it was, config.json included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from voxdiff import __version__
from voxdiff.checkpoint import SAMPLING_KEYS, export_model, load_checkpoint, resolve_checkpoint_file
from voxdiff.config import CATEGORIES, RENAMED, SPLITS, RunConfig, tagged_fields, to_dict
from voxdiff.data.partseg import COUNT_PRESETS, write_synthetic_partseg
from voxdiff.data.shapes import generate_split
from voxdiff.data.voxelize import open_voxels, preprocess, voxel_path, voxelize_points
from voxdiff.device import resolve_device
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_memmap, atomic_write_json, dir_lock, file_sha256, remove_leftovers
from voxdiff.logs import Progress, get_logger
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.precision import autocast, cpu_has_bf16
from voxdiff.render import CATEGORY_VIEWS, DEFAULT_VIEW, render_samples_sheet
from voxdiff.report import goal_check, machine_info, write_report
from voxdiff.sampling import LatentVoxelPipeline, sample_to_files
from voxdiff.scoring import References, copying_check, open_samples, score_sets
from voxdiff.threads import ThreadChoice, available_cores, candidates, choose_threads, thread_limit
from voxdiff.training.autoencoder import train_autoencoder
from voxdiff.training.ldm import train_ldm
from voxdiff.tuning import tune_sampling

STAGES: tuple[str, ...] = ("data", "ae", "ldm", "tune", "sample", "eval", "render", "report")
ORACLE_SEED_OFFSET = 1_000_003  # the oracle's shapes come from another seed than the data's, same generator


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the run-owned fields of every stage config (metadata "from_run") from the run's run_dir, data,
    resolution, device, threads and seed; the stages' other settings stay the user's."""
    run = Path(cfg.run_dir)
    data = cfg.dataset_path or str(run / "data")
    shared = {"dataset_path": data, "ae_ckpt_path": str(run / "ae"), "ldm_ckpt_path": str(run / "ldm"),
              "device": cfg.device, "seed": cfg.seed, "threads": cfg.threads,
              "resume": False, "overwrite": False}  # decided when a trainer's stage runs (_train_stage)
    ae = _fill(cfg.ae, shared, ckpt_path=str(run / "ae"))
    sample = _fill(cfg.sample, shared, save_dir=str(run / "samples"), resolution=cfg.resolution, render=None)
    # a user's setting, not run-owned: no guidance from an LDM trained without label dropout
    sample = dataclasses.replace(sample, use_cfg=cfg.ldm.use_cfg and cfg.sample.use_cfg)
    ldm = _fill(cfg.ldm, shared, ckpt_path=str(run / "ldm"),
                preview_threshold=sample.threshold if sample.binarize == "threshold" else 0.5)
    return dataclasses.replace(cfg, dataset_path=data, ae=ae, ldm=ldm, sample=sample)


def _fill(stage_cfg: Any, shared: dict[str, Any], **own: Any) -> Any:
    """`stage_cfg` with each of its run-owned fields set, from `own` else from `shared`. A run-owned field without a
    value, or an `own` value for a field that is not run-owned, means config.py and `resolve` disagree: a TypeError."""
    names = tagged_fields(type(stage_cfg), "from_run")
    values = {**shared, **own}
    missing, stray = sorted(set(names) - set(values)), sorted(set(own) - set(names))
    if missing or stray:
        raise TypeError(f"{type(stage_cfg).__name__}: resolve gives no value for run-owned fields {missing}, or "
                        f"values for fields that are not run-owned {stray}")
    return dataclasses.replace(stage_cfg, **{n: values[n] for n in names})


def stage_key(stage: str, cfg: RunConfig, external_data: str | None) -> str:
    """What a stage's output depends on, without paths or devices (a moved run directory keeps its keys).

    The goals (`cfg.goals`) are in no key: they only judge the scores, so a changed goal rewrites the report and
    reruns nothing. The eval key names the scorer's version: a scorer with new figures rescores a finished run.
    """
    if stage in ("ae", "ldm", "tune", "sample"):
        stage_cfg = getattr(cfg, stage)
        return _key(_strip(to_dict(stage_cfg), type(stage_cfg)))
    what: Any = {"data": lambda: [external_data, cfg.data_preset, cfg.resolution, cfg.seed],
                 "eval": lambda: [cfg.oracle, list(cfg.baselines), "scorer-4"],
                 "render": lambda: [cfg.render_n, "category-views"]}[stage]()
    return _key(what)


_OLD_NAME = {new: old for old, new in RENAMED.items()}


def _strip(settings: dict[str, Any], cls: type, previews: bool = False) -> dict[str, Any]:
    """A stage's settings (of config class `cls`) as its key holds them: without the local fields (metadata "local":
    where files are, and how this machine runs the stage), without the preview fields (metadata "preview"; kept with
    `previews`, as keys before 0.5.0 held them), without fields added since runs were recorded (metadata "added") while
    they hold their defaults, and with the AE block under the name keys were first written with (config.RENAMED), so
    a run recorded before the addition or the rename is still up to date."""
    dropped = set(tagged_fields(cls, "local")) | (set() if previews else set(tagged_fields(cls, "preview")))
    added = {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("added")}
    out = {k: v for k, v in settings.items() if k not in dropped and not (k in added and v == added[k])}
    model = out.get("model")
    if isinstance(model, dict) and model.get("block") in _OLD_NAME:
        out["model"] = {**model, "block": _OLD_NAME[model["block"]]}
    return out


def _key(what: Any) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def apply_tune(cfg: RunConfig, result: dict[str, Any] | None) -> RunConfig:
    """The sampling settings the tune stage picked (guidance scale, threshold), when it ran."""
    if not result or "pick" not in result:
        return cfg
    p = result["pick"]
    clamp = result.get("clamp_latents", cfg.sample.clamp_latents)
    sample = dataclasses.replace(cfg.sample, cfg_scale=p["cfg_scale"], guidance_rescale=p.get("guidance_rescale", 0.0),
                                 binarize="threshold", threshold=p["threshold"], clamp_latents=clamp)
    return dataclasses.replace(cfg, sample=sample)


class _Stages:
    """Completion records in `stages.json`: {stage: {key, seconds, result}}; written atomically after each stage.

    A stage counts as complete when its record has the current key and every one of its outputs exists (a record is
    no proof that a file deleted or lost since is still there). A file that cannot be read as records is rebuilt.
    """

    def __init__(self, run_dir: Path, force: bool) -> None:
        self.file = run_dir / "stages.json"
        self.done: dict[str, Any] = {}
        self.unreadable: str | None = None  # why stages.json could not be read: `recover` rebuilds the records
        if not force and self.file.is_file():
            try:
                done = json.loads(self.file.read_text())
                if not isinstance(done, dict) or not all(isinstance(v, dict) for v in done.values()):
                    raise ValueError("not a JSON object of stage records")
                self.done = done
            except (ValueError, UnicodeDecodeError) as e:
                self.unreadable = str(e).splitlines()[0] if str(e) else type(e).__name__

    def recover(self, cfg: RunConfig, ext: str | None) -> None:
        """Rebuild the records of an unreadable stages.json from what is on disk, without writing anything.

        The data counts as made when every grid exists at the run's resolution. A trainer's stage counts as done
        when its last.pt records the same settings (its `train_config` gives the stage key) and, for the LDM, was
        trained on the AE checkpoint that is there now; a last.pt of other settings is refused like any changed
        rerun. The stages computed from the models (tune, sample, eval, render) run again. One line says so.
        """
        if self.unreadable is None:
            return
        run_dir = Path(cfg.run_dir)
        for stage in ("data", "ae", "ldm"):
            key = stage_key(stage, cfg, ext)
            if stage == "data":
                check_data(cfg)
                if _missing(stage_outputs(stage, cfg)):
                    break
                self.done[stage] = {"key": key, "seconds": 0.0, "result": {"recovered": "grids found"}}
                continue
            last = run_dir / stage / "last.pt"
            if not last.is_file():
                break
            ckpt = load_checkpoint(last, kind="autoencoder" if stage == "ae" else "ldm")
            if _key(_strip(ckpt.train_config, type(getattr(cfg, stage)))) != key:
                raise VoxdiffError(f"stage {stage}: the settings changed since {run_dir / stage} was trained (its "
                                   "last.pt records others); pass --force to rerun every stage, or use another "
                                   "--run_dir")
            if stage == "ldm" and ckpt.meta.ae_sha256 != file_sha256(resolve_checkpoint_file(run_dir / "ae")):
                break
            self.done[stage] = {"key": key, "seconds": 0.0, "result": {"recovered": "from last.pt",
                                                                       "step": ckpt.step}}
        kept = ", ".join(self.done) or "nothing"
        print(f"warning: {self.file} cannot be read ({self.unreadable}); rebuilding it from the run's files (kept: "
              f"{kept}; the later stages run again)", file=sys.stderr)

    def complete(self, stage: str, key: str, outputs: list[Path]) -> bool:
        rec = self.done.get(stage, {})
        return rec.get("key") == key and not rec.get("incomplete") and not _missing(outputs)

    def update_legacy(self, stage: str, key: str, cfg: RunConfig) -> None:
        """Keys before 0.5.0 held the LDM's preview fields (metadata "preview"), so a new sampling threshold refused a
        trained LDM. A record with such a key for the current settings, or for its last.pt's settings where those give
        the current `key` without the previews, is the same model: the record gets the current key (kept in memory;
        stages.json is rewritten when a stage next runs)."""
        rec = self.done.get(stage)
        if rec is None or rec.get("key") == key:
            return
        cls = type(getattr(cfg, stage))
        if rec.get("key") == _key(_strip(to_dict(getattr(cfg, stage)), cls, previews=True)):
            rec["key"] = key
            return
        last = Path(cfg.run_dir) / stage / "last.pt"
        if not last.is_file():
            return
        try:
            trained = load_checkpoint(last, kind="ldm").train_config
        except (VoxdiffError, OSError):
            return  # unreadable: the record stays as it is (and is refused as changed)
        if rec.get("key") == _key(_strip(trained, cls, previews=True)) and _key(_strip(trained, cls)) == key:
            rec["key"] = key

    def changed(self, stage: str, key: str) -> bool:
        return stage in self.done and self.done[stage].get("key") != key

    def mark(self, stage: str, key: str, seconds: float, result: Any, outputs: list[Path]) -> None:
        """Record `stage` as done, once every output exists (a VoxdiffError naming the first missing one else)."""
        missing = _missing(outputs)
        if missing:
            raise VoxdiffError(f"stage {stage} ended without writing {missing[0]}; it is not recorded as complete")
        rec = {"key": key, "seconds": seconds, "result": result}
        if isinstance(result, dict) and result.get("note"):
            rec["incomplete"] = True  # cut by the time cap: a rerun continues it
        self.done[stage] = rec
        atomic_write_json(self.file, self.done)

    def forget(self, stages: list[str]) -> None:
        for s in stages:
            self.done.pop(s, None)


def _missing(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not p.is_file()]


def stage_outputs(stage: str, cfg: RunConfig) -> list[Path]:
    """The files a stage must leave (for the later stages and the report) before it counts as complete.

    `cfg` is the resolved config (`resolve`). The trainers' outputs are their last.pt (what a resume and the later
    stages read); the tune stage's result lives in stages.json itself.
    """
    run = Path(cfg.run_dir)
    cats = list(cfg.sample.categories)
    if stage == "data":
        return [voxel_path(cfg.dataset_path, c, s) for c in CATEGORIES for s in SPLITS]
    if stage in ("ae", "ldm"):
        return [run / stage / "last.pt"]
    if stage == "sample":
        return [Path(cfg.sample.save_dir) / f"{c}.npy" for c in cats] + [run / "model" / "ae.pt",
                                                                          run / "model" / "ldm.pt"]
    if stage == "eval":
        out = [run / "oracle" / f"{c}.npy" for c in cats] if cfg.oracle else []
        return out + [run / "baselines" / f"{b}_{c}.npy" for b in ("train", "noise") if b in cfg.baselines
                      for c in cats]
    if stage == "render":
        return [run / "renders" / f"{c}.png" for c in cats] + [run / "renders" / "teaser.png"]
    return []


# ---- stages -------------------------------------------------------------------------------------------------------


def _has_voxels(data: Path) -> bool:
    return all(voxel_path(data, c, s).is_file() for c in CATEGORIES for s in SPLITS)


def stage_data(cfg: RunConfig, external: bool) -> dict[str, Any]:
    """Voxel grids for the run. Given a dataset (`external`): use its grids, or voxelize its PartSeg HDF5 files into
    it; never write procedural shapes there. Otherwise generate the procedural set into {run_dir}/data and voxelize."""
    data = Path(cfg.dataset_path)
    if external:
        if not data.is_dir():
            raise VoxdiffError(f"--dataset_path {data} is not a directory; omit it to generate procedural data into "
                               f"{Path(cfg.run_dir) / 'data'}")
        if not _has_voxels(data):
            if not any(data.glob("*_hdf5_file_list.txt")):
                raise VoxdiffError(f"--dataset_path {data} holds neither {{category}}_voxels_{{split}}.npy files nor "
                                   "PartSeg HDF5 file lists")
            return preprocess(data, data, resolution=cfg.resolution, categories=CATEGORIES, splits=SPLITS,
                              progress=False)
    elif not _has_voxels(data):
        if cfg.data_preset not in COUNT_PRESETS:
            raise VoxdiffError(f"unknown data preset {cfg.data_preset!r}; choose from {', '.join(COUNT_PRESETS)}")
        write_synthetic_partseg(data, COUNT_PRESETS[cfg.data_preset], seed=cfg.seed, progress=False)
        return preprocess(data, data, resolution=cfg.resolution, categories=CATEGORIES, splits=SPLITS, progress=False)
    res = int(open_voxels(voxel_path(data, CATEGORIES[0], "test")).shape[-1])
    if res != cfg.resolution:
        raise VoxdiffError(f"{data} holds {res}³ grids but this run is at {cfg.resolution}³")
    return {"reused": data.name}


def check_data(cfg: RunConfig) -> None:
    """Refuse, before anything is written, data that exists at another resolution than the run's."""
    data = Path(cfg.dataset_path)
    if data.is_dir() and _has_voxels(data):
        res = int(open_voxels(voxel_path(data, CATEGORIES[0], "test")).shape[-1])
        if res != cfg.resolution:
            raise VoxdiffError(f"{data} holds {res}³ grids but this run is at {cfg.resolution}³; use another "
                               "--run_dir (or --dataset_path) for another resolution")


def make_oracle(cfg: RunConfig, category: str, n: int, path: Path) -> Path:
    """A fresh procedural draw of `n` shapes (another seed), voxelized like the data: the best a model could do."""
    chunk = 64
    with atomic_memmap(path, (n, cfg.resolution, cfg.resolution, cfg.resolution)) as out:
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            pts, _ = generate_split(category, m, seed=cfg.seed + ORACLE_SEED_OFFSET, split="test", start=i)
            voxelize_points(pts, cfg.resolution, out=out[i : i + m])
    return path


def make_baselines(cfg: RunConfig, category: str, n: int, out_dir: Path) -> dict[str, Path]:
    """Trivial baselines scored like samples: copies of training shapes, and i.i.d. noise of the training occupancy."""
    train = open_voxels(voxel_path(cfg.dataset_path, category, "train"))
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


def _eval_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def stage_eval(cfg: RunConfig, log: Any, progress: bool = True) -> dict[str, Any]:
    """Score samples, oracle and baselines per category against test+val with the one scorer eval.py uses."""
    run = Path(cfg.run_dir)
    results: dict[str, Any] = {}
    bar = Progress(len(cfg.sample.categories), "eval", unit="category", log=log, enabled=progress)
    for cat in cfg.sample.categories:
        refs = References.load(cfg.dataset_path, cat)
        model = Path(cfg.sample.save_dir) / f"{cat}.npy"
        n = len(open_samples(model))
        sets: dict[str, Path] = {"model": model}
        if cfg.oracle:
            sets["oracle"] = make_oracle(cfg, cat, n, run / "oracle" / f"{cat}.npy")
        for name, path in make_baselines(cfg, cat, n, run / "baselines").items():
            sets[f"baseline_{name}"] = path
        out = score_sets(refs, sets, device=_eval_device(cfg.device), seed=cfg.seed)
        results[cat] = {"provenance": {**out["provenance"], "reference_dir": Path(cfg.dataset_path).name}}
        train, test = (open_voxels(voxel_path(cfg.dataset_path, cat, s)) for s in ("train", "test"))
        results[cat]["memorization"] = {name: copying_check(open_samples(sets[name]), train, test, seed=cfg.seed)
                                        for name in ("model", "baseline_train") if name in sets}
        for name, res in out["sets"].items():
            res["file"] = str(sets[name].relative_to(run)) if sets[name].is_relative_to(run) else str(sets[name])
            results[cat][name] = res
            log.info("eval %s %s: JSD %.5f MMD %.6f COV %.3f 1-NNA %.3f empty %d bloated %s (%.1fs)", cat, name,
                     res["jsd"], res["mmd"], res["cov"], res["nna"], res["n_empty_samples"],
                     res["n_bloated_samples"], res["elapsed_s"])
        bar.update(1)
    bar.close()
    return results


def stage_render(cfg: RunConfig) -> dict[str, str]:
    """PNG sheets per category (data / samples / oracle) and a teaser of samples of every category."""
    run = Path(cfg.run_dir)
    out: dict[str, str] = {}
    for cat in cfg.sample.categories:
        sets = {f"{cat} data": open_voxels(voxel_path(cfg.dataset_path, cat, "test")),
                f"{cat} samples": np.load(Path(cfg.sample.save_dir) / f"{cat}.npy", mmap_mode="r")}
        if (run / "oracle" / f"{cat}.npy").is_file():
            sets[f"{cat} oracle"] = np.load(run / "oracle" / f"{cat}.npy", mmap_mode="r")
        out[cat] = str(render_samples_sheet(sets, run / "renders" / f"{cat}.png", n_per_row=cfg.render_n,
                                            view=CATEGORY_VIEWS.get(cat, DEFAULT_VIEW), seed=cfg.seed).relative_to(run))
    teaser = {cat: np.load(Path(cfg.sample.save_dir) / f"{cat}.npy", mmap_mode="r") for cat in cfg.sample.categories}
    out["teaser"] = str(render_samples_sheet(teaser, run / "renders" / "teaser.png", n_per_row=min(8, cfg.render_n),
                                             view=CATEGORY_VIEWS, seed=cfg.seed).relative_to(run))
    return out


def stage_tune(cfg: RunConfig, progress: bool) -> dict[str, Any]:
    """Pick the guidance scale and threshold on the held-out training shapes (voxdiff.tuning); skipped unless on."""
    if not cfg.tune.enabled:
        return {"skipped": "tune.enabled is off"}
    pipe = LatentVoxelPipeline.from_checkpoints(cfg.sample.ae_ckpt_path, cfg.sample.ldm_ckpt_path,
                                                device=resolve_device(cfg.device), precision=cfg.sample.precision)
    log = get_logger("voxdiff.tune", Path(cfg.run_dir) / "tune.log")
    return tune_sampling(pipe, cfg.dataset_path, cfg.sample.categories, cfg.tune, cfg.resolution, progress, log)


def sampling_settings(cfg: RunConfig) -> dict[str, Any]:
    """The final sampling's settings (after the tune stage's pick), as an exported model stores them."""
    s = cfg.sample
    out = {k: getattr(s, k) for k in SAMPLING_KEYS if hasattr(s, k)}
    if not s.use_cfg:
        out["cfg_scale"], out["guidance_rescale"] = 0.0, 0.0
    return out


def stage_sample(cfg: RunConfig, progress: bool) -> dict[str, Any]:
    """Export the trained pair with its sampling settings to {run_dir}/model (what `from_pretrained` and
    diffusion/sample.py read, and what is shipped), then draw the final samples with those settings."""
    run = Path(cfg.run_dir)
    export_model(resolve_checkpoint_file(cfg.sample.ae_ckpt_path), resolve_checkpoint_file(cfg.sample.ldm_ckpt_path),
                 run / "model", sampling=sampling_settings(cfg))
    out = sample_to_files(cfg.sample, progress=progress)
    out["model"] = "model"
    return out


def _train_stage(train: Any, stage_cfg: Any, run_dir: Path, force: bool) -> dict[str, Any]:
    """Run a trainer: continue an interrupted (or time-capped) run of the same settings, replace one with --force."""
    resume = (run_dir / "last.pt").is_file() and not force
    return train(dataclasses.replace(stage_cfg, resume=resume, overwrite=force))


RERUNNABLE = ("tune", "sample", "eval", "render")  # stages computed from the trained models, cheap to redo
BASELINES = ("train", "noise")  # the trivial sets make_baselines knows


def check_config(cfg: RunConfig) -> None:
    """The run's own settings (the stage configs check theirs when built): a VoxdiffError naming the flag, before
    anything is written."""
    for name in ("seed", "resolution", "render_n"):  # a config.json can hold any JSON value here
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise VoxdiffError(f"--{name} must be an integer; got {value!r}")
    if cfg.seed < 0:  # every stage's seed is the run's (resolve); numpy's own error would name no flag
        raise VoxdiffError(f"--seed must be >= 0; got {cfg.seed}")
    res = cfg.resolution
    if res < 8 or res & (res - 1):
        raise VoxdiffError(f"--resolution must be a power of two >= 8; got {res}")
    if cfg.render_n < 1:
        raise VoxdiffError(f"--render_n must be >= 1; got {cfg.render_n}")
    if cfg.dataset_path is None and cfg.data_preset not in COUNT_PRESETS:
        raise VoxdiffError(f"--data_preset: unknown preset {cfg.data_preset!r}; choose from {', '.join(COUNT_PRESETS)}")
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise VoxdiffError(f"--baselines: unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")


def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES, force: bool = False, command: str = "",
        progress: bool = True, rerun_from: str | None = None) -> dict:
    """Run the stages in order; returns the report dict (also written to report.json / report.md).

    `rerun_from` (one of RERUNNABLE) redoes that stage and every later one even when their records are up to date
    (e.g. to rescore a finished run with a newer scorer), keeping the data and the trained models."""
    check_config(cfg)
    if rerun_from is not None and rerun_from not in RERUNNABLE:
        raise VoxdiffError(f"--rerun_from must be one of {', '.join(RERUNNABLE)} (the trained models are kept; "
                           f"--force retrains everything); got {rerun_from!r}")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise VoxdiffError(f"--run_dir {run_dir} is a file, not a directory")
    if cfg.dataset_path is not None and not Path(cfg.dataset_path).is_dir():
        raise VoxdiffError(f"--dataset_path {cfg.dataset_path} is not a directory; omit it to generate procedural data "
                           f"into {run_dir / 'data'}")
    created = not run_dir.exists()
    try:
        with dir_lock(run_dir, "pipeline"):  # one run per run directory
            return _run(cfg, stages, force, command, progress, rerun_from)
    except BaseException:
        if created and not (run_dir / "stages.json").exists():  # failed before any stage finished: leave nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run(cfg: RunConfig, stages: tuple[str, ...], force: bool, command: str, progress: bool,
         rerun_from: str | None) -> dict:
    """The body of `run`, with the run directory locked."""
    external = cfg.dataset_path
    if external is not None and Path(external).resolve() == (Path(cfg.run_dir) / "data").resolve():
        external = None  # the run's own procedural data (a config.json written by this run names it)
    cfg = resolve(cfg)
    run_dir = Path(cfg.run_dir)
    ext = str(Path(external).resolve()) if external else None
    # ---- every refusal first: a refused rerun writes nothing (not config.json, not the log) ----
    done, order, wanted = _plan_stages(cfg, stages, force, rerun_from, ext)
    # ---- then act ----
    for sub in ("data", "oracle", "baselines", "renders"):  # the lock is held: temp files here are a killed run's
        if (run_dir / sub).is_dir():
            remove_leftovers(run_dir / sub)
    threads = choose_run_threads(cfg)  # every stage then uses this count; config.json records it
    cfg = resolve(dataclasses.replace(cfg, threads=str(threads.threads)))
    # the run's own data is not written as a --dataset_path: `--config` reruns regenerate nothing and move with the run
    atomic_write_json(run_dir / "config.json", to_dict(dataclasses.replace(cfg, dataset_path=external)))
    if done.unreadable is not None:  # the rebuilt records replace the unreadable file at once
        atomic_write_json(done.file, done.done)
    log = get_logger("voxdiff.runner", run_dir / "pipeline.log")
    log.info("pipeline %s stages %s", cfg.name, stages)
    log.info("threads %d: %s", threads.threads, threads.reason)
    report: dict[str, Any] = {"name": cfg.name, "version": __version__, "command": command,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
                              "config": to_dict(cfg), "timings": {}, "stages": {},
                              "runtime": {"pipeline": {"threads": threads.record()}}}
    actions = {
        "data": lambda c: stage_data(c, external is not None),
        "ae": lambda c: _train_stage(lambda x: train_autoencoder(x, progress), c.ae, run_dir / "ae", force),
        "ldm": lambda c: _train_stage(lambda x: train_ldm(x, progress), c.ldm, run_dir / "ldm", force),
        "tune": lambda c: _limited(threads.threads, stage_tune, c, progress),
        "sample": lambda c: stage_sample(c, progress),
        "eval": lambda c: _limited(threads.threads, stage_eval, c, log, progress),
        "render": lambda c: stage_render(c),
    }
    ran = False  # once a stage runs, every later stage runs again (its inputs changed)
    for stage in order:
        key, outputs = stage_key(stage, cfg, ext), stage_outputs(stage, cfg)
        if not ran and done.complete(stage, key, outputs):
            report["stages"][stage] = done.done[stage]["result"]
            report["timings"][stage] = done.done[stage]["seconds"]
            log.info("stage %s: up to date, skipped", stage)
        elif stage in wanted:
            rec = done.done.get(stage, {})
            if not ran and rec.get("key") == key and not rec.get("incomplete"):
                lost = _missing(outputs)[0]
                print(f"notice: stage {stage} was recorded complete but {lost} is missing; running it again",
                      file=sys.stderr)
                log.info("stage %s: recorded complete but %s is missing", stage, lost)
            done.forget(order[order.index(stage) :])
            log.info("stage %s: running", stage)
            t0 = time.perf_counter()
            out = actions[stage](cfg)
            dt = time.perf_counter() - t0
            report["timings"][stage] = dt
            report["stages"][stage] = _jsonable(out)
            done.mark(stage, key, dt, report["stages"][stage], outputs)
            log.info("stage %s done in %.1fs", stage, dt)
            ran = True
            if isinstance(out, dict) and out.get("note"):
                print(f"warning: {out['note']}", file=sys.stderr)
        if stage == "tune" and stage in report["stages"]:
            cfg = apply_tune(cfg, report["stages"]["tune"])
    _summarise_stages(cfg, report)
    if "report" in stages:
        write_report(cfg, report)
    return report


def _plan_stages(cfg: RunConfig, stages: tuple[str, ...], force: bool, rerun_from: str | None,
                 ext: str | None) -> tuple[_Stages, list[str], list[str]]:
    """The stage records, the stage order and the stages asked for, after every refusal `_run` makes before it
    writes anything (a changed AE/LDM setting, unusable data): a refused rerun leaves the run directory as it was."""
    run_dir = Path(cfg.run_dir)
    done = _Stages(run_dir, force)
    order = [s for s in STAGES if s != "report"]
    if rerun_from is not None:
        done.forget(order[order.index(rerun_from) :])
    wanted = [s for s in order if s in stages]
    done.recover(cfg, ext)  # only when stages.json could not be read
    done.update_legacy("ldm", stage_key("ldm", cfg, ext), cfg)
    # a stage trained for other settings is refused, not silently replaced: its outputs are someone's results
    changed = [s for s in wanted if s in ("ae", "ldm") and done.changed(s, stage_key(s, cfg, ext))]
    if changed:
        raise VoxdiffError(f"stage {changed[0]}: the settings changed since {run_dir / changed[0]} was trained; pass "
                           "--force to rerun every stage, or use another --run_dir")
    if "data" in wanted:
        check_data(cfg)
    return done, order, wanted


def _summarise_stages(cfg: RunConfig, report: dict[str, Any]) -> None:
    """Fill the report's run-wide parts from the stage results (in place): the final config, the stages' notes and
    runtimes, the eval results with their goal checks, the renders; kept apart from `_run` so the loop stays short."""
    report["config"] = to_dict(cfg)
    stages_out = report["stages"]
    report["notes"] = [out["note"] for out in stages_out.values() if isinstance(out, dict) and out.get("note")]
    for stage in ("ae", "ldm", "sample"):
        rt = stages_out.get(stage, {}).get("runtime") if isinstance(stages_out.get(stage), dict) else None
        if rt:
            report["runtime"][stage] = rt
            if rt.get("busy"):
                report["notes"].append(rt["busy"])
    if "eval" in stages_out:
        report["eval"] = stages_out["eval"]
        for res in report["eval"].values():
            res["goal"] = goal_check(res, cfg.goals)
    if "render" in stages_out:
        report["renders"] = stages_out["render"]


def choose_run_threads(cfg: RunConfig) -> ThreadChoice:
    """The run's thread count: pinned by `cfg.threads`, or (auto, on a CPU) timed once on a training step of the
    preset's AE and of its U-Net at their batch sizes, random inputs, bf16 autocast where the CPU has it (a speed
    measurement only: each trainer checks its precision itself). Draws nothing from the global RNGs."""
    device = resolve_device(cfg.device)
    if cfg.threads != "auto" or device.type != "cpu" or len(candidates(available_cores())) == 1:
        return choose_threads(cfg.threads, None, device)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ae, unet = VoxelAutoencoder(cfg.ae.model), UNet3D(cfg.ldm.model)
        res, b, bz = cfg.ae.model.resolution, max(1, cfg.ae.batch_size), max(1, cfg.ldm.batch_size)
        x = (torch.rand(b, 1, res, res, res) > 0.95).float()
        z = torch.randn(bz, *ae.latent_shape)
        t, y = torch.randint(0, 1000, (bz,)), torch.randint(0, len(CATEGORIES), (bz,))
        dtype = torch.bfloat16 if cpu_has_bf16() else None

        def step() -> None:
            with autocast(device, dtype):
                loss = F.binary_cross_entropy_with_logits(ae(x).float(), x) + F.mse_loss(unet(z, t, y).float(), z)
            loss.backward()

        return choose_threads("auto", step, device)


def _limited(threads: int, fn: Any, *args: Any) -> Any:
    """A stage run with at most `threads` threads in torch and in numpy's BLAS (voxdiff.threads.thread_limit)."""
    with thread_limit(threads):
        return fn(*args)


def _jsonable(obj: Any) -> Any:
    """Drop what JSON can't hold (tensors, paths become strings)."""
    return json.loads(json.dumps(obj, default=lambda o: str(o) if isinstance(o, Path) else None))
