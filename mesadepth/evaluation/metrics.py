"""NYUv2 depth metrics, evaluation masks, prediction sanitising and per-image averaging.

Spec: masked-pretraining-and-finetuning.md 2.8 (MIM-Depth's protocol, pitfalls 26-29) and
datasets-and-ibims-evaluation.md 2.5 (the 654-image NYUv2 protocol, BTS variants).

Depth is in metres everywhere. Per-image metrics are computed in float64 (the reference uses
float32 torch tensors; the difference is ~1e-7 relative); the valid-range test is done in
float32 as the reference does, so a GT of exactly 1 mm or 10 m is excluded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mesadepth.errors import ConfigError

__all__ = [
    "ALL_METRICS",
    "COLUMN_HEADERS",
    "EIGEN_CROP_480X640",
    "MAX_DEPTH_EVAL",
    "METRIC_NAMES",
    "MIN_DEPTH_EVAL",
    "MetricAverager",
    "PAPER_COLUMNS",
    "REFERENCE_COLUMNS",
    "SCALED_METRICS",
    "depth_metrics",
    "eigen_crop_bounds",
    "eigen_crop_mask",
    "format_table",
    "median_scaled_metrics",
    "sanitize_prediction",
    "valid_mask",
]

#: Valid GT range of the NYUv2 protocol, both ends excluded (spec 2.8), metres.
MIN_DEPTH_EVAL = 1e-3
MAX_DEPTH_EVAL = 10.0
#: Eigen crop at 480 x 640 as end-exclusive slices (row0, row1, col0, col1) (pitfall 29).
EIGEN_CROP_480X640: tuple[int, int, int, int] = (45, 471, 41, 601)
_REF_H, _REF_W = 480, 640

#: MIM-Depth's metrics in the order its test script prints them (spec 2.8).
METRIC_NAMES: tuple[str, ...] = (
    "d1",
    "d2",
    "d3",
    "abs_rel",
    "sq_rel",
    "rmse",
    "rmse_log",
    "log10",
    "silog",
)
#: Everything :func:`depth_metrics` returns: MIM's set plus BTS's SILog.
ALL_METRICS: tuple[str, ...] = (*METRIC_NAMES, "silog_bts")
#: Columns of the MeSa paper's NYUv2 table (Table 1), in its order.
PAPER_COLUMNS: tuple[str, ...] = ("rmse", "d1", "d2", "d3", "abs_rel", "log10")
#: The reference's printed order (spec 2.8).
REFERENCE_COLUMNS: tuple[str, ...] = METRIC_NAMES
#: Display names used by :func:`format_table`.
COLUMN_HEADERS: dict[str, str] = {
    "d1": "d1",
    "d2": "d2",
    "d3": "d3",
    "abs_rel": "AbsRel",
    "sq_rel": "SqRel",
    "rmse": "RMSE",
    "rmse_log": "RMSElog",
    "log10": "log10",
    "silog": "SILog",
    "silog_bts": "SILog(BTS)",
}


def _scale_bound(bound: int, size: int, ref: int) -> int:
    # Round half up (not Python's banker's rounding) so the rule is easy to state and check.
    return int(math.floor(bound * size / ref + 0.5))


def eigen_crop_bounds(h: int, w: int) -> tuple[int, int, int, int]:
    """End-exclusive Eigen-crop slice bounds ``(row0, row1, col0, col1)`` for an h x w map.

    Exactly ``(45, 471, 41, 601)`` at 480 x 640 (spec 2.8, pitfall 29). For other sizes each
    bound b is scaled proportionally and rounded half up: ``floor(b * h / 480 + 0.5)`` for rows,
    ``floor(b * w / 640 + 0.5)`` for columns (e.g. 240 x 320 -> (23, 236, 21, 301)). The scaled
    crop is our extension; the reference only evaluates at 480 x 640.
    """
    if h <= 0 or w <= 0:
        raise ConfigError(f"eigen_crop_bounds: expected a positive size, got {h} x {w}")
    r0, r1, c0, c1 = EIGEN_CROP_480X640
    return (
        _scale_bound(r0, h, _REF_H),
        _scale_bound(r1, h, _REF_H),
        _scale_bound(c0, w, _REF_W),
        _scale_bound(c1, w, _REF_W),
    )


def eigen_crop_mask(h: int, w: int) -> np.ndarray:
    """Boolean (h, w) map, True inside the Eigen crop (see :func:`eigen_crop_bounds`)."""
    r0, r1, c0, c1 = eigen_crop_bounds(h, w)
    mask = np.zeros((h, w), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def valid_mask(
    gt: np.ndarray,
    min_depth: float = MIN_DEPTH_EVAL,
    max_depth: float = MAX_DEPTH_EVAL,
    crop: str | None = "eigen",
) -> np.ndarray:
    """Pixels that count: ``min_depth < gt < max_depth`` AND the crop (spec 2.8, 2.5).

    Args:
        gt: ground-truth depth (..., H, W) in metres (0 = missing); NaN is never valid.
        min_depth, max_depth: strict bounds, compared in float32 like the reference, so a GT of
            exactly 1e-3 or 10 (also when stored as float32) is excluded.
        crop: ``"eigen"`` (the Eigen crop on the last two axes) or ``None`` (no crop).

    Returns:
        Boolean array of ``gt``'s shape.
    """
    gt32 = np.asarray(gt).astype(np.float32)
    mask = (gt32 > np.float32(min_depth)) & (gt32 < np.float32(max_depth))
    if crop == "eigen":
        if gt32.ndim < 2:
            raise ConfigError(f"valid_mask: expected a (..., H, W) map, got shape {gt32.shape}")
        mask &= eigen_crop_mask(*gt32.shape[-2:])
    elif crop is not None:
        raise ConfigError(f"valid_mask: crop must be 'eigen' or None, got {crop!r}")
    return mask


def sanitize_prediction(
    pred: np.ndarray,
    mode: str = "mim",
    min_depth: float = MIN_DEPTH_EVAL,
    max_depth: float = MAX_DEPTH_EVAL,
) -> np.ndarray:
    """Replace non-finite predictions before the metrics; returns a new float array.

    ``mode="mim"`` (MIM-Depth, spec 2.8, pitfall 28): NaN -> ``min_depth``, +inf and -inf ->
    ``max_depth``; finite values untouched (no clamping).
    ``mode="bts"`` (BTS, spec 2.5): NaN -> ``min_depth``, then clip to [min_depth, max_depth]
    (so +inf -> ``max_depth`` and -inf -> ``min_depth``).
    The input is not modified.
    """
    arr = np.asarray(pred)
    out = arr.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64)
    if mode == "mim":
        out[np.isinf(out)] = max_depth
        out[np.isnan(out)] = min_depth
    elif mode == "bts":
        out[np.isnan(out)] = min_depth  # np.clip would keep NaN
        np.clip(out, min_depth, max_depth, out=out)
    else:
        raise ConfigError(f"sanitize_prediction: mode must be 'mim' or 'bts', got {mode!r}")
    return out


def depth_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The NYUv2 metric set of one image over the pixels where ``mask`` is True (spec 2.8).

    Args:
        pred: predicted depth, metres, already sanitised (:func:`sanitize_prediction`).
        gt: ground-truth depth, metres, same shape.
        mask: boolean, same shape (usually :func:`valid_mask`).

    Returns:
        ``{name: float}`` for :data:`ALL_METRICS`: d1-d3 (fraction with
        max(g/p, p/g) < 1.25^k, strict), abs_rel, sq_rel, rmse (m), rmse_log, log10, silog =
        sqrt(mean e^2 - 0.5 (mean e)^2) with e = ln p - ln g (MIM, lambda 0.5, no x100), and
        silog_bts = 100 sqrt(mean e^2 - (mean e)^2) (BTS). All NaN when no pixel is selected.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    mask = np.asarray(mask)
    if pred.shape != gt.shape or mask.shape != gt.shape:
        raise ConfigError(
            f"depth_metrics: pred {pred.shape}, gt {gt.shape} and mask {mask.shape} must have "
            "the same shape"
        )
    if mask.dtype != bool:
        raise ConfigError(f"depth_metrics: mask must be boolean, got {mask.dtype}")
    if not mask.any():
        return dict.fromkeys(ALL_METRICS, math.nan)
    p = pred[mask].astype(np.float64)
    g = gt[mask].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # A non-positive prediction gives inf/NaN here, as in the reference; sanitise first.
        ratio = np.maximum(g / p, p / g)
        diff = p - g
        e = np.log(p) - np.log(g)
        mean_e2 = np.mean(e * e)
        mean_e = np.mean(e)
        out = {
            "d1": np.mean(ratio < 1.25),
            "d2": np.mean(ratio < 1.25**2),
            "d3": np.mean(ratio < 1.25**3),
            "abs_rel": np.mean(np.abs(diff) / g),
            "sq_rel": np.mean(diff * diff / g),
            "rmse": np.sqrt(np.mean(diff * diff)),
            "rmse_log": np.sqrt(mean_e2),
            "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
            "silog": np.sqrt(mean_e2 - 0.5 * mean_e * mean_e),
            # max(0, .) guards against a tiny negative variance from rounding (e constant).
            "silog_bts": 100.0 * np.sqrt(max(mean_e2 - mean_e * mean_e, 0.0)),
        }
    return {k: float(v) for k, v in out.items()}


#: The video stages' validation metrics (SC-Depth spec 7.1), in the reference's order.
SCALED_METRICS: tuple[str, ...] = (
    "abs_diff",
    "abs_rel",
    "sq_rel",
    "log10",
    "rmse",
    "rmse_log",
    "a1",
    "a2",
    "a3",
)


def _lower_median(x: np.ndarray) -> np.floating:
    # torch.median's convention (the reference's): the lower of the two middle values.
    k = (x.size - 1) // 2
    return np.partition(x, k)[k]


def median_scaled_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    min_depth: float = 0.1,
    max_depth: float = 10.0,
    crop: str | None = "eigen",
) -> dict[str, float] | None:
    """SC-Depth's validation metrics of one image (spec 7.1): median scaling, then the set.

    valid = ``min_depth < gt < max_depth`` and the (scaled) crop; the prediction over those
    pixels is multiplied by median(gt) / median(pred) (lower medians, float32 as the reference)
    and clamped to [min_depth, max_depth]. Keys :data:`SCALED_METRICS` (a1..a3 = d1..d3).

    Args:
        pred: (H, W) predicted depth at ground truth's size, any positive scale.
        gt: (H, W) ground truth in metres (0 = missing).

    Returns:
        The metrics, or None when the image has no valid pixel.
    """
    g = np.asarray(gt, dtype=np.float32)
    p = np.asarray(pred, dtype=np.float32)
    if p.shape != g.shape:
        raise ConfigError(f"median_scaled_metrics: pred {p.shape} and gt {g.shape} differ")
    mask = valid_mask(g, min_depth, max_depth, crop)
    if not mask.any():
        return None
    gv, pv = g[mask], p[mask]
    scale = np.float32(_lower_median(gv)) / np.float32(_lower_median(pv))
    pv = np.clip(pv * scale, np.float32(min_depth), np.float32(max_depth))
    pn, gn = pv.astype(np.float64), gv.astype(np.float64)
    m = depth_metrics(pn, gn, np.ones(gn.shape, dtype=bool))
    return {
        "abs_diff": float(np.mean(np.abs(gn - pn))),
        "abs_rel": m["abs_rel"],
        "sq_rel": m["sq_rel"],
        "log10": m["log10"],
        "rmse": m["rmse"],
        "rmse_log": m["rmse_log"],
        "a1": m["d1"],
        "a2": m["d2"],
        "a3": m["d3"],
    }


class MetricAverager:
    """Accumulate per-image metric dicts; report the plain mean over images (spec 2.8).

    The dataset score is the arithmetic mean of the per-image values (per-image RMSE averaged,
    not a pooled RMSE; pitfall 26). An image whose metrics are all NaN (no valid pixel) would
    poison the reference's mean: it is skipped and counted instead. Any other NaN is kept and
    propagates, as in the reference.
    """

    def __init__(self) -> None:
        self.names: list[str | None] = []
        self.per_image: list[dict[str, float]] = []
        self.skipped: list[str | None] = []

    def add(self, metrics: Mapping[str, float], name: str | None = None) -> bool:
        """Record one image's metrics; returns False when it was skipped (all NaN)."""
        values = {k: float(v) for k, v in metrics.items()}
        if values and all(math.isnan(v) for v in values.values()):
            self.skipped.append(name)
            return False
        if self.per_image and set(values) != set(self.per_image[0]):
            raise ConfigError(
                f"MetricAverager.add: metric names {sorted(values)} differ from the first "
                f"image's {sorted(self.per_image[0])}"
            )
        self.per_image.append(values)
        self.names.append(name)
        return True

    def __len__(self) -> int:
        return len(self.per_image)

    def mean(self) -> dict[str, float]:
        """Plain mean of every metric over the counted images (empty dict before any image)."""
        if not self.per_image:
            return {}
        keys = list(self.per_image[0])
        table = np.array([[m[k] for k in keys] for m in self.per_image], dtype=np.float64)
        return {k: float(v) for k, v in zip(keys, table.mean(axis=0), strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: mean, counts, skipped names and the per-image values."""
        return {
            "mean": self.mean(),
            "n_images": len(self.per_image),
            "n_skipped": len(self.skipped),
            "skipped": list(self.skipped),
            "per_image": [
                {"name": n, **m} for n, m in zip(self.names, self.per_image, strict=True)
            ],
        }


def format_table(
    metrics: Mapping[str, float], columns: Sequence[str] = PAPER_COLUMNS, digits: int = 3
) -> str:
    """Two-line text table (header, values) of ``metrics`` in ``columns`` order.

    Default order is the paper's NYUv2 table (:data:`PAPER_COLUMNS`: RMSE, d1, d2, d3, AbsRel,
    log10); pass :data:`REFERENCE_COLUMNS` for MIM-Depth's printed order.
    """
    missing = [c for c in columns if c not in metrics]
    if missing:
        raise ConfigError(f"format_table: no value for {missing}; available: {sorted(metrics)}")
    headers = [COLUMN_HEADERS.get(c, c) for c in columns]
    values = [f"{float(metrics[c]):.{digits}f}" for c in columns]
    widths = [max(len(h), len(v)) for h, v in zip(headers, values, strict=True)]
    head = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    row = "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
    return f"{head}\n{row}"
