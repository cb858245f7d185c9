"""Core plumbing: configs, atomic writes, checkpoints, the memory-mapped dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from voxdiff.checkpoint import (
    AEMeta,
    Checkpoint,
    clean_state_dict,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from voxdiff.config import AEConfig, AETrainConfig, LDMTrainConfig, check_literal, from_dict, to_dict
from voxdiff.data.dataset import VoxelDataset, downsample_max
from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_save_npy, atomic_write_json


def test_config_roundtrip_nested() -> None:
    cfg = LDMTrainConfig(batch_size=7)
    cfg.model.ch_mult = (1, 2)
    back = from_dict(LDMTrainConfig, to_dict(cfg))
    assert back == cfg and isinstance(back.model.ch_mult, tuple)


def test_literal_error_lists_valid_values() -> None:
    with pytest.raises(ValueError, match="bce.*dice"):
        AETrainConfig(loss="mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown category"):
        AETrainConfig(categories=("sofa",))
    check_literal("ddim", __import__("voxdiff.config").config.SamplerName, "sampler")


def test_old_block_name_seed_loads_as_course() -> None:
    """Checkpoints and config.json files written before the starter network was renamed store block "seed"."""
    assert from_dict(AEConfig, {"resolution": 32, "block": "seed"}).block == "course"
    old = to_dict(AETrainConfig())
    old["model"]["block"] = "seed"
    cfg = from_dict(AETrainConfig, old)
    assert cfg.model.block == "course" and cfg == AETrainConfig() and to_dict(cfg)["model"]["block"] == "course"
    with pytest.raises(ValueError, match="course, resnet"):
        AEConfig(block="plain")  # type: ignore[arg-type]


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    class Boom:
        def __array__(self, *a, **k):  # np.save fails while converting
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save_npy(tmp_path / "x.npy", Boom())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(tmp_path / "a.json", {"k": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_checkpoint_roundtrip_strips_prefixes_and_restores_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    rng = get_rng_state()
    a = torch.rand(3)
    meta = AEMeta(threshold=0.3, holdout={"chair": [1, 4]})
    save_checkpoint(tmp_path / "c.pt", Checkpoint(kind="autoencoder", model_config={"a": 1}, model=wrapped, step=5,
                                                  rng=rng, meta=meta, train_config={"lr": 0.1}))
    ck = load_checkpoint(tmp_path / "c.pt", kind="autoencoder")
    assert set(ck.model) == {"weight", "bias"} and ck.step == 5 and ck.model_config == {"a": 1}
    assert ck.meta == meta and ck.train_config == {"lr": 0.1} and ck.format == 2  # typed metadata round trip
    set_rng_state(ck.rng)
    assert torch.equal(torch.rand(3), a)
    assert clean_state_dict({"_orig_mod.module.w": torch.ones(1)}).keys() == {"w"}
    with pytest.raises(VoxdiffError, match="expected 'ldm'"):
        load_checkpoint(tmp_path / "c.pt", kind="ldm")
    # A directory resolves to last.pt when best.pt is absent.
    (tmp_path / "c.pt").rename(tmp_path / "last.pt")
    assert load_checkpoint(tmp_path).kind == "autoencoder"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    torch.save({"format": 2, "model": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(VoxdiffError, match="not a safe voxdiff checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]) + b"garbage")
    with pytest.raises(VoxdiffError):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(VoxdiffError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_downsample_max_matches_loop() -> None:
    rng = np.random.default_rng(0)
    g = (rng.random((2, 8, 8, 8)) > 0.97).astype(np.uint8)
    d = downsample_max(g, 4)
    ref = np.zeros((2, 4, 4, 4), np.uint8)
    for b, i, j, k in zip(*np.nonzero(g)):
        ref[b, i // 2, j // 2, k // 2] = 1
    assert np.array_equal(d, ref)


def test_voxel_dataset(tiny_voxel_dir: Path) -> None:
    ds = VoxelDataset(tiny_voxel_dir, "val", resolution=16)
    assert len(ds) == 12
    x, y = ds[5]
    assert x.shape == (1, 16, 16, 16) and x.dtype == torch.float32 and y == 1
    assert set(np.unique(x.numpy())) <= {0.0, 1.0} and x.sum() > 0
    assert ds.class_indices().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(VoxdiffError, match="not found"):
        VoxelDataset(tiny_voxel_dir / "nope", "val")
    with pytest.raises(VoxdiffError, match="does not divide"):
        VoxelDataset(tiny_voxel_dir, "val", resolution=24)
