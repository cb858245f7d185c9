"""Sampling speed: DDPM-1000 vs DDIM-50 (both with batched CFG), and batched CFG (one forward of 2B) vs two forwards.

Measures the latent reverse-diffusion loop only (the AE decode costs the same for every sampler), with a randomly
initialised UNet3D of the chosen preset: speed does not depend on the weights. Ratios are against a baseline run in
the same process.

    python bench/bench_sample.py                                   # CPU, small preset
    python bench/bench_sample.py --unet_preset course --device cuda --batch_size 100
"""

from __future__ import annotations

import argparse
import time

import torch

from voxdiff.config import UNET_PRESETS, SchedulerConfig, unet_preset
from voxdiff.device import resolve_device
from voxdiff.models.unet3d import UNet3D
from voxdiff.sampling import guided_eps, sample_latents
from voxdiff.schedulers import make_scheduler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampler(model: UNet3D, name: str, steps: int, labels: torch.Tensor, shape: tuple[int, ...],
                 scale: float) -> float:
    """Seconds for one full sampling loop of a batch."""
    sched = make_scheduler(name, SchedulerConfig(), steps)
    gen = torch.Generator(device=labels.device).manual_seed(0)
    _sync(labels.device)
    t0 = time.perf_counter()
    sample_latents(model, labels, sched, scale, gen, latent_shape=shape)
    _sync(labels.device)
    return time.perf_counter() - t0


@torch.no_grad()
def time_cfg(model: UNet3D, x: torch.Tensor, labels: torch.Tensor, batched: bool, iters: int) -> float:
    """Seconds per guided ε evaluation: one forward of 2B (guided_eps) or two forwards of B."""
    null = torch.full_like(labels, model.null_class)
    t = torch.full((len(x),), 500, device=x.device)
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        if batched:
            guided_eps(model, x, t, labels, 1.0)
        else:
            ec, eu = model(x, t, labels), model(x, t, null)
            _ = 2.0 * ec - eu
    _sync(x.device)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet_preset", default="small", choices=list(UNET_PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--latent_side", type=int, default=8)
    p.add_argument("--ddpm_steps", type=int, default=1000)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--cfg_iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    model = UNet3D(unet_preset(a.unet_preset)).to(device).eval()
    shape = (model.cfg.in_channels, a.latent_side, a.latent_side, a.latent_side)
    labels = torch.arange(a.batch_size, device=device) % model.num_classes
    x = torch.randn(a.batch_size, *shape, device=device)
    print(f"device={device} preset={a.unet_preset} params={sum(q.numel() for q in model.parameters()) / 1e6:.2f}M "
          f"batch={a.batch_size} latent={shape} threads={torch.get_num_threads()}")
    # warm-up (allocator, cudnn autotune, lazy init)
    time_cfg(model, x, labels, True, 2)
    time_cfg(model, x, labels, False, 2)

    batched = time_cfg(model, x, labels, True, a.cfg_iters)
    separate = time_cfg(model, x, labels, False, a.cfg_iters)
    print(f"CFG eps eval: two forwards of B {separate * 1e3:.1f} ms, one forward of 2B {batched * 1e3:.1f} ms "
          f"-> batched speed-up x{separate / batched:.2f}")

    ddim = time_sampler(model, "ddim", a.ddim_steps, labels, shape, 1.0)
    ddpm = time_sampler(model, "ddpm", a.ddpm_steps, labels, shape, 1.0)
    print(f"DDPM-{a.ddpm_steps}: {ddpm:.1f} s/batch = {a.batch_size / ddpm:.3f} shapes/s")
    print(f"DDIM-{a.ddim_steps}: {ddim:.1f} s/batch = {a.batch_size / ddim:.3f} shapes/s")
    print(f"DDIM-{a.ddim_steps} vs DDPM-{a.ddpm_steps}: x{ddpm / ddim:.1f} shapes/s")


if __name__ == "__main__":
    main()
