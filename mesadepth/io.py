"""File primitives shared by every dataset format: images, 16-bit depth PNGs, cam.txt, list files.

Every reader checks what it reads and raises :class:`~mesadepth.errors.DataError` naming the path
and what was expected. Every writer is atomic (write to a temporary file, then rename), so an
interrupted run never leaves a half-written frame behind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mesadepth.errors import DataError, MissingFileError

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, no newline translation) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _require_file(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, what)
    return path


def decode_rgb(data: bytes, path: PathLike = "<bytes>") -> np.ndarray:
    """Decode a compressed image (JPEG, PNG, WebP, ...) to an (H, W, 3) uint8 RGB array.

    The format is detected from the content, never from the file name (LSUN stores WebP
    behind ``.webp`` and JPEG alike). A truncated or corrupt file raises :class:`DataError`.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces a full decode: truncated files fail here, not later
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            path, f"expected a complete image file (JPEG/PNG/WebP), cannot decode: {exc}"
        ) from exc
    return np.asarray(rgb, dtype=np.uint8)


def read_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; grey and RGBA inputs are converted."""
    path = _require_file(path, "image file")
    return decode_rgb(path.read_bytes(), path)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode an (H, W, 3) uint8 array as baseline JPEG (4:2:0 chroma, like libjpeg's default)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def encode_webp(rgb: np.ndarray, quality: int = 75) -> bytes:
    """Encode an (H, W, 3) uint8 array as lossy WebP."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(
        buf, "WEBP", quality=quality
    )
    return buf.getvalue()


def write_jpeg(path: PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Write an (H, W, 3) uint8 RGB array as a JPEG file, atomically."""
    atomic_write_bytes(path, encode_jpeg(rgb, quality))


def write_png(path: PathLike, array: np.ndarray) -> None:
    """Write a 2-D uint8/uint16 array or an (H, W, 3) uint8 array as a lossless PNG, atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16 and array.ndim == 2:
        img = Image.fromarray(array)  # Pillow picks mode "I;16": a true 16-bit grey PNG
    elif array.dtype == np.uint8 and array.ndim in (2, 3):
        img = Image.fromarray(array)
    else:
        raise ValueError(f"write_png: unsupported array {array.dtype} {array.shape}")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())


