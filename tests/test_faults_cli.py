"""Fault injection for the stage scripts, in the spirit of tests/test_faults.py: autoencoder.py, diffusion/train.py,
diffusion/sample.py and sds/main.py (none of them takes a --config).

For each script: every kind of file it reads, corrupted or truncated (checkpoints, log.jsonl, best.pt, the voxel
.npy files, the latent cache, the sampling progress record, the partial and the finished samples, sds.json); a disk
that fills up (ENOSPC, monkeypatched, in-process); a bad value for each numeric flag; a crash at each write point of
sampling (in-process, and one SIGKILL of a real sampling process), of SDS, and between the two checkpoint saves of
training (and what such a crash leaves: a missing or stale best.pt). A refusal is one stderr line naming the file or
the flag, a non-zero exit, and no file that existed before changed (sha256); a file that can be rebuilt is rebuilt
with one line saying so; every case ends with a rerun that completes (bit-identical to an uninterrupted run where
the program promises it).

Fast: tiny networks (tests/helpers.py), one thread, fp32, runs shared by the module. CPU only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faultlib import CORRUPTIONS, assert_unchanged, cli, no_logs, no_space, one_line, snapshot
from helpers import ENV, ROOT, make_ae_ckpt, make_ldm_ckpt

from voxdiff.checkpoint import load_checkpoint
from voxdiff.cli import load_script

AE, LDM, SAMPLE, SDS = "autoencoder.py", "diffusion/train.py", "diffusion/sample.py", "sds/main.py"
QUICK = ["--device", "cpu", "--threads", "1", "--precision", "fp32"]


class Killed(BaseException):
    """A crash injected at a write point: like SIGKILL, nothing of the program's own error handling catches it."""


