"""Paired transforms: K follows every geometric step, all arrays share one draw (spec 1.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mesadepth.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Crop,
    HorizontalFlip,
    Normalize,
    RandomCrop,
    RandomScaleCrop,
    Resize,
    ToTensor,
    nearest_indices,
    resize_bilinear,
    resize_nearest,
    sc_depth_eval_transforms,
    sc_depth_train_transforms,
)

H, W = 24, 32
K0 = np.array([[20.0, 0.0, 15.25], [0.0, 22.0, 11.5], [0.0, 0.0, 1.0]], dtype=np.float32)


class FixedRng:
    """A generator whose draws are written out by hand (and that records what was asked)."""

    def __init__(self, random: float = 0.0, uniform=(1.0, 1.0), integers=()) -> None:
        self._random = random
        self._uniform = np.array(uniform)
        self._integers = list(integers)
        self.integer_calls: list[tuple[int, int]] = []

    def random(self) -> float:
        return self._random

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        assert (low, size) == (1.0, 2)
        return self._uniform

    def integers(self, low: int, high: int) -> int:
        self.integer_calls.append((low, high))
        return self._integers.pop(0)


def coded_sample() -> dict:
    """Every pixel carries a unique code, identical across image channel 0, refs and all maps."""
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float32)
    code = rows * W + cols
    # Channels: the code itself, then row and column separately (bilinear keeps them exact).
    image = np.stack([code, rows, cols], axis=-1)
    return {
        "image": image,
        "refs": [image + 1000, image + 2000],
        "depth": code.copy(),
        "pseudo_depth": code * 2,
        "labels": code.astype(np.int32),
        "mask_valid": code.astype(np.int64),
        "K": K0.copy(),
        "scene": "kitchen_0001",
        "index": 7,
    }


# ----------------------------------------------------------------------------- K, by hand


def test_resize_updates_K_by_the_reference_rule():
    s = Resize((48, 40))({"image": np.zeros((H, W, 3), np.uint8), "K": K0})
    # row 0 x 40/32 = 1.25, row 1 x 48/24 = 2
    expected = [[25.0, 0.0, 19.0625], [0.0, 44.0, 23.0], [0.0, 0.0, 1.0]]
    np.testing.assert_allclose(s["K"], expected, rtol=1e-6)
    assert s["K"].dtype == np.float32 and s["image"].shape == (48, 40, 3)
    # Same size: nothing resampled, K unchanged (factors 1).
    same = Resize((H, W))({"image": np.zeros((H, W, 3), np.uint8), "K": K0})
    np.testing.assert_array_equal(same["K"], K0)


def test_crop_and_random_crop_move_the_principal_point():
    s = Crop(top=3, left=5, height=16, width=20)({"image": np.zeros((H, W, 3)), "K": K0})
    np.testing.assert_allclose(s["K"], [[20, 0, 10.25], [0, 22, 8.5], [0, 0, 1]], rtol=1e-6)
    assert s["image"].shape == (16, 20, 3)
    rng = FixedRng(integers=[2, 7])  # top = 2, then left = 7
    r = RandomCrop(16, 20)({"image": np.zeros((H, W, 3)), "K": K0}, rng)
    np.testing.assert_allclose(r["K"], [[20, 0, 8.25], [0, 22, 9.5], [0, 0, 1]], rtol=1e-6)
    assert rng.integer_calls == [(0, 24 - 16 + 1), (0, 32 - 20 + 1)]
    with pytest.raises(ValueError, match="does not fit"):
        Crop(10, 0, 16, 20)({"image": np.zeros((H, W, 3)), "K": K0})


def test_flip_K_reference_and_exact_rules():
    sample = {"image": np.zeros((H, W, 3), np.uint8), "K": K0}
    ref = HorizontalFlip(p=0.5)(sample, FixedRng(random=0.2))  # 0.2 < 0.5: flipped
    np.testing.assert_allclose(ref["K"], [[20, 0, 16.75], [0, 22, 11.5], [0, 0, 1]])  # 32 - 15.25
    exact = HorizontalFlip(p=0.5, cx_rule="exact")(sample, FixedRng(random=0.2))
    np.testing.assert_allclose(exact["K"], [[20, 0, 15.75], [0, 22, 11.5], [0, 0, 1]])  # 31 - 15.25
    kept = HorizontalFlip(p=0.5)(sample, FixedRng(random=0.7))  # not flipped
    np.testing.assert_array_equal(kept["K"], K0)


def test_random_scale_crop_K_by_hand():
    rng = FixedRng(uniform=(1.1, 1.05), integers=[1, 2])  # s_x, s_y; then oy, ox
    s = RandomScaleCrop(1.15)({"image": np.zeros((H, W, 3), np.uint8), "K": K0}, rng)
    # scaled size floor(24 * 1.05) = 25, floor(32 * 1.1) = 35 -> offsets drawn in [0, 2), [0, 4)
    assert rng.integer_calls == [(0, 2), (0, 4)]
    # row 0 x 1.1: fx 22, cx 16.775 - 2; row 1 x 1.05: fy 23.1, cy 12.075 - 1
    expected = [[22.0, 0.0, 14.775], [0.0, 23.1, 11.075], [0.0, 0.0, 1.0]]
    np.testing.assert_allclose(s["K"], expected, rtol=1e-6)
    assert s["image"].shape == (H, W, 3)


def test_random_scale_crop_factors_are_independent_and_in_range():
    rng = np.random.default_rng(3)
    ratios = []
    for _ in range(50):
        s = RandomScaleCrop(1.15)({"image": np.zeros((H, W, 3), np.uint8), "K": K0}, rng)
        sx, sy = s["K"][0, 0] / K0[0, 0], s["K"][1, 1] / K0[1, 1]
        assert 1.0 <= sx < 1.15 and 1.0 <= sy < 1.15
        ratios.append(sx / sy)
    assert np.ptp(ratios) > 0.05  # the aspect ratio changes: independent x/y factors


# ----------------------------------------------------------------------------- K vs content


def _project(K: np.ndarray, P: np.ndarray) -> np.ndarray:
    p = np.asarray(K, np.float64) @ P
    return p[:2] / p[2]


def _bright_pixel_sample(P: np.ndarray, K: np.ndarray) -> dict:
    u, v = _project(K, P)
    assert np.allclose([u, v], np.round([u, v]))  # the point projects onto a pixel centre
    image = np.zeros((H, W, 3), np.uint8)
    image[int(round(v)), int(round(u))] = 255
    depth = np.zeros((H, W), np.float32)
    depth[int(round(v)), int(round(u))] = P[2]
    return {"image": image, "depth": depth, "K": K}


def _where(a: np.ndarray) -> tuple[int, int]:
    v, u = np.unravel_index(np.argmax(a), a.shape)
    return int(u), int(v)


def test_point_lands_on_its_pixel_after_crop_and_flip():
    K = np.array([[20.0, 0.0, 15.0], [0.0, 22.0, 11.0], [0.0, 0.0, 1.0]], np.float32)
    P = np.array([(21 - 15.0) * 2.0 / 20.0, (9 - 11.0) * 2.0 / 22.0, 2.0])  # -> (21, 9)
    sample = _bright_pixel_sample(P, K)
    crop = Crop(top=2, left=3, height=18, width=25)
    for rule, expected_shift in (("exact", 0), ("reference", 1)):
        out = Compose([crop, HorizontalFlip(p=1.0, cx_rule=rule)])(sample, 0)
        u_img, v_img = _where(out["image"][..., 0])
        assert (u_img, v_img) == (_where(out["depth"]))  # the map moved with the image
        assert (u_img, v_img) == (25 - 1 - (21 - 3), 9 - 2)  # mirrored column, shifted row
        # The flipped image shows the mirrored world (X -> -X).
        u_k, v_k = _project(out["K"], P * np.array([-1.0, 1.0, 1.0]))
        # exact: on the pixel; reference: one column to the right (cx' = w - cx, pitfall 9)
        assert u_k - u_img == pytest.approx(expected_shift, abs=1e-5)
        assert v_k == pytest.approx(v_img, abs=1e-5)


def test_point_after_resize_differs_by_the_documented_half_pixel_term():
    K = np.array([[20.0, 0.0, 15.0], [0.0, 22.0, 11.0], [0.0, 0.0, 1.0]], np.float32)
    P = np.array([(10 - 15.0) * 2.0 / 20.0, (6 - 11.0) * 2.0 / 22.0, 2.0])  # -> (10, 6)
    sample = _bright_pixel_sample(P, K)
    out = Resize((48, 64))(sample)  # x2 in both directions
    img = out["image"][..., 0].astype(np.float64)
    vv, uu = np.mgrid[0:48, 0:64]
    u_c, v_c = (img * uu).sum() / img.sum(), (img * vv).sum() / img.sum()
    # The content sits at (u + 0.5) * 2 - 0.5; the reference K puts it at u * 2.
    assert (u_c, v_c) == pytest.approx((20.5, 12.5), abs=1e-6)
    u_k, v_k = _project(out["K"], P)
    assert (u_c - u_k, v_c - v_k) == pytest.approx((0.5 * (2 - 1), 0.5 * (2 - 1)), abs=1e-5)
    # Nearest for the map: input pixel 10 covers output columns 20 and 21 (centre 20.5 too).
    assert set(zip(*np.nonzero(out["depth"]), strict=True)) == {
        (12, 20),
        (12, 21),
        (13, 20),
        (13, 21),
    }


# ----------------------------------------------------------------------------- shared draws


def test_every_frame_and_map_receives_the_same_draw():
    chain = Compose([HorizontalFlip(0.5), RandomScaleCrop(1.15), RandomCrop(16, 20)])
    flipped = set()
    for seed in range(12):
        out = chain(coded_sample(), seed)
        np.testing.assert_allclose(out["refs"][0], out["image"] + 1000, atol=1e-3)
        np.testing.assert_allclose(out["refs"][1], out["image"] + 2000, atol=1e-3)
        # The maps (nearest) match each other exactly.
        np.testing.assert_array_equal(out["pseudo_depth"], out["depth"] * 2)
        np.testing.assert_array_equal(out["labels"], out["depth"].astype(np.int32))
        np.testing.assert_array_equal(out["mask_valid"], out["depth"].astype(np.int64))
        # Image (bilinear) and maps (nearest) show the same region in the same orientation:
        # the source row/column each pixel came from agrees to within one pixel.
        rows_map, cols_map = np.divmod(out["depth"], W)
        assert np.abs(out["image"][..., 1] - rows_map).max() <= 1.0
        assert np.abs(out["image"][..., 2] - cols_map).max() <= 1.0
        assert out["scene"] == "kitchen_0001" and out["index"] == 7
        flipped.add(bool(out["image"][0, 0, 2] > out["image"][0, -1, 2]))
    assert flipped == {True, False}


def test_flip_and_crop_move_image_and_maps_identically():
    for seed in range(6):
        out = Compose([HorizontalFlip(0.5), RandomCrop(16, 20)])(coded_sample(), seed)
        np.testing.assert_array_equal(out["image"][..., 0], out["depth"])
        np.testing.assert_array_equal(out["labels"], out["depth"].astype(np.int32))


def test_same_seed_same_result_and_input_not_mutated():
    sample = coded_sample()
    before = {k: np.copy(v) for k, v in sample.items() if isinstance(v, np.ndarray)}
    a = sc_depth_train_transforms((16, 20))(sample, 5)
    b = sc_depth_train_transforms((16, 20))(sample, 5)
    for k in ("image", "depth", "K"):
        torch.testing.assert_close(a[k], b[k])
    for k, v in before.items():
        np.testing.assert_array_equal(sample[k], v)


def test_mismatched_sizes_are_refused():
    s = {"image": np.zeros((H, W, 3), np.uint8), "depth": np.zeros((H, W + 1), np.float32)}
    with pytest.raises(ValueError, match="share one size"):
        Resize((12, 16))(s)


# ----------------------------------------------------------------------------- resampling


def test_nearest_resize_invents_no_label_and_follows_the_floor_rule():
    labels = np.random.default_rng(0).choice(np.array([3, 7, 11], np.int32), size=(H, W))
    for size in ((37, 45), (10, 13), (24, 64)):
        out = resize_nearest(labels, size)
        assert out.dtype == np.int32 and out.shape == size
        assert set(np.unique(out)) <= {3, 7, 11}
        # Same rule as torch's "nearest" (and OpenCV's INTER_NEAREST).
        t = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None], size=size)
        np.testing.assert_array_equal(out, t[0, 0].numpy().astype(np.int32))
    np.testing.assert_array_equal(nearest_indices(4, 6), [0, 0, 1, 2, 2, 3])  # floor(j*4/6)
    np.testing.assert_array_equal(nearest_indices(6, 4), [0, 1, 3, 4])  # floor(j*6/4)


def test_bilinear_resize_half_pixel_values_and_dtypes():
    row = np.array([[[0.0], [100.0]]], np.float32)  # 1 x 2 x 1
    out = resize_bilinear(row, (1, 4))  # sample at x = -0.25, 0.25, 0.75, 1.25 (clamped)
    np.testing.assert_allclose(out[0, :, 0], [0.0, 25.0, 75.0, 100.0])
    u8 = resize_bilinear(np.array([[[0], [101]]], np.uint8), (1, 4))
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8[0, :, 0], [0, 25, 76, 101])  # 25.25 -> 25, 75.75 -> 76


# ----------------------------------------------------------------------------- tensors


def test_to_tensor_ranges_and_dtypes():
    s = {
        "image": np.full((H, W, 3), 255, np.uint8),
        "refs": [np.full((H, W, 3), 127.5, np.float32)],
        "depth": np.full((H, W), 3.25, np.float32),
        "pseudo_depth": np.full((H, W), 60000, np.uint16),
        "labels": np.full((H, W), 5, np.int32),
        "mask_valid": np.ones((H, W), bool),
        "mask_u16": np.full((H, W), 40000, np.uint16),
        "edges": np.full((H, W), 0.5, np.float64),
        "K": K0.astype(np.float64),
        "scene": "a",
    }
    t = ToTensor()(s)
    assert t["image"].shape == (3, H, W) and t["image"].dtype == torch.float32
    assert float(t["image"].min()) == float(t["image"].max()) == 1.0
    assert float(t["refs"][0][0, 0, 0]) == pytest.approx(0.5)
    assert t["depth"].shape == (1, H, W) and t["depth"].dtype == torch.float32
    assert float(t["depth"][0, 0, 0]) == 3.25  # no scaling
    assert t["pseudo_depth"].dtype == torch.float32 and float(t["pseudo_depth"].max()) == 60000.0
    assert t["labels"].dtype == torch.int32 and t["labels"].shape == (1, H, W)
    assert t["mask_valid"].dtype == torch.bool
    assert t["mask_u16"].dtype == torch.int32 and int(t["mask_u16"][0, 0, 0]) == 40000
    assert t["edges"].dtype == torch.float32
    assert t["K"].dtype == torch.float32 and t["K"].shape == (3, 3)
    assert float(t["K"][0, 2]) == pytest.approx(15.25)
    assert t["scene"] == "a"


def test_normalize_touches_colour_only():
    s = ToTensor()(
        {
            "image": np.full((4, 5, 3), 0.45 * 255, np.float32),
            "refs": [np.full((4, 5, 3), 0.675 * 255, np.float32)],
            "depth": np.full((4, 5), 0.45, np.float32),
            "K": K0,
        }
    )
    n = Normalize()(s)
    torch.testing.assert_close(n["image"], torch.zeros(3, 4, 5))
    torch.testing.assert_close(n["refs"][0], torch.ones(3, 4, 5))  # (0.675 - 0.45) / 0.225
    assert n["depth"] is s["depth"] and n["K"] is s["K"]
    torch.testing.assert_close(s["image"], torch.full((3, 4, 5), 0.45))  # input untouched
    m = Normalize(IMAGENET_MEAN, IMAGENET_STD)({"image": torch.full((3, 2, 2), 0.5)})
    expected = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    torch.testing.assert_close(m["image"][:, 0, 0], torch.tensor(expected))
    with pytest.raises(TypeError, match="ToTensor"):
        Normalize()({"image": np.zeros((4, 5, 3), np.float32)})


def test_eval_chain_keeps_ground_truth_at_full_resolution():
    s = {
        "image": np.zeros((H, W, 3), np.uint8),
        "depth": np.ones((H, W), np.float32),
        "K": K0,
    }
    out = sc_depth_eval_transforms((12, 16))(s)
    assert out["image"].shape == (3, 12, 16) and out["depth"].shape == (1, H, W)
    np.testing.assert_allclose(out["K"].numpy()[0], [10.0, 0.0, 7.625])
