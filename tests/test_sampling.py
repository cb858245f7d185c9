"""Sampling: CFG helper conventions, the loop, sample_to_files / diffusion/sample.py end to end, resume, bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENV, OCC, ROOT, TINY_UNET

from voxdiff.binarize import Binarization
from voxdiff.config import SampleConfig, SchedulerConfig
from voxdiff.models.unet3d import UNet3D
from voxdiff.sampling import LatentVoxelPipeline, guided_eps, sample_latents, sample_to_files, upsample_nearest
from voxdiff.schedulers import make_scheduler
from voxdiff.utils import VoxdiffError

TINY = TINY_UNET


class Spy(torch.nn.Module):
    """A fake ε-model recording the labels of every call; output depends on x, t and y."""

    null_class = 3

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(y.clone())
        return 0.1 * x + 0.01 * t.float().view(-1, 1, 1, 1, 1) + (y.float() + 1).view(-1, 1, 1, 1, 1)


def test_guided_eps_conventions() -> None:
    spy, x, y = Spy(), torch.randn(3, 16, 2, 2, 2), torch.tensor([0, 1, 2])
    eps_c, eps_u = spy(x, torch.full((3,), 5), y), spy(x, torch.full((3,), 5), torch.full((3,), 3))
    spy.calls.clear()
    out = guided_eps(spy, x, 5, y, 2.0)
    assert len(spy.calls) == 1, "both branches must run in one batched forward"
    assert torch.equal(spy.calls[0], torch.tensor([0, 1, 2, 3, 3, 3])), "second half must be the null class"
    torch.testing.assert_close(out, 3.0 * eps_c - 2.0 * eps_u)
    torch.testing.assert_close(guided_eps(spy, x, 5, y, -1.0), eps_u)
    assert torch.equal(guided_eps(spy, x, 5, y, 0.0), eps_c)  # w = 0 is exactly the conditional prediction


def test_guided_eps_w0_exact_with_a_real_unet() -> None:
    torch.manual_seed(0)
    model = UNet3D(TINY).eval()
    x, y = torch.randn(2, 16, 4, 4, 4), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(guided_eps(model, x, 30, y, 0.0), model(x, torch.tensor([30, 30]), y))
        uncond = model(x, torch.tensor([30, 30]), torch.full((2,), model.null_class))
        torch.testing.assert_close(guided_eps(model, x, 30, y, -1.0), uncond, rtol=1e-4, atol=1e-5)


def test_sample_latents_is_seeded() -> None:
    torch.manual_seed(0)
    model = UNet3D(TINY).eval()
    sched = make_scheduler("ddpm", SchedulerConfig(num_train_timesteps=6))
    y = torch.tensor([0, 1])
    runs = [sample_latents(model, sched, y, torch.Generator().manual_seed(s), 1.0, latent_shape=(16, 4, 4, 4))
            for s in (3, 3, 4)]
    assert runs[0].shape == (2, 16, 4, 4, 4) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_upsample_nearest() -> None:
    g = torch.arange(8, dtype=torch.uint8).reshape(1, 2, 2, 2)
    up = upsample_nearest(g, 2)
    assert up.shape == (1, 4, 4, 4) and up[0, 3, 3, 3] == 7 and up[0, 0, 1, 0] == 0 and up[0, 2, 0, 0] == 4


def _cfg(ckpts: dict[str, Path], save_dir: Path, **kw) -> SampleConfig:
    base = dict(ldm_ckpt_path=str(ckpts["ldm"]), ae_ckpt_path=str(ckpts["ae"]), save_dir=str(save_dir),
                categories=("chair", "table"), num_samples=5, batch_size=2, sampler="ddim", steps=4, eta=0.5,
                resolution=64, device="cpu", seed=3)
    return SampleConfig(**{**base, **kw})


def test_sample_resume_equals_uninterrupted(ckpts: dict[str, Path], tmp_path: Path) -> None:
    full = sample_to_files(_cfg(ckpts, tmp_path / "full"), progress=False)
    assert full["complete"]
    part = sample_to_files(_cfg(ckpts, tmp_path / "part"), progress=False, max_batches=2)
    assert not part["complete"] and not (tmp_path / "part" / "chair.npy").exists()  # nothing half-written
    again = sample_to_files(_cfg(ckpts, tmp_path / "part"), progress=False)
    assert again["complete"] and again["categories"]["chair"]["batches_new"] == 1
    for cat in ("chair", "table"):
        a, b = np.load(tmp_path / "full" / f"{cat}.npy"), np.load(tmp_path / "part" / f"{cat}.npy")
        assert a.shape == (5, 64, 64, 64) and np.array_equal(a, b)
    # a third run finds everything done and rewrites nothing
    third = sample_to_files(_cfg(ckpts, tmp_path / "part"), progress=False)
    assert all(c.get("skipped") for c in third["categories"].values())


def test_sample_cli_end_to_end(ckpts: dict[str, Path], tmp_path: Path, python: str) -> None:
    out = tmp_path / "samples"
    r = subprocess.run([python, "diffusion/sample.py", "--ldm_ckpt_path", str(ckpts["ldm"]), "--ae_ckpt_path",
                        str(ckpts["ae"]), "--save_dir", str(out), "--use_cfg", "--cfg_scale", "1.5", "--category",
                        "all", "--num_samples", "3", "--batch_size", "2", "--sampler", "ddim", "--steps", "3",
                        "--resolution", "64", "--binarize", "topk", "--device", "cpu"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cat in ("airplane", "chair", "table"):
        a = np.load(out / f"{cat}.npy")
        assert a.shape == (3, 64, 64, 64) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
        # top-k at the AE's 32³ with k = the category's occupancy, then 2× nearest upsampling: exactly 8k voxels
        assert (a.reshape(3, -1).sum(1) == 8 * round(OCC[cat])).all()
    meta = json.loads((out / "sample.json").read_text())
    assert meta["config"]["cfg_scale"] == 1.5 and meta["categories"]["chair"]["empty"] == 0


def test_threshold_path_gives_binary_grids(ckpts: dict[str, Path], tmp_path: Path) -> None:
    sample_to_files(_cfg(ckpts, tmp_path, categories=("airplane",), num_samples=2, threshold=0.5, use_cfg=False,
                         resolution=32), progress=False)
    a = np.load(tmp_path / "airplane.npy")
    assert a.shape == (2, 32, 32, 32) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}


def test_pipeline_object_is_the_path_of_sample_to_files(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """from_checkpoints -> sample_latents -> to_grids with the batch's seed gives exactly the rows sample.py writes."""
    from voxdiff.sampling import batch_seed

    cfg = _cfg(ckpts, tmp_path, categories=("table",), num_samples=2, batch_size=2, threshold=0.52)
    sample_to_files(cfg, progress=False)
    pipe = LatentVoxelPipeline.from_checkpoints(ckpts["ae"], ckpts["ldm"], device="cpu")
    labels = torch.full((2,), 2)
    z = pipe.sample_latents(labels, pipe.scheduler("ddim", 4, eta=0.5), 1.0,
                            torch.Generator().manual_seed(batch_seed(3, 2, 0)))
    grids = pipe.to_grids(z, labels, pipe.binarization("threshold", 0.52), resolution=64)
    assert np.array_equal(grids, np.load(tmp_path / "table.npy"))
    # the one rule: occupied = p > threshold, at the AE's resolution, then nearest upsampling
    probs = pipe.decode(z)
    assert np.array_equal(grids[:, ::2, ::2, ::2], (probs > 0.52).numpy().astype(np.uint8))


