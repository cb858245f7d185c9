"""voxdiff.render, voxdiff.mesh and visualize.py: PNG grids (size, empty panels, y-up camera), mesh / point export,
CLI errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from voxdiff import mesh, render
from voxdiff.errors import VoxdiffError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# helpers: a PNG's coloured pixels, tiny PLY / OBJ readers
# ---------------------------------------------------------------------------------------------------------------------


def coloured(img: np.ndarray) -> np.ndarray:
    """Mask of saturated pixels: shape colours, not the white background, grey cube edges or grey/black text."""
    rgb = img[..., :3].astype(float)
    return (rgb.max(-1) - rgb.min(-1)) > 0.15


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(vertices, faces or None) of a PLY with float x,y,z vertices and uchar-count int faces, ascii or binary LE."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply"
    fmt = header[1].split()[1]
    counts = {ln.split()[1]: int(ln.split()[2]) for ln in header if ln.startswith("element")}
    nv, nf = counts["vertex"], counts.get("face")
    body = data[end:]
    if fmt == "ascii":
        rows = body.decode("ascii").split("\n")
        verts = np.array([[float(x) for x in row.split()] for row in rows[:nv]])
        faces = None
        if nf is not None:
            f = np.array([[int(x) for x in row.split()] for row in rows[nv : nv + nf]])
            assert (f[:, 0] == 3).all()
            faces = f[:, 1:]
        return verts, faces
    assert fmt == "binary_little_endian"
    verts = np.frombuffer(body[: nv * 12], dtype="<f4").reshape(nv, 3)
    faces = None
    if nf is not None:
        rec = np.frombuffer(body[nv * 12 :], dtype=[("n", "u1"), ("v", "<i4", (3,))])
        assert len(rec) == nf and (rec["n"] == 3).all()
        faces = rec["v"]
    return verts, faces


def read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    v, f = [], []
    for line in path.read_text().splitlines():
        if line.startswith("v "):
            v.append([float(x) for x in line.split()[1:]])
        elif line.startswith("f "):
            f.append([int(x.split("/")[0]) - 1 for x in line.split()[1:]])
    return np.array(v), np.array(f)


def box_grid(res: int = 16, lo: tuple[int, int, int] = (4, 3, 5), hi: tuple[int, int, int] = (11, 13, 9)) -> np.ndarray:
    g = np.zeros((res, res, res), np.uint8)
    g[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
    return g


def assert_closed(faces: np.ndarray) -> None:
    """Every undirected edge is shared by exactly two triangles (a watertight surface)."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    assert (counts == 2).all()


# ---------------------------------------------------------------------------------------------------------------------
# PNG grids
# ---------------------------------------------------------------------------------------------------------------------


def test_render_voxels_size_and_empty_panel(tmp_path: Path) -> None:
    grids = np.stack([box_grid(), np.zeros((16, 16, 16), np.uint8), box_grid(lo=(2, 2, 2), hi=(5, 14, 5))])
    np.save(tmp_path / "g.npy", grids)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")  # memory-mapped input is the intended use
    out = render.render_voxels(mm, tmp_path / "a.png", ["box", "nothing", "bar"],
                              style=render.Style(ncols=2, panel_px=100))
    img = mpimg.imread(out)
    assert img.shape[:2] == (200, 200)  # 2 rows x 2 cols of 100 px
    col = coloured(img)
    panels = [col[:100, :100], col[:100, 100:], col[100:, :100], col[100:, 100:]]
    assert panels[0].sum() > 200 and panels[2].sum() > 50  # shapes are drawn
    assert panels[1].sum() == 0 and panels[3].sum() == 0  # the empty shape and the unused cell hold no colour
    assert not list(tmp_path.glob("*.tmp"))


