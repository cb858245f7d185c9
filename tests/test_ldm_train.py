"""LDM training: the loss falls on toy latents, exact resume, the latent cache, EMA, CLI and bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, ROOT, TINY_UNET, make_ae_ckpt

from voxdiff.checkpoint import load_checkpoint
from voxdiff.config import LDMTrainConfig, SchedulerConfig, UNetConfig, to_dict
from voxdiff.errors import VoxdiffError
from voxdiff.models.unet3d import UNet3D
from voxdiff.schedulers import DDPMScheduler
from voxdiff.training.common import warmup_lr
from voxdiff.training.ldm import diffusion_loss, ema_multi_avg_fn, min_snr_weight, train_ldm

TINY = UNetConfig(**{**to_dict(TINY_UNET), "dropout": 0.1})


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ae")
    make_ae_ckpt(d / "best.pt")
    return d


def _cfg(data: Path, ae: Path, run: Path, **kw) -> LDMTrainConfig:
    base = dict(dataset_path=str(data), ae_ckpt_path=str(ae), ckpt_path=str(run), num_steps=6, batch_size=8,
                warmup_steps=2, ckpt_every=3, log_every=1, device="cpu", seed=5, model=TINY, preview=False,
                scheduler=SchedulerConfig(num_train_timesteps=50))
    return LDMTrainConfig(**{**base, **kw})


def test_loss_falls_on_toy_latents() -> None:
    torch.manual_seed(0)
    # toy latents: one fixed pattern per class, so the class determines x_0 and the optimal loss is ~0
    z = torch.stack([torch.linspace(-1, 1, 16 * 64).reshape(16, 4, 4, 4), torch.randn(16, 4, 4, 4)])
    y = torch.tensor([0, 1])
    model = UNet3D(UNetConfig(**{**to_dict(TINY), "ch_mult": (1, 2), "attn_levels": (1,), "dropout": 0.0}))
    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    held_out = dict(z0=z.repeat(8, 1, 1, 1, 1), y=y.repeat(8), t=torch.randint(0, 1000, (16,), generator=g),
                    noise=torch.randn(16, 16, 4, 4, 4, generator=g))

    def eval_loss() -> float:
        with torch.no_grad():
            return float(diffusion_loss(model, sched, **held_out))

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(60):
        idx = torch.randint(0, 2, (8,), generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        loss = diffusion_loss(model, sched, z[idx], y[idx], t, torch.randn(8, 16, 4, 4, 4, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_ema_warmup_then_decay() -> None:
    fn = ema_multi_avg_fn(0.9)
    e, p = [torch.zeros(3)], [torch.ones(3)]
    fn(e, p, torch.tensor(0))  # d = min(0.9, 1/10) = 0.1 -> moves 90% of the way
    torch.testing.assert_close(e[0], torch.full((3,), 0.9))
    e = [torch.zeros(3)]
    fn(e, p, torch.tensor(10_000))  # d = 0.9
    torch.testing.assert_close(e[0], torch.full((3,), 0.1))


def test_train_writes_checkpoints_and_caches_latents(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path) -> None:
    res = train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "run", num_steps=3, use_cfg=True, preview=True),
                    progress=False)
    assert res["step"] == 3 and res["best_heldout_loss"] < float("inf")
    ck = load_checkpoint(tmp_path / "run" / "last.pt", kind="ldm")
    assert ck.step == 3 and ck.ema is not None and ck.meta.latent_shape == [16, 4, 4, 4]
    assert len(ck.meta.ae_sha256) == 64 and ck.meta.ae_file == "best.pt" and ck.meta.ema_n_averaged == 3
    assert not hasattr(ck.meta, "latent_std")  # the latent scale lives with the AE only
    assert ck.model_config == to_dict(TINY) and UNet3D(UNetConfig(**ck.model_config))  # rebuilt from its own config
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "log.png").is_file()
    assert (tmp_path / "run" / "samples_000003.png").stat().st_size > 1000  # end-of-training render
    cached = sorted((ae_dir / "latents").glob("*.npz"))
    assert [p.name.split("_")[0] for p in cached] == ["train"]
    mtimes = [p.stat().st_mtime_ns for p in cached]
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "run2", num_steps=1), progress=False)
    assert [p.stat().st_mtime_ns for p in sorted((ae_dir / "latents").glob("*.npz"))] == mtimes  # reused


def test_resume_equals_uninterrupted(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path) -> None:
    # dropout and label dropout on, so the resumed run must also restore the RNG streams
    kw = dict(use_cfg=True, cfg_dropout=0.3)
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "a", num_steps=6, **kw), progress=False)
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "b", num_steps=3, **kw), progress=False)
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "b", num_steps=6, resume=True, **kw), progress=False)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a.step == b.step == 6
    for part in ("model", "ema"):
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), (part, k)
    assert a.meta.smooth_loss == b.meta.smooth_loss
    assert a.meta.best_heldout_loss == b.meta.best_heldout_loss
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_bad_inputs(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VoxdiffError, match="not found"):
        train_ldm(_cfg(tiny_voxel_dir, tmp_path / "no_ae.pt", tmp_path / "r1"), progress=False)
    odd = make_ae_ckpt(tmp_path / "ae8.pt", latent_channels=8)
    with pytest.raises(VoxdiffError, match="8 channels"):
        train_ldm(_cfg(tiny_voxel_dir, odd, tmp_path / "r2"), progress=False)
    with pytest.raises(VoxdiffError, match="training voxels not found"):
        train_ldm(_cfg(tmp_path / "no_data", ae_dir, tmp_path / "r3"), progress=False)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))  # nothing half-written
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "r4", num_steps=1), progress=False)
    with pytest.raises(VoxdiffError, match="--resume to continue it, --overwrite to replace it"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "r4", num_steps=1), progress=False)
    nostats = make_ae_ckpt(tmp_path / "ae_nostats.pt", with_stats=False)
    with pytest.raises(VoxdiffError, match="no latent statistics"):
        train_ldm(_cfg(tiny_voxel_dir, nostats, tmp_path / "r5"), progress=False)
    bigger = UNetConfig(**{**to_dict(TINY), "ch_mult": (1, 2), "attn_levels": (1,), "ch": 16})
    with pytest.raises(VoxdiffError, match=r"config mismatch \(model: checkpoint"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "r4", num_steps=2, resume=True, model=bigger),
                  progress=False)
    with pytest.raises(ValueError, match="cfg_dropout"):
        LDMTrainConfig(cfg_dropout=1.0)


def test_train_cli(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path, python: str) -> None:
    args = [python, "diffusion/train.py", "--dataset_path", str(tiny_voxel_dir), "--ae_ckpt_path", str(ae_dir),
            "--ckpt_path", str(tmp_path / "run"), "--use_cfg", "--unet_preset", "small", "--ch", "16",
            "--num_steps", "2", "--batch_size", "4", "--warmup_steps", "1", "--no_preview", "--device", "cpu",
            "--beta_schedule", "cosine"]
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "run")
    cfg = ck.train_config
    assert cfg["use_cfg"] and cfg["cfg_dropout"] == 0.1 and ck.step == 2
    assert ck.model_config["ch"] == 16 and tuple(ck.model_config["ch_mult"]) == (1, 2, 2)  # small, ch changed
    assert ck.meta.scheduler["beta_schedule"] == "cosine"


def test_cosine_lr_decays_to_a_tenth_after_warmup() -> None:
    """The LR schedule: linear warmup, then constant, or (lr_schedule cosine) a cosine decay that ends at lr/10."""
    lrs = [warmup_lr(s, 1e-3, 10, 111) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4) and lrs[60] == pytest.approx(5.5e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert [warmup_lr(s, 1e-3, 10) for s in (10, 500)] == [1e-3, 1e-3]
    with pytest.raises(ValueError):
        LDMTrainConfig(lr_schedule="linear")  # type: ignore[arg-type]


# ---- v-prediction, min-SNR-γ, kept steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(pred: str) -> None:
    """Hang et al. 2023: min(SNR, γ)/SNR for an ε target, min(SNR, γ)/(SNR + 1) for a v target; SNR = ᾱ/(1−ᾱ)."""
    sched = DDPMScheduler(SchedulerConfig(prediction_type=pred))
    t = torch.tensor([0, 10, 150, 500, 999])
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    snr = a / (1 - a)
    ref = np.minimum(snr, 5.0) / (snr if pred == "epsilon" else snr + 1)
    w = min_snr_weight(sched, t, 5.0)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-10)
    assert (w > 0).all() and (w <= 1).all()
    # SNR = 0 (zero terminal SNR): the v weight is 0, the ε weight's 0/0 is taken as its limit 1, never NaN
    zero = DDPMScheduler(SchedulerConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    assert float(min_snr_weight(zero, torch.tensor([999]), 5.0)) == 0.0
    sched.alphas_cumprod = sched.alphas_cumprod.clone()
    sched.alphas_cumprod[-1] = 0.0
    assert torch.isfinite(min_snr_weight(sched, t, 5.0)).all()
    if pred == "epsilon":
        assert float(min_snr_weight(sched, torch.tensor([999]), 5.0)) == 1.0


def test_v_target_and_weighted_loss() -> None:
    """The v target: a model returning the true v has zero loss; a zero model's loss is mean_i w_i · mean(v_i²), and
    without γ the plain mean of v² (ε-prediction's loss is unchanged: mean of ε²)."""
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 16, 2, 2, 2, generator=g), torch.randn(4, 16, 2, 2, 2, generator=g)
    t, y = torch.tensor([0, 20, 45, 49]), torch.zeros(4, dtype=torch.long)
    sched = DDPMScheduler(SchedulerConfig(num_train_timesteps=50, prediction_type="v_prediction",
                                          rescale_betas_zero_snr=True))
    v = sched.get_velocity(z0, noise, t)
    assert float(diffusion_loss(lambda x, t, y: v, sched, z0, y, t, noise, snr_gamma=5.0)) < 1e-12
    zero_model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    w = min_snr_weight(sched, t, 5.0).float()
    expected = (w * v.square().flatten(1).mean(1)).mean()
    torch.testing.assert_close(diffusion_loss(zero_model, sched, z0, y, t, noise, snr_gamma=5.0), expected)
    assert float(w[-1]) == 0.0  # t = T − 1 at zero SNR carries no weight
    torch.testing.assert_close(diffusion_loss(zero_model, sched, z0, y, t, noise), v.square().mean())
    eps_sched = DDPMScheduler(SchedulerConfig(num_train_timesteps=50))
    assert torch.equal(diffusion_loss(zero_model, eps_sched, z0, y, t, noise), noise.square().mean())