def test_binarization_modes(ckpts: dict[str, Path]) -> None:
    pipe = LatentVoxelPipeline.from_checkpoints(ckpts["ae"], ckpts["ldm"], device="cpu")
    assert pipe.binarization("calibrated") == Binarization(threshold=0.5)
    assert pipe.binarization("topk", resolution=64).topk == {0: 40, 1: 120, 2: 90}  # the AE's training occupancy
    assert pipe.binarization("topk", topk=800, resolution=64).topk == dict.fromkeys(range(3), 100)  # 800 / 2³
    probs = torch.tensor([[0.2, 0.5, 0.50001, 0.9]])
    assert Binarization(threshold=0.5)(probs).tolist() == [[False, False, True, True]]  # strictly greater
    assert Binarization(topk={1: 1})(probs, torch.tensor([1])).tolist() == [[False, False, False, True]]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ldm_ckpt_path": "ldm_nocfg", "use_cfg": True}, "without label dropout"),
        ({"ldm_ckpt_path": "ldm_5cls"}, "5 classes"),
        ({"ae_ckpt_path": "ae64"}, "latent shape"),
        ({"resolution": 48}, "impossible"),
        ({"resolution": 16}, "impossible"),
        ({"ldm_ckpt_path": "missing"}, "not found"),
    ],
)
def test_bad_inputs_raise_before_writing(ckpts: dict[str, Path], tmp_path: Path, kw: dict, match: str) -> None:
    kw = {k: (str(ckpts.get(v, tmp_path / "nope.pt")) if k.endswith("ckpt_path") else v) for k, v in kw.items()}
    with pytest.raises(VoxdiffError, match=match):
        sample_to_files(_cfg(ckpts, tmp_path / "out", **kw), progress=False)
    assert not (tmp_path / "out").exists()


