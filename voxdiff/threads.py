"""CPU threads: how many intra-op threads a run uses, chosen where it runs, and a watch that names a busy machine.

On a machine whose cores are shared, every parallel region of a convolution waits for its slowest thread; one busy
process beside a 2-thread run on 2 cores slows it several-fold where 1 thread loses little (docs/BENCHMARKS.md, "Threads
beside busy processes"). No fixed default is right everywhere, so "auto" times a few steps of the run's own networks at
each candidate count (1, 2, 4, ... up to the cores this process may use, and no more than OMP_NUM_THREADS when the
launcher set it) and keeps the smallest count that is not clearly slower. Results are bit-identical for a fixed count
only, so the count is recorded with the run.
A leaf module (torch; threadpoolctl when installed, for numpy's BLAS).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxdiff.config import check_threads

# A larger thread count must be this much faster than the best smaller one to be chosen: fewer threads lose less when
# the machine gets busy later, and timing noise must not flip the choice between two runs of one command.
PREFER_FEWER = 1.15
# The busy watch: a stretch of at least this many seconds and steps whose rate is below SLOW of the start-up rate.
BUSY_SECONDS = 30.0
BUSY_STEPS = 10
SLOW = 0.5


def cpu_model() -> str:
    """The CPU's model name and its bf16 instructions (machines of one kind differ below the surface: the name and
    flags say which kernels a result came from)."""
    name = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(bf16) if bf16 else 'no native bf16'})"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), capped by OMP_NUM_THREADS when set (torchrun sets it to
    1 per rank, so ranks on one machine do not oversubscribe it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        n = min(n, int(omp))
    return max(1, n)


def candidates(cores: int) -> list[int]:
    """Thread counts worth timing: 1, 2, 4, ... below `cores`, and `cores` itself."""
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return [*out, cores]


def parse_threads(setting: str) -> int | None:
    """None for "auto", else the pinned count (>= 1); ValueError naming the setting otherwise."""
    check_threads(setting)
    return None if setting == "auto" else int(setting)


@dataclass
class ThreadChoice:
    """The intra-op thread count of a run, why, and the start-up timings (steps/s per count) that chose it."""

    threads: int
    setting: str
    reason: str
    rates: dict[int, float] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        """Steps/s of the probe at the chosen count (the busy watch's reference)."""
        return self.rates.get(self.threads)

    def record(self) -> dict[str, Any]:
        return {"threads": self.threads, "setting": self.setting, "reason": self.reason, "cpu": cpu_model(),
                "steps_per_s": {str(k): round(v, 3) for k, v in self.rates.items()}}


def time_steps(step: Callable[[], Any], threads: int, repeats: int = 3, warmup: int = 1) -> float:
    """Steps/s of `step` at `threads` intra-op threads (after `warmup` untimed calls); leaves the count set."""
    torch.set_num_threads(threads)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats / max(time.perf_counter() - t0, 1e-9)


def choose_threads(setting: str, step: Callable[[], Any] | None, device: torch.device, *,
                   cores: int | None = None, repeats: int = 3,
                   timer: Callable[[Callable[[], Any], int], float] | None = None) -> ThreadChoice:
    """Set and return the intra-op thread count for a run on `device`.

    A pinned setting ("2") is used as given. "auto" on a CPU times `step` (a training step of the run's own
    networks, or a sampling forward) at each of `candidates(cores)` and keeps the smallest count within PREFER_FEWER
    of the fastest. A pinned count, or the only candidate, is timed once (the busy watch's reference); on an
    accelerator (where CPU threads only feed the device) nothing is timed.
    `timer(step, n) -> steps/s` replaces the clock in tests.
    """
    pinned = parse_threads(setting)
    cores = cores or available_cores()
    timer = timer or (lambda fn, n: time_steps(fn, n, repeats))
    if pinned is not None:
        torch.set_num_threads(pinned)
        note = "" if pinned <= cores else f" (more than the {cores} cores this process may use)"
        rates = {pinned: timer(step, pinned)} if step is not None and device.type == "cpu" else {}
        return ThreadChoice(pinned, setting, f"pinned{note}", rates)  # timed once: the busy watch's reference
    if device.type != "cpu":
        n = min(cores, torch.get_num_threads())
        torch.set_num_threads(n)
        return ThreadChoice(n, setting, f"{device.type}: CPU threads only feed the device; not timed")
    options = candidates(cores)
    if step is None:
        torch.set_num_threads(options[-1])
        return ThreadChoice(options[-1], setting, "not timed")
    if len(options) == 1:
        torch.set_num_threads(1)
        return ThreadChoice(1, setting, "one core available", {1: timer(step, 1)})
    rates = {n: timer(step, n) for n in options}
    best = options[0]
    for n in options[1:]:
        if rates[n] > PREFER_FEWER * rates[best]:
            best = n
    torch.set_num_threads(best)
    fastest = max(rates, key=rates.__getitem__)
    why = (f"{best} of {cores} cores: {rates[best]:.2f} steps/s" +
           ("" if best == fastest else f" (within {PREFER_FEWER:.2f}x of {fastest} threads' {rates[fastest]:.2f})"))
    return ThreadChoice(best, setting, why, rates)


class BusyWatch:
    """Names a machine that became busy: when the step rate over a stretch of at least BUSY_SECONDS and BUSY_STEPS
    falls below SLOW × the start-up probe's, `update` returns one line (once per run) and `note` keeps it."""

    def __init__(self, choice: ThreadChoice, what: str, steps_per_probe_step: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        rate = choice.rate
        self.reference = rate / steps_per_probe_step if rate else None
        self.threads, self.what, self.clock = choice.threads, what, clock
        self.t0, self.n, self.note = clock(), 0, None

    def update(self, steps: int = 1) -> str | None:
        """Count `steps` finished steps; the busy line the first time the machine is found busy, else None."""
        if self.reference is None or self.note is not None:
            return None
        self.n += steps
        elapsed = self.clock() - self.t0
        if elapsed < BUSY_SECONDS or self.n < BUSY_STEPS:
            return None
        rate = self.n / elapsed
        self.t0, self.n = self.clock(), 0
        if rate >= SLOW * self.reference:
            return None
        slower = self.reference / max(rate, 1e-9)
        hint = "; --threads 1 would be faster" if self.threads > 1 else "; another process is using this core"
        self.note = (f"this machine became busy during {self.what}: {slower:.1f}x slower than at start-up "
                     f"({rate:.2f} vs {self.reference:.2f} steps/s at {self.threads} thread(s)){hint}")
        return self.note


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Run a block with `threads` intra-op threads in torch and in numpy's BLAS/OpenMP pools (threadpoolctl), so no
    library starts more threads than the run chose; the previous counts come back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a requirement; degrade to torch alone
        limits: Any = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=threads)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(before)
