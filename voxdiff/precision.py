"""Mixed precision: which autocast dtype a setting means *on this machine*, checked where it runs, and the context
that applies it.

Shared by training (forward passes) and sampling (the U-Net's forward in the reverse loop); a leaf module (torch).
bf16 needs no loss scaling (its exponent range is fp32's) and is faster than fp32 on CPUs with native bf16
instructions. But a fast kernel is not always a right one: on some CPUs of the same kind, oneDNN's bf16 Conv3d
backward at a 2³ input returns garbage in a third of its calls, while other machines compute it exactly. So "auto" never
trusts the CPU's feature flags alone: it runs the run's own network (forward and backward, the real batch shapes) in
bf16 and in fp32 and takes bf16 only when every gradient agrees (`check_bf16`). The choice and its reason are recorded
with the run (`PrecisionChoice.record`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from voxdiff.config import Precision, check_literal

# A bf16 gradient is "wrong" when its relative L2 error against fp32 exceeds this. Right kernels stay near bf16's
# rounding (a few 1e-3, up to a few 1e-2 through a deep network); the failure seen in the field is off by 1e30.
BF16_TOLERANCE = 0.25
# Trials of the check: a kernel that fails in 30 % of its calls passes all 20 with probability 0.7^20 < 0.1 %.
BF16_TRIALS = 20

# A step function of the check: runs the network once in `dtype` autocast (None: fp32) and returns the tensors to
# compare (output and parameter gradients), detached, in float32.
ProbeStep = Callable[[torch.dtype | None], Sequence[torch.Tensor]]


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16); without them bf16 is
    emulated and slower than fp32, so "auto" does not even try it."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch builds
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


@dataclass
class PrecisionChoice:
    """The dtype a run uses, why, and the check that decided it (JSON-able through `record`)."""

    setting: str  # what was asked: auto, fp32, bf16
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    reason: str
    check: dict[str, Any] = field(default_factory=dict)  # trials, worst relative error, bad trials, seconds

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def record(self) -> dict[str, Any]:
        return {"precision": self.name, "setting": self.setting, "reason": self.reason, **self.check}


def check_bf16(step: ProbeStep, trials: int = BF16_TRIALS, tolerance: float = BF16_TOLERANCE,
               names: Sequence[str] | None = None) -> dict[str, Any]:
    """Run `step` once in fp32 and `trials` times in bf16; compare every returned tensor.

    Returns {"ok", "trials", "bad_trials", "worst_rel_error", "worst_tensor", "seconds"}; ok is False as soon as one
    trial has a non-finite value or a relative L2 error (‖bf16 − fp32‖ / ‖fp32‖) above `tolerance`. The same inputs
    are used in every trial: the failures this guards against are per call, not per input.
    """
    t0 = time.perf_counter()
    ref = [t.float() for t in step(None)]
    worst, worst_i, bad = 0.0, 0, 0
    for _ in range(trials):
        got = step(torch.bfloat16)
        trial_bad = False
        for i, (a, b) in enumerate(zip(got, ref)):
            a = a.float()
            if not bool(torch.isfinite(a).all()):
                err = math.inf
            else:
                err = float((a - b).norm() / b.norm().clamp_min(1e-12))
            if err > worst:
                worst, worst_i = err, i
            trial_bad |= not err <= tolerance
        bad += trial_bad
    label = names[worst_i] if names is not None and worst_i < len(names) else f"tensor {worst_i}"
    return {"ok": bad == 0, "trials": trials, "bad_trials": bad, "worst_rel_error": worst, "worst_tensor": label,
            "tolerance": tolerance, "seconds": round(time.perf_counter() - t0, 3)}


def gradient_probe(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]
                   ) -> tuple[ProbeStep, list[str]]:
    """A `check_bf16` step for training: forward and backward of a private copy of `model` (eval mode, so no dropout
    draws from the global RNG; the copy keeps the real model's gradients and BatchNorm statistics untouched), returning
    the loss and every parameter's gradient. `loss_fn(net)` computes the loss on fixed inputs."""
    net = copy.deepcopy(model).eval()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    def step(dtype: torch.dtype | None) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        device = params[0][1].device
        with autocast(device, dtype):
            loss = loss_fn(net)
        loss.float().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
        return [loss.detach().float().reshape(1), *[g.detach().float() for g in grads]]

    return step, ["loss", *[n for n, _ in params]]


def forward_probe(model: torch.nn.Module, forward: Callable[[torch.nn.Module], torch.Tensor]) -> ProbeStep:
    """A `check_bf16` step for inference: the output of `forward(model)` under no_grad."""

    @torch.no_grad()
    def step(dtype: torch.dtype | None) -> list[torch.Tensor]:
        device = next(model.parameters()).device
        with autocast(device, dtype):
            return [forward(model).float()]

    return step


def choose_precision(precision: Precision, device: torch.device, step: ProbeStep | None = None,
                     names: Sequence[str] | None = None, trials: int = BF16_TRIALS) -> PrecisionChoice:
    """The precision a run uses on `device`, verified with `step` (see `check_bf16`) wherever bf16 is in question.

    - "fp32": fp32, unchecked.
    - "bf16": bf16 after the check; a ValueError (the caller words it for its command line) when the check fails.
    - "auto": fp32 on CPUs without native bf16 and on CUDA devices without bf16; elsewhere bf16 if and only if the
      check passes on this machine, for this network, now. Without a `step`, "auto" is fp32 (nothing was verified).
    RNG-neutral: the check draws no numbers from the global generators.
    """
    check_literal(precision, Precision, "precision")
    if precision == "fp32":
        return PrecisionChoice("fp32", None, "asked for fp32")
    if precision == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return PrecisionChoice("auto", None, "this CUDA device has no bf16")
        if device.type == "cpu" and not cpu_has_bf16():
            return PrecisionChoice("auto", None, "this CPU has no native bf16 (it would be emulated and slower)")
        if device.type not in ("cpu", "cuda"):
            return PrecisionChoice("auto", None, f"bf16 is not checked on {device.type} devices")
        if step is None:
            return PrecisionChoice("auto", None, "bf16 was not verified for this network")
    if step is None:
        return PrecisionChoice(precision, torch.bfloat16, "asked for bf16 (not verified)")
    with _rng_neutral(device):
        result = check_bf16(step, trials=trials, names=names)
    if result["ok"]:
        why = "asked for bf16" if precision == "bf16" else "bf16 matched fp32"
        return PrecisionChoice(precision, torch.bfloat16,
                               f"{why} in {trials} of {trials} checks of this network (worst relative error "
                               f"{result['worst_rel_error']:.2g})", {"check": result})
    failure = (f"bf16 autocast gave wrong results on this machine in {result['bad_trials']} of {trials} checks of "
               f"this network (relative error {result['worst_rel_error']:.3g} in {result['worst_tensor']})")
    if precision == "bf16":
        raise ValueError(f"--precision bf16: {failure}; use --precision auto or fp32")
    return PrecisionChoice("auto", None, f"{failure}; using fp32", {"check": result})


@contextlib.contextmanager
def _rng_neutral(device: torch.device) -> Any:
    """Restore the global torch RNG states afterwards (the check must not shift a run's random streams)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a setting without a network to check it on: "auto" is fp32 (never an unverified bf16),
    "bf16" is bf16 as asked. Code that has a network calls `choose_precision` with a probe instead."""
    return choose_precision(precision, device).dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Mixed-precision context for forward passes: `dtype` autocast on `device`, a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
