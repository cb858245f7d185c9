"""3D convolutional autoencoder: (B,1,R,R,R) -> (B,16,r,r,r), r = R / 2^stages -> occupancy logits.

block="course" (the course's starter network, exactly, with the default AEConfig): per stage a stride-2 Conv3d (k4)
then a k3 Conv3d, each followed by a norm + LeakyReLU(0.2), the last k3 conv giving the latent; the decoder mirrors it
with ConvTranspose3d. Encoder for three stages: Conv 1->c0 (k4 s2), c0->c1 (k3), c1->c1 (k4 s2), c1->c2 (k3),
c2->c2 (k4 s2), c2->latent (k3).
block="resnet": a residual block (norm, act, conv, norm, act, conv, + skip) at every resolution between the same
stride-2 steps, wider receptive fields for thin parts.
norm="group" swaps BatchNorm3d for GroupNorm (independent of batch size and of train/eval mode); upsample="nearest"
swaps each stride-2 transposed convolution for nearest upsampling + a k3 conv (no checkerboard artefacts).
variational=True (Stable Diffusion's AutoencoderKL): the encoder's last conv gives 2 × latent_channels, a mean and a
log-variance; training decodes a sample mean + σ·ε and adds a KL term, while `encode` (latent caches, sampling) is the
mean, deterministic.
A network only: it knows its own config (AEConfig) and nothing of training.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.config import AEConfig
from voxdiff.losses import kl_to_standard_normal

__all__ = ["VoxelAutoencoder", "LOGVAR_RANGE"]

LOGVAR_RANGE = (-30.0, 20.0)  # a variational encoder's log-variance is clamped here (diffusers' DiagonalGaussian)


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(ch)
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if ch % g == 0), ch)


class _Act(nn.Sequential):
    """conv -> norm -> LeakyReLU (the starter code's unit)."""

    def __init__(self, conv: nn.Module, ch: int, norm: str, slope: float) -> None:
        super().__init__(conv, _norm(norm, ch), nn.LeakyReLU(slope, inplace=True))


class _ResBlock(nn.Module):
    """norm -> act -> conv3 -> norm -> act -> conv3, plus a (1x1 projected) skip."""

    def __init__(self, cin: int, cout: int, norm: str, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(norm, cin), nn.LeakyReLU(slope), nn.Conv3d(cin, cout, 3, 1, 1),
                                  _norm(norm, cout), nn.LeakyReLU(slope), nn.Conv3d(cout, cout, 3, 1, 1))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _up(cin: int, cout: int, mode: str) -> nn.Module:
    """A stride-2 upsampling layer: ConvTranspose3d k4 s2 (the starter code's), or nearest upsample + Conv3d k3."""
    if mode == "transpose":
        return nn.ConvTranspose3d(cin, cout, 4, 2, 1)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cin, cout, 3, 1, 1))


def _encoder_out(cfg: AEConfig) -> int:
    """Channels of the encoder's last conv: the latent, or its mean and log-variance for a variational AE."""
    return 2 * cfg.latent_channels if cfg.variational else cfg.latent_channels


def _course_layers(cfg: AEConfig) -> tuple[nn.Sequential, nn.Sequential]:
    ch, lat, s, nm = list(cfg.channels), cfg.latent_channels, cfg.negative_slope, cfg.norm
    n = len(ch)
    enc: list[nn.Module] = [_Act(nn.Conv3d(1, ch[0], 4, 2, 1), ch[0], nm, s)]
    for i in range(n):
        if i > 0:
            enc.append(_Act(nn.Conv3d(ch[i], ch[i], 4, 2, 1), ch[i], nm, s))
        enc.append(_Act(nn.Conv3d(ch[i], ch[i + 1], 3, 1, 1), ch[i + 1], nm, s) if i < n - 1
                   else nn.Conv3d(ch[i], _encoder_out(cfg), 3, 1, 1))
    # the starter code's k3 decoder layers are ConvTranspose3d (the same map as a Conv3d); kept so its weights load
    k3 = (lambda a, b: nn.ConvTranspose3d(a, b, 3, 1, 1)) if cfg.upsample == "transpose" else \
        (lambda a, b: nn.Conv3d(a, b, 3, 1, 1))
    rc = ch[::-1]
    dec: list[nn.Module] = [_Act(k3(lat, rc[0]), rc[0], nm, s)]
    for i in range(n):
        if i < n - 1:
            dec += [_Act(_up(rc[i], rc[i], cfg.upsample), rc[i], nm, s), _Act(k3(rc[i], rc[i + 1]), rc[i + 1], nm, s)]
        else:
            dec.append(_up(rc[i], 1, cfg.upsample) if cfg.upsample == "transpose" else
                       nn.Sequential(_up(rc[i], rc[i], cfg.upsample), _norm(nm, rc[i]), nn.LeakyReLU(s, inplace=True),
                                     nn.Conv3d(rc[i], 1, 3, 1, 1)))
    return nn.Sequential(*enc), nn.Sequential(*dec)


