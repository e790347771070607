"""The synthetic indoor world: procedural rooms rendered by vectorised ray casting.

A room is an axis-aligned box seen from inside (floor, four walls, ceiling) holding solid boxes
(furniture, tables with planar tops and legs, pictures on the walls, pillars). Every face carries
a procedural texture defined in that face's own world coordinates (metres), and shading is
Lambertian under point lights fixed in the room, so a surface point has the same colour in every
view: brightness constancy holds exactly up to anti-aliasing and JPEG. There are no shadows and
no specularities (both would break constancy).

Frames (world: x right, y up, z towards the viewer; camera: OpenCV x right, y down, z forward):

- ``depth``: z-depth in metres of the ray through the pixel centre, exact;
- ``rgb``: colours averaged over ``supersample**2`` sub-pixel rays (anti-aliasing);
- ``K``: pinhole intrinsics, NYUv2 Kinect RGB values scaled to the image size, 0-based pixel
  centres (pixel ``(u, v)`` is the point ``(u, v)`` of the image plane);
- ``pose``: camera-to-world 4x4 (``X_world = R X_cam + t``);
- ``labels`` / ``instances``: class id (index in :data:`CLASS_NAMES` + 1) and instance id;
- ``planes``: per class (floor, wall, table) the label map (k = k-th visible plane, 1-based) and
  the plane parameters in camera coordinates (unit normal ``n`` and offset ``d`` with
  ``n . X = d``);
- ``edges``: occluding depth edges (1 on the nearer side of a depth discontinuity).

Everything is deterministic for a seed: each scene draws from its own
``numpy.random.SeedSequence((seed, style, kind, index))``, so results do not depend on the
number of worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "floor",
    "wall",
    "ceiling",
    "table",
    "cabinet",
    "bed",
    "sofa",
    "shelf",
    "picture",
    "desk",
    "counter",
    "pillar",
    "chair",
)
CLASS_ID = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}
PLANE_CLASSES: tuple[str, ...] = ("wall", "table", "floor")

# NYUv2 Kinect RGB intrinsics at 640 x 480 (NYU toolbox), scaled to other sizes.
NYU_FX, NYU_FY, NYU_CX, NYU_CY = 518.857901, 519.469611, 325.582449, 253.736166

STYLES: tuple[str, ...] = ("nyu", "ibims", "aux")
SCENE_TYPES: dict[str, tuple[str, ...]] = {
    "nyu": (
        "bedroom",
        "kitchen",
        "living_room",
        "bathroom",
        "dining_room",
        "office",
        "study",
        "classroom",
    ),
    "ibims": (
        "livingroom",
        "office",
        "corridor",
        "kitchen",
        "restroom",
        "storageroom",
        "classroom",
    ),
    "aux": ("bedroom", "kitchen", "living_room", "office", "dining_room"),
}

# Texture families: nyu and aux share none with ibims, so ibims is out of distribution.
_TEXTURES = {
    "plain": 0,
    "noise": 1,
    "wood": 2,
    "tiles": 3,
    "fabric": 4,
    "brick": 5,
    "dots": 6,
    "stripes": 7,
    "marble": 8,
    "checker": 9,
}
_STYLE_TEXTURES = {
    "nyu": {
        "floor": ("wood", "tiles"),
        "wall": ("noise", "plain", "fabric"),
        "furniture": ("wood", "fabric", "noise"),
    },
    "ibims": {
        "floor": ("marble", "checker"),
        "wall": ("brick", "stripes", "plain"),
        "furniture": ("dots", "stripes", "marble"),
    },
    "aux": {
        "floor": ("tiles", "checker"),
        "wall": ("fabric", "noise"),
        "furniture": ("checker", "wood", "noise"),
    },
}
# Palettes as HSV ranges (hue, saturation, value); ibims is cool and saturated, nyu warm and muted.
_PALETTES = {
    "nyu": ((0.02, 0.16), (0.10, 0.45), (0.35, 0.95)),
    "ibims": ((0.50, 0.78), (0.25, 0.70), (0.30, 0.90)),
    "aux": ((0.20, 0.45), (0.15, 0.55), (0.35, 0.90)),
}


def nyu_intrinsics(width: int, height: int) -> np.ndarray:
    """NYUv2 RGB intrinsics scaled to ``width x height`` (0-based pixel centres), float64 (3, 3)."""
    sx, sy = width / 640.0, height / 480.0
    return np.array(
        [[NYU_FX * sx, 0.0, NYU_CX * sx], [0.0, NYU_FY * sy, NYU_CY * sy], [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def scene_rng(seed: int, style: str, kind: str, index: int) -> np.random.Generator:
    """The random stream of one scene, independent of every other scene and of worker count."""
    kinds = ("video", "labeled", "lsun", "ibims", "aux")
    ss = np.random.SeedSequence([int(seed), STYLES.index(style), kinds.index(kind), int(index)])
    return np.random.default_rng(ss)


# ----------------------------------------------------------------------------- procedural texture


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Integer lattice hash -> [0, 1]; int64 arithmetic wraps on purpose."""
    h = (ix * np.int64(73856093)) ^ (iy * np.int64(19349663)) ^ (seed * np.int64(83492791))
    h = (h ^ (h >> np.int64(13))) * np.int64(1274126177)
    h = h ^ (h >> np.int64(16))
    return (h & np.int64(0xFFFFFF)).astype(np.float32) / np.float32(0xFFFFFF)


