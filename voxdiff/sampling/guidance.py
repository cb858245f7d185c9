"""Classifier-free guidance in one batched forward (`guided_eps`) and the reverse-diffusion loop (`sample_latents`).

The bottom of voxdiff.sampling: torch, voxdiff.checkpoint (`unwrap`) and voxdiff.schedulers (types) only; the
pipeline imports this module, never the reverse. The network and the scheduler are arguments: nothing here builds or
knows a noise process. Shared by the pipeline (sampling) and voxdiff.sds (the guided ε̂ of its gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from voxdiff.checkpoint import unwrap
from voxdiff.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["guided_eps", "sample_latents"]


def guided_eps(
    model: torch.nn.Module, x: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor, scale: float,
    rescale: float = 0.0,
) -> torch.Tensor:
    """Classifier-free guided noise prediction (Ho & Salimans 2022), both branches in ONE batched forward.

        ε̂ = (1 + w) · ε_θ(x, t, y) − w · ε_θ(x, t, ∅)

    `rescale` φ (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", eq. 15-16):
    ε̂ ← φ · ε̂ · std(ε_c) / std(ε̂) + (1 − φ) · ε̂, per sample: large w inflates ε̂'s scale (over-saturated, bloated
    shapes); rescaling brings it back to the conditional prediction's. φ = 0 is plain guidance.

    Scale convention: w = 0 is exactly the plain conditional prediction (the unconditional branch is then skipped,
    not just weighted by zero), w = −1 is the unconditional model, w > 0 strengthens the condition. In the other
    common convention ε_u + s (ε_c − ε_u), s = 1 + w. The null class ∅ is the model's `null_class` id.
    Shared by the sampler and SDS.
    """
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    if scale == 0:
        return model(x, t, y)
    null = torch.full_like(y, unwrap(model).null_class)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    eps_c, eps_u = eps.chunk(2)
    guided = (1 + scale) * eps_c - scale * eps_u
    if rescale > 0:
        dims = tuple(range(1, guided.ndim))
        ratio = eps_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    labels: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    rescale: float = 0.0,
    noise: torch.Tensor | None = None,
    latent_shape: Sequence[int] | None = None,
    num_steps: int | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_T ~ N(0, I) to (normalised) latents z_0 of shape (B, *latent_shape).

    The arguments after `model` are those of `LatentVoxelPipeline.sample_latents`, in its order (the method is this
    function with the pipeline's U-Net, latent shape and autocast). labels (B,) on the device to sample on;
    cfg_scale w and `rescale` φ: see `guided_eps`; `noise` (B, *latent_shape) replaces the draw of x_T from
    `generator` when given. num_steps: call `scheduler.set_timesteps(num_steps)` first (None: keep the scheduler's
    current timesteps).
    """
    device = labels.device
    if noise is None:
        if latent_shape is None:
            raise ValueError("sample_latents needs latent_shape or noise")
        gen_device = generator.device if generator is not None else device
        noise = torch.randn((len(labels), *latent_shape), generator=generator, device=gen_device)
    x = noise.to(device=device, dtype=torch.float32)
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        eps = guided_eps(model, x, int(t), labels, cfg_scale, rescale)
        x = scheduler.step(eps.float(), int(t), x, generator).prev_sample
    return x
