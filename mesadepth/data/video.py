"""SC-Depth's video layout (geometric / supervised pre-training data): writer, readers, datasets.

Specification: geometric-and-supervised-pretraining.md sections 1.1-1.4 (layout, frame
sampling, frame_index.txt, pseudo-depth), 1.7 (validation modes), 1.8 (NYU: depth PNG / 5000)
and pitfalls 8 (frame-index wrap-around), 10 (raw pseudo-depth), 18 (scene-list chop),
20 (global reseeding); datasets-and-ibims-evaluation.md section 4.

```
<root>/
  training/train.txt, val.txt      one scene folder name per line, every line ending in "\\n"
  training/<scene>/%07d.jpg        frames; time order = sorted file names (only *.jpg)
  training/<scene>/cam.txt         3x3 intrinsics of the frames as stored
  training/<scene>/frame_index.txt optional subset of the sorted frames (0-based)
  training/<scene>/leres_depth/*.png   pseudo-depth, uint16, read raw (v3)
  training/<scene>/depth/*.png     ground truth, metres = value / 5000
  training/<scene>/poses.txt       OUR extra file: N lines of 12 numbers, the top 3x4 rows of
                                   camera-to-world (row-major); SC-Depth ignores it; read by
                                   validation.pose and by pose.source=poses (known-pose training)
  testing/color/*.jpg|*.png, testing/depth/*.png
```

Frames, pseudo-depths and depths are paired by sorted order only, never by name (spec 1.1).

Pose convention of ``poses.txt`` (not part of SC-Depth): camera-to-world, OpenCV camera axes
(x right, y down, z forward), translations in metres, one line per ``*.jpg`` in sorted order.
:func:`poses_from_scannet`, :func:`poses_from_arkit` and :func:`poses_from_tum` convert the
common formats; :func:`write_poses` writes the file.
Hidden files (names starting with ".", e.g. an interrupted atomic write) are never collected;
the reference's ``*.jpg`` glob would collect them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mesadepth.errors import BadSamples, ConfigError, DataError, MissingFileError
from mesadepth.io import (
    PathLike,
    atomic_write_text,
    encode_depth_png,
    read_cam_txt,
    read_depth_png,
    read_list_file,
    read_png_uint16,
    read_rgb,
    write_cam_txt,
    write_jpeg,
    write_png,
)

#: NYU depth PNGs of the SC-Depth release: metres = value / 5000 (spec 1.8).
DEPTH_SCALE = 5000.0
#: Folder of the LeReS pseudo-depth PNGs (spec 1.4).
PSEUDO_DEPTH_DIR = "leres_depth"
FRAME_INDEX_FILE = "frame_index.txt"
POSES_FILE = "poses.txt"
_POSES_WHAT = (
    "poses.txt (one line of 12 numbers per frame: the top 3x4 rows of camera-to-world, OpenCV "
    "axes x right / y down / z forward, metres)"
)
_POSES_HINT = (
    "known-pose training (pose.source=poses) and pose validation read it; convert ScanNet, "
    "ARKit or TUM poses with mesadepth.data.video.poses_from_*, or use pose.source=posenet"
)

Sample = dict[str, Any]


# ----------------------------------------------------------------------------- writers


def write_video_scene(
    scene_dir: PathLike,
    frames: np.ndarray,
    K: np.ndarray,
    depths_m: np.ndarray | None = None,
    poses: np.ndarray | None = None,
    jpeg_quality: int = 95,
    pseudo_depths: np.ndarray | None = None,
    pseudo_depth_dir: str = PSEUDO_DEPTH_DIR,
) -> None:
    """Write one scene in the SC-Depth layout (spec 1.1, 4.1); every file is written atomically.

    ``frames`` (N, H, W, 3) uint8 -> ``%07d.jpg``; ``K`` (3, 3) -> ``cam.txt``; ``depths_m``
    (N, H, W) metres -> ``depth/%07d.png`` = uint16(metres x 5000), truncated; ``poses``
    (N, 4, 4) camera-to-world -> ``poses.txt`` (N lines, the top 3x4 rows, row-major, written
    with 17 significant digits so they read back bit-exactly); ``pseudo_depths`` (N, H, W) raw
    values in [0, 65535] -> ``<pseudo_depth_dir>/%07d.png`` (rounded to uint16).
    The folder should be new: stale frames from an earlier, longer scene would be collected too.
    """
    scene_dir = Path(scene_dir)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"write_video_scene: frames must be (N, H, W, 3) uint8, got {frames.dtype} {frames.shape}"
        )
    n, h, w, _ = frames.shape
    if n == 0:
        raise ValueError("write_video_scene: no frames")

    def _check(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.shape != shape:
            raise ValueError(f"write_video_scene: {name} must have shape {shape}, got {arr.shape}")
        return arr

    if depths_m is not None:
        depths_m = _check("depths_m", depths_m, (n, h, w))
    if poses is not None:
        poses = _check("poses", poses, (n, 4, 4)).astype(np.float64)
        if not np.all(np.isfinite(poses)):
            raise ValueError("write_video_scene: poses contain NaN/inf")
    if pseudo_depths is not None:
        pseudo_depths = np.rint(_check("pseudo_depths", pseudo_depths, (n, h, w)))
        if pseudo_depths.min() < 0 or pseudo_depths.max() > 65535:
            raise ValueError("write_video_scene: pseudo_depths must lie in [0, 65535]")
    for i in range(n):
        write_jpeg(scene_dir / f"{i:07d}.jpg", frames[i], quality=jpeg_quality)
        if depths_m is not None:
            write_png(
                scene_dir / "depth" / f"{i:07d}.png", encode_depth_png(depths_m[i], DEPTH_SCALE)
            )
        if pseudo_depths is not None:
            write_png(
                scene_dir / pseudo_depth_dir / f"{i:07d}.png", pseudo_depths[i].astype(np.uint16)
            )
    write_cam_txt(scene_dir / "cam.txt", K)
    if poses is not None:
        write_poses(scene_dir / POSES_FILE, poses)


def write_poses(path: PathLike, poses: np.ndarray) -> None:
    """Write ``poses.txt``: (N, 3|4, 4) camera-to-world -> N lines of the top 3x4 rows,
    row-major, with 17 significant digits (they read back bit-exactly); written atomically."""
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] not in ((3, 4), (4, 4)) or not len(poses):
        raise ValueError(f"write_poses: expected (N, 3|4, 4) poses, got {poses.shape}")
    if not np.all(np.isfinite(poses)):
        raise ValueError("write_poses: poses contain NaN/inf")
    lines = [" ".join(f"{v:.17g}" for v in p[:3].reshape(-1)) for p in poses]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_scene_list(path: PathLike, names: Sequence[str]) -> None:
    """Write ``train.txt`` / ``val.txt``: one name per line, EVERY line ending in ``"\\n"``.

    The reference chops the last character of each line (pitfall 18), so the final newline is
    mandatory; names with whitespace or line breaks are refused.
    """
    names = list(names)
    if not names:
        raise ValueError(f"write_scene_list: no scene names for {path}")
    for name in names:
        if not name or any(c.isspace() for c in name) or "/" in name:
            raise ValueError(f"write_scene_list: invalid scene folder name {name!r}")
    atomic_write_text(path, "".join(f"{name}\n" for name in names))


def write_test_folder(
    testing_dir: PathLike,
    images: np.ndarray,
    depths_m: np.ndarray,
    ext: str = "jpg",
    jpeg_quality: int = 95,
) -> None:
    """Write ``testing/color/%05d.<ext>`` and ``testing/depth/%05d.png`` (metres x 5000).

    ``testing_dir`` is the ``testing`` folder itself; ``ext`` is ``"jpg"`` or ``"png"``
    (lossless). ``depths_m`` may hold zeros (no measurement).
    """
    testing_dir = Path(testing_dir)
    images = np.asarray(images)
    depths_m = np.asarray(depths_m)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"write_test_folder: images must be (N, H, W, 3) uint8, got {images.shape}"
        )
    if depths_m.shape != images.shape[:3]:
        raise ValueError(
            f"write_test_folder: depths_m must be {images.shape[:3]}, got {depths_m.shape}"
        )
    if ext not in ("jpg", "png"):
        raise ValueError(f"write_test_folder: ext must be 'jpg' or 'png', got {ext!r}")
    for i in range(images.shape[0]):
        colour = testing_dir / "color" / f"{i:05d}.{ext}"
        if ext == "jpg":
            write_jpeg(colour, images[i], quality=jpeg_quality)
        else:
            write_png(colour, images[i])
        write_png(
            testing_dir / "depth" / f"{i:05d}.png", encode_depth_png(depths_m[i], DEPTH_SCALE)
        )


# ----------------------------------------------------------------------------- pose converters

#: Right-multiplying a camera-to-world pose by this flips its camera's y and z axes: OpenGL /
#: ARKit camera axes (x right, y up, z backward) <-> OpenCV's (x right, y down, z forward).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def _rigid(poses: np.ndarray, name: str) -> np.ndarray:
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] not in ((3, 4), (4, 4)):
        raise ValueError(f"{name}: expected (N, 3|4, 4) poses, got {poses.shape}")
    out = np.tile(np.eye(4), (len(poses), 1, 1))
    out[:, :3] = poses[:, :3]
    return out


def poses_from_scannet(files: Sequence[PathLike]) -> np.ndarray:
    """ScanNet ``pose/<frame>.txt`` files -> (N, 4, 4) camera-to-world for :func:`write_poses`.

    Each file holds a 4x4 camera-to-world matrix (OpenCV camera axes, metres): the top 3 rows
    are what ``poses.txt`` stores, unchanged. ScanNet writes ``-inf`` where tracking was lost;
    such a file (or one without 16 finite numbers) raises :class:`DataError` naming it: drop
    those frames from the scene (frames and poses stay paired by sorted order).
    """
    out = []
    for f in files:
        rows = read_list_file(f, 4, "ScanNet pose (4 lines of 4 numbers: camera-to-world)")
        try:
            vals = np.array([float(x) for row in rows for x in row], dtype=np.float64)
        except ValueError as exc:
            raise DataError(f, f"non-numeric value: {exc}") from exc
        if vals.size != 16:
            raise DataError(f, f"expected 16 numbers (a 4x4 matrix), found {vals.size}")
        if not np.all(np.isfinite(vals)):
            raise DataError(f, "NaN/inf in pose (ScanNet marks lost tracking so): drop the frame")
        out.append(vals.reshape(4, 4))
    if not out:
        raise ValueError("poses_from_scannet: no pose file given")
    return _rigid(np.stack(out), "poses_from_scannet")


def poses_from_arkit(cam_to_world_gl: np.ndarray) -> np.ndarray:
    """ARKit camera transforms -> OpenCV-axes camera-to-world (N, 4, 4).

    ARKit's ``ARCamera.transform`` is camera-to-world with the OpenGL camera axes (x right,
    y up, z backward, metres); the camera axes change by a right-multiplication with
    :data:`OPENGL_TO_OPENCV` = diag(1, -1, -1, 1) (the world frame is kept).
    """
    return _rigid(cam_to_world_gl, "poses_from_arkit") @ OPENGL_TO_OPENCV


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4) in (qx, qy, qz, qw) order (TUM's) -> rotations (..., 3, 3).

    The quaternion is normalised first (files store ~7 digits).
    """
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def poses_from_tum(
    path: PathLike, frame_times: Sequence[float], max_dt: float = 0.02
) -> np.ndarray:
    """A TUM RGB-D trajectory -> the (N, 4, 4) camera-to-world pose of each frame time.

    ``path``: lines ``timestamp tx ty tz qx qy qz qw`` (camera-to-world, the colour camera's
    optical frame = OpenCV axes, metres; ``#`` lines are comments), e.g. ``groundtruth.txt``.
    Each of ``frame_times`` (seconds, e.g. the rgb.txt timestamps of the frames kept) takes the
    pose of the nearest timestamp, which must lie within ``max_dt`` seconds (TUM's
    ``associate.py`` default 0.02); otherwise :class:`DataError` names the file and the frame.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "TUM trajectory (timestamp tx ty tz qx qy qz qw per line)")
    stamps, vals = [], []
    for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 8:
            raise DataError(
                path,
                f"line {lineno}: expected 8 numbers (timestamp tx ty tz qx qy qz qw), "
                f"found {len(fields)}",
            )
        try:
            row = [float(x) for x in fields]
        except ValueError as exc:
            raise DataError(path, f"line {lineno}: non-numeric value: {exc}") from exc
        if not np.all(np.isfinite(row)) or not np.linalg.norm(row[4:]) > 0:
            raise DataError(path, f"line {lineno}: NaN/inf or zero quaternion")
        stamps.append(row[0])
        vals.append(row[1:])
    if not stamps:
        raise DataError(path, "no pose line")
    order = np.argsort(stamps, kind="stable")
    t = np.asarray(stamps)[order]
    v = np.asarray(vals)[order]
    times = np.asarray(frame_times, dtype=np.float64)
    # Nearest timestamp: the neighbour on either side of each frame time's insertion point.
    right = np.clip(np.searchsorted(t, times), 0, len(t) - 1)
    left = np.clip(right - 1, 0, len(t) - 1)
    pick = np.where(np.abs(t[left] - times) <= np.abs(t[right] - times), left, right)
    gap = np.abs(t[pick] - times)
    if np.any(gap > max_dt):
        j = int(np.argmax(gap > max_dt))
        raise DataError(
            path,
            f"frame {j} (time {times[j]:.6f}) has no pose within max_dt={max_dt} s (nearest "
            f"{t[pick[j]]:.6f})",
        )
    out = np.tile(np.eye(4), (len(times), 1, 1))
    out[:, :3, :3] = quaternion_to_rotation(v[pick, 3:])
    out[:, :3, 3] = v[pick, :3]
    return out


# ----------------------------------------------------------------------------- readers


def read_scene_list(path: PathLike, faithful_chop: bool = False) -> list[str]:
    """Read ``train.txt`` / ``val.txt`` (spec 1.1, pitfall 18).

    Default: each line stripped of surrounding whitespace, blank lines ignored, a missing final
    newline tolerated. ``faithful_chop=True`` reproduces the reference: the last character of
    every line is dropped (meant to be the ``"\\n"``), so a final line without newline loses a
    real character (``"beta"`` -> ``"bet"``); a line that becomes empty is refused.
    A ``"\\r"`` anywhere (CRLF files would make the reference look for ``"scene\\r"``) or a list
    without any name raises :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "scene list (one scene folder name per line)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"expected a UTF-8 scene list: {exc}") from exc
    if "\r" in text:
        lineno = text[: text.index("\r")].count("\n") + 1
        raise DataError(
            path,
            f"line {lineno} contains '\\r' (CRLF line ends); expected plain '\\n' line ends, "
            "which the reference needs (it chops one character per line)",
        )
    names: list[str] = []
    if faithful_chop:
        # Python's file iteration yields lines that keep their "\n" (the last one may lack it);
        # the reference then takes line[:-1].
        parts = text.split("\n")
        lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        for lineno, line in enumerate(lines, start=1):
            name = line[:-1]
            if not name:
                raise DataError(path, f"line {lineno} gives an empty scene name after the chop")
            names.append(name)
    else:
        names = [line.strip() for line in text.split("\n") if line.strip()]
    if not names:
        raise DataError(path, "scene list is empty; expected one scene folder name per line")
    return names


