"""Paired transforms on sample dicts: every frame and map of a sample moves together, K follows.

Specification: geometric-and-supervised-pretraining.md section 1.5 (training transforms, their
order and parameters) and pitfalls 9 (flip intrinsics, unrounded scale factors) and 20 (RNG
seeding); datasets-and-ibims-evaluation.md section 4.2.

Keys (the sample-dict convention of :mod:`mesadepth.data`):

- ``image`` and every element of ``refs`` are colour images (H, W, C), uint8 or float in
  [0, 255], resampled with bilinear interpolation;
- ``depth``, ``pseudo_depth``, ``labels``, ``edges`` and any ``mask_*`` are 2-D maps, resampled
  with nearest-neighbour (never invents a value);
- ``K`` is the 3x3 intrinsics of the arrays as they are now; every geometric transform updates
  it with the reference's rule (documented per transform);
- ``motion`` (R, 4, 4), when present, holds rigid motions between the sample's cameras
  (``X_b = R X_a + t``, OpenCV axes; known poses, not in the reference): the flip conjugates
  them by diag(-1, 1, 1, 1) (:class:`HorizontalFlip`); scaling, cropping and resizing change
  only K, so they leave them as they are;
- everything else passes through untouched.

The reference recognises a colour frame by its number of dimensions (a grayscale JPEG would be
treated as depth, spec 1.1); here the *key* decides, which cannot confuse the two.

Randomness. Every transform is called as ``t(sample, rng)``; one call handles the whole sample,
so the target, the references and the maps share one draw by construction. ``rng`` is a
:class:`numpy.random.Generator` (or an int seed, or anything with ``random``/``uniform``/
``integers`` methods). The reference draws the flip from Python's ``random`` and the scale-crop
from NumPy's global RNG, both reseeded to 0 by its dataset constructor (pitfall 20); here one
explicit generator replaces both, so a run is reproducible from its seeds without touching any
global state. ``rng=None`` draws from fresh OS entropy (not reproducible; meant for ad-hoc use).

Resampling backend. Colour: :func:`torch.nn.functional.interpolate`, ``mode="bilinear"``,
``align_corners=False``, ``antialias=False`` (the half-pixel rule of OpenCV's ``INTER_LINEAR``
that the reference calls); uint8 inputs are rounded back to uint8 (OpenCV's 8-bit fixed-point
path can differ by one grey level), float inputs stay float. Maps: integer index arithmetic
``src = floor(dst * n_in / n_out)`` — the rule of OpenCV's ``INTER_NEAREST`` and of torch's
``mode="nearest"`` — computed exactly in integers and applied by indexing, so any dtype works
and the output only holds values of the input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

Sample = dict[str, Any]

#: Map keys with a fixed name; any key starting with ``mask_`` is a map as well.
MAP_KEYS = ("depth", "pseudo_depth", "labels", "edges")
#: Colour keys: ``image`` is one array, ``refs`` a list of arrays.
IMAGE_KEY = "image"
REFS_KEY = "refs"
#: Rigid motions between the sample's cameras (R, 4, 4); see the module docstring.
MOTION_KEY = "motion"
#: The mirror X -> -X of the camera frame that a left-right flip of the image shows.
MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])

#: SC-Depth's normalisation (spec 1.5 step 5): the same mean and std for R, G and B.
SC_DEPTH_MEAN = (0.45, 0.45, 0.45)
SC_DEPTH_STD = (0.225, 0.225, 0.225)
#: ImageNet statistics (SimMIM / Swin pre-processing).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomSource(Protocol):
    """What the random transforms use of a generator (a ``numpy.random.Generator`` has all three)."""

    def random(self) -> float: ...

    def uniform(self, low: float, high: float, size: int) -> np.ndarray: ...

    def integers(self, low: int, high: int) -> int: ...


RngLike = np.random.Generator | RandomSource | int | None
Transform = Callable[..., Sample]


def as_generator(rng: RngLike) -> RandomSource:
    """An int seeds a new generator, ``None`` takes fresh OS entropy, a generator passes through."""
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    return rng


def is_map_key(key: str) -> bool:
    """True for the keys moved with nearest-neighbour: depth, pseudo_depth, labels, edges, mask_*."""
    return key in MAP_KEYS or key.startswith("mask_")


# ----------------------------------------------------------------------------- array helpers


def _check_colour(key: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        raise TypeError(
            f"{key}: expected an (H, W, C) NumPy colour array before ToTensor, "
            f"found {type(arr).__name__} {getattr(arr, 'shape', '')}"
        )
    return arr


def _check_map(key: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise TypeError(
            f"{key}: expected an (H, W) NumPy map before ToTensor, "
            f"found {type(arr).__name__} {getattr(arr, 'shape', '')}"
        )
    return arr


def _copy_k(sample: Sample) -> np.ndarray | None:
    """K as float64 for exact arithmetic, or None when the sample carries no intrinsics."""
    if "K" not in sample:
        return None
    K = np.asarray(sample["K"], dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K: expected a (3, 3) intrinsics matrix, found shape {K.shape}")
    return K.copy()


def _store_k(out: Sample, K: np.ndarray | None) -> None:
    # Intrinsics stay float32 (spec 1.5); the update itself was done in float64.
    if K is not None:
        out["K"] = K.astype(np.float32)


def resize_bilinear(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) colour array to ``size = (H', W')`` with half-pixel bilinear.

    Same sampling rule as OpenCV ``INTER_LINEAR`` / torch ``align_corners=False`` without
    antialiasing. uint8 in -> rounded uint8 out; float in -> float32 out.
    """
    out_h, out_w = size
    if arr.shape[:2] == (out_h, out_w):
        return arr.copy()
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]
    r = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
    res = r[0].permute(1, 2, 0).numpy()
    if arr.dtype == np.uint8:
        return np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(res, dtype=np.float32)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output index: ``floor(j * n_in / n_out)`` in exact integer arithmetic."""
    # Integer arithmetic avoids float rounding at exact multiples (j * n_in / n_out integral).
    return (np.arange(n_out, dtype=np.int64) * n_in) // n_out


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map by nearest-neighbour indexing (output values are a subset of the input's)."""
    out_h, out_w = size
    rows = nearest_indices(arr.shape[0], out_h)
    cols = nearest_indices(arr.shape[1], out_w)
    return np.ascontiguousarray(arr[rows[:, None], cols[None, :]])


