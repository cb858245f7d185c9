"""Every top-level command refuses bad input the same way, as a user sees it in a shell: exit status 2, exactly one
line on stderr (`{prog}: error: ...`) that names the problem, no traceback, and no file or directory written, neither
where the outputs were asked for nor beside the inputs.

One real subprocess per case (the entry point, its imports, its argparse and run_cli), so each case is picked to fail
during validation, before any model work: a case costs about one interpreter start. The other test files check the
commands' in-process error paths in detail (which file a damaged checkpoint names, that a failed rerun changes no
file); this module is where the shell-level contract is checked for all of them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import ENV, ROOT, free_port, make_ae_ckpt, make_ldm_ckpt, make_voxel_dir

from voxdiff.data.partseg import write_synthetic_partseg

VOXDIFF = "python -m voxdiff"


class Case(NamedTuple):
    script: str  # path under the repository root, or VOXDIFF
    argv: tuple[str, ...]  # {w}: the shared inputs, {out}: this case's empty working directory, {port}: a closed port
    needles: tuple[str, ...]  # what the one line must say


# Sampling and SDS with good checkpoints, into {out}/s (each case swaps in one bad part)
S = ("--ldm_ckpt_path", "{w}/ldm.pt", "--ae_ckpt_path", "{w}/ae.pt", "--save_dir", "{out}/s", "--device", "cpu")

CASES = {
    # load_data.py
    "load_data-truncated_hdf5": Case("load_data.py", ("--dataset_path", "{w}/h5_bad", "--resolution", "8"),
                                     ("ply_data_val0.h5",)),
    "load_data-download_unreachable": Case(
        "load_data.py", ("--download", "--download_url", "http://127.0.0.1:{port}/x.zip", "--timeout", "3",
                         "--dataset_path", "{out}/data/hdf5_data"), ("could not download", "--zip")),
    "load_data-missing_dataset_dir": Case("load_data.py", ("--dataset_path", "{out}/nope", "--resolution", "8"),
                                          ("is not a directory",)),
    "load_data-resolution_not_power_of_two": Case("load_data.py", ("--dataset_path", "{w}/h5_bad", "--resolution",
                                                                   "7"), ("--resolution", "power of two")),
    # autoencoder.py
    "autoencoder-missing_dataset_dir": Case("autoencoder.py", ("--dataset_path", "{out}/missing", "--ckpt_path",
                                                               "{out}/run", "--device", "cpu"),
                                            ("dataset directory not found",)),
    "autoencoder-run_dir_is_a_file": Case("autoencoder.py", ("--dataset_path", "{w}/vox", "--ckpt_path", "{w}/a_file",
                                                             "--device", "cpu"), ("a_file", "is a file")),
    "autoencoder-batch_size_0": Case("autoencoder.py", ("--batch_size", "0", "--ckpt_path", "{out}/run"),
                                     ("batch_size must be >= 1",)),
    "autoencoder-num_epochs_0": Case("autoencoder.py", ("--num_epochs", "0", "--ckpt_path", "{out}/run"),
                                     ("num_epochs must be >= 1",)),
    # diffusion/train.py
    "train-ckpt_every_0": Case("diffusion/train.py", ("--ckpt_every", "0", "--ckpt_path", "{out}/run"),
                               ("ckpt_every must be >= 1",)),
    "train-resume_and_overwrite": Case("diffusion/train.py", ("--resume", "--overwrite", "--ckpt_path", "{out}/run"),
                                       ("exclude each other",)),
    "train-ae_checkpoint_is_an_ldm": Case("diffusion/train.py", ("--dataset_path", "{w}/vox", "--ae_ckpt_path",
                                                                 "{w}/ldm.pt", "--ckpt_path", "{out}/run", "--device",
                                                                 "cpu"), ("ldm.pt", "expected 'autoencoder'")),
    # diffusion/sample.py
    "sample-cfg_without_label_dropout": Case("diffusion/sample.py", (*S, "--ldm_ckpt_path", "{w}/ldm_nocfg.pt",
                                                                     "--use_cfg"), ("label dropout",)),
    "sample-cfg_scale_nan": Case("diffusion/sample.py", (*S, "--cfg_scale", "nan"), ("--cfg_scale", "finite")),
    "sample-topk_over_half_the_grid": Case("diffusion/sample.py", (*S, "--binarize", "topk", "--topk", "99999999",
                                                                   "--resolution", "32"), ("fill more than half",)),
    "sample-save_dir_is_a_file": Case("diffusion/sample.py", (*S, "--save_dir", "{w}/a_file", "--resolution", "32"),
                                      ("a_file", "is a file")),
    "sample-ae_checkpoint_without_config": Case("diffusion/sample.py", (*S, "--ae_ckpt_path", "{w}/ae_empty.pt"),
                                                ("ae_empty.pt",)),
    "sample-missing_ldm_checkpoint": Case("diffusion/sample.py", (*S, "--ldm_ckpt_path", "{out}/missing.pt"),
                                          ("checkpoint not found", "missing.pt")),
    # sds/main.py
    "sds-t_min_above_t_max": Case("sds/main.py", (*S, "--t_min", "0.6", "--t_max", "0.4"), ("t_min < t_max",)),
    "sds-unknown_weighting": Case("sds/main.py", (*S, "--weighting", "sqrt"), ("--weighting", "invalid choice")),
    "sds-ldm_checkpoint_is_an_ae": Case("sds/main.py", (*S, "--ldm_ckpt_path", "{w}/ae.pt"), ("expected 'ldm'",)),
    # eval.py
    "eval-unknown_category": Case("eval.py", ("sofa", "{w}/vox/chair_voxels_test.npy", "--dataset_path", "{w}/vox",
                                              "--json", "{out}/scores.json"), ("unknown category 'sofa'",)),
    "eval-empty_samples_file": Case("eval.py", ("chair", "{w}/empty.npy", "--dataset_path", "{w}/vox", "--json",
                                                "{out}/scores.json"), ("empty.npy",)),
    "eval-json_is_a_directory": Case("eval.py", ("chair", "{w}/empty.npy", "--json", "{w}/vox"), ("is a directory",)),
    "eval-threshold_nan": Case("eval.py", ("chair", "{w}/empty.npy", "--threshold", "nan"), ("--threshold", "finite")),
    # visualize.py (writes beside its input unless told otherwise: the inputs' snapshot catches a stray PNG)
    "visualize-missing_file": Case("visualize.py", ("{w}/missing.npy",), ("missing.npy", "not found")),
    "visualize-nan_grids": Case("visualize.py", ("{w}/nan.npy",), ("NaN",)),
    "visualize-threshold_nan": Case("visualize.py", ("{w}/nan.npy", "--threshold", "nan"), ("--threshold", "finite")),
    # python -m voxdiff
    "voxdiff-unknown_stage": Case(VOXDIFF, ("--stages", "bogus", "--run_dir", "{out}/r"), ("unknown stage",)),
    "voxdiff-run_dir_is_a_file": Case(VOXDIFF, ("--preset", "tiny", "--run_dir", "{w}/a_file"), ("is a file",)),
    "voxdiff-empty_config_file": Case(VOXDIFF, ("--config", "{w}/empty.json"), ("empty.json",)),
    "voxdiff-missing_config_file": Case(VOXDIFF, ("--config", "{out}/missing.json"), ("config file not found",)),
    "voxdiff-stage_flag_out_of_range": Case(VOXDIFF, ("--preset", "tiny", "--run_dir", "{out}/r", "--ae.batch_size",
                                                      "0"), ("--ae.batch_size", "batch_size must be >= 1")),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the cases read, good and bad, in one directory that no case may change."""
    w = tmp_path_factory.mktemp("inputs")
    make_voxel_dir(w / "vox", n={"train": 4, "val": 2, "test": 2})
    make_ae_ckpt(w / "ae.pt")
    make_ldm_ckpt(w / "ldm.pt")
    make_ldm_ckpt(w / "ldm_nocfg.pt", use_cfg=False)
    no_config = torch.load(w / "ae.pt", weights_only=True)
    no_config["model_config"] = {}
    torch.save(no_config, w / "ae_empty.pt")
    write_synthetic_partseg(w / "h5_bad", {s: {"chair": 1, "table": 1} for s in ("train", "val", "test")}, seed=1,
                            progress=False)
    val = w / "h5_bad" / "ply_data_val0.h5"
    val.write_bytes(val.read_bytes()[: val.stat().st_size // 3])
    (w / "empty.npy").write_bytes(b"")
    nan = np.zeros((3, 4, 4, 4), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.save(w / "nan.npy", nan)
    (w / "a_file").write_text("x")
    (w / "empty.json").write_text("")
    return w


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with its size, inode and mtime (a directory: its inode), less the directory locks a
    command may leave (voxdiff.files.dir_lock keeps the file and drops the kernel lock): any other write shows."""
    return {str(p.relative_to(root)): (st.st_size, st.st_ino, st.st_mtime_ns) if p.is_file() else (-1, st.st_ino, 0)
            for p in sorted(root.rglob("*")) if p.name != ".lock" for st in [p.stat()]}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name: str, inputs: Path, tmp_path: Path) -> None:
    case = CASES[name]
    fill = {"w": str(inputs), "out": str(tmp_path), "port": str(free_port())}
    argv = [a.format(**fill) for a in case.argv]
    cmd = [sys.executable, "-m", "voxdiff"] if case.script == VOXDIFF else [sys.executable, str(ROOT / case.script)]
    before = tree(inputs)
    # run from the empty working directory: outputs that default to relative paths would land there
    res = subprocess.run([*cmd, *argv], cwd=tmp_path, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=180)
    prog = VOXDIFF if case.script == VOXDIFF else Path(case.script).name
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    missing = [n for n in case.needles if n not in lines[0]]
    assert not missing, (missing, lines[0])
    assert lines[0] not in res.stdout, res.stdout  # the error goes to stderr only (progress may go to stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "written where the outputs were asked for"
    assert tree(inputs) == before, "written beside the inputs"
