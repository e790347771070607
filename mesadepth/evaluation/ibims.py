"""IBims-1 error metrics exactly as the official Python evaluation (v0.9) computes them.

Spec: datasets-and-ibims-evaluation.md 5.4 (prediction contract), 5.5 (valid mask), 5.6
(global errors), 5.7 (directed depth errors), 5.8 (depth boundary errors), 5.9 (planarity
errors), 5.10 (distance-related errors), 5.11 (aggregation), 5.12 (circulating variants), 5.13
(expected behaviour) and pitfalls 1-10 of section 6.

Two things go beyond the v0.9 driver, both documented where they live: the distance-related
errors of the later metric files (:func:`distance_related_errors`, reported beside the others)
and ``dbe_input="masked"`` (:func:`ibims_image_metrics`), the boundary-error input of the BS-Net
and DANet drivers; the official unmasked input is the default.

Inputs are the sample dicts of :class:`mesadepth.data.ibims.IBimsDataset` (``depth``, ``edges``,
``mask_invalid``, ``mask_transp`` (both 1 = valid), ``mask_wall/table/floor`` label maps,
``planes`` {class: (N, >=7)}, ``calib`` in MATLAB's transposed 1-based layout) and a prediction
(H, W) in metres with NaN where there is none. The official protocol is 480 x 640 with no crop,
no depth cap and no global alignment; the pixel constants (theta = 10 px, 15,360 px planes) are
defined at that size. Other sizes are accepted (tests use them) but are not the official protocol.

Unlike the official functions (which write NaN into the arrays they are given), nothing here
modifies its inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import feature

from mesadepth.errors import ConfigError

__all__ = [
    "CANNY_HIGH",
    "CANNY_LOW",
    "CANNY_SIGMA",
    "DBE_INPUTS",
    "DBE_THETA",
    "DDE_TAU",
    "DISTANCE_BIN_EDGES",
    "DISTANCE_METRICS",
    "IBIMS_IMAGE_METRICS",
    "IBIMS_PLANE_METRICS",
    "OFFICIAL_SHAPE",
    "PLANE_CLASSES",
    "PLANE_MIN_FRACTION",
    "PLANE_MIN_PIXELS",
    "IbimsAverager",
    "depth_boundary_errors",
    "directed_depth_errors",
    "distance_related_errors",
    "global_errors",
    "ibims_image_metrics",
    "ibims_valid_mask",
    "planarity_errors",
    "predicted_edges",
    "prediction_p0",
]

#: The size every official constant refers to (rows, columns).
OFFICIAL_SHAPE: tuple[int, int] = (480, 640)
#: Directed depth error threshold tau (spec 5.7), metres.
DDE_TAU = 3.0
#: Depth boundary error neighbourhood theta (spec 5.8), pixels.
DBE_THETA = 10.0
#: scikit-image Canny parameters of the official DBE (spec 5.8, pitfall 3).
CANNY_SIGMA = math.sqrt(2.0)
CANNY_LOW = 0.15
CANNY_HIGH = 0.30
#: A plane counts when it holds at least 5 % of 640 x 480 = 15,360 valid pixels (spec 5.9).
PLANE_MIN_FRACTION = 0.05
PLANE_MIN_PIXELS = 15360
#: Plane classes in the order the evaluation visits them (spec 5.9).
PLANE_CLASSES: tuple[str, ...] = ("wall", "table", "floor")
#: Per-image metrics of :func:`ibims_image_metrics` (official names, spec 5.11).
IBIMS_IMAGE_METRICS: tuple[str, ...] = (
    "rel",
    "sq_rel",
    "rms",
    "log10",
    "thr1",
    "thr2",
    "thr3",
    "dde_0",
    "dde_m",
    "dde_p",
    "dbe_acc",
    "dbe_com",
)
#: Per-plane metrics, pooled over all planes of all images (spec 5.9, 5.11).
IBIMS_PLANE_METRICS: tuple[str, ...] = ("pe_fla", "pe_ori")
#: What the depth boundary error reads (spec 5.8, 5.12): ``official`` = P0, the unmasked
#: prediction (v0.9 driver, 3d-ken-burns); ``masked`` = P0 x V (BS-Net and DANet drivers).
DBE_INPUTS: tuple[str, ...] = ("official", "masked")
#: Bin edges (metres) of the distance-related errors (spec 5.10): bins [k-1, k], k = 1..20.
DISTANCE_BIN_EDGES: tuple[float, ...] = tuple(float(k) for k in range(21))
#: Metrics of each distance bin, in the official function's order of names (spec 5.10).
DISTANCE_METRICS: tuple[str, ...] = ("rel", "log10", "rms")


def _check_map(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise ConfigError(f"IBims metrics: {name} must have shape {shape}, got {arr.shape}")
    return arr


def prediction_p0(pred: np.ndarray) -> np.ndarray:
    """P0 of spec 5.5: the prediction (H, W) as float64 with NaN replaced by 0 (a new array).

    Raises ConfigError on +-inf: the official evaluation has no rule for it (inf x 0 = NaN
    breaks its masking), so the caller must decide (e.g. write NaN for "no prediction").
    """
    pred = np.asarray(pred)
    if pred.ndim != 2 or not (
        np.issubdtype(pred.dtype, np.floating) or np.issubdtype(pred.dtype, np.integer)
    ):
        raise ConfigError(
            f"IBims metrics: expected an (H, W) depth map, got {pred.dtype} {pred.shape}"
        )
    p0 = pred.astype(np.float64)
    if np.isinf(p0).any():
        raise ConfigError("IBims metrics: the prediction holds +-inf; use NaN for no prediction")
    p0[np.isnan(p0)] = 0.0
    return p0


def ibims_valid_mask(
    depth: np.ndarray, pred0: np.ndarray, mask_invalid: np.ndarray, mask_transp: np.ndarray
) -> np.ndarray:
    """V of spec 5.5: mask_transp x mask_invalid x [depth != 0] x [P0 != 0], as a bool (H, W).

    ``mask_invalid`` and ``mask_transp`` are 1 on valid pixels despite their names (pitfall 1).
    """
    depth = np.asarray(depth)
    shape = depth.shape
    pred0 = _check_map("pred0", pred0, shape)
    mask_invalid = _check_map("mask_invalid", mask_invalid, shape)
    mask_transp = _check_map("mask_transp", mask_transp, shape)
    return (mask_transp > 0) & (mask_invalid > 0) & (depth != 0) & (pred0 != 0)


def _selected(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The official code filters G != 0 and P != 0 separately; by construction of V both are the
    # pixels of V in the same order (spec 5.6), so one common mask is equivalent.
    gt = np.asarray(gt)
    valid = _check_map("valid", valid, gt.shape).astype(bool)
    pred = _check_map("pred", pred, gt.shape)
    return gt[valid].astype(np.float64), pred[valid].astype(np.float64)


_GLOBAL_KEYS = ("rel", "sq_rel", "rms", "log10", "thr1", "thr2", "thr3")


def _errors_of(g: np.ndarray, p: np.ndarray) -> dict[str, float]:
    # The global errors of spec 5.6 on paired 1-D value vectors; all NaN when empty.
    if g.size == 0:
        return dict.fromkeys(_GLOBAL_KEYS, math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Negative predictions give NaN logs here exactly as in the official code.
        ratio = np.maximum(g / p, p / g)
        diff = g - p
        values = (
            np.mean(np.abs(diff) / g),
            np.mean(diff * diff / g),
            np.sqrt(np.mean(diff * diff)),
            np.mean(np.abs(np.log10(g) - np.log10(p))),
            np.mean(ratio < 1.25),
            np.mean(ratio < 1.25**2),
            np.mean(ratio < 1.25**3),
        )
    return {k: float(v) for k, v in zip(_GLOBAL_KEYS, values, strict=True)}


def global_errors(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Global errors of one image on the valid pixels (spec 5.6).

    Args:
        gt, pred: depth (H, W) in metres; ``valid``: bool (H, W), usually :func:`ibims_valid_mask`.

    Returns:
        ``rel`` = mean|g - p|/g, ``sq_rel`` = mean (g - p)^2/g, ``rms`` (m), ``log10`` =
        mean|log10 g - log10 p|, ``thr1..3`` = fraction with max(g/p, p/g) < 1.25^k (strict).
        All NaN when no pixel is valid.
    """
    return _errors_of(*_selected(gt, pred, valid))


