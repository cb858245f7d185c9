"""Checkpoints: a plain dict of state_dicts, a JSON-able config, step and RNG states; loaded with weights_only=True.

Layout (habit 7 of ARCHITECTURE.md): {"format": 1, "version", "kind", "config", "model", "ema", "optimizer", "step",
"epoch", "rng", "extra"}. Modules are never pickled; `module.` / `_orig_mod.` prefixes are stripped on save so a
checkpoint from DDP or torch.compile loads into a plain model.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxdiff import __version__
from voxdiff.utils import VoxdiffError, atomic_path

FORMAT = 1
_PREFIXES = ("module.", "_orig_mod.")


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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` saved (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    kind: str,
    config: dict[str, Any],
    model: dict[str, Any],
    ema: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
    step: int = 0,
    epoch: int = 0,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temp file + rename)."""
    payload = {
        "format": FORMAT,
        "version": __version__,
        "kind": kind,
        "config": config,
        "model": clean_state_dict(model),
        "ema": clean_state_dict(ema) if ema is not None else None,
        "optimizer": optimizer,
        "step": int(step),
        "epoch": int(epoch),
        "rng": rng,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


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


def load_checkpoint(
    path: str | os.PathLike[str], kind: str | None = None, map_location: Any = "cpu", prefer: str = "best"
) -> dict[str, Any]:
    """Load a voxdiff checkpoint safely (weights_only=True); refuse pickled payloads and checkpoints of another kind."""
    file = resolve_checkpoint_file(path, prefer)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise VoxdiffError(f"{file} is not a safe voxdiff checkpoint (weights_only load refused: {first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise VoxdiffError(f"{file} could not be read as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise VoxdiffError(f"{file} is not a voxdiff checkpoint (format {FORMAT} expected)")
    if kind is not None and ckpt.get("kind") != kind:
        raise VoxdiffError(f"{file} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt
