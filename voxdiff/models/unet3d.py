"""UNet3D over the AE latent: the 2D DDPM UNet (Ho et al. 2020) made 3D, class-conditioned for classifier-free guidance.

A network only: it maps (x_t, t, y) to ε̂ and knows nothing of the noise schedule (the sampler and the trainer take
the network and a scheduler as separate arguments).

    x (B,C,r,r,r) -> conv_in -> [ResBlock×n (+Attention)  -> Downsample] per level -> ResBlock, Attention, ResBlock
      -> [ResBlock×(n+1) over concatenated skips (+Attention) -> Upsample] per level -> GroupNorm, SiLU, conv_out

Conditioning: emb = MLP(sinusoidal(t)) + LabelEmbedder(y), added inside every residual block. The label table has
`num_classes + 1` rows; row `num_classes` is the null (unconditional) class used by CFG. Label dropout for CFG training
lives in the embedder (DiT's `LabelEmbedder.token_drop`) and only acts in training mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voxdiff.config import UNetConfig

__all__ = ["timestep_embedding", "LabelEmbedder", "ResBlock3d", "Attention3d", "UNet3D"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of (possibly fractional) timesteps (Transformer / DDPM §B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with a null class (id = num_classes) and label dropout for CFG (DiT's LabelEmbedder)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"label dropout must be in [0, 1); got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, dim)

    def token_drop(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null id with probability `dropout_prob` (global torch RNG: resumable)."""
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(f"class labels must be in 0..{self.num_classes} (the last is the null class)")
        if self.training and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.table(labels)


class ResBlock3d(nn.Module):
    """GroupNorm -> SiLU -> Conv3d, + projected embedding, GroupNorm -> SiLU -> Dropout -> Conv3d, residual (DDPM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention3d(nn.Module):
    """Multi-head self-attention over all voxels of a (B,C,D,H,W) map (F.scaled_dot_product_attention), residual."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv3d(ch, 3 * ch, 1)
        self.proj = nn.Conv3d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, d)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, *spatial)
        return x + self.proj(h)


class _Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention."""

    def __init__(self, blocks: list[ResBlock3d], attns: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet3D(nn.Module):
    """ε-prediction UNet over (B, in_channels, r, r, r) latents, conditioned on timestep and class.

    forward(x, t, y): x (B,C,r,r,r) float, t (B,) timesteps, y (B,) class ids in 0..num_classes (num_classes = null).
    r must be a multiple of `cfg.downsample_factor`. `class_dropout` is the CFG label-dropout probability in training.
    """

    def __init__(self, cfg: UNetConfig | None = None, class_dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig()
        ch, g, emb_dim = cfg.ch, cfg.num_groups, cfg.ch * 4
        self.num_classes = cfg.num_classes
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = LabelEmbedder(cfg.num_classes, emb_dim, class_dropout)
        self.conv_in = nn.Conv3d(cfg.in_channels, ch, 3, padding=1)

        def attn(level: int, c: int) -> nn.Module:
            return Attention3d(c, cfg.num_heads, g) if level in cfg.attn_levels else nn.Identity()

        # Down path: remember each output's width for the skip connections.
        skips, cur = [ch], ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        last = len(cfg.ch_mult) - 1
        for i, mult in enumerate(cfg.ch_mult):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(cur, out, emb_dim, cfg.dropout, g))
                attns.append(attn(i, out))
                cur = out
                skips.append(cur)
            self.down.append(_Level(blocks, attns))
            if i != last:
                self.downsample.append(nn.Conv3d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock3d(cur, cur, emb_dim, cfg.dropout, g)
        self.mid_attn = Attention3d(cur, cfg.num_heads, g)
        self.mid2 = ResBlock3d(cur, cur, emb_dim, cfg.dropout, g)
        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock3d(cur + skips.pop(), out, emb_dim, cfg.dropout, g))
                attns.append(attn(i, out))
                cur = out
            self.up.append(_Level(blocks, attns))
            if i != 0:
                self.upsample.append(nn.Conv3d(cur, cur, 3, padding=1))
        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv3d(cur, cfg.in_channels, 3, padding=1)

    @property
    def null_class(self) -> int:
        """The reserved unconditional class id (= num_classes)."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.cfg.downsample_factor
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels or any(s % f for s in x.shape[2:]):
            raise ValueError(f"UNet3D expects (B,{self.cfg.in_channels},r,r,r) with r a multiple of {f}; "
                             f"got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.cfg.ch).to(x.dtype)) + self.label_emb(y.to(x.device))
        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