def distance_related_errors(
    gt: np.ndarray,
    pred: np.ndarray,
    valid: np.ndarray,
    bin_edges: tuple[float, ...] | list[float] = DISTANCE_BIN_EDGES,
) -> dict[str, list[float]]:
    """Distance-related errors of one image: the global errors per GT depth bin (spec 5.10).

    The official metric file's ``compute_distance_related_errors`` (absent from the v0.9
    driver's output; the BS-Net and DANet drivers compute it per image and print nothing):
    for k = 1..20 the valid pixels with k-1 <= g <= k metres, closed on both sides, so a GT
    value exactly on an edge counts in both bins; pixels beyond 20 m fall in no bin.

    Args:
        gt, pred: depth (H, W) in metres (pred = P0); ``valid``: bool (H, W), V of spec 5.5.
        bin_edges: increasing edges in metres, default 0, 1, ..., 20 (the official bins).

    Returns:
        ``{"rel", "log10", "rms"}``, each a list with one value per bin, defined as in
        :func:`global_errors`; NaN for an empty bin. (The reference stores them as float32;
        these are float64, like the other metrics here.)
    """
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
        raise ConfigError(
            f"distance_related_errors: bin_edges must be >= 2 increasing values, got {bin_edges!r}"
        )
    g, p = _selected(gt, pred, valid)
    out: dict[str, list[float]] = {k: [] for k in DISTANCE_METRICS}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):  # one pass per bin, not per pixel
        sel = (g >= lo) & (g <= hi)
        errors = _errors_of(g[sel], p[sel])
        for k in DISTANCE_METRICS:
            out[k].append(errors[k])
    return out


