"""Sampling: CFG helper conventions, the loop, sample_to_files / diffusion/sample.py end to end, resume, bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, OCC, ROOT, TINY_UNET

from voxdiff.binarize import Binarization
from voxdiff.config import SampleConfig, SchedulerConfig
from voxdiff.errors import VoxdiffError
from voxdiff.models.unet3d import UNet3D
from voxdiff.sampling import LatentVoxelPipeline, guided_eps, sample_latents, sample_to_files, upsample_nearest
from voxdiff.schedulers import make_scheduler

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
    runs = [sample_latents(model, y, sched, 1.0, torch.Generator().manual_seed(s), latent_shape=(16, 4, 4, 4))
            for s in (3, 3, 4)]
    assert runs[0].shape == (2, 16, 4, 4, 4) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_sample_latents_function_and_method_take_the_same_arguments_in_order() -> None:
    """The method is the function with the pipeline's U-Net bound: after `model` / `self`, the same parameters in the
    same order (a positional call means the same thing to both)."""
    import inspect

    function = list(inspect.signature(sample_latents).parameters)
    method = list(inspect.signature(LatentVoxelPipeline.sample_latents).parameters)
    assert function[0] == "model" and method[0] == "self"
    assert method[1:] == function[1 : len(method)]
    assert method[1:5] == ["labels", "scheduler", "cfg_scale", "generator"]


def test_sampling_imports_no_plotting(python: str) -> None:
    """`import voxdiff.sampling` loads no matplotlib: renders are voxdiff.render's, loaded only when a job renders."""
    code = "import sys, voxdiff.sampling; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    r = subprocess.run([python, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_sampling_modules_import_one_way() -> None:
    """Inside voxdiff.sampling imports run guidance <- pipeline <- writer (each module's imports, from its source)."""
    import ast

    allowed = {"guidance": set(), "pipeline": {"guidance"}, "writer": {"guidance", "pipeline"}}
    for name, ok in allowed.items():
        tree = ast.parse((ROOT / "voxdiff" / "sampling" / f"{name}.py").read_text())
        siblings = {node.module.split(".")[2] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module and node.module.startswith("voxdiff.sampling.")}
        siblings |= {alias.name.split(".")[2] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names if alias.name.startswith("voxdiff.sampling.")}
        assert siblings <= ok, (name, siblings - ok)


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
    z = pipe.sample_latents(labels, pipe.make_scheduler("ddim", 4, eta=0.5), 1.0,
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


# ---- the library API: LatentVoxelPipeline.from_pretrained(...)(...), stored sampling settings ------------------------
STORED = {"sampler": "ddim", "steps": 3, "cfg_scale": 0.5, "guidance_rescale": 0.25, "threshold": 0.3,
          "clamp_latents": False, "binarize": "threshold"}


@pytest.fixture(scope="module")
def model_dir(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny AE + LDM exported as a model directory (ae.pt, ldm.pt) with stored sampling settings."""
    from voxdiff.checkpoint import export_model

    out = tmp_path_factory.mktemp("model")
    export_model(ckpts["ae"], ckpts["ldm"], out, sampling=STORED)
    return out


@pytest.fixture(scope="module")
def pretrained(model_dir: Path) -> LatentVoxelPipeline:
    return LatentVoxelPipeline.from_pretrained(model_dir, device="cpu")


def test_from_pretrained_loads_an_exported_model_and_a_run_dir(ckpts: dict[str, Path], model_dir: Path,
                                                               pretrained: LatentVoxelPipeline, tmp_path: Path) -> None:
    import shutil

    assert pretrained.ldm_file == model_dir / "ldm.pt" and pretrained.ae_file == model_dir / "ae.pt"
    assert pretrained.ae_matches and pretrained.stored_sampling == STORED
    run = tmp_path / "run"
    (run / "ae").mkdir(parents=True)
    (run / "ldm").mkdir()
    shutil.copy(ckpts["ae"], run / "ae" / "best.pt")
    shutil.copy(ckpts["ae"], run / "ae" / "last.pt")
    shutil.copy(ckpts["ldm"], run / "ldm" / "last.pt")  # no best.pt: last.pt
    pipe = LatentVoxelPipeline.from_pretrained(run, device="cpu", precision="fp32")
    assert pipe.ae_file == run / "ae" / "best.pt" and pipe.ldm_file == run / "ldm" / "last.pt"
    assert pipe.stored_sampling == {}  # a training checkpoint stores none: the library defaults
    # the same weights give the same shapes at the same settings, however they were loaded
    kw = dict(seed=0, **{k: v for k, v in STORED.items() if k not in ("cfg_scale",)}, guidance=0.5)
    assert np.array_equal(pipe("chair", 2, **kw).grids, pretrained("chair", 2, **kw).grids)


@pytest.mark.parametrize(("output", "resolution", "shape", "dtype"), [
    ("grids", None, (3, 32, 32, 32), np.bool_), ("grids", 64, (3, 64, 64, 64), np.bool_),
    ("probabilities", None, (3, 32, 32, 32), np.float32), ("latents", None, (3, 16, 4, 4, 4), np.float32)])
def test_each_output_kind_has_its_shape_and_dtype(pretrained: LatentVoxelPipeline, output: str,
                                                  resolution: int | None, shape: tuple, dtype: type) -> None:
    out = pretrained("table", 3, seed=1, output=output, resolution=resolution)
    arr = getattr(out, output)
    assert arr.shape == shape and arr.dtype == dtype
    assert [k for k in ("grids", "probabilities", "latents") if getattr(out, k) is not None] == [output]
    assert out.labels.tolist() == [2, 2, 2] and out.settings["resolution"] == (resolution or 32)
    if output == "probabilities":
        assert ((arr >= 0) & (arr <= 1)).all()


def test_grids_are_the_probabilities_above_the_threshold(pretrained: LatentVoxelPipeline) -> None:
    probs = pretrained("chair", 2, seed=4, output="probabilities").probabilities
    grids = pretrained("chair", 2, seed=4).grids
    assert np.array_equal(grids, probs > STORED["threshold"])  # the stored threshold is the one applied
    z = pretrained("chair", 2, seed=4, output="latents").latents
    torch.testing.assert_close(pretrained.decode(torch.from_numpy(z)).numpy(), probs)


def test_labels_and_category_names_give_the_same_shapes(pretrained: LatentVoxelPipeline) -> None:
    mixed = pretrained(["table", "chair"], 2, seed=5)
    assert mixed.labels.tolist() == [2, 2, 1, 1] and mixed.grids.shape == (4, 32, 32, 32)
    # each category's shapes are its own seeded stream: the same as asking for that category alone
    assert np.array_equal(mixed.grids[:2], pretrained("table", 2, seed=5).grids)
    assert np.array_equal(mixed.grids[2:], pretrained("chair", 2, seed=5).grids)
    for labels in ([2, 1], np.array([2, 1]), torch.tensor([2, 1])):
        same = pretrained(labels, 2, seed=5)
        assert same.labels.tolist() == [2, 2, 1, 1] and np.array_equal(same.grids, mixed.grids)
    assert pretrained(["chair", "chair"], seed=5).labels.tolist() == [1, 1]  # num_samples defaults to 1 per entry


def test_stored_settings_are_the_defaults_and_arguments_override_them(pretrained: LatentVoxelPipeline) -> None:
    out = pretrained("airplane", 2, seed=2)
    assert {k: out.settings[k] for k in STORED} == STORED
    assert {k for k, v in out.sources.items() if v == "model"} == set(STORED)
    assert out.sources["eta"] == out.sources["topk"] == "default" and out.settings["eta"] == 0.0
    assert out.settings["batch_size"] == SampleConfig.batch_size and out.settings["seed"] == 2
    given = pretrained("airplane", 2, seed=2, steps=2, guidance=1.5, guidance_rescale=0.0, threshold=0.6,
                       clamp_latents=True, output="probabilities")
    assert given.settings["steps"] == 2 and given.settings["cfg_scale"] == 1.5 and given.settings["threshold"] == 0.6
    assert {k for k, v in given.sources.items() if v == "given"} == {"steps", "cfg_scale", "guidance_rescale",
                                                                      "threshold", "clamp_latents"}
    assert given.sources["binarize"] == "model"
    grids = pretrained("airplane", 2, seed=2, steps=2, guidance=1.5, guidance_rescale=0.0, threshold=0.6,
                       clamp_latents=True).grids
    assert np.array_equal(grids, given.probabilities > 0.6)
    assert not np.array_equal(grids, out.grids)  # other settings, other shapes
    # the model's steps go with its sampler: another sampler runs its own default (all T for DDPM)
    ddpm = pretrained("airplane", 1, seed=2, sampler="ddpm", output="latents")
    assert ddpm.settings["steps"] == 100 and ddpm.sources["steps"] == "default"


def test_resolve_sampling_sources_and_conflicts() -> None:
    from voxdiff.sampling import resolve_sampling

    base = SampleConfig(threshold=0.4)
    cfg, src = resolve_sampling(base, {"threshold": 0.58, "steps": 50}, ["threshold", "steps", "cfg_scale"])
    assert cfg.threshold == 0.58 and cfg.steps == 50 and cfg.cfg_scale == 1.0
    assert src["threshold"] == src["steps"] == "model" and src["cfg_scale"] == "default" and src["sampler"] == "given"
    cfg, src = resolve_sampling(base, {"threshold": 0.58}, [])
    assert cfg == base and set(src.values()) == {"given"}
    with pytest.raises(VoxdiffError, match="threshold acts only with binarize 'threshold'.*stored binarize is 'topk'"):
        resolve_sampling(base, {"binarize": "topk"}, ["binarize"])  # a given threshold would be ignored


def test_call_is_deterministic_with_a_generator_or_a_drawn_seed(pretrained: LatentVoxelPipeline) -> None:
    a = pretrained("chair", 3, generator=torch.Generator().manual_seed(0), batch_size=2)
    b = pretrained("chair", 3, generator=torch.Generator().manual_seed(0), batch_size=2)
    assert np.array_equal(a.grids, b.grids) and a.settings["seed"] is None
    torch.manual_seed(11)
    c = pretrained("chair", 2, output="latents")
    torch.manual_seed(11)
    d = pretrained("chair", 2, output="latents")
    assert np.array_equal(c.latents, d.latents) and isinstance(c.settings["seed"], int)
    again = pretrained("chair", 2, output="latents", seed=c.settings["seed"])  # the recorded seed reproduces it
    assert np.array_equal(again.latents, c.latents)


def test_call_equals_sample_to_files(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Several batches (the last one short), two categories, DDIM with η > 0 (noise drawn in every step), 2x upsampling:
    __call__ returns exactly the rows sample_to_files writes with the same settings and seed."""
    sample_to_files(_cfg(ckpts, tmp_path, threshold=0.52), progress=False)
    pipe = LatentVoxelPipeline.from_checkpoints(ckpts["ae"], ckpts["ldm"], device="cpu", precision="auto")
    out = pipe(["table", "chair"], 5, seed=3, batch_size=2, steps=4, eta=0.5, threshold=0.52, resolution=64)
    assert np.array_equal(out.grids[:5], np.load(tmp_path / "table.npy").astype(bool))
    assert np.array_equal(out.grids[5:], np.load(tmp_path / "chair.npy").astype(bool))


def test_pipe_100_chairs_equals_sample_py_seed_0(model_dir: Path, pretrained: LatentVoxelPipeline,
                                                 tmp_path: Path) -> None:
    """`pipe("chair", 100, seed=0)` is diffusion/sample.py's chair.npy with --seed 0: both take the model's stored
    settings when none are given, and sample.json says which values were used and where each came from."""
    from voxdiff.cli import load_script

    script = load_script(ROOT / "diffusion" / "sample.py")
    script.main(["--ldm_ckpt_path", str(model_dir / "ldm.pt"), "--ae_ckpt_path", str(model_dir / "ae.pt"),
                 "--save_dir", str(tmp_path), "--category", "chair", "--num_samples", "100", "--seed", "0",
                 "--resolution", "32", "--device", "cpu", "--render", "none"])
    out = pretrained("chair", 100, seed=0)
    assert out.grids.shape == (100, 32, 32, 32)
    assert np.array_equal(out.grids, np.load(tmp_path / "chair.npy").astype(bool))
    settings = json.loads((tmp_path / "sample.json").read_text())["settings"]
    assert {k: settings[k]["value"] for k in STORED} == STORED and {settings[k]["from"] for k in STORED} == {"model"}
    assert settings["eta"] == {"value": 0.0, "from": "default"}


def test_sample_py_flags_override_the_stored_settings(model_dir: Path, tmp_path: Path) -> None:
    from voxdiff.cli import load_script

    script = load_script(ROOT / "diffusion" / "sample.py")
    script.main(["--ldm_ckpt_path", str(model_dir / "ldm.pt"), "--ae_ckpt_path", str(model_dir / "ae.pt"),
                 "--save_dir", str(tmp_path), "--category", "chair", "--num_samples", "2", "--resolution", "32",
                 "--device", "cpu", "--render", "none", "--threshold", "0.45", "--cfg_scale", "0", "--steps", "2"])
    summary = json.loads((tmp_path / "sample.json").read_text())
    assert summary["settings"]["threshold"] == {"value": 0.45, "from": "given"}
    assert summary["settings"]["steps"] == {"value": 2, "from": "given"} and summary["timesteps"] == 2
    assert summary["settings"]["cfg_scale"] == {"value": 0.0, "from": "given"} and summary["cfg_scale_effective"] == 0
    assert summary["settings"]["guidance_rescale"] == {"value": 0.25, "from": "model"}
    assert summary["config"]["threshold"] == 0.45 and summary["config"]["clamp_latents"] is False
    helps = {a.dest: a.help for a in script.build_parser()[0]._actions}
    assert "(default: the model's stored setting, else 0.5)" in helps["threshold"]
    assert "model's stored" not in helps["batch_size"]


def test_no_label_dropout_means_no_guidance_by_default(ckpts: dict[str, Path]) -> None:
    pipe = LatentVoxelPipeline.from_checkpoints(ckpts["ae"], ckpts["ldm_nocfg"], device="cpu")
    out = pipe("chair", 1, seed=0, steps=2)
    assert out.settings["cfg_scale"] == 0.0 and out.grids.shape == (1, 32, 32, 32)
    with pytest.raises(VoxdiffError, match="label dropout"):
        pipe("chair", 1, seed=0, steps=2, guidance=1.0)


def test_from_pretrained_bad_paths_are_one_line(ckpts: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    (tmp_path / "half").mkdir()
    shutil.copy(ckpts["ae"], tmp_path / "half" / "ae.pt")  # no ldm.pt
    (tmp_path / "emptyrun" / "ae").mkdir(parents=True)
    (tmp_path / "emptyrun" / "ldm").mkdir()
    for path, match in [(tmp_path / "nowhere", "model not found"), (tmp_path / "half", "not a voxdiff model"),
                        (ckpts["ae"], "not a voxdiff model"), (tmp_path / "emptyrun", "no checkpoint")]:
        with pytest.raises(VoxdiffError, match=match) as err:
            LatentVoxelPipeline.from_pretrained(path, device="cpu")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(("args", "kw", "error", "match"), [
    (("sofa",), {}, ValueError, "unknown category 'sofa'"),
    ((7,), {}, ValueError, "neither a category"),
    (([],), {}, ValueError, "no category"),
    (("chair", 0), {}, ValueError, "num_samples must be"),
    (("chair",), {"output": "mesh"}, ValueError, "output must be one of grids, probabilities, latents"),
    (("chair",), {"seed": 1, "generator": torch.Generator()}, ValueError, "not both"),
    (("chair",), {"seed": -1}, ValueError, "seed must be"),
    (("chair",), {"threshold": 1.5}, ValueError, "threshold must be < 1.0"),
    (("chair",), {"resolution": 48}, VoxdiffError, "impossible"),
    (("chair",), {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
])
def test_bad_calls_are_one_line_errors(pretrained: LatentVoxelPipeline, args: tuple, kw: dict, error: type,
                                       match: str) -> None:
    with pytest.raises(error, match=match) as err:
        pretrained(*args, **kw)
    assert "\n" not in str(err.value)


def test_write_sampling_settings_keeps_everything_else(ckpts: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from voxdiff.checkpoint import load_checkpoint, write_sampling_settings

    path = Path(shutil.copy(ckpts["ldm"], tmp_path / "ldm.pt"))
    before = torch.load(path, weights_only=True)
    assert write_sampling_settings(path, {**STORED, "cfg_scale": np.float64(2.0)}) == path  # numpy scalars unwrapped
    after = torch.load(path, weights_only=True)
    assert after["meta"]["sampling"] == {**STORED, "cfg_scale": 2.0} and type(after["meta"]["sampling"]["cfg_scale"]) \
        is float
    assert after["digest"] == before["digest"] and after["version"] == before["version"]
    assert {k: v for k, v in after["meta"].items() if k != "sampling"} == \
        {k: v for k, v in before["meta"].items() if k != "sampling"}
    assert load_checkpoint(path).meta.sampling["threshold"] == 0.3  # digest and finite checks pass
    data = path.read_bytes()
    for bad, match in [({"cfg": 1.0}, "unknown sampling settings"), ({"threshold": 1.5}, "threshold must be < 1.0"),
                       ({"steps": "50"}, "steps must be an integer"), ({"sampler": "euler"}, "sampler")]:
        with pytest.raises(ValueError, match=match):
            write_sampling_settings(path, bad)
    assert path.read_bytes() == data  # a refused setting leaves the file as it was
    with pytest.raises(VoxdiffError, match="expected 'ldm'"):
        write_sampling_settings(Path(shutil.copy(ckpts["ae"], tmp_path / "ae.pt")), STORED)


def test_checkpoints_without_stored_settings_load(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from voxdiff.checkpoint import export_model, load_checkpoint

    raw = torch.load(ckpts["ldm"], weights_only=True)
    del raw["meta"]["sampling"]  # as written before the key existed
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").meta.sampling == {}
    _, ldm = export_model(ckpts["ae"], tmp_path / "old.pt", tmp_path / "export")  # sampling=None keeps what it had
    assert load_checkpoint(ldm).meta.sampling == {}
    pipe = LatentVoxelPipeline.from_pretrained(tmp_path / "export", device="cpu", precision="fp32")
    assert set(pipe("chair", 1, seed=0, steps=1).sources.values()) <= {"default", "given"}
