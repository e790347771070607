"""Scale-invariant log loss of depth fine-tuning (spec 2.3, pitfalls 21, 22)."""

from __future__ import annotations

import math

import pytest
import torch

from mesadepth.errors import ConfigError
from mesadepth.losses.silog import silog_loss

E = math.e


def test_hand_computed_2x2_excludes_zero_and_keeps_depth_beyond_10m():
    pred = torch.ones(1, 1, 2, 2)
    # d = ln(target / pred) = (1, excluded, -1, 3); e^3 = 20.1 m > 10 m is kept (pitfall 21).
    target = torch.tensor([[[[E, 0.0], [1 / E, E**3]]]])
    loss = silog_loss(pred, target)
    # mean d = 1, mean d^2 = 11/3 -> sqrt(11/3 - 0.5 * 1) = sqrt(19/6).
    assert loss.item() == pytest.approx(math.sqrt(19 / 6), rel=1e-6)
    # With the > 10 m pixel dropped it would be sqrt(1 - 0) = 1.
    assert loss.item() != pytest.approx(1.0, rel=1e-3)
    assert silog_loss(pred[:, 0], target[:, 0]).item() == pytest.approx(loss.item(), rel=1e-7)


def test_lambda_and_no_scaling():
    pred = torch.ones(1, 2, 2)
    target = torch.tensor([[[E, 0.0], [1 / E, E**3]]])
    # lambda 0: sqrt(mean d^2) = sqrt(11/3); lambda 1: sqrt(variance) = sqrt(11/3 - 1).
    assert silog_loss(pred, target, lambd=0.0).item() == pytest.approx(math.sqrt(11 / 3), rel=1e-6)
    assert silog_loss(pred, target, lambd=1.0).item() == pytest.approx(math.sqrt(8 / 3), rel=1e-6)
    with pytest.raises(ConfigError):
        silog_loss(pred, target, lambd=1.5)


def test_pooled_over_the_batch_not_averaged_per_image():
    pred = torch.ones(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = E**2  # image 0: one valid pixel, d = 2
    target[1, 0, :, 1] = 1.0  # image 1: two valid pixels, d = 0
    target[1, 0, 1, 0] = 1.0  # ... and a third one, d = 0
    loss = silog_loss(pred, target).item()
    # Pooled d = (2, 0, 0, 0): mean 0.5, mean d^2 = 1 -> sqrt(1 - 0.125).
    assert loss == pytest.approx(math.sqrt(0.875), rel=1e-6)
    per_image = (math.sqrt(4 - 0.5 * 4) + 0.0) / 2
    assert abs(loss - per_image) > 0.2


def test_scaling_the_prediction_changes_only_the_mean_term():
    torch.manual_seed(0)
    pred = torch.rand(2, 1, 5, 6, dtype=torch.float64) * 5 + 0.1
    target = torch.rand(2, 1, 5, 6, dtype=torch.float64) * 12
    target[0, 0, :2] = 0.0
    valid = target > 0
    d = torch.log(target[valid]) - torch.log(pred[valid])
    m1 = d.mean().item()
    base = silog_loss(pred, target).item()
    for c in (0.3, 2.0, 7.5):
        k = math.log(c)
        # d -> d - ln c: the variance part is unchanged; the closed form of the rest is
        # L(c)^2 = L(1)^2 + (1 - lambda) (k^2 - 2 k mean d).
        scaled = silog_loss(pred * c, target).item()
        assert scaled**2 == pytest.approx(base**2 + 0.5 * (k * k - 2 * k * m1), rel=1e-10)
        # lambda = 1 is fully scale invariant.
        assert silog_loss(pred * c, target, lambd=1.0).item() == pytest.approx(
            silog_loss(pred, target, lambd=1.0).item(), rel=1e-10
        )


def test_batch_of_one_no_valid_pixel_and_gradients():
    pred = torch.full((1, 1, 2, 2), 2.0, requires_grad=True)
    target = torch.tensor([[[[1.0, 4.0], [0.0, 2.0]]]])
    loss = silog_loss(pred, target)  # the reference's squeeze would break on B = 1
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 0, 1, 0] == 0  # the invalid pixel gets no gradient
    empty = silog_loss(pred, torch.zeros(1, 1, 2, 2))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError):
        silog_loss(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3))
