"""Checkpoints: plain dicts of state_dicts, the network's own config, typed metadata, step and RNG states.

Layout (format 2): {"format": 2, "version", "kind": "autoencoder" | "ldm", "model_config", "train_config", "model",
"ema", "optimizer", "step", "rng", "meta"}. A network is rebuilt from `model_config` alone (nanoGPT's `model_args`);
`train_config` is kept for resuming and provenance; `meta` is an `AEMeta` / `LDMMeta` (what later stages need: the
AE's latent scale, calibrated threshold, training occupancy and held-out slice; the LDM's noise schedule, the AE it
was trained on and the sampling settings a tune stage picked for it). Loaded with `torch.load(weights_only=True)`:
modules are never pickled, and `module.` / `_orig_mod.` prefixes are stripped on save so a DDP or torch.compile run
loads into a plain model.
Format 1 files (voxdiff 0.1) are upgraded in memory when loaded: they sample and decode, but cannot be resumed.

Every file carries `digest`: a SHA-256 of the tensors of `model`, `ema` and `optimizer` (each separately: dtype,
shape and bytes, in key order), checked when loaded, so a file changed after it was written (a flipped bit, a
hand-edited or half-copied tensor inside an intact zip) is refused as corrupt instead of sampling garbage. Loaded
weights must also be finite. Files written before the digest existed load unchecked (their weights are still checked
for NaN / inf).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from voxdiff import __version__
from voxdiff.config import CATEGORIES, AEConfig, SampleConfig, SchedulerConfig, UNetConfig, from_dict, to_dict
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_path, file_sha256
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D

FORMAT = 2
Kind = Literal["autoencoder", "ldm"]
_PREFIXES = ("module.", "_orig_mod.")
DIGESTED = ("model", "ema", "optimizer")  # the parts of a checkpoint whose tensors the digest covers
DIGEST_OF = "sha256 over each part's tensors (dtype, shape, raw bytes) in key order"
# The sampling settings an LDM checkpoint may store (`LDMMeta.sampling`): SampleConfig's fields of the same names.
SAMPLING_KEYS = ("sampler", "steps", "eta", "cfg_scale", "guidance_rescale", "clamp_latents", "binarize", "threshold",
                 "topk")


@dataclass
class AEMeta:
    """What an AE checkpoint carries besides weights. The latent scale lives here, and only here (the LDM and the
    sampler read it from the AE, as diffusers keeps `scaling_factor` with the VAE)."""

    threshold: float = 0.5  # maximises mean per-shape IoU of reconstructions on the held-out slice
    occupancy: dict[str, dict[str, float]] = field(default_factory=dict)  # resolution -> category -> mean voxels
    max_voxels: dict[str, dict[str, int]] = field(default_factory=dict)  # resolution -> category -> largest count
    latent_mean: list[float] | None = None  # per channel, over the training shapes
    latent_std: list[float] | None = None  # per channel (population std)
    latent_absmax: list[float] | None = None  # per channel: the largest |z − mean| / std over the training shapes
    holdout: dict[str, list[int]] = field(default_factory=dict)  # category -> held-out TRAIN rows
    pos_weight: float | None = None
    best_iou: float = -1.0
    heldout: dict[str, float] = field(default_factory=dict)  # the latest held-out validation
    final: dict[str, float] = field(default_factory=dict)  # held-out metrics at the end (Chamfer, top-k)
    runtime: dict[str, Any] = field(default_factory=dict)  # precision, threads and skipped steps of the run (and why)


@dataclass
class LDMMeta:
    """What an LDM checkpoint carries besides weights."""

    ae_sha256: str = ""  # content hash of the AE checkpoint it was trained on
    ae_file: str = ""  # that file's name, for messages
    latent_shape: list[int] = field(default_factory=list)
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    use_cfg: bool = True  # trained with label dropout: guidance is available
    scheduler: dict[str, Any] = field(default_factory=lambda: to_dict(SchedulerConfig()))
    ema_n_averaged: int = 0
    smooth_loss: float | None = None
    best_heldout_loss: float = float("inf")
    holdout: dict[str, list[int]] = field(default_factory=dict)
    num_train: int = 0
    runtime: dict[str, Any] = field(default_factory=dict)  # precision, threads and skipped steps of the run (and why)
    sampling: dict[str, Any] = field(default_factory=dict)  # settings a tune stage picked (SAMPLING_KEYS); missing
    # keys: the library defaults. Samplers use them where the caller leaves a setting unset


@dataclass
class Checkpoint:
    """A loaded checkpoint. `meta` is typed by kind; `train_config` is the raw dict of the run's config."""

    kind: Kind
    model_config: dict[str, Any]
    model: dict[str, Any]
    meta: AEMeta | LDMMeta
    train_config: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    step: int = 0
    rng: dict[str, Any] | None = None
    version: str = __version__
    format: int = FORMAT
    file: Path | None = None


def clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Strip DDP/compile prefixes and move tensors to CPU."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k = k[len(p) :]
                    changed = True
        out[k] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def get_rng_state() -> dict[str, Any]:
    """All global RNG states in a weights_only-loadable form (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run on a GPU machine leaves CUDA alone
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` saved (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():  # as many devices as both the run and this machine have
        saved = [state["cuda"]] if isinstance(state["cuda"], torch.Tensor) else list(state["cuda"])
        for i, s in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def tensor_digest(state: Any) -> str:
    """Hex SHA-256 of the tensors in a (nested) state dict: each tensor's key path, dtype, shape and raw bytes, in key
    order (the order a state_dict keeps through save and load). Non-tensor values (hyper-parameters) are left out."""
    h = hashlib.sha256()
    _feed(h, state, "")
    return h.hexdigest()


def _feed(h: Any, obj: Any, key: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(obj.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _feed(h, v, f"{key}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _feed(h, v, f"{key}/{i}")


def checkpoint_digest(payload: dict[str, Any]) -> dict[str, str]:
    """{part: tensor_digest} for the parts of a checkpoint payload that are present (DIGESTED)."""
    return {part: tensor_digest(payload[part]) for part in DIGESTED if payload.get(part) is not None}


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write a checkpoint atomically (temp file + rename)."""
    payload = {
        "format": FORMAT,
        "version": __version__,
        "kind": ckpt.kind,
        "model_config": ckpt.model_config,
        "train_config": ckpt.train_config,
        "model": clean_state_dict(ckpt.model),
        "ema": clean_state_dict(ckpt.ema) if ckpt.ema is not None else None,
        "optimizer": ckpt.optimizer,
        "step": int(ckpt.step),
        "rng": ckpt.rng,
        "meta": dataclasses.asdict(ckpt.meta),
    }
    payload["digest"] = {"of": DIGEST_OF, **checkpoint_digest(payload)}
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:  # a file object: the archive's inner name is fixed, so equal payloads give
                torch.save(payload, f)  # equal bytes (a path would name it after the random temp file)
        except RuntimeError as e:  # torch reports a full disk or a failed write as a RuntimeError
            first = str(e).splitlines()[0] if str(e) else "write failed"
            raise OSError(errno.EIO, f"could not write the checkpoint ({first}); is the disk full?", str(path)) \
                from None


