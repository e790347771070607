"""MIM-Depth's test-time averaging: horizontal flip and sliding ("shift") windows.

Spec: masked-pretraining-and-finetuning.md 2.8 and pitfall 30; datasets-and-ibims-evaluation.md
2.5. ``predict`` is any callable mapping images (B, 3, H, W) to depth (B, 1, H, W) on torch
tensors (e.g. a model in eval mode); run these helpers under ``torch.inference_mode()``.

At 480 x 640 with ``n_windows=2`` ("shift_size 2" is a number of windows, not pixels) the
windows are 480 x 480 at column offsets 0 and 160; with flip on, the two crops and their mirrors
go through ``predict`` as one batch of 4, each crop's prediction is averaged with the mirrored
prediction of its mirror, and the crops are summed into the full canvas and divided by the
per-pixel window count (columns 0-159 and 480-639 once, 160-479 twice).

Generalisation (ours; the reference asserts W > H and batch 1): windows are squares whose side
is the shorter image side, sliding along the longer axis (columns for landscape, rows for
portrait); a square image is a single window. Offsets are ``i * ((L - s) // (n - 1))`` for
i < n - 1, exactly as the reference, and the last window is always flush with the far edge
(offset ``L - s``). That equals the reference whenever (L - s) is divisible by n - 1 (always for
n = 2); otherwise the reference leaves a strip uncovered (0 / 0 there) and we cover it. Any
batch size works: the windows of all images are stacked along the batch axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mesadepth.errors import ConfigError

__all__ = [
    "Predictor",
    "flip_average",
    "predict_with_tta",
    "sliding_window_predict",
    "window_offsets",
]

#: ``predict(images (B, 3, H, W)) -> depth (B, 1, H, W)``.
Predictor = Callable[[torch.Tensor], torch.Tensor]


def _check_images(images: torch.Tensor, where: str) -> None:
    if images.ndim != 4:
        raise ConfigError(f"{where}: expected images (B, C, H, W), got {tuple(images.shape)}")


def _run(predict: Predictor, batch: torch.Tensor, where: str) -> torch.Tensor:
    out = predict(batch)
    b, _, h, w = batch.shape
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b, 1, h, w):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{where}: predict must return (B, 1, H, W) = {(b, 1, h, w)}, got {shape}"
        )
    return out


def _predict_maybe_flipped(predict: Predictor, batch: torch.Tensor, flip: bool) -> torch.Tensor:
    if not flip:
        return _run(predict, batch, "predict")
    b = batch.shape[0]
    # One forward pass over the images and their mirrors, as the reference does.
    out = _run(predict, torch.cat((batch, torch.flip(batch, [3])), dim=0), "flip_average")
    return (out[:b] + torch.flip(out[b:], [3])) / 2.0


def flip_average(predict: Predictor, images: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip averaging (spec 2.8): ``(p(x) + mirror(p(mirror(x)))) / 2``.

    images (B, C, H, W) -> depth (B, 1, H, W); ``predict`` is called once with 2B images.
    """
    _check_images(images, "flip_average")
    return _predict_maybe_flipped(predict, images, flip=True)


def window_offsets(length: int, side: int, n_windows: int = 2) -> list[int]:
    """Start offsets of ``n_windows`` windows of size ``side`` along an axis of ``length``.

    ``i * ((length - side) // (n_windows - 1))`` for i < n - 1 and ``length - side`` for the
    last (see the module docstring); ``[0]`` when ``length == side``. At 640 / 480 / 2:
    ``[0, 160]``.
    """
    if side <= 0 or side > length:
        raise ConfigError(
            f"window_offsets: need 0 < side <= length, got side {side}, length {length}"
        )
    if length == side:
        return [0]
    if n_windows < 2:
        raise ConfigError(
            f"window_offsets: {n_windows} window(s) of {side} cannot cover {length}; need >= 2"
        )
    stride = (length - side) // (n_windows - 1)
    return [i * stride for i in range(n_windows - 1)] + [length - side]


def sliding_window_predict(
    predict: Predictor, images: torch.Tensor, n_windows: int = 2, flip: bool = False
) -> torch.Tensor:
    """Sliding-window ("shift window") averaging, optionally with flip averaging (spec 2.8).

    images (B, C, H, W) -> depth (B, 1, H, W). Square windows of side min(H, W) at
    :func:`window_offsets` along the longer axis; all windows (and, with ``flip``, their
    mirrors) go through ``predict`` in one call; overlapping predictions are averaged.
    """
    _check_images(images, "sliding_window_predict")
    b, _, h, w = images.shape
    side = min(h, w)
    along_cols = w >= h
    offsets = window_offsets(w if along_cols else h, side, n_windows)

    def crop(x: torch.Tensor, off: int) -> torch.Tensor:
        return x[..., :, off : off + side] if along_cols else x[..., off : off + side, :]

    # Window-major stacking: batch index k * B + i is window k of image i.
    windows = torch.cat([crop(images, off) for off in offsets], dim=0)
    preds = _predict_maybe_flipped(predict, windows, flip)
    canvas = torch.zeros((b, 1, h, w), dtype=preds.dtype, device=preds.device)
    count = torch.zeros_like(canvas)
    for k, off in enumerate(offsets):  # a loop over windows (2 by default), not pixels
        crop(canvas, off).add_(preds[k * b : (k + 1) * b])
        crop(count, off).add_(1.0)
    return canvas / count


def predict_with_tta(
    predict: Predictor,
    images: torch.Tensor,
    shift_window: bool = True,
    flip: bool = True,
    n_windows: int = 2,
) -> torch.Tensor:
    """MIM-Depth's test-time prediction: sliding windows and/or flip averaging (spec 2.8).

    The reported NYUv2 numbers use both (pitfall 30). images (B, C, H, W) -> (B, 1, H, W).
    """
    _check_images(images, "predict_with_tta")
    if shift_window:
        return sliding_window_predict(predict, images, n_windows=n_windows, flip=flip)
    return _predict_maybe_flipped(predict, images, flip)
