"""Flip and sliding-window test-time averaging (spec 2.8, pitfall 30)."""

from __future__ import annotations

import pytest
import torch

from mesadepth.errors import ConfigError
from mesadepth.evaluation.protocol import (
    flip_average,
    predict_with_tta,
    sliding_window_predict,
    window_offsets,
)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel model: equivariant to flips and crops."""
    return x.mean(dim=1, keepdim=True)


def column_index(x: torch.Tensor) -> torch.Tensor:
    """A position-only model: predicts the column index within its input (not equivariant)."""
    b, _, h, w = x.shape
    return torch.arange(w, dtype=x.dtype).expand(b, 1, h, w).clone()


class Counting:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(x.shape))
        return self.fn(x)


def test_window_offsets() -> None:
    assert window_offsets(640, 480, 2) == [0, 160]  # the reference's 480 x 640 windows
    assert window_offsets(480, 480, 2) == [0]
    # (L - s) divisible by n - 1: identical to the reference's i * stride.
    assert window_offsets(10, 4, 3) == [0, 3, 6]
    # Not divisible: the reference would stop at 2 * 2 = 4 and leave column 9 uncovered.
    assert window_offsets(10, 4, 4) == [0, 2, 4, 6]
    assert window_offsets(11, 4, 3) == [0, 3, 7]
    with pytest.raises(ConfigError):
        window_offsets(10, 4, 1)


def test_equivariant_model_is_unchanged_by_every_averaging() -> None:
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    single = channel_mean(x)
    assert torch.equal(flip_average(channel_mean, x), single)
    # Two windows: (a + a) / 2 is exact. Three overlap up to 3 times: (a + a + a) / 3 may
    # round by an ulp.
    assert torch.equal(sliding_window_predict(channel_mean, x, n_windows=2), single)
    three = sliding_window_predict(channel_mean, x, n_windows=3)
    torch.testing.assert_close(three, single, rtol=1e-7, atol=0.0)
    assert torch.equal(predict_with_tta(channel_mean, x), single)
    # Portrait images slide along rows.
    xt = x.transpose(2, 3)
    assert torch.equal(predict_with_tta(channel_mean, xt), channel_mean(xt))


def test_flip_average_of_a_position_model() -> None:
    x = torch.zeros(1, 3, 2, 5)
    model = Counting(column_index)
    out = flip_average(model, x)
    # p = c; the mirrored input also predicts c, mirrored back 4 - c: the mean is 2 everywhere.
    assert torch.equal(out, torch.full((1, 1, 2, 5), 2.0))
    assert model.batches == [(2, 3, 2, 5)]  # one forward pass over the image and its mirror


def test_sliding_windows_of_a_position_model() -> None:
    # 4 x 6 image, windows 4 x 4 at columns 0 and 2. Window 0 predicts c, window 1 c - 2:
    # columns 0, 1 -> c; 2, 3 -> (c + c - 2) / 2 = c - 1; 4, 5 -> c - 2.
    x = torch.zeros(1, 3, 4, 6)
    model = Counting(column_index)
    out = sliding_window_predict(model, x)
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 3.0]).expand(1, 1, 4, 6)
    assert torch.equal(out, expected)
    assert model.batches == [(2, 3, 4, 4)]
    # With flip: each window's flip average is (side - 1) / 2 = 1.5 everywhere, so the merge
    # is 1.5 too; all 4 crops go through the model in one call, as in the reference.
    model = Counting(column_index)
    out = predict_with_tta(model, x)
    assert torch.equal(out, torch.full((1, 1, 4, 6), 1.5))
    assert model.batches == [(4, 3, 4, 4)]


def test_windows_keep_images_of_a_batch_apart() -> None:
    # A model that predicts its input's first channel: the merge must put each image's
    # windows back on that image.
    x = torch.zeros(2, 3, 4, 6)
    x[1] = 5.0
    out = sliding_window_predict(lambda t: t[:, :1], x, n_windows=3)
    assert torch.equal(out, x[:, :1])


def test_bad_predict_output_raises() -> None:
    x = torch.zeros(1, 3, 4, 6)
    with pytest.raises(ConfigError, match="predict must return"):
        flip_average(lambda t: t, x)  # 3 channels instead of 1
    with pytest.raises(ConfigError):
        sliding_window_predict(channel_mean, torch.zeros(3, 4, 6))
