"""torchrun's environment -> process group, rank-0 helpers, seed offsets (nanoGPT style, a few dozen lines of setup).

Launched by `torchrun --nproc_per_node=K script.py ...`, every process finds RANK / LOCAL_RANK / WORLD_SIZE in its
environment: `init_distributed` then joins the process group (NCCL on CUDA with device cuda:LOCAL_RANK, gloo on CPU).
Without those variables it is a plain single process: no process group, and every helper below is a local no-op, so the
same training and sampling code runs on one CPU.

Conventions the trainers and the sampler follow:
- the batch size a user asks for is GLOBAL; each rank takes `split_batch(global, world_size)` samples per step;
- the step counter and the data position are global, so a checkpoint resumes under any world size;
- the global RNG streams are identical on every rank (same seed); randomness that must differ per rank (dropout
  masks) comes from `rank_rng`, seeded by (seed, step, `seed_offset`);
- rank 0 alone writes logs, renders and checkpoints (atomically), from the unwrapped module;
- a check that can fail on some ranks only is decided on all ranks together (`raise_together`, `together`,
  `check_same_config`, `any_rank`): every rank raises at the same point, so none is left waiting in a collective that a
  failed peer will never enter;
- every rank ends with `cleanup()` (the CLIs call it in a `finally:`; an exit without it runs it from `atexit`): the
  ranks meet, then each destroys the group, so no rank tears down its connections while a peer is still in a
  collective with it, and gloo's threads are joined while the interpreter is fully alive.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import importlib
import json
import logging
import os
import sys
import time
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from voxdiff.device import resolve_device
from voxdiff.errors import VoxdiffError

__all__ = [
    "DistInfo", "init_distributed", "is_main", "barrier", "cleanup", "all_gather_object", "broadcast_object",
    "raise_together", "together", "check_same_config", "check_in_sync", "state_hash", "split_batch",
    "mean_over_ranks", "any_rank", "wrap_ddp", "epoch_sampler", "share_device_rng", "rank_rng",
]

log = logging.getLogger(__name__)

# How long a rank at `cleanup` waits for the others to get there too: at a normal end as long as a collective may take
# (c10d's default timeout); when it ends with an error of its own only a grace period, because a peer may be waiting in
# a collective that this rank skipped and will never arrive (this rank then leaves alone and its exit ends the launch).
END_TIMEOUT_S = 1800.0
ERROR_GRACE_S = 30.0
_generation = 0  # process groups this process has created: names the meeting points in the store
_exit_hook = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, local rank, the world size and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when there are other ranks to talk to (collectives and DDP are used)."""
        return self.world_size > 1

    @property
    def seed_offset(self) -> int:
        """Added to a seed for streams that must differ between ranks (nanoGPT's `seed_offset`)."""
        return self.rank


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device_flag: str | None = "auto") -> DistInfo:
    """Join torchrun's process group (idempotent), or describe a single process when RANK/WORLD_SIZE are absent.

    Under torchrun a CUDA device flag ("auto" with CUDA, "cuda", "cuda:N") means cuda:LOCAL_RANK with NCCL; "cpu" means
    gloo. The returned `device` is what the caller must compute on.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 0, 1, resolve_device(device_flag), True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise VoxdiffError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): use "
                               "--nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend, kwargs = "nccl", {"device_id": device}
    elif device.type == "cpu":
        backend, kwargs = "gloo", {}
    else:
        raise VoxdiffError(f"distributed runs support cuda (NCCL) and cpu (gloo) devices; got {device}")
    if not dist.is_initialized():
        global _generation, _exit_hook
        # torch.distributed.nn.functional binds `group.WORLD` as a default argument of ten functions when it is first
        # imported. DDP's constructor imports it (through torch._dynamo), so imported after the group exists it pins
        # that group for good: destroy_process_group() can then never free it and gloo's worker threads outlive it.
        # A worker still dropping the last collective's tensors when the interpreter shuts down needs the GIL for
        # their Python objects; CPython ends that thread with pthread_exit, whose unwinding through a noexcept
        # destructor calls std::terminate: "terminate called without an active exception", SIGABRT, in a few % of
        # launches. Imported before the group exists, those defaults are None (the default group).
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        _generation += 1
        if not _exit_hook:
            atexit.register(_cleanup_at_exit)  # a script that ends (or dies) without cleanup() still leaves in step
            _exit_hook = True
    return DistInfo(rank, local_rank, world, device, rank == 0)


def is_main() -> bool:
    """True on rank 0 (and in a single process); also correct before `init_distributed` and after `cleanup`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def cleanup(failed: bool | None = None) -> None:
    """Leave the process group, every rank in step (call it on every rank at the end, e.g. in a `finally:`; harmless
    when there is no group or it was already left).

    1. Meet: each rank records on the group's store that it is done with the group and waits for the others. A rank
       that got here has left every collective, so once all have arrived no rank is inside one. `failed` (default: an
       exception is propagating through the `finally:` that calls this) shortens the wait to ERROR_GRACE_S: after an
       error raised on every rank together the others arrive at once; after an error of this rank's alone they may be
       waiting in a collective this rank will never enter, so it leaves without them rather than hang.
    2. Barrier on the group (all arrived, so it pairs with the same barrier on every rank), and a device synchronise
       under NCCL: nothing is in flight.
    3. destroy_process_group(), after collecting garbage that still references the group (DDP wrappers in reference
       cycles): the group is freed here, so gloo joins its worker and socket threads and closes its connections while
       the interpreter is fully alive, instead of racing its shutdown.
    4. Rank 0 returns last (it may host the store the others are still talking to).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if failed is None:
        failed = sys.exc_info()[1] is not None
    store = _store()
    world, rank = dist.get_world_size(), dist.get_rank()
    key = f"voxdiff/end/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_generation}"
    in_step = False
    try:
        if world > 1:
            wait_s = ERROR_GRACE_S if failed else END_TIMEOUT_S
            in_step = _meet(store, f"{key}/arrived", world, wait_s)
            if not in_step:
                log.warning("rank %d leaves the process group without the other ranks (they did not reach the end "
                            "within %.0f s)", rank, wait_s)
            elif dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
                torch.cuda.synchronize()
            else:
                dist.barrier()
    except Exception as e:  # a peer died or aborted: leave anyway; an error already propagating is the one to report
        in_step = False
        if not failed:
            raise
        log.warning("rank %d: leaving the process group after an error: %s", rank, e)
    finally:
        group = weakref.ref(dist.group.WORLD)
        gc.collect()  # DDP wrappers and reducers in reference cycles still hold the group
        dist.destroy_process_group()
        gc.collect()
        if group() is not None:
            log.warning("the process group is still referenced after destroy_process_group(): its threads stay alive "
                        "until exit")
    if in_step and store is not None:
        with contextlib.suppress(Exception):  # the store may be gone with a failed peer
            if rank == 0:
                _meet(store, f"{key}/left", world, ERROR_GRACE_S)
            else:
                store.add(f"{key}/left", 1)


def _store() -> Any:
    """The default group's store (None where torch does not expose it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _meet(store: Any, key: str, world: int, timeout_s: float) -> bool:
    """Count this rank in at `key` and wait until `world` ranks are in or `timeout_s` passes; True when all came.

    Polls with `add(key, 0)` (a store `wait` with a timeout logs a warning per call); without a store it trusts
    the ranks to be in step."""
    if store is None:
        return True
    n, deadline, pause = store.add(key, 1), time.monotonic() + timeout_s, 0.005
    while n < world:
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
        n = store.add(key, 0)
    return True


