"""Procedural ShapeNet-like shapes: parametric chair, table and airplane families as labelled point clouds.

Each shape is assembled from primitives (boxes and general hexahedra, capped tubes/frustums with round or elliptic
sections, lofted tubes, ellipsoids), every primitive tessellated into triangles that carry a ShapeNet PartSeg part id.
Points are then sampled uniformly by AREA over all triangles (area-weighted choice of triangle, uniform barycentric
point on it), centred on the bounding-box centre and scaled into the unit sphere. Orientation follows ShapeNet: y up,
airplanes fly along the z axis with wings spanning x, chairs face +z with their back at -z.

Randomness: a shape is a pure function of a numpy Generator; `shape_rng(seed, split, category, index)` seeds one from
the 4-tuple, so any subset of a split is reproducible and can be generated in parallel in any order.
"""

from __future__ import annotations

import numpy as np

from voxdiff.config import CATEGORIES, SPLITS

NUM_POINTS = 2048

# Global ShapeNet PartSeg part ids (0..49) of the parts each family produces.
PART_IDS: dict[str, dict[str, int]] = {
    "airplane": {"body": 0, "wing": 1, "tail": 2, "engine": 3},
    "chair": {"back": 12, "seat": 13, "leg": 14, "arm": 15},
    "table": {"top": 47, "leg": 48, "base": 49},
}

# Corner k of a hexahedron is (x, y, z) bits (k & 1, k >> 1 & 1, k >> 2 & 1); its 6 quads split into 12 triangles.
_QUADS = np.array([[0, 2, 6, 4], [1, 3, 7, 5], [0, 1, 5, 4], [2, 3, 7, 6], [0, 1, 3, 2], [4, 5, 7, 6]])
_HEX_TRIS = np.concatenate([_QUADS[:, [0, 1, 2]], _QUADS[:, [0, 2, 3]]])
_SIGNS = np.array([[(k & 1) * 2 - 1, (k >> 1 & 1) * 2 - 1, (k >> 2 & 1) * 2 - 1] for k in range(8)], float)
_EX, _EY, _EZ = np.eye(3)


def shape_rng(seed: int, split: str, category: str, index: int) -> np.random.Generator:
    """The Generator of shape `index` of (`split`, `category`) under `seed`: independent of every other shape."""
    return np.random.default_rng([int(seed), SPLITS.index(split), CATEGORIES.index(category), int(index)])


# ----------------------------------------------------------------------------------------------------------------------
# Primitives -> triangles (F, 3, 3)
# ----------------------------------------------------------------------------------------------------------------------
def rotation(axis: str, angle: float) -> np.ndarray:
    """3x3 right-handed rotation by `angle` radians about the x, y or z axis."""
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def hexa(corners: np.ndarray) -> np.ndarray:
    """Triangles of a hexahedron from its 8 corners (bit order x, y, z); planar faces (e.g. a tapered wing)."""
    return np.asarray(corners, float)[_HEX_TRIS]


def box(center: np.ndarray | list[float], size: np.ndarray | list[float], rot: np.ndarray | None = None) -> np.ndarray:
    """Triangles of a box with full edge lengths `size`, rotated by `rot` about its centre."""
    local = _SIGNS * (np.asarray(size, float) / 2)
    if rot is not None:
        local = local @ rot.T
    return hexa(local + np.asarray(center, float))