def read_png_uint16(path: PathLike, what: str = "16-bit depth PNG") -> np.ndarray:
    """Read a single-channel 16-bit PNG as an (H, W) uint16 array.

    An 8-bit or colour PNG is refused: silently reading 8-bit values as depth would scale
    every metric wrongly.
    """
    path = _require_file(path, what)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"expected a complete {what}, cannot decode: {exc}") from exc
    if mode not in ("I;16", "I;16B", "I;16L", "I") or arr.ndim != 2:
        raise DataError(
            path, f"expected a single-channel 16-bit PNG ({what}), found Pillow mode {mode!r}"
        )
    if mode == "I" and (arr.min(initial=0) < 0 or arr.max(initial=0) > 65535):
        raise DataError(path, f"expected 16-bit values, found range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint16)


def check_depth(depth: np.ndarray, path: PathLike, what: str = "depth map") -> np.ndarray:
    """Refuse a depth map that is NaN/inf anywhere, negative, or zero everywhere."""
    if not np.all(np.isfinite(depth)):
        n = int(np.size(depth) - np.count_nonzero(np.isfinite(depth)))
        raise DataError(
            path, f"{what} has {n} NaN/inf value(s); expected finite depth (0 = missing)"
        )
    if np.any(depth < 0):
        raise DataError(
            path, f"{what} has negative values (min {float(depth.min()):g}); expected >= 0"
        )
    if not np.any(depth > 0):
        raise DataError(path, f"{what} is zero everywhere; expected some valid (> 0) depth")
    return depth


def read_depth_png(path: PathLike, scale: float, what: str = "depth PNG") -> np.ndarray:
    """Read a 16-bit depth PNG and return metres as float32: ``value / scale``.

    ``scale`` is the dataset's encoding: 1000 for NYUv2 sync / official_splits (millimetres),
    5000 for SC-Depth's NYU ``depth/*.png``. 0 stays 0 (no measurement).
    """
    raw = read_png_uint16(path, what)
    depth = raw.astype(np.float32) / np.float32(scale)
    return check_depth(depth, path, what)


def encode_depth_png(depth_m: np.ndarray, scale: float) -> np.ndarray:
    """Metres -> uint16 as the datasets store it: ``uint16(depth * scale)``, truncated like MATLAB/BTS.

    Values beyond the 16-bit range are refused instead of wrapping.
    """
    depth_m = np.asarray(depth_m, dtype=np.float64)
    if not np.all(np.isfinite(depth_m)):
        raise ValueError("encode_depth_png: depth contains NaN/inf")
    scaled = np.floor(depth_m * scale)
    if scaled.min(initial=0) < 0 or scaled.max(initial=0) > 65535:
        raise ValueError(
            f"encode_depth_png: depth range [{depth_m.min():g}, {depth_m.max():g}] m does not fit "
            f"uint16 at scale {scale:g}"
        )
    return scaled.astype(np.uint16)


def read_cam_txt(path: PathLike) -> np.ndarray:
    """Read an SC-Depth ``cam.txt``: 9 whitespace-separated numbers, row-major 3x3, last row (0, 0, 1)."""
    path = _require_file(path, "cam.txt (3x3 camera intrinsics)")
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
    except ValueError as exc:
        raise DataError(
            path, f"expected 9 numbers (a 3x3 intrinsics matrix), found non-numeric text: {exc}"
        ) from exc
    if values.size != 9:
        raise DataError(path, f"expected 9 numbers (a 3x3 intrinsics matrix), found {values.size}")
    K = values.reshape(3, 3).astype(np.float32)
    if (
        not np.all(np.isfinite(K))
        or not np.allclose(K[2], [0, 0, 1])
        or K[0, 0] <= 0
        or K[1, 1] <= 0
    ):
        raise DataError(
            path,
            f"expected intrinsics [[fx,0,cx],[0,fy,cy],[0,0,1]] with fx, fy > 0, found {K.tolist()}",
        )
    return K


def write_cam_txt(path: PathLike, K: np.ndarray) -> None:
    """Write a 3x3 intrinsics matrix as three lines of three numbers (SC-Depth ``cam.txt``)."""
    K = np.asarray(K, dtype=np.float64).reshape(3, 3)
    lines = [" ".join(f"{v:.10g}" for v in row) for row in K]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_list_file(path: PathLike, min_fields: int = 1, what: str = "list file") -> list[list[str]]:
    """Read a whitespace-separated list file: one entry per non-empty line, ``min_fields`` tokens at least.

    Tolerates a missing newline on the last line and CRLF line ends; refuses an empty file and
    names the first malformed line.
    """
    path = _require_file(path, what)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"expected an ASCII {what}: {exc}") from exc
    rows: list[list[str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < min_fields:
            raise DataError(
                path,
                f"line {lineno}: expected at least {min_fields} field(s), found {len(fields)}: {line!r}",
            )
        rows.append(fields)
    if not rows:
        raise DataError(path, f"{what} is empty; expected one entry per line")
    return rows


class _InertConfig:
    """Stand-in for configuration objects pickled into official training checkpoints.

    SimMIM / Swin-Transformer save a yacs ``CfgNode`` (a dict subclass) under ``config``. The
    weights_only loader only fills plain mappings, so this stand-in is created as an
    ``OrderedDict``: the config arrives as inert data and no code of the original class runs.
    """

    def __new__(cls, *args: object, **kwargs: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# Classes that official checkpoints pickle beside their tensors, mapped to inert stand-ins, so
# those files load with torch's weights_only loader (which refuses every other class).
SAFE_CHECKPOINT_GLOBALS: list = [
    (_InertConfig, "yacs.config.CfgNode"),
    argparse.Namespace,  # SC-Depth's hparams: an attribute bag, no behaviour on load
]


def safe_torch_load(path: PathLike) -> object:
    """``torch.load`` without executing pickled code, allowing only the inert classes above.

    Raises :class:`DataError` naming the classes a file needs when it holds anything else.
    """
    import pickle

    import torch

    path = _require_file(path, "PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
        except Exception:  # noqa: BLE001 - only used to improve the message
            unsafe = []
        what = f" (it holds {', '.join(unsafe[:5])})" if unsafe else ""
        raise DataError(
            path,
            f"cannot be read without executing pickled code{what}; expected a checkpoint of "
            "tensors and plain values. Re-save just the weights where the file is trusted, e.g. "
            "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')",
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DataError(path, f"not a readable PyTorch checkpoint ({err})") from err
