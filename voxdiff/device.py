"""Torch runtime setup: device choice from a flag, seeding, and flushing denormals on CPU.

Standard library + numpy at import time; torch is imported lazily so that importers (eval.py, visualize.py) start
without torch. Imports only voxdiff.errors.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from voxdiff.errors import VoxdiffError


def resolve_device(name: str | None = "auto") -> Any:
    """torch.device from a flag: 'auto'/None -> cuda when available, else cpu; refuses cuda when there is none."""
    import torch  # lazily, like every torch import here: eval.py and visualize.py start without torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise VoxdiffError(f"invalid --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VoxdiffError(f"--device {name} requested but CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VoxdiffError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global generators."""
    import torch  # lazily: see resolve_device

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flush_denormals(device: Any) -> None:
    """On CPU, compute with subnormal floats flushed to zero.

    Weights, activations and gradients that drift into the subnormal range make x86 convolution kernels many times
    slower, so without this a CPU training run slows down part-way through. Deterministic; the values it changes are
    below 1.2e-38. A no-op for other devices.
    """
    import torch  # lazily: see resolve_device

    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)
