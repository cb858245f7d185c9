"""Runs on every machine: precision verified where it runs, a step guard that garbage cannot get past, threads chosen
at start-up, a busy machine named, and modules kept on the run's device.

The field failure (oneDNN's bf16 Conv3d weight gradient at a 2³ input returning garbage in a third of its calls) does
not happen on every machine, so it is reproduced here by a monkeypatched kernel: `_garbage_conv3d`.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_UNET

from voxdiff import precision as precision_mod
from voxdiff import threads as threads_mod
from voxdiff.checkpoint import load_checkpoint
from voxdiff.config import LDMTrainConfig, SchedulerConfig, UNetConfig, to_dict
from voxdiff.distributed import DistInfo
from voxdiff.errors import VoxdiffError
from voxdiff.precision import check_bf16, choose_precision, gradient_probe
from voxdiff.sampling import LatentVoxelPipeline
from voxdiff.threads import BusyWatch, ThreadChoice, available_cores, candidates, choose_threads
from voxdiff.training import common
from voxdiff.training import ldm as ldm_mod
from voxdiff.training.common import StepGuard
from voxdiff.training.ldm import train_ldm

TINY = UNetConfig(**{**to_dict(TINY_UNET), "dropout": 0.0})  # ch_mult (1, 2) on a 4³ latent: its lowest level is 2³
CPU = torch.device("cpu")


class _GarbageGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by 1e30 (what the broken kernel returns)."""

    @staticmethod
    def forward(ctx, w):  # noqa: ANN001, ANN205
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g * 1e30


def _garbage_conv3d(monkeypatch: pytest.MonkeyPatch, rate: float = 0.4, seed: int = 0) -> None:
    """Make Conv3d's weight gradient garbage in `rate` of its calls, only under bf16 autocast and only at 2³ inputs:
    the failure seen on some AMD EPYC machines, reproduced on any machine."""
    real = torch.nn.Conv3d._conv_forward
    rng = random.Random(seed)

    def conv(self, x, weight, bias):  # noqa: ANN001, ANN202
        if torch.is_autocast_enabled("cpu") and x.shape[-1] == 2 and weight.requires_grad and rng.random() < rate:
            weight = _GarbageGrad.apply(weight)
        return real(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", conv)


def _tiny_probe() -> tuple:
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(8, 4, 3, padding=1))
    x = torch.randn(4, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    return gradient_probe(net, lambda m: m(x).float().pow(2).mean())


# ---- precision --------------------------------------------------------------------------------------------------


def test_check_bf16_passes_a_right_kernel_and_catches_a_wrong_one(monkeypatch: pytest.MonkeyPatch) -> None:
    step, names = _tiny_probe()
    ok = check_bf16(step, trials=10, names=names)
    assert ok["ok"] and ok["bad_trials"] == 0 and ok["worst_rel_error"] < 0.1
    _garbage_conv3d(monkeypatch)
    bad = check_bf16(step, trials=10, names=names)
    assert not bad["ok"] and bad["bad_trials"] >= 1 and bad["worst_rel_error"] > 1e20
    assert bad["worst_tensor"].endswith("weight")


def test_auto_never_picks_bf16_where_the_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: True)  # as on the machines where the kernel fails
    step, names = _tiny_probe()
    assert choose_precision("auto", CPU, step, names).dtype == torch.bfloat16  # a right kernel: bf16
    _garbage_conv3d(monkeypatch)
    choice = choose_precision("auto", CPU, step, names)
    assert choice.dtype is None and choice.name == "fp32"
    assert "wrong results" in choice.reason and choice.record()["check"]["bad_trials"] >= 1
    with pytest.raises(ValueError, match="--precision bf16: bf16 autocast gave wrong results"):
        choose_precision("bf16", CPU, step, names)
    assert choose_precision("fp32", CPU, step, names).reason == "asked for fp32"


def test_auto_is_fp32_without_native_bf16_or_without_a_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: False)
    assert "no native bf16" in choose_precision("auto", CPU, _tiny_probe()[0]).reason
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: True)
    assert choose_precision("auto", CPU).dtype is None  # nothing verified: never an unchecked bf16


