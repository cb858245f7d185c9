"""Autoencoder: shapes, losses, binarisation, training (overfit, resume), checkpoints, CLI errors. CPU, tiny sizes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_AE, make_voxel_dir

from voxdiff.binarize import ThresholdCalibrator, binarize, recon_metrics
from voxdiff.checkpoint import AEMeta, Checkpoint, load_autoencoder, load_checkpoint, save_checkpoint
from voxdiff.config import AEConfig, AETrainConfig, to_dict
from voxdiff.device import seed_everything
from voxdiff.errors import VoxdiffError
from voxdiff.losses import kl_to_standard_normal, pos_weight_from_occupancy, reconstruction_loss
from voxdiff.models.autoencoder import LOGVAR_RANGE, VoxelAutoencoder
from voxdiff.training.autoencoder import (
    calibrate_threshold,
    chamfer_pairs,
    evaluate,
    train_autoencoder,
)

TINY = TINY_AE


def tiny_cfg(data: Path, run: Path, **kw) -> AETrainConfig:
    base = dict(dataset_path=str(data), ckpt_path=str(run), batch_size=8, lr=3e-3, num_epochs=10, device="cpu",
                holdout_fraction=0.25, log_every=1, ckpt_every=2, model=TINY)
    base.update(kw)
    return AETrainConfig(**base)


# ---- networks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [16, 32])
def test_encode_decode_shapes(res: int) -> None:
    model = VoxelAutoencoder(AEConfig(resolution=res, channels=(4, 8, 8))).eval()
    x = (torch.rand(2, 1, res, res, res) > 0.9).float()
    z = model.encode(x)
    assert z.shape == (2, *model.latent_shape) == (2, 16, res // 8, res // 8, res // 8)
    p = model.decode(z)
    assert p.shape == x.shape and p.min() >= 0 and p.max() <= 1
    up = model.decode(z, resolution=2 * res)
    assert up.shape == (2, 1, 2 * res, 2 * res, 2 * res)
    # nearest upsampling: every 2x2x2 block of the upsampled grid repeats one voxel of the base decode
    assert torch.equal(up[:, :, ::2, ::2, ::2], p) and torch.equal(up[:, :, 1::2, 1::2, 1::2], p)
    with pytest.raises(ValueError):
        model.encode(torch.zeros(1, 1, res * 2, res * 2, res * 2))


# ---- losses ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bce", "weighted_bce", "dice", "bce_dice", "focal"])
def test_losses_finite_and_differentiable(kind: str) -> None:
    logits = (torch.randn(2, 1, 8, 8, 8) * 20).requires_grad_()  # large logits must not overflow
    target = (torch.rand(2, 1, 8, 8, 8) > 0.95).float()
    loss = reconstruction_loss(logits, target, kind, pos_weight=50.0)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize(("kind", "ratio"), [("bce", 1.0), ("weighted_bce", 7.0), ("focal", 3.0)])
def test_weighted_losses_upweight_positives(kind: str, ratio: float) -> None:
    """At logit 0 an occupied voxel's gradient is `ratio` times an empty voxel's (pos_weight 7; focal alpha 0.75)."""
    logits = torch.zeros(1, 1, 4, 4, 4, requires_grad=True)
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 0, 0, 0] = 1
    reconstruction_loss(logits, target, kind, pos_weight=7.0).backward()
    g = logits.grad.reshape(-1)
    assert g[0] < 0 < g[1]  # pushes the occupied voxel up, the empty one down
    assert abs(g[0]).item() / g[1].item() == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize("kind", ["dice", "bce_dice"])
def test_dice_pushes_occupied_up_and_empty_down(kind: str) -> None:
    logits = torch.zeros(1, 1, 4, 4, 4, requires_grad=True)
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 0] = 1
    reconstruction_loss(logits, target, kind).backward()
    g = logits.grad[0, 0]
    assert (g[0] < 0).all() and (g[1:] > 0).all()


def test_pos_weight_from_occupancy() -> None:
    assert pos_weight_from_occupancy(0.01) == pytest.approx(99.0)
    assert pos_weight_from_occupancy(0.0) == 1000.0  # clipped, finite
    with pytest.raises(ValueError, match="weighted_bce needs pos_weight"):
        reconstruction_loss(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2), "weighted_bce")
    with pytest.raises(ValueError, match="must be one of"):
        reconstruction_loss(torch.zeros(1), torch.zeros(1), "mse")  # type: ignore[arg-type]


# ---- binarisation and metrics ------------------------------------------------------------------------------------
def test_binarize_topk_keeps_exactly_k() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, 8, 8, 8, generator=g)
    probs[2] = 0.5  # all ties: still exactly k
    ks = torch.tensor([5, 0, 37])
    out = binarize(probs, topk=ks)
    assert out.dtype == torch.bool and out.shape == probs.shape
    assert out.reshape(3, -1).sum(1).tolist() == [5, 0, 37]
    # the kept voxels are the most probable ones
    assert probs[0][out[0]].min() >= probs[0][~out[0]].max()
    assert binarize(probs, topk=10).reshape(3, -1).sum(1).tolist() == [10, 10, 10]
    assert torch.equal(binarize(probs, threshold=0.7), probs > 0.7)
    assert torch.equal(binarize(probs), probs > 0.5)  # the one rule: strictly greater (as metrics and renders)
    assert not binarize(probs[2:]).any()


def test_recon_metrics_definitions() -> None:
    t = torch.zeros(3, 10, dtype=torch.bool)
    t[:, :4] = True
    p = torch.zeros(3, 10, dtype=torch.bool)
    p[0, :2] = True  # 2 of 4 found, no false positives
    p[1, 2:8] = True  # 2 TP, 4 FP
    m = recon_metrics(p, t.float())
    assert m["iou"].tolist() == pytest.approx([0.5, 2 / 8, 0.0])
    assert m["precision"].tolist() == pytest.approx([1.0, 2 / 6, 0.0])
    assert m["recall"].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert m["empty"].tolist() == [0.0, 0.0, 1.0]


def test_calibrator_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.rand(4, 1, 8, 8, 8, generator=g) > 0.9
    probs = (0.6 * target + 0.5 * torch.rand(4, 1, 8, 8, 8, generator=g)).clamp(0, 1)
    probs[:, :, :4] = torch.round(probs[:, :, :4] * 20) / 20  # many probabilities exactly on a threshold
    cal = ThresholdCalibrator(num_bins=20)
    cal.update(probs[:2], target[:2].float())
    cal.update(probs[2:], target[2:].float())
    ious = cal.ious()
    for j in (2, 9, 13):
        t = float(cal.thresholds[j])
        brute = recon_metrics(binarize(probs, threshold=t), target.float())["iou"].mean()
        assert ious[j].item() == pytest.approx(brute.item(), abs=1e-9)
    thr, best = cal.best()
    assert best == pytest.approx(ious.max().item())
    assert best > recon_metrics(binarize(probs), target.float())["iou"].mean().item() - 1e-12


def test_chamfer_pairs_is_the_eval_definition() -> None:
    """Per-pair CD on voxel indices / (R-1), squared, mean per side, brute force; empty predictions give NaN."""
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 1, 8, 8, 8, generator=g) > 0.9
    target = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.8).float()
    pred[1] = False
    a = torch.nonzero(pred[0, 0]).double() / 7
    b = torch.nonzero(target[0, 0]).double() / 7
    d = torch.cdist(a, b) ** 2
    got = chamfer_pairs(pred, target)
    assert got[0] == pytest.approx((d.min(1).values.mean() + d.min(0).values.mean()).item())
    assert np.isnan(got[1])


# ---- training ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_voxel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 5-step run, and the same run stopped after 4 steps (mid-epoch 1) then resumed to 5."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ae_runs")
    full, split = root / "full", root / "split"
    train_autoencoder(tiny_cfg(tiny_voxel_dir, full, num_steps=5))
    first = train_autoencoder(tiny_cfg(tiny_voxel_dir, split, num_steps=4))
    assert first["step"] == 4 and first["stopped"] == "num_steps"
    train_autoencoder(tiny_cfg(tiny_voxel_dir, split, num_steps=5, resume=True))
    return {"full": full, "split": split, "data": tiny_voxel_dir}


def test_resume_equals_uninterrupted(runs: dict[str, Path]) -> None:
    a = load_checkpoint(runs["full"] / "last.pt", kind="autoencoder")
    b = load_checkpoint(runs["split"] / "last.pt", kind="autoencoder")
    assert a.step == b.step == 5
    for k, v in a.model.items():  # bit-identical: same batches, same RNG, same arithmetic
        assert torch.equal(b.model[k], v), k
    for sa, sb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        assert torch.equal(sb["exp_avg_sq"], sa["exp_avg_sq"])
    assert a.meta.threshold == b.meta.threshold and a.meta.latent_mean == b.meta.latent_mean
    # the resumed run's log holds each step once
    rows = [json.loads(line) for line in (runs["split"] / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5]


def test_checkpoint_round_trip(runs: dict[str, Path]) -> None:
    model, ckpt = load_autoencoder(runs["full"])  # a run dir: best.pt
    extra = ckpt.meta
    assert ckpt.model_config == to_dict(TINY)  # the network is rebuilt from its own config alone
    assert len(extra.latent_mean) == len(extra.latent_std) == 16
    assert all(s > 0 for s in extra.latent_std)
    assert 0 < extra.threshold < 1
    assert set(extra.occupancy["32"]) == {"airplane", "chair", "table"}
    assert all(v > 0 for v in extra.occupancy["32"].values())
    assert all(extra.max_voxels["32"][c] >= extra.occupancy["32"][c] for c in extra.occupancy["32"])
    assert (runs["full"] / "log.png").is_file() and (runs["full"] / "log.csv").is_file()
    # the rebuilt model reproduces the saved weights' outputs
    twin = VoxelAutoencoder(TINY)
    twin.load_state_dict(ckpt.model)
    x = (torch.rand(2, 1, 32, 32, 32) > 0.95).float()
    assert torch.equal(model.decode(model.encode(x)), twin.eval().decode(twin.encode(x)))
    # the latent stats describe this model's encodings of the train split minus its held-out slice
    data = np.concatenate([np.delete(np.load(runs["data"] / f"{c}_voxels_train.npy"), extra.holdout[c], axis=0)
                           for c in ("airplane", "chair", "table")])
    with torch.no_grad():
        z = model.encode(torch.from_numpy(data[:, None].astype(np.float32))).double()
    torch.testing.assert_close(z.mean((0, 2, 3, 4)), torch.tensor(extra.latent_mean, dtype=torch.float64))
    std = torch.tensor(extra.latent_std, dtype=torch.float64)
    torch.testing.assert_close(z.std((0, 2, 3, 4), correction=0), std)


def test_resume_refuses_mismatched_config(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(runs["split"], run)
    cfg = tiny_cfg(runs["data"], run, num_steps=6, resume=True, model=AEConfig(resolution=32, channels=(4, 8, 16)))
    with pytest.raises(VoxdiffError, match=r"config mismatch \(model"):
        train_autoencoder(cfg)
    with pytest.raises(VoxdiffError, match="no checkpoint"):
        train_autoencoder(tiny_cfg(runs["data"], tmp_path / "empty", resume=True))


def test_unsafe_and_foreign_checkpoints_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": 2, "model": Evil()}, tmp_path / "evil.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    for name in ("evil.pt", "module.pt"):
        with pytest.raises(VoxdiffError, match="not a safe voxdiff checkpoint"):
            load_autoencoder(tmp_path / name)
    assert not marker.exists()
    save_checkpoint(tmp_path / "ldm.pt", Checkpoint(kind="ldm", model_config=to_dict(TINY),
                                                    model=VoxelAutoencoder(TINY).state_dict(), meta=AEMeta()))
    with pytest.raises(VoxdiffError, match="expected 'autoencoder'"):
        load_autoencoder(tmp_path / "ldm.pt")


def test_format1_checkpoints_load_but_do_not_resume(tmp_path: Path, tiny_voxel_dir: Path) -> None:
    """A checkpoint written by voxdiff 0.1 (whole training config + `extra`) still decodes; resuming it is refused
    with a one-line reason."""
    torch.manual_seed(0)
    ae = VoxelAutoencoder(TINY)
    v1 = {"format": 1, "version": "0.1.0", "kind": "autoencoder", "step": 9, "epoch": 1, "rng": None, "ema": None,
          "optimizer": None, "model": ae.state_dict(),
          "config": {**to_dict(AETrainConfig(model=TINY)), "model": {"resolution": 32, "channels": [4, 8, 8],
                                                                   "latent_channels": 16, "negative_slope": 0.2}},
          "extra": {"threshold": 0.42, "latent_mean": [0.0] * 16, "latent_std": [1.0] * 16}}
    (tmp_path / "run").mkdir()
    torch.save(v1, tmp_path / "run" / "last.pt")
    model, ckpt = load_autoencoder(tmp_path / "run" / "last.pt")
    x = (torch.rand(1, 1, 32, 32, 32) > 0.9).float()
    assert torch.equal(model(x), ae.eval()(x)) and ckpt.meta.threshold == 0.42 and ckpt.format == 1
    with pytest.raises(VoxdiffError, match="cannot resume from it"):
        train_autoencoder(tiny_cfg(tiny_voxel_dir, tmp_path / "run", num_steps=2, resume=True))
    torch.save({**v1, "config": {}}, tmp_path / "empty.pt")
    with pytest.raises(VoxdiffError, match="unreadable"):
        load_autoencoder(tmp_path / "empty.pt")


@pytest.mark.parametrize("schedule, warmup, last_lr",
                         [("constant", 0, 1.0), ("cosine", 1, 0.1), ("constant", 100, 0.04)])
def test_lr_schedule_sets_the_optimizer_lr(tiny_voxel_dir: Path, tmp_path: Path, schedule: str, warmup: int,
                                           last_lr: float) -> None:
    """The AE's LR follows warmup_steps and lr_schedule (cosine: down to lr/10 at the last step); the optimizer state
    in last.pt holds the LR of the last step."""
    cfg = tiny_cfg(tiny_voxel_dir, tmp_path / "run", num_steps=4, ckpt_every=100, lr_schedule=schedule,
                   warmup_steps=warmup)
    train_autoencoder(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt", kind="autoencoder")
    assert ckpt.optimizer["param_groups"][0]["lr"] == pytest.approx(last_lr * cfg.lr)


def test_time_cap_stops_cleanly_and_says_so(tiny_voxel_dir: Path, tmp_path: Path) -> None:
    """A spent --max_minutes cap stops before the next step, still writes checkpoints with latent stats, and the
    result carries the one-line note the pipeline's report prints."""
    result = train_autoencoder(tiny_cfg(tiny_voxel_dir, tmp_path / "run", num_steps=5, max_minutes=1e-9))
    assert result["stopped"] == "time_cap" and result["step"] == 0
    assert result["note"] == "AE stopped by the time cap at step 0 of 5; these results are not the preset's"
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt", kind="autoencoder")
    assert ckpt.step == 0 and len(ckpt.meta.latent_mean) == 16


