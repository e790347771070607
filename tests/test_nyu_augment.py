"""MIM-Depth NYUv2 training augmentation (spec 2.4, pitfall 14, datasets 3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mesadepth.data.nyu_augment import (
    MIMTrainTransform,
    adjust_brightness_contrast,
    adjust_gamma,
    cutdepth,
    cutdepth_strip,
    hsv_to_rgb_uint8,
    rgb_to_hsv_uint8,
    shift_hsv,
)
from mesadepth.errors import ConfigError, DataError


def _sample(h: int = 16, w: int = 24, value: int = 7, depth_m: float = 1.0) -> dict:
    return {
        "image": np.full((h, w, 3), value, np.uint8),
        "depth": np.full((h, w), depth_m, np.float32),
        "name": "scene_rgb_00001",
    }


def _coded_sample(h: int = 96, w: int = 128) -> dict:
    """Pixel (r, c) holds R = c, G = r, B = 255 - c; depth = (c + 256 r) / 1000 m."""
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([cols, rows, 255 - cols], axis=-1).astype(np.uint8)
    depth = ((cols + 256 * rows) / 1000.0).astype(np.float32)
    return {"image": image, "depth": depth}


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return np.rint(t.numpy().transpose(1, 2, 0) * 255).astype(np.int64)


# ----------------------------------------------------------------------------- CutDepth


def test_cutdepth_strip_formula():
    # l = floor(a W), w = floor(max((W - a W) b 0.75, 1)).
    assert cutdepth_strip(640, 0.5, 0.5) == (320, 120)
    assert cutdepth_strip(640, 0.0, 0.99) == (0, 475)  # 640 * 0.99 * 0.75 = 475.2
    assert cutdepth_strip(640, 0.999, 0.0) == (639, 1)  # width at least 1, still inside
    assert cutdepth_strip(640, 0.25, 0.5, p=1.0) == (160, 240)


def test_reference_mode_writes_millimetres_modulo_256():
    image = np.full((2, 6, 3), 9, np.uint8)
    # float32 metres as the loader gives them (PNG millimetres / 1000).
    mm = np.array([1000, 256, 300, 0, 9999, 1234], np.float32)
    depth = np.tile(mm / np.float32(1000.0), (2, 1))
    out = cutdepth(image, depth, 0, 6, mode="reference")
    assert out[0, :, 0].tolist() == [232, 0, 44, 0, 15, 210]  # mm mod 256
    assert (out == out[..., :1]).all()  # all three channels
    assert (image == 9).all()  # input untouched
    part = cutdepth(image, depth, 2, 3)
    assert part[:, [0, 1, 5]].tolist() == image[:, [0, 1, 5]].tolist()
    assert part[1, 2:5, 2].tolist() == [44, 0, 15]


def test_corrected_mode_scales_depth_to_grey_levels():
    image = np.zeros((1, 5, 3), np.uint8)
    depth = np.array([[0.0, 2.0, 5.0, 10.0, 20.0]], np.float32)
    out = cutdepth(image, depth, 0, 5, mode="corrected", max_depth=10.0)
    # round(d / 10 x 255), clipped: 0, 51, 127.5 -> 128, 255, 255.
    assert out[0, :, 1].tolist() == [0, 51, 128, 255, 255]
    with pytest.raises(ConfigError):
        cutdepth(image, depth, 0, 5, mode="fixed")  # type: ignore[arg-type]


def test_cutdepth_fires_exactly_on_counters_0_4_8_with_the_formula_geometry():
    tf = MIMTrainTransform(crop=(16, 24), flip_p=0.0, colour_p=0.0)
    for counter in range(10):
        out = tf(_sample(), np.random.default_rng(100 + counter), counter)
        img = _to_uint8(out["image"])
        changed = np.flatnonzero((img != 7).any(axis=(0, 2)))
        if counter % 4:
            assert changed.size == 0, counter
            continue
        # Same generator, same draw order: a, b first.
        rng = np.random.default_rng(100 + counter)
        left, width = cutdepth_strip(24, rng.random(), rng.random(), 0.75)
        assert changed.tolist() == list(range(left, left + width)), counter
        assert (img[:, left : left + width] == 232).all()  # 1000 mm, full height
        assert torch.all(out["depth"] == 1.0)  # depth itself untouched
    off = MIMTrainTransform(crop=(16, 24), cutdepth_every=0, flip_p=0.0, colour_p=0.0)
    assert (_to_uint8(off(_sample(), np.random.default_rng(0), 0)["image"]) == 7).all()


def test_cutdepth_runs_before_flip_and_crop_on_the_full_width():
    # Coded depth (c + 256 r) mm wraps to c mod 256: a strip pixel holds its source column in
    # all three channels, so the strip is where B == R (never true outside: 255 - c != c).
    tf = MIMTrainTransform(crop=(96, 64), flip_p=0.5, colour_p=0.0)
    hits = 0
    for seed in range(40):
        out = tf(_coded_sample(), np.random.default_rng(seed), 8)
        img = _to_uint8(out["image"])
        in_strip = img[..., 2] == img[..., 0]
        assert (in_strip == in_strip[:1]).all()  # full height
        window = set(img[0, :, 0].tolist())  # source columns inside the crop
        rng = np.random.default_rng(seed)
        left, width = cutdepth_strip(128, rng.random(), rng.random(), 0.75)  # W before crop
        expected = set(range(left, left + width)) & window
        assert set(img[0, in_strip[0], 0].tolist()) == expected, seed
        hits += bool(expected)
    assert hits > 10


# ----------------------------------------------------------------------------- geometry


def _check_aligned(out: dict) -> tuple[np.ndarray, np.ndarray]:
    img = _to_uint8(out["image"])
    cols, rows = img[..., 0], img[..., 1]
    assert (img[..., 2] == 255 - cols).all()
    expected = ((cols + 256 * rows) / 1000.0).astype(np.float32)
    assert np.array_equal(out["depth"][0].numpy(), expected)  # same source pixel
    return rows, cols


def test_flip_moves_image_and_depth_together():
    tf = MIMTrainTransform(crop=(96, 128), cutdepth_every=0, flip_p=1.0, colour_p=0.0)
    rows, cols = _check_aligned(tf(_coded_sample(), np.random.default_rng(0), 1))
    assert cols[0].tolist() == list(range(127, -1, -1))
    assert (rows[:, 0] == np.arange(96)).all()


def test_crop_offsets_cover_the_inclusive_range_and_stay_aligned():
    tf = MIMTrainTransform(crop=(96, 96), cutdepth_every=0, flip_p=0.0, colour_p=0.0)
    lefts = set()
    for seed in range(400):
        out = tf(_coded_sample(), np.random.default_rng(seed), 1)
        assert out["image"].shape == (3, 96, 96) and out["depth"].shape == (1, 96, 96)
        rows, cols = _check_aligned(out)
        assert rows[0, 0] == 0  # crop height = image height -> top 0
        assert (cols == cols[0, 0] + np.arange(96)).all()
        lefts.add(int(cols[0, 0]))
    assert lefts == set(range(0, 33))  # 0..W-w inclusive, 33 values
    small = MIMTrainTransform(crop=(64, 32), cutdepth_every=0, flip_p=0.0, colour_p=0.0)
    tops = set()
    for seed in range(300):
        rows, cols = _check_aligned(small(_coded_sample(), np.random.default_rng(seed), 1))
        tops.add(int(rows[0, 0]))
        assert 0 <= cols[0, 0] <= 96
    assert tops == set(range(0, 33))
    with pytest.raises(DataError):
        MIMTrainTransform(crop=(97, 96))(_coded_sample(), np.random.default_rng(0), 1)


# ----------------------------------------------------------------------------- colour


def test_brightness_contrast_gamma_hand_values():
    img = np.array([[[0, 100, 250]]], np.uint8)
    # alpha x + 25.5, clipped, truncated: 25.5 -> 25, 135.5 -> 135, 300.5 -> 255.
    assert adjust_brightness_contrast(img, 1.1, 0.1).ravel().tolist() == [25, 135, 255]
    assert adjust_brightness_contrast(img, 0.9, -0.2).ravel().tolist() == [0, 39, 174]
    # 255 (128 / 255)^1.2 = 111.52 -> 111; 255 (64 / 255)^0.8 = 84.39 -> 84; 0 and 255 fixed.
    g = np.array([[[0, 128, 255]]], np.uint8)
    assert adjust_gamma(g, 1.2).ravel().tolist() == [0, 111, 255]
    assert adjust_gamma(np.array([[[64, 64, 64]]], np.uint8), 0.8).ravel().tolist() == [84] * 3


def test_hsv_conversion_matches_opencv_uint8():
    rgb = np.array(
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 128, 0], [10, 200, 30]],
        np.uint8,
    )[None]
    # Values of cv2.cvtColor(COLOR_RGB2HSV): H = degrees / 2 in 0..179.
    assert rgb_to_hsv_uint8(rgb)[0].tolist() == [
        [0, 255, 255],
        [60, 255, 255],
        [120, 255, 255],
        [0, 0, 128],
        [15, 255, 255],
        [63, 242, 200],
    ]
    hsv = np.array(
        [[0, 255, 255], [60, 255, 255], [170, 255, 255], [1, 102, 75], [100, 50, 200], [0, 0, 77]],
        np.uint8,
    )[None]
    # cv2.cvtColor(COLOR_HSV2RGB) on whole images (its vectorised path truncates after x 255).
    assert hsv_to_rgb_uint8(hsv)[0].tolist() == [
        [255, 0, 0],
        [0, 255, 0],
        [255, 0, 84],
        [75, 45, 44],
        [160, 186, 200],
        [77, 77, 77],
    ]


def test_hsv_shift_moves_hue_in_half_degrees_and_clips_sat_val():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert (shift_hsv(red, 60.0, 0.0, 0.0) == [0, 255, 0]).all()  # +120 degrees -> green
    assert (shift_hsv(red, -60.0, 0.0, 0.0) == [0, 0, 255]).all()  # wraps mod 180 -> blue
    assert (shift_hsv(red, 0.0, 0.0, -55.0) == [200, 0, 0]).all()  # V 255 -> 200
    assert (shift_hsv(red, 0.0, 0.0, 20.0) == red).all()  # V clipped at 255
    assert (shift_hsv(red, 0.0, -255.0, 0.0) == [255, 255, 255]).all()  # S -> 0: grey at V
    assert shift_hsv(red, 0.0, 0.0, 0.0) is red  # no-op shortcut as in albumentations


def test_colour_jitter_changes_the_image_never_the_depth():
    tf = MIMTrainTransform(crop=(96, 128), cutdepth_every=0, flip_p=0.0, colour_p=1.0)
    sample = _coded_sample()
    changed = 0
    for seed in range(5):
        out = tf(sample, np.random.default_rng(seed), 1)
        assert np.array_equal(out["depth"][0].numpy(), sample["depth"])
        changed += int(not np.array_equal(_to_uint8(out["image"]), sample["image"]))
    assert changed == 5


# ----------------------------------------------------------------------------- contract


def test_output_types_ranges_passthrough_and_determinism():
    tf = MIMTrainTransform(crop=(48, 64))
    rng = np.random.default_rng(0)
    sample = {
        "image": rng.integers(0, 256, (64, 96, 3)).astype(np.uint8),
        "depth": rng.uniform(0, 12, (64, 96)).astype(np.float32),
        "name": "kitchen_rgb_00003",
        "index": 3,
    }
    a = tf(sample, np.random.default_rng(5), 0)
    b = tf(sample, np.random.default_rng(5), 0)
    c = tf(sample, np.random.default_rng(6), 0)
    assert a["image"].dtype == torch.float32 and a["image"].shape == (3, 48, 64)
    assert a["depth"].dtype == torch.float32 and a["depth"].shape == (1, 48, 64)
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    # [0, 1] means k / 255 exactly: no mean/std normalisation (pitfall 11).
    assert torch.allclose(a["image"] * 255, torch.round(a["image"] * 255), atol=1e-4)
    assert 0.0 <= a["depth"].min() and a["depth"].max() <= 12.0
    assert a["name"] == "kitchen_rgb_00003" and a["index"] == 3
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["depth"], b["depth"])
    assert not torch.equal(a["image"], c["image"])
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (64, 96, 3)
    with pytest.raises(ConfigError):
        MIMTrainTransform(cutdepth_mode="none")  # type: ignore[arg-type]