def directed_depth_errors(
    gt: np.ndarray, pred: np.ndarray, valid: np.ndarray, tau: float = DDE_TAU
) -> dict[str, float]:
    """Directed depth errors of one image (spec 5.7), fractions of the valid pixels.

    With b = [depth <= tau]: ``dde_0`` = fraction with b_pred = b_gt, ``dde_m`` = b_pred = 1
    and b_gt = 0 (predicted too close), ``dde_p`` = b_pred = 0 and b_gt = 1 (predicted too
    far). NaN when no pixel is valid.
    """
    g, p = _selected(gt, pred, valid)
    if g.size == 0:
        return {"dde_0": math.nan, "dde_m": math.nan, "dde_p": math.nan}
    near_g = g <= tau
    near_p = p <= tau
    return {
        "dde_0": float(np.mean(near_p == near_g)),
        "dde_m": float(np.mean(near_p & ~near_g)),
        "dde_p": float(np.mean(~near_p & near_g)),
    }


def predicted_edges(pred0: np.ndarray) -> np.ndarray:
    """Edges of the prediction as the official DBE finds them (spec 5.8 steps 2-3), bool (H, W).

    ``pred0`` is the full prediction, **not** masked by V (pitfall 2), with NaN already 0 (P0).
    It is cast to float32, exact zeros become NaN holes, it is min-max normalised to [0, 1]
    ignoring NaN, and scikit-image's Canny runs with sigma sqrt(2) and absolute thresholds
    0.15 / 0.30. A constant (or empty) prediction normalises to all-NaN and has no edges.
    """
    q = np.asarray(pred0).astype(np.float32)  # astype copies: the input is never touched
    if q.ndim != 2:
        raise ConfigError(f"predicted_edges: expected an (H, W) map, got shape {q.shape}")
    q[q == 0] = np.nan
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # All-NaN maps warn in nanmin/nanmax and divide 0/0; the official code lets both happen.
        warnings.simplefilter("ignore", RuntimeWarning)
        q = q - np.nanmin(q)
        q = q / np.nanmax(q)
        return feature.canny(
            q, sigma=CANNY_SIGMA, low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH
        )


