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
- rank 0 alone writes logs, renders and checkpoints (atomically), from the unwrapped module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from voxdiff.utils import VoxdiffError, resolve_device

__all__ = [
    "DistInfo", "init_distributed", "is_main", "barrier", "cleanup", "all_gather_object", "broadcast_object",
    "check_same_config", "check_in_sync", "state_hash", "split_batch", "mean_over_ranks", "any_rank", "wrap_ddp",
    "epoch_sampler", "share_device_rng", "rank_rng",
]


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
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
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


def cleanup() -> None:
    """Leave the process group (call once at the end of a script; harmless when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    return [r for r, v in enumerate(values) if v != values[0]]


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
    """Per-rank batch size of a global batch; a clear error when the world size does not divide it."""
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
