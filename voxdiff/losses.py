"""Reconstruction losses for sparse occupancy grids, all on logits (a leaf module; torch only).

Surface voxels fill under 1% of a 64³ grid, so the plain mean BCE is dominated by empty space and is minimised by a
near-empty output. The variants re-balance occupied voxels:

- "bce":          mean binary cross-entropy (the seed).
- "weighted_bce": BCE with the occupied term multiplied by `pos_weight` (default (1-p)/p from training occupancy p).
- "dice":         1 - soft Dice per shape (Milletari et al. 2016, eq. 1), averaged over the batch; scale-free in p.
- "bce_dice":     bce + dice.
- "focal":        focal loss (Lin et al. 2017, eq. 5) with alpha weighting the occupied class, gamma = 2.

A variational AE adds `kl_to_standard_normal` (weighted by AETrainConfig.kl_weight) to the reconstruction loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voxdiff.config import AELoss, check_literal

__all__ = [
    "bce_loss",
    "weighted_bce_loss",
    "dice_loss",
    "focal_loss",
    "reconstruction_loss",
    "pos_weight_from_occupancy",
    "kl_to_standard_normal",
]


def pos_weight_from_occupancy(occupancy: float, max_weight: float = 1000.0) -> float:
    """(1 - p) / p for an occupied fraction p, so both classes carry equal total weight; clipped to `max_weight`."""
    p = min(max(float(occupancy), 1.0 / (1.0 + max_weight)), 1.0)
    return min((1.0 - p) / p, max_weight) if p < 1.0 else 1.0


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE over all voxels."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def weighted_bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Mean of -[w·t·log σ(x) + (1-t)·log(1-σ(x))]: occupied voxels weigh `pos_weight` times more."""
    w = torch.tensor(float(pos_weight), device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=w)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per shape, mean over the batch.

    1. p = σ(x); 2. per shape: D = (2 Σ p·t + eps) / (Σ p + Σ t + eps) (Milletari et al. eq. 1, squares dropped, eps
    smoothing keeps empty shapes finite); 3. loss = mean(1 - D).
    """
    p = torch.sigmoid(logits.float()).reshape(logits.shape[0], -1)
    t = target.float().reshape(target.shape[0], -1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss FL = -α_t (1 - p_t)^γ log p_t (Lin et al. 2017, eq. 5).

    1. log p_t from BCE-with-logits (stable); 2. p_t = exp(log p_t); 3. α_t = α for occupied voxels, 1 - α for empty;
    α > 0.5 up-weights the rare occupied class, (1 - p_t)^γ down-weights the easy empty space.
    """
    x, t = logits.float(), target.float()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # = -log p_t
    p_t = torch.exp(-ce)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return (alpha_t * (1 - p_t).pow(gamma) * ce).mean()


def reconstruction_loss(
    logits: torch.Tensor, target: torch.Tensor, kind: AELoss = "bce", pos_weight: float | None = None
) -> torch.Tensor:
    """Dispatch on `kind` (see the module docstring). `pos_weight` is required for "weighted_bce"."""
    check_literal(kind, AELoss, "loss")
    if kind == "bce":
        return bce_loss(logits, target)
    if kind == "weighted_bce":
        if pos_weight is None:
            raise ValueError("weighted_bce needs pos_weight (derive it with pos_weight_from_occupancy)")
        return weighted_bce_loss(logits, target, pos_weight)
    if kind == "dice":
        return dice_loss(logits, target)
    if kind == "bce_dice":
        return bce_loss(logits, target) + dice_loss(logits, target)
    return focal_loss(logits, target)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent number, averaged over the batch and every latent number:
    mean of 0.5·(μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, appendix B), in fp32. A mean rather than Stable
    Diffusion's sum, so its weight does not depend on the latent's size."""
    mu, lv = mean.float(), logvar.float()
    return 0.5 * (mu.square() + lv.exp() - 1.0 - lv).mean()