def depth_boundary_errors(
    edges_gt: np.ndarray, pred0: np.ndarray, theta: float = DBE_THETA
) -> tuple[float, float]:
    """Depth boundary errors ``(dbe_acc, dbe_com)`` of one image in pixels (spec 5.8).

    Args:
        edges_gt: GT edge map (H, W), nonzero = edge.
        pred0: the unmasked prediction (H, W) in metres with NaN replaced by 0 (P0), as the
            official evaluation passes it; P0 x V gives the BS-Net / DANet variant
            (``dbe_input="masked"`` of :func:`ibims_image_metrics`).
        theta: neighbourhood in pixels (official 10).

    Returns:
        ``(nan, nan)`` when the GT has no edge pixel; ``(theta, theta)`` when no predicted edge
        lies closer than theta to a GT edge; otherwise accuracy = mean D_gt over predicted edges
        with D_gt < theta (farther ones are dropped), completeness = (sum over predicted edges of
        min(D_gt, theta) + sum over GT edges of min(D_pred, theta)) / (|E_pred| + |E_gt|).
    """
    e_gt = np.asarray(edges_gt) > 0
    pred0 = _check_map("pred0", pred0, e_gt.shape)
    if not e_gt.any():
        return math.nan, math.nan
    e_pred = predicted_edges(pred0)
    # EDT of the non-edge indicator: distance to the nearest edge pixel, 0 on edges (exact).
    d_gt = ndimage.distance_transform_edt(~e_gt)
    near = e_pred & (d_gt < theta)
    if not near.any():
        return float(theta), float(theta)
    acc = float(d_gt[near].mean())
    d_pred = ndimage.distance_transform_edt(~e_pred)
    total = np.minimum(d_gt[e_pred], theta).sum() + np.minimum(d_pred[e_gt], theta).sum()
    com = float(total / (e_pred.sum() + e_gt.sum()))
    return acc, com


def _plane_error(
    rows: np.ndarray,
    cols: np.ndarray,
    p: np.ndarray,
    g: np.ndarray,
    normal_gt: np.ndarray,
    calib: np.ndarray,
) -> tuple[float, float]:
    # NumPy medians (mean of the two middle values), not torch's lower median (spec 5.9 step 6).
    scale = np.median(p) / np.median(g)
    z = p / scale
    fx, fy = calib[0, 0], calib[1, 1]
    cx, cy = calib[2, 0], calib[2, 1]
    # 1-based pixel coordinates and the (right, forward = depth, up) frame (pitfall 6).
    pts = np.stack(((cols + 1.0 - cx) * z / fx, z, -(rows + 1.0 - cy) * z / fy), axis=1)
    if pts.shape[0] < 3 or not np.all(np.isfinite(pts)):
        return math.nan, math.nan  # degenerate plane (the official PCA would fail here)
    centred = pts - pts.mean(axis=0)
    # PCA: the least-variance principal axis is the last right singular vector.
    normal = np.linalg.svd(centred, full_matrices=False)[2][2]
    flat = float(np.std(centred @ normal) * 100.0)  # population std, metres -> cm
    if np.dot(normal, normal_gt) < 0:
        normal = -normal
    ori = math.degrees(
        math.atan2(float(np.linalg.norm(np.cross(normal_gt, normal))), float(normal_gt @ normal))
    )
    return flat, ori