def test_the_check_does_not_move_the_global_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: True)
    step = _tiny_probe()[0]
    torch.manual_seed(3)
    before = torch.get_rng_state()
    choose_precision("auto", CPU, step)
    assert torch.equal(before, torch.get_rng_state())


# ---- the LDM trainer on a machine with the broken kernel -------------------------------------------------------------


@pytest.fixture()
def ae_dir(ckpts: dict[str, Path]) -> Path:
    """The session's tiny AE checkpoint (conftest), which the LDM trainer reads as its AE."""
    return ckpts["ae"]


def _cfg(data: Path, ae: Path, run: Path, **kw) -> LDMTrainConfig:
    base = dict(dataset_path=str(data), ae_ckpt_path=str(ae), ckpt_path=str(run), num_steps=4, batch_size=8,
                warmup_steps=1, ckpt_every=100, log_every=1, device="cpu", seed=5, model=TINY, preview=False,
                scheduler=SchedulerConfig(num_train_timesteps=50), lr_schedule="constant")
    return LDMTrainConfig(**{**base, **kw})


def test_trainer_on_a_broken_bf16_machine_chooses_fp32_and_records_why(
        tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: True)
    _garbage_conv3d(monkeypatch)
    res = train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "run"), progress=False)
    rt = res["runtime"]
    assert rt["precision"]["precision"] == "fp32" and "wrong results" in rt["precision"]["reason"]
    assert rt["skipped_steps"] == 0 and res["step"] == 4
    meta = load_checkpoint(tmp_path / "run" / "last.pt", kind="ldm").meta.runtime
    assert meta["precision"]["precision"] == "fp32" and meta["threads"]["threads"] >= 1
    assert "precision fp32: bf16 autocast gave wrong results" in (tmp_path / "run" / "train.log").read_text()


# ---- the step guard --------------------------------------------------------------------------------------------


def test_guard_skips_non_finite_and_absurd_steps_and_stops_after_too_many() -> None:
    g = StepGuard(max_in_row=3, factor=100.0, warmup=5)
    for s in range(5):
        assert g.check(s, 1.0, 2.0) is None
    assert "non-finite loss" in g.check(5, math.nan, 2.0)
    assert "grad_norm 1e+30 is over 100x" in g.check(6, 1.0, 1e30)
    assert g.check(7, 1.0, 150.0) is None  # 75x the median: large, not absurd
    assert g.skipped == 2 and g.in_row == 0 and [e["step"] for e in g.state()["skipped"]] == [5, 6]
    g.check(8, math.inf, 1.0)
    g.check(9, 1.0, math.nan)
    with pytest.raises(VoxdiffError, match=r"3 training steps in a row were skipped .*--precision fp32"):
        g.check(10, math.nan, math.nan)
    again = StepGuard(max_in_row=3, factor=100.0, warmup=5, state=g.state())  # resumes with the same history
    assert again.skipped == 5 and again.history == g.history