def _cleanup_at_exit() -> None:
    """atexit: leave a group the script did not leave, while the interpreter is still fully alive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    failed = getattr(sys, "last_value", None) is not None  # set by an uncaught exception (already printed)
    if getattr(sys, "last_traceback", None) is not None:
        traceback.clear_frames(sys.last_traceback)  # its frames' locals (works, groups) would keep the group alive
    try:
        cleanup(failed=failed)
    except Exception as e:
        log.warning("leaving the process group at exit failed: %s", e)


def all_gather_object(obj: Any) -> list[Any]:
    """A picklable object from every rank, in rank order ([obj] in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (other ranks' argument is ignored)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _differing(values: list[Any]) -> list[int]:
    return [rank for rank, v in enumerate(values) if v != values[0]]


def raise_together(error: BaseException | str | None) -> None:
    """A collective check: every rank passes its own error (None when it has none); when any rank has one, every rank
    raises, at this same point, so none goes on to a collective that a failed peer will never enter.

    A rank re-raises its own error (a str becomes a VoxdiffError); the others raise a VoxdiffError naming the failed
    rank(s) with the first rank's message. Every rank must call it. In a single process: raises `error`, if any.
    """
    own: BaseException | None = VoxdiffError(error) if isinstance(error, str) else error
    if _active():
        msgs = all_gather_object(None if own is None else str(own) or type(own).__name__)
        bad = [rank for rank, m in enumerate(msgs) if m is not None]
        if bad and own is None:
            first = msgs[bad[0]]
            raise VoxdiffError(f"rank {bad[0]} failed: {first}" if len(bad) == 1
                               else f"ranks {bad} failed; rank {bad[0]}: {first}")
    if own is not None:
        raise own


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run a block that may fail on some ranks only (rank 0's file I/O, a check of local state) and leave it
    collectively: an Exception raised in it on any rank is raised on every rank when the block ends (raise_together).

    Every rank must enter the block, and the block must not run collectives itself (a failing rank would skip them).
    """
    error: Exception | None = None
    try:
        yield
    except Exception as e:
        error = e
    raise_together(error)


def check_same_config(config: dict[str, Any], what: str = "config") -> None:
    """Raise VoxdiffError on every rank when the ranks were given different configs (hash of the JSON compared)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    bad = _differing(all_gather_object(digest))
    if bad:
        raise VoxdiffError(f"ranks disagree on the {what}: rank(s) {bad} differ from rank 0 (launch every rank with "
                           "the same flags)")


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 (16 hex) of a module's parameters in order: equal hashes mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_in_sync(module: torch.nn.Module, what: str = "model") -> str:
    """Verify every rank holds bit-identical parameters (DDP's invariant); returns the hash, raises naming the ranks."""
    digest = state_hash(module)
    bad = _differing(all_gather_object(digest))
    if bad:
        raise VoxdiffError(f"{what} parameters diverged between ranks: rank(s) {bad} differ from rank 0")
    return digest


def split_batch(global_batch: int, world_size: int) -> int:
    """Per-rank batch size of a global batch; a clear error when the world size does not divide it.

    Pure: given the same arguments (check_same_config first) every rank raises at the same point."""
    if global_batch % world_size:
        raise VoxdiffError(f"--batch_size {global_batch} (global) cannot be split across {world_size} ranks; use a "
                           f"multiple of {world_size} or another --nproc_per_node")
    return global_batch // world_size


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (each rank's local value has equal weight); the tensor itself in one process."""
    if not _active():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank: decisions like a time budget must be taken together."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several ranks, else `model` itself.

    Keep using the plain module for the optimizer, EMA and checkpoints; call the wrapper for training forwards.
    """
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def epoch_sampler(n: int, info: DistInfo, seed: int) -> DistributedSampler:
    """A shuffling DistributedSampler over range(n) for this rank (call `set_epoch` every epoch).

    Epoch e's global order is randperm(n) seeded by `seed + e`; rank r takes positions r, r + W, r + 2W, ... (padded
    by wrapping to a multiple of W), so the union of the ranks' i-th batches of size b is the global batch of positions
    [i·W·b, (i+1)·W·b): the data position depends on the global step only, whatever the world size.
    """
    return DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                              drop_last=False)


def share_device_rng(info: DistInfo) -> None:
    """Give every rank rank 0's CUDA generator state for its own device (CPU states are equal by seeding/resume).

    A checkpoint holds rank 0's cuda:0 state; after a resume the other ranks would otherwise draw from stale states.
    """
    if info.distributed and info.device.type == "cuda":
        state = broadcast_object(torch.cuda.get_rng_state(info.device) if info.is_main else None)
        torch.cuda.set_rng_state(state, info.device)


@contextlib.contextmanager
def rank_rng(info: DistInfo, seed: int, step: int) -> Iterator[None]:
    """In a distributed run, fork the global RNG and seed it by (seed, step, seed_offset) for the block: per-rank
    randomness (dropout, label dropout) without touching the shared stream. A no-op in a single process."""
    if not info.distributed:
        yield
        return
    devices = [info.device.index] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        s = np.random.SeedSequence([seed, step, info.seed_offset]).generate_state(1, dtype=np.uint64)[0] >> 1
        torch.manual_seed(int(s))
        yield