def resolve_checkpoint_file(path: str | os.PathLike[str], prefer: str = "best") -> Path:
    """Accept a checkpoint file or a run directory (then `{prefer}.pt`, falling back to `last.pt`)."""
    p = Path(path)
    if p.is_dir():
        for name in (f"{prefer}.pt", "last.pt", "best.pt"):
            if (p / name).is_file():
                return p / name
        raise VoxdiffError(f"no checkpoint (best.pt/last.pt) in directory {p}")
    if not p.is_file():
        raise VoxdiffError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | os.PathLike[str], kind: Kind | None = None, map_location: Any = "cpu",
                    prefer: str = "best") -> Checkpoint:
    """Load a voxdiff checkpoint safely (weights_only=True) and verify it: refuse pickled payloads, files that are
    corrupt or not checkpoints, checkpoints of another kind, tensors that differ from the digest written with them,
    and weights that are not finite. Every refusal is one VoxdiffError line naming the file."""
    file = resolve_checkpoint_file(path, prefer)
    raw = _torch_load(file, map_location)
    if not isinstance(raw, dict) or raw.get("format") not in (1, FORMAT) or "model" not in raw:
        raise VoxdiffError(f"{file} is corrupt or not a voxdiff checkpoint (format {FORMAT} expected)")
    if kind is not None and raw.get("kind") != kind:
        raise VoxdiffError(f"{file} is a {raw.get('kind')!r} checkpoint, expected {kind!r}")
    verify_payload(raw, file)
    try:
        ckpt = _from_v1(raw) if raw["format"] == 1 else _from_payload(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise VoxdiffError(f"{file} has an unreadable {raw.get('kind')} config or metadata ({e}); it was not "
                           "written by this version of voxdiff") from None
    ckpt.file = file
    return ckpt


def _torch_load(file: Path, map_location: Any) -> Any:
    """torch.load(weights_only=True) with every failure as one line naming the file.

    A damaged file can make the unpickler fail in any way (UnpicklingError, RuntimeError from the zip reader, but
    also IndexError or KeyError from garbage opcodes), so every exception but an OSError (the file could not be read
    at all: reported as such) means "corrupt". torch's own text is cut to its reason: it advises re-running with
    weights_only=False, which no one should do for a file that failed to load.
    """
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring: any failure of the unpickler means a bad file
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise VoxdiffError(f"{file} is not a safe voxdiff checkpoint: it holds pickled Python objects "
                               f"({_load_reason(e)}), which are never loaded") from None
        raise VoxdiffError(f"{file} is corrupt or not a voxdiff checkpoint ({_load_reason(e)})") from None


def _load_reason(e: BaseException) -> str:
    """The reason in a torch.load error, without torch's advice (weights_only=False, filing an issue)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in rest.splitlines() if line.strip()), "")
    else:
        reason = text.splitlines()[0].strip() if text.strip() else ""
        if "central directory" in reason:
            reason = "truncated, or not a zip archive: no central directory"
        else:
            reason = reason.split(". ")[0]
    if not reason or "weights_only" in reason:
        reason = "unreadable"
    return f"{type(e).__name__}: {reason}"


def verify_payload(raw: dict[str, Any], file: Path) -> None:
    """Check a loaded payload: its tensors against the digest written with them (when it has one), and its model /
    EMA weights for NaN and inf. A VoxdiffError naming the file otherwise."""
    for part in ("model", "ema"):
        if raw.get(part) is not None and not isinstance(raw[part], dict):
            raise VoxdiffError(f"{file} is corrupt or not a voxdiff checkpoint ('{part}' is not a state dict)")
    stored = raw.get("digest")
    if stored is not None:
        if not isinstance(stored, dict):
            raise VoxdiffError(f"{file} is corrupt (its digest record is unreadable)")
        for part in DIGESTED:
            if part in stored and (raw.get(part) is None or tensor_digest(raw[part]) != stored[part]):
                raise VoxdiffError(f"{file} is corrupt: its {part} tensors do not match the digest written with them "
                                   "(the file changed after it was saved); restore it from a copy or retrain")
    for part in ("model", "ema"):
        for key, value in (raw.get(part) or {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                n = int((~torch.isfinite(value)).sum())
                raise VoxdiffError(f"{file}: its {part} weights hold {n} non-finite value(s) (NaN or inf) in "
                                   f"{key!r}; the checkpoint is unusable (a damaged file or a diverged run)")


def _from_payload(raw: dict[str, Any]) -> Checkpoint:
    meta_cls = AEMeta if raw["kind"] == "autoencoder" else LDMMeta
    names = {f.name for f in dataclasses.fields(meta_cls)}
    meta = meta_cls(**{k: v for k, v in (raw.get("meta") or {}).items() if k in names})
    if not raw.get("model_config"):
        raise ValueError("empty model_config")
    return Checkpoint(kind=raw["kind"], model_config=raw["model_config"], train_config=raw.get("train_config") or {},
                      model=raw["model"], ema=raw.get("ema"), optimizer=raw.get("optimizer"), step=raw["step"],
                      rng=raw.get("rng"), meta=meta, version=raw.get("version", "?"), format=raw["format"])


def _from_v1(raw: dict[str, Any]) -> Checkpoint:
    """Format 1 (voxdiff 0.1: whole training config + untyped `extra`) -> format 2, for loading models."""
    cfg, extra = raw.get("config") or {}, raw.get("extra") or {}
    if not cfg.get("model"):
        raise ValueError("empty config")
    if raw["kind"] == "autoencoder":
        meta: AEMeta | LDMMeta = AEMeta(
            threshold=float(extra.get("threshold", 0.5)), occupancy=extra.get("occupancy") or {},
            latent_mean=extra.get("latent_mean"), latent_std=extra.get("latent_std"),
            pos_weight=extra.get("pos_weight"), best_iou=float(extra.get("best_iou", -1.0)),
            heldout=extra.get("val") or {})
    else:
        meta = LDMMeta(
            ae_sha256=extra.get("ae_hash", ""), ae_file=Path(extra.get("ae_ckpt_path", "")).name,
            latent_shape=list(extra.get("latent_shape", [])), categories=list(cfg.get("categories", CATEGORIES)),
            use_cfg=bool(cfg.get("use_cfg", True)), scheduler=cfg.get("scheduler") or to_dict(SchedulerConfig()),
            ema_n_averaged=int(extra.get("ema_n_averaged", 0)), smooth_loss=extra.get("smooth_loss"),
            best_heldout_loss=float(extra.get("best_metric", float("inf"))), num_train=int(extra.get("num_train", 0)))
    return Checkpoint(kind=raw["kind"], model_config=cfg["model"], train_config={}, model=raw["model"],
                      ema=raw.get("ema"), optimizer=None, step=int(raw.get("step", 0)), rng=None, meta=meta,
                      version=raw.get("version", "0.1.0"), format=1)


def check_resumable(ckpt: Checkpoint) -> None:
    """Refuse to resume from a format-1 checkpoint (its optimizer and RNG layout predate this version)."""
    if ckpt.format != FORMAT:
        raise VoxdiffError(f"{ckpt.file} was written by voxdiff {ckpt.version} (checkpoint format {ckpt.format}): it "
                           "loads for sampling, but a run cannot resume from it; start a new run in another directory")


def load_autoencoder(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[VoxelAutoencoder, Checkpoint]:
    """Rebuild the AE (eval mode) from a checkpoint file or run dir, from its model config alone."""
    ckpt = load_checkpoint(path, kind="autoencoder", map_location=map_location)
    model = VoxelAutoencoder(_model_config(AEConfig, ckpt))
    _load_state(model, ckpt.model, ckpt)
    return model.eval(), ckpt


def load_unet(path: str | os.PathLike[str], use_ema: bool = True,
              map_location: Any = "cpu") -> tuple[UNet3D, Checkpoint]:
    """Rebuild the UNet (eval mode) from an LDM checkpoint file or run dir; EMA weights unless `use_ema=False`."""
    ckpt = load_checkpoint(path, kind="ldm", map_location=map_location)
    model = UNet3D(_model_config(UNetConfig, ckpt))
    _load_state(model, ckpt.ema if use_ema and ckpt.ema is not None else ckpt.model, ckpt)
    return model.eval(), ckpt


def _model_config(cls: type, ckpt: Checkpoint) -> Any:
    try:
        return from_dict(cls, ckpt.model_config)
    except (TypeError, ValueError) as e:
        raise VoxdiffError(f"{ckpt.file}: unreadable {ckpt.kind} model config ({e})") from None


def _load_state(model: torch.nn.Module, state: dict[str, Any], ckpt: Checkpoint) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise VoxdiffError(f"{ckpt.file}: weights do not fit the {ckpt.kind} config it records ({first})") from None


def check_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Validated sampling settings to store in an LDM checkpoint: only SAMPLING_KEYS, each a plain JSON value that
    SampleConfig accepts (a ValueError naming the setting otherwise). Returns a plain dict (numpy scalars unwrapped:
    the file must load with weights_only=True)."""
    if not isinstance(sampling, Mapping):
        raise ValueError(f"sampling settings must be a mapping; got {type(sampling).__name__}")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown}; known: {', '.join(SAMPLING_KEYS)}")
    defaults = SampleConfig()
    out: dict[str, Any] = {}
    for key, value in sampling.items():
        value = value.item() if isinstance(value, (np.generic, torch.Tensor)) else value
        default = getattr(defaults, key)
        kind = int if default is None else type(default)  # steps and topk: an int, or None
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = (value is None or isinstance(value, int)) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a finite number"}.get(kind, "a string")
            raise ValueError(f"sampling setting {key} must be {what}; got {value!r}")
        out[key] = value
    dataclasses.replace(defaults, **out)  # SampleConfig's own checks: ranges and choices
    return json.loads(json.dumps(out))  # plain JSON values, fresh objects: equal settings pickle to equal bytes


