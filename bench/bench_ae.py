"""Autoencoder training throughput (samples/s) for the default model at 64³: fp32, and bf16 autocast with --bf16.

Each configuration runs warm-up steps then timed full training steps (forward, weighted BCE, backward, clip, AdamW)
on sparse random grids (~1% occupied, like surface voxels); ratios are against the fp32 run in the same process.
On CUDA the trainer's settings are used (channels_last_3d; bf16 autocast is what train_autoencoder does there).

    python bench/bench_ae.py                       # CPU, fp32
    python bench/bench_ae.py --bf16 --device cuda  # GPU, fp32 vs bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from voxdiff.config import AEConfig
from voxdiff.device import resolve_device
from voxdiff.losses import reconstruction_loss
from voxdiff.models.autoencoder import VoxelAutoencoder


def samples_per_s(device: torch.device, res: int, batch: int, steps: int, warmup: int, bf16: bool) -> float:
    """Timed training steps of the default AE; returns samples per second."""
    torch.manual_seed(0)
    model = VoxelAutoencoder(AEConfig(resolution=res)).to(device)
    fmt = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.rand(batch, 1, res, res, res, generator=g, device=device) > 0.99).float()
    x = x.contiguous(memory_format=fmt)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with ctx:
            logits = model(x)
        loss = reconstruction_loss(logits, x, "weighted_bce", pos_weight=99.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    print(f"device {device}, {a.resolution}³, batch {a.batch_size}, {a.steps} timed steps, threads "
          f"{torch.get_num_threads()}")
    base = samples_per_s(device, a.resolution, a.batch_size, a.steps, a.warmup, bf16=False)
    print(f"fp32             {base:9.1f} samples/s   1.00x")
    if a.bf16:
        bf = samples_per_s(device, a.resolution, a.batch_size, a.steps, a.warmup, bf16=True)
        print(f"bf16 autocast    {bf:9.1f} samples/s   {bf / base:.2f}x")


if __name__ == "__main__":
    main()
