"""SimMIM's pre-training input pipeline (spec masked-pretraining section 1.5) over any image dataset.

RandomResizedCrop(size, scale (0.67, 1), ratio (3/4, 4/3), bilinear) -> horizontal flip (p 0.5)
-> [0, 1] -> ImageNet mean/std, with the mask of section 1.1 drawn alongside. The random draws
come from a NumPy generator seeded by (seed, epoch, index), not from the global torch RNG, so a
resumed or multi-process run sees exactly the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class SimMIMTransform:
    """Image (H, W, 3) uint8 + rng -> normalised (3, S, S) float tensor and its token mask.

    ``mask_generator(rng)`` returns the (S/4, S/4) token mask (1 = masked); see
    :class:`mesadepth.models.simmim.MaskGenerator`.
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
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[:2]
        top, left, ch, cw = random_resized_crop_params(rng, h, w, self.scale, self.ratio)
        x = torch.from_numpy(
            np.array(image[top : top + ch, left : left + cw], dtype=np.uint8)
        ).permute(2, 0, 1)
        x = x.float().div_(255.0)[None]
        # torchvision's tensor path resizes with bilinear + antialias (its default since 0.17).
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        x = x.clamp_(0.0, 1.0)
        if rng.random() < self.flip_p:
            x = x.flip(-1)
        x = (x - self.mean) / self.std
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