def read_frame_index(path: PathLike, n_frames: int) -> list[int]:
    """Read ``frame_index.txt``: one 0-based integer per line, each in [0, n_frames) (spec 1.3)."""
    path = Path(path)
    rows = read_list_file(path, 1, "frame_index.txt (one 0-based frame index per line)")
    out: list[int] = []
    for lineno, row in enumerate(rows, start=1):
        if len(row) != 1:
            raise DataError(path, f"entry {lineno}: expected one integer per line, found {row}")
        try:
            j = int(row[0])
        except ValueError as exc:
            raise DataError(path, f"entry {lineno}: expected an integer, found {row[0]!r}") from exc
        # The reference would let Python wrap a negative index silently; refuse it instead.
        if not 0 <= j < n_frames:
            raise DataError(
                path, f"entry {lineno}: frame index {j} out of range [0, {n_frames}) for this scene"
            )
        out.append(j)
    return out


def _sorted_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    # Case-sensitive suffix match like the reference's glob, minus hidden files (see module doc).
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith(".")
    )


def snippet_indices(
    n_frames: int, sequence_length: int = 3, skip: int = 1
) -> list[tuple[int, list[int]]]:
    """Target and reference positions of every snippet of an ``n_frames`` scene (spec 1.2, 4.2).

    d = (L - 1) // 2; reference offsets (-d k, ..., -k, +k, ..., +d k) in that order; targets
    i = d k, ..., n - d k - 1. A scene gives no snippet unless n > L **strictly** (the reference
    skips n < L and its index generator then requires n > L, so n = L also gives none).
    """
    if sequence_length < 3:
        raise ConfigError(
            f"sequence_length must be >= 3 (a target and two refs), got {sequence_length}"
        )
    if skip < 1:
        raise ConfigError(f"skip_frames must be >= 1, got {skip}")
    d = (sequence_length - 1) // 2
    offsets = [-j * skip for j in range(d, 0, -1)] + [j * skip for j in range(1, d + 1)]
    if n_frames <= sequence_length:
        return []
    return [(i, [i + o for o in offsets]) for i in range(d * skip, n_frames - d * skip)]


