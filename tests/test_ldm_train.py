"""LDM training: the loss falls on toy latents, exact resume, the latent cache, EMA, CLI and bad inputs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from voxdiff.checkpoint import load_checkpoint, save_checkpoint
from voxdiff.config import AEConfig, AETrainConfig, LDMTrainConfig, SchedulerConfig, UNetConfig, to_dict
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.schedulers import DDPMScheduler
from voxdiff.training.ldm import diffusion_loss, ema_multi_avg_fn, train_ldm
from voxdiff.utils import VoxdiffError

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_groups=4, num_heads=2, dropout=0.1)


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: one intra-op thread is faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_ae_ckpt(path: Path, channels: int = 16, with_stats: bool = True) -> Path:
    """A randomly initialised tiny 32³ AE saved like the AE trainer does."""
    torch.manual_seed(0)
    cfg = AEConfig(resolution=32, channels=(4, 8, 8), latent_channels=channels)
    ae = VoxelAutoencoder(cfg)
    extra = {"latent_mean": [0.05] * channels, "latent_std": [0.5] * channels} if with_stats else {}
    save_checkpoint(path, kind="autoencoder", config=to_dict(AETrainConfig(model=cfg)), model=ae.state_dict(),
                    extra=extra)
    return path


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
    assert ck["step"] == 3 and ck["ema"] is not None and ck["extra"]["latent_shape"] == [16, 4, 4, 4]
    assert ck["extra"]["latent_std"] == pytest.approx([0.5] * 16) and len(ck["extra"]["ae_hash"]) == 64
    assert ck["extra"]["ema_n_averaged"] == 3
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
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["extra"]["smooth_loss"] == b["extra"]["smooth_loss"]
    assert a["extra"]["best_metric"] == b["extra"]["best_metric"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_bad_inputs(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VoxdiffError, match="not found"):
        train_ldm(_cfg(tiny_voxel_dir, tmp_path / "no_ae.pt", tmp_path / "r1"), progress=False)
    odd = make_ae_ckpt(tmp_path / "ae8.pt", channels=8)
    with pytest.raises(VoxdiffError, match="8 channels"):
        train_ldm(_cfg(tiny_voxel_dir, odd, tmp_path / "r2"), progress=False)
    with pytest.raises(VoxdiffError, match="training voxels not found"):
        train_ldm(_cfg(tmp_path / "no_data", ae_dir, tmp_path / "r3"), progress=False)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))  # nothing half-written
    train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "r4", num_steps=1), progress=False)
    with pytest.raises(VoxdiffError, match="--resume"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "r4", num_steps=1), progress=False)
    bigger = UNetConfig(**{**to_dict(TINY), "ch_mult": (1, 2), "attn_levels": (1,), "ch": 16})
    with pytest.raises(VoxdiffError, match="model differs"):
        train_ldm(_cfg(tiny_voxel_dir, ae_dir, tmp_path / "r4", num_steps=2, resume=True, model=bigger),
                  progress=False)
    with pytest.raises(ValueError, match="cfg_dropout"):
        LDMTrainConfig(cfg_dropout=1.0)


def test_train_cli(tiny_voxel_dir: Path, ae_dir: Path, tmp_path: Path, python: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [python, "diffusion/train.py", "--dataset_path", str(tiny_voxel_dir), "--ae_ckpt_path", str(ae_dir),
            "--ckpt_path", str(tmp_path / "run"), "--use_cfg", "--preset", "small", "--num_steps", "2",
            "--batch_size", "4", "--warmup_steps", "1", "--no_preview", "--device", "cpu"]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "run")
    cfg = ck["config"]
    assert cfg["use_cfg"] and cfg["cfg_dropout"] == 0.1 and cfg["model"]["ch"] == 32 and ck["step"] == 2