def test_sample_cli_bad_input_one_line(ckpts: dict[str, Path], tmp_path: Path, python: str) -> None:
    r = subprocess.run([python, "diffusion/sample.py", "--ldm_ckpt_path", str(ckpts["ldm_nocfg"]), "--ae_ckpt_path",
                        str(ckpts["ae"]), "--save_dir", str(tmp_path / "s"), "--use_cfg", "--device", "cpu"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "label dropout" in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--no_use_cfg", "--cfg_scale", "3"], "--cfg_scale acts only with --use_cfg"),
        (["--topk", "50"], "--topk acts only with --binarize topk"),
        (["--binarize", "topk", "--threshold", "0.3"], "--threshold acts only with --binarize threshold"),
        (["--cfg_scale", "nan"], "finite"),
        (["--threshold", "1.5"], "threshold must be < 1.0"),
        (["--num_samples", "0"], "num_samples must be >= 1"),
    ],
)
def test_flags_that_would_be_ignored_or_are_out_of_range_are_refused(ckpts: dict[str, Path], flags: list[str],
                                                                     match: str, capsys: pytest.CaptureFixture) -> None:
    from voxdiff.cli import load_script

    script = load_script(ROOT / "diffusion" / "sample.py")
    with pytest.raises((VoxdiffError, ValueError, SystemExit)) as err:
        script.main(["--ldm_ckpt_path", str(ckpts["ldm"]), "--ae_ckpt_path", str(ckpts["ae"]), *flags])
    text = str(err.value) + capsys.readouterr().err
    assert match in text


def test_exported_pair_samples_like_the_training_checkpoints(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """export_model keeps what sampling needs (EMA weights, configs, metadata), drops optimizer/RNG, and re-links the
    LDM to the exported AE: the pair samples exactly what the training checkpoints sample."""
    from voxdiff.checkpoint import export_model, load_checkpoint

    ae, ldm = export_model(ckpts["ae"], ckpts["ldm"], tmp_path / "release")
    assert load_checkpoint(ldm).optimizer is None and load_checkpoint(ldm).ema is None
    assert LatentVoxelPipeline.from_checkpoints(ae, ldm).ae_matches
    for name, (a, b) in {"orig": (ckpts["ae"], ckpts["ldm"]), "release": (ae, ldm)}.items():
        sample_to_files(_cfg(ckpts, tmp_path / name, ae_ckpt_path=str(a), ldm_ckpt_path=str(b),
                             categories=("chair",), num_samples=2, threshold=0.52), progress=False)
    assert np.array_equal(np.load(tmp_path / "orig" / "chair.npy"), np.load(tmp_path / "release" / "chair.npy"))
    assert (tmp_path / "release" / "chair.png").is_file()  # the first shapes rendered beside the file


def test_guidance_rescale_matches_its_formula() -> None:
    """φ = 0 is plain guidance; φ = 1 gives the guided ε̂ the per-sample std of the conditional ε (Lin et al. 2024)."""
    spy, x, y = Spy(), torch.randn(3, 16, 2, 2, 2), torch.tensor([0, 1, 2])
    plain = guided_eps(spy, x, 5, y, 3.0)
    assert torch.equal(guided_eps(spy, x, 5, y, 3.0, rescale=0.0), plain)
    eps_c = spy(x, torch.full((3,), 5), y)
    full = guided_eps(spy, x, 5, y, 3.0, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3, 4)), eps_c.std(dim=(1, 2, 3, 4)))
    half = guided_eps(spy, x, 5, y, 3.0, rescale=0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)
