"""NYUv2 on disk: the labeled MATLAB v7.3 file, splits.mat, the official test export and the
BTS/MIM "sync" layout with its list files.

Spec: datasets-and-ibims-evaluation.md sections 2 (labeled .mat, splits.mat, 654-image test
set) and 3 (sync layout, list files, official export); masked-pretraining-and-finetuning.md
sections 2.4 and 4 (MIM-Depth loader semantics and list files).

Units: depth arrays are float32 metres (0 = no measurement); depth PNGs are uint16 millimetres
(metres = value / 1000). Images are (H, W, 3) uint8 RGB. Samples follow the dict convention of
:mod:`mesadepth.data`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import h5py
import numpy as np
import scipy.io
from torch.utils.data import Dataset

from mesadepth.errors import BadSamples, ConfigError, DataError, MissingFileError
from mesadepth.io import (
    PathLike,
    atomic_path,
    atomic_write_text,
    check_depth,
    encode_depth_png,
    read_depth_png,
    read_list_file,
    read_rgb,
    write_jpeg,
    write_png,
)

__all__ = [
    "BTS_FOCAL",
    "DEPTH_PNG_SCALE",
    "NYULabeledDataset",
    "NYULabeledMat",
    "NYUSyncDataset",
    "export_official_splits",
    "official_border",
    "read_pair_list",
    "read_splits_mat",
    "write_nyu_labeled_mat",
    "write_pair_list",
    "write_splits_mat",
    "write_sync_pair",
]

DEPTH_PNG_SCALE = 1000.0
"""Sync / official_splits depth PNGs hold millimetres (spec 3.1, 3.5)."""

BTS_FOCAL = 518.8579
"""The focal length on every line of the BTS list files (spec 3.2)."""

Transform = Callable[[dict[str, Any]], dict[str, Any]]

_MAT_HEADER_TEXT = (
    "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: mesadepth HDF5 schema 1.00 ."
)
_USERBLOCK = 512
# Deflate is what MATLAB itself uses, so the file stays readable by MATLAB and plain HDF5 tools.
_GZIP_LEVEL = 3

# Frame variables: name -> (MATLAB class, whether the frame has a channel axis).
_FRAME_VARS = {
    "images": ("uint8", True),
    "depths": ("single", False),
    "rawDepths": ("single", False),
    "labels": ("uint16", False),
    "instances": ("uint8", False),
}
_REQUIRED = ("images", "depths", "rawDepths", "sceneTypes")


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _mat_header() -> bytes:
    """The 128-byte MAT-file header MATLAB puts at the start of the HDF5 userblock."""
    text = _MAT_HEADER_TEXT.encode("ascii").ljust(116, b" ")
    # 8 bytes subsystem offset (none), version 0x0200 little-endian, endian indicator "IM".
    return text + b"\x00" * 8 + b"\x00\x02" + b"IM"


def _set_class(obj: h5py.Dataset | h5py.Group, matlab_class: str) -> None:
    obj.attrs.create("MATLAB_class", np.bytes_(matlab_class))


def _write_cellstr(f: h5py.File, refs: h5py.Group, name: str, strings: Sequence[str]) -> None:
    """Write a MATLAB N x 1 cell of char row vectors: (1, N) references to (len, 1) uint16."""
    ds = f.create_dataset(name, shape=(1, len(strings)), dtype=h5py.ref_dtype)
    for j, s in enumerate(strings):
        if not isinstance(s, str) or not s:
            raise ValueError(
                f"write_nyu_labeled_mat: {name}[{j}] must be a non-empty str, got {s!r}"
            )
        codes = np.array([ord(ch) for ch in s], dtype=np.uint16).reshape(-1, 1)
        if any(ord(ch) > 0xFFFF for ch in s):
            raise ValueError(f"write_nyu_labeled_mat: {name}[{j}] has characters beyond UTF-16 BMP")
        target = refs.create_dataset(f"{name}_{j}", data=codes)
        _set_class(target, "char")
        target.attrs.create("MATLAB_int_decode", np.int32(2))
        ds[0, j] = target.ref
    _set_class(ds, "cell")


def _checked(array: Any, dtype: type, ndim: int, what: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != ndim:
        raise ValueError(f"write_nyu_labeled_mat: {what} must be {ndim}-D, got shape {arr.shape}")
    target = np.dtype(dtype)
    if target.kind == "f":
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"write_nyu_labeled_mat: {what} must be numeric, got {arr.dtype}")
        return arr.astype(target, copy=False)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"write_nyu_labeled_mat: {what} must be integer, got {arr.dtype}")
    info = np.iinfo(target)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"write_nyu_labeled_mat: {what} values do not fit {target}")
    return arr.astype(target, copy=False)


def write_nyu_labeled_mat(
    path: PathLike,
    images: np.ndarray,
    depths: np.ndarray,
    raw_depths: np.ndarray,
    labels: np.ndarray,
    instances: np.ndarray,
    scene_types: Sequence[str],
    scenes: Sequence[str],
    names: Sequence[str],
    accel: np.ndarray | None = None,
) -> None:
    """Write ``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 (HDF5 + 512-byte userblock), spec 2.1-2.2.

    Inputs in NumPy order: ``images`` (N, H, W, 3) uint8; ``depths`` / ``raw_depths`` (N, H, W)
    metres (stored float32); ``labels`` (N, H, W) uint16; ``instances`` (N, H, W) uint8;
    ``scene_types`` / ``scenes`` N strings; ``names`` the class names; ``accel`` (N, 4) or None
    (zeros). On disk every axis list is reversed as MATLAB does: ``images`` (N, 3, W, H), depth
    maps (N, W, H), ``accelData`` (4, N), cells (1, N) object references into ``#refs#``.
    Each frame is one deflate chunk so reading a frame touches one chunk.
    """
    images = _checked(images, np.uint8, 4, "images")
    n, h, w, c = images.shape
    if c != 3:
        raise ValueError(f"write_nyu_labeled_mat: images must be (N, H, W, 3), got {images.shape}")
    frames = {
        "images": images.transpose(0, 3, 2, 1),
        "depths": _checked(depths, np.float32, 3, "depths"),
        "rawDepths": _checked(raw_depths, np.float32, 3, "raw_depths"),
        "labels": _checked(labels, np.uint16, 3, "labels"),
        "instances": _checked(instances, np.uint8, 3, "instances"),
    }
    for key in ("depths", "rawDepths", "labels", "instances"):
        if frames[key].shape != (n, h, w):
            raise ValueError(
                f"write_nyu_labeled_mat: {key} must be {(n, h, w)}, got {frames[key].shape}"
            )
        frames[key] = frames[key].transpose(0, 2, 1)
    if len(scene_types) != n or len(scenes) != n:
        raise ValueError(
            f"write_nyu_labeled_mat: need {n} scene_types and scenes, "
            f"got {len(scene_types)} and {len(scenes)}"
        )
    accel_arr = np.zeros((n, 4), np.float32) if accel is None else np.asarray(accel, np.float32)
    if accel_arr.shape != (n, 4):
        raise ValueError(f"write_nyu_labeled_mat: accel must be ({n}, 4), got {accel_arr.shape}")

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as f:
            for key, data in frames.items():
                ds = f.create_dataset(
                    key,
                    data=data,
                    chunks=(1, *data.shape[1:]),
                    compression="gzip",
                    compression_opts=_GZIP_LEVEL,
                )
                _set_class(ds, _FRAME_VARS[key][0])
            _set_class(f.create_dataset("accelData", data=accel_arr.T), "single")
            refs = f.create_group("#refs#")
            _write_cellstr(f, refs, "sceneTypes", list(scene_types))
            _write_cellstr(f, refs, "scenes", list(scenes))
            _write_cellstr(f, refs, "names", list(names))
        # HDF5 leaves the userblock zero-filled and never touches it again; MATLAB identifies
        # its v7.3 files by this header.
        with open(tmp, "r+b") as fh:
            fh.write(_mat_header())


def write_splits_mat(
    path: PathLike, train_ndxs: Sequence[int] | np.ndarray, test_ndxs: Sequence[int] | np.ndarray
) -> None:
    """Write ``splits.mat`` (MATLAB v5, spec 2.4): ``trainNdxs`` / ``testNdxs`` as (n, 1) uint16.

    The inputs are the **1-based** frame numbers as stored (MATLAB numbering); a 0 is refused
    because it almost always means 0-based indices were passed.
    """
    arrays = {}
    for key, values in (("trainNdxs", train_ndxs), ("testNdxs", test_ndxs)):
        arr = np.asarray(values).reshape(-1)
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 1 or arr.max() > 65535):
            raise ValueError(
                f"write_splits_mat: {key} must hold 1-based integer frame numbers in [1, 65535]"
            )
        arrays[key] = arr.astype(np.uint16).reshape(-1, 1)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        scipy.io.savemat(fh, arrays, format="5")


def official_border(h: int, w: int) -> tuple[int, int, int, int]:
    """Kept window ``(r0, r1, c0, c1)`` of the official test export (spec 3.3, pitfall 16).

    At 480 x 640 this is rows [7:474), columns [7:632); everything outside is set to black.
    Other sizes scale each bound proportionally and round half up:
    ``r0 = round(7 h / 480)``, ``r1 = round(474 h / 480)``, ``c0 = round(7 w / 640)``,
    ``c1 = round(632 w / 640)``.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"official_border: size must be positive, got {h} x {w}")

    def scaled(bound: int, size: int, ref: int) -> int:
        # integer round-half-up, so the rule does not depend on float or banker's rounding
        return (2 * bound * size + ref) // (2 * ref)

    return scaled(7, h, 480), scaled(474, h, 480), scaled(7, w, 640), scaled(632, w, 640)


