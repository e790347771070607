"""NYUv2 metrics, masks, sanitising and per-image averaging (spec 2.8 / datasets 2.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mesadepth.errors import ConfigError
from mesadepth.evaluation.metrics import (
    ALL_METRICS,
    PAPER_COLUMNS,
    REFERENCE_COLUMNS,
    MetricAverager,
    depth_metrics,
    eigen_crop_bounds,
    eigen_crop_mask,
    format_table,
    sanitize_prediction,
    valid_mask,
)

LN10 = math.log(10.0)


def test_eigen_crop_is_exact_at_480x640() -> None:
    assert eigen_crop_bounds(480, 640) == (45, 471, 41, 601)
    m = eigen_crop_mask(480, 640)
    assert m.sum() == 426 * 560
    # First and last kept row / column, and their outside neighbours (end-exclusive slices).
    assert m[45, 41] and m[470, 600]
    assert not m[44, 41] and not m[45, 40] and not m[471, 600] and not m[470, 601]


def test_eigen_crop_scales_proportionally_rounding_half_up() -> None:
    # 240 x 320: 45/2 = 22.5 -> 23, 471/2 = 235.5 -> 236, 41/2 = 20.5 -> 21, 601/2 = 300.5 -> 301.
    assert eigen_crop_bounds(240, 320) == (23, 236, 21, 301)
    # 960 x 1280: everything doubles exactly.
    assert eigen_crop_bounds(960, 1280) == (90, 942, 82, 1202)
    with pytest.raises(ConfigError):
        eigen_crop_bounds(0, 640)


def test_valid_mask_range_is_strict_and_float32() -> None:
    gt = np.array([[0.0, 1e-3, 0.0011, 5.0, 9.999, 10.0, 12.0, np.nan]])
    expected = [[False, False, True, True, True, False, False, False]]
    np.testing.assert_array_equal(valid_mask(gt, crop=None), expected)
    # A float32 GT of 1 mm is 0.0010000000475 in float64 and would pass a float64 test;
    # the reference compares in float32, where it equals the bound and is excluded.
    gt32 = np.array([[0.001, 10.0]], dtype=np.float32)
    assert not valid_mask(gt32, crop=None).any()
    assert (gt32.astype(np.float64) > 1e-3)[0, 0]  # the trap the float32 test avoids
    with pytest.raises(ConfigError):
        valid_mask(gt, crop="garg")


def test_valid_mask_with_eigen_crop() -> None:
    gt = np.full((480, 640), 5.0)
    gt[100, 100] = 0.0  # a hole inside the crop
    gt[0, 0] = 0.0  # a hole outside: changes nothing
    m = valid_mask(gt)
    assert m.sum() == 426 * 560 - 1
    assert not m[100, 100] and not m[44, 300] and m[45, 300]
    # Batched maps are cropped on their last two axes.
    assert valid_mask(np.stack([gt, gt])).sum() == 2 * (426 * 560 - 1)


def test_threshold_and_linear_metrics_hand_computed() -> None:
    # (g, p): (1, 1) ratio 1; (2, 2.4) ratio 1.2; (2, 3) ratio 1.5; (1, 1.9) ratio 1.9;
    # (3, 1) ratio 3. 1.25 -> 2 pass; 1.5625 -> 3 pass; 1.953125 -> 4 pass.
    g = np.array([1.0, 2.0, 2.0, 1.0, 3.0, 7.0])
    p = np.array([1.0, 2.4, 3.0, 1.9, 1.0, np.nan])  # the last pixel is masked out
    mask = np.array([True] * 5 + [False])
    m = depth_metrics(p, g, mask)
    assert (m["d1"], m["d2"], m["d3"]) == (0.4, 0.6, 0.8)
    # p - g = [0, 0.4, 1, 0.9, -2]
    # abs_rel = (0 + 0.2 + 0.5 + 0.9 + 2/3) / 5; sq_rel = (0 + 0.08 + 0.5 + 0.81 + 4/3) / 5
    # rmse = sqrt((0 + 0.16 + 1 + 0.81 + 4) / 5) = sqrt(1.194)
    assert m["abs_rel"] == pytest.approx((1.6 + 2 / 3) / 5)
    assert m["sq_rel"] == pytest.approx((1.39 + 4 / 3) / 5)
    assert m["rmse"] == pytest.approx(math.sqrt(1.194))
    assert set(m) == set(ALL_METRICS)
    # Strict thresholds: a ratio of exactly 1.25 (5 / 4) is not within 1.25.
    one = np.ones(1, bool)
    m = depth_metrics(np.array([5.0]), np.array([4.0]), one)
    assert (m["d1"], m["d2"]) == (0.0, 1.0)


def test_log_metrics_hand_computed() -> None:
    # p / g = [1, 10, 10, 0.1] -> e = ln p - ln g = ln10 x [0, 1, 1, -1]:
    # mean e^2 = 3/4 ln10^2, mean e = 1/4 ln10.
    g = np.array([[2.0, 0.5], [1.0, 4.0]])
    p = g * np.array([[1.0, 10.0], [10.0, 0.1]])
    m = depth_metrics(p, g, np.ones_like(g, bool))
    assert m["rmse_log"] == pytest.approx(LN10 * math.sqrt(3) / 2)
    assert m["log10"] == pytest.approx(0.75)
    # MIM: sqrt(3/4 - 0.5 / 16) ln10; BTS: 100 sqrt(3/4 - 1/16) ln10.
    assert m["silog"] == pytest.approx(LN10 * math.sqrt(0.75 - 0.5 / 16))
    assert m["silog_bts"] == pytest.approx(100 * LN10 * math.sqrt(0.75 - 1 / 16))
    assert m["d1"] == 0.25 and m["d3"] == 0.25  # ratio 10 fails every threshold


def test_silog_of_a_pure_scale_error() -> None:
    # p = 2 g: e = ln 2 everywhere -> BTS SILog 0 (scale invariant), MIM sqrt(1 - 0.5) ln 2.
    rng = np.random.default_rng(0)
    g = rng.uniform(0.5, 9.0, (16, 16))
    m = depth_metrics(2 * g, g, np.ones_like(g, bool))
    assert m["silog_bts"] == pytest.approx(0.0, abs=1e-5)
    assert m["silog"] == pytest.approx(math.log(2) / math.sqrt(2))
    assert m["abs_rel"] == pytest.approx(1.0)


def test_empty_mask_gives_nan_and_bad_input_raises() -> None:
    g = np.ones((4, 4))
    m = depth_metrics(g, g, np.zeros((4, 4), bool))
    assert all(math.isnan(v) for v in m.values())
    with pytest.raises(ConfigError):
        depth_metrics(g, np.ones((4, 5)), np.ones((4, 5), bool))
    with pytest.raises(ConfigError):
        depth_metrics(g, g, np.ones((4, 4)))  # not boolean


def test_sanitize_modes() -> None:
    pred = np.array([np.nan, np.inf, -np.inf, 0.0005, 20.0, 3.0], dtype=np.float32)
    keep = pred.copy()
    mim = sanitize_prediction(pred, "mim")
    np.testing.assert_array_equal(mim, np.array([1e-3, 10, 10, 0.0005, 20, 3], np.float32))
    bts = sanitize_prediction(pred, "bts")
    np.testing.assert_array_equal(bts, np.array([1e-3, 10, 1e-3, 1e-3, 10, 3], np.float32))
    np.testing.assert_array_equal(pred, keep)  # input untouched
    assert mim.dtype == np.float32
    with pytest.raises(ConfigError):
        sanitize_prediction(pred, "kitti")


def test_averager_reports_the_mean_of_per_image_values() -> None:
    # Image A: one valid pixel off by 3 m -> RMSE 3. Image B: three pixels off by 1 m -> RMSE 1.
    # Per-image mean (the reference): (3 + 1) / 2 = 2. Pooled over the 4 pixels it would be
    # sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3) = 1.73.
    ga, pa = np.array([5.0, 0.0]), np.array([8.0, 1.0])
    gb, pb = np.array([2.0, 2.0, 2.0]), np.array([3.0, 3.0, 3.0])
    agg = MetricAverager()
    assert agg.add(depth_metrics(pa, ga, valid_mask(ga, crop=None)), "a")
    assert agg.add(depth_metrics(pb, gb, valid_mask(gb, crop=None)), "b")
    # An image without a valid pixel would poison the mean: skipped and counted.
    gz = np.zeros(3)
    assert not agg.add(depth_metrics(gz, gz, valid_mask(gz, crop=None)), "empty")
    mean = agg.mean()
    assert mean["rmse"] == pytest.approx(2.0)
    assert mean["rmse"] != pytest.approx(math.sqrt(3))
    # abs_rel: A 3/5 = 0.6, B 0.5 -> 0.55.
    assert mean["abs_rel"] == pytest.approx(0.55)
    d = agg.to_dict()
    assert d["n_images"] == 2 and d["n_skipped"] == 1 and d["skipped"] == ["empty"]
    assert [(r["name"], r["rmse"]) for r in d["per_image"]] == [("a", 3.0), ("b", 1.0)]
    assert len(agg) == 2
    with pytest.raises(ConfigError):
        agg.add({"rmse": 1.0})


def test_format_table_orders_columns() -> None:
    metrics = {name: 0.0 for name in ALL_METRICS}
    metrics.update(rmse=0.28712, d1=0.949, d2=0.9941, d3=0.999, abs_rel=0.0364, log10=0.0156)
    head, row = format_table(metrics).splitlines()
    assert head.split() == ["RMSE", "d1", "d2", "d3", "AbsRel", "log10"]
    assert row.split() == ["0.287", "0.949", "0.994", "0.999", "0.036", "0.016"]
    assert PAPER_COLUMNS == ("rmse", "d1", "d2", "d3", "abs_rel", "log10")
    head, _ = format_table(metrics, REFERENCE_COLUMNS, digits=4).splitlines()
    assert head.split()[:4] == ["d1", "d2", "d3", "AbsRel"] and head.split()[-1] == "SILog"
    with pytest.raises(ConfigError, match="silog"):
        format_table({"rmse": 1.0}, ["rmse", "silog"])