def _resnet_layers(cfg: AEConfig) -> tuple[nn.Sequential, nn.Sequential]:
    ch, lat, s, nm = list(cfg.channels), cfg.latent_channels, cfg.negative_slope, cfg.norm
    enc: list[nn.Module] = [nn.Conv3d(1, ch[0], 4, 2, 1)]  # the first step is strided: the full grid is 1 channel
    for i in range(1, len(ch)):
        enc += [_ResBlock(ch[i - 1], ch[i], nm, s), nn.Conv3d(ch[i], ch[i], 3, 2, 1)]
    enc += [_ResBlock(ch[-1], ch[-1], nm, s), _norm(nm, ch[-1]), nn.LeakyReLU(s),
            nn.Conv3d(ch[-1], _encoder_out(cfg), 3, 1, 1)]
    dec: list[nn.Module] = [nn.Conv3d(lat, ch[-1], 3, 1, 1), _ResBlock(ch[-1], ch[-1], nm, s)]
    for i in range(len(ch) - 1, 0, -1):
        dec += [_up(ch[i], ch[i], cfg.upsample), _ResBlock(ch[i], ch[i - 1], nm, s)]
    dec += [_norm(nm, ch[0]), nn.LeakyReLU(s), _up(ch[0], 1, cfg.upsample) if cfg.upsample == "transpose" else
            nn.Sequential(_up(ch[0], ch[0], cfg.upsample), nn.LeakyReLU(s), nn.Conv3d(ch[0], 1, 3, 1, 1))]
    return nn.Sequential(*enc), nn.Sequential(*dec)


class VoxelAutoencoder(nn.Module):
    """Conv3d autoencoder with a (latent_channels, r, r, r) latent, r = resolution / 2^len(channels)."""

    def __init__(self, cfg: AEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        self.encoder, self.decoder = _course_layers(cfg) if cfg.block == "course" else _resnet_layers(cfg)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        res = self.cfg.latent_resolution
        return (self.cfg.latent_channels, res, res, res)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output: the latent, or mean and raw log-variance stacked on channels (variational)."""
        res = self.cfg.resolution
        if x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[-3:]) != (res, res, res):
            raise ValueError(f"expected (B,1,{res},{res},{res}); got {tuple(x.shape)}")
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,R,R,R) occupancy in [0,1] -> (B,latent_channels,r,r,r) latent (unnormalised); a variational AE's is
        its mean, so everything downstream (latent caches, the LDM, sampling) is deterministic."""
        h = self._encode(x)
        return h[:, : self.cfg.latent_channels] if self.cfg.variational else h

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each (B,latent_channels,r,r,r), of a variational AE's Gaussian q(z | x); the
        log-variance clamped to LOGVAR_RANGE (exp stays finite)."""
        if not self.cfg.variational:
            raise ValueError("encode_distribution needs a variational AE (AEConfig.variational)")
        mean, logvar = self._encode(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> (B,1,R,R,R) occupancy logits (train with BCE-with-logits for stability)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """Latent -> occupancy probabilities (fp32), optionally nearest-neighbour upsampled to `resolution`."""
        p = torch.sigmoid(self.decode_logits(z).float())
        if resolution is not None and resolution != p.shape[-1]:
            if resolution % p.shape[-1]:
                raise ValueError(f"resolution {resolution} is not a multiple of the AE's {p.shape[-1]}")
            p = F.interpolate(p, scale_factor=resolution // p.shape[-1], mode="nearest")
        return p

    @overload
    def forward(self, x: torch.Tensor, latent_noise: float = ..., return_kl: Literal[False] = ...) -> torch.Tensor:
        ...

    @overload
    def forward(self, x: torch.Tensor, latent_noise: float = ..., *,
                return_kl: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def forward(self, x: torch.Tensor, latent_noise: float = 0.0,
                return_kl: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction logits of x, and with `return_kl` the KL term (0 for a plain AE) as a second output: the
        trainer's one call, through DDP's forward. A variational AE decodes a sample z = mean + σ·ε in training mode
        and the mean in eval mode. With `latent_noise` σ > 0, Gaussian noise of σ times each latent channel's batch
        std is added to z before decoding, so the decoder learns to map a neighbourhood of a latent to one clean shape
        (what a diffusion model's imperfect latents need; a fixed-variance VAE does the same)."""
        if self.cfg.variational:
            mean, logvar = self.encode_distribution(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
            kl = kl_to_standard_normal(mean, logvar)
        else:
            z = self.encode(x)
            kl = z.new_zeros((), dtype=torch.float32)
        if latent_noise > 0:
            z = z + latent_noise * z.detach().std(dim=(0, 2, 3, 4), keepdim=True) * torch.randn_like(z)
        logits = self.decode_logits(z)
        return (logits, kl) if return_kl else logits
