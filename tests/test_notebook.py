"""visualize.ipynb runs top to bottom (offline, on a tiny npy the test writes) and produces its PNGs and mesh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ensure_python3_kernel() -> None:
    """The venv's ipykernel normally ships the "python3" spec; install it into sys.prefix when it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True, capture_output=True)


def test_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    _ensure_python3_kernel()
    grids = np.zeros((3, 16, 16, 16), np.uint8)
    grids[0, 4:12, 2:9, 5:11] = 1
    grids[2, 7, 2:14, 7] = 1  # index 1 stays empty
    npy = tmp_path / "tiny_voxels.npy"
    np.save(npy, grids)
    out = tmp_path / "out"
    monkeypatch.setenv("VOXDIFF_NPY", str(npy))  # the kernel inherits the environment
    monkeypatch.setenv("VOXDIFF_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(ROOT / "visualize.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "tiny_voxels: 3 shapes at 16³" in text and "empty shapes      : 1" in text
    assert f"opened {npy}" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # shown inline
    for name in ("tiny_voxels_grid.png", "tiny_voxels_views.png", "tiny_voxels_sheet.png", "tiny_voxels_00000.ply"):
        assert (out / name).stat().st_size > 0, name
    assert not (ROOT / "runs" / "visualize" / "tiny_voxels_grid.png").exists()  # wrote where it was told