def crash_at(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, nth: int, after: bool = True,
             when: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Replace `owner.name` so that its `nth` call (counting calls for which `when(*args)` holds) raises Killed, just
    after the real call returned (`after`) or instead of it."""
    real, calls = getattr(owner, name), [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hit = when(*args, **kwargs)
        calls[0] += hit
        if hit and calls[0] == nth and not after:
            raise Killed(f"{name} #{nth}")
        out = real(*args, **kwargs)
        if hit and calls[0] == nth:
            raise Killed(f"{name} #{nth}")
        return out

    monkeypatch.setattr(owner, name, wrapper)


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " WARNING " in line]


def without_progress(code: int, err: str) -> tuple[int, str]:
    """(code, stderr) less the progress lines a command prints on a non-terminal as it works (voxdiff.logs.Progress):
    what is left of a failed run is its error."""
    return code, "".join(line for line in err.splitlines(keepends=True) if ", elapsed " not in line)


def _same_weights(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    for part in ("model", "ema"):
        sa, sb = getattr(ca, part) or {}, getattr(cb, part) or {}
        assert sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items()), (a, part)


def npy_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.npy"))}


# ---- fixtures --------------------------------------------------------------------------------------------------------


def ae_argv(data: Path, run: Path, *more: str) -> list[str]:
    return ["--dataset_path", str(data), "--ckpt_path", str(run), *QUICK, "--num_steps", "2", "--batch_size", "8",
            "--resolution", "32", "--channels", "4", "8", "8", "--holdout_fraction", "0.25", "--ckpt_every", "2",
            "--log_every", "1", *more]


def ldm_argv(data: Path, ae: Path, run: Path, *more: str) -> list[str]:
    return ["--dataset_path", str(data), "--ae_ckpt_path", str(ae), "--ckpt_path", str(run), *QUICK, "--num_steps",
            "2", "--batch_size", "8", "--warmup_steps", "1", "--ckpt_every", "1", "--log_every", "1", "--no_preview",
            "--unet_preset", "small", "--ch", "8", "--ch_mult", "1", "2", "--attn_levels", "1", "--num_groups", "4",
            "--num_train_timesteps", "50", "--seed", "5", *more]


@pytest.fixture(scope="module")
def ae_run(tiny_voxel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step AE run made by autoencoder.py (last.pt, best.pt, log.*, train.log)."""
    run = tmp_path_factory.mktemp("ae_run") / "ae"
    load_script(ROOT / AE).main(ae_argv(tiny_voxel_dir, run))
    return run


@pytest.fixture(scope="module")
def ldm_run(tiny_voxel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ae/best.pt` (a tiny AE, its latent cache in ae/latents) and a finished 2-step LDM run in `ldm/`, made by
    diffusion/train.py; the AE is named by its run directory, so copies of the pair train and resume alike."""
    root = tmp_path_factory.mktemp("ldm_run")
    make_ae_ckpt(root / "ae" / "best.pt", holdout={"airplane": [0], "chair": [1], "table": [2]})
    load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm"))
    return root


@pytest.fixture
def data_copy(tiny_voxel_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_voxel_dir, tmp_path / "data"))


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock")))


# ---- autoencoder.py --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "fault"), [("last.pt", "truncated"), ("last.pt", "random_bytes"),
                                             ("last.pt", "flipped_byte"), ("last.pt", "nan_weights"),
                                             ("best.pt", "truncated"), ("best.pt", "flipped_byte")])
def test_ae_resume_refuses_a_damaged_checkpoint(file: str, fault: str, ae_run: Path, tiny_voxel_dir: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both checkpoints are read before anything is written (best.pt too: the final step rewrites it)."""
    run = _copy(ae_run, tmp_path / "ae")
    CORRUPTIONS[fault](run / file)
    before = snapshot(run)
    line = one_line(*cli(capsys, AE, ae_argv(tiny_voxel_dir, run, "--resume")), str(run / file))
    assert "weights_only" not in line
    assert_unchanged(run, before)
    if fault == "truncated" and file == "last.pt":  # restored from a copy, the same command completes
        shutil.copy(ae_run / file, run / file)
        load_script(ROOT / AE).main(ae_argv(tiny_voxel_dir, run, "--resume"))
        _same_weights(run / "last.pt", ae_run / "last.pt")


def test_ae_resume_without_best_restores_it_and_completes(ae_run: Path, tiny_voxel_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A resume at the final step with best.pt gone (moved away after it was refused as damaged, or lost) crashed
    with "checkpoint not found" in the latent-statistics rewrite. Now last.pt stands in for it, saying so once."""
    run = _copy(ae_run, tmp_path / "ae")
    (run / "best.pt").unlink()
    capsys.readouterr()
    load_script(ROOT / AE).main(ae_argv(tiny_voxel_dir, run, "--resume"))
    [line] = warning_lines(capsys.readouterr().err)
    assert f"{run / 'best.pt'} is missing; a copy of {run / 'last.pt'} (step 2) stands in for it" in line
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best.step == last.step == 2 and best.meta.latent_mean == last.meta.latent_mean is not None
    assert all(torch.equal(v, last.model[k]) for k, v in best.model.items())
    assert "stands in for it" in (run / "train.log").read_text()


def test_ae_crash_between_the_checkpoint_saves_then_resume_completes(ae_run: Path, tiny_voxel_dir: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after last.pt, before best.pt of the first validation (best.pt was saved first: a kill between left a
    best.pt without last.pt, which neither --resume nor a plain rerun accepted). The resume completes with the
    uninterrupted run's checkpoints."""
    from voxdiff.training import autoencoder

    run = tmp_path / "ae"
    crash_at(monkeypatch, autoencoder, "save_checkpoint", 2, after=False)
    with pytest.raises(Killed):
        load_script(ROOT / AE).main(ae_argv(tiny_voxel_dir, run))
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    monkeypatch.undo()
    load_script(ROOT / AE).main(ae_argv(tiny_voxel_dir, run, "--resume"))
    for name in ("last.pt", "best.pt"):
        _same_weights(run / name, ae_run / name)
        assert load_checkpoint(run / name).meta.latent_mean == load_checkpoint(ae_run / name).meta.latent_mean


@pytest.mark.parametrize("content", ['{"step": 1, "loss": 0.5}\n{"st\n{"step": 2, "loss": 0.4}\n', "\x00\xff\xfe\n",
                                     '{"step": 1}\n[1, 2]\n{"step": 2}\n'])
def test_ae_resume_refuses_a_damaged_history(content: str, ae_run: Path, tiny_voxel_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """log.jsonl damaged before its last line: refused before train.log or the log are touched (a cut last line is
    a killed run's, dropped with a warning: tests/test_safety.py)."""
    run = _copy(ae_run, tmp_path / "ae")
    (run / "log.jsonl").write_bytes(content.encode("latin-1"))
    before = snapshot(run)
    one_line(*cli(capsys, AE, ae_argv(tiny_voxel_dir, run, "--resume")), str(run / "log.jsonl"), "move")
    assert_unchanged(run, before)


@pytest.mark.parametrize("fault", ["truncated", "text"])
def test_ae_overwrite_with_a_damaged_data_file_keeps_the_old_run(fault: str, ae_run: Path, data_copy: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite removed the old run's checkpoints and log before the data was read: a damaged .npy then left
    neither the old run nor a new one."""
    run = _copy(ae_run, tmp_path / "ae")
    bad = data_copy / "table_voxels_train.npy"
    bad.write_bytes(bad.read_bytes()[:3000] if fault == "truncated" else b"0 1 1 0\n")
    before = snapshot(run)
    one_line(*cli(capsys, AE, ae_argv(data_copy, run, "--overwrite")), str(bad))
    assert_unchanged(run, before)


def test_ae_full_disk_keeps_the_checkpoints_and_a_rerun_completes(ae_run: Path, tiny_voxel_dir: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC at the checkpoint rewrite of a resumed run: one line naming last.pt, exit 28, both checkpoints as they
    were; the same command then completes."""
    run = _copy(ae_run, tmp_path / "ae")
    before = snapshot(run, no_logs)
    monkeypatch.setattr(torch, "save", no_space)
    code, err = without_progress(*cli(capsys, AE, ae_argv(tiny_voxel_dir, run, "--resume")))
    line = one_line(code, err, str(run / "last.pt"), "no space left")
    assert code == 28 and ".tmp" not in line
    assert_unchanged(run, before, no_logs)
    monkeypatch.undo()
    load_script(ROOT / AE).main(ae_argv(tiny_voxel_dir, run, "--resume"))
    assert load_checkpoint(run / "last.pt").step == 2 and not list(run.glob(".*.tmp"))


AE_FLAGS = [("--batch_size", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--num_steps", "0"), ("--num_epochs", "0"),
            ("--max_minutes", "0"), ("--grad_clip", "-1"), ("--weight_decay", "-0.1"), ("--threads", "0"),
            ("--max_bad_steps", "0"), ("--seed", "-1"), ("--log_every", "0"), ("--ckpt_every", "0"),
            ("--pos_weight", "0"), ("--latent_noise", "-1"), ("--holdout_fraction", "1"), ("--holdout_max", "0"),
            ("--resolution", "48"), ("--channels", "0"), ("--latent_channels", "0"), ("--negative_slope", "x"),
            ("--device", "cuda:x")]


@pytest.mark.parametrize(("flag", "value"), AE_FLAGS)
def test_ae_bad_numbers_are_refused_before_any_write(flag: str, value: str, ae_run: Path, tiny_voxel_dir: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(ae_run)
    one_line(*cli(capsys, AE, ae_argv(tiny_voxel_dir, ae_run, "--resume", flag, value)), flag)
    assert_unchanged(ae_run, before)
    one_line(*cli(capsys, AE, ae_argv(tiny_voxel_dir, tmp_path / "new", flag, value)), flag)
    assert not (tmp_path / "new").exists()


# ---- diffusion/train.py ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "fault"), [("ae/best.pt", "random_bytes"), ("ae/best.pt", "truncated"),
                                             ("ae/best.pt", "nan_weights"), ("ldm/last.pt", "flipped_byte"),
                                             ("ldm/last.pt", "empty"), ("ldm/best.pt", "truncated")])
def test_ldm_refuses_a_damaged_checkpoint(file: str, fault: str, ldm_run: Path, tiny_voxel_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(ldm_run, tmp_path / "root")
    CORRUPTIONS[fault](root / file)
    before = snapshot(root)
    for more in (["--resume"], ["--overwrite"]) if file.startswith("ae/") else (["--resume"],):
        line = one_line(*cli(capsys, LDM, ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", *more)), str(root / file))
        assert "weights_only" not in line
        assert_unchanged(root, before)
    if fault == "truncated" and file == "ae/best.pt":  # restored from a copy, the same command completes
        shutil.copy(ldm_run / file, root / file)
        load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", "--resume"))
        _same_weights(root / "ldm" / "last.pt", ldm_run / "ldm" / "last.pt")


@pytest.mark.parametrize("case", ["missing", "stale"])
def test_ldm_resume_at_the_final_step_restores_best(case: str, ldm_run: Path, tiny_voxel_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """best.pt lost, or older than the best model last.pt records (a kill between the saves of last.pt and best.pt
    of an improving checkpoint): the resume at the final step left it so for good. Now it is last.pt's copy."""
    root = _copy(ldm_run, tmp_path / "root")
    best = root / "ldm" / "best.pt"
    if case == "missing":
        best.unlink()
    else:
        raw = torch.load(best, weights_only=True)
        raw["step"], raw["meta"]["best_heldout_loss"] = 1, raw["meta"]["best_heldout_loss"] + 1.0  # an older best
        torch.save(raw, best)
    capsys.readouterr()
    load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", "--resume"))
    [line] = warning_lines(capsys.readouterr().err)
    assert str(best) in line and ("is missing" if case == "missing" else "is older than the best model") in line
    assert best.read_bytes() == (root / "ldm" / "last.pt").read_bytes()
    load_checkpoint(best)


def test_ldm_crash_between_the_checkpoint_saves_then_resume_equals_uninterrupted(
        ldm_run: Path, tiny_voxel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after last.pt, before best.pt of the step-1 checkpoint; the resume restores best.pt from last.pt and
    ends with the uninterrupted run's weights in both files."""
    from voxdiff.training import ldm

    root = _copy(ldm_run, tmp_path / "root")
    shutil.rmtree(root / "ldm")
    crash_at(monkeypatch, ldm, "save_checkpoint", 2, after=False)
    with pytest.raises(Killed):
        load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm"))
    assert load_checkpoint(root / "ldm" / "last.pt").step == 1 and not (root / "ldm" / "best.pt").exists()
    monkeypatch.undo()
    load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", "--resume"))
    for name in ("last.pt", "best.pt"):
        _same_weights(root / "ldm" / name, ldm_run / "ldm" / name)


@pytest.mark.parametrize("fault", ["truncated", "text", "empty"])
def test_ldm_rebuilds_a_damaged_latent_cache_saying_so(fault: str, ldm_run: Path, tiny_voxel_dir: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The warning goes through the trainer's logger: stderr and train.log, one line naming the cache file."""
    root = _copy(ldm_run, tmp_path / "root")
    [cache] = (root / "ae" / "latents").glob("*.npz")
    with np.load(cache) as f:
        z = f["latents"]
    CORRUPTIONS[fault](cache)
    capsys.readouterr()
    load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", "--resume"))
    [line] = warning_lines(capsys.readouterr().err)
    assert str(cache) in line and "encoding the train split again" in line
    assert str(cache) in (root / "ldm" / "train.log").read_text()
    with np.load(cache) as f:
        assert np.array_equal(f["latents"], z)


@pytest.mark.parametrize("fault", ["truncated", "not_4d"])
def test_ldm_overwrite_with_a_damaged_data_file_keeps_the_old_run(fault: str, ldm_run: Path, data_copy: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(ldm_run, tmp_path / "root")
    bad = data_copy / "chair_voxels_train.npy"
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:5000])
    else:
        np.save(bad, np.zeros((4, 32, 32), np.uint8))
    before = snapshot(root)
    one_line(*cli(capsys, LDM, ldm_argv(data_copy, root / "ae", root / "ldm", "--overwrite")), str(bad))
    assert_unchanged(root, before)


def test_ldm_full_disk_at_the_latent_cache_keeps_the_old_run(ldm_run: Path, tiny_voxel_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC while the latents are cached, in a run replacing an old one (--overwrite): one line naming the cache
    file, exit 28, and the old run whole (its files went before the cache was written); then the rerun completes."""
    root = _copy(ldm_run, tmp_path / "root")
    shutil.rmtree(root / "ae" / "latents")
    before = snapshot(root)
    monkeypatch.setattr(np, "savez", no_space)
    code, err = without_progress(*cli(capsys, LDM, ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", "--overwrite")))
    line = one_line(code, err, str(root / "ae" / "latents"), ".npz", "no space left")
    assert code == 28 and ".tmp" not in line
    assert_unchanged(root, before)
    monkeypatch.undo()
    load_script(ROOT / LDM).main(ldm_argv(tiny_voxel_dir, root / "ae", root / "ldm", "--resume"))
    assert len(list((root / "ae" / "latents").glob("*.npz"))) == 1


LDM_FLAGS = [("--lr", "0"), ("--batch_size", "-3"), ("--num_steps", "0"), ("--max_minutes", "-1"),
             ("--cfg_dropout", "1"), ("--warmup_steps", "-1"), ("--ema_decay", "1"), ("--preview_every", "0"),
             ("--preview_threshold", "1"), ("--ch", "0"), ("--ch_mult", "0"), ("--num_res_blocks", "0"),
             ("--attn_levels", "5"), ("--dropout", "1"), ("--num_groups", "3"), ("--num_heads", "0"),
             ("--num_train_timesteps", "1"), ("--beta_start", "0"), ("--beta_end", "2"), ("--seed", "-1"),
             ("--grad_clip", "nan"), ("--max_bad_steps", "0")]


@pytest.mark.parametrize(("flag", "value"), LDM_FLAGS)
def test_ldm_bad_numbers_are_refused_before_any_write(flag: str, value: str, ldm_run: Path, tiny_voxel_dir: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(ldm_run)
    one_line(*cli(capsys, LDM, ldm_argv(tiny_voxel_dir, ldm_run / "ae", ldm_run / "ldm", "--resume", flag, value)),
             flag)
    assert_unchanged(ldm_run, before)
    one_line(*cli(capsys, LDM, ldm_argv(tiny_voxel_dir, ldm_run / "ae", tmp_path / "new", flag, value)), flag)
    assert not (tmp_path / "new").exists()


# ---- diffusion/sample.py ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    make_ae_ckpt(d / "ae.pt")
    make_ldm_ckpt(d / "ldm.pt")
    return d


def sample_argv(models: Path, save: Path, *more: str) -> list[str]:
    return ["--ldm_ckpt_path", str(models / "ldm.pt"), "--ae_ckpt_path", str(models / "ae.pt"), "--save_dir", str(save),
            *QUICK, "--category", "chair", "table", "--num_samples", "3", "--batch_size", "2", "--steps", "2",
            "--resolution", "32", "--render", "none", "--seed", "3", "--binarize", "topk", *more]


def sample(models: Path, save: Path, *more: str, max_batches: int | None = None) -> None:
    if max_batches is None:
        load_script(ROOT / SAMPLE).main(sample_argv(models, save, *more))
        return
    from voxdiff.cli import config_from_args
    from voxdiff.config import SampleConfig
    from voxdiff.sampling import sample_to_files

    parser, flags = load_script(ROOT / SAMPLE).build_parser()
    cfg = config_from_args(SampleConfig, parser.parse_args(sample_argv(models, save, *more)), flags)
    sample_to_files(cfg, progress=False, max_batches=max_batches)  # a job stopped after `max_batches` batches


@pytest.fixture(scope="module")
def complete_job(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sampling job run to its end without a fault (top-k shapes, each batch's own: a row of zeros or of another
    batch shows in a comparison)."""
    d = tmp_path_factory.mktemp("complete") / "s"
    sample(models, d)
    rows = np.load(d / "chair.npy").reshape(3, -1)
    assert set(npy_files(d)) == {"chair.npy", "table.npy"} and rows.sum(1).min() > 0
    assert len({r.tobytes() for r in rows}) == 3
    return d


@pytest.fixture(scope="module")
def reference(complete_job: Path) -> dict[str, bytes]:
    """The samples of the uninterrupted job: every faulted job must end with these bytes."""
    return npy_files(complete_job)


@pytest.fixture(scope="module")
def half_done(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job stopped after its first batch (copied by each test that breaks it)."""
    d = tmp_path_factory.mktemp("half_done") / "s"
    sample(models, d, max_batches=1)
    assert (d / ".chair.progress.json").is_file() and not (d / "chair.npy").exists()
    return d


@pytest.mark.parametrize(("file", "fault"), [("ldm.pt", "flipped_byte"), ("ldm.pt", "nan_weights"),
                                             ("ae.pt", "truncated"), ("ae.pt", "random_bytes")])
def test_sample_refuses_a_damaged_checkpoint(file: str, fault: str, models: Path, half_done: Path,
                                             reference: dict[str, bytes], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    m, save = _copy(models, tmp_path / "m"), _copy(half_done, tmp_path / "s")  # a job half done: kept as it is
    CORRUPTIONS[fault](m / file)
    before = snapshot(save)
    line = one_line(*cli(capsys, SAMPLE, sample_argv(m, save)), str(m / file))
    assert "weights_only" not in line
    assert_unchanged(save, before)
    if fault == "flipped_byte":  # restored from a copy, the job finishes as if nothing happened
        shutil.copy(models / file, m / file)
        sample(m, save)
        assert npy_files(save) == reference


def _cut(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_json(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        data = json.loads(p.read_text())
        p.write_text(json.dumps(edit(data) or data))

    return apply


PROGRESS_FAULTS: dict[str, Callable[[Path], None]] = {
    "truncated": _cut,
    "binary": lambda p: p.write_bytes(b"\x00\xff\x00\xfe"),
    "list": lambda p: p.write_text("[]"),
    "bad_batch_record": _edit_json(lambda d: d["done"].update({"0": "done"})),
    "batch_out_of_range": _edit_json(lambda d: d["done"].update({"7": {"n": 2, "occ_sum": 1.0, "empty": 0}})),
    "complete_without_stats": _edit_json(lambda d: d.update(complete=True)),
}


@pytest.mark.parametrize("fault", PROGRESS_FAULTS)
def test_sample_rebuilds_a_damaged_progress_record(fault: str, models: Path, half_done: Path,
                                                   reference: dict[str, bytes], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    save = _copy(half_done, tmp_path / "s")
    prog = save / ".chair.progress.json"
    PROGRESS_FAULTS[fault](prog)
    capsys.readouterr()
    sample(models, save)
    [line] = warning_lines(capsys.readouterr().err)
    assert str(prog) in line and "sampling this category afresh" in line
    assert npy_files(save) == reference


PARTIAL_FAULTS: dict[str, Callable[[Path], None]] = {
    "truncated": _cut,
    "text": lambda p: p.write_text("0 1 0 1\n"),
    "empty": lambda p: p.write_bytes(b""),
    "other_shape": lambda p: np.save(p, np.zeros((3, 16, 16, 16), np.uint8)),
}


@pytest.mark.parametrize("fault", PARTIAL_FAULTS)
def test_sample_restarts_a_category_whose_partial_file_is_damaged(fault: str, models: Path, half_done: Path,
                                                                  reference: dict[str, bytes], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The partial file cut (a full disk, a copy): every rerun failed the same way ("mmap length is greater than
    file size"). Now the category starts afresh, saying so once."""
    save = _copy(half_done, tmp_path / "s")
    partial = save / ".chair.partial.npy"
    PARTIAL_FAULTS[fault](partial)
    capsys.readouterr()
    sample(models, save)
    [line] = warning_lines(capsys.readouterr().err)
    assert str(partial) in line and "afresh" in line
    assert npy_files(save) == reference and not partial.exists()


@pytest.mark.parametrize("fault", ["truncated", "text"])
def test_sample_redoes_a_complete_category_whose_samples_are_damaged(fault: str, models: Path, complete_job: Path,
                                                                     reference: dict[str, bytes], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Done means the output exists: a finished chair.npy cut later was skipped as complete, for good."""
    save = _copy(complete_job, tmp_path / "s")
    PARTIAL_FAULTS[fault](save / "chair.npy")
    capsys.readouterr()
    sample(models, save)
    [line] = warning_lines(capsys.readouterr().err)
    assert str(save / "chair.npy") in line
    assert npy_files(save) == reference


def test_sample_full_disk_names_the_samples_and_leaves_nothing(models: Path, reference: dict[str, bytes],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC reserving the table's partial file, with the chair done: one line naming table.npy (not the hidden
    partial), exit 28, no full-size partial file left on the full disk; then the rerun completes."""
    save = tmp_path / "s"
    sample(models, save, max_batches=2)  # chair complete, table not begun
    before = snapshot(save, no_logs)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    code, err = cli(capsys, SAMPLE, sample_argv(models, save))
    line = one_line(code, err, str(save / "table.npy"), "no space left")
    assert code == 28 and "partial" not in line
    assert_unchanged(save, before, no_logs)
    assert not (save / ".table.partial.npy").exists()
    monkeypatch.undo()
    sample(models, save)
    assert npy_files(save) == reference


def _is_partial(src: Any, *args: Any, **kwargs: Any) -> bool:
    return str(src).endswith(".partial.npy")


# (what is patched, which call, crash after it returned?): every write of a 2-category job of 2 batches each
WRITE_POINTS = {
    "partial_made": ("open_npy_memmap", 1, True),
    "rows_written_before_record": ("atomic_write_json", 1, False),
    "first_batch_recorded": ("atomic_write_json", 1, True),
    "last_batch_recorded": ("atomic_write_json", 2, True),
    "renamed_before_complete": ("replace", 1, True),
    "category_complete": ("atomic_write_json", 3, True),
    "second_category_partial": ("open_npy_memmap", 2, True),
    "summary": ("atomic_write_json", 7, False),
}


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_sample_crash_at_each_write_point_then_rerun_is_bit_identical(point: str, models: Path,
                                                                      reference: dict[str, bytes], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from voxdiff.sampling import writer as sampling

    name, nth, after = WRITE_POINTS[point]
    save = tmp_path / "s"
    if name == "replace":
        crash_at(monkeypatch, os, "replace", nth, after, when=_is_partial)
    else:
        crash_at(monkeypatch, sampling, name, nth, after)
    with pytest.raises(Killed):
        sample(models, save)
    monkeypatch.undo()
    sample(models, save)
    assert npy_files(save) == reference
    assert not list(save.glob(".*.tmp")) and not list(save.glob(".*.partial.npy"))


def test_sample_never_trusts_rows_of_a_partial_file_remade_by_other_settings(models: Path, half_done: Path,
                                                                             reference: dict[str, bytes],
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A job half done; a run with other settings in the same directory remakes the partial file and is killed
    before its first record; the first settings again must not take the zeros of the new file for finished rows."""
    from voxdiff.sampling import writer as sampling

    save = _copy(half_done, tmp_path / "s")
    crash_at(monkeypatch, sampling, "open_npy_memmap", 1)
    with pytest.raises(Killed):
        sample(models, save, "--eta", "0.5")
    monkeypatch.undo()
    sample(models, save)
    assert npy_files(save) == reference


def test_sample_sigkill_after_the_first_batch_then_rerun_is_bit_identical(models: Path, tmp_path: Path) -> None:
    """A real kill: SIGKILL a sampling process once its first batch is recorded; the rerun resumes and writes the
    bytes of an uninterrupted run."""
    more = ["--category", "chair", "--num_samples", "3", "--batch_size", "1", "--steps", "15"]
    save, ref = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen([sys.executable, SAMPLE, *sample_argv(models, save, *more)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prog, deadline = save / ".chair.progress.json", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if prog.is_file() and json.loads(prog.read_text())["done"]:  # written atomically: always whole
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the sampler finished before it could be killed"
    finally:
        proc.kill()
    assert not (save / "chair.npy").exists() and (save / ".chair.partial.npy").is_file()
    sample(models, save, *more)
    sample(models, ref, *more)
    assert npy_files(save) == npy_files(ref) and not list(save.glob(".*.tmp"))


SAMPLE_FLAGS = [("--num_samples", "0"), ("--batch_size", "0"), ("--cfg_scale", "nan"), ("--cfg_scale", "101"),
                ("--resolution", "0"), ("--resolution", "48"), ("--threshold", "1.5"), ("--guidance_rescale", "2"),
                ("--seed", "-1"), ("--steps", "0"), ("--steps", "1000"), ("--eta", "2"), ("--render", "0"),
                ("--threads", "x"), ("--topk", "0")]


@pytest.mark.parametrize(("flag", "value"), SAMPLE_FLAGS)
def test_sample_bad_numbers_are_refused_before_any_write(flag: str, value: str, models: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    save = tmp_path / "s"
    argv = sample_argv(models, save, flag, value, *(["--binarize", "threshold"] if flag == "--threshold" else []))
    one_line(*cli(capsys, SAMPLE, argv), flag)
    assert not save.exists()


# ---- sds/main.py -----------------------------------------------------------------------------------------------------


def sds_argv(models: Path, save: Path, *more: str) -> list[str]:
    return ["--ldm_ckpt_path", str(models / "ldm.pt"), "--ae_ckpt_path", str(models / "ae.pt"), "--save_dir", str(save),
            *QUICK, "--category", "chair", "--num_samples", "3", "--batch_size", "2", "--num_steps", "2",
            "--resolution", "32", "--render_every", "none", "--seed", "5", "--binarize", "topk", *more]


@pytest.fixture(scope="module")
def sds_reference(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sds_reference") / "s"
    load_script(ROOT / SDS).main(sds_argv(models, d))
    return d


@pytest.mark.parametrize(("file", "fault"), [("ldm.pt", "truncated"), ("ldm.pt", "nan_weights"),
                                             ("ae.pt", "flipped_byte")])
def test_sds_refuses_a_damaged_checkpoint(file: str, fault: str, models: Path, sds_reference: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    m, save = _copy(models, tmp_path / "m"), _copy(sds_reference, tmp_path / "s")
    CORRUPTIONS[fault](m / file)
    before = snapshot(save)
    one_line(*cli(capsys, SDS, sds_argv(m, save)), str(m / file))
    assert_unchanged(save, before)


@pytest.mark.parametrize("content", ['{"chair": {"fi', "\x00\xff", '{"sofa": 1}', "[]"])
def test_sds_rewrites_an_unreadable_summary_saying_so(content: str, models: Path, sds_reference: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save = _copy(sds_reference, tmp_path / "s")
    (save / "sds.json").write_bytes(content.encode("latin-1"))
    capsys.readouterr()
    load_script(ROOT / SDS).main(sds_argv(models, save))
    [line] = warning_lines(capsys.readouterr().err)
    assert str(save / "sds.json") in line and "unreadable" in line
    assert set(json.loads((save / "sds.json").read_text())) == {"chair"}
    assert npy_files(save) == npy_files(sds_reference)


def test_sds_full_disk_keeps_the_old_samples(models: Path, sds_reference: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    save = _copy(sds_reference, tmp_path / "s")
    before = snapshot(save, no_logs)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    code, err = cli(capsys, SDS, sds_argv(models, save, "--seed", "6"))
    line = one_line(code, err, str(save / "chair.npy"), "no space left")
    assert code == 28 and ".tmp" not in line
    assert_unchanged(save, before, no_logs)
    monkeypatch.undo()
    load_script(ROOT / SDS).main(sds_argv(models, save))
    assert npy_files(save) == npy_files(sds_reference)


@pytest.mark.parametrize("point", ["second_batch_decoded", "summary"])
def test_sds_crash_keeps_the_old_samples_and_a_rerun_completes(point: str, models: Path, sds_reference: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while the new samples are written (or before the summary): the old samples stay whole, the next run
    clears what the killed one left and completes."""
    from voxdiff import sds

    save = _copy(sds_reference, tmp_path / "s")
    before = snapshot(save, no_logs)
    if point == "summary":
        crash_at(monkeypatch, sds, "atomic_write_json", 1, after=False)
    else:
        crash_at(monkeypatch, sds.LatentVoxelPipeline, "to_grids", 2)
    with pytest.raises(Killed):
        load_script(ROOT / SDS).main(sds_argv(models, save, "--seed", "6"))
    if point != "summary":
        assert_unchanged(save, before, no_logs)  # the killed run's own temporary file was removed as it unwound
    (save / ".chair.npy.k1ll3d.tmp").write_bytes(b"half a file")  # what a SIGKILL there would have left
    monkeypatch.undo()
    load_script(ROOT / SDS).main(sds_argv(models, save))
    assert npy_files(save) == npy_files(sds_reference) and not list(save.glob(".*.tmp"))


SDS_FLAGS = [("--num_samples", "0"), ("--batch_size", "0"), ("--num_steps", "-1"), ("--lr", "0"), ("--t_min", "-0.1"),
             ("--t_max", "2"), ("--steps", "0"), ("--render_every", "0"), ("--render_n", "0"), ("--seed", "-1"),
             ("--cfg_scale", "200"), ("--threshold", "nan"), ("--resolution", "40")]


@pytest.mark.parametrize(("flag", "value"), SDS_FLAGS)
def test_sds_bad_numbers_are_refused_before_any_write(flag: str, value: str, models: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    save = tmp_path / "s"
    argv = sds_argv(models, save, flag, value, *(["--binarize", "threshold"] if flag == "--threshold" else []))
    one_line(*cli(capsys, SDS, argv), flag)
    assert not save.exists()