class VideoScene:
    """One scene folder of the SC-Depth layout.

    ``all_frames``: every ``*.jpg`` sorted by name; ``frame_ids``: the kept positions (all, or
    ``frame_index.txt`` when ``use_frame_index``); ``frames``: the kept files. Every per-frame
    accessor (:meth:`frame`, :meth:`pseudo_depth`, :meth:`depth`, :meth:`poses`) is indexed by
    position in ``frames``. Construction reads ``cam.txt`` (:class:`MissingFileError` if absent,
    :class:`DataError` if not a 3x3 intrinsics matrix), when ``pseudo_depth`` names a folder,
    checks that it holds exactly one PNG per ``*.jpg`` (spec 1.4), and with ``poses`` reads
    ``poses.txt`` into ``cam_to_world`` (:meth:`poses` with the rotation check), so a bad pose
    file fails when the dataset opens, not mid-epoch.
    """

    def __init__(
        self,
        path: PathLike,
        pseudo_depth: str | None = None,
        use_frame_index: bool = False,
        poses: bool = False,
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_dir():
            raise MissingFileError(self.path, "scene folder")
        self.all_frames = _sorted_files(self.path, (".jpg",))
        if not self.all_frames:
            raise DataError(self.path, "scene folder holds no *.jpg frame")
        self.K = read_cam_txt(self.path / "cam.txt")
        n_all = len(self.all_frames)
        if use_frame_index:
            self.frame_ids = read_frame_index(self.path / FRAME_INDEX_FILE, n_all)
        else:
            self.frame_ids = list(range(n_all))
        self.frames = [self.all_frames[j] for j in self.frame_ids]
        self.pseudo_depth_files: list[Path] | None = None
        if pseudo_depth is not None:
            folder = self.path / pseudo_depth
            if not folder.is_dir():
                raise MissingFileError(folder, "pseudo-depth folder (one 16-bit PNG per *.jpg)")
            pngs = _sorted_files(folder, (".png",))
            if len(pngs) != n_all:
                raise DataError(
                    folder,
                    f"found {len(pngs)} pseudo-depth PNG(s) for {n_all} *.jpg frame(s); expected "
                    "one per frame (they are matched by sorted order)",
                )
            self.pseudo_depth_files = [pngs[j] for j in self.frame_ids]
        self._depth_files: list[Path] | None = None
        self.cam_to_world = self.poses(check_rotation=True) if poses else None

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as (H, W, 3) uint8 RGB; a truncated JPEG raises DataError naming it."""
        return read_rgb(self.frames[i])

    def pseudo_depth(self, i: int) -> np.ndarray:
        """Raw pseudo-depth of frame ``i`` as float32 (values as stored, e.g. 0..60000; pitfall 10)."""
        if self.pseudo_depth_files is None:
            raise ConfigError(f"{self.path}: scene opened without a pseudo-depth folder")
        path = self.pseudo_depth_files[i]
        raw = read_png_uint16(path, "16-bit pseudo-depth PNG")
        return raw.astype(np.float32)

    def depth_files(self) -> list[Path]:
        """``depth/*.png`` sorted, one per ``*.jpg`` (DataError naming the folder otherwise)."""
        if self._depth_files is None:
            folder = self.path / "depth"
            if not folder.is_dir():
                raise MissingFileError(folder, "ground-truth depth folder (16-bit PNG, m x 5000)")
            pngs = _sorted_files(folder, (".png",))
            if len(pngs) != len(self.all_frames):
                raise DataError(
                    folder,
                    f"found {len(pngs)} depth PNG(s) for {len(self.all_frames)} *.jpg frame(s); "
                    "expected one per frame (they are matched by sorted order)",
                )
            self._depth_files = pngs
        return [self._depth_files[j] for j in self.frame_ids]

    def depth(self, i: int) -> np.ndarray:
        """Ground-truth depth of frame ``i`` in metres (PNG value / 5000), float32."""
        return read_depth_png(self.depth_files()[i], DEPTH_SCALE, "16-bit depth PNG (m x 5000)")

    def poses(self, check_rotation: bool = False) -> np.ndarray:
        """Camera-to-world poses from ``poses.txt`` as (len(self), 4, 4) float64.

        One line of 12 numbers per ``*.jpg`` (all of them, before the frame_index filter):
        the top 3x4 rows of camera-to-world, OpenCV axes, metres (module docstring). A missing
        file, fewer or more lines than frames, or a line without exactly 12 finite numbers
        raise :class:`DataError` naming the file (hence the scene) and the line; so does, with
        ``check_rotation``, a 3x3 block that is not a rotation (|R R^T - I| > 1e-3 or det < 0).
        """
        path = self.path / POSES_FILE
        if not path.is_file():
            raise MissingFileError(path, _POSES_WHAT, _POSES_HINT)
        try:
            text = path.read_text(encoding="ascii")
        except UnicodeDecodeError as exc:
            raise DataError(path, f"expected an ASCII {_POSES_WHAT}: {exc}") from exc
        n = len(self.all_frames)
        out = np.zeros((n, 4, 4), dtype=np.float64)
        out[:, 3, 3] = 1.0
        count = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue  # blank lines (a trailing one, say) carry no pose
            if count == n:
                raise DataError(
                    path,
                    f"line {lineno}: pose {count + 1}, but the scene has {n} *.jpg frame(s); "
                    "expected exactly one pose line per frame",
                )
            if len(fields) != 12:
                raise DataError(
                    path,
                    f"line {lineno}: expected 12 numbers (top 3x4 rows of camera-to-world), "
                    f"found {len(fields)}",
                )
            try:
                vals = np.array([float(f) for f in fields], dtype=np.float64)
            except ValueError as exc:
                raise DataError(path, f"line {lineno}: non-numeric value: {exc}") from exc
            if not np.all(np.isfinite(vals)):
                raise DataError(
                    path,
                    f"line {lineno}: NaN/inf in pose (ScanNet marks lost tracking with -inf: "
                    "drop those frames or fill their poses)",
                )
            rot = vals.reshape(3, 4)[:, :3]
            bad = np.abs(rot @ rot.T - np.eye(3)).max() > 1e-3 or np.linalg.det(rot) < 0
            if check_rotation and bad:
                raise DataError(
                    path,
                    f"line {lineno}: the 3x3 block is not a rotation (R R^T != I or det < 0); "
                    "expected camera-to-world with unscaled, right-handed axes",
                )
            out[count, :3] = vals.reshape(3, 4)
            count += 1
        if count < n:
            raise DataError(
                path,
                f"{count} pose line(s) for {n} *.jpg frame(s): line {count + 1} (the pose of "
                f"{self.all_frames[count].name}) and after are missing; expected one line per frame",
            )
        return out[self.frame_ids]


# ----------------------------------------------------------------------------- datasets


def _accepts_rng(transform: Callable[..., Any]) -> bool:
    """Whether ``transform`` can be called as ``transform(sample, rng)``."""
    try:
        params = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class _SceneDataset(Dataset):
    """Shared machinery: scene list, per-item generator, transform call, skip-and-count."""

    def __init__(
        self,
        root: PathLike,
        split: str,
        transform: Callable[..., Sample] | None,
        on_error: str,
        seed: int,
    ) -> None:
        if split not in ("train", "val"):
            raise ConfigError(
                f"{type(self).__name__}: split must be 'train' or 'val', got {split!r}"
            )
        self.root = Path(root)
        self.split = split
        self.list_file = self.root / "training" / f"{split}.txt"
        self.transform = transform
        self._transform_takes_rng = transform is not None and _accepts_rng(transform)
        self.bad = BadSamples(on_error)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (they depend on seed, epoch and index only)."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        """The generator of item ``index``: reproducible and independent of worker count.

        Replaces the reference's global reseeding (pitfall 20): no global RNG is touched.
        """
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _open_scenes(self, **scene_kwargs: Any) -> list[VideoScene]:
        names = read_scene_list(self.list_file)
        scenes: list[VideoScene] = []
        for name in names:
            scene_dir = self.list_file.parent / name
            try:
                if not scene_dir.is_dir():
                    raise DataError(
                        self.list_file,
                        f"names scene folder {name!r}, but {scene_dir} is not a folder",
                    )
                scenes.append(VideoScene(scene_dir, **scene_kwargs))
            except DataError as err:
                self.bad.handle(err)  # raises unless on_error == "skip"
        if self.bad.total:
            warnings.warn(f"{self.list_file}: {self.bad.summary()}", stacklevel=3)
        return scenes

    def _load(self, k: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, k: int) -> Sample:
        # An unreadable item is replaced by the next readable one (skip mode); the augmentation
        # stays seeded by the requested index.
        sample = self.bad.load(k, len(self), self._load, self.list_file)
        if self.transform is None:
            return sample
        if self._transform_takes_rng:
            return self.transform(sample, self.rng_for(k))
        return self.transform(sample)


class VideoSnippetDataset(_SceneDataset):
    """Target + reference frames from the scenes of ``training/<split>.txt`` (spec 1.2-1.4).

    Sample: ``image`` (H, W, 3) uint8 target, ``refs`` [ref arrays] in offset order, ``K``
    (3, 3) float32, ``pseudo_depth`` (H, W) float32 raw (when ``pseudo_depth`` names a folder),
    ``motion`` (R, 4, 4) float64 (with ``poses``: the true target -> reference motion of each
    reference from ``poses.txt``, ``X_r = R X_t + t`` in metres, what PoseNet(I_t, I_r)
    predicts; :func:`mesadepth.geometry.relative_pose`), ``scene``, ``index`` (the target's
    position among the scene's sorted ``*.jpg``, i.e. before the frame_index filter),
    ``ref_indices`` (same numbering), ``name`` (``scene/file stem``).

    ``transform`` is called once per sample as ``transform(sample, rng)`` (or ``transform(sample)``
    if it takes one argument), so all frames share its draws; ``rng`` comes from
    :meth:`rng_for` (seed, epoch, index). With ``on_error="skip"`` an unreadable snippet is
    replaced by the next one (wrapping around) and counted in ``self.bad``; scenes that cannot
    be opened (with ``poses``: also those whose ``poses.txt`` is missing or malformed) are
    dropped and counted.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        sequence_length: int = 3,
        skip_frames: int = 1,
        use_frame_index: bool = False,
        pseudo_depth: str | None = None,
        transform: Callable[..., Sample] | None = None,
        on_error: str = "raise",
        seed: int = 0,
        poses: bool = False,
    ) -> None:
        super().__init__(root, split, transform, on_error, seed)
        self.sequence_length = sequence_length
        self.skip_frames = skip_frames
        self.use_pseudo_depth = pseudo_depth is not None
        self.use_poses = poses
        snippet_indices(sequence_length + 1, sequence_length, skip_frames)  # validates L and k
        self.scenes = self._open_scenes(
            pseudo_depth=pseudo_depth, use_frame_index=use_frame_index, poses=poses
        )
        self.samples: list[tuple[int, int, list[int]]] = []
        for s, scene in enumerate(self.scenes):
            for target, refs in snippet_indices(len(scene), sequence_length, skip_frames):
                self.samples.append((s, target, refs))
        if not self.samples:
            raise DataError(
                self.list_file,
                f"no snippet: every listed scene has <= {sequence_length} frames "
                f"(sequence_length={sequence_length}, skip_frames={skip_frames})",
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, k: int) -> Sample:
        s, target, refs = self.samples[k]
        scene = self.scenes[s]
        image = scene.frame(target)
        ref_images = []
        for r in refs:
            ref = scene.frame(r)
            if ref.shape != image.shape:
                raise DataError(
                    scene.frames[r],
                    f"frame is {ref.shape[:2]}, expected the target's size {image.shape[:2]}",
                )
            ref_images.append(ref)
        sample: Sample = {
            "image": image,
            "refs": ref_images,
            "K": scene.K.copy(),
            "scene": scene.name,
            "index": scene.frame_ids[target],
            "ref_indices": [scene.frame_ids[r] for r in refs],
            "name": f"{scene.name}/{scene.frames[target].stem}",
        }
        if self.use_pseudo_depth:
            pd = scene.pseudo_depth(target)
            if pd.shape != image.shape[:2]:
                raise DataError(
                    scene.pseudo_depth_files[target],  # type: ignore[index]
                    f"pseudo-depth is {pd.shape}, expected the frame's size {image.shape[:2]}",
                )
            sample["pseudo_depth"] = pd
        if self.use_poses:
            cams = scene.cam_to_world
            assert cams is not None
            # relative_pose: inv(cam_to_world_ref) @ cam_to_world_target, in float64.
            sample["motion"] = np.stack([np.linalg.inv(cams[r]) @ cams[target] for r in refs])
        return sample


class VideoDepthDataset(_SceneDataset):
    """Depth-mode validation (spec 1.7): every frame of the ``split`` scenes with its GT depth.

    Sample: ``image`` (H, W, 3) uint8, ``depth`` (H, W) float32 metres (``depth/*.png`` / 5000,
    matched by sorted order; a count mismatch raises :class:`DataError`), ``K``, ``scene``,
    ``index`` (position among the sorted ``*.jpg``), ``name``. The frame_index filter is not
    applied (the reference's validation set does not use it).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        transform: Callable[..., Sample] | None = None,
        on_error: str = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__(root, split, transform, on_error, seed)
        self.scenes = []
        for scene in self._open_scenes():
            try:
                scene.depth_files()  # count check now, not in the middle of an epoch
            except DataError as err:
                self.bad.handle(err)  # raises unless on_error == "skip": then drop the scene
                continue
            self.scenes.append(scene)
        self.items: list[tuple[int, int]] = []
        for s, scene in enumerate(self.scenes):
            self.items.extend((s, i) for i in range(len(scene)))
        if not self.items:
            raise DataError(self.list_file, "no frame in the listed scenes")

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, k: int) -> Sample:
        s, i = self.items[k]
        scene = self.scenes[s]
        image = scene.frame(i)
        depth = scene.depth(i)
        if depth.shape != image.shape[:2]:
            raise DataError(
                scene.depth_files()[i],
                f"depth is {depth.shape}, expected the frame's size {image.shape[:2]}",
            )
        return {
            "image": image,
            "depth": depth,
            "K": scene.K.copy(),
            "scene": scene.name,
            "index": scene.frame_ids[i],
            "name": f"{scene.name}/{scene.frames[i].stem}",
        }


class VideoTestDataset(Dataset):
    """``testing/color`` (``*.jpg`` and ``*.png`` sorted together) with ``testing/depth/*.png``
    (metres = value / 5000), paired by sorted order (spec 1.1, 4.1).

    Sample: ``image`` (H, W, 3) uint8, ``depth`` (H, W) float32 metres, ``index``, ``name``
    (the colour file's stem). ``transform`` as in :class:`VideoSnippetDataset`.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Callable[..., Sample] | None = None,
        on_error: str = "raise",
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        testing = self.root / "testing"
        color, depth = testing / "color", testing / "depth"
        for folder, what in ((color, "test colour folder"), (depth, "test depth folder")):
            if not folder.is_dir():
                raise MissingFileError(folder, what)
        self.images = _sorted_files(color, (".jpg", ".png"))
        self.depths = _sorted_files(depth, (".png",))
        if not self.images:
            raise DataError(color, "no *.jpg or *.png test image")
        if len(self.images) != len(self.depths):
            raise DataError(
                depth,
                f"found {len(self.depths)} depth PNG(s) for {len(self.images)} test image(s) in "
                f"{color}; expected one per image (matched by sorted order)",
            )
        self.transform = transform
        self._transform_takes_rng = transform is not None and _accepts_rng(transform)
        self.bad = BadSamples(on_error)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, k: int) -> Sample:
        image = read_rgb(self.images[k])
        depth = read_depth_png(self.depths[k], DEPTH_SCALE, "16-bit depth PNG (m x 5000)")
        if depth.shape != image.shape[:2]:
            raise DataError(
                self.depths[k],
                f"depth is {depth.shape}, expected the image's size {image.shape[:2]}",
            )
        return {"image": image, "depth": depth, "index": k, "name": self.images[k].stem}

    def __getitem__(self, k: int) -> Sample:
        sample = self.bad.load(k, len(self), self._load, self.root / "testing")
        if self.transform is None:
            return sample
        if self._transform_takes_rng:
            return self.transform(sample, np.random.default_rng([self.seed, int(k)]))
        return self.transform(sample)


# ----------------------------------------------------------------------------- frame_index.txt


def rgb_to_gray_cv(rgb: np.ndarray) -> np.ndarray:
    """8-bit grey exactly as OpenCV's ``cvtColor(BGR2GRAY)`` computes it for uint8 input.

    OpenCV uses 14-bit fixed-point weights (round(0.299, 0.587, 0.114 x 2^14) = 4899, 9617,
    1868, summing to 2^14) with rounding: (4899 R + 9617 G + 1868 B + 2^13) >> 14.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb_to_gray_cv: expected (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    c = rgb.astype(np.int32)
    y = (4899 * c[..., 0] + 9617 * c[..., 1] + 1868 * c[..., 2] + (1 << 13)) >> 14
    return y.astype(np.uint8)


def changed_fraction(
    last: np.ndarray, cand: np.ndarray, faithful_wrap: bool, threshold: int
) -> float:
    """Fraction of pixels whose grey difference (last kept - candidate) exceeds ``threshold``.

    ``faithful_wrap=True``: the difference is taken on uint8 values, so it wraps (pitfall 8:
    last 5, candidate 6 -> 255, "changed"). ``False``: the absolute signed difference.
    """
    if faithful_wrap:
        diff = last.astype(np.uint8) - cand.astype(np.uint8)  # uint8 arithmetic wraps mod 256
    else:
        diff = np.abs(last.astype(np.int16) - cand.astype(np.int16))
    return float(np.count_nonzero(diff > threshold)) / float(diff.size)


def select_frames(
    grays: Sequence[np.ndarray], faithful_wrap: bool = True, threshold: int = 10, ratio: float = 0.5
) -> list[int]:
    """Spec 1.3 on grey frames: keep 0, then every frame whose changed fraction against the last
    kept frame is >= ``ratio``."""
    if not grays:
        return []
    kept = [0]
    last = grays[0]
    for i in range(1, len(grays)):
        if changed_fraction(last, grays[i], faithful_wrap, threshold) >= ratio:
            kept.append(i)
            last = grays[i]
    return kept


def generate_frame_index(
    scene_dir: PathLike,
    faithful_wrap: bool = True,
    threshold: int = 10,
    ratio: float = 0.5,
    write: bool = False,
) -> list[int]:
    """The reference's static-frame filter over one scene's sorted ``*.jpg`` (spec 1.3).

    Frames are decoded with Pillow (OpenCV's libjpeg may differ by a grey level on some pixels)
    and converted with OpenCV's grey weights (:func:`rgb_to_gray_cv`). ``write=True`` writes
    ``frame_index.txt`` (one integer per line, each ending in ``"\\n"``).
    """
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise MissingFileError(scene_dir, "scene folder")
    files = _sorted_files(scene_dir, (".jpg",))
    if not files:
        raise DataError(scene_dir, "scene folder holds no *.jpg frame")
    grays = []
    for f in files:
        g = rgb_to_gray_cv(read_rgb(f))
        if grays and g.shape != grays[0].shape:
            raise DataError(
                f, f"frame is {g.shape}, expected {grays[0].shape} like {files[0].name}"
            )
        grays.append(g)
    kept = select_frames(grays, faithful_wrap, threshold, ratio)
    if write:
        atomic_write_text(scene_dir / FRAME_INDEX_FILE, "".join(f"{i}\n" for i in kept))
    return kept


def generate_all_frame_indices(root: PathLike, **kwargs: Any) -> dict[str, list[int]]:
    """Run :func:`generate_frame_index` over **every** sub-folder of ``root/training`` holding
    ``*.jpg`` frames (the reference does not restrict itself to train.txt scenes)."""
    training = Path(root) / "training"
    if not training.is_dir():
        raise MissingFileError(training, "training folder")
    out: dict[str, list[int]] = {}
    for sub in sorted(p for p in training.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _sorted_files(sub, (".jpg",)):
            out[sub.name] = generate_frame_index(sub, **kwargs)
    return out


__all__ = [
    "DEPTH_SCALE",
    "OPENGL_TO_OPENCV",
    "POSES_FILE",
    "PSEUDO_DEPTH_DIR",
    "VideoDepthDataset",
    "VideoScene",
    "VideoSnippetDataset",
    "VideoTestDataset",
    "changed_fraction",
    "generate_all_frame_indices",
    "generate_frame_index",
    "poses_from_arkit",
    "poses_from_scannet",
    "poses_from_tum",
    "quaternion_to_rotation",
    "read_frame_index",
    "read_scene_list",
    "rgb_to_gray_cv",
    "select_frames",
    "snippet_indices",
    "write_scene_list",
    "write_test_folder",
    "write_poses",
    "write_video_scene",
]
