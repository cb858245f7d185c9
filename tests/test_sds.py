"""SDS: the gradient reaching the latents, no gradient in the U-Net, the w = 0 convention, the CLI end to end (arrays
that voxdiff.metrics scores), the DDIM init matching diffusion/sample.py, reproducibility, and bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, OCC, ROOT, TINY_UNET, make_voxel_dir

from voxdiff import metrics
from voxdiff.config import SampleConfig, SchedulerConfig, SDSConfig
from voxdiff.errors import VoxdiffError
from voxdiff.models.unet3d import UNet3D
from voxdiff.sampling import sample_to_files
from voxdiff.schedulers import make_scheduler
from voxdiff.sds import run_sds, sds_grad, sds_surrogate, timestep_range

TINY = TINY_UNET
T = 100


class Recorder(torch.nn.Module):
    """Wraps a real UNet and records the labels of every forward call."""

    def __init__(self, inner: UNet3D) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    @property
    def null_class(self) -> int:
        return self.inner.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(y.clone())
        return self.inner(x, t, y)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = UNet3D(TINY).eval()  # parameters keep requires_grad=True: SDS must not touch them anyway
    sched = make_scheduler("ddpm", SchedulerConfig(num_train_timesteps=T))
    z = torch.randn(3, 16, 4, 4, 4, requires_grad=True)
    return model, sched, z, torch.tensor([0, 2, 1]), torch.tensor([4, 57, 96]), torch.randn(3, 16, 4, 4, 4)


@pytest.mark.parametrize("weighting", ["sds", "uniform"])
def test_latent_grad_is_weighted_eps_residual(weighting: str) -> None:
    model, sched, z, y, t, eps = _setup()
    grad = sds_grad(model, sched, z, y, t, eps, 1.5, weighting)
    sds_surrogate(z, grad).backward()
    # hand computation: z_t = √ᾱ z + √(1−ᾱ) ε; ε̂ = 2.5 ε_c − 1.5 ε_u; grad = w(t) (ε̂ − ε)
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        eps_c, eps_u = model(z_t, t, y), model(z_t, t, torch.full_like(y, 3))
    w = (1 - a) if weighting == "sds" else torch.ones_like(a)
    expected = w * (2.5 * eps_c - 1.5 * eps_u - eps)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    assert not grad.requires_grad
    assert all(p.grad is None for p in model.parameters()), "the U-Net must receive no gradient"
    if weighting == "sds":  # the weight really differs per sample: small t is muted
        r = grad.flatten(1).norm(dim=1) / (2.5 * eps_c - 1.5 * eps_u - eps).flatten(1).norm(dim=1)
        assert r[0] < 0.1 < r[1] < r[2]


def test_guidance_zero_is_plain_conditional() -> None:
    model, sched, z, y, t, eps = _setup(1)
    rec = Recorder(model)
    grad = sds_grad(rec, sched, z, y, t, eps, 0.0, "uniform")
    assert len(rec.calls) == 1 and torch.equal(rec.calls[0], y), "w = 0 must skip the unconditional branch"
    with torch.no_grad():
        plain = model(sched.add_noise(z, eps, t), t, y)
    assert torch.equal(grad, plain - eps)
    rec.calls.clear()
    sds_grad(rec, sched, z, y, t, eps, 2.0)
    assert len(rec.calls) == 1 and torch.equal(rec.calls[0], torch.tensor([0, 2, 1, 3, 3, 3]))


def test_timestep_range_and_anneal() -> None:
    cfg = SDSConfig(t_min=0.02, t_max=0.98, num_steps=11)
    assert timestep_range(cfg, 1000) == (20, 980) and timestep_range(cfg, 1000, 10) == (20, 980)
    cfg = SDSConfig(t_min=0.1, t_max=1.0, num_steps=11, anneal=True)
    assert timestep_range(cfg, 1000, 0) == (100, 999)
    assert timestep_range(cfg, 1000, 5)[1] < 999 and timestep_range(cfg, 1000, 10) == (100, 100)


def _cfg(ckpts: dict[str, Path], save_dir: Path, **kw) -> SDSConfig:
    base = dict(ldm_ckpt_path=str(ckpts["ldm"]), ae_ckpt_path=str(ckpts["ae"]), save_dir=str(save_dir),
                categories=("chair",), num_samples=3, batch_size=2, num_steps=2, resolution=32, render_every=None,
                device="cpu", seed=5)
    return SDSConfig(**{**base, **kw})


def test_ddim_init_without_steps_equals_sampler(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Same seeds, same decode and binarisation: 0 SDS steps from DDIM init == diffusion/sample.py's DDIM output."""
    run_sds(_cfg(ckpts, tmp_path / "sds", init="ddim", steps=3, num_steps=0, cfg_scale=1.0, binarize="topk"),
            progress=False)
    sample_to_files(SampleConfig(ldm_ckpt_path=str(ckpts["ldm"]), ae_ckpt_path=str(ckpts["ae"]),
                                 save_dir=str(tmp_path / "ddim"), categories=("chair",), num_samples=3, batch_size=2,
                                 sampler="ddim", steps=3, eta=0.0, cfg_scale=1.0, resolution=32, binarize="topk",
                                 device="cpu", seed=5), progress=False)
    a, b = np.load(tmp_path / "sds" / "chair.npy"), np.load(tmp_path / "ddim" / "chair.npy")
    assert a.shape == (3, 32, 32, 32) and np.array_equal(a, b)