def _poison(monkeypatch: pytest.MonkeyPatch, at: set[int], kind: str) -> None:
    """Corrupt training steps `at` (0-based, training-mode forwards only; the start-up checks run in eval mode):
    "grad" scales the gradient by 1e30 before clipping, "nan" makes the loss NaN."""
    real_loss, real_clip = ldm_mod.diffusion_loss, torch.nn.utils.clip_grad_norm_
    calls = {"loss": -1, "clip": -1}

    def loss(model, *a, **k):  # noqa: ANN001, ANN202
        out = real_loss(model, *a, **k)
        if model.training:
            calls["loss"] += 1
            if kind == "nan" and calls["loss"] in at:
                out = out * math.nan
        return out

    def clip(params, *a, **k):  # noqa: ANN001, ANN202
        params = list(params)
        calls["clip"] += 1
        if kind == "grad" and calls["clip"] in at:
            for p in params:
                p.grad.mul_(1e30)
        return real_clip(params, *a, **k)

    monkeypatch.setattr(ldm_mod, "diffusion_loss", loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


@pytest.mark.parametrize("kind", ["grad", "nan"])
def test_a_poisoned_last_step_leaves_model_optimizer_and_ema_as_they_were(
        tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Four clean steps, and the same four plus a poisoned fifth: the fifth is skipped, counted and logged, and the
    weights, the EMA and the optimizer state are bit-identical to the four-step run's."""
    kw = dict(precision="fp32", threads="1")
    clean = train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "clean", num_steps=4, **kw), progress=False)
    _poison(monkeypatch, {4}, kind)
    hit = train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "hit", num_steps=5, **kw), progress=False)
    assert clean["runtime"]["skipped_steps"] == 0
    assert hit["runtime"]["skipped_steps"] == 1 and hit["runtime"]["skipped"][0]["step"] == 4
    a = load_checkpoint(tmp_path / "clean" / "last.pt", kind="ldm")
    b = load_checkpoint(tmp_path / "hit" / "last.pt", kind="ldm")
    for name in ("model", "ema"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    for k, v in a.optimizer["state"].items():
        assert all(torch.equal(v[f], b.optimizer["state"][k][f]) for f in v)
    assert a.meta.ema_n_averaged == b.meta.ema_n_averaged == 4
    assert b.meta.runtime["skipped_steps"] == 1
    assert "step 4 skipped" in (tmp_path / "hit" / "train.log").read_text()


def test_every_step_poisoned_stops_with_one_line(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, set(range(100)), "nan")
    with pytest.raises(VoxdiffError, match=r"^3 training steps in a row were skipped \(last at step 2"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "run", num_steps=10, max_bad_steps=3, precision="fp32"),
                  progress=False)


# ---- the loop skeleton both trainers share ------------------------------------------------------------------------


def _step_loop(tmp_path: Path, total: int, start: int = 0, **kw) -> common.StepLoop:
    """A StepLoop over a run directory of its own, single process, with a runtime that records nothing."""
    cfg = LDMTrainConfig(ckpt_path=str(tmp_path), device="cpu", **kw)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=CPU, is_main=True)
    run = common.RunStart(info, common.TimeCap(None, CPU), tmp_path, None)
    runtime = SimpleNamespace(guard=StepGuard(max_in_row=3), after_step=lambda log: None, record=lambda: {})
    return common.StepLoop("LDM", cfg, run, runtime, logging.getLogger("test"), start, total, ("loss",),
                           progress=False, log_last=True)


def test_step_loop_counts_steps_and_keeps_its_cadences(tmp_path: Path) -> None:
    """Steps run from the resumed one to the total; logging every log_every steps and at the last, periodic events
    every `every` steps but never at the last; a poisoned step is skipped by the guard and leaves the weights as they
    were, and still counts."""
    loop = _step_loop(tmp_path, total=7, start=1, log_every=2, ckpt_every=3)
    model = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(1, 2)
    seen, logged, due = [], [], []
    for step in loop:
        seen.append(step)
        with loop.timed():
            loss = model(x).sum() * (math.nan if step == 4 else 1.0)
            before = model.weight.detach().clone()
            done = loop.update(loss, model, opt, grad_clip=1.0)
        assert done.applied == (step != 4) and torch.equal(model.weight.detach(), before) == (step == 4)
        if loop.log_due():
            logged.append(loop.step)
            loop.log({"loss": f"{done.loss:.3f}"}, loss=done.loss)
        if loop.due(3):
            due.append(loop.step)
    assert seen == [1, 2, 3, 4, 5, 6] and loop.step == 7 and loop.stopped == "num_steps"
    assert logged == [2, 4, 6, 7] and due == [3, 6] and loop.unsaved()
    assert [row["step"] for row in loop.runlog.rows] == [2, 4, 6, 7] and loop.runtime.guard.skipped == 1
    result = loop.result({"best": 1.0}, {})
    assert list(result)[:4] == ["step", "total_steps", "stopped", "best"] and result["step"] == 7
    assert "steps_per_s" in result and "world_size" not in result


def test_step_loop_refuses_a_body_without_its_timed_block(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="loop.timed"):
        for _ in _step_loop(tmp_path, total=2):
            pass


# ---- threads ----------------------------------------------------------------------------------------------------


def test_thread_candidates_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert candidates(1) == [1] and candidates(2) == [1, 2] and candidates(6) == [1, 2, 4, 6]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's per-rank setting caps the choice
    assert available_cores() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert available_cores() >= 1