def test_render_voxels_views_layout_and_probabilities(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((2, 12, 12, 12)).astype(np.float32) * 0.4  # all below the threshold...
    probs[0, 3:9, 3:9, 3:9] = 0.9  # ...except a cube in the first
    out = render.render_voxels(probs, tmp_path / "v.png", style=render.Style(views=render.DEFAULT_VIEWS, panel_px=80))
    img = mpimg.imread(out)
    assert img.shape[:2] == (2 * 80, 3 * 80)  # one row per shape, one column per view
    col = coloured(img)
    assert all(col[:80, 80 * j : 80 * (j + 1)].sum() > 50 for j in range(3))
    assert col[80:].sum() == 0  # second shape is empty at threshold 0.5


@pytest.mark.parametrize("axis, tall", [(1, True), (0, False)])
def test_camera_is_y_up(tmp_path: Path, axis: int, tall: bool) -> None:
    """A bar along the grid's j (y) axis stands upright in a front view; one along i (x) lies flat."""
    g = np.zeros((1, 24, 24, 24), np.uint8)
    sl = [slice(10, 14)] * 3
    sl[axis] = slice(2, 22)
    g[(0, *sl)] = 1
    out = render.render_voxels(g, tmp_path / "bar.png", style=render.Style(views=[(0.0, 0.0)], panel_px=120))
    ys, xs = np.nonzero(coloured(mpimg.imread(out)))
    height, width = np.ptp(ys), np.ptp(xs)
    assert (height > 2 * width) if tall else (width > 2 * height)


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(VoxdiffError, match="N,R,R,R"):
        render.render_voxels(np.zeros((2, 4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="height.*depth.*solid"):
        render.render_voxels(np.zeros((1, 4, 4, 4)), tmp_path / "x.png",
                             style=render.Style(color_by="rainbow"))  # type: ignore[arg-type]
    with pytest.raises(VoxdiffError, match="titles"):
        render.render_voxels(np.zeros((2, 4, 4, 4)), tmp_path / "x.png", titles=["one"])
    with pytest.raises(VoxdiffError, match="empty grid"):
        mesh.export_mesh(np.zeros((4, 4, 4)), tmp_path / "m.ply")
    with pytest.raises(VoxdiffError, match=r"\.ply or \.obj"):
        mesh.export_mesh(box_grid(), tmp_path / "m.stl")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_pointclouds_and_sheet(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(3, 500, 3)) * np.array([0.1, 0.4, 0.1])  # tall thin clouds
    img = mpimg.imread(render.plot_pointclouds(pts, tmp_path / "pc.png", list("abc"), render.Style(panel_px=90)))
    assert img.shape[:2] == (90, 270) and coloured(img).sum() > 100
    sheet = {"data": np.stack([box_grid()] * 5), "samples": np.zeros((2, 8, 8, 8), np.uint8)}
    img = mpimg.imread(render.render_samples_sheet(sheet, tmp_path / "s.png", n_per_row=4, panel_px=100))
    left = int(100 * 0.35)
    assert img.shape[:2] == (200, left + 4 * 100)
    col = coloured(img)
    assert col[:100, left:].sum() > 200 and col[100:, left:].sum() == 0  # second row: empty samples only


def test_sheet_views_per_row(tmp_path: Path) -> None:
    """A mapping of views turns only the rows it names; the others keep DEFAULT_VIEW, as with no mapping."""
    tall = np.zeros((1, 16, 16, 16), np.uint8)
    tall[0, 6:10, 1:15, 6:10] = 1  # a vertical post: from high above it is a small square, from the side a bar
    sets = {"airplane": tall, "chair": tall}

    def rows(view: render.View | dict[str, render.View], name: str) -> list[np.ndarray]:
        img = mpimg.imread(render.render_samples_sheet(sets, tmp_path / name, n_per_row=1, panel_px=100, view=view))
        return [coloured(img[:100]), coloured(img[100:])]

    default = rows(render.DEFAULT_VIEW, "a.png")
    mapped = rows({"airplane": (85.0, -60.0)}, "b.png")
    assert np.array_equal(mapped[1], default[1])  # chair: not named, default view
    assert mapped[0].sum() < 0.6 * default[0].sum()  # airplane row: seen from above, the post is a small square
    assert render.CATEGORY_VIEWS["airplane"][0] > render.DEFAULT_VIEW[0]


def test_render_samples_file_draws_the_first_shapes_beside_the_file(tmp_path: Path) -> None:
    """The sampling job's PNG: the first n shapes of a samples file, `{category}.png` beside it (or at `png`), 200 px
    panels, at most 8 per row; n beyond the file draws what there is."""
    samples = np.stack([box_grid(), np.zeros((16, 16, 16), np.uint8), box_grid(lo=(2, 2, 2), hi=(5, 14, 5))])
    np.save(tmp_path / "chair.npy", samples)
    out = render.render_samples_file(tmp_path / "chair.npy", 2, "chair")
    assert out == tmp_path / "chair.png"
    img = mpimg.imread(out)
    assert img.shape[:2] == (200, 400)
    col = coloured(img)
    assert col[:, :200].sum() > 200 and col[:, 200:].sum() == 0  # the box, then the empty shape
    other = render.render_samples_file(tmp_path / "chair.npy", 20, "chair", tmp_path / "all.png")
    assert other == tmp_path / "all.png" and mpimg.imread(other).shape[:2] == (200, 600)


def test_plot_curves_still_works(tmp_path: Path) -> None:
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(20)] + [{"step": 3, "other": 2.0}]
    render.plot_curves(rows, ["loss", "other", "missing"], tmp_path / "c.png")
    assert mpimg.imread(tmp_path / "c.png").shape[2] in (3, 4)


# ---------------------------------------------------------------------------------------------------------------------
# mesh / point export (voxdiff.mesh)
# ---------------------------------------------------------------------------------------------------------------------


def test_mesh_module_does_not_import_matplotlib() -> None:
    """Writing meshes needs no plotting library: voxdiff.mesh imports without matplotlib (a fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys, voxdiff.mesh; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "False"
    assert render.occupancy is mesh.occupancy and render.surface_voxels is mesh.surface_voxels  # one definition


@pytest.mark.parametrize("suffix, binary", [(".ply", True), (".ply", False), (".obj", True)])
def test_export_box_mesh_parses_back(tmp_path: Path, suffix: str, binary: bool) -> None:
    res, lo, hi = 16, (4, 3, 5), (11, 13, 9)
    path = tmp_path / f"box{suffix}"
    nv, nf = mesh.export_mesh(box_grid(res, lo, hi), path, smooth=0.0, binary=binary)
    verts, faces = read_obj(path) if suffix == ".obj" else read_ply(path)
    assert faces is not None and len(verts) == nv and len(faces) == nf > 0
    assert verts.min() >= 0.0 and verts.max() <= 1.0
    assert faces.min() >= 0 and faces.max() < nv
    # unsmoothed, the surface sits half a voxel outside the occupied voxel centres (index / (R-1))
    np.testing.assert_allclose(verts.min(0), (np.array(lo) - 0.5) / (res - 1), atol=1e-5)
    np.testing.assert_allclose(verts.max(0), (np.array(hi) + 0.5) / (res - 1), atol=1e-5)
    assert_closed(faces)


def test_mesh_smoothing_keeps_thin_parts_and_clips_to_unit_cube() -> None:
    g = np.zeros((20, 20, 20), np.uint8)
    g[10, 2:18, 10] = 1  # a 1-voxel bar: a plain Gaussian blur would drop it below the 0.5 level
    verts, faces = mesh.mesh_from_grid(g, smooth=1.0)
    assert len(faces) > 0 and np.ptp(verts[:, 1]) > 0.7  # the whole bar survives along y
    assert_closed(faces)
    full = np.ones((6, 6, 6), np.uint8)  # touches the border: clipped back onto [0, 1]
    verts, _ = mesh.mesh_from_grid(full, smooth=0.7)
    assert verts.min() == 0.0 and verts.max() == 1.0


def test_export_pointcloud(tmp_path: Path) -> None:
    g = box_grid()
    n = mesh.export_pointcloud(g, tmp_path / "p.ply")
    verts, faces = read_ply(tmp_path / "p.ply")
    assert faces is None and n == len(verts) == int(g.sum())
    np.testing.assert_allclose(np.sort(verts[:, 1]).max(), 13 / 15, atol=1e-6)  # y = j / (R-1)
    ns = mesh.export_pointcloud(g, tmp_path / "s.ply", surface_only=True)
    assert 0 < ns < n


# ---------------------------------------------------------------------------------------------------------------------
# visualize.py
# ---------------------------------------------------------------------------------------------------------------------


def _load_cli():  # visualize.py is a script, not a package module: load it by path
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize", ROOT / "visualize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from voxdiff.errors import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(_load_cli().main, argv)
    return int(e.value.code), capsys.readouterr().err


def test_cli_bad_input_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "rank3.npy", np.zeros((2, 4, 4), np.uint8))
    nan = np.zeros((3, 4, 4, 4), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "ok.npy", np.zeros((3, 4, 4, 4), np.uint8))
    cases = [
        ([str(tmp_path / "missing.npy")], "not found"),
        ([str(tmp_path / "rank3.npy")], "N,R,R,R"),
        ([str(tmp_path / "nan.npy")], "NaN"),
        ([str(tmp_path / "ok.npy"), "--start", "3"], "outside"),
    ]
    for argv, msg in cases:
        code, err = _run_cli(argv, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy", "ok.npy", "rank3.npy"]  # no PNG written


def test_cli_renders_and_exports_meshes(
    tmp_path: Path, tiny_voxel_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tiny_voxel_dir / "chair_voxels_test.npy"
    out, meshes = tmp_path / "chairs.png", tmp_path / "meshes"
    argv = [str(src), "--n", "3", "--start", "1", "--out", str(out), "--panel_px", "64"]
    _load_cli().main([*argv, "--mesh_dir", str(meshes), "--mesh_format", "obj"])  # in-process: no second interpreter
    assert "shapes 1..3" in capsys.readouterr().out
    assert mpimg.imread(out).shape[:2] == (64, 3 * 64)
    objs = sorted(p.name for p in meshes.glob("*.obj"))
    assert objs == ["shape_00001.obj", "shape_00002.obj", "shape_00003.obj"]
    verts, faces = read_obj(meshes / objs[0])
    assert len(faces) > 0 and verts.min() >= 0 and verts.max() <= 1


def test_cli_mesh_names_carry_the_category(
    tmp_path: Path, tiny_voxel_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "samples" / "chair.npy"  # a samples file named after its category, as diffusion/sample.py writes
    src.parent.mkdir()
    src.write_bytes((tiny_voxel_dir / "chair_voxels_test.npy").read_bytes())
    meshes = tmp_path / "meshes"
    argv = [str(src), "--n", "2", "--start", "2", "--panel_px", "48", "--mesh_dir", str(meshes), "--points"]
    _load_cli().main(argv)
    assert "2 ply meshes" in capsys.readouterr().out and (tmp_path / "samples" / "chair.png").is_file()
    names = sorted(p.name for p in meshes.iterdir())
    assert names == ["chair_00002.ply", "chair_00002_points.ply", "chair_00003.ply", "chair_00003_points.ply"]