def test_v_prediction_min_snr_zero_snr_run_keeps_steps(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path) -> None:
    """A tiny run with v-prediction, min-SNR-γ, trailing spacing and zero terminal SNR trains with finite losses (and
    renders its preview through the v sampler); keep_steps writes loadable step{N}.pt files, the last one equal to
    last.pt; a resume with another γ is refused; --overwrite removes the replaced run's kept steps."""
    sched = SchedulerConfig(num_train_timesteps=50, prediction_type="v_prediction", timestep_spacing="trailing",
                            rescale_betas_zero_snr=True)
    kw = dict(scheduler=sched, snr_gamma=5.0, keep_steps=(2, 4), num_steps=4, ckpt_every=3, preview=True)
    run = tmp_path / "run"
    res = train_ldm(_cfg(tiny_voxel_dir, ae_dir, run, **kw), progress=False)
    assert res["step"] == 4 and np.isfinite(res["loss_smooth"]) and np.isfinite(res["best_heldout_loss"])
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert all(np.isfinite(row["val_loss"]) for row in rows if "val_loss" in row)
    assert sorted(p.name for p in run.glob("step*.pt")) == ["step2.pt", "step4.pt"]
    last = load_checkpoint(run / "last.pt", kind="ldm")
    assert last.meta.scheduler["prediction_type"] == "v_prediction" and last.train_config["snr_gamma"] == 5.0
    for n in (2, 4):
        ck = load_checkpoint(run / f"step{n}.pt", kind="ldm")
        assert ck.step == n and ck.meta.scheduler == last.meta.scheduler
    kept = load_checkpoint(run / "step4.pt", kind="ldm")
    assert all(torch.equal(kept.ema[k], last.ema[k]) for k in last.ema)
    assert kept.meta.best_heldout_loss == last.meta.best_heldout_loss
    assert (run / "samples_000004.png").is_file()
    with pytest.raises(VoxdiffError, match="snr_gamma"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, run, **{**kw, "snr_gamma": None, "num_steps": 5}, resume=True),
                  progress=False)
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, run, **{**kw, "keep_steps": (1,), "num_steps": 1, "preview": False},
                   overwrite=True), progress=False)
    assert sorted(p.name for p in run.glob("step*.pt")) == ["step1.pt"]
