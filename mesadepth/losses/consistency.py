"""Consistency terms of SC-DepthV2: depth (geometry) consistency and the ARN rotation losses.

Specification: geometric-and-supervised-pretraining.md sections 4.2-4.3 (depth inconsistency,
``mean_on_mask``, L_geo), 4.5 (ARN losses L_rc, L_rt and the rot-consistency target) and
pitfalls 6, 7, 21 and 23.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mesadepth.errors import ConfigError
from mesadepth.geometry import Convention, rotation_warp

__all__ = [
    "MIN_VALID_PIXELS",
    "arn_losses",
    "depth_inconsistency",
    "geometry_consistency_loss",
    "mean_on_mask",
    "rot_consistency_target",
]

#: ``mean_on_mask`` needs strictly more valid pixels than this, else it returns 0 (pitfall 7).
MIN_VALID_PIXELS = 100

# ARN target rule (spec 4.5): keep r1 as its own target when its mean magnitude is in
# (low, high); otherwise draw U(-noise, noise) angles. Triplet margin 0.05 rad.
_ROT_LOW, _ROT_HIGH, _ROT_NOISE, _TRIPLET_MARGIN = 0.02, 0.1, 0.05, 0.05


def mean_on_mask(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``err`` over the pixels where ``valid`` is 1, the reference's ``mean_on_mask``.

    ``sum(err * V) / sum(V)`` with ``V`` broadcast to ``err``'s shape, computed over every
    element of the batch together (spec 4.3). If ``sum(V) <= 100`` the result is a constant
    **float32** zero without gradient, whatever ``err``'s dtype (pitfalls 7, 23).

    Args:
        err: (B, C, H, W) error map.
        valid: (B, 1|C, H, W) 0/1 mask (float or bool).

    Returns:
        Scalar (0-D) tensor.
    """
    mask = valid.to(err.dtype).expand_as(err)
    count = mask.sum()
    if count > MIN_VALID_PIXELS:
        return (err * mask).sum() / count
    return torch.tensor(0.0, dtype=torch.float32, device=err.device)


def depth_inconsistency(
    computed_depth: torch.Tensor, projected_depth: torch.Tensor
) -> torch.Tensor:
    """``E_d = |D_c - D_p| / (D_c + D_p)`` per pixel (spec 4.2).

    No epsilon and no clamp: E_d = 1 where the projection falls outside the source image
    (D_p = 0), and it can exceed 1 where D_c <= 0 (pitfall 6).

    Args:
        computed_depth: (B, 1, H, W) D_c from :func:`mesadepth.geometry.inverse_warp`.
        projected_depth: (B, 1, H, W) D_p (sampled source depth).

    Returns:
        (B, 1, H, W).
    """
    return (computed_depth - projected_depth).abs() / (computed_depth + projected_depth)


def geometry_consistency_loss(depth_diff: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_geo = ``mean_on_mask(E_d, V)`` on the view-selected maps (spec 4.3); scalar tensor."""
    return mean_on_mask(depth_diff, valid)


def _stack(name: str, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ConfigError(f"arn_losses: {name} must be (refs, B, 3), got {tuple(t.shape)}")
    return t


def arn_losses(
    rot1: torch.Tensor | Sequence[torch.Tensor],
    rot2: torch.Tensor | Sequence[torch.Tensor],
    rot3: torch.Tensor | Sequence[torch.Tensor],
    rot_target: torch.Tensor | Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """ARN rotation-consistency and rotation-triplet losses (spec 4.5).

    - ``rot_c`` = mean ``|r3 - g|``;
    - ``rot_t`` = mean ``max(0, |r2| - |r1| + 0.05)``, element-wise;
    means over references, batch and the 3 angles. Also returns the logged magnitudes
    ``rot_before`` = mean ``|r1|`` and ``rot_after`` = mean ``|r2|`` (detached).

    Args:
        rot1: ARN(I_t, I_r) per reference, (R, B, 3) or a sequence of (B, 3); radians.
        rot2: ARN(I_t, RotWarp(I_r, r1)), same shape.
        rot3: ARN(Q, I_r), same shape.
        rot_target: g from :func:`rot_consistency_target`, same shape.

    Returns:
        Dict of scalar tensors: ``rot_c``, ``rot_t``, ``rot_before``, ``rot_after``.
    """
    r1, r2, r3 = _stack("rot1", rot1), _stack("rot2", rot2), _stack("rot3", rot3)
    g = _stack("rot_target", rot_target)
    if not r1.shape == r2.shape == r3.shape == g.shape:
        raise ConfigError(
            f"arn_losses: shapes differ: {tuple(r1.shape)}, {tuple(r2.shape)}, "
            f"{tuple(r3.shape)}, {tuple(g.shape)}"
        )
    return {
        "rot_c": (r3 - g).abs().mean(),
        "rot_t": (r2.abs() - r1.abs() + _TRIPLET_MARGIN).clamp(min=0).mean(),
        "rot_before": r1.detach().abs().mean(),
        "rot_after": r2.detach().abs().mean(),
    }


def rot_consistency_target(
    rot1: torch.Tensor,
    rectified_ref: torch.Tensor,
    ref: torch.Tensor,
    K: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    convention: Convention = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target rotation g and the image Q that ARN(Q, I_r) should map to g (spec 4.5).

    One decision per reference and batch (pitfall 21): with ``a`` = mean ``|r1|`` over the batch
    and the 3 angles, if ``0.02 < a < 0.1`` then ``g = stopgrad(r1)``, ``Q =
    stopgrad(rectified_ref)``; otherwise ``g ~ U(-0.05, 0.05)`` element-wise (fresh draw) and
    ``Q = RotWarp(ref, g, K)``.

    Args:
        rot1: (B, 3) r1 = ARN(I_t, I_r), radians.
        rectified_ref: (B, C, H, W) RotWarp(I_r, r1, K).
        ref: (B, C, H, W) the unrectified reference I_r.
        K: (B, 3, 3) or (3, 3).
        generator: RNG of the uniform draw (CPU generator for CPU tensors).
        convention: passed to :func:`mesadepth.geometry.rotation_warp`.

    Returns:
        ``(g, Q)``: (B, 3) and (B, C, H, W), both without gradient.
    """
    if rot1.ndim != 2 or rot1.shape[-1] != 3:
        raise ConfigError(f"rot_consistency_target: rot1 must be (B, 3), got {tuple(rot1.shape)}")
    a = float(rot1.detach().abs().mean())
    if _ROT_LOW < a < _ROT_HIGH:
        return rot1.detach(), rectified_ref.detach()
    u = torch.rand(rot1.shape, generator=generator, dtype=rot1.dtype, device=rot1.device)
    g = (2.0 * u - 1.0) * _ROT_NOISE
    with torch.no_grad():
        q = rotation_warp(ref, g, K, convention=convention)
    return g, q
