"""CKA inputs: images prepared per encoder, layer taps, datasets and loaders (spec B5, B9).

:class:`ImagePreprocess` turns uint8 RGB images into an encoder's normalised input (centre crop
to its aspect ratio, bilinear resize, ImageNet mean/std); :func:`encoder_features` runs an
encoder and returns its tapped layers (timm NHWC); :func:`flatten_features` makes estimator rows
of one tap. :func:`open_dataset` and :func:`make_loader` read the datasets ``mesadepth cka``
accepts, in a fixed order; :func:`name_encoder_files` and :func:`load_encoders` open the
encoders' weight files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesadepth.analysis.cka.estimators import MODES, Mode, as_tensor
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.models.backbone import load_encoder, paper_layers, resolve_layers, tap

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagePreprocess",
    "collate_images",
    "default_encoder_name",
    "encoder_features",
    "encoder_input_size",
    "flatten_features",
    "load_encoders",
    "make_loader",
    "name_encoder_files",
    "open_dataset",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Images in, tap outputs out.


def encoder_input_size(encoder: nn.Module) -> tuple[int, int]:
    """(H, W) input size of a timm Swin-v2 encoder (its ``patch_embed.img_size``)."""
    size = getattr(getattr(encoder, "patch_embed", None), "img_size", None)
    if size is None:
        raise ConfigError(
            f"{type(encoder).__name__} has no patch_embed.img_size; pass preprocess= explicitly"
        )
    return (int(size[0]), int(size[1]))


class ImagePreprocess:
    """uint8 RGB images -> normalised encoder input (B, 3, H, W) float32 (spec B5, B9 pitfall 19).

    Per image: ``crop="center"`` takes the largest centred window with the target's aspect
    ratio (480 x 640 NYUv2 -> columns 80..559 for a square target; ``"none"`` keeps the whole
    image, stretching it), then bilinear resize to ``size`` = (H, W) (half-pixel centres, no
    antialiasing, OpenCV's INTER_LINEAR rule; skipped when already that size), /255, then
    (x - mean) / std per channel (ImageNet by default, the fine-tuning convention).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop: Literal["center", "none"] = "center",
    ) -> None:
        self.size = (
            (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        if crop not in ("center", "none"):
            raise ConfigError(f"crop must be 'center' or 'none', got {crop!r}")
        self.crop = crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the centred crop of an h x w image (exclusive ends)."""
        if self.crop == "none":
            return (0, h, 0, w)
        th, tw = self.size
        if w * th > h * tw:  # wider than the target: keep the height
            cw = max(1, round(h * tw / th))
            x0 = (w - cw) // 2
            return (0, h, x0, x0 + cw)
        ch = max(1, round(w * th / tw))
        y0 = (h - ch) // 2
        return (y0, y0 + ch, 0, w)

    def one(self, image: np.ndarray | Tensor) -> Tensor:
        """(H, W, 3) uint8 -> (3, size) float32 in [0, 1], cropped and resized (not normalised)."""
        src = as_tensor(image)
        if src.dim() != 3 or src.shape[-1] != 3:
            raise DataError(
                "<image>", f"expected an (H, W, 3) RGB image, got shape {tuple(src.shape)}"
            )
        y0, y1, x0, x1 = self.crop_box(int(src.shape[0]), int(src.shape[1]))
        t = src[y0:y1, x0:x1].permute(2, 0, 1).float()
        if src.dtype == torch.uint8:  # float images are taken to be in [0, 1] already
            t = t / 255.0
        if tuple(t.shape[1:]) != self.size:
            t = F.interpolate(
                t[None], size=self.size, mode="bilinear", align_corners=False, antialias=False
            )[0]
        return t

    def __call__(self, images: Sequence[np.ndarray] | Tensor) -> Tensor:
        """A batch of (H, W, 3) uint8 images (list, or a (B, H, W, 3) tensor) -> (B, 3, H, W)."""
        x = torch.stack([self.one(im) for im in images])
        return (x - self.mean) / self.std

    def describe(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "crop": self.crop,
            "resize": "bilinear, half-pixel, no antialias",
            "mean": [round(float(v), 6) for v in self.mean.flatten()],
            "std": [round(float(v), 6) for v in self.std.flatten()],
        }


def encoder_features(
    encoder: nn.Module, images: Tensor, layers: Sequence[str | int] | None = None
) -> list[Tensor]:
    """Tap outputs of ``layers`` (default: the paper's nine, scaled) for a normalised batch.

    images: (B, 3, H, W) at the encoder's input size. Returns one tensor per layer in the
    given order, timm NHWC (B, h, w, C) (masked-pretraining spec 3.1). Runs in eval mode
    under no-grad (pitfall 26) and restores the encoder's previous mode.
    """
    names = resolve_layers(layers, encoder) if layers is not None else paper_layers(encoder)  # type: ignore[arg-type]
    param = next(encoder.parameters(), None)
    if param is not None:
        images = images.to(param.device)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), tap(encoder, names) as store:
            encoder.forward_features(images)  # type: ignore[operator]
    finally:
        encoder.train(was_training)
    return [store[n] for n in names]


def flatten_features(f: Tensor, mode: Mode = "flatten") -> Tensor:
    """One tap output (B, h, w, C) -> estimator rows (spec B5.1).

    ``flatten``: (B, h*w*C); ``mean_pool``: (B, C) float64 token mean; ``tokens_as_examples``:
    (B*h*w, C).
    """
    b, c = int(f.shape[0]), int(f.shape[-1])
    if mode == "flatten":
        return f.reshape(b, -1)
    if mode == "mean_pool":
        return f.reshape(b, -1, c).to(torch.float64).mean(1)
    if mode == "tokens_as_examples":
        return f.reshape(-1, c)
    raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Data: datasets, loaders, batches.


def collate_images(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DataLoader collate keeping images as a list (sizes may differ) plus an id per image."""
    ids = []
    for s in samples:
        ident = next((s[k] for k in ("name", "key", "index") if k in s), None)
        ids.append(None if ident is None else str(ident))
    return {"image": [s["image"] for s in samples], "id": ids}


def make_loader(
    dataset: Any,
    batch_size: int = 32,
    max_images: int | None = None,
    shuffle_seed: int | None = None,
    workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over the first ``max_images`` samples with :func:`collate_images`.

    Order is fixed (pitfall 19) unless ``shuffle_seed`` is given: then each pass draws a new
    permutation from one seeded generator, reproducibly (minibatch passes, B3).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if max_images is not None:
        if max_images < 1:
            raise ConfigError(f"max images must be >= 1, got {max_images}")
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    sampler = None
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(int(shuffle_seed))
        sampler = torch.utils.data.RandomSampler(dataset, generator=g)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
    )


def open_dataset(kind: str, data: str | os.PathLike[str], split: str = "test") -> Any:
    """The dataset ``mesadepth cka --dataset`` reads; every sample has ``image`` (H, W, 3) uint8.

    ``nyu``: a folder holding ``nyu_depth_v2_labeled.mat`` and ``splits.mat`` (or the .mat),
    split ``test`` = the 654 Eigen test images; ``folder``: an image folder (recursive,
    categories as sub-folders); ``ibims``: an IBims-1 folder.
    """
    path = Path(data)
    if kind == "nyu":
        from mesadepth.data.nyu import NYULabeledDataset

        mat = path if path.suffix == ".mat" else path / "nyu_depth_v2_labeled.mat"
        if not mat.is_file():
            raise MissingFileError(
                mat, "NYUv2 labeled .mat", "give --data the folder holding it or the file"
            )
        splits = mat.with_name("splits.mat")
        return NYULabeledDataset(mat, splits if split != "all" else None, split=split)
    if kind == "folder":
        from mesadepth.data.lsun import ImageFolderDataset

        return ImageFolderDataset(path)
    if kind == "ibims":
        from mesadepth.data.ibims import IBimsDataset

        if not path.is_dir():
            raise MissingFileError(path, "IBims-1 folder (ibims1_core_mat/ and imagelist.txt)")
        return IBimsDataset(path)
    raise ConfigError(f"dataset must be nyu, folder or ibims, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Encoder weight files.


def default_encoder_name(path: Path) -> str:
    """An encoder's name from its file: the run folder for ``model.safetensors``, else the stem."""
    # A run directory's weights are all called model.safetensors: the folder names the run.
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def name_encoder_files(
    encoders: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None
) -> dict[str, Path]:
    """{name: path} of encoder weight files, in the given order; every file checked to exist.

    ``names``: one distinct name per file (default :func:`default_encoder_name`). A missing file
    raises :class:`MissingFileError` naming it; a wrong count or repeated name, ConfigError.
    """
    paths = [Path(p) for p in encoders]
    if not paths:
        raise ConfigError("give at least one encoder file")
    for p in paths:
        if not p.is_file():
            raise MissingFileError(
                p,
                "encoder weights (.safetensors with encoder.* keys, e.g. a run's model.safetensors)",
            )
    names = list(names) if names else [default_encoder_name(p) for p in paths]
    if len(names) != len(paths):
        raise ConfigError(
            f"{len(names)} names for {len(paths)} encoder files: give one name per file"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"encoder names must be distinct, got {names}")
    return dict(zip(names, paths, strict=True))


def load_encoders(
    files: Mapping[str, Path], overrides: Mapping[str, Any] | None = None
) -> dict[str, nn.Module]:
    """{name: encoder} rebuilt from each file's metadata with ``overrides`` applied
    (:func:`~mesadepth.models.backbone.load_encoder`; e.g. the fine-tuning geometry)."""
    return {n: load_encoder(p, overrides=dict(overrides or {}) or None) for n, p in files.items()}