@pytest.mark.parametrize(("rates", "chosen"), [
    ({1: 5.81, 2: 9.90}, 2),  # an idle 2-core machine: two threads pay
    ({1: 5.24, 2: 1.46}, 1),  # one busy process beside it: one thread
    ({1: 5.0, 2: 5.5}, 1),  # within 15 %: fewer threads (less to lose when the machine gets busy)
    ({1: 2.0, 2: 3.9, 4: 4.2}, 2),
])
def test_auto_threads_takes_the_smallest_count_not_clearly_slower(rates: dict[int, float], chosen: int) -> None:
    choice = choose_threads("auto", lambda: None, CPU, cores=max(rates), timer=lambda fn, n: rates[n])
    assert choice.threads == chosen and torch.get_num_threads() == chosen and choice.rates == rates
    assert choice.record()["steps_per_s"][str(chosen)] == round(rates[chosen], 3)


def test_pinned_threads_are_timed_only_at_their_count() -> None:
    timed: list[int] = []

    def timer(fn, n):  # noqa: ANN001, ANN202
        timed.append(n)
        return 4.0

    choice = choose_threads("1", lambda: None, CPU, cores=2, timer=timer)
    assert choice.threads == 1 and choice.rate == 4.0 and timed == [1]  # the busy watch's reference, nothing else
    assert choose_threads("auto", lambda: None, torch.device("cuda"), cores=2, timer=timer).reason.startswith("cuda")
    assert timed == [1]
    with pytest.raises(ValueError, match="threads must be auto or a whole number"):
        choose_threads("two", None, CPU)


def test_busy_watch_names_a_slow_stretch_once() -> None:
    now = [0.0]
    watch = BusyWatch(ThreadChoice(2, "auto", "", {1: 5.0, 2: 10.0}), "AE training", clock=lambda: now[0])
    for _ in range(40):  # 10 steps/s: as fast as the probe
        now[0] += 0.1
        assert watch.update() is None
    for _ in range(40):  # then 1 step/s for 40 s
        now[0] += 1.0
        note = watch.update()
        if note:
            break
    assert note and "became busy during AE training" in note and "--threads 1 would be faster" in note
    assert watch.update() is None and watch.note == note  # once


def test_resumed_run_keeps_its_thread_count(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "time_steps", lambda fn, n, repeats=3: {1: 1.0, 2: 5.0}[n])
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "run", num_steps=2, precision="fp32"), progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt", kind="ldm").meta.runtime["threads"]["threads"] == 2
    monkeypatch.setattr(threads_mod, "time_steps", lambda fn, n, repeats=3: {1: 5.0, 2: 1.0}[n])  # busy now
    res = train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "run", num_steps=4, precision="fp32", resume=True),
                    progress=False)
    assert res["runtime"]["threads"]["threads"] == 2 and "resumed run" in res["runtime"]["threads"]["reason"]


# ---- devices ----------------------------------------------------------------------------------------------------


def test_pipeline_refuses_modules_on_different_devices(ckpts: dict[str, Path]) -> None:
    pipe = LatentVoxelPipeline.from_checkpoints(ckpts["ae"], ckpts["ldm"], device="cpu")
    with pytest.raises(VoxdiffError, match="on different devices"):
        LatentVoxelPipeline(unet=pipe.unet.to("meta"), ae=pipe.ae, scheduler_config=pipe.scheduler_config,
                            ae_meta=pipe.ae_meta)


