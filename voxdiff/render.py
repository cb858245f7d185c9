"""Rendering: loss curves, PNG grids of voxel shapes and point clouds (mesh / point files: voxdiff.mesh).

A leaf module but for voxdiff.mesh's grid helpers (numpy, matplotlib Agg). Shapes are drawn fast and without a 3D
axes: the occupied *surface* voxels of each drawn grid are projected orthographically by our own camera, lit with a
Lambert term from normals estimated on the occupancy, coloured by height, sorted far-to-near and drawn as one 2D
square-marker scatter. Only the shapes drawn are read, so a memory-mapped (1000, 128, 128, 128) samples file is
rendered in about the time of its first few shapes.

Conventions (ShapeNet, as voxelised by voxdiff.data): grid axes (i, j, k) = (x, y, z) with **y up**; the plot's
vertical is the grid's j axis. A grid of resolution R spans the unit cube with voxel centres at index / (R - 1), which
is also the frame of the meshes and point clouds voxdiff.mesh writes, so they overlay.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from voxdiff.config import check_literal  # noqa: E402
from voxdiff.errors import VoxdiffError  # noqa: E402
from voxdiff.files import atomic_path  # noqa: E402
from voxdiff.mesh import occupancy, surface_voxels  # noqa: E402

ColorBy = Literal["height", "depth", "solid"]
View = tuple[float, float]

DEFAULT_VIEW: View = (22.0, -55.0)
"""(elevation, azimuth) in degrees of the default camera: a three-quarter view from above."""
CATEGORY_VIEWS: dict[str, View] = {"airplane": (60.0, -60.0)}
"""Views per category where the default hides the shape (run sheets and the teaser): an airplane's wings are thin and
horizontal, edges from 22° above; from 60° above their planform reads."""
DEFAULT_VIEWS: tuple[View, ...] = ((22.0, -55.0), (22.0, 35.0), (80.0, 0.0))
"""Three views (front three-quarter, side three-quarter, top) used by `--views all` style callers."""

_DPI = 100
_MAX_SIDE_PX = 2**15  # Agg's hard limit is 2**16 pixels per side; stay well under it
_TITLE_FRAC = 0.13  # fraction of a panel's height kept for its title
_LIGHT = np.array([-0.45, 0.65, 0.62])  # camera-space light: from the upper left, in front of the shape
_LIGHT = _LIGHT / np.linalg.norm(_LIGHT)
_FILL = np.array([0.7, 0.1, 0.7]) / np.linalg.norm([0.7, 0.1, 0.7])  # a weaker fill light from the right
# a soft blue -> teal -> sand -> coral ramp: legible on white, distinct from the grey "empty" text
_CMAP = LinearSegmentedColormap.from_list("voxdiff", ["#3d6fa8", "#36a59c", "#e8c95f", "#e07a4f"])


# --------------------------------------------------------------------------------------------------------------------
# loss curves (used by training)
# --------------------------------------------------------------------------------------------------------------------


def plot_curves(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Plot each key in `keys` against `step` from logged rows (rows lacking a key are skipped); log-y when positive."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    any_positive = True
    for key in keys:
        pts = [(row["step"], row[key]) for row in rows if key in row and "step" in row and row[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, lw=1)
            any_positive &= min(ys) > 0
    if any_positive and ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------------------------------


def _normals(occ: np.ndarray, idx: np.ndarray, radius: int = 2) -> np.ndarray:
    """Unit outward normals at voxel indices `idx`: minus the occupancy-weighted mean offset in a (2·radius+1)³ window.

    Zero where no surface orientation is defined: a symmetric window (a thin bar) or fewer than 3 occupied 26-neighbours
    (isolated voxels, as in the sparse grids voxelised from 2,048-point clouds); those are shaded by depth instead.
    """
    p = np.pad(occ, radius).astype(np.uint8).ravel()
    size = occ.shape[0] + 2 * radius
    rng = np.arange(-radius, radius + 1)
    off = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
    off = off[np.abs(off).sum(1) > 0]
    lin = (off[:, 0] * size + off[:, 1]) * size + off[:, 2]  # offsets in the flattened padded grid
    base = ((idx[:, 0] + radius) * size + idx[:, 1] + radius) * size + idx[:, 2] + radius
    hits = p[base[None, :] + lin[:, None]].astype(np.float32)  # (124, M) occupancy of each window cell
    wo = (off / np.linalg.norm(off, axis=1, keepdims=True) ** 2).astype(np.float32)  # unit direction / distance
    n = -(wo.T @ hits).T  # (M, 3)
    support = hits[np.abs(off).max(1) == 1].sum(0)  # occupied 26-neighbours
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    ok = (norm > 0.3) & (support[:, None] >= 3)
    return np.where(ok, n / np.maximum(norm, 1e-9), 0.0)


def _rotation(view: View) -> np.ndarray:
    """3x3 matrix taking world (x, y-up, z) to camera (u right, v up, w toward the viewer).

    1. rotate about the vertical y axis by the azimuth a;  2. tilt about the camera's u axis by the elevation e, so that
    e > 0 looks down on the shape (its top faces the viewer).  Rows: u = Ry x̂, v = (0, cos e, -sin e)·, w = (0, sin e,
    cos e)· in the rotated frame; u × v = w (right-handed).
    """
    e, a = np.deg2rad(view[0]), np.deg2rad(view[1])
    ry = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(e), -np.sin(e)], [0.0, np.sin(e), np.cos(e)]])
    return rx @ ry


_CUBE = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def _parse_views(views: Sequence[View] | None) -> list[View]:
    try:
        return [DEFAULT_VIEW] if not views else [(float(e), float(a)) for e, a in views]
    except (TypeError, ValueError):
        raise VoxdiffError(f"views must be (elevation, azimuth) pairs in degrees; got {views!r}") from None


def _check_points_kw(max_points: int, color_by: str) -> None:
    check_literal(color_by, ColorBy, "color_by")
    if max_points < 1:
        raise VoxdiffError(f"max_points must be >= 1; got {max_points}")


# --------------------------------------------------------------------------------------------------------------------
# one panel
# --------------------------------------------------------------------------------------------------------------------


def _draw_cloud(
    ax: plt.Axes,
    xyz: np.ndarray,
    normals: np.ndarray | None,
    view: View,
    panel_px: int,
    spacing: float,
    point_size: float | None,
    color_by: str,
) -> None:
    """Draw centred points `xyz` (in the cube [-0.5, 0.5]³) on a 2D axes, as seen from `view`.

    1. project: camera coordinates c = R x (orthographic), axis limits from the projected unit cube, so every shape
       drawn from one view shares one camera and scale;
    2. shade: base colour from the colour map (height y, or depth w), times a key + fill Lambert term
       0.42 + 0.48·max(0, n·l_key) + 0.22·max(0, n·l_fill) where a normal is defined, else a depth cue;
    3. painter's order: sort by w ascending (far first) and draw as one square-marker scatter sized to the projected
       point spacing, so the surface closes without holes.
    """
    rot = _rotation(view)
    cube = _CUBE @ rot.T
    lo, hi = cube[:, :2].min(0), cube[:, :2].max(0)
    half = 0.5 * float((hi - lo).max()) * 1.04
    mid = 0.5 * (lo + hi)
    ax.set_xlim(mid[0] - half, mid[0] + half)
    ax.set_ylim(mid[1] - half, mid[1] + half)
    ax.set_aspect("equal")
    ax.set_axis_off()
    for a, b in _EDGES:  # faint bounding cube for orientation: which way is up, where the grid ends
        ax.plot(*cube[[a, b], :2].T, color="#c9ced6", lw=0.6, zorder=0)
    if len(xyz) == 0:
        return
    c = xyz @ rot.T  # 1. (u, v, w)
    wr = (c[:, 2] - cube[:, 2].min()) / max(np.ptp(cube[:, 2]), 1e-9)  # depth in [0,1], 1 = nearest
    if color_by == "height":  # 2. base colour
        base = _CMAP(np.clip(xyz[:, 1] + 0.5, 0.0, 1.0))[:, :3]
    elif color_by == "depth":
        base = _CMAP(np.clip(wr, 0.0, 1.0))[:, :3]
    else:
        base = np.broadcast_to(np.array([0.42, 0.56, 0.72]), (len(xyz), 3))
    if normals is not None:
        ncam = normals @ rot.T
        shade = 0.42 + 0.48 * np.clip(ncam @ _LIGHT, 0.0, 1.0) + 0.22 * np.clip(ncam @ _FILL, 0.0, 1.0)
        flat = np.linalg.norm(normals, axis=1) < 0.5  # thin bars / isolated voxels: no defined normal
        shade[flat] = 0.6 + 0.4 * wr[flat]
        sparse = flat.mean() > 0.5  # mostly isolated voxels: draw them a little larger so the shape reads
    else:
        shade = 0.55 + 0.45 * wr
        sparse = False
    rgb = np.clip(base * shade[:, None], 0.0, 1.0)
    order = np.argsort(c[:, 2], kind="stable")  # 3. far to near
    if point_size is None:
        # spacing (in cube units) -> pixels -> points²; ×1.5 covers the diagonal of a rotated voxel
        px = spacing / (2 * half) * panel_px * (1 - _TITLE_FRAC) * 1.5
        point_size = (max(px, 2.6 if sparse else 1.8) * 72.0 / _DPI) ** 2  # >= ~2 px: 1-voxel bars stay visible
    ax.scatter(c[order, 0], c[order, 1], s=point_size, c=rgb[order], marker="s", linewidths=0, zorder=1)


def _voxel_points(
    grid: Any, threshold: float, max_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(centred xyz, normals, point spacing, occupied count) of a grid's surface voxels, subsampled to `max_points`."""
    occ = occupancy(grid, threshold)
    res = occ.shape[0]
    n_occ = int(occ.sum())
    idx = surface_voxels(occ) if n_occ else np.zeros((0, 3), np.int64)
    spacing = 1.0 / max(res - 1, 1)
    if len(idx) > max_points:  # a surface is 2D: keeping a fraction f widens the spacing by 1/sqrt(f)
        keep = rng.choice(len(idx), max_points, replace=False)
        spacing /= np.sqrt(max_points / len(idx))
        idx = idx[np.sort(keep)]
    nrm = _normals(occ, idx) if len(idx) else np.zeros((0, 3))
    xyz = idx / max(res - 1, 1) - 0.5
    return xyz, nrm, spacing, n_occ