def _basis(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors orthogonal to `axis` (u follows x where possible, so elliptic sections are aligned)."""
    a = axis / np.linalg.norm(axis)
    ref = _EX if abs(a[0]) < 0.9 else _EZ
    u = ref - a * (ref @ a)
    u /= np.linalg.norm(u)
    return u, np.cross(a, u)


def loft(
    centers: np.ndarray,
    radii: np.ndarray,
    segments: int = 20,
    aspect: float = 1.0,
    basis: tuple[np.ndarray, np.ndarray] | None = None,
    caps: tuple[bool, bool] = (True, True),
) -> np.ndarray:
    """Triangles of a tube through ring `centers` (K,3) with `radii` (K,); elliptic section r·(cos, aspect·sin).

    1. rings in the plane spanned by `basis` (default: orthogonal to the first-to-last axis);
    2. quads between consecutive rings -> 2 triangles each; 3. optional fan caps at both ends.
    """
    centers = np.asarray(centers, float)
    radii = np.asarray(radii, float)
    u, v = basis if basis is not None else _basis(centers[-1] - centers[0])
    th = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring = np.cos(th)[:, None] * u + aspect * np.sin(th)[:, None] * v  # (S,3)
    rings = centers[:, None, :] + radii[:, None, None] * ring  # (K,S,3)
    a, b = rings[:-1], rings[1:]
    a2, b2 = np.roll(a, -1, axis=1), np.roll(b, -1, axis=1)
    tris = [np.stack([a, b, b2], 2).reshape(-1, 3, 3), np.stack([a, b2, a2], 2).reshape(-1, 3, 3)]
    for end, on in zip((0, -1), caps):
        if on and radii[end] > 0:
            end_ring = rings[end]
            c = np.broadcast_to(centers[end], end_ring.shape)
            tris.append(np.stack([c, end_ring, np.roll(end_ring, -1, axis=0)], 1))
    return np.concatenate(tris)


def tube(p0: list[float] | np.ndarray, p1: list[float] | np.ndarray, r0: float, r1: float | None = None,
         segments: int = 16, aspect: float = 1.0, caps: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """Capped frustum (a cylinder when r1 == r0) from p0 to p1."""
    r1 = r0 if r1 is None else r1
    return loft(np.array([p0, p1], float), np.array([r0, r1]), segments, aspect, caps=caps)


def ellipsoid(center: list[float] | np.ndarray, radii: list[float] | np.ndarray, n_lat: int = 8, n_lon: int = 16,
              rot: np.ndarray | None = None) -> np.ndarray:
    """Triangles of a UV-tessellated ellipsoid (pole triangles are degenerate, zero area, never sampled)."""
    lat = np.linspace(0, np.pi, n_lat + 1)[:, None]
    lon = np.linspace(0, 2 * np.pi, n_lon + 1)[None, :]
    grid = np.stack([np.sin(lat) * np.cos(lon), np.cos(lat) * np.ones_like(lon), np.sin(lat) * np.sin(lon)], -1)
    grid = grid * np.asarray(radii, float)
    if rot is not None:
        grid = grid @ rot.T
    grid = grid + np.asarray(center, float)
    a, b, c, d = grid[:-1, :-1], grid[1:, :-1], grid[1:, 1:], grid[:-1, 1:]
    return np.concatenate([np.stack([a, b, c], 2).reshape(-1, 3, 3), np.stack([a, c, d], 2).reshape(-1, 3, 3)])


class ShapeBuilder:
    """Collects triangles with part ids and samples a labelled point cloud from them."""

    def __init__(self) -> None:
        self.tris: list[np.ndarray] = []
        self.parts: list[np.ndarray] = []

    def add(self, tris: np.ndarray, part: int) -> None:
        self.tris.append(tris)
        self.parts.append(np.full(len(tris), part, np.uint8))

    def sample(self, rng: np.random.Generator, n: int = NUM_POINTS) -> tuple[np.ndarray, np.ndarray]:
        """`n` points uniform by area over all triangles, normalised into the unit sphere; plus their part ids.

        1. triangle areas A_i = |e1 x e2| / 2; choose triangle i with probability A_i / sum A (inverse CDF);
        2. uniform point on it: (u, v) ~ U[0,1]², reflected when u + v > 1, p = a + u e1 + v e2;
        3. centre on the bounding-box centre, divide by the largest norm (all points within the unit sphere).
        """
        tris = np.concatenate(self.tris)
        parts = np.concatenate(self.parts)
        e1, e2 = tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]
        cdf = np.cumsum(0.5 * np.linalg.norm(np.cross(e1, e2), axis=1))
        idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=len(cdf) - 1)
        uv = rng.random((n, 2))
        flip = uv.sum(1) > 1
        uv[flip] = 1 - uv[flip]
        pts = tris[idx, 0] + uv[:, :1] * e1[idx] + uv[:, 1:] * e2[idx]
        pts -= (pts.max(0) + pts.min(0)) / 2
        pts /= np.linalg.norm(pts, axis=1).max() * (1 + 1e-6)
        return pts.astype(np.float32), parts[idx]


# ----------------------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------------------
def _chair(rng: np.random.Generator, sb: ShapeBuilder) -> None:
    """Seat (square/round) + back (tilted, solid/slatted) + legs (4 / swivel star / sled) + optional armrests."""
    P = PART_IDS["chair"]
    u = rng.uniform
    w, d = u(0.40, 0.62), u(0.38, 0.58)
    h, t = u(0.36, 0.52), u(0.025, 0.10)
    round_seat = rng.random() < 0.25
    if round_seat:
        d = w = u(0.40, 0.55)
        sb.add(tube([0, h - t, 0], [0, h, 0], w / 2, segments=28, aspect=d / w), P["seat"])
    else:
        sb.add(box([0, h - t / 2, 0], [w, t, d]), P["seat"])
    _chair_back(rng, sb, w, d, h, round_seat)
    _chair_legs(rng, sb, w, d, h - t, round_seat)
    if rng.random() < 0.35:
        _chair_arms(rng, sb, w, d, h)


def _chair_back(rng: np.random.Generator, sb: ShapeBuilder, w: float, d: float, h: float, round_seat: bool) -> None:
    """The back of a seat `w` wide and `d` deep at height `h`: a solid panel, or two posts with horizontal or vertical
    slats, rotated about the seat's rear edge by a tilt (leaning backwards, towards -z)."""
    P = PART_IDS["chair"]
    u = rng.uniform
    bh, tilt = u(0.28, 0.62), np.radians(u(0, 22))
    bw = w * (u(0.6, 0.9) if round_seat else u(0.8, 1.0))
    bt = u(0.025, 0.07)
    rot = rotation("x", -tilt)
    z0 = -d / 2 + bt / 2 if not round_seat else -d / 2 + bt
    pivot = np.array([0, h, z0])

    def back_box(c: list[float], s: list[float]) -> np.ndarray:
        return box(pivot + rot @ np.asarray(c, float), s, rot)

    style = rng.integers(3)
    if style == 0:  # solid panel
        sb.add(back_box([0, bh / 2, 0], [bw, bh, bt]), P["back"])
    else:  # two posts + horizontal (1) or vertical (2) slats
        pw = u(0.03, 0.06)
        for sx in (-1, 1):
            sb.add(back_box([sx * (bw - pw) / 2, bh / 2, 0], [pw, bh, bt]), P["back"])
        k = int(rng.integers(2, 6))
        if style == 1:
            sh = u(0.03, 0.08)
            for y in np.linspace(bh - sh / 2, bh * u(0.25, 0.55), k):
                sb.add(back_box([0, y, 0], [bw - pw, sh, bt * 0.7]), P["back"])
        else:
            sw = (bw - 2 * pw) / (2 * k + 1)
            rail = u(0.04, 0.09)
            sb.add(back_box([0, bh - rail / 2, 0], [bw - pw, rail, bt]), P["back"])
            for x in np.linspace(-(bw / 2 - pw - sw), bw / 2 - pw - sw, k):
                sb.add(back_box([x, (bh - rail) / 2, 0], [sw, bh - rail, bt * 0.7]), P["back"])


def _chair_legs(rng: np.random.Generator, sb: ShapeBuilder, w: float, d: float, ys: float, round_seat: bool) -> None:
    """What holds up a seat `w` wide and `d` deep whose underside is at height `ys`: four straight legs, a swivel
    column on a 5-star base, or sled runners."""
    P = PART_IDS["chair"]
    u = rng.uniform
    legs = rng.choice(3, p=[0.6, 0.25, 0.15])
    if legs == 0:  # four straight legs, square or round, slightly splayed
        lw, inset, splay = u(0.025, 0.06), u(0.0, 0.06), u(0, 0.05)
        rnd = rng.random() < 0.4
        hx, hz = (w / 2 * 0.7, d / 2 * 0.7) if round_seat else (w / 2 - lw / 2 - inset, d / 2 - lw / 2 - inset)
        for sx in (-1, 1):
            for sz in (-1, 1):
                top = np.array([sx * hx, ys, sz * hz])
                bot = np.array([sx * (hx + splay), 0, sz * (hz + splay)])
                if rnd:
                    sb.add(tube(bot, top, lw / 2, segments=10), P["leg"])
                else:
                    sb.add(_beam(bot, top, lw, lw), P["leg"])
        if rng.random() < 0.4:  # stretchers between the legs
            y = u(0.08, 0.2)
            for sx in (-1, 1):
                sb.add(box([sx * (hx + splay * (1 - y / ys)), y, 0], [lw * 0.7, lw * 0.7, 2 * hz]), P["leg"])
    elif legs == 1:  # swivel: gas column + 5-star base with casters
        cr, hub = u(0.025, 0.045), u(0.07, 0.13)
        sb.add(tube([0, hub, 0], [0, ys, 0], cr, segments=12), P["leg"])
        arm = u(0.24, 0.34)
        phase = rng.uniform(0, 2 * np.pi / 5)
        for k in range(5):
            a = phase + 2 * np.pi * k / 5
            dirv = np.array([np.cos(a), 0, np.sin(a)])
            end = dirv * arm + [0, 0.05, 0]
            sb.add(_beam(np.array([0, hub, 0]), end, 0.04, 0.03), P["leg"])
            sb.add(ellipsoid(end - [0, 0.025, 0], [0.025, 0.025, 0.025], 5, 8), P["leg"])
    else:  # sled runners: two U frames along z
        radius = u(0.012, 0.022)
        hx = w / 2 * u(0.75, 0.95)
        zf, zb = d / 2 * u(0.7, 1.0), -d / 2 * u(0.7, 1.0)
        for sx in (-1, 1):
            pts = [[sx * hx, ys, zf], [sx * hx, radius, zf + u(0, 0.08)], [sx * hx, radius, zb - u(0, 0.08)],
                   [sx * hx, ys, zb]]
            for p0, p1 in zip(pts[:-1], pts[1:]):
                sb.add(tube(p0, p1, radius, segments=10), P["leg"])


def _chair_arms(rng: np.random.Generator, sb: ShapeBuilder, w: float, d: float, h: float) -> None:
    """Two armrests (a bar on a post) over a seat `w` wide and `d` deep at height `h`."""
    P = PART_IDS["chair"]
    u = rng.uniform
    ah, aw, al = u(0.16, 0.26), u(0.04, 0.08), d * u(0.6, 0.95)
    for sx in (-1, 1):
        x = sx * (w / 2 - aw / 2 + u(0, 0.03))
        zc = -d / 2 + al / 2
        sb.add(box([x, h + ah, zc], [aw, 0.03, al]), P["arm"])
        sb.add(box([x, h + ah / 2, zc + al / 2 - 0.03], [0.03, ah, 0.03]), P["arm"])


def _beam(p0: np.ndarray, p1: np.ndarray, wx: float, wy: float) -> np.ndarray:
    """A box of section (wx, wy) from p0 to p1 (any direction)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    a = p1 - p0
    length = np.linalg.norm(a)
    u, v = _basis(a)
    rot = np.stack([u, v, a / length], 1)
    return box((p0 + p1) / 2, [wx, wy, length], rot)


def _table(rng: np.random.Generator, sb: ShapeBuilder) -> None:
    """Top (rect/round/oval) + support (4 legs / pedestal with foot / trestle ends) + optional shelf or stretchers."""
    P = PART_IDS["table"]
    u = rng.uniform
    h = u(0.42, 0.8) if rng.random() < 0.3 else u(0.68, 0.8)
    t = u(0.02, 0.08)
    kind = rng.choice(3, p=[0.55, 0.25, 0.2])
    if kind == 0:
        w, d = u(0.6, 1.9), u(0.5, 1.0)
        sb.add(box([0, h - t / 2, 0], [w, t, d]), P["top"])
    else:
        w = u(0.6, 1.3)
        d = w if kind == 1 else w * u(0.5, 0.8)
        sb.add(tube([0, h - t, 0], [0, h, 0], w / 2, segments=32, aspect=d / w), P["top"])
    ys = h - t
    # Inscribed leg rectangle for round/oval tops.
    hx, hz = (w / 2, d / 2) if kind == 0 else (w / 2 * 0.7, d / 2 * 0.7)
    support = rng.choice(3, p=[0.55, 0.25, 0.2])
    if kind != 0 and support == 2:
        support = 1
    if support == 0:  # four legs
        lw, inset = u(0.03, 0.08), u(0.0, 0.1)
        lx, lz = hx - lw / 2 - inset * (kind == 0), hz - lw / 2 - inset * (kind == 0)
        rnd = rng.random() < 0.4
        taper = u(0.5, 1.0)
        for sx in (-1, 1):
            for sz in (-1, 1):
                if rnd:
                    sb.add(tube([sx * lx, 0, sz * lz], [sx * lx, ys, sz * lz], lw / 2 * taper, lw / 2, 10), P["leg"])
                else:
                    sb.add(box([sx * lx, ys / 2, sz * lz], [lw, ys, lw]), P["leg"])
        extra = rng.choice(3, p=[0.5, 0.25, 0.25])
        if extra == 1:  # lower shelf
            sb.add(box([0, u(0.1, 0.3) * ys / 0.7, 0], [2 * lx, u(0.015, 0.04), 2 * lz]), P["base"])
        elif extra == 2:  # stretchers around the legs
            y, s = u(0.1, 0.35) * ys, lw * 0.6
            sb.add(box([0, y, lz], [2 * lx, s, s]), P["base"])
            sb.add(box([0, y, -lz], [2 * lx, s, s]), P["base"])
            sb.add(box([lx, y, 0], [s, s, 2 * lz]), P["base"])
            sb.add(box([-lx, y, 0], [s, s, 2 * lz]), P["base"])
        if rng.random() < 0.4:  # apron under the top
            ah = u(0.04, 0.12)
            sb.add(box([0, ys - ah / 2, lz], [2 * lx, ah, 0.02]), P["top"])
            sb.add(box([0, ys - ah / 2, -lz], [2 * lx, ah, 0.02]), P["top"])
    elif support == 1:  # central pedestal with a foot (disc or cross)
        cr = u(0.04, 0.12)
        sb.add(tube([0, 0.03, 0], [0, ys, 0], cr * u(0.6, 1.0), cr, 14), P["leg"])
        fr = min(hx, hz) * u(0.5, 0.9) if kind == 0 else w / 2 * u(0.4, 0.7)
        if rng.random() < 0.5:
            sb.add(tube([0, 0, 0], [0, u(0.02, 0.05), 0], fr, fr * u(0.6, 1.0), 24), P["base"])
        else:
            n_feet = int(rng.integers(3, 5))
            for k in range(n_feet):
                a = 2 * np.pi * k / n_feet + np.pi / 4
                sb.add(_beam([0, 0.03, 0], [fr * np.cos(a), 0.01, fr * np.sin(a)], 0.05, 0.04), P["base"])
    else:  # trestle ends: two panels along z with feet, joined by a beam along x
        pt, ex = u(0.04, 0.1), hx - u(0.08, 0.25)
        pd = d * u(0.3, 0.6)
        for sx in (-1, 1):
            sb.add(box([sx * ex, ys / 2, 0], [pt, ys, pd]), P["leg"])
            sb.add(box([sx * ex, 0.03, 0], [pt * 1.5, 0.06, d * u(0.7, 0.95)]), P["base"])
        sb.add(box([0, ys * u(0.3, 0.7), 0], [2 * ex, u(0.04, 0.1), u(0.03, 0.06)]), P["base"])


def _wing(root_le: np.ndarray, span: float, root_chord: float, taper: float, sweep: float, dihedral: float,
          thick: float, side: int, vertical: bool = False) -> np.ndarray:
    """A tapered, swept, dihedral wing panel as a hexahedron: root at `root_le` (leading edge), tip at ±span."""
    tip_chord = root_chord * taper
    dz_tip = -span * np.tan(sweep)
    if vertical:  # fin grows in +y
        tip_off = np.array([0, span, dz_tip])
        t_dir = _EX
    else:
        tip_off = np.array([side * span, span * np.tan(dihedral), dz_tip])
        t_dir = _EY
    c = np.zeros((8, 3))
    for k in range(8):
        tip, te, top = k & 1, k >> 1 & 1, k >> 2 & 1  # x-bit: root/tip, y-bit: LE/TE, z-bit: bottom/top
        chord = tip_chord if tip else root_chord
        th = thick * (taper if tip else 1.0)
        c[k] = root_le + tip * tip_off - te * chord * _EZ + (top - 0.5) * th * t_dir
    return hexa(c)


def _airplane(rng: np.random.Generator, sb: ShapeBuilder) -> None:
    """Tapered fuselage + swept main wings + horizontal and vertical tail + optional 2 or 4 engine nacelles."""
    P = PART_IDS["airplane"]
    u = rng.uniform
    L = 1.0
    rf = u(0.035, 0.075)
    # 1. Fuselage: lofted rings along z (nose at +z), tail cone raised.
    nose, tail = u(0.08, 0.2), u(0.2, 0.35)
    zs = np.array([0.5, 0.5 - nose * 0.15, 0.5 - nose * 0.5, 0.5 - nose, -0.5 + tail, -0.5 + tail * 0.5, -0.5])
    rs = rf * np.array([0.05, 0.55, 0.88, 1.0, 1.0, 0.6, u(0.1, 0.3)])
    up = u(0.2, 0.8) * rf
    ys = np.array([0, 0, 0, 0, 0, up * 0.5, up])
    sb.add(loft(np.stack([np.zeros(7), ys, zs * L], 1), rs, 20, aspect=u(1.0, 1.2), basis=(_EX, _EY)), P["body"])
    # 2. Main wings.
    span = u(0.4, 0.75) * L
    chord = u(0.12, 0.3) * L
    taper = u(0.2, 0.8)
    sweep = np.radians(u(0, 40))
    dihedral = np.radians(u(-4, 9))
    mount = u(-0.7, 0.7) * rf
    zw = u(-0.05, 0.15) * L + chord / 2
    thick = chord * u(0.06, 0.14)
    root = np.array([0, mount, zw])
    for side in (-1, 1):
        sb.add(_wing(root, span, chord, taper, sweep, dihedral, thick, side), P["wing"])
    # 3. Tail: vertical fin on the tail cone, horizontal stabiliser low or on top (T-tail).
    fin_h = u(0.1, 0.22) * L
    fin_c = u(0.1, 0.2) * L
    fin_sweep = np.radians(u(25, 55))
    z_tail = -0.5 * L + fin_c * u(1.0, 1.3)
    sb.add(_wing(np.array([0, up * 0.6, z_tail]), fin_h, fin_c, u(0.35, 0.8), fin_sweep, 0, fin_c * 0.08, 1,
                 vertical=True), P["tail"])
    t_tail = rng.random() < 0.25
    hs_span = u(0.12, 0.25) * L
    hs_c = u(0.06, 0.12) * L
    if t_tail:
        hs_root = np.array([0, up * 0.6 + fin_h, z_tail - fin_h * np.tan(fin_sweep)])
    else:
        hs_root = np.array([0, up * 0.7, -0.5 * L + hs_c * u(1.0, 1.4)])
    for side in (-1, 1):
        sb.add(_wing(hs_root, hs_span, hs_c, u(0.4, 0.8), np.radians(u(10, 40)), np.radians(u(0, 8)), hs_c * 0.08,
                     side), P["tail"])
    # 4. Engines: none, 2 or 4 under the wings, or 2 on the rear fuselage.
    engines = rng.choice(4, p=[0.25, 0.4, 0.2, 0.15])
    er, el = u(0.018, 0.035) * L, u(0.08, 0.16) * L
    prof = np.array([0.9, 1.0, 0.95, 0.7])
    if engines in (1, 2):
        fracs = [u(0.25, 0.4)] if engines == 1 else [u(0.22, 0.32), u(0.5, 0.65)]
        for f in fracs:
            for side in (-1, 1):
                x = side * f * span
                wy = mount + f * span * np.tan(dihedral)
                wz = zw - f * span * np.tan(sweep)
                cy = wy - thick / 2 - er * 1.2
                zc = np.array([wz + el * 0.4, wz + el * 0.25, wz - el * 0.3, wz - el * 0.6])
                sb.add(loft(np.stack([np.full(4, x), np.full(4, cy), zc], 1), er * prof, 14, basis=(_EX, _EY)),
                       P["engine"])
                sb.add(box([x, (cy + wy) / 2, wz - el * 0.1], [er * 0.3, wy - cy, el * 0.5]), P["engine"])
    elif engines == 3:
        for side in (-1, 1):
            x = side * (rf + er * 1.3)
            zc = -0.5 * L + tail + np.array([0, -el * 0.15, -el * 0.7, -el])
            sb.add(loft(np.stack([np.full(4, x), np.full(4, up * 0.3 + rf * 0.3), zc], 1), er * prof, 14,
                        basis=(_EX, _EY)), P["engine"])


_FAMILIES = {"airplane": _airplane, "chair": _chair, "table": _table}


def generate_shape(
    category: str, rng: np.random.Generator, n_points: int = NUM_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """One procedural shape of `category`: points (n_points,3) float32 in the unit ball, part ids (n_points,) uint8."""
    if category not in _FAMILIES:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    sb = ShapeBuilder()
    _FAMILIES[category](rng, sb)
    return sb.sample(rng, n_points)


def generate_split(category: str, n: int, seed: int, split: str, start: int = 0,
                   n_points: int = NUM_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Shapes start..start+n-1 of (`split`, `category`): points (n, P, 3) float32 and part ids (n, P) uint8."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    pts = np.empty((n, n_points, 3), np.float32)
    pids = np.empty((n, n_points), np.uint8)
    for i in range(n):
        pts[i], pids[i] = generate_shape(category, shape_rng(seed, split, category, start + i), n_points)
    return pts, pids
