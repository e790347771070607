"""``mesadepth synth``: the synthetic world written in the real dataset formats.

One call renders every scene (see :mod:`mesadepth.data.synthetic`) and writes:

```
OUT/
  config.yaml                          the resolved SynthConfig (rerun with it)
  manifest.json                        counts, sizes on disk, timings, measured world errors
  video/training/train.txt, val.txt    SC-Depth layout: <scene>/0000000.jpg..., cam.txt,
  video/training/<scene>/...             depth/*.png (m x 5000), poses.txt (camera-to-world)
  video/testing/color, depth           the labeled test frames (depth x 5000)
  video_aux/training/...               third-style scenes (the demo teacher's data), if any
  nyu/nyu_depth_v2/<scene>/rgb_%05d.jpg, sync_depth_%05d.png    NYUv2 "sync" (uint16 mm)
  nyu/nyu_depth_v2/official_splits/{train,test}/<scene_type>/   exported from the .mat
  nyu/nyu_depth_v2_labeled.mat, nyu/splits.mat                  NYUv2 labeled (v7.3) + splits
  nyu/splits/train_list.txt, test_list.txt                      MIM list format
  lsun/<category>_train_lmdb/          LSUN lmdb (40-hex keys, JPEG and WebP values)
  lsun_images/<category>/k0/../k5/<key>.webp   the official exporter's folder layout
  ibims/ibims1_core_mat/<name>.mat, ibims/imagelist.txt          IBims-1 (style "ibims")
```

The in-distribution data (video, sync, labeled, LSUN) use style ``nyu``; IBims-1 uses the
held-out style ``ibims`` (other textures, palettes and room shapes); ``video_aux`` uses ``aux``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mesadepth.data import ibims as ibims_fmt
from mesadepth.data import lsun as lsun_fmt
from mesadepth.data import nyu as nyu_fmt
from mesadepth.data import video as video_fmt
from mesadepth.data.synthetic import (
    CLASS_NAMES,
    SCENE_TYPES,
    Scene,
    build_scene,
    cast,
    hand_held_trajectory,
    kinect_holes,
    nyu_intrinsics,
    render_frame,
    room_size,
    scene_rng,
)
from mesadepth.io import atomic_write_text

# ----------------------------------------------------------------------------- configuration


@dataclass
class ImageConfig:
    width: int = field(default=128, metadata={"help": "image width in pixels (NYUv2: 640)"})
    height: int = field(default=96, metadata={"help": "image height in pixels (NYUv2: 480)"})
    supersample: int = field(default=2, metadata={"help": "anti-aliasing: sub-pixel rays per side"})


@dataclass
class VideoConfig:
    train_scenes: int = field(default=8, metadata={"help": "scenes in training/train.txt"})
    val_scenes: int = field(
        default=2, metadata={"help": "scenes in training/val.txt (with depth/)"}
    )
    frames: int = field(default=40, metadata={"help": "frames per scene"})
    step_m: float = field(default=0.05, metadata={"help": "camera translation per frame (m)"})
    rot_deg: float = field(
        default=2.0,
        metadata={
            "help": "camera yaw change per frame (deg); pitch 1/2, roll 1/3. The rotational "
            "flow is ~0.81 x width x radians: at 128 px, 2 deg is 4 px, beyond the photometric "
            "loss's basin even with true depth, and a from-scratch PoseNet learned no motion in "
            "1200 GP steps (at 0.5 deg it did from step ~400; README, 'GP on CPU')"
        },
    )
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of the frames"})


@dataclass
class NYUConfig:
    sync_step: int = field(
        default=2, metadata={"help": "keep every n-th training video frame as a sync pair (NYU: 7)"}
    )
    sync_jpeg_quality: int = field(
        default=75, metadata={"help": "JPEG quality of sync rgb (MATLAB's default 75)"}
    )
    labeled_scenes: int = field(
        default=12, metadata={"help": "scenes of the labeled .mat (held out from video)"}
    )
    labeled_frames: int = field(default=5, metadata={"help": "labeled frames per scene"})
    frame_gap: int = field(
        default=8, metadata={"help": "trajectory frames between two labeled frames"}
    )
    test_fraction: float = field(
        default=0.5, metadata={"help": "share of labeled scenes in testNdxs"}
    )


@dataclass
class LSUNConfig:
    categories: list[str] = field(
        default_factory=lambda: ["bedroom", "dining_room", "kitchen", "living_room"],
        metadata={"help": "LSUN scene categories to write (MeSa: these four)"},
    )
    per_category: int = field(default=100, metadata={"help": "images per category"})
    views_per_room: int = field(default=5, metadata={"help": "views rendered in one room"})
    quality: int = field(default=75, metadata={"help": "JPEG/WebP quality (LSUN: 75)"})


@dataclass
class IBimsConfig:
    images: int = field(
        default=20, metadata={"help": "IBims-1-style images (the real set has 100)"}
    )


@dataclass
class AuxConfig:
    scenes: int = field(
        default=16,
        metadata={
            "help": "third-style video scenes (the demo teacher's data): its pseudo-depth on the "
            "video scenes scored 99 % of a constant map's AbsRel when trained on 4 rooms of 30 "
            "frames, 82-83 % on 16 rooms of 20 (and the demo SP learned depth from it)"
        },
    )
    frames: int = field(default=20, metadata={"help": "frames per aux scene"})


@dataclass
class SynthConfig:
    """What ``mesadepth synth`` writes. Presets set these; ``key=value`` overrides any of them."""

    preset: str = field(default="demo", metadata={"help": "the preset these values started from"})
    seed: int = field(
        default=0, metadata={"help": "world seed; the same seed gives the same files"}
    )
    workers: int = field(
        default=2, metadata={"help": "worker processes (results do not depend on it)"}
    )
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    nyu: NYUConfig = field(default_factory=NYUConfig)
    lsun: LSUNConfig = field(default_factory=LSUNConfig)
    ibims: IBimsConfig = field(default_factory=IBimsConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    checks: bool = field(
        default=True, metadata={"help": "measure reprojection / photometric errors of the world"}
    )


# Presets as overrides of the defaults (which are the demo preset).
PRESETS: dict[str, dict] = {
    # Seconds: for tests. 64 x 48 is NYUv2's 640 x 480 / 10.
    "tiny": {
        "image": {"width": 64, "height": 48},
        "video": {"train_scenes": 2, "val_scenes": 1, "frames": 8},
        "nyu": {"labeled_scenes": 2, "labeled_frames": 3, "frame_gap": 6},
        "lsun": {"per_category": 3, "views_per_room": 3},
        "ibims": {"images": 3},
        "aux": {"scenes": 1, "frames": 6},
    },
    # The CPU demo: 128 x 96 = 640 x 480 / 5, divisible by 32 for Swin-v2's stride.
    "demo": {},
    # A mid-size world for longer CPU/GPU experiments.
    "small": {
        "image": {"width": 320, "height": 240},
        "video": {"train_scenes": 24, "val_scenes": 4, "frames": 80},
        "nyu": {"sync_step": 4, "labeled_scenes": 40, "labeled_frames": 8},
        "lsun": {"per_category": 500},
        "ibims": {"images": 50},
        "aux": {"scenes": 8, "frames": 60},
    },
    # NYUv2 / IBims-1 resolution: every protocol constant (Eigen crop, 5 % planes) applies as is.
    "full": {
        "image": {"width": 640, "height": 480},
        "video": {"train_scenes": 24, "val_scenes": 4, "frames": 120},
        "nyu": {"sync_step": 7, "labeled_scenes": 60, "labeled_frames": 10, "frame_gap": 10},
        "lsun": {"per_category": 500},
        "ibims": {"images": 100},
        "aux": {"scenes": 8, "frames": 60},
    },
}


# ----------------------------------------------------------------------------- scene rendering


def render_scene(
    cfg: SynthConfig,
    style: str,
    kind: str,
    index: int,
    n_frames: int,
    every: int = 1,
    step_m: float | None = None,
    scene_type: str | None = None,
) -> tuple[str, Scene, list[dict]]:
    """Render ``n_frames`` views of scene ``index`` (every ``every``-th frame of one trajectory).

    Deterministic in (seed, style, kind, index). The scene type cycles through the style's
    types unless given. Returns the scene type, the scene and the frame dicts of
    :func:`~mesadepth.data.synthetic.render_frame`, each with a ``raw_depth`` (Kinect-like holes).
    """
    rng = scene_rng(cfg.seed, style, kind, index)
    types = SCENE_TYPES[style]
    scene_type = scene_type or types[index % len(types)]
    size = room_size(rng, style, scene_type)
    step = cfg.video.step_m if step_m is None else step_m
    poses = hand_held_trajectory(rng, size, n_frames * every, step, cfg.video.rot_deg)[::every]
    scene = build_scene(rng, style, scene_type, size, poses[:, :3, 3])
    K = nyu_intrinsics(cfg.image.width, cfg.image.height)
    frames = [
        render_frame(scene, K, p, cfg.image.height, cfg.image.width, cfg.image.supersample)
        for p in poses
    ]
    for f in frames:
        f["raw_depth"] = kinect_holes(rng, f["depth"], f["edges"])
    return scene_type, scene, frames


def render_sequence(
    cfg: SynthConfig, style: str, kind: str, index: int, n_frames: int, **kwargs: Any
) -> tuple[str, list[dict]]:
    """:func:`render_scene` without the scene: the scene type and the frames."""
    scene_type, _, frames = render_scene(cfg, style, kind, index, n_frames, **kwargs)
    return scene_type, frames


@dataclass
class _Task:
    kind: str
    index: int
    args: dict


def _video_task(cfg: SynthConfig, out: Path, task: _Task) -> dict:
    style = task.args["style"]
    scene_type, scene, frames = render_scene(cfg, style, task.kind, task.index, task.args["frames"])
    name = f"{scene_type}_{task.index:04d}"
    root = out / task.args["root"] / "training" / name
    video_fmt.write_video_scene(
        root,
        np.stack([f["rgb"] for f in frames]),
        frames[0]["K"],
        depths_m=np.stack([f["depth"] for f in frames]),
        poses=np.stack([f["pose"] for f in frames]),
        jpeg_quality=cfg.video.jpeg_quality,
    )
    result: dict = {"name": name, "split": task.args["split"], "frames": len(frames), "sync": []}
    if task.args.get("sync"):
        sync_root = out / "nyu" / "nyu_depth_v2"
        for i in range(0, len(frames), cfg.nyu.sync_step):
            j = i // cfg.nyu.sync_step
            nyu_fmt.write_sync_pair(
                sync_root,
                name,
                j,
                frames[i]["rgb"],
                frames[i]["raw_depth"],
                cfg.nyu.sync_jpeg_quality,
            )
            result["sync"].append((f"{name}/rgb_{j:05d}.jpg", f"{name}/sync_depth_{j:05d}.png"))
    if cfg.checks and len(frames) > 2 and task.args.get("check"):
        result["check"] = check_scene_files(root, frames, k=2, scene=scene)
    return result


def _labeled_task(cfg: SynthConfig, out: Path, task: _Task) -> dict:
    scene_type, frames = render_sequence(
        cfg, "nyu", "labeled", task.index, cfg.nyu.labeled_frames, every=cfg.nyu.frame_gap
    )
    return {
        "scene_type": scene_type,
        "scene": f"{scene_type}_{1000 + task.index:04d}",
        "rgb": np.stack([f["rgb"] for f in frames]),
        "depth": np.stack([f["depth"] for f in frames]),
        "raw": np.stack([f["raw_depth"] for f in frames]),
        "labels": np.stack([f["labels"] for f in frames]),
        "instances": np.stack([f["instances"] for f in frames]),
    }


def _lsun_task(cfg: SynthConfig, out: Path, task: _Task) -> dict:
    category = task.args["category"]
    # LSUN images are independent photos: views far apart on one walk through a room of the
    # category's type.
    scene_type = category if category in SCENE_TYPES["nyu"] else None
    _, frames = render_sequence(
        cfg,
        "nyu",
        "lsun",
        task.index,
        task.args["views"],
        every=15,
        step_m=0.08,
        scene_type=scene_type,
    )
    return {"category": category, "images": [f["rgb"] for f in frames]}


def ibims_planes_table(params_cam: np.ndarray) -> np.ndarray:
    """Camera-frame planes (N, 4) [n_x, n_y, n_z, d] (OpenCV axes) -> IBims-1 ``*_paras`` rows (N, 7).

    IBims-1 expresses normals in a (right, forward, up) frame, i.e. (x, z, -y) of OpenCV's.
    Columns 4-6 hold that normal (the only columns the official evaluation reads); columns 0-2
    hold the plane point closest to the camera centre and column 3 its distance, in the same
    frame (the release leaves columns 0-3 undocumented; these are our meaning).
    """
    if len(params_cam) == 0:
        return np.zeros((0, 0), np.float64)
    n = params_cam[:, :3][:, [0, 2, 1]] * np.array([1.0, 1.0, -1.0])
    d = params_cam[:, 3:4]
    closest = n * d
    return np.concatenate([closest, np.abs(d), n], 1)


def _ibims_task(cfg: SynthConfig, out: Path, task: _Task) -> dict:
    scene_type, frames = render_sequence(cfg, "ibims", "ibims", task.index, 1)
    f = frames[0]
    rng = scene_rng(cfg.seed, "ibims", "ibims", 10_000 + task.index)
    h, w = f["depth"].shape
    depth = f["depth"].astype(np.float64)
    # A laser scanner misses some returns (mask_invalid = 0) and sees through glass: pictures
    # are framed behind glass here (mask_transp = 0).
    valid = np.ones((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(0, 3))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.02, 0.05) * w
        valid[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0
    depth[valid == 0] = 0.0
    transp = (f["labels"] != CLASS_NAMES.index("picture") + 1).astype(np.uint8)
    name = task.args["name"]
    ibims_fmt.write_ibims_mat(
        out / "ibims" / "ibims1_core_mat" / f"{name}.mat",
        rgb=f["rgb"],
        depth=depth,
        edges=f["edges"],
        calib=ibims_fmt.calib_from_K(f["K"].astype(np.float64)),
        mask_invalid=valid,
        mask_transp=transp,
        mask_wall=f["planes"]["wall"]["mask"],
        mask_table=f["planes"]["table"]["mask"],
        mask_floor=f["planes"]["floor"]["mask"],
        mask_wall_paras=ibims_planes_table(f["planes"]["wall"]["params"]),
        mask_table_paras=ibims_planes_table(f["planes"]["table"]["params"]),
        mask_floor_paras=ibims_planes_table(f["planes"]["floor"]["params"]),
    )
    return {"name": name, "scene_type": scene_type}


_TASKS: dict[str, Callable[[SynthConfig, Path, _Task], dict]] = {
    "video": _video_task,
    "aux": _video_task,
    "labeled": _labeled_task,
    "lsun": _lsun_task,
    "ibims": _ibims_task,
}


def _run_task(payload: tuple[SynthConfig, Path, _Task]) -> tuple[_Task, dict]:
    cfg, out, task = payload
    return task, _TASKS[task.kind](cfg, out, task)


# ----------------------------------------------------------------------------- geometric checks


def _backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    Kinv = np.linalg.inv(K.astype(np.float64))
    rays = np.stack([u, v, np.ones_like(u)], -1) @ Kinv.T
    return rays * depth[..., None]


def _project(X: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = X[..., 2]
    uvw = X @ K.astype(np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return uvw[..., :2] / z[..., None], z


def bilinear(img: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``img`` (H, W[, C]) at float pixel positions ``uv`` (..., 2); returns values and inside-mask."""
    h, w = img.shape[:2]
    u, v = uv[..., 0], uv[..., 1]
    inside = (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    u = np.clip(np.nan_to_num(u), 0, w - 1)
    v = np.clip(np.nan_to_num(v), 0, h - 1)
    u0 = np.minimum(np.floor(u).astype(np.int64), w - 2)
    v0 = np.minimum(np.floor(v).astype(np.int64), h - 2)
    a, b = u - u0, v - v0
    if img.ndim == 3:
        a, b = a[..., None], b[..., None]
    img = img.astype(np.float64)
    top = img[v0, u0] * (1 - a) + img[v0, u0 + 1] * a
    bot = img[v0 + 1, u0] * (1 - a) + img[v0 + 1, u0 + 1] * a
    return top * (1 - b) + bot * b, inside


def warp_errors(
    depth_t: np.ndarray,
    K: np.ndarray,
    pose_t: np.ndarray,
    pose_s: np.ndarray,
    *,
    rgb_t: np.ndarray | None = None,
    rgb_s: np.ndarray | None = None,
    depth_s: np.ndarray | None = None,
    true_q: np.ndarray | None = None,
    visible: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Reproject frame t into frame s with depth, K and camera-to-world poses.

    Returns ``q`` (H, W, 2) the projected pixel positions in s, ``z`` their depth in s, and when
    given: ``reproj`` = |q - true_q| (pixels), ``photo`` = mean over channels of |rgb_t - rgb_s(q)|
    (grey levels). ``visible`` (H, W) restricts the statistics; without it a depth test against
    ``depth_s`` (1 % relative) stands in for the occlusion test.
    """
    X_t = _backproject(depth_t, K)
    T = np.linalg.inv(pose_s) @ pose_t  # camera t -> camera s
    X_s = X_t @ T[:3, :3].T + T[:3, 3]
    q, z = _project(X_s, K)
    out: dict[str, np.ndarray] = {"q": q, "z": z}
    mask = (depth_t > 0) & (z > 0)
    if depth_s is not None:
        zs, inside = bilinear(depth_s, q)
        mask &= inside & (np.abs(zs - z) < 0.01 * z)
    if visible is not None:
        mask &= visible
    out["mask"] = mask
    if true_q is not None:
        out["reproj"] = np.linalg.norm(q - true_q, axis=-1)[mask]
    if rgb_t is not None and rgb_s is not None:
        warped, inside = bilinear(rgb_s, q)
        m = mask & inside
        out["photo"] = np.abs(warped - rgb_t.astype(np.float64)).mean(-1)[m]
        out["photo_mask"] = m
    return out


def check_scene_files(
    scene_dir: Path, truth: list[dict], k: int = 2, scene: Scene | None = None
) -> dict[str, float]:
    """Measure how exactly the written scene encodes the rendered world.

    Reads the scene back with the SC-Depth loader (JPEG frames, depth PNG / 5000, cam.txt,
    poses.txt) and, for frame pairs (t, t + k), back-projects every pixel p of t with the
    files' depth and projects it into t + k with the files' relative pose, landing at q.
    Statistics are over pixels whose surface point t + k truly sees (unoccluded, in view):

    - ``reproj_px``: the renderer casts the ray of camera t + k through q; the surface point
      it hits, projected back into t, should be p again. The distance (pixels) is 0 only if
      image formation, K, poses and depth encoding all agree ("q shows the same point").
      Without ``scene`` it falls back to |q - q_true| with q_true from the exact geometry.
    - ``photo_gl``: mean |colour of t - colour of t + k sampled at q| (grey levels 0-255,
      bilinear), and ``photo_static_gl`` the same without motion compensation, a baseline.
    """
    files = video_fmt.VideoScene(scene_dir)
    K = files.K.astype(np.float64)
    poses = files.poses()
    reproj, photo, static = [], [], []
    for t in range(0, len(truth) - k, max(1, (len(truth) - k) // 4)):
        s = t + k
        true_t, true_s = truth[t], truth[s]
        Kt = true_t["K"].astype(np.float64)
        # Visibility from the exact geometry: t + k's own depth agrees at the landing point.
        ref = warp_errors(
            true_t["depth"].astype(np.float64),
            Kt,
            true_t["pose"],
            true_s["pose"],
            depth_s=true_s["depth"],
        )
        got = warp_errors(
            files.depth(t).astype(np.float64),
            K,
            poses[t],
            poses[s],
            rgb_t=files.frame(t),
            rgb_s=files.frame(s),
            true_q=ref["q"],
            visible=ref["mask"],
        )
        mask = got["mask"]
        if scene is not None:
            q = got["q"][mask]
            pose_s = true_s["pose"]
            rays = np.stack(
                [(q[:, 0] - Kt[0, 2]) / Kt[0, 0], (q[:, 1] - Kt[1, 2]) / Kt[1, 1], np.ones(len(q))],
                -1,
            )
            dirs = rays @ pose_s[:3, :3].T
            hits = cast(scene, pose_s[:3, 3], dirs)
            H = pose_s[:3, 3] + hits.t[:, None].astype(np.float64) * dirs
            back, _ = _project((H - true_t["pose"][:3, 3]) @ true_t["pose"][:3, :3], Kt)
            v, u = np.nonzero(mask)
            reproj.append(np.hypot(back[:, 0] - u, back[:, 1] - v))
        else:
            reproj.append(got["reproj"])
        photo.append(got["photo"])
        still = files.frame(s).astype(np.float64)  # no motion compensation at all
        static.append(np.abs(still - files.frame(t)).mean(-1)[got["photo_mask"]])
    r, p, st = np.concatenate(reproj), np.concatenate(photo), np.concatenate(static)
    return {
        "reproj_px_median": float(np.median(r)),
        "reproj_px_p95": float(np.percentile(r, 95)),
        "photo_gl_mean": float(p.mean()),
        "photo_gl_median": float(np.median(p)),
        "photo_static_gl_mean": float(st.mean()),
        "pixels": int(r.size),
    }


# ----------------------------------------------------------------------------- orchestration


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate_world(
    cfg: SynthConfig, out: str | os.PathLike[str], *, overwrite: bool = False, progress: bool = True
) -> dict:
    """Render the world of ``cfg`` and write it under ``out``; returns the manifest (also saved).

    Refuses a non-empty ``out`` unless ``overwrite`` (then the folders it writes are replaced).
    """
    out = Path(out)
    names = [
        "video",
        "video_aux",
        "nyu",
        "lsun",
        "lsun_images",
        "ibims",
        "manifest.json",
        "config.yaml",
    ]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out}: output folder is not empty; pass --overwrite to replace the world in it"
            )
        for n in names:
            p = out / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tasks: list[_Task] = []
    v = cfg.video
    for i in range(v.train_scenes):
        tasks.append(
            _Task(
                "video",
                i,
                {
                    "style": "nyu",
                    "frames": v.frames,
                    "split": "train",
                    "root": "video",
                    "sync": True,
                    "check": i == 0,
                },
            )
        )
    for i in range(v.train_scenes, v.train_scenes + v.val_scenes):
        tasks.append(
            _Task(
                "video",
                i,
                {
                    "style": "nyu",
                    "frames": v.frames,
                    "split": "val",
                    "root": "video",
                    "check": True,
                },
            )
        )
    for i in range(cfg.aux.scenes):
        tasks.append(
            _Task(
                "aux",
                i,
                {"style": "aux", "frames": cfg.aux.frames, "split": "train", "root": "video_aux"},
            )
        )
    for i in range(cfg.nyu.labeled_scenes):
        tasks.append(_Task("labeled", i, {}))
    for ci, cat in enumerate(cfg.lsun.categories):
        n_rooms = -(-cfg.lsun.per_category // cfg.lsun.views_per_room)
        for r in range(n_rooms):
            views = min(
                cfg.lsun.views_per_room, cfg.lsun.per_category - r * cfg.lsun.views_per_room
            )
            tasks.append(_Task("lsun", ci * 100_000 + r, {"category": cat, "views": views}))
    ib_types = SCENE_TYPES["ibims"]
    counters: dict[str, int] = {}
    for i in range(cfg.ibims.images):
        t = ib_types[i % len(ib_types)]
        counters[t] = counters.get(t, 0) + 1
        tasks.append(_Task("ibims", i, {"name": f"{t}_{counters[t]:02d}"}))

    results: list[tuple[_Task, dict]] = []
    payloads = [(cfg, out, t) for t in tasks]
    bar = tqdm(total=len(tasks), desc="synth", unit="scene", disable=not progress)
    if cfg.workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            for res in pool.map(_run_task, payloads, chunksize=1):
                results.append(res)
                bar.update()
    else:
        for p in payloads:
            results.append(_run_task(p))
            bar.update()
    bar.close()
    t_render = time.perf_counter() - t0

    by_kind: dict[str, list[tuple[_Task, dict]]] = {}
    for task, res in results:
        by_kind.setdefault(task.kind, []).append((task, res))

    # SC-Depth scene lists and the NYU sync train list.
    train = [r for _, r in by_kind.get("video", []) if r["split"] == "train"]
    val = [r for _, r in by_kind.get("video", []) if r["split"] == "val"]
    vroot = out / "video" / "training"
    video_fmt.write_scene_list(vroot / "train.txt", [r["name"] for r in train])
    if val:
        video_fmt.write_scene_list(vroot / "val.txt", [r["name"] for r in val])
    if cfg.aux.scenes:
        aux = [r["name"] for _, r in by_kind["aux"]]
        video_fmt.write_scene_list(out / "video_aux" / "training" / "train.txt", aux)
        video_fmt.write_scene_list(out / "video_aux" / "training" / "val.txt", aux[-1:])
    sync_pairs = [p for r in train for p in r["sync"]]
    nyu_fmt.write_pair_list(out / "nyu" / "splits" / "train_list.txt", sync_pairs, style="mim")

    # Labeled .mat: all labeled frames, test = a share of the scenes (whole scenes, as in NYUv2).
    lab = [r for _, r in by_kind.get("labeled", [])]
    n_test_scenes = int(round(cfg.nyu.test_fraction * len(lab)))
    split_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 77]))
    test_scenes = (
        set(split_rng.choice(len(lab), size=n_test_scenes, replace=False).tolist())
        if lab
        else set()
    )
    frame_scene = (
        np.concatenate([np.full(len(r["rgb"]), i) for i, r in enumerate(lab)])
        if lab
        else np.zeros(0, int)
    )
    n_lab = len(frame_scene)
    idx1 = np.arange(1, n_lab + 1)
    is_test = np.isin(frame_scene, list(test_scenes))
    mat_path = out / "nyu" / "nyu_depth_v2_labeled.mat"
    splits_path = out / "nyu" / "splits.mat"
    test_pairs: list = []
    if n_lab:
        nyu_fmt.write_nyu_labeled_mat(
            mat_path,
            images=np.concatenate([r["rgb"] for r in lab]),
            depths=np.concatenate([r["depth"] for r in lab]).astype(np.float32),
            raw_depths=np.concatenate([r["raw"] for r in lab]).astype(np.float32),
            labels=np.concatenate([r["labels"] for r in lab]).astype(np.uint16),
            instances=np.concatenate([r["instances"] for r in lab]).astype(np.uint8),
            scene_types=[lab[i]["scene_type"] for i in frame_scene],
            scenes=[lab[i]["scene"] for i in frame_scene],
            names=list(CLASS_NAMES),
        )
        nyu_fmt.write_splits_mat(splits_path, idx1[~is_test], idx1[is_test])
        test_pairs = nyu_fmt.export_official_splits(
            mat_path, splits_path, out / "nyu" / "nyu_depth_v2" / "official_splits"
        )
        nyu_fmt.write_pair_list(
            out / "nyu" / "splits" / "test_list.txt", test_pairs, style="mim", final_newline=False
        )
        # SC-Depth's testing/ folder holds the same test frames, depth x 5000.
        test_idx = np.flatnonzero(is_test)
        video_fmt.write_test_folder(
            out / "video" / "testing",
            np.concatenate([r["rgb"] for r in lab])[test_idx],
            np.concatenate([r["raw"] for r in lab])[test_idx],
        )

    # LSUN lmdb per category, then the exporter's folder layout.
    lsun_counts: dict[str, int] = {}
    for cat in cfg.lsun.categories if cfg.lsun.per_category > 0 else []:
        imgs = [
            im for t, r in by_kind.get("lsun", []) if r["category"] == cat for im in r["images"]
        ]
        lsun_fmt.write_lsun_lmdb(
            out / "lsun", cat, imgs, split="train", seed=cfg.seed, quality=cfg.lsun.quality
        )
        lsun_fmt.export_lsun_folder(out / "lsun" / f"{cat}_train_lmdb", out / "lsun_images" / cat)
        lsun_counts[cat] = len(imgs)
    # This process wrote and exported the environments; release them so that loaders opened
    # later in the same process (e.g. by `inspect`) get fresh read-only handles.
    lsun_fmt.close_lmdb_envs()

    ib = sorted((t.index, r["name"]) for t, r in by_kind.get("ibims", []))
    if ib:
        ibims_fmt.write_imagelist(out / "ibims" / "imagelist.txt", [n for _, n in ib])

    checks = [r["check"] for _, r in by_kind.get("video", []) if "check" in r]
    elapsed = time.perf_counter() - t0
    sizes = {n: _dir_size(out / n) for n in names[:6] if (out / n).exists()}
    manifest = {
        "preset": cfg.preset,
        "seed": cfg.seed,
        "image_size": [cfg.image.height, cfg.image.width],
        "counts": {
            "video_train_scenes": len(train),
            "video_val_scenes": len(val),
            "video_frames": sum(r["frames"] for _, r in by_kind.get("video", [])),
            "aux_scenes": cfg.aux.scenes,
            "sync_pairs": len(sync_pairs),
            "labeled_frames": n_lab,
            "labeled_test": int(is_test.sum()),
            "lsun": lsun_counts,
            "ibims": len(ib),
        },
        "bytes": sizes,
        "seconds": {"render": round(t_render, 2), "total": round(elapsed, 2)},
        "world_checks": _merge_checks(checks),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _merge_checks(checks: list[dict]) -> dict:
    if not checks:
        return {}
    keys = checks[0].keys()
    return {
        k: (
            max(c[k] for c in checks)
            if k.endswith("p95")
            else float(np.mean([c[k] for c in checks]))
        )
        for k in keys
    }