def _pct(x: float) -> str:
    """Occupancy as a percentage with two significant digits (0.042%, 1.3%, 12%)."""
    return f"{100 * x:.2g}%" if x > 0 else "0%"


def _empty_label(ax: plt.Axes) -> None:
    ax.text(0.5, 0.5, "empty", transform=ax.transAxes, ha="center", va="center", color="#8a8f98", fontsize=12)


# --------------------------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------------------------


def _figure(nrows: int, ncols: int, panel_px: int, left_px: int = 0) -> tuple[plt.Figure, int, int]:
    w, h = left_px + ncols * panel_px, nrows * panel_px
    if max(w, h) > _MAX_SIDE_PX:
        raise VoxdiffError(f"figure of {w}x{h} px is too large; draw fewer shapes or a smaller panel_px")
    fig = plt.figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI, facecolor="white")
    return fig, w, h


def _panel(fig: plt.Figure, row: int, col: int, w: int, h: int, panel_px: int, left_px: int = 0) -> plt.Axes:
    """Axes filling cell (row, col) exactly, minus a title strip on top (so the PNG size is exact and predictable)."""
    x0 = (left_px + col * panel_px) / w
    y0 = 1.0 - (row + 1) * panel_px / h
    return fig.add_axes((x0, y0, panel_px / w, panel_px * (1 - _TITLE_FRAC) / h))


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    finally:
        plt.close(fig)


