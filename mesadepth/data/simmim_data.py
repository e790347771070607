"""SimMIM's pre-training input pipeline (spec masked-pretraining section 1.5) over any image dataset.

As the reference's torchvision pipeline on a PIL image: RandomResizedCrop(size, scale (0.67, 1),
ratio (3/4, 4/3)) -> PIL crop of the uint8 image, PIL bilinear resize (uint8, PIL's antialiasing
filter) -> horizontal flip (p 0.5) -> [0, 1] (ToTensor) -> ImageNet mean/std (Normalize), with the
mask of section 1.1 drawn alongside. Given the same crop box and flip the encoder input equals the
reference's bit for bit. The random draws come from a NumPy generator seeded by (seed, epoch,
index), not from the global torch RNG (pitfall 19), so a resumed or multi-process run sees exactly
the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: (top, left, height, width) of a crop in pixels, torchvision's ``get_params`` order.
CropBox = tuple[int, int, int, int]


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.67, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop, drawn by torchvision's ``RandomResizedCrop.get_params`` rule.

    Ten tries of area ~ U(scale) x H W and log-uniform aspect ratio; if none fits, the central
    crop with the ratio clamped to the range (torchvision's fallback).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_uint8(image: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Crop ``box`` of an (H, W, 3) uint8 image resized to (size, size, 3) uint8 (section 1.5).

    What torchvision's ``resized_crop`` does to a PIL image: ``Image.crop`` then ``Image.resize``
    with ``BILINEAR`` (PIL widens the filter when it shrinks, i.e. antialiases, and rounds to
    uint8). A box reaching outside the image raises ``ValueError`` (PIL would pad it with black).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    top, left, h, w = (int(v) for v in box)
    height, width = image.shape[:2]
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(
            f"crop box (top, left, height, width) = {tuple(box)} does not lie inside the "
            f"{height} x {width} image"
        )
    pil = Image.fromarray(np.ascontiguousarray(image))  # (H, W, 3) uint8 -> mode RGB
    crop = pil.crop((left, top, left + w, top + h))
    return np.array(crop.resize((size, size), Image.Resampling.BILINEAR))  # writable copy


@dataclass(frozen=True)
class SimMIMAugment:
    """One draw of the SimMIM augmentation: the crop box (top, left, height, width) and the flip."""

    box: CropBox
    flip: bool


class SimMIMTransform:
    """Image (H, W, 3) uint8 + rng -> normalised (3, S, S) float32 tensor and its token mask.

    Draws, in this order, from ``rng``: the crop box (:func:`random_resized_crop_params`), the
    flip (``rng.random() < flip_p``), then the mask (``mask_generator(rng)`` returns the
    (S/4, S/4) token mask, 1 = masked; see :class:`mesadepth.models.simmim.MaskGenerator`).
    ``box`` / ``flip`` given to :meth:`__call__` replace the draws (replaying the reference's
    augmentation); :meth:`sample` draws them alone and :meth:`encode` applies them.
    """

    def __init__(
        self,
        size: int,
        mask_generator: Any,
        scale: tuple[float, float] = (0.67, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.size = size
        self.mask_generator = mask_generator
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def sample(
        self,
        rng: np.random.Generator,
        height: int,
        width: int,
        box: CropBox | None = None,
        flip: bool | None = None,
    ) -> SimMIMAugment:
        """The crop box and flip of one image of (height, width); given ones are not drawn."""
        if box is None:
            box = random_resized_crop_params(rng, height, width, self.scale, self.ratio)
        if flip is None:
            flip = bool(rng.random() < self.flip_p)
        return SimMIMAugment(tuple(int(v) for v in box), bool(flip))  # type: ignore[arg-type]

    def crop_uint8(self, image: np.ndarray, augment: SimMIMAugment) -> np.ndarray:
        """The resized, flipped crop as (S, S, 3) uint8: the reference's PIL image before ToTensor."""
        out = resized_crop_uint8(image, augment.box, self.size)
        return out[:, ::-1] if augment.flip else out

    def encode(self, image: np.ndarray, augment: SimMIMAugment) -> torch.Tensor:
        """ToTensor + Normalize of :meth:`crop_uint8`: (3, S, S) float32."""
        x = torch.from_numpy(np.ascontiguousarray(self.crop_uint8(image, augment)))
        x = x.permute(2, 0, 1).float().div(255.0)
        return (x - self.mean) / self.std

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        box: CropBox | None = None,
        flip: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(image)
        augment = self.sample(rng, image.shape[0], image.shape[1], box, flip)
        x = self.encode(image, augment)
        mask = torch.from_numpy(np.asarray(self.mask_generator(rng), dtype=np.int64))
        return x, mask


class SimMIMDataset(Dataset):
    """Wraps an image dataset (LSUN lmdb, image folder...) into (image, mask) pairs.

    Augmentation randomness for item ``i`` in epoch ``e`` comes from
    ``numpy.random.default_rng((seed, e, i))``; call :meth:`set_epoch` each epoch (the training
    frame's sampler does). Labels of the base dataset are ignored, as in SimMIM.
    """

    def __init__(self, base: Dataset, transform: SimMIMTransform, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.base[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        image, mask = self.transform(sample["image"], rng)
        return {"image": image, "mask": mask, "index": torch.tensor(int(index))}