def export_model(ae_path: str | os.PathLike[str], ldm_path: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str], *, sampling: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write a trained AE + LDM as a compact pair for sampling: `{out_dir}/ae.pt` and `{out_dir}/ldm.pt`.

    Weights, model configs, training configs and metadata are kept; optimizer and RNG states go, and the LDM keeps
    its EMA weights as its only weights. The LDM's link to its AE is re-pointed to the exported AE's content hash,
    so the pair loads together without a mismatch warning. Not resumable (nothing to resume with). `sampling` (the
    settings a tune stage picked, see `check_sampling`) replaces the LDM's stored sampling settings; None keeps them.
    """
    stored = check_sampling(sampling) if sampling is not None else None  # refused before anything is written
    out = Path(out_dir)
    ae = load_checkpoint(ae_path, kind="autoencoder")
    ldm = load_checkpoint(ldm_path, kind="ldm")
    ae_out, ldm_out = out / "ae.pt", out / "ldm.pt"
    save_checkpoint(ae_out, dataclasses.replace(ae, optimizer=None, rng=None, ema=None))
    meta = dataclasses.replace(ldm.meta, ae_sha256=file_sha256(ae_out), ae_file=ae_out.name)
    if stored is not None:
        meta.sampling = stored
    weights = ldm.ema if ldm.ema is not None else ldm.model
    save_checkpoint(ldm_out, dataclasses.replace(ldm, model=weights, ema=None, optimizer=None, rng=None, meta=meta))
    return ae_out, ldm_out


def write_sampling_settings(ldm_path: str | os.PathLike[str], sampling: Mapping[str, Any]) -> Path:
    """Store `sampling` (see `check_sampling`) as the sampling settings of an LDM checkpoint file, in place.

    For the stage runner after a tune stage, and for an exported model. Only `meta.sampling` changes: the weights,
    configs, version and tensor digest are written back as they were loaded (the file is verified first, so a damaged
    one is never rewritten as if it were sound), into a temporary file that is loaded and verified again before it
    replaces the original (atomic: readers see the old file or the new one). Returns the file.
    """
    stored = check_sampling(sampling)
    file = Path(ldm_path)
    if not file.is_file():
        raise VoxdiffError(f"LDM checkpoint file not found: {file}" + (" (a directory: name the file)"
                                                                        if file.is_dir() else ""))
    raw = _torch_load(file, "cpu")
    if not isinstance(raw, dict) or raw.get("format") not in (1, FORMAT) or "model" not in raw:
        raise VoxdiffError(f"{file} is corrupt or not a voxdiff checkpoint (format {FORMAT} expected)")
    if raw.get("kind") != "ldm":
        raise VoxdiffError(f"{file} is a {raw.get('kind')!r} checkpoint, expected 'ldm'")
    if raw["format"] != FORMAT:
        raise VoxdiffError(f"{file} is a format-{raw['format']} checkpoint (voxdiff {raw.get('version', '0.1')}); "
                           "export it with export_model first, then store its sampling settings")
    verify_payload(raw, file)
    raw["meta"] = {**(raw.get("meta") or {}), "sampling": stored}
    with atomic_path(file) as tmp:
        try:
            with open(tmp, "wb") as f:  # fixed inner archive name, as in save_checkpoint
                torch.save(raw, f)
        except RuntimeError as e:  # as in save_checkpoint: a full disk or a failed write
            first = str(e).splitlines()[0] if str(e) else "write failed"
            raise OSError(errno.EIO, f"could not write the checkpoint ({first}); is the disk full?", str(file)) \
                from None
        load_checkpoint(tmp, kind="ldm")  # the digest and finite checks hold for what replaces the file
    return file
