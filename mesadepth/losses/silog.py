"""Scale-invariant log loss of the NYUv2 depth fine-tuning.

Specification: masked-pretraining-and-finetuning.md section 2.3 and pitfalls 21, 22.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mesadepth.errors import ConfigError

__all__ = ["silog_loss"]


def _squeeze_channel(t: Tensor, what: str) -> Tensor:
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(
                f"silog_loss: {what} must be (B, 1, H, W) or (B, H, W), got {tuple(t.shape)}"
            )
        return t[:, 0]
    if t.dim() != 3:
        raise ValueError(
            f"silog_loss: {what} must be (B, 1, H, W) or (B, H, W), got {tuple(t.shape)}"
        )
    return t


def silog_loss(pred: Tensor, target: Tensor, lambd: float = 0.5) -> Tensor:
    """sqrt(mean(d^2) - lambd (mean d)^2), d = ln target - ln pred (spec 2.3), a 0-d tensor.

    pred, target: (B, 1, H, W) or (B, H, W), metres; pred > 0 (the head's sigmoid range).
    Valid pixels are ``target > 0`` with **no** upper bound (ground truth above the 10 m head
    range still counts, pitfall 21). The means run over the valid pixels of the whole batch
    pooled together (not per image), with no x10 / x100 factor. Unlike the reference, the
    channel squeeze never drops the batch axis, so a batch of one works (pitfall 22).

    Computed in at least float32. A batch without any valid pixel gives a zero loss that still
    depends on ``pred`` (the reference returns NaN, which would poison the weights).
    """
    if not 0.0 <= lambd <= 1.0:
        # lambd > 1 can make the radicand negative; lambd < 0 is not a scale-invariant loss.
        raise ConfigError(f"silog_loss: lambd must be in [0, 1], got {lambd!r}")
    p = _squeeze_channel(pred, "pred")
    t = _squeeze_channel(target, "target")
    if p.shape != t.shape:
        raise ValueError(
            f"silog_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in size"
        )
    dtype = torch.promote_types(p.dtype, torch.float32)
    p, t = p.to(dtype), t.to(dtype)
    valid = t > 0
    if not bool(valid.any()):
        return p.sum() * 0.0
    d = torch.log(t[valid]) - torch.log(p[valid])
    return torch.sqrt((d * d).mean() - lambd * d.mean() ** 2)
