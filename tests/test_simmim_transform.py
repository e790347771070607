"""SimMIM input pipeline against the reference's (masked-pretraining spec section 1.5).

The reference is torchvision's RandomResizedCrop -> RandomHorizontalFlip -> ToTensor -> Normalize
on a PIL RGB image; the tests replay our crop box and flip through PIL and torchvision directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from mesadepth.data.simmim_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimMIMAugment,
    SimMIMDataset,
    SimMIMTransform,
    random_resized_crop_params,
    resized_crop_uint8,
)
from mesadepth.models.simmim import MaskGenerator


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients, a hard edge and noise: every resize filter leaves fractional values on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, np.where(xx > w // 3, 200.0, 30.0)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _reference(img: np.ndarray, box, flip: bool, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """The reference pipeline on a PIL image with a given box and flip: uint8 crop, tensor."""
    top, left, h, w = box
    pil = TF.resized_crop(
        Image.fromarray(img), top, left, h, w, [size, size], InterpolationMode.BILINEAR
    )
    if flip:
        pil = TF.hflip(pil)
    x = TF.normalize(TF.to_tensor(pil), IMAGENET_MEAN, IMAGENET_STD)
    return np.array(pil), x


# (image size, crop box, output size): shrinking, enlarging, non-square, the whole image.
CASES = [
    ((96, 128), (5, 11, 80, 97), 32),
    ((50, 37), (3, 2, 41, 33), 48),
    ((300, 200), (20, 10, 260, 190), 64),
    ((64, 64), (0, 0, 64, 64), 64),
]


@pytest.mark.parametrize(("shape", "box", "size"), CASES)
@pytest.mark.parametrize("flip", [False, True])
def test_crop_equals_pil_and_the_encoder_input_equals_torchvisions(shape, box, size, flip):
    img = _image(*shape, seed=shape[0])
    transform = SimMIMTransform(size, mask_generator=None)
    augment = SimMIMAugment(box, flip)
    ref_uint8, ref_x = _reference(img, box, flip, size)
    # PIL directly: Image.crop then Image.resize(BILINEAR), then the mirror.
    top, left, h, w = box
    pil = Image.fromarray(img).crop((left, top, left + w, top + h))
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(np.array(pil), ref_uint8)
    crop = transform.crop_uint8(img, augment)
    assert crop.dtype == np.uint8 and crop.shape == (size, size, 3)
    np.testing.assert_array_equal(crop, ref_uint8)
    x = transform.encode(img, augment)
    assert x.dtype == torch.float32 and x.shape == (3, size, size)
    assert torch.equal(x, ref_x)  # bit for bit after the same ToTensor + Normalize


def test_the_float_antialiased_resize_is_not_the_reference():
    """What the transform used to do (float crop, bilinear + antialias, never rounded) is off by
    up to a grey level, so the exact tests above can tell the two apart."""
    img = _image(96, 128, 0)
    box, size = (5, 11, 80, 97), 32
    crop = torch.from_numpy(img[5:85, 11:108].copy()).permute(2, 0, 1).float().div(255)
    old = torch.nn.functional.interpolate(
        crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    ref = torch.from_numpy(resized_crop_uint8(img, box, size)).permute(2, 0, 1).float() / 255
    levels = (old - ref).abs() * 255
    assert 0.2 < float(levels.max()) <= 1.0 and float((levels > 1e-3).float().mean()) > 0.5


def test_replaying_the_box_and_flip_reproduces_the_draw():
    img = _image(72, 96, 1)
    transform = SimMIMTransform(32, MaskGenerator(32, 8, 4, 0.6))
    flips = set()
    for seed in range(6):
        x, mask = transform(img, np.random.default_rng(seed))
        # The draw order: box (torchvision's rule), then the flip, then the mask.
        rng = np.random.default_rng(seed)
        box = random_resized_crop_params(rng, 72, 96)
        flip = bool(rng.random() < 0.5)
        augment = transform.sample(np.random.default_rng(seed), 72, 96)
        assert augment == SimMIMAugment(box, flip)
        flips.add(flip)
        assert torch.equal(transform.encode(img, augment), x)
        assert torch.equal(transform(img, np.random.default_rng(99), box=box, flip=flip)[0], x)
        _, ref_x = _reference(img, box, flip, 32)
        assert torch.equal(x, ref_x)
        assert torch.equal(mask, torch.from_numpy(transform.mask_generator(rng)).long())
    assert flips == {False, True}
    # A given box is not drawn; the flip still is, from the generator's first value.
    fixed = transform.sample(np.random.default_rng(3), 72, 96, box=(1, 2, 60, 70))
    assert fixed == SimMIMAugment((1, 2, 60, 70), bool(np.random.default_rng(3).random() < 0.5))


def test_dataset_items_are_the_reference_input_of_their_draw():
    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict:
            return {"image": _image(40, 56, i)}

    transform = SimMIMTransform(32, MaskGenerator(32, 8, 4, 0.6))
    ds = SimMIMDataset(Images(), transform, seed=5)
    ds.set_epoch(2)
    item = ds[1]
    augment = transform.sample(np.random.default_rng([5, 2, 1]), 40, 56)
    assert torch.equal(
        item["image"], _reference(_image(40, 56, 1), augment.box, augment.flip, 32)[1]
    )


class _Scripted:
    """A generator that returns scripted values and records the bounds it was asked for."""

    def __init__(self, uniforms, integers):
        self.uniforms, self.integers_ = list(uniforms), list(integers)
        self.calls: list[tuple[str, float, float]] = []

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.uniforms.pop(0)

    def integers(self, low, high):
        self.calls.append(("integers", low, high))
        return self.integers_.pop(0)


def test_crop_params_follow_torchvisions_rule_step_by_step():
    """RandomResizedCrop.get_params on 120 x 160 (area 19200), two tries.

    Try 1: scale 1.0, ratio 3/4: w = round(sqrt(19200 * 3/4)) = 120, h = round(sqrt(19200 / (3/4)))
    = 160 > 120, rejected. Try 2: scale 0.7 (13440), ratio 4/3: w = round(133.87) = 134,
    h = round(100.40) = 100, accepted; top ~ U{0..20}, left ~ U{0..26}.
    """
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    rng = _Scripted([1.0, lo, 0.7, hi], [7, 26])
    assert random_resized_crop_params(rng, 120, 160) == (7, 26, 100, 134)
    assert [c[0] for c in rng.calls] == ["uniform"] * 4 + ["integers"] * 2
    np.testing.assert_allclose(rng.calls[0][1:], (0.67, 1.0))
    np.testing.assert_allclose(rng.calls[1][1:], (lo, hi))
    assert rng.calls[4][1:] == (0, 21) and rng.calls[5][1:] == (0, 27)


def test_boxes_outside_the_image_and_bad_images_are_refused():
    img = _image(20, 30, 0)
    with pytest.raises(ValueError, match=r"\(0, 5, 20, 26\) does not lie inside the 20 x 30"):
        resized_crop_uint8(img, (0, 5, 20, 26), 8)
    with pytest.raises(ValueError, match="does not lie inside"):
        resized_crop_uint8(img, (0, 0, 0, 5), 8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        resized_crop_uint8(img.astype(np.float32), (0, 0, 10, 10), 8)
