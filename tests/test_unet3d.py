"""UNet3D: shapes, class conditioning, the null class and CFG label dropout, presets, checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_UNET

from voxdiff.checkpoint import Checkpoint, LDMMeta, load_unet, save_checkpoint
from voxdiff.config import UNET_PRESETS, UNetConfig, to_dict, unet_preset
from voxdiff.models.unet3d import LabelEmbedder, UNet3D, timestep_embedding

TINY = TINY_UNET


@pytest.mark.parametrize("cfg", [TINY, unet_preset("small")], ids=["tiny", "small"])
@pytest.mark.parametrize("side", [4, 8])
def test_output_shape(cfg: UNetConfig, side: int) -> None:
    torch.manual_seed(0)
    model = UNet3D(cfg).eval()
    x = torch.randn(2, cfg.in_channels, side, side, side)
    out = model(x, torch.tensor([0, 999]), torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_course_preset_matches_the_starter_network() -> None:
    cfg = unet_preset("course")
    assert (cfg.ch, cfg.ch_mult, cfg.attn_levels, cfg.num_res_blocks) == (192, (1, 2, 2), (1,), 3)
    assert set(UNET_PRESETS) >= {"course", "small"}
    assert unet_preset("seed") == cfg  # its old name, as scripts and notes written before the rename give it
    with pytest.raises(ValueError, match="preset"):
        unet_preset("huge")


def test_class_label_and_timestep_change_the_output() -> None:
    torch.manual_seed(0)
    model = UNet3D(TINY).eval()
    x = torch.randn(1, 16, 4, 4, 4)
    t = torch.tensor([100])
    outs = [model(x, t, torch.tensor([c])) for c in range(TINY.num_classes + 1)]  # includes the null class
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert (outs[i] - outs[j]).abs().max() > 1e-5
    assert (model(x, torch.tensor([900]), torch.tensor([0])) - outs[0]).abs().max() > 1e-5


def test_bad_inputs_are_refused() -> None:
    model = UNet3D(TINY).eval()
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.randn(1, 16, 5, 5, 5), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class labels"):
        model(torch.randn(1, 16, 4, 4, 4), torch.tensor([1]), torch.tensor([TINY.num_classes + 1]))
    with pytest.raises(ValueError, match="attn_levels"):
        UNetConfig(ch_mult=(1, 2), attn_levels=(2,))


def test_label_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=3, dim=4, dropout_prob=0.3)
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = emb.token_drop(labels)
    frac = float((dropped == 3).float().mean())
    assert abs(frac - 0.3) < 0.02
    assert set(dropped.unique().tolist()) == {0, 3}
    emb.eval()
    assert torch.equal(emb(labels[:5]), emb.table(labels[:5]))
    emb.train()
    with torch.no_grad():
        is_null = (emb(labels) == emb.table.weight[3]).all(1)
    assert abs(float(is_null.float().mean()) - 0.3) < 0.02
    no_drop = LabelEmbedder(3, 4, 0.0).train()
    assert torch.equal(no_drop(labels[:10]), no_drop.table(labels[:10]))


def test_timestep_embedding_distinguishes_steps() -> None:
    e = timestep_embedding(torch.tensor([0, 1, 500]), 32)
    assert e.shape == (3, 32)
    assert (e[0] - e[1]).abs().max() > 1e-3 and (e[1] - e[2]).abs().max() > 1e-3


def test_load_unet_picks_ema_or_raw(tmp_path) -> None:
    torch.manual_seed(0)
    model, ema = UNet3D(TINY), UNet3D(TINY)
    save_checkpoint(tmp_path / "last.pt", Checkpoint(kind="ldm", model_config=to_dict(TINY), model=model.state_dict(),
                                                     ema=ema.state_dict(), meta=LDMMeta()))
    got_ema, _ = load_unet(tmp_path, use_ema=True)
    got_raw, ck = load_unet(tmp_path / "last.pt", use_ema=False)
    assert ck.kind == "ldm" and not got_ema.training
    name = "conv_in.weight"
    assert torch.equal(got_ema.state_dict()[name], ema.state_dict()[name])
    assert torch.equal(got_raw.state_dict()[name], model.state_dict()[name])


def test_timestep_embedding_is_its_formula() -> None:
    """emb[i, j] = cos(t_i · 10000^(−j/h)) for j < h and sin(t_i · 10000^(−(j−h)/h)) after, h = dim // 2; odd dims pad
    one zero (Transformer / DDPM §B)."""
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    for dim in (8, 33):
        h = dim // 2
        freqs = 10000.0 ** (-np.arange(h) / h)
        args = t.double().numpy()[:, None] * freqs[None]
        expect = np.concatenate([np.cos(args), np.sin(args), np.zeros((4, dim - 2 * h))], axis=1)
        np.testing.assert_allclose(timestep_embedding(t, dim).double().numpy(), expect, atol=2e-4, rtol=0)