def test_holdout_slice_is_train_only_and_never_trained_on(tiny_voxel_dir: Path, tmp_path: Path) -> None:
    """best.pt is chosen on a seeded slice of TRAIN rows (recorded in the checkpoint); those rows are not in the
    fit set, and every category keeps a share."""
    from voxdiff.training.common import holdout_rows

    counts = {"airplane": 40, "chair": 8, "table": 3}
    rows = holdout_rows(counts, 0.25, 5, seed=3)
    assert [len(rows[c]) for c in counts] == [5, 2, 1]  # capped, rounded, at least one
    assert all(0 <= row < counts[c] for c in counts for row in rows[c])
    assert rows == holdout_rows(counts, 0.25, 5, seed=3) and rows != holdout_rows(counts, 0.25, 5, seed=4)
    train_autoencoder(tiny_cfg(tiny_voxel_dir, tmp_path / "run", num_steps=2))
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt", kind="autoencoder")
    assert ckpt.meta.holdout == holdout_rows(dict.fromkeys(("airplane", "chair", "table"), 8), 0.25, 100, 0)


def test_tiny_ae_overfits_a_handful_of_shapes(tmp_path: Path) -> None:
    """Val = the training shapes; calibrated IoU rises far above the untrained model's and the all-empty baseline."""
    torch.set_num_threads(1)
    data = make_voxel_dir(tmp_path / "data", n={"val": 3}, seed=3)
    for c in ("airplane", "chair", "table"):
        shapes = np.load(data / f"{c}_voxels_val.npy")
        np.save(data / f"{c}_voxels_train.npy", np.concatenate([shapes] * 8))  # 8 copies: one epoch = 6 steps
    cfg = tiny_cfg(data, tmp_path / "run", batch_size=12, lr=5e-3, num_epochs=6, holdout_fraction=0.1,
                   model=AEConfig(resolution=32, channels=(8, 16)))
    # the untrained model, initialised exactly as the trainer does (same seed), scored the same way
    seed_everything(cfg.seed)
    start_model = VoxelAutoencoder(cfg.model)
    from voxdiff.data.dataset import VoxelDataset

    val = VoxelDataset(data, "val", resolution=32)
    grids, labels = val.load(), torch.from_numpy(val.class_indices())
    thr0, _ = calibrate_threshold(start_model, grids, torch.device("cpu"))
    start = evaluate(start_model, grids, labels, torch.device("cpu"), thr0, {0: 50, 1: 50, 2: 50})["iou_cal"]
    empty = recon_metrics(torch.zeros(len(val), 32**3, dtype=torch.bool), grids)["iou"]
    result = train_autoencoder(cfg)
    assert result["best_iou_cal"] > max(0.15, 4 * start, float(empty.mean()) + 0.15)


