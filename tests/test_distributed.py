"""Multi-process training and sampling (voxdiff.distributed): torchrun with 2 CPU ranks on gloo against one process.

One torchrun launch runs a driver (written below) that trains the LDM and the AE for a few steps, samples, and probes
the error paths on both ranks; each rank writes what it saw to rank{r}.json. The tests then compare with
single-process runs of the same configs made here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ENV as BASE_ENV
from helpers import ROOT, TINY_AE, TINY_UNET, free_port, make_ae_ckpt

from voxdiff.checkpoint import load_checkpoint
from voxdiff.config import AETrainConfig, LDMTrainConfig, SampleConfig, SchedulerConfig, to_dict
from voxdiff.distributed import DistInfo, check_same_config, epoch_sampler, init_distributed, split_batch
from voxdiff.errors import VoxdiffError
from voxdiff.models.autoencoder import VoxelAutoencoder

ENV = {**BASE_ENV, "PYTHONPATH": str(ROOT)}  # bench/dist_launches.py imports ENV and free_port from here
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)
TINY = TINY_UNET

DRIVER = r'''
import json, os, sys, threading, weakref
import torch
from voxdiff.config import AETrainConfig, LDMTrainConfig, SampleConfig, from_dict
from voxdiff.distributed import check_same_config, cleanup, init_distributed, raise_together, together
from voxdiff.errors import VoxdiffError

torch.set_num_threads(1)
spec = json.loads(open(sys.argv[1]).read())
threads = lambda: len(os.listdir("/proc/self/task")) - threading.active_count()  # native threads (gloo's)
threads_before = threads()
info = init_distributed("cpu")
gloo_threads = threads() - threads_before
out = {"rank": info.rank, "world_size": info.world_size}
from voxdiff.training.ldm import train_ldm
from voxdiff.sampling import sample_to_files
from voxdiff.training.autoencoder import train_autoencoder
out["ldm"] = train_ldm(from_dict(LDMTrainConfig, spec["ldm"]), progress=False)
out["sample"] = sample_to_files(from_dict(SampleConfig, spec["sample"]), progress=False)["complete"]
out["ae"] = train_autoencoder(from_dict(AETrainConfig, spec["ae"]))
torch.nn.BatchNorm3d = lambda c: torch.nn.Identity()  # the AE without BatchNorm: per-rank statistics gone
out["ae_nobn"] = train_autoencoder(from_dict(AETrainConfig, spec["ae_nobn"]))
def one_rank():  # rank 1 alone fails in the block; rank 0 must not go on to a collective rank 1 never enters
    with together():
        if info.rank == 1:
            raise VoxdiffError("rank 1 cannot read its shard")


for name, fn in [("odd_batch", lambda: train_ldm(from_dict(LDMTrainConfig, spec["ldm_odd"]), progress=False)),
                 ("config", lambda: check_same_config({"lr": 0.1 * (1 + info.rank)})),
                 ("one_rank", one_rank),
                 ("all_ranks", lambda: raise_together(f"rank {info.rank} is out of disk"))]:
    try:
        fn()
    except VoxdiffError as e:
        out[name + "_error"] = str(e)
check_same_config({"after": "errors"})  # a collective after every error path: the ranks are still in step
group, threads_before = weakref.ref(torch.distributed.group.WORLD), threads()
cleanup()
out["group_freed"], out["threads"] = group() is None, [gloo_threads, threads_before - threads()]
open(f"{spec['out']}/rank{info.rank}.json", "w").write(json.dumps(out, default=str))
'''

# One rank fails alone, uncaught, while the other waits in a collective it will never enter.
LONE_FAILURE = r'''
import voxdiff.distributed as vd

vd.ERROR_GRACE_S = 2.0
info = vd.init_distributed("cpu")
if info.rank == 1:
    raise RuntimeError("rank 1 fails alone")
vd.all_gather_object(info.rank)
'''


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _ldm_cfg(data: Path, ae: Path, run: Path, **kw: Any) -> LDMTrainConfig:
    # dropout and label dropout off: a K-rank run then sees exactly the draws of a single-process run
    base = dict(dataset_path=str(data), ae_ckpt_path=str(ae), ckpt_path=str(run), num_steps=3, batch_size=8,
                warmup_steps=1, ckpt_every=100, log_every=1, device="cpu", seed=5, model=TINY, preview=False,
                lr=1e-3, use_cfg=False, scheduler=SchedulerConfig(num_train_timesteps=50), precision="fp32")
    return LDMTrainConfig(**{**base, **kw})


def _ae_cfg(data: Path, run: Path, **kw: Any) -> AETrainConfig:
    base = dict(dataset_path=str(data), ckpt_path=str(run), batch_size=8, num_steps=2, lr=1e-3,
                log_every=1, device="cpu", seed=2, holdout_fraction=0.25, precision="fp32",
                model=TINY_AE)
    return AETrainConfig(**{**base, **kw})


def _sample_cfg(ldm: Path, ae: Path, save_dir: Path) -> SampleConfig:
    # 5 samples in batches of 2: 3 batches per category, so the second round has one batch for two ranks
    return SampleConfig(ldm_ckpt_path=str(ldm), ae_ckpt_path=str(ae), save_dir=str(save_dir),
                        categories=("chair", "table"), num_samples=5, batch_size=2, sampler="ddim", steps=3, eta=0.5,
                        use_cfg=False, resolution=32, device="cpu", seed=3)


def prepare_driver(d: Path, data: Path) -> list[str]:
    """Write the AE checkpoint, spec.json and driver.py of one launch into `d`; returns the driver's argv for torchrun
    (bench/dist_launches.py launches it the same way, many times)."""
    # 16 training latents are left: every global batch of 8 is full, so K ranks together take exactly the
    # single-process batches
    make_ae_ckpt(d / "ae.pt", holdout={"airplane": [0, 1, 2], "chair": [0, 1, 2], "table": [0, 1]})
    spec = {"out": str(d), "ldm": to_dict(_ldm_cfg(data, d / "ae.pt", d / "ldm2")),
            "ldm_odd": to_dict(_ldm_cfg(data, d / "ae.pt", d / "ldm_odd", batch_size=5)),
            "sample": to_dict(_sample_cfg(d / "ldm2", d / "ae.pt", d / "samples2")),
            "ae": to_dict(_ae_cfg(data, d / "ae2")),
            "ae_nobn": to_dict(_ae_cfg(data, d / "ae2_nobn"))}
    (d / "spec.json").write_text(json.dumps(spec))
    (d / "driver.py").write_text(DRIVER)
    return [str(d / "driver.py"), str(d / "spec.json")]


@pytest.fixture(scope="module")
def launched(tiny_voxel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch (2 ranks, gloo) running the driver; returns the paths and each rank's report."""
    d = tmp_path_factory.mktemp("dist")
    r = torchrun(prepare_driver(d, tiny_voxel_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((d / f"rank{i}.json").read_text()) for i in range(2)]
    return {"dir": d, "data": tiny_voxel_dir, "ranks": ranks}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], params: set[str] | None = None) -> float:
    keys = [k for k in a if params is None or k in params]
    assert keys and set(keys) <= set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