def planarity_errors(
    gt: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    params: np.ndarray,
    calib: np.ndarray,
    valid: np.ndarray,
    min_plane_fraction_of_image: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Planarity errors ``(pe_fla, pe_ori)`` of the planes of one class (spec 5.9).

    Args:
        gt, pred: depth (H, W) in metres (pred = P0; only pixels of ``valid`` are read).
        labels: the class label map (H, W), k = k-th plane (1-based).
        params: plane parameters (N, >=7); row j-1 describes plane j, columns 4-6 its GT normal
            in the (right, forward, up) frame. N = 0 gives empty results.
        calib: (3, 3) in the transposed layout: fx = [0,0], fy = [1,1], cx = [2,0], cy = [2,1]
            (1-based principal point).
        valid: bool (H, W), V of spec 5.5.
        min_plane_fraction_of_image: False (official): a plane needs |Omega_j| / (640 x 480)
            >= 0.05, i.e. 15,360 pixels, whatever the image size. True: |Omega_j| / (H x W) >=
            0.05 instead, a deliberate deviation so that small test images can score planes.

    Returns:
        Two float arrays (N,): flatness in cm (100 x population std of the distances to the
        plane fitted to the median-scaled prediction) and orientation error in degrees (angle
        between the fitted and the GT normal, in [0, 90]). A plane below the size threshold
        (or degenerate) gives NaN in both.
    """
    gt = np.asarray(gt)
    shape = gt.shape
    pred = _check_map("pred", pred, shape)
    labels = _check_map("labels", labels, shape)
    valid = _check_map("valid", valid, shape).astype(bool)
    calib = np.asarray(calib, dtype=np.float64)
    if calib.shape != (3, 3):
        raise ConfigError(f"planarity_errors: calib must be 3x3, got {calib.shape}")
    params = np.asarray(params, dtype=np.float64)
    if params.size == 0:
        return np.zeros(0), np.zeros(0)
    params = np.atleast_2d(params)  # a squeezed single-plane row (pitfall 12)
    if params.ndim != 2 or params.shape[1] < 7:
        raise ConfigError(f"planarity_errors: params must be (N, >=7), got {params.shape}")
    area = float(shape[0] * shape[1]) if min_plane_fraction_of_image else 640.0 * 480.0
    flat = np.full(params.shape[0], math.nan)
    ori = np.full(params.shape[0], math.nan)
    in_class = valid & (labels > 0)  # L = labels x V
    rows_all, cols_all = np.nonzero(in_class)
    lab = labels[rows_all, cols_all]
    for j in range(params.shape[0]):  # loop over planes, not pixels
        sel = lab == j + 1
        count = int(sel.sum())
        # The official test, literally: count / (640 * 480) < 0.05 -> NaN (15,359 fails).
        if count / area < PLANE_MIN_FRACTION:
            continue
        r, c = rows_all[sel], cols_all[sel]
        flat[j], ori[j] = _plane_error(
            r,
            c,
            pred[r, c].astype(np.float64),
            gt[r, c].astype(np.float64),
            params[j, 4:7],
            calib,
        )
    return flat, ori


def _plane_params(sample: Mapping[str, Any], cls: str) -> np.ndarray:
    planes = sample.get("planes")
    if isinstance(planes, Mapping) and cls in planes:
        return np.asarray(planes[cls], dtype=np.float64)
    key = f"mask_{cls}_paras"
    if key in sample:
        return np.asarray(sample[key], dtype=np.float64)
    raise ConfigError(f"IBims metrics: sample has neither planes[{cls!r}] nor {key!r}")


def ibims_image_metrics(
    sample: Mapping[str, Any],
    pred: np.ndarray,
    min_plane_fraction_of_image: bool = False,
    dbe_input: str = "official",
) -> dict[str, Any]:
    """All IBims-1 metrics of one image (spec 5.5-5.10), without modifying the inputs.

    Args:
        sample: an :class:`~mesadepth.data.ibims.IBimsDataset` item (see module docstring).
        pred: predicted depth (H, W) in metres at the GT resolution (480 x 640 officially),
            NaN = no prediction.
        min_plane_fraction_of_image: see :func:`planarity_errors` (default: the official
            constant 15,360 px).
        dbe_input: what the depth boundary error's Canny sees (spec 5.8, 5.12).
            ``"official"`` (default): P0, the whole prediction, only its zeros / NaN are holes
            (the v0.9 driver; sniklaus/3d-ken-burns runs the official scripts). ``"masked"``:
            P0 x V, so every invalid, transparent or unmeasured GT pixel becomes a hole that
            suppresses predicted edges within about 8 px, as the BS-Net and DANet drivers (and
            papers evaluating with their code) compute it. Nothing else changes; the BS-Net
            loader's resize to 304 x 228 is a separate difference not reproduced here.

    Returns:
        ``{name: float}`` for :data:`IBIMS_IMAGE_METRICS`; ``"distance"``: the distance-related
        errors of :func:`distance_related_errors` (lists over :data:`DISTANCE_BIN_EDGES` bins)
        plus ``"bin_edges"``; and ``"planes"``: a list with one dict per plane row (``class``,
        ``label``, ``pixels`` (|Omega_j|), ``pe_fla`` (cm), ``pe_ori`` (degrees)), in the order
        wall, table, floor. Classes without planes add none.
    """
    if dbe_input not in DBE_INPUTS:
        raise ConfigError(
            f"IBims metrics: dbe_input must be one of {', '.join(DBE_INPUTS)}, got {dbe_input!r}"
        )
    depth = np.asarray(sample["depth"])
    if depth.ndim != 2:
        raise ConfigError(f"IBims metrics: depth must be (H, W), got {depth.shape}")
    shape = depth.shape
    p0 = prediction_p0(pred)
    if p0.shape != shape:
        raise ConfigError(
            f"IBims metrics: prediction {p0.shape} must match the GT {shape}; upsample it first"
        )
    valid = ibims_valid_mask(depth, p0, sample["mask_invalid"], sample["mask_transp"])
    gt = depth.astype(np.float64)
    out: dict[str, Any] = {}
    out.update(global_errors(gt, p0, valid))
    out.update(directed_depth_errors(gt, p0, valid))
    # P0 x V as the BS-Net driver forms it: zeros outside V, which Canny then treats as holes.
    dbe_pred = p0 if dbe_input == "official" else np.where(valid, p0, 0.0)
    out["dbe_acc"], out["dbe_com"] = depth_boundary_errors(sample["edges"], dbe_pred)
    out["distance"] = {
        "bin_edges": list(DISTANCE_BIN_EDGES),
        **distance_related_errors(gt, p0, valid),
    }
    planes: list[dict[str, Any]] = []
    calib = np.asarray(sample["calib"], dtype=np.float64)
    for cls in PLANE_CLASSES:
        params = _plane_params(sample, cls)
        if params.size == 0:
            continue  # no plane of this class in the image (pitfall 12)
        labels = _check_map(f"mask_{cls}", sample[f"mask_{cls}"], shape)
        flat, ori = planarity_errors(
            gt, p0, labels, params, calib, valid, min_plane_fraction_of_image
        )
        counts = np.bincount(labels[valid].astype(np.int64).ravel(), minlength=len(flat) + 1)
        for j in range(len(flat)):
            planes.append(
                {
                    "class": cls,
                    "label": j + 1,
                    "pixels": int(counts[j + 1]),
                    "pe_fla": float(flat[j]),
                    "pe_ori": float(ori[j]),
                }
            )
    out["planes"] = planes
    return out


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


class IbimsAverager:
    """Aggregate :func:`ibims_image_metrics` results over a dataset (spec 5.11).

    Per-image metrics: NaN-ignoring mean over images (an image without GT edges has NaN DBE and
    drops out of those two means only). Planarity: the planes of every class of every image are
    pooled and NaN-averaged (planes under the size threshold are NaN and excluded).
    Distance-related errors (spec 5.10): per bin, the NaN-ignoring mean over the images that
    have pixels in that bin. The reference drivers compute them per image and print no
    aggregate; this reducer is the one 5.11 gives every other per-image metric.
    """

    def __init__(self) -> None:
        self.names: list[str | None] = []
        self.per_image: list[dict[str, float]] = []
        self.planes: list[dict[str, Any]] = []
        self.distance: list[dict[str, list[float]] | None] = []
        self.bin_edges: list[float] | None = None

    def add(self, result: Mapping[str, Any], name: str | None = None) -> None:
        """Record one image's result of :func:`ibims_image_metrics`."""
        dist = result.get("distance")
        if dist is not None:
            edges = [float(e) for e in dist.get("bin_edges", DISTANCE_BIN_EDGES)]
            if self.bin_edges is None:
                self.bin_edges = edges
            elif edges != self.bin_edges:
                raise ConfigError(
                    f"IbimsAverager: image {name!r} has distance bins {edges}, the earlier "
                    f"images {self.bin_edges}"
                )
            dist = {k: [float(v) for v in dist[k]] for k in DISTANCE_METRICS}
        self.per_image.append({k: float(result[k]) for k in IBIMS_IMAGE_METRICS})
        self.names.append(name)
        self.distance.append(dist)
        self.planes.extend({"name": name, **plane} for plane in result.get("planes", []))

    def __len__(self) -> int:
        return len(self.per_image)

    def mean(self) -> dict[str, float]:
        """NaN-mean of every per-image metric, and pooled NaN-means ``pe_fla`` and ``pe_ori``."""
        out = {k: _nanmean([m[k] for m in self.per_image]) for k in IBIMS_IMAGE_METRICS}
        for k in IBIMS_PLANE_METRICS:
            out[k] = _nanmean([p[k] for p in self.planes])
        return out

    def distance_mean(self) -> dict[str, Any] | None:
        """Per-bin NaN-means over images of the distance-related errors; None without any.

        Returns ``{"bin_edges": [m], "rel": [...], "log10": [...], "rms": [...],
        "n_images": [...]}``, one value per bin; ``n_images`` counts the images with a value
        in the bin (pixels there), an empty bin's mean is NaN.
        """
        rows = [d for d in self.distance if d is not None]
        if not rows or self.bin_edges is None:
            return None
        out: dict[str, Any] = {"bin_edges": list(self.bin_edges)}
        for k in DISTANCE_METRICS:
            table = np.array([d[k] for d in rows], dtype=np.float64)  # (images, bins)
            out[k] = [_nanmean(list(col)) for col in table.T]
        rel = np.array([d["rel"] for d in rows], dtype=np.float64)
        out["n_images"] = [int(n) for n in (~np.isnan(rel)).sum(axis=0)]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: means, counts, per-image values, every plane and the
        distance-related errors (``distance``, when the results hold them)."""
        per_image = []
        for n, m, d in zip(self.names, self.per_image, self.distance, strict=True):
            row: dict[str, Any] = {"name": n, **m}
            if d is not None:
                row["distance"] = d
            per_image.append(row)
        out: dict[str, Any] = {
            "mean": self.mean(),
            "n_images": len(self.per_image),
            "n_images_with_edges": sum(not math.isnan(m["dbe_acc"]) for m in self.per_image),
            "n_planes": len(self.planes),
            "n_planes_scored": sum(not math.isnan(p["pe_fla"]) for p in self.planes),
            "per_image": per_image,
            "planes": list(self.planes),
        }
        distance = self.distance_mean()
        if distance is not None:
            out["distance"] = distance
        return out
