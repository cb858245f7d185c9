"""Voxel grids as geometry files: occupancy and surface voxels of a grid, marching-cubes meshes (.ply / .obj) and
voxel-centre point clouds (.ply).

A leaf module (numpy; scikit-image imported when a mesh is made): writing meshes needs no plotting library, so
exporting stays quick to import; voxdiff.render (PNG rendering) reuses `occupancy` and `surface_voxels` from here.

Conventions (ShapeNet, as voxelised by voxdiff.data): grid axes (i, j, k) = (x, y, z) with **y up**. A grid of
resolution R spans the unit cube with voxel centres at index / (R - 1), which is the frame of every file written here,
so meshes, point clouds and the data's point clouds overlay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from voxdiff.errors import VoxdiffError
from voxdiff.files import atomic_path, atomic_write_text

# --------------------------------------------------------------------------------------------------------------------
# grid geometry
# --------------------------------------------------------------------------------------------------------------------


def occupancy(grid: Any, threshold: float = 0.5) -> np.ndarray:
    """Boolean (R,R,R) occupancy of one grid (`grid > threshold`; works for bool, uint8 {0,1} and probabilities)."""
    g = np.asarray(grid)
    if g.ndim != 3 or not (g.shape[0] == g.shape[1] == g.shape[2]):
        raise VoxdiffError(f"a voxel grid must be (R,R,R); got shape {g.shape}")
    if g.dtype == np.bool_:
        return g
    return g > threshold


def surface_voxels(occ: np.ndarray) -> np.ndarray:
    """(M,3) int indices of occupied voxels with at least one empty 6-neighbour (the only ones a camera can see)."""
    p = np.pad(occ, 1)
    interior = p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1] & p[1:-1, :-2, 1:-1] & p[1:-1, 2:, 1:-1]
    interior &= p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:]
    return np.argwhere(occ & ~interior)


# --------------------------------------------------------------------------------------------------------------------
# mesh / point export
# --------------------------------------------------------------------------------------------------------------------


def _smoothed_field(occ: np.ndarray, sigma: float) -> np.ndarray:
    """Float field whose 0.5 level set is a smoothed voxel surface, padded by one empty voxel so it closes.

    1. pad by 1 and Gaussian-blur the occupancy with `sigma` (voxels);
    2. clamp: occupied voxels keep ≥ 0.55, empty ones ≤ 0.45, so the blur moves the surface *within* voxels but never
       drops a 1-voxel bar or fills a 1-voxel gap (a plain blur would erase thin legs and fuselages).
    """
    f = np.pad(occ, 1).astype(np.float32)
    if sigma > 0:
        from skimage.filters import gaussian

        inside = f > 0.5
        f = gaussian(f, sigma=sigma, mode="constant", cval=0.0, preserve_range=True).astype(np.float32)
        f = np.where(inside, np.maximum(f, 0.55), np.minimum(f, 0.45))
    return f


def mesh_from_grid(grid: Any, threshold: float = 0.5, smooth: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V,3) float32 in [0,1]³, faces (F,3) int32) of a grid's surface by marching cubes (Lewiner).

    Vertex coordinates are voxel indices / (R-1) in (x, y-up, z), the frame of the voxel centres; the half voxel that
    the surface of a shape touching the grid's border reaches beyond it is clipped back onto [0, 1]. Faces wind so that
    normals point outward. Raises VoxdiffError for an empty grid.
    """
    from skimage.measure import marching_cubes

    occ = occupancy(grid, threshold)
    if not occ.any():
        raise VoxdiffError("empty grid: nothing to mesh")
    res = occ.shape[0]
    field = _smoothed_field(occ, smooth)
    verts, faces, _, _ = marching_cubes(field, level=0.5, allow_degenerate=False)
    verts = np.clip((verts - 1.0) / max(res - 1, 1), 0.0, 1.0).astype(np.float32)
    return verts, faces.astype(np.int32)


def _write_ply(path: Path, verts: np.ndarray, faces: np.ndarray | None, binary: bool) -> None:
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment written by voxdiff"]
    header += [f"element vertex {len(verts)}", "property float x", "property float y", "property float z"]
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            f.write(np.ascontiguousarray(verts, dtype="<f4").tobytes())
            if faces is not None:
                rec = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
                rec["n"], rec["v"] = 3, faces
                f.write(rec.tobytes())
        else:
            np.savetxt(f, verts, fmt="%.6f")
            if faces is not None:
                np.savetxt(f, np.column_stack([np.full(len(faces), 3), faces]), fmt="%d")


def export_mesh(
    grid: Any, path: str | os.PathLike[str], threshold: float = 0.5, smooth: float = 0.7, binary: bool = True
) -> tuple[int, int]:
    """Marching-cubes mesh of one (R,R,R) grid written to `path`: .ply (binary unless binary=False) or .obj (text).

    Coordinates in [0,1]³ (index / (R-1)), y up, so the mesh overlays `export_pointcloud` and the data's point clouds.
    `smooth` is the Gaussian sigma in voxels (0 = blocky, topology is preserved either way). Returns (vertices, faces).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".ply", ".obj"):
        raise VoxdiffError(f"mesh path must end in .ply or .obj; got {p.name!r}")
    verts, faces = mesh_from_grid(grid, threshold, smooth)
    if suffix == ".ply":
        _write_ply(p, verts, faces, binary)
    else:
        lines = ["# written by voxdiff: marching cubes of a voxel grid, coordinates in [0,1], y up"]
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts.tolist()]
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]  # OBJ indices are 1-based
        atomic_write_text(p, "\n".join(lines) + "\n")
    return len(verts), len(faces)


def export_pointcloud(
    grid: Any, path: str | os.PathLike[str], threshold: float = 0.5, surface_only: bool = False, binary: bool = True
) -> int:
    """Write one grid's occupied voxel centres as a .ply point cloud in [0,1]³ (index / (R-1)); returns the count."""
    p = Path(path)
    if p.suffix.lower() != ".ply":
        raise VoxdiffError(f"point cloud path must end in .ply; got {p.name!r}")
    occ = occupancy(grid, threshold)
    idx = surface_voxels(occ) if surface_only else np.argwhere(occ)
    verts = (idx / max(occ.shape[0] - 1, 1)).astype(np.float32)
    _write_ply(p, verts, None, binary)
    return len(verts)