# ----------------------------------------------------------------------------- base classes


class Compose:
    """Apply transforms in order, passing **one** generator to all of them (spec 1.5).

    With ``rng=None`` a single fresh generator is created for the whole chain, so the steps
    still share one stream.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        gen = as_generator(rng)
        for t in self.transforms:
            sample = t(sample, gen)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class SpatialTransform:
    """Base of the geometric transforms: applies one colour function and one map function to every
    spatial entry of a sample, after checking that they all have the same height and width.

    ``exclude`` names keys to leave untouched (e.g. ``("depth",)`` for depth-mode validation,
    where the reference keeps the ground truth at full resolution, spec 1.7).
    """

    def __init__(self, exclude: Iterable[str] = ()) -> None:
        self.exclude = frozenset(exclude)

    def _spatial_keys(self, sample: Sample) -> list[str]:
        keys = []
        for key in sample:
            if key in self.exclude:
                continue
            if key in (IMAGE_KEY, REFS_KEY) or is_map_key(key):
                keys.append(key)
        return keys

    def size_of(self, sample: Sample) -> tuple[int, int]:
        """(H, W) shared by every spatial array of the sample; ValueError if they disagree."""
        sizes: dict[str, tuple[int, int]] = {}
        for key in self._spatial_keys(sample):
            if key == IMAGE_KEY:
                sizes[key] = _check_colour(key, sample[key]).shape[:2]
            elif key == REFS_KEY:
                for j, ref in enumerate(sample[key]):
                    sizes[f"refs[{j}]"] = _check_colour(f"refs[{j}]", ref).shape[:2]
            else:
                sizes[key] = _check_map(key, sample[key]).shape
        if not sizes:
            raise ValueError(
                f"{type(self).__name__}: the sample has no image, refs or map to transform "
                f"(keys: {sorted(sample)})"
            )
        distinct = set(sizes.values())
        if len(distinct) != 1:
            raise ValueError(
                f"{type(self).__name__}: paired arrays must share one size, found {sizes}"
            )
        h, w = distinct.pop()
        return int(h), int(w)

    def apply(
        self,
        sample: Sample,
        colour_fn: Callable[[np.ndarray], np.ndarray],
        map_fn: Callable[[np.ndarray], np.ndarray],
    ) -> Sample:
        """A shallow copy of ``sample`` with the spatial entries replaced (the input is not mutated)."""
        out = dict(sample)
        for key in self._spatial_keys(sample):
            if key == IMAGE_KEY:
                out[key] = colour_fn(sample[key])
            elif key == REFS_KEY:
                out[key] = [colour_fn(ref) for ref in sample[key]]
            else:
                out[key] = map_fn(sample[key])
        return out


# ----------------------------------------------------------------------------- geometric transforms


class HorizontalFlip(SpatialTransform):
    """Random left-right mirror with probability ``p`` (spec 1.5 step 1, pitfall 9).

    ``cx_rule="reference"``: cx' = w - cx, what SC-Depth does. With 0-based pixel centres the
    mirror of column u is w - 1 - u, so this K is one pixel off the true mirror image: a point
    projected with the new K lands one column right of where the flipped image shows it.
    ``cx_rule="exact"``: cx' = w - 1 - cx (the exact mirror about the integer pixel centres) and
    the skew K[0, 1] changes sign (the reference leaves it, as its K has no skew). fx, fy, cy are
    unchanged in both rules: the flipped image is that of a camera looking at the mirrored world
    (X -> -X). Rigid motions under ``motion`` (``X_b = T X_a``) become ``M T M`` with
    ``M = diag(-1, 1, 1, 1)`` (both cameras see the mirrored world): the rotation angles about
    y and z and the x translation change sign. The mirror is exact with ``cx_rule="exact"``;
    the reference rule leaves the one-pixel offset above.

    One number ``rng.random()`` is drawn per call, whether or not the sample is flipped, so the
    stream consumed does not depend on ``p``.
    """

    def __init__(
        self, p: float = 0.5, cx_rule: str = "reference", exclude: Iterable[str] = ()
    ) -> None:
        super().__init__(exclude)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HorizontalFlip: p must be in [0, 1], got {p}")
        if cx_rule not in ("reference", "exact"):
            raise ValueError(
                f"HorizontalFlip: cx_rule must be 'reference' or 'exact', got {cx_rule!r}"
            )
        self.p = p
        self.cx_rule = cx_rule

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        gen = as_generator(rng)
        flip = gen.random() < self.p  # drawn before any check, like the reference
        if not flip:
            return dict(sample)
        _, w = self.size_of(sample)
        out = self.apply(
            sample,
            lambda a: np.ascontiguousarray(a[:, ::-1]),
            lambda a: np.ascontiguousarray(a[:, ::-1]),
        )
        K = _copy_k(sample)
        if K is not None:
            if self.cx_rule == "reference":
                K[0, 2] = w - K[0, 2]
            else:
                K[0, 2] = w - 1 - K[0, 2]
                K[0, 1] = -K[0, 1]
        _store_k(out, K)
        if MOTION_KEY in sample:
            out[MOTION_KEY] = _mirror_motion(sample[MOTION_KEY])
        return out

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p}, cx_rule={self.cx_rule!r})"


def _mirror_motion(motion: Any) -> Any:
    """``M T M`` for every (4, 4) ``T`` of ``motion`` (NumPy or torch, (..., 4, 4))."""
    if isinstance(motion, torch.Tensor):
        m = torch.as_tensor(MIRROR_X, dtype=motion.dtype, device=motion.device)
        return m @ motion @ m
    motion = np.asarray(motion)
    if motion.shape[-2:] != (4, 4):
        raise ValueError(f"{MOTION_KEY}: expected (..., 4, 4) rigid motions, found {motion.shape}")
    return MIRROR_X @ motion @ MIRROR_X


class RandomScaleCrop(SpatialTransform):
    """Random zoom by independent factors, then crop back to the input size (spec 1.5 step 2).

    Draws, in this order: ``s_x, s_y = rng.uniform(1, max_scale, 2)``; scaled size
    (floor(h s_y), floor(w s_x)); ``oy = rng.integers(0, scaled_h - h + 1)``,
    ``ox = rng.integers(0, scaled_w - w + 1)``. K: row 0 (fx, skew, cx) times s_x, row 1
    (fy, cy) times s_y — the drawn factors, not the realised integer ratio (pitfall 9) — then
    cx -= ox, cy -= oy. The aspect ratio changes (s_x != s_y), as in the reference.
    """

    def __init__(self, max_scale: float = 1.15, exclude: Iterable[str] = ()) -> None:
        super().__init__(exclude)
        if max_scale < 1.0:
            raise ValueError(f"RandomScaleCrop: max_scale must be >= 1, got {max_scale}")
        self.max_scale = max_scale

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        gen = as_generator(rng)
        h, w = self.size_of(sample)
        s_x, s_y = (float(s) for s in gen.uniform(1.0, self.max_scale, 2))
        scaled_h, scaled_w = int(np.floor(h * s_y)), int(np.floor(w * s_x))
        oy = int(gen.integers(0, scaled_h - h + 1))
        ox = int(gen.integers(0, scaled_w - w + 1))
        size = (scaled_h, scaled_w)
        # Resize then crop every array with the same numbers: one draw for the whole sample.
        out = self.apply(
            sample,
            lambda a: np.ascontiguousarray(resize_bilinear(a, size)[oy : oy + h, ox : ox + w]),
            lambda a: np.ascontiguousarray(resize_nearest(a, size)[oy : oy + h, ox : ox + w]),
        )
        K = _copy_k(sample)
        if K is not None:
            K[0] *= s_x
            K[1] *= s_y
            K[0, 2] -= ox
            K[1, 2] -= oy
        _store_k(out, K)
        return out

    def __repr__(self) -> str:
        return f"RandomScaleCrop(max_scale={self.max_scale})"


class Resize(SpatialTransform):
    """Resize to ``size = (H, W)`` (spec 1.5 step 3): bilinear colour, nearest maps.

    K: row 0 times W / w, row 1 times H / h — always, even when the size is unchanged (then the
    factors are 1). This is the reference's rule; it scales pixel coordinates about the origin
    (u' = u W / w), whereas the half-pixel resampling actually maps pixel centres as
    u' = (u + 0.5) W / w - 0.5. The two differ by 0.5 (W / w - 1) pixels (0.5 (H / h - 1) rows);
    the exact rule would add that amount to cx (cy). We keep the reference's rule.
    """

    def __init__(self, size: tuple[int, int], exclude: Iterable[str] = ()) -> None:
        super().__init__(exclude)
        h, w = (int(v) for v in size)
        if h <= 0 or w <= 0:
            raise ValueError(f"Resize: size must be positive (H, W), got {size}")
        self.size = (h, w)

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        h, w = self.size_of(sample)
        out_h, out_w = self.size
        if (h, w) == (out_h, out_w):
            out = dict(sample)  # skipped if already that size (spec 1.5 step 3)
        else:
            out = self.apply(
                sample,
                lambda a: resize_bilinear(a, self.size),
                lambda a: resize_nearest(a, self.size),
            )
        K = _copy_k(sample)
        if K is not None:
            K[0] *= out_w / w
            K[1] *= out_h / h
        _store_k(out, K)
        return out

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class Crop(SpatialTransform):
    """Fixed crop of ``height x width`` at (``top``, ``left``); K: cx -= left, cy -= top."""

    def __init__(
        self, top: int, left: int, height: int, width: int, exclude: Iterable[str] = ()
    ) -> None:
        super().__init__(exclude)
        if top < 0 or left < 0 or height <= 0 or width <= 0:
            raise ValueError(
                f"Crop: need top, left >= 0 and height, width > 0, got {(top, left, height, width)}"
            )
        self.top, self.left, self.height, self.width = int(top), int(left), int(height), int(width)

    def crop(self, sample: Sample, top: int, left: int) -> Sample:
        """Crop at the given offsets (shared by :class:`RandomCrop`)."""
        h, w = self.size_of(sample)
        if top + self.height > h or left + self.width > w:
            raise ValueError(
                f"{type(self).__name__}: crop rows [{top}, {top + self.height}) x cols "
                f"[{left}, {left + self.width}) does not fit in a {h} x {w} sample"
            )
        rows = slice(top, top + self.height)
        cols = slice(left, left + self.width)
        out = self.apply(
            sample,
            lambda a: np.ascontiguousarray(a[rows, cols]),
            lambda a: np.ascontiguousarray(a[rows, cols]),
        )
        K = _copy_k(sample)
        if K is not None:
            K[0, 2] -= left
            K[1, 2] -= top
        _store_k(out, K)
        return out

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        return self.crop(sample, self.top, self.left)

    def __repr__(self) -> str:
        return f"Crop(top={self.top}, left={self.left}, height={self.height}, width={self.width})"


class RandomCrop(Crop):
    """Crop of ``height x width`` at offsets ``top = rng.integers(0, h - height + 1)`` then
    ``left = rng.integers(0, w - width + 1)``; K: cx -= left, cy -= top."""

    def __init__(self, height: int, width: int, exclude: Iterable[str] = ()) -> None:
        super().__init__(0, 0, height, width, exclude)

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        gen = as_generator(rng)
        h, w = self.size_of(sample)
        if self.height > h or self.width > w:
            raise ValueError(
                f"RandomCrop: crop {self.height} x {self.width} larger than the sample {h} x {w}"
            )
        top = int(gen.integers(0, h - self.height + 1))
        left = int(gen.integers(0, w - self.width + 1))
        return self.crop(sample, top, left)

    def __repr__(self) -> str:
        return f"RandomCrop(height={self.height}, width={self.width})"


# ----------------------------------------------------------------------------- tensors


def _integer_map_tensor(arr: np.ndarray) -> torch.Tensor:
    # torch has no full uint16/uint32/uint64 support: widen to the next signed type that holds them.
    widen = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}
    if arr.dtype in widen:
        arr = arr.astype(widen[arr.dtype])
    elif arr.dtype == np.uint64:
        raise TypeError("ToTensor: uint64 maps are not supported by torch")
    return torch.from_numpy(np.ascontiguousarray(arr)[None])


class ToTensor:
    """NumPy -> torch (spec 1.5 step 4).

    Colour (``image``, ``refs``): (H, W, C) uint8 or float in [0, 255] -> (C, H, W) float32 / 255.
    ``depth`` / ``pseudo_depth``: (H, W) -> (1, H, W) float32, no scaling. ``mask_*``, ``labels``,
    ``edges``: (1, H, W); integer and bool maps keep their dtype (uint16 -> int32 and
    uint32 -> int64, which torch supports), float maps become float32. ``K`` -> (3, 3) float32
    tensor; ``motion`` -> (R, 4, 4) float32 tensor. Entries that are already tensors and other
    keys pass through.
    """

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        out = dict(sample)
        for key, val in sample.items():
            if isinstance(val, torch.Tensor):
                continue
            if key == IMAGE_KEY:
                out[key] = self.colour(key, val)
            elif key == REFS_KEY:
                out[key] = [
                    r if isinstance(r, torch.Tensor) else self.colour(f"refs[{j}]", r)
                    for j, r in enumerate(val)
                ]
            elif key in ("depth", "pseudo_depth"):
                arr = _check_map(key, val)
                out[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)[None])
            elif is_map_key(key):
                arr = _check_map(key, val)
                if arr.dtype.kind in "biu":
                    out[key] = _integer_map_tensor(arr)
                else:
                    out[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)[None])
            elif key == "K":
                out[key] = torch.as_tensor(np.asarray(val, dtype=np.float32).reshape(3, 3))
            elif key == MOTION_KEY:
                out[key] = torch.as_tensor(np.asarray(val, dtype=np.float32).reshape(-1, 4, 4))
        return out

    @staticmethod
    def colour(key: str, arr: Any) -> torch.Tensor:
        arr = _check_colour(key, arr)
        chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
        return torch.from_numpy(chw) / 255.0

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """(x - mean_c) / std_c on the colour tensors only (spec 1.5 step 5); maps and K untouched.

    Defaults are SC-Depth's (0.45 / 0.225 for every channel); pass :data:`IMAGENET_MEAN` /
    :data:`IMAGENET_STD` for SimMIM. Returns new tensors (the input sample is not modified).
    """

    def __init__(
        self, mean: Sequence[float] = SC_DEPTH_MEAN, std: Sequence[float] = SC_DEPTH_STD
    ) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize: need as many means as positive stds, got {mean}, {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def _norm(self, key: str, t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != len(self.mean):
            raise TypeError(
                f"Normalize: {key} must be a ({len(self.mean)}, H, W) tensor (apply ToTensor "
                f"first), found {type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
            )
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device)[:, None, None]
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device)[:, None, None]
        return (t - mean) / std

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        out = dict(sample)
        if IMAGE_KEY in sample:
            out[IMAGE_KEY] = self._norm(IMAGE_KEY, sample[IMAGE_KEY])
        if REFS_KEY in sample:
            out[REFS_KEY] = [self._norm(f"refs[{j}]", r) for j, r in enumerate(sample[REFS_KEY])]
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# ----------------------------------------------------------------------------- recipes


def sc_depth_train_transforms(
    size: tuple[int, int] = (256, 320), cx_rule: str = "reference", max_scale: float = 1.15
) -> Compose:
    """SC-Depth's training chain (spec 1.5): flip, scale-crop, resize, to tensor, normalise."""
    return Compose(
        [
            HorizontalFlip(0.5, cx_rule=cx_rule),
            RandomScaleCrop(max_scale),
            Resize(size),
            ToTensor(),
            Normalize(SC_DEPTH_MEAN, SC_DEPTH_STD),
        ]
    )


def sc_depth_eval_transforms(
    size: tuple[int, int] = (256, 320), full_resolution: Iterable[str] = ("depth",)
) -> Compose:
    """SC-Depth's validation/test chain (spec 1.5, 1.7): resize, to tensor, normalise.

    Keys in ``full_resolution`` (default the ground-truth ``depth``) are not resized: the
    reference evaluates against full-resolution ground truth.
    """
    return Compose(
        [Resize(size, exclude=full_resolution), ToTensor(), Normalize(SC_DEPTH_MEAN, SC_DEPTH_STD)]
    )
