"""Shared fixtures. Tests run on CPU with tiny data the tests make themselves; the helpers the fixtures use (and that
tests import) are in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Re-exported for test files that still import these names from conftest; new code imports them from helpers.
from helpers import make_ae_ckpt, make_ldm_ckpt, make_voxel_dir

os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread for everything the tests run (here and in subprocesses): the cores are shared, and "auto" thread
# choices then have one candidate, so runs that are compared bit for bit use the same count. Tests of the choice
# itself pass their own core counts.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_voxel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention directory of tiny 32³ toy voxel splits (8 train / 4 val / 4 test per category)."""
    return make_voxel_dir(tmp_path_factory.mktemp("voxels32"))


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (use it to launch the CLIs in subprocesses)."""
    return sys.executable


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: one intra-op thread is faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints: an AE at 32³ and 64³, LDMs with and without label dropout, one with 5 classes."""
    d = tmp_path_factory.mktemp("ckpts")
    return {"ae": make_ae_ckpt(d / "ae.pt"), "ldm": make_ldm_ckpt(d / "ldm.pt"),
            "ldm_nocfg": make_ldm_ckpt(d / "ldm_nocfg.pt", use_cfg=False),
            "ldm_5cls": make_ldm_ckpt(d / "ldm_5cls.pt", num_classes=5),
            "ae64": make_ae_ckpt(d / "ae64.pt", resolution=64)}