def _title(ax: plt.Axes, text: str, fontsize: float) -> None:
    ax.set_title(text, fontsize=fontsize, pad=3, color="#222222")


def _check_grids(grids: Any) -> int:
    shape = getattr(grids, "shape", None)
    if shape is not None and len(shape) != 4:
        raise VoxdiffError(f"grids must be (N,R,R,R); got shape {tuple(shape)}")
    n = len(grids)
    if n == 0:
        raise VoxdiffError("no shapes to draw")
    return n


@dataclass(frozen=True)
class Style:
    """How a sheet of shapes is drawn: columns, camera views, point budget, marker size, colouring, panel size, seed.

    views: (elevation, azimuth) pairs in degrees; one view gives a grid of shapes (`ncols` per row, default
    min(n, 8)), several give one row per shape and one column per view. max_points caps the points drawn per panel
    (a seeded subsample with larger markers). Every panel is `panel_px` pixels square.
    """

    ncols: int | None = None
    views: Sequence[View] | None = None
    max_points: int = 16_000
    point_size: float | None = None
    color_by: ColorBy = "height"
    panel_px: int = 240
    seed: int = 0


def _sheet(n: int, titles: Sequence[str] | None, style: Style, path: str | os.PathLike[str],
           points: Any) -> Path:
    """Lay out n panels per `style` and draw points(i, rng) -> (xyz, normals or None, spacing, empty) in each."""
    _check_points_kw(style.max_points, style.color_by)
    vs = _parse_views(style.views)
    if titles is not None and len(titles) != n:
        raise VoxdiffError(f"got {len(titles)} titles for {n} shapes")
    names = [str(t) for t in titles] if titles is not None else [str(i) for i in range(n)]
    if len(vs) == 1:
        ncols = max(1, min(style.ncols or min(n, 8), n))
        nrows = -(-n // ncols)
        cells = [(i // ncols, i % ncols, i, 0) for i in range(n)]
    else:  # shapes × views
        ncols, nrows = len(vs), n
        cells = [(i, j, i, j) for i in range(n) for j in range(len(vs))]
    fig, w, h = _figure(nrows, ncols, style.panel_px)
    fs = max(7.0, style.panel_px / 24)
    rng = np.random.default_rng(style.seed)
    cache: tuple[int, Any] | None = None
    for row, col, i, j in cells:
        if cache is None or cache[0] != i:  # read each shape once, even across views
            cache = (i, points(i, rng))
        xyz, nrm, spacing, empty = cache[1]
        ax = _panel(fig, row, col, w, h, style.panel_px)
        _draw_cloud(ax, xyz, nrm, vs[j], style.panel_px, spacing, style.point_size, style.color_by)
        if empty:
            _empty_label(ax)
        label = names[i] if (len(vs) == 1 or j == 0) else ""
        if len(vs) > 1 and row == 0:
            label = f"{label}  (elev {vs[j][0]:g}°, azim {vs[j][1]:g}°)".strip()
        _title(ax, label, fs)
    _save(fig, path)
    return Path(path)


def render_voxels(grids: Any, path: str | os.PathLike[str], titles: Sequence[str] | None = None,
                  threshold: float = 0.5, style: Style = Style()) -> Path:
    """Write a PNG of voxel shapes: a grid of shapes (one view) or one row per shape × one column per view.

    grids: (N,R,R,R) array-like — an np.memmap is fine, only `grids[i]` of each drawn shape is read. Occupancy is
    `grid > threshold`. titles: one per shape (default: its index). Empty shapes get a panel labelled "empty". The
    image is exactly (ncols·panel_px) × (nrows·panel_px) pixels. Returns the path.
    """
    n = _check_grids(grids)

    def points(i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, bool]:
        xyz, nrm, spacing, n_occ = _voxel_points(grids[i], threshold, style.max_points, rng)
        return xyz, nrm, spacing, n_occ == 0

    return _sheet(n, titles, style, path, points)


def render_samples_file(path: str | os.PathLike[str], n: int, category: str,
                        png: str | os.PathLike[str] | None = None) -> Path:
    """`{category}.png` beside a samples file (or at `png`): its first n shapes exactly as saved (what eval.py
    scores), each titled with its index and occupancy. Only those n shapes are read from the (memory-mapped) file.
    Used by the sampling job (voxdiff.sampling.writer), which imports this module only when it renders."""
    path = Path(path)
    samples = np.load(path, mmap_mode="r")
    k = min(n, len(samples))
    occupancy = np.asarray(samples[:k]).reshape(k, -1).mean(1)
    titles = [f"{category} #{i}  {100 * o:.2g}%" for i, o in enumerate(occupancy)]
    return render_voxels(samples[:k], png or path.with_suffix(".png"), titles,
                         style=Style(ncols=min(k, 8), panel_px=200))


def plot_pointclouds(points: Any, path: str | os.PathLike[str], titles: Sequence[str] | None = None,
                     style: Style = Style()) -> Path:
    """Write a PNG grid of raw point clouds (N,P,3) in (x, y-up, z), drawn with the same camera and look as voxels.

    All clouds share one isotropic normalisation (the joint bounding box mapped into the unit cube), so relative sizes
    are kept; points have no normals, so shading is by depth. Layout and sizing as in `render_voxels`.
    """
    pts = [np.asarray(p, dtype=np.float64) for p in points]
    if not pts:
        raise VoxdiffError("no point clouds to draw")
    for k, p in enumerate(pts):
        if p.ndim != 2 or p.shape[1] != 3:
            raise VoxdiffError(f"point cloud {k} must be (P,3); got shape {p.shape}")
        if not np.isfinite(p).all():
            raise VoxdiffError(f"point cloud {k} holds NaN or inf")
    nonempty = [p for p in pts if len(p)]
    if nonempty:
        allp = np.concatenate(nonempty)
        lo, hi = allp.min(0), allp.max(0)
        centre, scale = 0.5 * (lo + hi), max(float((hi - lo).max()), 1e-9)
    else:
        centre, scale = np.zeros(3), 1.0

    def cloud(i: int, rng: np.random.Generator) -> tuple[np.ndarray, None, float, bool]:
        p = pts[i]
        if len(p) > style.max_points:
            p = p[np.sort(rng.choice(len(p), style.max_points, replace=False))]
        spacing = 1.0 / max(np.sqrt(len(p)), 1.0) * 0.9  # typical spacing of P points on a unit-ish surface
        return (p - centre) / scale, None, spacing, len(p) == 0

    return _sheet(len(pts), titles, style, path, cloud)


def render_samples_sheet(
    arrays: Mapping[str, Any],
    path: str | os.PathLike[str],
    n_per_row: int = 8,
    view: View | Mapping[str, View] = DEFAULT_VIEW,
    max_points: int = 15_000,
    color_by: ColorBy = "height",
    threshold: float = 0.5,
    panel_px: int = 200,
    seed: int = 0,
) -> Path:
    """Write a PNG with one row per named set (e.g. "chair data", "chair samples"), the first `n_per_row` shapes each.

    arrays: name -> (N,R,R,R) array-like (memmaps fine; sets may differ in N and R). The row's name is written in a left
    margin; each panel is titled with the shape's index and occupancy. Empty shapes are labelled "empty".
    view: (elevation, azimuth) in degrees for every row, or a mapping from row name to view (rows it does not name:
    DEFAULT_VIEW).
    """
    _check_points_kw(max_points, color_by)
    if not arrays:
        raise VoxdiffError("no arrays to draw")
    if n_per_row < 1:
        raise VoxdiffError(f"n_per_row must be >= 1; got {n_per_row}")
    for name, arr in arrays.items():
        try:
            _check_grids(arr)
        except VoxdiffError as e:
            raise VoxdiffError(f"{name}: {e}") from None
    ncols = min(n_per_row, max(len(a) for a in arrays.values()))
    left_px = int(panel_px * 0.35)
    fig, w, h = _figure(len(arrays), ncols, panel_px, left_px)
    fs = max(7.0, panel_px / 26)
    rng = np.random.default_rng(seed)
    for row, (name, arr) in enumerate(arrays.items()):
        row_view = view.get(name, DEFAULT_VIEW) if isinstance(view, Mapping) else view
        y = 1.0 - (row + 0.5) * panel_px / h
        fig.text(left_px / 2 / w, y, name, rotation=90, ha="center", va="center", fontsize=fs * 1.25, weight="bold")
        for col in range(min(ncols, len(arr))):
            xyz, nrm, spacing, n_occ = _voxel_points(arr[col], threshold, max_points, rng)
            ax = _panel(fig, row, col, w, h, panel_px, left_px)
            _draw_cloud(ax, xyz, nrm, row_view, panel_px, spacing, None, color_by)
            if n_occ == 0:
                _empty_label(ax)
            res = np.asarray(arr[col]).shape[-1]
            _title(ax, f"{col}  ·  {_pct(n_occ / res**3)}", fs)
    _save(fig, path)
    return Path(path)
