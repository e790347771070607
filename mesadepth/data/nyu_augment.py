"""NYUv2 fine-tuning augmentation of MIM-Depth: CutDepth, flip, crop, colour jitter, to tensor.

Specification: masked-pretraining-and-finetuning.md section 2.4 (training pipeline, steps 1-8)
and pitfall 14; datasets-and-ibims-evaluation.md section 3.4.

The reference runs albumentations (``HorizontalFlip``, ``RandomCrop``,
``RandomBrightnessContrast``, ``RandomGamma``, ``HueSaturationValue``, all with default
arguments) on uint8 images; the colour steps here reproduce their uint8 arithmetic (look-up
tables truncated to uint8, OpenCV's 8-bit HSV with H in 0..179) with NumPy, so neither
albumentations nor OpenCV is needed. Random numbers come from the caller's
:class:`numpy.random.Generator`, drawn only for the steps that fire, in pipeline order.

Units: the loader (:class:`~mesadepth.data.nyu.NYUSyncDataset`) gives depth in metres, the
reference augments millimetres and divides by 1000 at the end; flips and crops commute with
that, and the reference-mode CutDepth converts back to millimetres for its wrap-around.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from mesadepth.errors import ConfigError, DataError

__all__ = [
    "MIMTrainTransform",
    "adjust_brightness_contrast",
    "adjust_gamma",
    "cutdepth",
    "cutdepth_strip",
    "hsv_to_rgb_uint8",
    "rgb_to_hsv_uint8",
    "shift_hsv",
]

CutDepthMode = Literal["reference", "corrected"]

# OpenCV's 8-bit RGB -> HSV fixed-point tables (hsv_shift = 12, hue range 180); entry 0 is 0.
_HSV_SHIFT = 12
_HSV_HALF = 1 << (_HSV_SHIFT - 1)
_I = np.arange(1, 256, dtype=np.float64)
# np.rint rounds half to even like OpenCV's saturate_cast<int>(double).
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _I)]).astype(np.int64)
_HDIV180 = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _I))]).astype(np.int64)
del _I
# HSV -> RGB sector table of OpenCV (indices into [v, v(1-s), v(1-sh), v(1-s(1-h))]) per
# sector 0..5, columns ordered (r, g, b).
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


# ---------------------------------------------------------------------------------------------
# Colour conversion and the three photometric steps (uint8 in, uint8 out).


def _check_rgb(image: np.ndarray, what: str = "image") -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what}: expected (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")


def rgb_to_hsv_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> uint8 HSV exactly as OpenCV's ``COLOR_RGB2HSV`` (spec 2.4 step 7).

    H in 0..179 (degrees / 2), S and V in 0..255; OpenCV's integer fixed-point arithmetic, so
    results equal ``cv2.cvtColor`` bit for bit.
    """
    _check_rgb(image)
    rgb = image.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    s = (diff * _SDIV[v] + _HSV_HALF) >> _HSV_SHIFT
    # OpenCV tests "v == r" first, then "v == g"; ties therefore resolve towards red.
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    # >> on negative int64 is an arithmetic (floor) shift, as in OpenCV's C code.
    h = (h * _HDIV180[diff] + _HSV_HALF) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb_uint8(hsv: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 HSV (H 0..179) -> uint8 RGB as OpenCV's ``COLOR_HSV2RGB`` (spec 2.4).

    Reproduces OpenCV's vectorised 8-bit path, the one that converts whole images (only the
    last few pixels of a buffer take a scalar path, which rounds instead of truncating, a
    difference of at most 1): float32 h * 6/180, sector = trunc, four-entry table, x 255
    **truncated**. Equal to opencv-python-headless 4.14 on x86-64 for all 256^3 inputs.
    Hue values 180..255 wrap around the six sectors as in OpenCV.
    """
    if hsv.dtype != np.uint8 or hsv.ndim != 3 or hsv.shape[2] != 3:
        raise ValueError(f"hsv: expected (H, W, 3) uint8, got {hsv.dtype} {hsv.shape}")
    f32 = np.float32
    one = f32(1.0)
    h = hsv[..., 0].astype(f32) * (f32(6.0) / f32(180.0))
    s = hsv[..., 1].astype(f32) * (one / f32(255.0))
    v = hsv[..., 2].astype(f32) * (one / f32(255.0))
    pre = np.trunc(h)
    frac = h - pre
    sector = (pre - np.trunc(pre * (one / f32(6.0))) * f32(6.0)).astype(np.int64)
    # OpenCV's compiled kernel fuses "1 - s * x" into one FMA (a single rounding); the float32
    # product is exact in float64, so rounding 1 - s x once from float64 reproduces it.
    s64 = s.astype(np.float64)
    fused_h = (1.0 - s64 * frac).astype(f32)
    fused_1h = (1.0 - s64 * (one - frac)).astype(f32)
    tab = np.stack([v, v * (one - s), v * fused_h, v * fused_1h], axis=-1)
    rgb = np.take_along_axis(tab, _SECTOR_RGB[sector], axis=-1)
    return np.clip(np.trunc(rgb * f32(255.0)), 0, 255).astype(np.uint8)


def adjust_brightness_contrast(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """albumentations ``RandomBrightnessContrast`` on uint8 (spec 2.4 step 5).

    out = truncate(clip(alpha * img + beta * 255, 0, 255)) through a float32 look-up table;
    brightness is relative to the dtype maximum (``brightness_by_max=True``).
    """
    _check_rgb(image)
    lut = np.arange(256, dtype=np.float32)
    if alpha != 1:
        lut *= np.float32(alpha)
    if beta != 0:
        lut += np.float32(beta * 255)
    return np.clip(lut, 0, 255).astype(np.uint8)[image]


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """albumentations ``RandomGamma`` on uint8 (spec 2.4 step 6): 255 (img/255)^gamma, truncated."""
    _check_rgb(image)
    # Same table as albumentations: np.arange(0, 256/255, 1/255) is i * (1/255).
    table = (np.arange(256, dtype=np.float64) * (1.0 / 255)) ** gamma * 255
    return table.astype(np.uint8)[image]


def shift_hsv(image: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """albumentations ``HueSaturationValue`` on uint8 (spec 2.4 step 7).

    Shifts in OpenCV 8-bit units (hue in degrees / 2): H <- (H + hue) mod 180, S <- clip(S + sat),
    V <- clip(V + val), each truncated to uint8; all-zero shifts return the image unchanged.
    """
    _check_rgb(image)
    if hue == 0 and sat == 0 and val == 0:
        return image
    hsv = rgb_to_hsv_uint8(image)
    base = np.arange(256, dtype=np.int16)
    luts = [
        np.mod(base + hue, 180).astype(np.uint8) if hue != 0 else base.astype(np.uint8),
        np.clip(base + sat, 0, 255).astype(np.uint8) if sat != 0 else base.astype(np.uint8),
        np.clip(base + val, 0, 255).astype(np.uint8) if val != 0 else base.astype(np.uint8),
    ]
    shifted = np.stack([luts[c][hsv[..., c]] for c in range(3)], axis=-1)
    return hsv_to_rgb_uint8(shifted)


# ---------------------------------------------------------------------------------------------
# CutDepth.


def cutdepth_strip(width: int, a: float, b: float, p: float = 0.75) -> tuple[int, int]:
    """Columns of the vertical CutDepth strip (spec 2.4 step 2): (left, strip width).

    left = floor(a W), w = floor(max((W - a W) b p, 1)) for a, b in [0, 1); the strip
    [left, left + w) always lies inside the image.
    """
    left = int(a * width)
    return left, int(max((width - a * width) * b * p, 1))


def cutdepth(
    image: np.ndarray,
    depth_m: np.ndarray,
    left: int,
    strip: int,
    mode: CutDepthMode = "reference",
    max_depth: float = 10.0,
) -> np.ndarray:
    """Copy of ``image`` with columns [left, left + strip) of all channels replaced by depth.

    image (H, W, 3) uint8; depth_m (H, W) metres. ``"reference"`` (pitfall 14): the written
    value is the depth in millimetres wrapped modulo 256 (1000 mm -> 232), what assigning the
    reference's float millimetres to a uint8 array gives; millimetres are recovered by
    rounding ``depth_m * 1000`` (the sync PNGs hold integer millimetres). ``"corrected"``
    (a deliberate change): round(clip(depth / max_depth, 0, 1) * 255), a grey-level depth image.
    Missing depth (0) writes 0 in both modes.
    """
    strip_depth = depth_m[:, left : left + strip].astype(np.float64)
    if mode == "reference":
        # Rounding undoes the float32 /1000 of the loader; the cast of a float > 255 to uint8
        # in the reference keeps the low byte of the (truncated) integer.
        values = np.mod(np.rint(strip_depth * 1000.0).astype(np.int64), 256)
    elif mode == "corrected":
        values = np.rint(np.clip(strip_depth / max_depth, 0.0, 1.0) * 255.0)
    else:
        raise ConfigError(f"cutdepth mode must be 'reference' or 'corrected', got {mode!r}")
    out = image.copy()
    out[:, left : left + strip, :] = values.astype(np.uint8)[..., None]
    return out


# ---------------------------------------------------------------------------------------------
# The whole pipeline.


class MIMTrainTransform:
    """MIM-Depth NYUv2 training augmentation, one sample at a time (spec 2.4, datasets 3.4).

    ``transform(sample, rng, counter)``: ``sample`` has ``image`` (H, W, 3) uint8 RGB and
    ``depth`` (H, W) float32 metres (the :class:`~mesadepth.data.nyu.NYUSyncDataset` layout);
    other keys pass through. Returns a new dict with ``image`` float32 tensor (3, h, w) in
    [0, 1] (x / 255, no mean/std normalisation, pitfall 11) and ``depth`` float32 tensor
    (1, h, w) metres, (h, w) = ``crop``. Steps, in order:

    1. CutDepth when ``counter % cutdepth_every == 0`` (the caller's per-worker sample counter,
       starting at 0 each epoch; deterministic, pitfall 14): a, b ~ U[0, 1), strip from
       :func:`cutdepth_strip` with ``cutdepth_p``, written by :func:`cutdepth` in
       ``cutdepth_mode``; ``cutdepth_every=0`` disables it;
    2. horizontal flip with probability ``flip_p`` (image and depth);
    3. random crop: top uniform in 0..H-h, left uniform in 0..W-w, both inclusive (top is 0
       when h = H, as for 480 x 480 crops of 480 x 640 frames);
    4. with probability ``colour_p`` each: brightness/contrast (alpha = 1 + U(-0.2, 0.2),
       beta = U(-0.2, 0.2)), gamma U(0.8, 1.2), HSV shift (hue U(-20, 20), sat U(-30, 30),
       val U(-20, 20)) — image only.
    """

    def __init__(
        self,
        crop: Sequence[int] = (480, 480),
        cutdepth_every: int = 4,
        cutdepth_p: float = 0.75,
        cutdepth_mode: CutDepthMode = "reference",
        max_depth: float = 10.0,
        flip_p: float = 0.5,
        colour_p: float = 0.5,
    ) -> None:
        if len(crop) != 2 or any(int(c) < 1 for c in crop):
            raise ConfigError(f"crop must be (height, width) of positive ints, got {crop!r}")
        if cutdepth_every < 0:
            raise ConfigError(f"cutdepth_every must be >= 0 (0 = off), got {cutdepth_every}")
        if cutdepth_mode not in ("reference", "corrected"):
            raise ConfigError(
                f"cutdepth_mode must be 'reference' or 'corrected', got {cutdepth_mode!r}"
            )
        for name, prob in (("cutdepth_p", cutdepth_p), ("flip_p", flip_p), ("colour_p", colour_p)):
            if not 0.0 <= prob <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {prob!r}")
        if not max_depth > 0:
            raise ConfigError(f"max_depth must be > 0, got {max_depth!r}")
        self.crop = (int(crop[0]), int(crop[1]))
        self.cutdepth_every = int(cutdepth_every)
        self.cutdepth_p = float(cutdepth_p)
        self.cutdepth_mode: CutDepthMode = cutdepth_mode
        self.max_depth = float(max_depth)
        self.flip_p = float(flip_p)
        self.colour_p = float(colour_p)

    def _inputs(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        where = str(sample.get("name", "<sample>"))
        image, depth = sample.get("image"), sample.get("depth")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
            raise DataError(where, "expected 'image' as an (H, W, 3) uint8 array")
        if image.shape[2] != 3:
            raise DataError(where, f"expected 3 colour channels, got image {image.shape}")
        if not isinstance(depth, np.ndarray) or depth.shape != image.shape[:2]:
            raise DataError(
                where, f"expected 'depth' as an array of the image size {image.shape[:2]}"
            )
        h, w = self.crop
        if h > image.shape[0] or w > image.shape[1]:
            raise DataError(where, f"image {image.shape[:2]} is smaller than the crop {self.crop}")
        return image, depth.astype(np.float32, copy=False)

    def __call__(
        self, sample: dict[str, Any], rng: np.random.Generator, counter: int
    ) -> dict[str, Any]:
        image, depth = self._inputs(sample)
        height, width = image.shape[:2]

        if self.cutdepth_every and counter % self.cutdepth_every == 0:
            a, b = float(rng.random()), float(rng.random())
            left, strip = cutdepth_strip(width, a, b, self.cutdepth_p)
            image = cutdepth(image, depth, left, strip, self.cutdepth_mode, self.max_depth)

        if rng.random() < self.flip_p:
            image, depth = image[:, ::-1], depth[:, ::-1]

        ch, cw = self.crop
        top = int(rng.integers(0, height - ch + 1))
        left = int(rng.integers(0, width - cw + 1))
        image = image[top : top + ch, left : left + cw]
        depth = depth[top : top + ch, left : left + cw]
        image = np.ascontiguousarray(image)

        if rng.random() < self.colour_p:
            alpha = 1.0 + rng.uniform(-0.2, 0.2)
            beta = rng.uniform(-0.2, 0.2)
            image = adjust_brightness_contrast(image, alpha, beta)
        if rng.random() < self.colour_p:
            image = adjust_gamma(image, rng.uniform(0.8, 1.2))
        if rng.random() < self.colour_p:
            hue, sat, val = rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20)
            image = shift_hsv(image, hue, sat, val)

        out = dict(sample)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        out["image"] = torch.from_numpy(chw / np.float32(255))
        out["depth"] = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32)[None])
        return out

    def __repr__(self) -> str:
        return (
            f"MIMTrainTransform(crop={self.crop}, cutdepth_every={self.cutdepth_every}, "
            f"cutdepth_p={self.cutdepth_p}, cutdepth_mode={self.cutdepth_mode!r}, "
            f"max_depth={self.max_depth}, flip_p={self.flip_p}, colour_p={self.colour_p})"
        )
