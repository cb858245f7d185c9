"""The model shipped in models/medium: it loads, it stores the sampling settings its tune stage picked, `make sample`'s
own command samples from it with exactly those (2 shapes per category here instead of 16) without training anything,
and the library call `LatentVoxelPipeline.from_pretrained("models/medium")("chair", ...)` returns the same shapes."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from voxdiff.checkpoint import SAMPLING_KEYS, load_checkpoint
from voxdiff.config import CATEGORIES
from voxdiff.sampling import LatentVoxelPipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "medium"
sys.path.insert(0, str(ROOT / "diffusion"))
# what the medium run's tune stage picked on held-out training shapes (docs/MODEL_CARD.md), stored in its ldm.pt
TUNED = {"sampler": "ddim", "steps": 50, "cfg_scale": 0.5, "guidance_rescale": 0.0, "threshold": 0.3,
         "clamp_latents": True, "binarize": "threshold"}


def make_sample_argv() -> list[str]:
    """The arguments of sample.py in the Makefile's `sample` target, its variables substituted."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+) := (.*)$", text, flags=re.M))
    recipe = re.search(r"^sample:.*\n((?:\t.*\n)+)", text, flags=re.M)
    assert recipe, "the Makefile has no sample target"
    command = recipe.group(1).replace("\\\n", " ")
    command = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), command)
    argv = shlex.split(command)
    return argv[argv.index("diffusion/sample.py") + 1 :]


def test_shipped_checkpoints_are_compact_and_load() -> None:
    ae, ldm = MODEL / "ae.pt", MODEL / "ldm.pt"
    assert ae.stat().st_size + ldm.stat().st_size <= 20 * 2**20
    pipe = LatentVoxelPipeline.from_checkpoints(ae, ldm)
    assert pipe.ae_matches and pipe.latent_shape == (4, 8, 8, 8)
    assert pipe.ldm_meta is not None and list(pipe.ldm_meta.categories) == list(CATEGORIES)
    ck = load_checkpoint(ldm, kind="ldm")
    assert ck.optimizer is None and ck.ema is None  # exported: sampling weights only


def test_shipped_model_stores_its_tuned_settings_and_make_sample_leaves_them_to_it() -> None:
    meta = load_checkpoint(MODEL / "ldm.pt", kind="ldm").meta
    assert {k: meta.sampling[k] for k in TUNED} == TUNED
    assert meta.sampling.get("eta", 0.0) == 0.0 and meta.sampling.get("topk") is None  # the rest: library defaults
    argv = make_sample_argv()
    given = [a for a in argv if a.startswith("--") and a[2:].removeprefix("no_") in SAMPLING_KEYS]
    assert not given, f"make sample overrides the model's stored settings with {given}"


def test_make_sample_command_samples_two_per_category(tmp_path: Path) -> None:
    import sample  # diffusion/sample.py

    argv = make_sample_argv()
    assert not any("PENDING" in a for a in argv), "the Makefile's sampling settings were never filled in"
    assert argv[argv.index("--ldm_ckpt_path") + 1] == "models/medium/ldm.pt"
    assert argv[argv.index("--num_samples") + 1] == "16"
    argv[argv.index("--save_dir") + 1] = str(tmp_path)
    argv[argv.index("--num_samples") + 1] = "2"
    argv[argv.index("--ldm_ckpt_path") + 1] = str(MODEL / "ldm.pt")
    argv[argv.index("--ae_ckpt_path") + 1] = str(MODEL / "ae.pt")
    sample.main(argv + ["--device", "cpu", "--precision", "fp32"])
    settings = json.loads((tmp_path / "sample.json").read_text())["settings"]
    assert {k: settings[k]["value"] for k in TUNED} == TUNED  # sample.py's defaults are the stored settings
    assert {settings[k]["from"] for k in TUNED} == {"model"}
    for cat in CATEGORIES:
        grids = np.load(tmp_path / f"{cat}.npy")
        assert grids.shape == (2, 32, 32, 32) and grids.dtype == np.uint8
        assert set(np.unique(grids)) <= {0, 1}
        assert (grids.reshape(2, -1).sum(1) > 0).all(), f"empty {cat} sample from the shipped model"
        assert (tmp_path / f"{cat}.png").stat().st_size > 0
    # the library's three lines give what `make sample` wrote, for the same seed (sample.py's default, 0) and batch size
    pipe = LatentVoxelPipeline.from_pretrained(MODEL, device="cpu", precision="fp32")
    out = pipe("chair", 2, seed=0, batch_size=int(argv[argv.index("--batch_size") + 1]))
    assert out.grids.shape == (2, 32, 32, 32) and out.grids.dtype == bool
    assert {k: out.settings[k] for k in TUNED} == TUNED
    assert np.array_equal(out.grids, np.load(tmp_path / "chair.npy").astype(bool))