def value_noise(u: np.ndarray, v: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] on the unit lattice (C1 smoothstep interpolation)."""
    fu, fv = np.floor(u), np.floor(v)
    iu, iv = fu.astype(np.int64), fv.astype(np.int64)
    tu, tv = u - fu, v - fv
    su, sv = tu * tu * (3 - 2 * tu), tv * tv * (3 - 2 * tv)
    a = _hash01(iu, iv, seed)
    b = _hash01(iu + 1, iv, seed)
    c = _hash01(iu, iv + 1, seed)
    d = _hash01(iu + 1, iv + 1, seed)
    return (a + (b - a) * su) * (1 - sv) + (c + (d - c) * su) * sv


def fbm(u: np.ndarray, v: np.ndarray, seed: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value noise, normalised to [0, 1]."""
    total = np.zeros_like(u)
    amp, norm, freq = 1.0, 0.0, 1.0
    for o in range(octaves):
        total += amp * value_noise(u * freq, v * freq, seed + 101 * o)
        norm += amp
        amp *= 0.5
        freq *= 2.0
    return total / norm


def _texture(kind: int, u: np.ndarray, v: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Pattern value in [0, 1] of texture family ``kind`` at surface coordinates (already scaled)."""
    two_pi = np.float32(2 * np.pi)
    if kind == _TEXTURES["plain"]:
        return 0.5 + 0.3 * (fbm(u * 0.5, v * 0.5, seed, 2) - 0.5)
    if kind == _TEXTURES["noise"]:
        return fbm(u, v, seed, 4)
    if kind == _TEXTURES["wood"]:
        warp = fbm(u * 0.3, v * 3.0, seed, 2)
        return 0.5 + 0.5 * np.sin(two_pi * (u * 1.5 + 2.0 * warp))
    if kind == _TEXTURES["tiles"]:
        cu, cv = np.floor(u), np.floor(v)
        tint = _hash01(cu.astype(np.int64), cv.astype(np.int64), seed)
        fu, fv = u - cu, v - cv
        grout = (np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) < 0.05).astype(
            np.float32
        )
        return (0.25 + 0.6 * tint) * (1 - grout) + 0.05 * grout
    if kind == _TEXTURES["fabric"]:
        weave = 0.5 + 0.25 * np.sin(two_pi * u * 4) * np.sin(two_pi * v * 4)
        return np.clip(weave + 0.4 * (fbm(u, v, seed, 3) - 0.5), 0, 1)
    if kind == _TEXTURES["brick"]:
        row = np.floor(v * 3.0)
        uu = u * 1.5 + 0.5 * (row % 2)
        col = np.floor(uu)
        tint = _hash01(col.astype(np.int64), row.astype(np.int64), seed)
        fu, fv = uu - col, v * 3.0 - row
        mortar = ((fu < 0.06) | (fv < 0.1)).astype(np.float32)
        return (0.3 + 0.55 * tint) * (1 - mortar) + 0.9 * mortar
    if kind == _TEXTURES["dots"]:
        fu, fv = u * 2 - np.floor(u * 2) - 0.5, v * 2 - np.floor(v * 2) - 0.5
        r = np.sqrt(fu * fu + fv * fv)
        return np.clip((0.3 - r) * 12 + 0.5, 0, 1) * 0.8 + 0.2 * fbm(u, v, seed, 2)
    if kind == _TEXTURES["stripes"]:
        return 0.5 + 0.45 * np.sin(two_pi * (u + v) * 1.2 + 3 * fbm(u * 0.5, v * 0.5, seed, 2))
    if kind == _TEXTURES["marble"]:
        return 0.5 + 0.5 * np.sin(two_pi * (u * 0.7 + 2.5 * fbm(u, v, seed, 4)))
    if kind == _TEXTURES["checker"]:
        c = (np.floor(u * 2) + np.floor(v * 2)) % 2
        return 0.2 + 0.6 * c + 0.2 * fbm(u * 2, v * 2, seed, 2)
    raise ValueError(f"unknown texture family {kind}")


# ----------------------------------------------------------------------------- the scene model


@dataclass
class Material:
    """A procedural surface: texture family, two colours (linear RGB), scale (cycles per metre)."""

    kind: int
    color0: np.ndarray
    color1: np.ndarray
    scale: float
    seed: int
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass
class Box:
    """An axis-aligned box; ``interior`` marks the room (seen from inside)."""

    lo: np.ndarray
    hi: np.ndarray
    label: int
    materials: list[int]  # one material index per face: -x, +x, -y, +y, -z, +z
    instances: list[int]  # instance id per face
    planes: list[int]  # global plane index per face, -1 where the face is no labelled plane
    interior: bool = False


@dataclass
class Plane:
    """A labelled plane of the scene in world coordinates: ``n . X = d``."""

    cls: str
    normal: np.ndarray
    offset: float


@dataclass
class Scene:
    """A room with its contents, lights and materials."""

    style: str
    scene_type: str
    size: np.ndarray  # (Lx, height, Lz) metres
    boxes: list[Box]
    materials: list[Material]
    planes: list[Plane]
    lights: np.ndarray  # (L, 3) positions
    light_power: np.ndarray  # (L,)
    ambient: float
    # Packed lookup tables (filled by pack()).
    tables: dict[str, np.ndarray] = field(default_factory=dict)

    def pack(self) -> Scene:
        """Turn the object lists into arrays for vectorised casting."""
        P = len(self.boxes)
        t = self.tables
        t["lo"] = np.array([b.lo for b in self.boxes], np.float32)
        t["hi"] = np.array([b.hi for b in self.boxes], np.float32)
        t["interior"] = np.array([b.interior for b in self.boxes])
        t["material"] = np.array([b.materials for b in self.boxes], np.int64).reshape(P, 6)
        t["label"] = np.array([[b.label] * 6 for b in self.boxes], np.int64)
        t["instance"] = np.array([b.instances for b in self.boxes], np.int64).reshape(P, 6)
        t["plane"] = np.array([b.planes for b in self.boxes], np.int64).reshape(P, 6)
        # Room faces carry their own classes: floor, ceiling, walls.
        room = int(np.flatnonzero(t["interior"])[0])
        t["label"][room] = [
            CLASS_ID["wall"],
            CLASS_ID["wall"],
            CLASS_ID["floor"],
            CLASS_ID["ceiling"],
            CLASS_ID["wall"],
            CLASS_ID["wall"],
        ]
        mats = self.materials
        t["m_kind"] = np.array([m.kind for m in mats], np.int64)
        t["m_c0"] = np.array([m.color0 for m in mats], np.float32)
        t["m_c1"] = np.array([m.color1 for m in mats], np.float32)
        t["m_scale"] = np.array([m.scale for m in mats], np.float32)
        t["m_seed"] = np.array([m.seed for m in mats], np.int64)
        t["m_off"] = np.array([m.offset for m in mats], np.float32)
        return self


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) ** 2.2  # to linear light


def _material(
    rng: np.random.Generator, style: str, family: str, scale: tuple[float, float]
) -> Material:
    hr, sr, vr = _PALETTES[style]
    h = rng.uniform(*hr)
    s = rng.uniform(*sr)
    v = rng.uniform(*vr)
    c0 = _hsv_to_rgb(h, s, v)
    c1 = _hsv_to_rgb(
        (h + rng.uniform(-0.05, 0.05)) % 1.0,
        min(1.0, s * rng.uniform(0.6, 1.4)),
        v * rng.uniform(0.45, 0.8),
    )
    kind = _TEXTURES[str(rng.choice(_STYLE_TEXTURES[style][family]))]
    return Material(
        kind,
        c0,
        c1,
        float(rng.uniform(*scale)),
        int(rng.integers(0, 2**31 - 1)),
        tuple(rng.uniform(0, 10, 2)),
    )


def _picture_material(rng: np.random.Generator) -> Material:
    c0 = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 0.95), rng.uniform(0.5, 1.0))
    c1 = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 0.95), rng.uniform(0.2, 0.8))
    kind = _TEXTURES[str(rng.choice(["noise", "marble", "stripes", "checker"]))]
    return Material(kind, c0, c1, float(rng.uniform(3.0, 8.0)), int(rng.integers(0, 2**31 - 1)))


# Furniture per scene type: (class, (w lo, w hi), (height lo, hi), (depth lo, hi), against wall?)
_FURNITURE = {
    "bedroom": [
        ("bed", (1.4, 2.0), (0.45, 0.6), (1.9, 2.1), True),
        ("cabinet", (0.8, 1.6), (1.6, 2.1), (0.5, 0.6), True),
        ("table", (0.4, 0.6), (0.5, 0.6), (0.4, 0.5), True),
    ],
    "kitchen": [
        ("counter", (1.5, 3.0), (0.85, 0.92), (0.6, 0.65), True),
        ("cabinet", (0.6, 1.2), (1.8, 2.2), (0.5, 0.6), True),
        ("table", (0.9, 1.4), (0.72, 0.78), (0.7, 0.9), False),
    ],
    "living_room": [
        ("sofa", (1.6, 2.4), (0.7, 0.9), (0.8, 1.0), True),
        ("shelf", (0.8, 1.8), (1.0, 2.0), (0.3, 0.45), True),
        ("table", (0.8, 1.2), (0.4, 0.5), (0.5, 0.7), False),
    ],
    "bathroom": [
        ("cabinet", (0.6, 1.0), (0.8, 0.9), (0.45, 0.55), True),
        ("shelf", (0.4, 0.8), (1.5, 1.9), (0.3, 0.4), True),
    ],
    "dining_room": [
        ("table", (1.2, 2.0), (0.72, 0.78), (0.8, 1.0), False),
        ("cabinet", (1.0, 1.8), (0.8, 1.0), (0.45, 0.55), True),
        ("chair", (0.4, 0.5), (0.45, 0.5), (0.4, 0.5), False),
    ],
    "office": [
        ("desk", (1.2, 1.8), (0.72, 0.76), (0.7, 0.8), True),
        ("shelf", (0.8, 1.2), (1.8, 2.1), (0.35, 0.45), True),
        ("table", (0.7, 1.0), (0.72, 0.76), (0.7, 0.9), False),
    ],
    "study": [
        ("desk", (1.0, 1.5), (0.72, 0.76), (0.6, 0.75), True),
        ("shelf", (0.8, 1.6), (1.8, 2.1), (0.3, 0.4), True),
    ],
    "classroom": [
        ("table", (1.2, 1.6), (0.7, 0.76), (0.5, 0.6), False),
        ("table", (1.2, 1.6), (0.7, 0.76), (0.5, 0.6), False),
        ("cabinet", (1.0, 2.0), (0.9, 1.2), (0.4, 0.5), True),
    ],
    "livingroom": [
        ("sofa", (1.8, 2.6), (0.75, 0.9), (0.85, 1.0), True),
        ("table", (0.9, 1.3), (0.4, 0.5), (0.5, 0.8), False),
        ("pillar", (0.3, 0.5), (3.0, 3.0), (0.3, 0.5), False),
    ],
    "corridor": [
        ("pillar", (0.3, 0.5), (3.0, 3.0), (0.3, 0.5), True),
        ("cabinet", (0.8, 1.4), (1.0, 1.8), (0.4, 0.5), True),
    ],
    "restroom": [
        ("counter", (1.2, 2.0), (0.8, 0.9), (0.5, 0.6), True),
        ("pillar", (0.8, 1.2), (3.0, 3.0), (0.1, 0.15), False),
    ],
    "storageroom": [
        ("shelf", (1.0, 2.0), (1.8, 2.4), (0.4, 0.6), True),
        ("shelf", (1.0, 2.0), (1.8, 2.4), (0.4, 0.6), True),
        ("table", (0.8, 1.2), (0.72, 0.8), (0.6, 0.8), False),
    ],
}


def room_size(rng: np.random.Generator, style: str, scene_type: str) -> np.ndarray:
    """Room extent (Lx, height, Lz) in metres for a style and scene type."""
    if style == "ibims":
        if scene_type == "corridor":
            return np.array([rng.uniform(2.2, 2.8), rng.uniform(2.8, 3.4), rng.uniform(7.0, 9.0)])
        # held-out shapes: higher ceilings and elongated rooms
        return np.array([rng.uniform(4.0, 7.5), rng.uniform(2.9, 3.6), rng.uniform(3.0, 4.5)])
    return np.array([rng.uniform(3.5, 6.0), rng.uniform(2.4, 2.9), rng.uniform(4.0, 6.5)])


def _point_box_distance(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean distance from points (N, 3) to a box (0 inside)."""
    d = np.maximum(np.maximum(lo - p, 0), p - hi)
    return np.sqrt((d * d).sum(-1))


def build_scene(
    rng: np.random.Generator,
    style: str,
    scene_type: str,
    size: np.ndarray,
    keep_clear: np.ndarray | None = None,
) -> Scene:
    """Build a furnished room of ``size``; furniture keeps 0.6 m away from every point in ``keep_clear``.

    Returns the scene packed for casting. ``keep_clear`` (N, 3) is the camera trajectory, so that
    no camera sits inside furniture or too close to it.
    """
    size = np.asarray(size, np.float64)
    Lx, Ly, Lz = size
    materials: list[Material] = []
    planes: list[Plane] = []

    def add_material(m: Material) -> int:
        materials.append(m)
        return len(materials) - 1

    floor_m = add_material(_material(rng, style, "floor", (1.0, 2.5)))
    wall_m = add_material(_material(rng, style, "wall", (0.8, 2.0)))
    wall2_m = add_material(_material(rng, style, "wall", (0.8, 2.0)))
    ceil_m = add_material(_material(rng, style, "wall", (0.5, 1.0)))
    # Room planes: walls at x = 0, x = Lx, z = 0, z = Lz; floor y = 0 (normals point inwards).
    planes.append(Plane("wall", np.array([1.0, 0, 0]), 0.0))
    planes.append(Plane("wall", np.array([-1.0, 0, 0]), -Lx))
    planes.append(Plane("floor", np.array([0, 1.0, 0]), 0.0))
    planes.append(Plane("wall", np.array([0, 0, 1.0]), 0.0))
    planes.append(Plane("wall", np.array([0, 0, -1.0]), -Lz))
    room = Box(
        np.zeros(3),
        size.copy(),
        CLASS_ID["wall"],
        [wall_m, wall2_m, floor_m, ceil_m, wall2_m, wall_m],
        [1, 2, 1, 1, 3, 4],
        [0, 1, 2, -1, 3, 4],
        interior=True,
    )
    boxes = [room]
    footprints: list[tuple[np.ndarray, np.ndarray]] = []
    class_count: dict[str, int] = {}

    def clear_of_camera(lo: np.ndarray, hi: np.ndarray) -> bool:
        if keep_clear is None or len(keep_clear) == 0:
            return True
        return bool(_point_box_distance(keep_clear, lo, hi).min() > 0.6)

    def overlaps(lo: np.ndarray, hi: np.ndarray) -> bool:
        for flo, fhi in footprints:
            if (
                lo[0] < fhi[0] + 0.05
                and hi[0] > flo[0] - 0.05
                and lo[2] < fhi[2] + 0.05
                and hi[2] > flo[2] - 0.05
            ):
                return True
        return False

    def next_instance(cls: str) -> int:
        class_count[cls] = class_count.get(cls, 0) + 1
        return class_count[cls]

    items = list(_FURNITURE[scene_type])
    extra = int(rng.integers(1, 3))
    items += [items[int(rng.integers(0, len(items)))] for _ in range(extra)]
    for cls, wr, hr, dr, wall in items:
        for _attempt in range(30):
            w, h, d = rng.uniform(*wr), min(rng.uniform(*hr), Ly), rng.uniform(*dr)
            if rng.random() < 0.5:
                w, d = d, w  # rotate 90 degrees
            if wall:
                side = int(rng.integers(0, 4))
                if side == 0:
                    x0, z0 = 0.0, rng.uniform(0, Lz - d)
                elif side == 1:
                    x0, z0 = Lx - w, rng.uniform(0, Lz - d)
                elif side == 2:
                    x0, z0 = rng.uniform(0, Lx - w), 0.0
                else:
                    x0, z0 = rng.uniform(0, Lx - w), Lz - d
            else:
                x0, z0 = (
                    rng.uniform(0.3, max(0.31, Lx - w - 0.3)),
                    rng.uniform(0.3, max(0.31, Lz - d - 0.3)),
                )
            lo = np.array([x0, 0.0, z0])
            hi = np.array([x0 + w, h, z0 + d])
            if np.any(hi > size + 1e-9) or overlaps(lo, hi) or not clear_of_camera(lo, hi):
                continue
            footprints.append((lo, hi))
            if cls in ("table", "desk"):
                top_m = add_material(_material(rng, style, "furniture", (2.0, 5.0)))
                leg_m = add_material(_material(rng, style, "furniture", (4.0, 8.0)))
                thick = 0.04
                inst = next_instance("table")
                planes.append(Plane("table", np.array([0, 1.0, 0]), float(h)))
                top_plane = len(planes) - 1
                boxes.append(
                    Box(
                        np.array([lo[0], h - thick, lo[2]]),
                        hi.copy(),
                        CLASS_ID["table"],
                        [top_m] * 6,
                        [inst] * 6,
                        [-1, -1, -1, top_plane, -1, -1],
                    )
                )
                leg = 0.05
                for cx, cz in (
                    (lo[0], lo[2]),
                    (hi[0] - leg, lo[2]),
                    (lo[0], hi[2] - leg),
                    (hi[0] - leg, hi[2] - leg),
                ):
                    boxes.append(
                        Box(
                            np.array([cx, 0.0, cz]),
                            np.array([cx + leg, h - thick, cz + leg]),
                            CLASS_ID["table"],
                            [leg_m] * 6,
                            [inst] * 6,
                            [-1] * 6,
                        )
                    )
            else:
                m = add_material(_material(rng, style, "furniture", (1.5, 4.0)))
                inst = next_instance(cls)
                boxes.append(Box(lo, hi, CLASS_ID[cls], [m] * 6, [inst] * 6, [-1] * 6))
            break

    # Pictures: thin boxes 2 cm off a wall, between 1.1 m and 2.2 m high.
    for _ in range(int(rng.integers(1, 4))):
        pm = add_material(_picture_material(rng))
        w, h = rng.uniform(0.3, 1.0), rng.uniform(0.3, 0.8)
        y0 = rng.uniform(1.1, max(1.11, min(2.2, Ly - 0.2) - h))
        side = int(rng.integers(0, 4))
        t = 0.02
        if side < 2:
            z0 = rng.uniform(0.2, Lz - w - 0.2)
            x0 = 0.0 if side == 0 else Lx - t
            lo, hi = np.array([x0, y0, z0]), np.array([x0 + t, y0 + h, z0 + w])
        else:
            x0 = rng.uniform(0.2, Lx - w - 0.2)
            z0 = 0.0 if side == 2 else Lz - t
            lo, hi = np.array([x0, y0, z0]), np.array([x0 + w, y0 + h, z0 + t])
        boxes.append(
            Box(lo, hi, CLASS_ID["picture"], [pm] * 6, [next_instance("picture")] * 6, [-1] * 6)
        )

    n_lights = int(rng.integers(2, 4))
    lights = np.stack(
        [
            rng.uniform(0.2, 0.8, n_lights) * Lx,
            np.full(n_lights, Ly - 0.15),
            rng.uniform(0.2, 0.8, n_lights) * Lz,
        ],
        1,
    )
    power = rng.uniform(0.6, 1.1, n_lights) * (2.0 / n_lights)
    scene = Scene(
        style,
        scene_type,
        size,
        boxes,
        materials,
        planes,
        lights,
        power,
        float(rng.uniform(0.25, 0.4)),
    )
    return scene.pack()


# ----------------------------------------------------------------------------- cameras


def rotation_ypr(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation for yaw (about world up), pitch (up positive) and roll.

    At zero angles the camera looks along world -z with its image x along world +x and its image
    y (down) along world -y.
    """
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    # Roll turns about the viewing axis, which is -z of the base frame.
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    base = np.diag([1.0, -1.0, -1.0])
    return Ry @ Rx @ Rz @ base


def _smooth_curve(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    """Sum of a few random low-frequency sinusoids, (n, dims), unit RMS per-frame step."""
    t = np.arange(n, dtype=np.float64)[:, None]
    out = np.zeros((n, dims))
    for _ in range(3):
        f = rng.uniform(0.01, 0.06, dims)
        a = rng.uniform(0.5, 1.0, dims)
        ph = rng.uniform(0, 2 * np.pi, dims)
        out += a * np.sin(2 * np.pi * f * t + ph)
    step = np.diff(out, axis=0) if n > 1 else np.ones((1, dims))
    rms = np.sqrt((step**2).mean(0)) + 1e-12
    return out / rms


def hand_held_trajectory(
    rng: np.random.Generator,
    size: np.ndarray,
    n_frames: int,
    step_m: float,
    rot_deg: float,
    margin: float = 1.0,
) -> np.ndarray:
    """Camera-to-world poses (n, 4, 4) of a hand-held walk through a room of ``size``.

    Translation per frame is about ``step_m`` metres (vertical motion at a third of that) and the
    yaw/pitch/roll change per frame is about ``rot_deg`` / half / a third of it: the small
    rotations SC-DepthV2 was built to rectify. The path stays ``margin`` metres from the walls
    and between 1.1 and 1.8 m high.
    """
    Lx, Ly, Lz = size
    walk = _smooth_curve(rng, n_frames, 3)
    walk[:, 1] *= 0.35
    if n_frames > 1:
        walk *= step_m / np.sqrt((np.diff(walk, axis=0) ** 2).sum(1).mean())
    walk -= walk.mean(0)
    half_free = np.array([Lx / 2 - margin, 0.3, Lz / 2 - margin])
    extent = np.abs(walk).max(0) + 1e-9
    walk *= np.minimum(1.0, half_free / extent)  # shrink the walk (and its speed) to fit the room
    room_c = np.array([Lx / 2, rng.uniform(1.35, 1.55), Lz / 2])
    slack = np.maximum(half_free - np.abs(walk).max(0), 0)
    # Stand towards one side of the room so that the far side is in view.
    push = rng.choice([-1.0, 1.0], 3) * rng.uniform(0.5, 1.0, 3)
    centre = room_c + push * slack * np.array([1, 0, 1])
    pos = centre + walk
    angles = _smooth_curve(rng, n_frames, 3) * math.radians(rot_deg) * np.array([1.0, 0.5, 0.3])
    angles -= angles.mean(0)
    # Look roughly towards the farthest corner, as a person filming a room does.
    corners = np.array([[0, 0], [Lx, 0], [0, Lz], [Lx, Lz]], np.float64)
    far = corners[np.argmax(np.hypot(corners[:, 0] - centre[0], corners[:, 1] - centre[2]))]
    yaw0 = math.atan2(-(far[0] - centre[0]), -(far[1] - centre[2])) + math.radians(
        rng.uniform(-30, 30)
    )
    pitch0 = math.radians(rng.uniform(-18, -5))
    poses = np.tile(np.eye(4), (n_frames, 1, 1))
    for i in range(n_frames):
        poses[i, :3, :3] = rotation_ypr(yaw0 + angles[i, 0], pitch0 + angles[i, 1], angles[i, 2])
        poses[i, :3, 3] = pos[i]
    return poses


# ----------------------------------------------------------------------------- casting and shading

_UV_AXES = np.array([[2, 1], [0, 2], [0, 1]])  # surface coordinates of x-, y- and z-faces


@dataclass
class Hits:
    """Nearest intersections of a bundle of rays: parameter t (z-depth for z=1 camera rays),
    primitive index and face index (axis * 2 + side, side 1 = the box's high face)."""

    t: np.ndarray
    prim: np.ndarray
    face: np.ndarray


def cast(scene: Scene, origin: np.ndarray, dirs: np.ndarray, chunk: int = 8192) -> Hits:
    """Intersect rays ``origin + t * dirs`` (dirs (R, 3)) with the scene; every ray hits the room."""
    tb = scene.tables
    lo, hi, interior = tb["lo"], tb["hi"], tb["interior"]
    room = int(np.flatnonzero(interior)[0])
    solid = np.flatnonzero(~interior)
    o = origin.astype(np.float32)
    R = dirs.shape[0]
    t_out = np.empty(R, np.float32)
    prim_out = np.empty(R, np.int64)
    face_out = np.empty(R, np.int64)
    for s in range(0, R, chunk):
        d = dirs[s : s + chunk].astype(np.float32)
        d = np.where(np.abs(d) < 1e-12, np.float32(1e-12), d)
        inv = 1.0 / d
        # Room seen from inside: leave through the nearest far face.
        far = np.where(d > 0, hi[room], lo[room])
        t_axes = (far - o) * inv
        axis = np.where(t_axes[:, 0] <= t_axes[:, 1], 0, 1)
        axis = np.where(t_axes[:, 2] < t_axes[np.arange(len(d)), axis], 2, axis)
        t_best = t_axes[np.arange(len(d)), axis]
        prim = np.full(len(d), room, np.int64)
        face = axis * 2 + (d[np.arange(len(d)), axis] > 0)
        if solid.size:
            # Slab test per axis on (rays, boxes) arrays; reductions over a length-3 axis are
            # slow in NumPy, so the three axes are combined with elementwise max/min instead.
            lo_s, hi_s = lo[solid] - o, hi[solid] - o
            tmins, tfar = [], None
            for a in range(3):
                t1 = inv[:, a : a + 1] * lo_s[None, :, a]
                t2 = inv[:, a : a + 1] * hi_s[None, :, a]
                tmins.append(np.minimum(t1, t2))
                tmax = np.maximum(t1, t2)
                tfar = tmax if tfar is None else np.minimum(tfar, tmax)
            tnear = np.maximum(np.maximum(tmins[0], tmins[1]), tmins[2])
            ok = (tnear <= tfar) & (tnear > 1e-4)
            tnear = np.where(ok, tnear, np.inf)
            j = tnear.argmin(1)
            rows = np.arange(len(d))
            tj = tnear[rows, j]
            closer = tj < t_best
            ax = np.stack([tm[rows, j] for tm in tmins], 1).argmax(-1)
            # Entering through the low face when moving in +axis.
            sface = ax * 2 + (d[rows, ax] < 0)
            t_best = np.where(closer, tj, t_best)
            prim = np.where(closer, solid[j], prim)
            face = np.where(closer, sface, face)
        t_out[s : s + chunk] = t_best
        prim_out[s : s + chunk] = prim
        face_out[s : s + chunk] = face
    return Hits(t_out, prim_out, face_out)


def shade(scene: Scene, points: np.ndarray, hits: Hits) -> np.ndarray:
    """Linear-light colour (R, 3) of surface points: procedural albedo x Lambertian lighting."""
    tb = scene.tables
    axis = hits.face // 2
    normal = np.zeros_like(points)
    sign = np.where(hits.face % 2 == 1, -1.0, 1.0).astype(np.float32)
    # Room faces are seen from inside: the high face points inwards (-axis); solids the opposite.
    interior = tb["interior"][hits.prim]
    sign = np.where(interior, sign, -sign)
    normal[np.arange(len(points)), axis] = sign
    mat = tb["material"][hits.prim, hits.face]
    uv = _UV_AXES[axis]
    rows = np.arange(len(points))
    u = points[rows, uv[:, 0]] * tb["m_scale"][mat] + tb["m_off"][mat, 0]
    v = points[rows, uv[:, 1]] * tb["m_scale"][mat] + tb["m_off"][mat, 1]
    seeds = tb["m_seed"][mat]
    kinds = tb["m_kind"][mat]
    f = np.zeros(len(points), np.float32)
    for k in np.unique(kinds):
        sel = kinds == k
        f[sel] = _texture(int(k), u[sel], v[sel], seeds[sel])
    albedo = tb["m_c0"][mat] * (1 - f[:, None]) + tb["m_c1"][mat] * f[:, None]
    # Fine grain shared by every material keeps even plain walls textured for photometric losses.
    grain = fbm(u * 6.0, v * 6.0, seeds + 7, 2)
    albedo = albedo * (0.85 + 0.3 * grain[:, None])
    light = np.full(len(points), scene.ambient, np.float32)
    for pos, power in zip(scene.lights, scene.light_power, strict=True):
        vec = pos.astype(np.float32) - points
        dist = np.sqrt((vec * vec).sum(1)) + 1e-6
        ndotl = np.clip((vec * normal).sum(1) / dist, 0, None)
        light += power * ndotl / (1.0 + (dist / 3.0) ** 2)
    return albedo * light[:, None]


def _camera_rays(
    K: np.ndarray, R: np.ndarray, h: int, w: int, du: float = 0.0, dv: float = 0.0
) -> np.ndarray:
    """World-frame ray directions with camera z = 1, for pixel centres offset by (du, dv)."""
    u, v = np.meshgrid(np.arange(w) + du, np.arange(h) + dv)
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(
        -1, 3
    )
    return cam @ R.T


def depth_edges(depth: np.ndarray, rel_jump: float = 0.08) -> np.ndarray:
    """Occluding edges: 1 where a 4-neighbour is farther by more than ``rel_jump`` (relative)."""
    edges = np.zeros(depth.shape, bool)
    for axis in (0, 1):
        a = depth
        b = np.roll(depth, -1, axis)
        jump = np.abs(a - b) / np.minimum(a, b) > rel_jump
        if axis == 0:
            jump[-1] = False
        else:
            jump[:, -1] = False
        near_a = jump & (a < b)
        near_b = jump & (b < a)
        edges |= near_a
        edges |= np.roll(near_b, 1, axis)
    return edges.astype(np.uint8)


def render_frame(
    scene: Scene, K: np.ndarray, pose: np.ndarray, height: int, width: int, supersample: int = 2
) -> dict:
    """Render one view; see the module docstring for the returned keys and conventions."""
    R, o = pose[:3, :3], pose[:3, 3]
    tb = scene.tables
    dirs = _camera_rays(K, R, height, width)
    hits = cast(scene, o, dirs)
    depth = hits.t.reshape(height, width).astype(np.float32)
    labels = tb["label"][hits.prim, hits.face].reshape(height, width).astype(np.uint16)
    instances = tb["instance"][hits.prim, hits.face].reshape(height, width).astype(np.uint8)
    plane_id = tb["plane"][hits.prim, hits.face].reshape(height, width)

    if supersample <= 1:
        pts = o[None].astype(np.float32) + hits.t[:, None] * dirs.astype(np.float32)
        color = shade(scene, pts, hits)
    else:
        offs = (np.arange(supersample) + 0.5) / supersample - 0.5
        sd = np.concatenate(
            [_camera_rays(K, R, height, width, du, dv) for dv in offs for du in offs]
        )
        sh = cast(scene, o, sd)
        pts = o[None].astype(np.float32) + sh.t[:, None] * sd.astype(np.float32)
        color = shade(scene, pts, sh).reshape(supersample**2, height * width, 3).mean(0)
    srgb = np.clip(color, 0, 1) ** (1 / 2.2)
    rgb = np.round(srgb * 255).astype(np.uint8).reshape(height, width, 3)

    # Planes visible in this view, numbered per class in global order, in camera coordinates.
    Rt = R.T
    planes: dict[str, dict] = {}
    for cls in PLANE_CLASSES:
        mask = np.zeros((height, width), np.uint16)
        params = []
        k = 0
        for pid, plane in enumerate(scene.planes):
            if plane.cls != cls:
                continue
            sel = plane_id == pid
            if not sel.any():
                continue
            k += 1
            mask[sel] = k
            n_cam = Rt @ plane.normal
            d_cam = plane.offset - float(plane.normal @ o)
            params.append(np.concatenate([n_cam, [d_cam]]))
        planes[cls] = {"mask": mask, "params": np.array(params, np.float64).reshape(-1, 4)}
    return {
        "rgb": rgb,
        "depth": depth,
        "K": K.astype(np.float32),
        "pose": pose.astype(np.float64),
        "labels": labels,
        "instances": instances,
        "planes": planes,
        "edges": depth_edges(depth),
    }


def kinect_holes(rng: np.random.Generator, depth: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """A raw-sensor version of ``depth``: 0 where a Kinect would have no measurement.

    Holes: a shadow band a few pixels wide beside occluding edges, a few random dropout blobs
    (specular or dark surfaces), and a thin invalid band at the left image border (the Kinect's
    depth-to-RGB registration leaves one). The valid pixels keep the exact depth.
    """
    h, w = depth.shape
    raw = depth.copy()
    band = max(1, w // 160)
    grown = edges.astype(bool)
    for _ in range(band):
        grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
    raw[grown] = 0
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.02, 0.06) * w
        raw[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0
    raw[:, : max(1, w // 64)] = 0
    raw[depth > 10.0] = 0  # beyond the sensor's range
    return raw
