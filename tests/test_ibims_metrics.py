"""IBims-1 metrics against the behaviour the official evaluation shows (spec 5.5-5.13, section 6)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from mesadepth.data.ibims import IBimsDataset, calib_from_K, write_ibims_mat, write_imagelist
from mesadepth.errors import ConfigError
from mesadepth.evaluation.ibims import (
    DISTANCE_BIN_EDGES,
    PLANE_MIN_PIXELS,
    IbimsAverager,
    depth_boundary_errors,
    directed_depth_errors,
    distance_related_errors,
    global_errors,
    ibims_image_metrics,
    ibims_valid_mask,
    planarity_errors,
    predicted_edges,
)

H, W = 480, 640
FX = FY = 500.0
# 0-based principal point at the image centre; calib stores it 1-based and transposed.
CALIB = calib_from_K(np.array([[FX, 0.0, 319.5], [0.0, FY, 239.5], [0.0, 0.0, 1.0]]))


def make_sample(
    depth: np.ndarray,
    edges: np.ndarray | None = None,
    planes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    calib: np.ndarray = CALIB,
) -> dict:
    """A dict shaped like an IBimsDataset item; ``planes`` maps class -> (labels, normals (N, 3))."""
    h, w = depth.shape
    sample = {
        "depth": depth.astype(np.float32),
        "edges": np.zeros((h, w), np.uint8) if edges is None else edges.astype(np.uint8),
        "mask_invalid": np.ones((h, w), np.uint8),
        "mask_transp": np.ones((h, w), np.uint8),
        "calib": calib.copy(),
        "planes": {},
    }
    for cls in ("wall", "table", "floor"):
        if planes and cls in planes:
            labels, normals = planes[cls]
            params = np.zeros((len(normals), 7))
            params[:, 4:7] = normals
            sample[f"mask_{cls}"] = labels.astype(np.int32)
            sample["planes"][cls] = params
        else:
            sample[f"mask_{cls}"] = np.zeros((h, w), np.int32)
            sample["planes"][cls] = np.zeros((0, 7))
    return sample


def plane_depth(normal: np.ndarray, d: float, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """Depth of the plane n . X = d in the IBims frame (X right, Y = depth forward, Z up).

    With u = c + 1, v = r + 1: X = (u - cx) z / fx, Y = z, Z = -(v - cy) z / fy, so
    z = d / (n_x (u - cx) / fx + n_y - n_z (v - cy) / fy).
    """
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    cx, cy = CALIB[2, 0], CALIB[2, 1]
    nx, ny, nz = normal
    return d / (nx * (c + 1 - cx) / FX + ny - nz * (r + 1 - cy) / FY)


def step_prediction() -> np.ndarray:
    # Spec 5.13 case 5: 2 m on columns 0..319, 4 m on columns 320..639.
    pred = np.full((H, W), 2.0, np.float32)
    pred[:, 320:] = 4.0
    return pred


def column_edges(col: int) -> np.ndarray:
    edges = np.zeros((H, W), np.uint8)
    edges[:, col] = 1
    return edges


# ---------------------------------------------------------------- global and directed errors


def test_prediction_equal_to_gt_is_perfect_and_masked_pixels_do_not_count() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 8.0, (48, 64)).astype(np.float32)
    depth[:5] = 0.0  # no laser return
    sample = make_sample(depth)
    sample["mask_transp"][10:20, 10:20] = 0  # glass: a wildly wrong prediction there is ignored
    sample["mask_invalid"][30:, :8] = 0  # 1 = valid (pitfall 1)
    pred = depth.astype(np.float64)
    pred[10:20, 10:20] *= 10.0
    pred[30:, :8] = 100.0
    pred[5, :] = np.nan  # no prediction -> P0 = 0 -> outside V
    res = ibims_image_metrics(sample, pred)
    # Spec 5.13 #1.
    for k in ("rel", "sq_rel", "rms", "log10"):
        assert res[k] == 0.0
    assert res["thr1"] == res["thr2"] == res["thr3"] == 1.0
    assert res["dde_0"] == 1.0 and res["dde_m"] == 0.0 and res["dde_p"] == 0.0


def test_valid_mask_is_the_product_of_the_four_conditions() -> None:
    depth = np.array([[1.0, 0.0, 2.0, 3.0, 4.0]])
    pred0 = np.array([[1.0, 1.0, 0.0, 3.0, 4.0]])
    mask_invalid = np.array([[1, 1, 1, 0, 1]], np.uint8)
    mask_transp = np.array([[1, 1, 1, 1, 0]], np.uint8)
    v = ibims_valid_mask(depth, pred0, mask_invalid, mask_transp)
    np.testing.assert_array_equal(v, [[True, False, False, False, False]])


def test_global_errors_hand_computed() -> None:
    # Valid pixels g = [1, 2, 4], p = [2, 2, 1] (the 4th pixel is outside V):
    # |g-p|/g = [1, 0, 0.75] -> rel = 1.75/3; (g-p)^2 = [1, 0, 9] -> sq_rel = (1 + 9/4)/3,
    # rms = sqrt(10/3); log10 = (log10 2 + 0 + log10 4)/3 = log10(8)/3; ratios [2, 1, 4] are
    # all >= 1.25^3 = 1.953125 except the exact pixel, so thr1 = thr2 = thr3 = 1/3.
    g = np.array([[1.0, 2.0, 4.0, 9.0]])
    p = np.array([[2.0, 2.0, 1.0, 0.0]])
    valid = np.array([[True, True, True, False]])
    res = global_errors(g, p, valid)
    assert res["rel"] == pytest.approx(1.75 / 3)
    assert res["sq_rel"] == pytest.approx(3.25 / 3)
    assert res["rms"] == pytest.approx(math.sqrt(10 / 3))
    assert res["log10"] == pytest.approx(math.log10(8) / 3)
    assert res["thr1"] == pytest.approx(1 / 3)
    assert res["thr2"] == pytest.approx(1 / 3)
    assert res["thr3"] == pytest.approx(1 / 3)
    # 1.25^2 = 1.5625 < 1.6 < 1.953125 = 1.25^3: a ratio of 1.6 counts for thr3 only.
    res = global_errors(np.array([[1.0]]), np.array([[1.6]]), np.array([[True]]))
    assert (res["thr1"], res["thr2"], res["thr3"]) == (0.0, 0.0, 1.0)
    assert math.isnan(global_errors(g, p, np.zeros_like(valid))["rel"])


def test_directed_depth_errors() -> None:
    # Spec 5.13 #2: GT 2 m, prediction 4 m -> predicted too far everywhere.
    gt = np.full((8, 8), 2.0)
    res = directed_depth_errors(gt, np.full((8, 8), 4.0), np.ones((8, 8), bool))
    assert (res["dde_0"], res["dde_m"], res["dde_p"]) == (0.0, 0.0, 1.0)
    res = directed_depth_errors(np.full((8, 8), 4.0), gt, np.ones((8, 8), bool))
    assert (res["dde_0"], res["dde_m"], res["dde_p"]) == (0.0, 1.0, 0.0)
    # tau = 3 m is on the near side (<=): g = 3.0 and p = 3.0 agree, g = 3.0 vs p = 3.01 does not.
    # Pixels: (3, 3) same side, (3, 3.01) too far, (3.01, 2) too close, (1, 1) same side.
    g = np.array([[3.0, 3.0, 3.01, 1.0]])
    p = np.array([[3.0, 3.01, 2.0, 1.0]])
    res = directed_depth_errors(g, p, np.ones_like(g, bool))
    assert (res["dde_0"], res["dde_m"], res["dde_p"]) == (0.5, 0.25, 0.25)


# ---------------------------------------------------------------- depth boundary errors


def test_dbe_nan_without_gt_edges_and_max_for_a_constant_prediction() -> None:
    pred = np.full((H, W), 3.0)
    # Spec 5.13 #3: no GT edge -> NaN, NaN.
    acc, com = depth_boundary_errors(np.zeros((H, W), np.uint8), step_prediction())
    assert math.isnan(acc) and math.isnan(com)
    # Spec 5.13 #4: a constant prediction has no edge -> theta, theta = 10, 10.
    assert not predicted_edges(pred).any()
    assert depth_boundary_errors(column_edges(319), pred) == (10.0, 10.0)


def test_dbe_regression_values_of_spec_case_5() -> None:
    pred = step_prediction()
    e = predicted_edges(pred)
    # 478 edge pixels on rows 1..478: 474 on column 319 and 4 (rows 1, 2, 477, 478) on 320.
    assert e.sum() == 478
    assert e[:, 319].sum() == 474
    np.testing.assert_array_equal(np.nonzero(e[:, 320])[0], [1, 2, 477, 478])
    assert e[:, :319].sum() == 0 and e[:, 321:].sum() == 0
    acc, com = depth_boundary_errors(column_edges(319), pred)
    assert round(acc, 4) == 0.0084 and round(com, 4) == 0.0113
    # Exactly: acc = 4 x 1 px / 478 (the column-320 pixels). com: predicted -> GT gives 4 x 1;
    # GT -> predicted gives 0 on rows 3..476, 1 px on rows 1, 2, 477, 478 (their edge moved
    # to column 320) and sqrt 2 on rows 0 and 479 (nearest: (1, 320) and (478, 320)).
    assert acc == pytest.approx(4 / 478, abs=1e-12)
    assert com == pytest.approx((4 + 4 + 2 * math.sqrt(2)) / (478 + 480), abs=1e-12)
    acc, com = depth_boundary_errors(column_edges(320), pred)
    assert round(acc, 4) == 0.9916 and round(com, 4) == 0.9916
    # acc = 474 x 1 / 478; com = (474 + [474 GT rows at 1 px + rows 0, 479 at 1 px]) / 958.
    assert acc == pytest.approx(474 / 478, abs=1e-12)
    assert com == pytest.approx((474 + 476) / 958, abs=1e-12)


def test_dbe_grows_with_the_shift_of_the_gt_edge_and_drops_far_edges() -> None:
    pred = step_prediction()
    accs, coms = [], []
    for shift in (0, 2, 4):
        acc, com = depth_boundary_errors(column_edges(319 + shift), pred)
        accs.append(acc)
        coms.append(com)
    # GT on column 319 + k: 474 predicted pixels at k px and 4 at k - 1 px (k >= 1).
    assert accs == pytest.approx([4 / 478, (474 * 2 + 4 * 1) / 478, (474 * 4 + 4 * 3) / 478])
    assert coms[0] < coms[1] < coms[2]
    # GT on column 329: column 319 is 10 px away (not < theta, dropped), column 320 9 px away,
    # so the accuracy averages only those 4 pixels: exactly 9.
    acc, com = depth_boundary_errors(column_edges(329), pred)
    assert acc == 9.0 and 9.0 < com < 10.0
    # GT on column 330: nothing within 10 px -> the maximum for both.
    assert depth_boundary_errors(column_edges(330), pred) == (10.0, 10.0)


def test_canny_ramp_threshold_is_8_times_the_slope() -> None:
    # Spec 5.13 #8: a ramp of slope s (normalised units per pixel) has Sobel magnitude 8 s.
    # Across n columns s = 1 / (n - 1): n = 27 -> 8 s = 0.308 >= 0.30 (edges),
    # n = 28 -> 8 s = 0.296 < 0.30 (no pixel reaches the high threshold, no edge at all).
    for n, has_edges in ((27, True), (28, False)):
        ramp = np.tile(np.linspace(1.0, 2.0, n), (100, 1))
        assert predicted_edges(ramp).any() == has_edges


def test_dbe_zeros_are_holes_and_the_prediction_is_not_masked() -> None:
    pred = step_prediction()
    holed = pred.copy()
    holed[200:211, 310:317] = 0.0  # predicted zeros: NaN holes for Canny (spec 5.8)
    e = predicted_edges(holed)
    empty_rows = [r for r in range(H) if not e[r].any()]
    # The hole (rows 200..210) suppresses edges 8 rows around it, plus the border rows.
    assert empty_rows == [0, *range(192, 219), 479]
    # Pitfall 2: an invalid GT region over the edge does not hide the prediction's edge,
    # because the DBE sees P0, not P0 x V.
    sample = make_sample(np.full((H, W), 3.0), edges=column_edges(319))
    sample["mask_invalid"][100:300, 300:340] = 0
    res = ibims_image_metrics(sample, pred)
    assert (res["dbe_acc"], res["dbe_com"]) == depth_boundary_errors(column_edges(319), pred)
    masked = pred * ibims_valid_mask(
        sample["depth"], pred, sample["mask_invalid"], sample["mask_transp"]
    )
    assert depth_boundary_errors(column_edges(319), masked) != (res["dbe_acc"], res["dbe_com"])


def test_masked_dbe_input_hides_edges_near_invalid_pixels() -> None:
    # Spec 5.12: BS-Net / DANet pass P0 x V to the DBE. Step of spec case 5, GT edge on column
    # 319, GT invalid on rows 100..299 x columns 310..329 (over the edge).
    pred = step_prediction()
    sample = make_sample(np.full((H, W), 3.0), edges=column_edges(319))
    sample["mask_invalid"][100:300, 310:330] = 0
    official = ibims_image_metrics(sample, pred)
    masked = ibims_image_metrics(sample, pred, dbe_input="masked")
    # Official: the mask is not seen, so the values are spec case 5's exactly.
    assert official["dbe_acc"] == pytest.approx(4 / 478, abs=1e-12)
    assert official["dbe_com"] == pytest.approx((4 + 4 + 2 * math.sqrt(2)) / 958, abs=1e-12)
    # Masked: the zeros are NaN holes that suppress edges 8 rows around them (spec 5.8), so
    # rows 92..307 lose their edge. Left: rows 1..91 and 308..478 (91 + 171 = 262 pixels),
    # rows 1, 2, 477, 478 on column 320 (1 px from the GT), the rest on 319.
    assert masked["dbe_acc"] == pytest.approx(4 / 262, abs=1e-12)
    # GT -> predicted: rows 1, 2, 477, 478 at 1 px, rows 0 and 479 at sqrt 2, rows 92..307 at
    # min(r - 91, 308 - r, 10): 1..10 twice (55 + 55) and 10 on the 196 rows between.
    gt_to_pred = 4 + 2 * math.sqrt(2) + 55 + 55 + 196 * 10
    assert masked["dbe_com"] == pytest.approx((4 + gt_to_pred) / (262 + 480), abs=1e-12)
    # Only the DBE depends on the option.
    for k in ("rel", "rms", "thr1", "dde_0"):
        assert masked[k] == official[k]
    # An invalid band over the whole edge: the masked prediction has no edge at all (10, 10),
    # the official one still scores spec case 5.
    band = make_sample(np.full((H, W), 3.0), edges=column_edges(319))
    band["mask_transp"][:, 300:340] = 0
    res = ibims_image_metrics(band, pred, dbe_input="masked")
    assert (res["dbe_acc"], res["dbe_com"]) == (10.0, 10.0)
    assert ibims_image_metrics(band, pred)["dbe_acc"] == pytest.approx(4 / 478, abs=1e-12)


def test_masked_dbe_input_equals_official_when_every_gt_pixel_is_valid() -> None:
    # V = [P0 != 0] when the masks and the GT are all valid, and P0 x V = P0 then: the two
    # variants must agree exactly, holes of the prediction included.
    rng = np.random.default_rng(1)
    gt = np.full((H, W), 2.0)
    gt[:, 200:] = 5.0
    gt[300:, 450:] = 3.0
    edges = np.zeros((H, W), np.uint8)
    edges[:, 199] = edges[299, 450:] = 1
    pred = gt * rng.uniform(0.9, 1.1, (H, W)).round(1)
    pred[50:60, 100:110] = np.nan
    pred[400:405, 500:520] = 0.0
    sample = make_sample(gt, edges=edges)
    official = ibims_image_metrics(sample, pred)
    masked = ibims_image_metrics(sample, pred, dbe_input="masked")
    assert 0 < official["dbe_acc"] < 10
    assert (masked["dbe_acc"], masked["dbe_com"]) == (official["dbe_acc"], official["dbe_com"])
    with pytest.raises(ConfigError, match="dbe_input"):
        ibims_image_metrics(sample, pred, dbe_input="bsnet")


# ---------------------------------------------------------------- distance-related errors


def test_distance_related_errors_per_bin_hand_computed() -> None:
    # Spec 5.10: bins [k-1, k] metres, k = 1..20, closed on both sides.
    g = np.array([[0.5, 1.5, 2.0, 3.0, 5.5, 7.0, 25.0, 19.5]])
    p = np.array([[0.6, 1.2, 2.0, 3.3, 50.0, 0.0, 20.0, 19.5]])
    # Pixel 4 is outside V (e.g. transparent), pixel 5 has no prediction, pixel 6 is beyond 20 m.
    valid = np.array([[True, True, True, True, False, False, True, True]])
    d = distance_related_errors(g, p, valid)
    assert set(d) == {"rel", "log10", "rms"} and all(len(v) == 20 for v in d.values())
    # Bin 1 (0-1 m): g 0.5, p 0.6.
    assert d["rel"][0] == pytest.approx(0.2, abs=1e-12)
    assert d["rms"][0] == pytest.approx(0.1, abs=1e-12)
    assert d["log10"][0] == pytest.approx(math.log10(1.2), abs=1e-12)
    # Bin 2 (1-2 m): g 1.5 (p 1.2) and g 2.0 (p 2.0, the edge value also counts in bin 3).
    assert d["rel"][1] == pytest.approx(0.1, abs=1e-12)
    assert d["rms"][1] == pytest.approx(math.sqrt(0.09 / 2), abs=1e-12)
    assert d["log10"][1] == pytest.approx(math.log10(1.25) / 2, abs=1e-12)
    # Bin 3 (2-3 m): g 2.0 exact and g 3.0 (p 3.3), which again also counts in bin 4.
    assert d["rel"][2] == pytest.approx(0.05, abs=1e-12)
    assert d["rms"][2] == pytest.approx(math.sqrt(0.09 / 2), abs=1e-12)
    assert d["log10"][2] == pytest.approx(math.log10(1.1) / 2, abs=1e-12)
    # Bin 4 (3-4 m): g 3.0 alone.
    assert d["rel"][3] == pytest.approx(0.1, abs=1e-12)
    assert d["rms"][3] == pytest.approx(0.3, abs=1e-12)
    # Bin 20 (19-20 m): exact. Bins 5..19 are empty (the 5.5 m and 7 m pixels are not valid,
    # the 25 m one is in no bin): NaN.
    assert (d["rel"][19], d["rms"][19], d["log10"][19]) == (0.0, 0.0, 0.0)
    for k in ("rel", "log10", "rms"):
        assert all(math.isnan(v) for v in d[k][4:19])
    # Other edges may be given; non-increasing ones are refused.
    coarse = distance_related_errors(g, p, valid, bin_edges=(0.0, 2.0, 30.0))
    assert coarse["rel"][0] == pytest.approx((0.2 + 0.2 + 0.0) / 3, abs=1e-12)
    assert coarse["rel"][1] == pytest.approx((0.0 + 0.1 + 0.2 + 0.0) / 4, abs=1e-12)
    with pytest.raises(ConfigError, match="bin_edges"):
        distance_related_errors(g, p, valid, bin_edges=(0.0, 2.0, 2.0))


def test_distance_errors_in_image_metrics_and_their_means_over_images() -> None:
    # A constructed prediction with a known error per bin: GT rows at 0.5, 1.5, ..., the
    # prediction off by +10 % on the 0.5 m rows and -20 % on the 2.5 m rows, exact elsewhere.
    gt = np.repeat(np.array([0.5, 1.5, 2.5, 3.5]), 12)[:, None] * np.ones((1, 16))
    pred = gt.copy()
    pred[gt == 0.5] *= 1.1
    pred[gt == 2.5] *= 0.8
    a = ibims_image_metrics(make_sample(gt), pred)["distance"]
    assert a["bin_edges"] == list(DISTANCE_BIN_EDGES)
    assert a["rel"][:4] == pytest.approx([0.1, 0.0, 0.2, 0.0], abs=1e-12)
    assert a["rms"][:4] == pytest.approx([0.05, 0.0, 0.5, 0.0], abs=1e-12)
    assert a["log10"][:4] == pytest.approx([math.log10(1.1), 0.0, -math.log10(0.8), 0.0], abs=1e-12)
    # A second image only in bins 1 and 3, with another error there.
    gt_b = np.where(np.arange(48)[:, None] < 24, 0.5, 2.5) * np.ones((1, 16))
    b = ibims_image_metrics(make_sample(gt_b), gt_b * 1.3)["distance"]
    agg = IbimsAverager()
    agg.add(ibims_image_metrics(make_sample(gt), pred), "a")
    agg.add(ibims_image_metrics(make_sample(gt_b), gt_b * 1.3), "b")
    d = agg.to_dict()["distance"]
    assert d["n_images"][:5] == [2, 1, 2, 1, 0] and sum(d["n_images"]) == 6
    # Per bin, the NaN-mean over the images with pixels there.
    assert d["rel"][0] == pytest.approx((0.1 + 0.3) / 2, abs=1e-12)
    assert d["rel"][1] == 0.0
    assert d["rel"][2] == pytest.approx((0.2 + 0.3) / 2, abs=1e-12)
    assert d["rms"][2] == pytest.approx((0.5 + 0.75) / 2, abs=1e-12)
    assert b["rms"][0] == pytest.approx(0.15, abs=1e-12)
    assert all(math.isnan(v) for v in d["rel"][4:])
    per_image = agg.to_dict()["per_image"]
    assert per_image[1]["distance"]["rel"][0] == pytest.approx(0.3, abs=1e-12)
    # Images scored with other bins cannot be averaged with these.
    other = ibims_image_metrics(make_sample(gt_b), gt_b)
    other["distance"]["bin_edges"] = [0.0, 5.0]
    with pytest.raises(ConfigError, match="distance bins"):
        agg.add(other, "c")


# ---------------------------------------------------------------- planarity errors


def test_planarity_floor_and_wall_of_exact_planes_score_zero() -> None:
    # Spec 5.13 #6, floor: camera h = 1.5 m above the floor, GT = h fy / (v - cy) with the
    # 1-based v = r + 1, on rows 300.. (depth under 13 m). The prediction is the GT x 1.7.
    h_cam = 1.5
    v = np.arange(H, dtype=np.float64)[:, None] + 1.0
    floor_rows = np.broadcast_to(v - 1 >= 300, (H, W))
    floor = np.where(floor_rows, h_cam * FY / (v - CALIB[2, 1]), 2.0)
    floor_labels = floor_rows.astype(np.int32)
    sample = make_sample(floor, planes={"floor": (floor_labels, np.array([[0.0, 0.0, 1.0]]))})
    (plane,) = ibims_image_metrics(sample, 1.7 * floor)["planes"]
    assert plane["class"] == "floor" and plane["pixels"] == 180 * W
    assert plane["pe_fla"] < 1e-8 and plane["pe_ori"] < 1e-5
    # The same floor judged against a wall's normal (0, 1, 0) is 90 degrees off.
    params = np.array([[0, 0, 0, 0, 0.0, 1.0, 0.0]])
    valid = np.ones((H, W), bool)
    _, ori = planarity_errors(floor, 1.7 * floor, floor_labels, params, CALIB, valid)
    assert ori[0] == pytest.approx(90.0, abs=1e-6)
    # Wall: constant depth, normal (0, 1, 0); a non-unit GT normal gives the same angle.
    wall_depth = np.full((H, W), 3.0)
    wall = np.ones((H, W), np.int32)
    for n_gt in ([0.0, 1.0, 0.0], [0.0, 2.5, 0.0]):
        sample = make_sample(wall_depth, planes={"wall": (wall, np.array([n_gt]))})
        (plane,) = ibims_image_metrics(sample, 0.5 * wall_depth)["planes"]
        assert plane["pe_fla"] < 1e-8 and plane["pe_ori"] < 1e-5


@pytest.mark.parametrize("axis", ["vertical", "horizontal"])
def test_orientation_error_equals_a_known_tilt_and_survives_a_move_along_the_normal(
    axis: str,
) -> None:
    # GT: a fronto-parallel wall at 3 m. Prediction: the wall rotated by 6 degrees (about the
    # vertical axis: normal (sin, cos, 0); about the horizontal axis: (0, cos, sin)).
    t = math.radians(6.0)
    n_pred = np.array(
        [math.sin(t), math.cos(t), 0.0] if axis == "vertical" else [0.0, math.cos(t), math.sin(t)]
    )
    wall = np.ones((H, W), np.int32)
    sample = make_sample(np.full((H, W), 3.0), planes={"wall": (wall, np.array([[0.0, 1.0, 0.0]]))})
    res3 = ibims_image_metrics(sample, plane_depth(n_pred, 3.0))["planes"][0]
    assert res3["pe_ori"] == pytest.approx(6.0, abs=1e-9)
    assert res3["pe_fla"] < 1e-8
    # Judged against its own (tilted) normal the plane scores 0: this pins the frame's axes
    # and signs (X right, Y forward, Z up) and the 1-based pixel coordinates.
    tilted = make_sample(np.full((H, W), 3.0), planes={"wall": (wall, n_pred[None, :])})
    assert ibims_image_metrics(tilted, plane_depth(n_pred, 3.0))["planes"][0]["pe_ori"] < 1e-6
    # The same plane moved 0.10 m along its normal (n . X = 3.1): nothing changes.
    res31 = ibims_image_metrics(sample, plane_depth(n_pred, 3.1))["planes"][0]
    assert res31["pe_ori"] == pytest.approx(6.0, abs=1e-9)
    assert res31["pe_fla"] < 1e-8
    # With multiplicative noise, moving along the normal scales every depth by 3.1 / 3, which
    # the per-plane median scaling undoes: flatness and angle stay the same.
    rng = np.random.default_rng(1)
    noise = 1.0 + 0.01 * rng.standard_normal((H, W))
    a = ibims_image_metrics(sample, plane_depth(n_pred, 3.0) * noise)["planes"][0]
    b = ibims_image_metrics(sample, plane_depth(n_pred, 3.1) * noise)["planes"][0]
    assert a["pe_fla"] > 0.5  # 1 % noise at ~3 m: ~3 cm spread
    assert b["pe_fla"] == pytest.approx(a["pe_fla"], rel=1e-9)
    assert b["pe_ori"] == pytest.approx(a["pe_ori"], rel=1e-9)


def test_flatness_is_the_population_std_in_cm_after_median_scaling() -> None:
    # A wall at 2 m whose prediction alternates 1.0 / 1.1 m by column: median scaling
    # (median P = (1.0 + 1.1) / 2 = 1.05, median G = 2) maps it to 2/1.05 and 2.2/1.05 m.
    # Along Y (= depth) the points take two levels in equal numbers: population std = half
    # the gap = 0.2/1.05/2 m = 9.52 cm. The fitted normal is ~(0, 1, 0), so the flatness is
    # ~that (PCA's least-variance axis can only lower it).
    depth = np.full((H, W), 2.0)
    pred = np.where(np.arange(W)[None, :] % 2 == 0, 1.0, 1.1) * np.ones((H, 1))
    wall = np.ones((H, W), np.int32)
    flat, ori = planarity_errors(
        depth, pred, wall, np.array([[0, 0, 0, 0, 0.0, 1.0, 0.0]]), CALIB, np.ones((H, W), bool)
    )
    assert flat[0] == pytest.approx(100 * 0.2 / 1.05 / 2, rel=1e-4)
    assert ori[0] < 0.1


def test_small_planes_are_nan_and_excluded() -> None:
    assert PLANE_MIN_PIXELS == 15360  # 5 % of 640 x 480
    depth = np.full((H, W), 3.0)
    labels = np.zeros((H, W), np.int32)
    labels[:24] = 1  # 24 x 640 = 15,360 px: exactly 5 %, scored
    labels[100:124] = 2  # also 15,360 px, but one pixel is invalid below -> 15,359, NaN
    labels[300:310] = 3  # far too small
    normals = np.array([[0.0, 1.0, 0.0]] * 3)
    sample = make_sample(depth, planes={"wall": (labels, normals)})
    sample["mask_invalid"][110, 5] = 0
    res = ibims_image_metrics(sample, depth)
    pixels = [p["pixels"] for p in res["planes"]]
    assert pixels == [15360, 15359, 6400]
    fla = [p["pe_fla"] for p in res["planes"]]
    assert fla[0] < 1e-8 and math.isnan(fla[1]) and math.isnan(fla[2])
    assert math.isnan(res["planes"][1]["pe_ori"])
    agg = IbimsAverager()
    agg.add(res, "a")
    assert agg.mean()["pe_fla"] == fla[0]  # the NaN planes do not count
    assert agg.to_dict()["n_planes_scored"] == 1


def test_plane_threshold_scaled_to_the_image_is_an_option() -> None:
    # 48 x 64 = 3072 px; 5 % of it is 153.6 px. The official constant (15,360) rejects every
    # plane of such an image; min_plane_fraction_of_image=True keeps 154 px, rejects 153 px.
    h, w = 48, 64
    depth = np.full((h, w), 2.0)
    labels = np.zeros((h, w), np.int32)
    labels.ravel()[:154] = 1
    labels.ravel()[1000:1153] = 2
    params = np.zeros((2, 7))
    params[:, 5] = 1.0
    valid = np.ones((h, w), bool)
    calib = calib_from_K(np.array([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]]))
    flat, _ = planarity_errors(depth, depth, labels, params, calib, valid)
    assert np.isnan(flat).all()
    flat, ori = planarity_errors(
        depth, depth, labels, params, calib, valid, min_plane_fraction_of_image=True
    )
    assert flat[0] < 1e-8 and ori[0] < 1e-5 and math.isnan(flat[1])


def test_classes_without_planes_are_skipped_and_labels_beyond_rows_ignored() -> None:
    depth = np.full((H, W), 3.0)
    labels = np.ones((H, W), np.int32)
    sample = make_sample(depth, planes={"wall": (labels, np.zeros((0, 3)))})
    assert ibims_image_metrics(sample, depth)["planes"] == []
    labels[:, 320:] = 2  # label 2 has no parameter row: not evaluated
    sample = make_sample(depth, planes={"table": (labels, np.array([[0.0, 1.0, 0.0]]))})
    planes = ibims_image_metrics(sample, depth)["planes"]
    assert [(p["class"], p["label"], p["pixels"]) for p in planes] == [("table", 1, 320 * H)]


# ---------------------------------------------------------------- inputs, aggregation, dataset


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(2)
    depth = np.full((H, W), 3.0)
    depth[:10] = 0.0
    labels = np.ones((H, W), np.int32)
    sample = make_sample(
        depth, edges=column_edges(319), planes={"wall": (labels, np.array([[0.0, 1.0, 0.0]]))}
    )
    pred = (step_prediction() * (1 + 0.01 * rng.standard_normal((H, W)))).astype(np.float32)
    pred[20:30] = np.nan
    pred[40:50] = 0.0
    before = copy.deepcopy(sample), pred.copy()
    # Read-only inputs: any in-place write (the official code writes NaN into its inputs)
    # raises instead of leaking into later metrics.
    for v in (
        *[a for a in sample.values() if isinstance(a, np.ndarray)],
        *sample["planes"].values(),
        pred,
    ):
        v.flags.writeable = False
    first = ibims_image_metrics(sample, pred)
    second = ibims_image_metrics(sample, pred)
    assert first == second
    for k, v in before[0].items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(sample[k], v)
    np.testing.assert_array_equal(pred, before[1])  # NaN == NaN in assert_array_equal


def test_averager_nan_means_images_and_pools_planes() -> None:
    def result(value: float, dbe: float, planes: list[float]) -> dict:
        res = dict.fromkeys(
            ("rel", "sq_rel", "rms", "log10", "thr1", "thr2", "thr3", "dde_0", "dde_m", "dde_p"),
            value,
        )
        res["dbe_acc"] = res["dbe_com"] = dbe
        res["planes"] = [
            {"class": "wall", "label": i + 1, "pixels": 20000, "pe_fla": f, "pe_ori": 2 * f}
            for i, f in enumerate(planes)
        ]
        return res

    agg = IbimsAverager()
    agg.add(result(0.1, math.nan, [1.0]), "no_edges")  # an image without GT edges
    agg.add(result(0.3, 2.0, [4.0, 7.0, math.nan]), "b")
    mean = agg.mean()
    assert mean["rel"] == pytest.approx(0.2)
    assert mean["dbe_acc"] == 2.0  # the NaN image drops out of the DBE mean only
    # Planes pooled: (1 + 4 + 7) / 3 = 4, not the mean of per-image means (1 + 5.5) / 2.
    assert mean["pe_fla"] == pytest.approx(4.0)
    assert mean["pe_ori"] == pytest.approx(8.0)
    d = agg.to_dict()
    assert d["n_images"] == 2 and d["n_images_with_edges"] == 1
    assert d["n_planes"] == 4 and d["n_planes_scored"] == 3
    assert [p["name"] for p in d["planes"]] == ["no_edges", "b", "b", "b"]


def test_works_on_ibims_dataset_items(tmp_path) -> None:
    h, w = 60, 80
    rng = np.random.default_rng(3)
    depth = np.full((h, w), 2.5)
    depth[:, 40:] = 5.0
    edges = np.zeros((h, w), np.uint8)
    edges[:, 39] = 1
    wall = np.zeros((h, w), np.uint8)
    wall[:, 40:] = 1
    root = tmp_path / "ibims"
    write_ibims_mat(
        root / "ibims1_core_mat" / "office_01.mat",
        rgb=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        depth=depth,
        edges=edges,
        calib=calib_from_K(np.array([[70.0, 0, 39.5], [0, 70.0, 29.5], [0, 0, 1]])),
        mask_invalid=np.ones((h, w), np.uint8),
        mask_transp=np.ones((h, w), np.uint8),
        mask_wall=wall,
        mask_table=np.zeros((h, w), np.uint8),
        mask_floor=np.zeros((h, w), np.uint8),
        mask_wall_paras=np.array([[0, 5.0, 0, 5.0, 0, 1.0, 0]]),
        mask_table_paras=None,
        mask_floor_paras=None,
    )
    write_imagelist(root / "imagelist.txt", ["office_01"])
    item = IBimsDataset(root)[0]
    res = ibims_image_metrics(item, item["depth"].copy(), min_plane_fraction_of_image=True)
    assert res["rel"] == 0.0 and res["thr1"] == 1.0
    assert res["dbe_acc"] < 1.0  # the step is found next to the GT edge
    (plane,) = res["planes"]
    assert plane["class"] == "wall" and plane["pixels"] == 40 * h and plane["pe_ori"] < 1e-5
    # The official constant rejects a 2,400 px plane.
    assert math.isnan(ibims_image_metrics(item, item["depth"])["planes"][0]["pe_fla"])


def test_bad_inputs_raise() -> None:
    sample = make_sample(np.full((8, 8), 2.0))
    with pytest.raises(ConfigError, match="must match"):
        ibims_image_metrics(sample, np.full((8, 9), 2.0))
    with pytest.raises(ConfigError, match="inf"):
        ibims_image_metrics(sample, np.full((8, 8), np.inf))