def _raw_to_mm(raw_m: np.ndarray, path: PathLike, what: str) -> np.ndarray:
    """``uint16(rawDepths * 1000)`` as the reference export computes it (float32, truncated)."""
    finite = np.isfinite(raw_m)
    if not np.all(finite):
        n_bad = int(raw_m.size - np.count_nonzero(finite))
        raise DataError(path, f"{what} has {n_bad} NaN/inf value(s); expected finite metres")
    # The reference multiplies the float32 array by 1000 in float32; doing it in float64 could
    # move a value across a millimetre boundary.
    mm = np.asarray(raw_m, np.float32) * np.float32(DEPTH_PNG_SCALE)
    try:
        return encode_depth_png(mm, 1.0)
    except ValueError as exc:
        raise DataError(path, f"{what} cannot be stored as uint16 millimetres: {exc}") from exc


def _safe_component(name: str, path: PathLike, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DataError(path, f"{what} {name!r} is not usable as a folder name")
    return name


def export_official_splits(
    mat_path: PathLike, splits_path: PathLike, out_dir: PathLike, jpeg_quality: int = 95
) -> list[tuple[str, str]]:
    """Export the labeled .mat to ``official_splits/`` exactly as spec 3.3 describes.

    Every frame ``i`` (0-based over all frames) goes to ``<out>/<train|test>/<sceneType>/`` as
    ``rgb_%05d.jpg`` % i (black outside :func:`official_border`) and ``sync_depth_%05d.png`` % i
    (``uint16(rawDepths * 1000)``, truncated, 0 = missing). The splits must cover every frame
    once, as the reference script asserts.

    Returns the test pairs ``("<sceneType>/rgb_%05d.jpg", "<sceneType>/sync_depth_%05d.png")``
    ordered by scene type, then frame index: the grouping of MIM's ``test_list.txt``. (The real
    list is not sorted inside a folder; use the shared file when its exact order matters.)
    """
    out_dir = Path(out_dir)
    mat = NYULabeledMat(mat_path)
    try:
        train0, test0 = read_splits_mat(splits_path, n_frames=len(mat))
        is_train = np.zeros(len(mat), dtype=bool)
        is_train[train0] = True
        scene_types = [
            _safe_component(s, mat_path, f"sceneTypes[{i}]")
            for i, s in enumerate(mat.scene_types())
        ]
        test_pairs: list[tuple[str, int]] = []
        for i in range(len(mat)):
            split = "train" if is_train[i] else "test"
            folder = out_dir / split / scene_types[i]
            image = mat.image(i)
            r0, r1, c0, c1 = official_border(*image.shape[:2])
            bordered = np.zeros_like(image)
            bordered[r0:r1, c0:c1] = image[r0:r1, c0:c1]
            depth_mm = _raw_to_mm(mat.depth(i, raw=True), mat_path, f"rawDepths of frame {i}")
            write_png(folder / f"sync_depth_{i:05d}.png", depth_mm)
            write_jpeg(folder / f"rgb_{i:05d}.jpg", bordered, quality=jpeg_quality)
            if split == "test":
                test_pairs.append((scene_types[i], i))
    finally:
        mat.close()
    return [(f"{s}/rgb_{i:05d}.jpg", f"{s}/sync_depth_{i:05d}.png") for s, i in sorted(test_pairs)]


def write_sync_pair(
    root: PathLike,
    scene: str,
    index: int,
    rgb: np.ndarray,
    depth_m: np.ndarray,
    jpeg_quality: int = 95,
) -> tuple[str, str]:
    """Write one sync frame (spec 3.1): ``<root>/<scene>/rgb_%05d.jpg`` and ``sync_depth_%05d.png``.

    ``rgb`` (H, W, 3) uint8; ``depth_m`` (H, W) metres, stored as uint16 millimetres, truncated,
    0 = missing. Returns the two paths relative to ``root`` (``"<scene>/rgb_%05d.jpg"``, ...).
    """
    rgb = np.asarray(rgb)
    depth_m = np.asarray(depth_m)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(
            f"write_sync_pair: rgb must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}"
        )
    if depth_m.shape != rgb.shape[:2]:
        raise ValueError(f"write_sync_pair: depth {depth_m.shape} does not match rgb {rgb.shape}")
    if not scene or "/" in scene or scene in (".", ".."):
        raise ValueError(f"write_sync_pair: bad scene folder name {scene!r}")
    rgb_rel = f"{scene}/rgb_{index:05d}.jpg"
    depth_rel = f"{scene}/sync_depth_{index:05d}.png"
    write_png(Path(root) / depth_rel, encode_depth_png(depth_m, DEPTH_PNG_SCALE))
    write_jpeg(Path(root) / rgb_rel, rgb, quality=jpeg_quality)
    return rgb_rel, depth_rel


def write_pair_list(
    path: PathLike,
    pairs: Sequence[tuple[str, str]],
    style: str = "mim",
    focal: float | None = None,
    final_newline: bool = True,
) -> None:
    """Write a list file in the formats of spec 3.2 / fine-tuning spec 4.

    ``style="mim"``: ``/<rgb> /<depth>`` per line, a leading ``/`` added where missing (MIM
    concatenates it to the base folder). ``style="bts"``: ``<rgb> <depth> <focal>`` with the
    tokens verbatim (BTS train lists start with ``/``, its test list does not); ``focal``
    defaults to :data:`BTS_FOCAL`. ``final_newline=False`` reproduces MIM's ``test_list.txt``;
    train lists end with a newline.
    """
    if style not in ("mim", "bts"):
        raise ValueError(f"write_pair_list: style must be 'mim' or 'bts', got {style!r}")
    if style == "mim" and focal is not None:
        raise ValueError("write_pair_list: MIM lists have no focal column")
    if not pairs:
        raise ValueError("write_pair_list: no pairs to write")
    lines = []
    for rgb_rel, depth_rel in pairs:
        for token in (rgb_rel, depth_rel):
            if not token or any(ch.isspace() for ch in token):
                raise ValueError(f"write_pair_list: token {token!r} is empty or has whitespace")
        if style == "mim":
            lines.append(f"/{rgb_rel.lstrip('/')} /{depth_rel.lstrip('/')}")
        else:
            f_val = BTS_FOCAL if focal is None else float(focal)
            lines.append(f"{rgb_rel} {depth_rel} {f_val:.10g}")
    atomic_write_text(path, "\n".join(lines) + ("\n" if final_newline else ""))


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read_pair_list(path: PathLike) -> list[tuple[str, str]]:
    """Read the first two columns of a MIM (2-column) or BTS (3-column) list file (spec 3.2).

    Tolerates a missing final newline; an empty file or a line with fewer than two tokens
    raises :class:`DataError` naming the file.
    """
    rows = read_list_file(path, min_fields=2, what="pair list file (<rgb> <depth> [focal])")
    return [(row[0], row[1]) for row in rows]


def read_splits_mat(path: PathLike, n_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``splits.mat`` (MATLAB v5, spec 2.4) and return ``(train_idx0, test_idx0)``.

    Both are 0-based int64 arrays (stored value - 1). Checked: both variables present, integer
    values >= 1, strictly ascending, disjoint; with ``n_frames`` also <= n_frames and together
    covering every frame exactly once.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "splits.mat (MATLAB v5 with trainNdxs and testNdxs)")
    try:
        content = scipy.io.loadmat(path)
    except NotImplementedError as exc:
        raise DataError(path, f"expected a MATLAB v5 splits.mat, found a v7.3 file: {exc}") from exc
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... on corrupt files
        raise DataError(path, f"expected a MATLAB v5 splits.mat, cannot read it: {exc}") from exc
    out = []
    for key in ("trainNdxs", "testNdxs"):
        if key not in content:
            found = sorted(k for k in content if not k.startswith("__"))
            raise DataError(
                path, f"expected variable {key!r} (1-based frame numbers), found {found}"
            )
        arr = np.asarray(content[key])
        if arr.dtype.kind not in "iuf" or (arr.ndim == 2 and 1 not in arr.shape) or arr.ndim > 2:
            raise DataError(
                path, f"{key} must be an (n, 1) numeric vector, found {arr.dtype} {arr.shape}"
            )
        flat = arr.reshape(-1)
        if flat.size == 0:
            raise DataError(path, f"{key} is empty; expected 1-based frame numbers")
        if arr.dtype.kind == "f" and not np.all(flat == np.round(flat)):
            raise DataError(path, f"{key} holds non-integer values; expected frame numbers")
        idx = flat.astype(np.int64)
        if idx.min() < 1:
            raise DataError(path, f"{key} holds {idx.min()}; frame numbers are 1-based (>= 1)")
        if n_frames is not None and idx.max() > n_frames:
            raise DataError(
                path, f"{key} holds {idx.max()}, beyond the {n_frames} frames of the labeled file"
            )
        if np.any(np.diff(idx) <= 0):
            raise DataError(path, f"{key} must be strictly ascending (sorted, no duplicates)")
        out.append(idx - 1)
    train0, test0 = out
    common = np.intersect1d(train0, test0)
    if common.size:
        raise DataError(
            path, f"trainNdxs and testNdxs overlap in {common.size} frame(s), e.g. {common[0] + 1}"
        )
    if n_frames is not None and train0.size + test0.size != n_frames:
        raise DataError(
            path,
            f"trainNdxs ({train0.size}) + testNdxs ({test0.size}) do not cover the "
            f"{n_frames} frames of the labeled file",
        )
    return train0, test0


class NYULabeledMat:
    """Frame-by-frame reader of ``nyu_depth_v2_labeled.mat`` (spec 2.2-2.3).

    Undoes MATLAB's reversed axes: ``image(i)`` (H, W, 3) uint8, ``depth(i)`` (H, W) float32
    metres, ``labels(i)`` (H, W) uint16, ``instances(i)`` (H, W) uint8, ``accel()`` (N, 4).
    ``images``, ``depths``, ``rawDepths`` and ``sceneTypes`` are checked when the reader is
    built; ``labels``, ``instances``, ``scenes``, ``names`` and ``accelData`` are optional, but
    checked when present. MATLAB attributes are ignored.

    The HDF5 handle is opened lazily and per process (a handle inherited through ``fork`` or a
    pickle is never used), so the reader can sit inside a DataLoader dataset.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        try:
            self._validate()
        finally:
            self.close()  # never carry a handle opened here into forked workers

    # -- handle management -------------------------------------------------------------------

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            if not self.path.is_file():
                raise MissingFileError(self.path, "NYUv2 labeled .mat (MATLAB v7.3 / HDF5)")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataError(
                    self.path,
                    f"expected a MATLAB v7.3 (HDF5) file, cannot open it (truncated or corrupt?): "
                    f"{exc}",
                ) from exc
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close this process's handle (it is reopened on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __enter__(self) -> NYULabeledMat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    # -- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        f = self._h5()
        missing = [k for k in _REQUIRED if k not in f]
        if missing:
            raise DataError(
                self.path,
                f"expected NYUv2 labeled variables {list(_REQUIRED)}, missing {missing}",
            )
        images = self._dataset("images")
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise DataError(
                self.path,
                f"images: expected (N, 3, W, H) uint8 as h5py shows MATLAB's H x W x 3 x N, "
                f"found {images.dtype} {images.shape}",
            )
        n, _, w, h = images.shape
        if n == 0:
            raise DataError(self.path, "images: expected at least one frame, found 0")
        self.n, self.height, self.width = int(n), int(h), int(w)
        for key, kinds in (
            ("depths", "f"),
            ("rawDepths", "f"),
            ("labels", "iu"),
            ("instances", "iu"),
        ):
            if key not in f:
                continue
            ds = self._dataset(key)
            if ds.shape != (n, w, h) or ds.dtype.kind not in kinds:
                raise DataError(
                    self.path,
                    f"{key}: expected ({n}, {w}, {h}) {'float' if kinds == 'f' else 'integer'} "
                    f"(MATLAB {h} x {w} x {n}), found {ds.dtype} {ds.shape}",
                )
        for key in ("sceneTypes", "scenes", "names"):
            if key not in f:
                continue
            ds = self._dataset(key)
            if h5py.check_dtype(ref=ds.dtype) is not h5py.Reference or ds.ndim != 2:
                raise DataError(
                    self.path,
                    f"{key}: expected a MATLAB cell array ((1, n) object references), "
                    f"found {ds.dtype} {ds.shape}",
                )
            if key != "names" and ds.size != n:
                raise DataError(
                    self.path, f"{key}: expected {n} entries (one per frame), found {ds.size}"
                )
        if "accelData" in f:
            ds = self._dataset("accelData")
            if ds.shape != (4, n) or ds.dtype.kind not in "fiu":
                raise DataError(
                    self.path, f"accelData: expected (4, {n}) numbers, found {ds.dtype} {ds.shape}"
                )

    def _dataset(self, key: str) -> h5py.Dataset:
        obj = self._h5().get(key)
        if obj is None:
            raise DataError(self.path, f"variable {key!r} is missing from the labeled file")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(
                self.path, f"{key}: expected an array, found an HDF5 {type(obj).__name__}"
            )
        return obj

    def _read(self, key: str, i: int | None = None) -> np.ndarray:
        ds = self._dataset(key)
        try:
            return np.asarray(ds[()] if i is None else ds[i])
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            where = key if i is None else f"{key}[{i}]"
            raise DataError(
                self.path, f"cannot read {where} (truncated or corrupt file?): {exc}"
            ) from exc

    def _frame(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"{self.path}: frame {i} out of range [0, {self.n})")
        return i

    def _string(self, key: str, j: int) -> str:
        f = self._h5()
        try:
            ds = self._dataset(key)
            # an N x 1 MATLAB cell is (1, N) in h5py; accept a 1 x N one, (N, 1), as well
            ref = ds[0, j] if ds.shape[0] == 1 else ds[j, 0]
            target = f[ref]
            codes = np.asarray(target[()])
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                self.path, f"cannot decode {key}[{j}] (cell of strings): {exc}"
            ) from exc
        if target.attrs.get("MATLAB_empty", 0):
            return ""  # MATLAB stores '' as its dimensions, flagged by this attribute
        if codes.dtype.kind not in "iu":
            raise DataError(
                self.path, f"{key}[{j}]: expected uint16 character codes, found {codes.dtype}"
            )
        # int() per code: NumPy 2 refuses chr() of a 1-element array (spec 2.3, pitfall 22)
        return "".join(chr(int(c)) for c in codes.reshape(-1))

    # -- public accessors --------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> np.ndarray:
        """RGB of frame ``i`` (0-based): (H, W, 3) uint8."""
        return np.ascontiguousarray(self._read("images", self._frame(i)).transpose(2, 1, 0))

    def depth(self, i: int, raw: bool = True) -> np.ndarray:
        """``rawDepths`` (default, 0 = missing) or in-painted ``depths``: (H, W) float32 metres."""
        key = "rawDepths" if raw else "depths"
        return np.ascontiguousarray(self._read(key, self._frame(i)).T, dtype=np.float32)

    def labels(self, i: int) -> np.ndarray:
        """Class id per pixel (0 = unlabeled, k = ``names()[k - 1]``): (H, W) uint16."""
        return np.ascontiguousarray(self._read("labels", self._frame(i)).T, dtype=np.uint16)

    def instances(self, i: int) -> np.ndarray:
        """Instance id per pixel within its class: (H, W) uint8."""
        return np.ascontiguousarray(self._read("instances", self._frame(i)).T, dtype=np.uint8)

    def scene_type(self, i: int) -> str:
        """Scene type of frame ``i``, e.g. ``"bathroom"``."""
        return self._string("sceneTypes", self._frame(i))

    def scene_types(self) -> list[str]:
        """Scene types of all frames."""
        return [self._string("sceneTypes", j) for j in range(self.n)]

    def scene(self, i: int) -> str:
        """Raw scene folder of frame ``i``, e.g. ``"kitchen_0028b"``."""
        return self._string("scenes", self._frame(i))

    def names(self) -> list[str]:
        """Class names; id = position + 1 (this is how ``namesToIds`` is rebuilt, spec 2.3)."""
        size = self._dataset("names").size
        return [self._string("names", j) for j in range(size)]

    def accel(self) -> np.ndarray:
        """Accelerometer (roll, yaw, pitch, tilt) per frame: (N, 4) float32."""
        return np.ascontiguousarray(self._read("accelData").T, dtype=np.float32)


class NYULabeledDataset(Dataset):
    """The labeled frames as samples, e.g. the official 654-image test set (spec 2.5).

    Sample: ``image`` (H, W, 3) uint8; ``depth`` (H, W) float32 metres, ``rawDepths`` by default
    (the evaluation GT, 0 = missing) or the in-painted ``depths`` with ``depth="filled"``;
    ``index`` the 0-based global frame index; ``scene_type``; ``name`` =
    ``f"{scene_type}_rgb_{index:05d}"``, the name :class:`NYUSyncDataset` gives the same frame
    after :func:`export_official_splits`, so predictions from either source line up.
    ``black_border=True`` blacks out the image outside :func:`official_border` like the export.
    The depth is not quantised to millimetres as the exported PNG is (difference < 1 mm).
    """

    def __init__(
        self,
        mat_path: PathLike,
        splits_path: PathLike | None,
        split: str = "test",
        depth: str = "raw",
        transform: Transform | None = None,
        black_border: bool = False,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ConfigError(f"NYULabeledDataset: split must be train/test/all, got {split!r}")
        if depth not in ("raw", "filled"):
            raise ConfigError(f"NYULabeledDataset: depth must be 'raw' or 'filled', got {depth!r}")
        self.mat = NYULabeledMat(mat_path)
        self.split = split
        self.depth_kind = depth
        self.transform = transform
        self.black_border = black_border
        if split == "all":
            self.indices = np.arange(len(self.mat), dtype=np.int64)
        else:
            if splits_path is None:
                raise ConfigError(f"NYULabeledDataset: split={split!r} needs a splits.mat")
            train0, test0 = read_splits_mat(splits_path, n_frames=len(self.mat))
            self.indices = train0 if split == "train" else test0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not 0 <= k < len(self.indices):
            raise IndexError(f"NYULabeledDataset: index {k} out of range [0, {len(self.indices)})")
        i = int(self.indices[k])
        image = self.mat.image(i)
        if self.black_border:
            r0, r1, c0, c1 = official_border(*image.shape[:2])
            bordered = np.zeros_like(image)
            bordered[r0:r1, c0:c1] = image[r0:r1, c0:c1]
            image = bordered
        raw = self.depth_kind == "raw"
        depth = self.mat.depth(i, raw=raw)
        check_depth(depth, self.mat.path, f"{'rawDepths' if raw else 'depths'} of frame {i}")
        scene_type = self.mat.scene_type(i)
        sample: dict[str, Any] = {
            "image": image,
            "depth": depth,
            "index": i,
            "name": f"{scene_type}_rgb_{i:05d}",
            "scene_type": scene_type,
        }
        return self.transform(sample) if self.transform is not None else sample


def _join(base: str, token: str) -> str:
    # MIM concatenates base + token (tokens start with "/"); BTS test tokens have no slash.
    return base + token if token.startswith("/") else base.rstrip("/") + "/" + token


def _sample_name(token: str) -> str:
    p = PurePosixPath(token)
    return f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem


class NYUSyncDataset(Dataset):
    """Pairs from a MIM (``<rgb> <depth>``) or BTS (``<rgb> <depth> <focal>``) list (spec 3.2, 3.4).

    Paths are ``base_dir + token`` for tokens starting with ``/`` (MIM's plain concatenation:
    base = ``<root>/nyu_depth_v2`` for train, ``.../official_splits/test`` for test) and
    ``base_dir/token`` otherwise (BTS test list). Sample: ``image`` (H, W, 3) uint8, ``depth``
    (H, W) float32 metres = PNG value / 1000 (0 = missing), ``name`` = ``<parent>_<stem>`` of
    the rgb token (``bathroom_rgb_00045``), ``index`` = row in the list, plus ``focal`` for BTS
    lists.

    ``check_files=True`` checks at construction that every listed file exists. With
    ``on_error="raise"`` a missing file, an undecodable JPEG/PNG, an 8-bit or all-zero depth PNG
    raise :class:`DataError`; with ``on_error="skip"`` missing entries are dropped and bad
    samples replaced by the next valid row (wrapping around), all counted in ``self.bad``.
    """

    def __init__(
        self,
        base_dir: PathLike,
        list_file: PathLike,
        transform: Transform | None = None,
        on_error: str = "raise",
        check_files: bool = True,
    ) -> None:
        self.base_dir = os.fspath(base_dir)
        self.list_file = Path(list_file)
        self.transform = transform
        self.bad = BadSamples(on_error)
        rows = read_list_file(
            self.list_file, min_fields=2, what="pair list file (<rgb> <depth> [focal])"
        )
        self.rows: list[tuple[str, str, float | None]] = []
        for lineno, row in enumerate(rows, start=1):
            focal = None
            if len(row) >= 3:
                try:
                    focal = float(row[2])
                except ValueError as exc:
                    raise DataError(
                        self.list_file, f"entry {lineno}: expected a focal length, found {row[2]!r}"
                    ) from exc
            self.rows.append((row[0], row[1], focal))
        if check_files:
            self._check_files()

    def _paths(self, k: int) -> tuple[str, str]:
        rgb_tok, depth_tok, _ = self.rows[k]
        return _join(self.base_dir, rgb_tok), _join(self.base_dir, depth_tok)

    def _check_files(self) -> None:
        kept = []
        missing: list[str] = []
        for k, row in enumerate(self.rows):
            absent = [p for p in self._paths(k) if not os.path.isfile(p)]
            missing.extend(absent)
            if not absent:
                kept.append(row)
        if not missing:
            return
        if self.bad.on_error == "raise":
            shown = ", ".join(missing[:5])
            raise DataError(
                self.list_file,
                f"{len(missing)} listed file(s) missing under base folder {self.base_dir!r}, "
                f"e.g. {shown}",
            )
        for p in missing:
            self.bad.handle(DataError(p, f"missing file named in list file: {self.list_file}"))
        self.rows = kept
        warnings.warn(
            f"{self.list_file}: dropped {len(missing)} missing file(s), {len(kept)} pair(s) left; "
            f"{self.bad.summary()}",
            stacklevel=2,
        )
        if not kept:
            raise DataError(self.list_file, "no listed pair has both files present")

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, k: int) -> dict[str, Any]:
        rgb_path, depth_path = self._paths(k)
        image = read_rgb(rgb_path)
        depth = read_depth_png(depth_path, DEPTH_PNG_SCALE, "16-bit depth PNG (millimetres)")
        if depth.shape != image.shape[:2]:
            raise DataError(
                depth_path,
                f"depth is {depth.shape}, expected the size of its image {image.shape[:2]}",
            )
        rgb_tok, _, focal = self.rows[k]
        sample: dict[str, Any] = {
            "image": image,
            "depth": depth,
            "name": _sample_name(rgb_tok),
            "index": k,
        }
        if focal is not None:
            sample["focal"] = focal
        return sample

    def __getitem__(self, k: int) -> dict[str, Any]:
        sample = self.bad.load(k, len(self.rows), self._load, self.list_file)
        return self.transform(sample) if self.transform is not None else sample