# ---- helpers, in one process ----------------------------------------------------------------------------------------


def test_single_process_info_and_noop_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")
    check_same_config({"a": 1})  # nothing to compare with: no error, no process group
    assert not torch.distributed.is_initialized()


def test_split_batch() -> None:
    assert split_batch(64, 4) == 16 and split_batch(7, 1) == 7
    with pytest.raises(VoxdiffError, match="cannot be split across 3 ranks"):
        split_batch(64, 3)


@pytest.mark.parametrize(("n", "world", "per_rank"), [(24, 2, 4), (25, 2, 4), (10, 4, 1)])
def test_epoch_sampler_shards_the_global_order(n: int, world: int, per_rank: int) -> None:
    """World 1 is the trainers' historical order; the ranks' i-th batches together are the global batch i."""
    seed, epoch = 7 * 1_000_003, 3
    single = epoch_sampler(n, DistInfo(0, 0, 1, torch.device("cpu"), True), seed)
    single.set_epoch(epoch)
    order = list(single)
    assert order == torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    shards = []
    for r in range(world):
        s = epoch_sampler(n, DistInfo(r, r, world, torch.device("cpu"), r == 0), seed)
        s.set_epoch(epoch)
        shards.append(list(s))
    g, padded = per_rank * world, (order + order)[: -(-n // world) * world]  # DistributedSampler pads by wrapping
    for i in range(-(-n // g)):
        union = sorted(x for sh in shards for x in sh[i * per_rank : (i + 1) * per_rank])
        expect = sorted(padded[i * g : (i + 1) * g])
        assert union == expect
        if (i + 1) * g <= n:  # full batches: exactly the single-process batch of the same global size
            assert union == sorted(order[i * g : (i + 1) * g])


# ---- torchrun, 2 ranks ------------------------------------------------------------------------------------------


def test_ldm_ranks_identical_and_match_one_process(launched: dict[str, Any], tmp_path: Path) -> None:
    d, r0, r1 = launched["dir"], *launched["ranks"]
    assert r0["world_size"] == 2 and r0["ldm"]["step"] == r1["ldm"]["step"] == 3
    assert r0["ldm"]["param_hash"] == r1["ldm"]["param_hash"] and r0["ldm"]["ema_hash"] == r1["ldm"]["ema_hash"]
    ddp = load_checkpoint(d / "ldm2" / "last.pt", kind="ldm")
    assert not any(k.startswith("module.") for k in ddp.model)  # the unwrapped module was saved
    assert (d / "ldm2" / "log.jsonl").read_text().count('"step": 1,') == 1  # one writer: one row per step
    from voxdiff.training.ldm import train_ldm

    train_ldm(_ldm_cfg(launched["data"], d / "ae.pt", tmp_path / "one"), progress=False)
    one = load_checkpoint(tmp_path / "one" / "last.pt", kind="ldm")
    # Same global batches, t and noise; only the gradient all-reduce sums in another order (float32 rounding, ~1e-7
    # relative), which Adam's normalised step can magnify on near-zero gradients: 3 steps of lr 1e-3 bound it.
    assert _max_diff(ddp.model, one.model) < 1e-4
    assert _max_diff(ddp.ema, one.ema) < 1e-4
    assert ddp.meta.smooth_loss == pytest.approx(one.meta.smooth_loss, rel=1e-5)


def test_ldm_resume_under_another_world_size(launched: dict[str, Any], tmp_path: Path) -> None:
    """A 2-rank checkpoint at step 3 resumed by one process to step 5 equals a one-process run of 5 steps."""
    from voxdiff.training.ldm import train_ldm

    d = launched["dir"]
    shutil.copytree(d / "ldm2", tmp_path / "resumed")
    res = train_ldm(_ldm_cfg(launched["data"], d / "ae.pt", tmp_path / "resumed", num_steps=5, resume=True),
                    progress=False)
    assert res["step"] == 5
    train_ldm(_ldm_cfg(launched["data"], d / "ae.pt", tmp_path / "straight", num_steps=5), progress=False)
    a = load_checkpoint(tmp_path / "resumed" / "last.pt")
    b = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert a.step == b.step == 5 and a.meta.ema_n_averaged == b.meta.ema_n_averaged == 5
    assert _max_diff(a.model, b.model) < 1e-4 and _max_diff(a.ema, b.ema) < 1e-4


def test_sampling_equals_one_process_bit_for_bit(launched: dict[str, Any], tmp_path: Path) -> None:
    from voxdiff.sampling import sample_to_files

    d = launched["dir"]
    assert all(r["sample"] for r in launched["ranks"])
    one = sample_to_files(_sample_cfg(d / "ldm2", d / "ae.pt", tmp_path / "one"), progress=False)
    assert one["complete"]
    for cat in ("chair", "table"):
        a, b = np.load(d / "samples2" / f"{cat}.npy"), np.load(tmp_path / "one" / f"{cat}.npy")
        assert a.shape == (5, 32, 32, 32) and np.array_equal(a, b)
        prog = json.loads((d / "samples2" / f".{cat}.progress.json").read_text())
        assert prog["complete"] and sorted(prog["done"]) == ["0", "1", "2"]
    meta = json.loads((d / "samples2" / "sample.json").read_text())
    assert meta["world_size"] == 2 and not list((d / "samples2").glob(".*.partial.npy"))


def _flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].flatten().float() for k in keys])


def test_ae_ranks_identical_and_close_to_one_process(launched: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from voxdiff.training.autoencoder import train_autoencoder

    d, r0, r1 = launched["dir"], *launched["ranks"]
    assert r0["ae"]["step"] == r1["ae"]["step"] == 2
    assert r0["ae"]["param_hash"] == r1["ae"]["param_hash"]
    assert r0["ae_nobn"]["param_hash"] == r1["ae_nobn"]["param_hash"]
    # Without BatchNorm the 2-rank run is the one-process run up to the all-reduce's float32 rounding.
    with monkeypatch.context() as m:
        m.setattr(torch.nn, "BatchNorm3d", lambda c: torch.nn.Identity())
        train_autoencoder(_ae_cfg(launched["data"], tmp_path / "one_nobn"))
    ddp = load_checkpoint(d / "ae2_nobn" / "last.pt", kind="autoencoder")
    one = load_checkpoint(tmp_path / "one_nobn" / "last.pt", kind="autoencoder")
    assert _max_diff(ddp.model, one.model) < 1e-6
    # With BatchNorm each rank normalises its half batch with its own statistics (SyncBatchNorm, --sync_bn, needs
    # CUDA), so the gradients are not the full batch's: measured here the two updates from the common initialisation
    # point the same way (cosine 0.81) and have the same length; a broken data split or gradient average would not.
    train_autoencoder(_ae_cfg(launched["data"], tmp_path / "one"))
    ddp = load_checkpoint(d / "ae2" / "last.pt", kind="autoencoder").model
    one = load_checkpoint(tmp_path / "one" / "last.pt", kind="autoencoder").model
    torch.manual_seed(2)  # the trainer's seed_everything(cfg.seed) precedes building the model
    init = VoxelAutoencoder(TINY_AE)
    keys = [k for k, _ in init.named_parameters()]
    start = _flat(init.state_dict(), keys)
    du, dv = _flat(ddp, keys) - start, _flat(one, keys) - start
    assert float(torch.nn.functional.cosine_similarity(du, dv, dim=0)) > 0.6
    assert 0.8 < float(du.norm() / dv.norm()) < 1.25


def test_error_paths_on_every_rank(launched: dict[str, Any]) -> None:
    r0, r1 = launched["ranks"]
    for r in (r0, r1):
        assert "--batch_size 5 (global) cannot be split across 2 ranks" in r["odd_batch_error"]
        assert "ranks disagree on the config: rank(s) [1]" in r["config_error"]
    assert not (launched["dir"] / "ldm_odd").exists()  # refused before writing anything
    # an error on one rank is raised on both (the failed rank keeps its own message)
    assert r1["one_rank_error"] == "rank 1 cannot read its shard"
    assert r0["one_rank_error"] == "rank 1 failed: rank 1 cannot read its shard"
    assert r0["all_ranks_error"] == "rank 0 is out of disk" and r1["all_ranks_error"] == "rank 1 is out of disk"


def test_cleanup_frees_the_group_and_its_threads(launched: dict[str, Any]) -> None:
    """After cleanup() nothing of gloo is left running into interpreter shutdown (DDP no longer pins the group)."""
    for r in launched["ranks"]:
        assert r["group_freed"]
        started, ended = r["threads"]  # native threads gloo started at init, and those cleanup() ended
        assert started > 0 and ended >= started, r["threads"]


def test_lone_failure_ends_the_launch_without_hang_or_abort(tmp_path: Path) -> None:
    (tmp_path / "lone.py").write_text(LONE_FAILURE)
    t0 = time.monotonic()
    r = torchrun([str(tmp_path / "lone.py")], timeout=120)
    assert r.returncode != 0
    assert "rank 1 fails alone" in r.stderr
    assert "terminate called" not in r.stderr and "SIGABRT" not in r.stderr, r.stderr[-3000:]
    assert time.monotonic() - t0 < 90


def test_raise_together_in_one_process() -> None:
    from voxdiff.distributed import raise_together, together

    raise_together(None)
    with pytest.raises(VoxdiffError, match="^disk full$"):
        raise_together("disk full")
    with pytest.raises(KeyError):
        raise_together(KeyError("k"))
    with pytest.raises(ValueError, match="own"), together():
        raise ValueError("own")
    with together():
        pass


def test_cleanup_joins_gloo_threads_after_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-rank gloo group in this process: after DDP and cleanup(), the group object is freed and gloo's threads
    are gone (DDP's import of torch.distributed.nn.functional used to pin the group for good)."""
    import weakref

    from voxdiff.distributed import cleanup

    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this process")
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    native = lambda: len(os.listdir("/proc/self/task")) - threading.active_count()  # noqa: E731
    before = native()
    init_distributed("cpu")
    group, started = weakref.ref(torch.distributed.group.WORLD), native() - before
    assert started > 0  # gloo's workers and socket loop
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    ddp(torch.randn(2, 3)).sum().backward()
    del ddp
    before = native()
    cleanup()
    assert not torch.distributed.is_initialized() and group() is None
    assert before - native() >= started  # cleanup() ended gloo's threads


def test_cli_world_size_error_is_one_line(tiny_voxel_dir: Path, tmp_path: Path) -> None:
    r = torchrun(["diffusion/train.py", "--dataset_path", str(tiny_voxel_dir), "--ae_ckpt_path", str(tmp_path / "ae"),
                  "--ckpt_path", str(tmp_path / "run"), "--batch_size", "3", "--device", "cpu"])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "train.py: error:" in ln]
    # Each rank prints the same one line; torchrun may SIGTERM the second rank once the first has exited, so 1 or 2.
    assert 1 <= len(lines) <= 2 and all("cannot be split across 2 ranks" in ln for ln in lines), r.stderr[-2000:]
    assert "Traceback" not in r.stderr.split("train.py: error:")[0]
    assert not (tmp_path / "run").exists()
