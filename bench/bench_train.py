"""Training throughput per preset, in one process: pure steps (fp32 / bf16, channels-last), torch.compile, and the real
training loops (their overhead), plus held-out quality at equal steps for fp32 vs bf16.

For each preset's AE and U-Net (batch size and model from voxdiff.presets), a "pure step" is forward, loss, backward,
clip and AdamW on a fixed batch; ratios are against fp32 (contiguous) in the same process. The loop rows run
`train_autoencoder` / `train_ldm` themselves on procedural data for `--loop_steps` steps and report their own
throughput (forward/backward/optimizer time only) and the fraction of the stage's wall time spent outside it.
`--quality_steps N` trains both networks N steps in fp32 and in bf16 and prints the held-out calibrated IoU (AE) and
held-out loss (LDM): the precision the presets use must not cost quality.

    python bench/bench_train.py --presets demo medium                      # throughput and loop overhead
    python bench/bench_train.py --presets medium --quality_steps 1500      # + fp32 vs bf16 quality
    python bench/bench_train.py --presets medium --compile                 # + torch.compile (compile time, speed)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from voxdiff.device import flush_denormals
from voxdiff.losses import reconstruction_loss
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.precision import cpu_has_bf16
from voxdiff.presets import run_preset


def _timed(step: Any, steps: int, warmup: int) -> float:
    """Seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def ae_step_fn(model_cfg: Any, batch: int, bf16: bool, channels_last: bool, compile_: bool = False,
               loss_kind: str = "bce") -> Any:
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = VoxelAutoencoder(model_cfg).to(memory_format=fmt)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    res = model_cfg.resolution
    x = (torch.rand(batch, 1, res, res, res, generator=torch.Generator().manual_seed(0)) > 0.96).float()
    x = x.contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = fwd(x)
        loss = reconstruction_loss(logits, x, loss_kind, pos_weight=24.0)  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def unet_step_fn(model_cfg: Any, latent_shape: tuple[int, ...], batch: int, bf16: bool, channels_last: bool,
                 compile_: bool = False) -> Any:
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = UNet3D(model_cfg, class_dropout=0.1).to(memory_format=fmt)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *latent_shape).contiguous(memory_format=fmt)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, 3, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            eps = fwd(x, t, y)
        loss = F.mse_loss(eps.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def pure_steps(name: str, a: argparse.Namespace) -> None:
    cfg = run_preset(name)
    ae_bs, ldm_bs = cfg.ae.batch_size, cfg.ldm.batch_size
    latent = VoxelAutoencoder(cfg.ae.model).latent_shape
    print(f"\n== {name}: AE {cfg.ae.model.resolution}³ -> latent {latent}, batch {ae_bs}; U-Net ch {cfg.ldm.model.ch}, "
          f"batch {ldm_bs}")
    variants = [("fp32", False, False), ("fp32 channels-last", False, True), ("bf16", True, False),
                ("bf16 channels-last", True, True)]
    for net in ("AE", "U-Net"):
        base = None
        for label, bf16, cl in variants:
            fn = ae_step_fn(cfg.ae.model, ae_bs, bf16, cl, loss_kind=cfg.ae.loss) if net == "AE" else \
                unet_step_fn(cfg.ldm.model, latent, ldm_bs, bf16, cl)
            s = _timed(fn, a.steps, a.warmup)
            base = base or s
            bs = ae_bs if net == "AE" else ldm_bs
            print(f"{net:6s} pure step  {label:20s} {bs / s:8.1f} shapes/s  {1 / s:6.2f} steps/s  {base / s:5.2f}x",
                  flush=True)
        if a.compile:
            t0 = time.perf_counter()
            if net == "AE":
                fn = ae_step_fn(cfg.ae.model, ae_bs, True, False, compile_=True, loss_kind=cfg.ae.loss)
            else:
                fn = unet_step_fn(cfg.ldm.model, latent, ldm_bs, True, False, compile_=True)
            fn()
            compile_s = time.perf_counter() - t0
            s = _timed(fn, a.steps, 1)
            print(f"{net:6s} pure step  {'bf16 torch.compile':20s} {1 / s:6.2f} steps/s  {base / s:5.2f}x "
                  f"(compile {compile_s:.0f} s)", flush=True)


def make_data(preset: str, root: Path, resolution: int) -> Path:
    from voxdiff.data.partseg import COUNT_PRESETS, write_synthetic_partseg
    from voxdiff.data.voxelize import preprocess

    write_synthetic_partseg(root, COUNT_PRESETS[preset], seed=0, progress=False)
    preprocess(root, root, resolution=resolution, progress=False)
    return root


def loops(name: str, a: argparse.Namespace, tmp: Path) -> None:
    from voxdiff.training.autoencoder import train_autoencoder
    from voxdiff.training.ldm import train_ldm

    cfg = run_preset(name)
    data = make_data(cfg.data_preset, tmp / f"data_{name}", cfg.resolution)
    runs: dict[str, Path] = {}
    for precision in ("fp32", "bf16") if a.quality_steps else ("auto",):
        steps = a.quality_steps or a.loop_steps
        every = max(1, steps // 2) if a.quality_steps else cfg.ae.ckpt_every
        ae_cfg = dataclasses.replace(cfg.ae, dataset_path=str(data), ckpt_path=str(tmp / f"{name}_ae_{precision}"),
                                     num_steps=steps, max_minutes=None, precision=precision, ckpt_every=every,
                                     device="cpu")
        result = train_autoencoder(ae_cfg, progress=False)
        runs[precision] = Path(ae_cfg.ckpt_path)
        print(f"AE     loop {precision:5s} {steps:5d} steps  {result['samples_per_s']:8.1f} shapes/s  overhead "
              f"{100 * result['overhead_fraction']:4.1f}% of {result['seconds']:.0f} s  held-out IoU (calibrated) "
              f"{result['best_iou_cal']:.4f}  voxels/true {result['heldout_voxel_ratio_cal']:.2f}", flush=True)
        ldm_cfg = dataclasses.replace(cfg.ldm, dataset_path=str(data), ae_ckpt_path=str(runs[precision]),
                                      ckpt_path=str(tmp / f"{name}_ldm_{precision}"), num_steps=steps,
                                      max_minutes=None, precision=precision, device="cpu", preview=False,
                                      ckpt_every=every)
        result = train_ldm(ldm_cfg, progress=False)
        shapes_per_s = result["steps_per_s"] * cfg.ldm.batch_size
        print(f"U-Net  loop {precision:5s} {steps:5d} steps  {shapes_per_s:8.1f} shapes/s  "
              f"overhead {100 * result['overhead_fraction']:4.1f}% of {result['seconds']:.0f} s  held-out loss "
              f"{result['best_heldout_loss']:.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["demo", "medium"])
    p.add_argument("--steps", type=int, default=10, help="timed pure steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loop_steps", type=int, default=300, help="steps of each real training loop")
    p.add_argument("--quality_steps", type=int, default=0, help="train fp32 and bf16 this many steps (0: skip)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (bf16)")
    p.add_argument("--no_loops", action="store_true", help="pure steps only")
    a = p.parse_args()
    flush_denormals("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native CPU bf16: {cpu_has_bf16()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.presets:
            pure_steps(name, a)
            if not a.no_loops:
                loops(name, a, Path(tmp))


if __name__ == "__main__":
    main()