def test_run_is_seeded_and_moves_latents(ckpts: dict[str, Path], tmp_path: Path) -> None:
    runs = [np.load(run_sds(_cfg(ckpts, tmp_path / str(i), num_steps=3, lr=0.5, binarize="topk"),
                            progress=False)["chair"]["file"]) for i in range(2)]
    assert np.array_equal(runs[0], runs[1]), "same seed, same shapes"
    # the same init without SDS steps decodes to different shapes: the optimiser really moved the latents
    zero = np.load(run_sds(_cfg(ckpts, tmp_path / "z", num_steps=0, binarize="topk"), progress=False)["chair"]["file"])
    assert not np.array_equal(zero, runs[0])
    meta = json.loads((tmp_path / "0" / "sds.json").read_text())["chair"]
    assert len(meta["grad_norm_per_step"]) == 3 and meta["final_grad_norm_mean"] > 0
    # another category into the same save_dir: both arrays and both summaries are kept
    run_sds(_cfg(ckpts, tmp_path / "0", categories=("airplane",), num_steps=1), progress=False)
    assert set(json.loads((tmp_path / "0" / "sds.json").read_text())) == {"chair", "airplane"}
    assert np.array_equal(np.load(tmp_path / "0" / "chair.npy"), runs[0])


def test_cli_end_to_end_scored_by_metrics(ckpts: dict[str, Path], tmp_path: Path, python: str) -> None:
    out = tmp_path / "sds"
    r = subprocess.run([python, "sds/main.py", "--ldm_ckpt_path", str(ckpts["ldm"]), "--ae_ckpt_path",
                        str(ckpts["ae"]), "--category", "table", "--num_samples", "3", "--batch_size", "2",
                        "--num_steps", "4", "--lr", "0.05", "--cfg_scale", "2", "--t_min", "0.1", "--t_max", "0.9",
                        "--anneal", "--init", "noise", "--save_dir", str(out), "--resolution", "32", "--binarize",
                        "topk",
                        "--render_every", "2", "--render_n", "2", "--seed", "1", "--device", "cpu"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    a = np.load(out / "table.npy")
    assert a.shape == (3, 32, 32, 32) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    assert (a.reshape(3, -1).sum(1) == round(OCC["table"])).all()  # top-k auto at the AE's 32³
    meta = json.loads((out / "sds.json").read_text())["table"]
    assert meta["config"]["cfg_scale"] == 2.0 and meta["t_range"] == [10, 90] and meta["empty"] == 0
    assert np.isfinite(meta["final_grad_norm_mean"]) and len(meta["grad_norm_per_step"]) == 4
    assert {p.name for p in (out / "renders").iterdir()} == {f"table_step_0000{i}.png" for i in (0, 2, 4)}
    refs_dir = make_voxel_dir(tmp_path / "refs", res=32, n={"test": 3, "val": 2})
    refs = np.concatenate([np.load(refs_dir / f"table_voxels_{s}.npy") for s in ("test", "val")])
    res = metrics.evaluate(a, refs, progress=False)
    assert res["n_samples"] == 3 and res["n_refs"] == 5 and res["n_empty_samples"] == 0
    assert all(np.isfinite(res[k]) for k in ("jsd", "mmd", "cov", "nna")) and 0 < res["cov"] <= 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ldm_ckpt_path": "ldm_nocfg"}, "without label dropout"),
        ({"ae_ckpt_path": "ae64"}, "latent shape"),
        ({"ldm_ckpt_path": "missing"}, "not found"),
        ({"resolution": 48}, "impossible"),
    ],
)
def test_bad_inputs_raise_before_writing(ckpts: dict[str, Path], tmp_path: Path, kw: dict, match: str) -> None:
    kw = {k: (str(ckpts.get(v, tmp_path / "nope.pt")) if k.endswith("ckpt_path") else v) for k, v in kw.items()}
    with pytest.raises(VoxdiffError, match=match):
        run_sds(_cfg(ckpts, tmp_path / "out", **kw), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"t_min": 0.5, "t_max": 0.5}, "t_min < t_max"), ({"categories": ("sofa",)}, "unknown category"),
     ({"weighting": "sqrt"}, "weighting must be one of"), ({"init": "ddpm"}, "init must be one of")],
)
def test_config_rejects_bad_values(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SDSConfig(**kw)


class VOracle(torch.nn.Module):
    """A perfect v-prediction model for known clean latents z: v = √ᾱ_t ε − √(1 − ᾱ_t) z, with ε read off z_t."""

    null_class = 3

    def __init__(self, sched, z: torch.Tensor) -> None:
        super().__init__()
        self.sched, self.z = sched, z.detach()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.z.repeat(len(x) // len(self.z), *[1] * (x.ndim - 1))
        a = self.sched.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        eps = (x - a.sqrt() * z) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * z


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_prediction_output_is_converted_to_eps(zero_snr: bool) -> None:
    """With a v-prediction LDM the guided output is v̂, turned into ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) z_t: a perfect v model
    gives a zero SDS gradient (read as ε it would not), and a real U-Net's gradient matches the hand conversion."""
    cfg = SchedulerConfig(num_train_timesteps=T, prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr)
    sched = make_scheduler("ddpm", cfg)
    model, _, z, y, _, eps = _setup(2)
    t = torch.tensor([4, 57, T - 1])
    oracle = VOracle(sched, z)
    grad = sds_grad(oracle, sched, z, y, t, eps, 1.5, "uniform")
    assert float(grad.abs().max()) < 1e-4  # float32 round-off of reading ε off z_t at small t
    eps_sched = make_scheduler("ddpm", SchedulerConfig(num_train_timesteps=T))
    assert float(sds_grad(oracle, eps_sched, z, y, t, eps, 1.5, "uniform").abs().max()) > 0.1
    grad = sds_grad(model, sched, z, y, t, eps, 1.5, "sds")
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        v = 2.5 * model(z_t, t, y) - 1.5 * model(z_t, t, torch.full_like(y, 3))
    expected = (1 - a) * (a.sqrt() * v + (1 - a).sqrt() * z_t - eps)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(grad).all()
