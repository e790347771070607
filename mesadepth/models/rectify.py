"""The auto-rectify network (ARN) of SC-DepthV2 (spec 2.4).

Specification: geometric-and-supervised-pretraining.md section 2.4 (input halved with bilinear
align_corners=True interpolation, 3 Euler angles, no 0.01 scaling), 4.5 (how the losses use it),
pitfall 1 (the ARN's grids use align_corners=True, unlike the depth warp).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mesadepth.models.posenet import PairRegressor, PathLike

__all__ = ["RectifyNet"]


class RectifyNet(PairRegressor):
    """ARN (spec 2.4): (I_a, I_b) -> (B, 3) Euler angles (r_x, r_y, r_z) in radians.

    The stacked 6-channel input (B, 6, H, W) is resized to (floor(H/2), floor(W/2)) with bilinear
    interpolation, align_corners=True, then a 6-channel ResNet (ImageNet-initialised like
    :class:`~mesadepth.models.posenet.PoseNet` when ``pretrained`` is given) and the pose decoder
    with a 3-output last conv and no output scaling. ARN(I_a, I_b) = r such that
    RotWarp(I_b, r, K) is rotationally aligned with I_a.
    """

    def __init__(self, num_layers: int = 18, pretrained: PathLike | None = None) -> None:
        super().__init__(num_layers, pretrained, num_outputs=3, scale=1.0)

    def prepare(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        if h < 1 or w < 1:
            raise ValueError(f"RectifyNet: input {tuple(x.shape[-2:])} is too small to halve")
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