def test_preview_decodes_with_an_ae_placed_on_the_run_device_on_a_cache_hit(
        tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `.to(device)` is recorded; the preview's AE must have been placed, also when the latent cache hits
    (before the fix it stayed where the checkpoint loader built it: a CPU AE beside CUDA latents on a GPU)."""
    placed: dict[int, torch.device] = {}
    seen: list[torch.device | None] = []
    real_to, real_decode = torch.nn.Module.to, LatentVoxelPipeline.decode

    def to(self, *a, **k):  # noqa: ANN001, ANN202
        dev = torch._C._nn._parse_to(*a, **k)[0]
        if dev is not None:
            placed[id(self)] = torch.device(dev)
        return real_to(self, *a, **k)

    def decode(self, z):  # noqa: ANN001, ANN202
        seen.append(placed.get(id(self.ae)))
        return real_decode(self, z)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(LatentVoxelPipeline, "decode", decode)
    for run in ("miss", "hit"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / run, num_steps=1, preview=True, precision="fp32",
                       latent_cache_dir=str(tmp_path / "cache")), progress=False)
    assert len(seen) == 2 and all(d == CPU for d in seen), seen


def test_sampling_resume_key_names_the_device_and_precision(ckpts: dict[str, Path]) -> None:
    """A partial sample file made on one device (or in another precision) is never resumed on another: the noise
    streams differ."""
    from voxdiff.config import SampleConfig
    from voxdiff.sampling import _progress_key

    cfg = SampleConfig(ae_ckpt_path=str(ckpts["ae"]), ldm_ckpt_path=str(ckpts["ldm"]))
    pipe = lambda dev, dtype: SimpleNamespace(ldm_file=ckpts["ldm"], ae_file=ckpts["ae"],  # noqa: E731
                                              device=torch.device(dev), autocast_dtype=dtype)
    keys = {_progress_key(cfg, "chair", pipe("cpu", None)), _progress_key(cfg, "chair", pipe("meta", None)),
            _progress_key(cfg, "chair", pipe("cpu", torch.bfloat16))}
    assert len(keys) == 3
    assert _progress_key(cfg, "chair", pipe("cpu", None)) == _progress_key(cfg, "chair", pipe("cpu", None))


def test_report_says_how_each_stage_ran() -> None:
    from voxdiff.report import runtime_lines, runtime_summary

    rt = {"ldm": {"precision": {"precision": "fp32", "reason": "bf16 autocast gave wrong results"},
                  "threads": {"threads": 1, "reason": "1 of 2 cores"}, "skipped_steps": 2,
                  "skipped": [{"step": 7, "reason": "x"}, {"step": 9, "reason": "y"}],
                  "busy": "this machine became busy during LDM training: 3.0x slower"}}
    md = "\n".join(runtime_lines(rt))
    assert "| ldm | fp32 | bf16 autocast gave wrong results | 1 | 1 of 2 cores | 2 (steps 7, 9) |" in md
    assert any(line.startswith("warning: this machine became busy") for line in runtime_summary(rt))


def test_pipeline_times_threads_once_and_a_config_rerun_keeps_the_count(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: the pipeline times its networks at 1 and 2 threads once, pins the faster count for every stage and
    writes it into config.json; a `--config` rerun of that file uses the recorded count without timing again."""
    import dataclasses
    import json

    from voxdiff import runner
    from voxdiff.presets import run_preset

    timed: list[int] = []

    def fake_time(fn, n, repeats=3):  # noqa: ANN001, ANN202
        timed.append(n)
        return {1: 1.0, 2: 3.0}[n]

    monkeypatch.setattr(runner, "available_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "time_steps", fake_time)
    cfg = dataclasses.replace(run_preset("tiny"), run_dir=str(tmp_path / "run"), device="cpu")
    report = runner.run(cfg, stages=("data", "ae"), progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["threads"] == "2" and saved["ae"]["threads"] == "2"
    assert report["runtime"]["pipeline"]["threads"]["threads"] == 2 and timed[:2] == [1, 2]
    ae_rt = load_checkpoint(tmp_path / "run" / "ae" / "last.pt", kind="autoencoder").meta.runtime
    assert ae_rt["threads"]["threads"] == 2 and ae_rt["threads"]["reason"].startswith("pinned")
    timed.clear()
    from voxdiff.config import RunConfig, from_dict

    again = runner.run(from_dict(RunConfig, saved), stages=("data", "ae"), progress=False)
    assert again["runtime"]["pipeline"]["threads"]["reason"].startswith("pinned") and 1 not in timed


def test_cuda_rng_states_restore_on_a_machine_with_fewer_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved with 4 GPUs' states resumes where 1 is visible (it used to index past the last one)."""
    from voxdiff import checkpoint as ck

    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    state = ck.get_rng_state()  # CPU states only: CUDA was never initialised in this process
    assert "cuda" not in state
    ck.set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 4})
    assert restored == [0]


def test_a_cuda_index_this_machine_lacks_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from voxdiff.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(VoxdiffError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:3")
