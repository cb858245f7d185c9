"""Mixed precision: which autocast dtype a setting means on this device, and the context that applies it.

Shared by training (forward passes) and sampling (the U-Net's forward in the reverse loop); a leaf module (torch).
bf16 needs no loss scaling (its exponent range is fp32's), and on CPUs with native bf16 instructions oneDNN runs its
convolutions about twice as fast as fp32 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from voxdiff.config import Precision, check_literal


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16), where oneDNN runs bf16
    convolutions faster than fp32; without them bf16 is emulated and slower."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch builds
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a `precision` setting: None (fp32) or torch.bfloat16.

    "auto" is bf16 on CUDA devices that support it and on CPUs with native bf16 (see `cpu_has_bf16`), fp32 elsewhere.
    bf16 needs no loss scaling (unlike fp16): its exponent range is fp32's.
    """
    check_literal(precision, Precision, "precision")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Mixed-precision context for forward passes: `dtype` autocast on `device`, a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
