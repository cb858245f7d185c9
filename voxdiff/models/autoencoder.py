"""3D convolutional autoencoder (the seed's architecture): (B,1,R,R,R) -> (B,16,R/8,R/8,R/8) -> occupancy probabilities.

Encoder: Conv3d 1->c0 (k4 s2) -> c0->c1 (k3) -> c1->c1 (k4 s2) -> c1->c2 (k3) -> c2->c2 (k4 s2) -> c2->latent (k3),
each but the last followed by BatchNorm3d + LeakyReLU(0.2). The decoder mirrors it with ConvTranspose3d and ends in
logits; `decode` applies the sigmoid. With the default channels (12, 24, 48) and R = 64 this is exactly the seed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.config import AEConfig, AETrainConfig, from_dict


def _block(conv: nn.Module, out_ch: int, slope: float) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm3d(out_ch), nn.LeakyReLU(slope, inplace=True))


class VoxelAutoencoder(nn.Module):
    """Conv3d + BatchNorm3d + LeakyReLU autoencoder with a (latent_channels, R/8, R/8, R/8) latent."""

    def __init__(self, cfg: AEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        c0, c1, c2 = cfg.channels
        s, lat = cfg.negative_slope, cfg.latent_channels
        self.encoder = nn.Sequential(
            _block(nn.Conv3d(1, c0, 4, 2, 1), c0, s),
            _block(nn.Conv3d(c0, c1, 3, 1, 1), c1, s),
            _block(nn.Conv3d(c1, c1, 4, 2, 1), c1, s),
            _block(nn.Conv3d(c1, c2, 3, 1, 1), c2, s),
            _block(nn.Conv3d(c2, c2, 4, 2, 1), c2, s),
            nn.Conv3d(c2, lat, 3, 1, 1),
        )
        self.decoder = nn.Sequential(
            _block(nn.ConvTranspose3d(lat, c2, 3, 1, 1), c2, s),
            _block(nn.ConvTranspose3d(c2, c2, 4, 2, 1), c2, s),
            _block(nn.ConvTranspose3d(c2, c1, 3, 1, 1), c1, s),
            _block(nn.ConvTranspose3d(c1, c1, 4, 2, 1), c1, s),
            _block(nn.ConvTranspose3d(c1, c0, 3, 1, 1), c0, s),
            nn.ConvTranspose3d(c0, 1, 4, 2, 1),
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        r = self.cfg.latent_resolution
        return (self.cfg.latent_channels, r, r, r)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,R,R,R) occupancy in [0,1] -> (B,latent_channels,R/8,R/8,R/8) latent (unnormalised)."""
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[-1] != self.cfg.resolution:
            raise ValueError(f"expected (B,1,{self.cfg.resolution},{self.cfg.resolution},{self.cfg.resolution}); "
                             f"got {tuple(x.shape)}")
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> (B,1,R,R,R) occupancy logits (train with BCE-with-logits for stability)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """Latent -> occupancy probabilities, optionally nearest-neighbour upsampled to `resolution` (e.g. 128)."""
        p = torch.sigmoid(self.decode_logits(z).float())
        if resolution is not None and resolution != p.shape[-1]:
            if resolution % p.shape[-1]:
                raise ValueError(f"resolution {resolution} is not a multiple of the AE's {p.shape[-1]}")
            p = F.interpolate(p, scale_factor=resolution // p.shape[-1], mode="nearest")
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits of x."""
        return self.decode_logits(self.encode(x))

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], map_location: Any = "cpu"
    ) -> tuple[VoxelAutoencoder, dict[str, Any]]:
        """Rebuild the AE (eval mode) from a checkpoint file or run dir; returns (model, checkpoint dict).

        The checkpoint's `extra["latent_mean"]` / `extra["latent_std"]` (per channel) normalise latents for the LDM.
        """
        from voxdiff.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, kind="autoencoder", map_location=map_location)
        cfg = from_dict(AETrainConfig, ckpt["config"]).model
        model = cls(cfg)
        model.load_state_dict(ckpt["model"])
        return model.eval(), ckpt