# ---- variational AE (AutoencoderKL) ---------------------------------------------------------------------------------
TINY_VAE = AEConfig(resolution=32, channels=(4, 8, 8), variational=True)


@pytest.mark.parametrize("block", ["course", "resnet"])
def test_variational_encoder_is_the_mean_and_training_samples(block: str) -> None:
    """Same layout as the plain AE but a 2 × latent_channels last encoder conv; encode() is the (deterministic) mean,
    eval forward decodes the mean, train forward decodes mean + exp(logvar / 2)·ε with ε from the global RNG."""
    norm = "group" if block == "resnet" else "batch"
    plain = VoxelAutoencoder(AEConfig(resolution=16, channels=(4, 8), block=block, norm=norm))
    torch.manual_seed(0)
    model = VoxelAutoencoder(AEConfig(resolution=16, channels=(4, 8), block=block, norm=norm, variational=True))
    shapes, plain_shapes = model.state_dict(), plain.state_dict()
    assert list(shapes) == list(plain_shapes)  # same modules, same keys: only the last encoder conv is wider
    wider = [k for k in shapes if shapes[k].shape != plain_shapes[k].shape]
    assert len(wider) == 2 and all(shapes[k].shape[0] == 32 == 2 * plain_shapes[k].shape[0] for k in wider)
    x = (torch.rand(3, 1, 16, 16, 16) > 0.8).float()
    with torch.no_grad():
        model.eval()
        z = model.encode(x)
        mean, logvar = model.encode_distribution(x)
        assert z.shape == mean.shape == logvar.shape == (3, *model.latent_shape) == (3, 16, 4, 4, 4)
        assert torch.equal(z, mean) and torch.equal(model.encode(x), z)
        assert (logvar != 0).any() and not torch.equal(mean, logvar)
        eval_out = model(x)
        assert torch.equal(eval_out, model(x)) and torch.equal(eval_out, model.decode_logits(mean))
        logits, kl = model(x, return_kl=True)
        assert torch.equal(logits, eval_out) and torch.equal(kl, kl_to_standard_normal(mean, logvar)) and kl > 0
        model.train()
        torch.manual_seed(5)
        a = model(x)
        b = model(x)
        assert not torch.allclose(a, b)  # a fresh ε each call
        torch.manual_seed(5)
        mean, logvar = model.encode_distribution(x)
        expected = model.decode_logits(mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
        torch.testing.assert_close(a, expected, rtol=0, atol=1e-6)
        # latent noise still applies, on top of the sample
        torch.manual_seed(5)
        assert not torch.allclose(model(x, latent_noise=0.5), a)
    with pytest.raises(ValueError, match="needs a variational AE"):
        plain.encode_distribution(x)
    out, zero = plain(x, return_kl=True)
    assert zero.item() == 0.0 and out.shape == x.shape


def test_kl_term_by_hand_and_clamped_logvar() -> None:
    """KL = mean over numbers of 0.5·(μ² + σ² − 1 − log σ²); a huge log-variance is clamped (finite KL)."""
    mean = torch.tensor([[0.0, 1.0], [-2.0, 0.5]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [-1.0, 0.0]])
    terms = [0.0, 0.5 * (1 + 4 - 1 - math.log(4.0)), 0.5 * (4 + math.exp(-1) - 1 + 1), 0.5 * 0.25]
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    model = VoxelAutoencoder(TINY_VAE).eval()
    with torch.no_grad():
        model.encoder[-1].bias[16:] = 1e4
        _, logvar = model.encode_distribution(torch.zeros(1, 1, 32, 32, 32))
        _, kl = model(torch.zeros(1, 1, 32, 32, 32), return_kl=True)
    assert (logvar == LOGVAR_RANGE[1]).all() and math.isfinite(kl.item())
    with pytest.raises(ValueError, match="kl_weight needs a variational AE"):
        AETrainConfig(kl_weight=1e-3)


@pytest.fixture(scope="module")
def vae_runs(tiny_voxel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 6-step variational runs from the same seed: kl_weight 0 and 1e-3."""
    root = tmp_path_factory.mktemp("vae_runs")
    for name, w in (("kl0", 0.0), ("kl", 1e-3)):
        train_autoencoder(tiny_cfg(tiny_voxel_dir, root / name, num_steps=6, ckpt_every=100, model=TINY_VAE,
                                   kl_weight=w))
    return {"kl0": root / "kl0", "kl": root / "kl", "data": tiny_voxel_dir}


def test_variational_training_logs_a_kl_the_weight_pulls_down(vae_runs: dict[str, Path]) -> None:
    """Every step logs a finite loss and KL; step 1 (before any update) is the same in both runs, and the KL term
    keeps the later KLs well below the unweighted run's (0.87× of it on the reference machine)."""
    logs = {}
    for name in ("kl0", "kl"):
        rows = [json.loads(line) for line in (vae_runs[name] / "log.jsonl").read_text().splitlines()]
        logs[name] = [row for row in rows if "loss" in row]
        assert [row["step"] for row in logs[name]] == [1, 2, 3, 4, 5, 6]
        assert all(math.isfinite(row["loss"]) and math.isfinite(row["kl"]) and row["kl"] > 0 for row in logs[name])
        assert "kl" in (vae_runs[name] / "log.csv").read_text().splitlines()[0].split(",")
    assert logs["kl"][0]["kl"] == logs["kl0"][0]["kl"]
    assert logs["kl"][0]["loss"] == pytest.approx(logs["kl0"][0]["loss"] + 1e-3 * logs["kl0"][0]["kl"], rel=1e-6)
    later = {name: np.mean([row["kl"] for row in rows[1:]]) for name, rows in logs.items()}
    assert later["kl"] < 0.95 * later["kl0"]


def test_variational_checkpoint_loads_back(vae_runs: dict[str, Path]) -> None:
    """best.pt rebuilds a variational AE from its config alone; its latent stats are of the 16-channel mean."""
    model, ckpt = load_autoencoder(vae_runs["kl"])
    assert ckpt.model_config == to_dict(TINY_VAE) and ckpt.model_config["variational"] is True
    assert ckpt.train_config["kl_weight"] == 1e-3
    assert len(ckpt.meta.latent_mean) == len(ckpt.meta.latent_std) == 16 and all(s > 0 for s in ckpt.meta.latent_std)
    twin = VoxelAutoencoder(TINY_VAE)
    twin.load_state_dict(ckpt.model)
    x = (torch.rand(2, 1, 32, 32, 32) > 0.95).float()
    with torch.no_grad():
        assert torch.equal(model.encode(x), twin.eval().encode(x))
        assert torch.equal(model(x), twin(x))
        assert torch.equal(model.encode(x), model.encode_distribution(x)[0])


# ---- CLI ---------------------------------------------------------------------------------------------------------
