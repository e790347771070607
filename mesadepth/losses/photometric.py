"""SC-DepthV2 photometric losses: SSIM, pairwise maps, view selection, smoothness, the total.

Specification: geometric-and-supervised-pretraining.md sections 0 (one v2 step), 4.1 (SSIM),
4.2 (pairwise maps), 4.3 (combining pairs and directions), 4.4 (smoothness), 4.10 (v2 weights
and ablation flags) and pitfalls 1, 2, 4, 5, 6, 7 and 23.

Every image here is a *normalised* image, ``(x - 0.45) / 0.225`` with x in [0, 1] (spec 1.5):
the SSIM constants, the L1 clamp at 1, the 1e-3 validity threshold and the smoothness edge
weights all act on normalised values, as in the reference (pitfall 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mesadepth.errors import ConfigError
from mesadepth.geometry import Convention, inverse_warp
from mesadepth.losses.consistency import (
    arn_losses,
    depth_inconsistency,
    geometry_consistency_loss,
    mean_on_mask,
)

__all__ = [
    "LOSS_WEIGHTS",
    "PairwiseMaps",
    "PhotoGeometry",
    "combine_pairwise",
    "mean_on_mask",
    "pairwise_maps",
    "photo_and_geometry_loss",
    "sc_depth_v2_losses",
    "smoothness_loss",
    "ssim",
    "ssim_dissimilarity",
    "total_loss",
]

# SSIM (spec 4.1): 7x7 mean window after reflection padding by 3; constants meant for [0, 1]
# images but applied to normalised ones (pitfall 4).
SSIM_WINDOW = 7
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
# Photometric mix and validity threshold (spec 4.2).
_L1_WEIGHT, _SSIM_WEIGHT = 0.15, 0.85
_ZERO_THRESHOLD = 1e-3

#: Loss weights of v2 (spec 4.10 and pitfall 5). ``"head"``: the reference at HEAD (the
#: default). ``"release"``: the initial release (Dec 2021) with which the released NYU v2
#: checkpoint was trained. Only the weights differ here: the release code's other
#: differences (undetached weight mask, r1-only rot target, clamped computed depth) are not
#: reproduced.
LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "head": {"photo": 1.0, "geometry": 0.1, "smooth": 0.1, "rot_c": 1.0, "rot_t": 1.0},
    "release": {"photo": 1.0, "geometry": 0.5, "smooth": 0.1, "rot_c": 0.1, "rot_t": 0.5},
}


# --------------------------------------------------------------------------------------------
# SSIM.


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ConfigError(
            f"ssim: x and y must be equal (B, C, H, W), got {tuple(x.shape)}, {tuple(y.shape)}"
        )


def _window_means(xp: torch.Tensor, yp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """mu_x, mu_y, mean(x^2), mean(y^2), mean(xy) over 7x7 windows of padded maps (spec 4.1)."""
    # The five window means in one depthwise convolution with a constant 1/49 kernel: the same
    # means as the reference's 7x7 average pooling (to float rounding), about 3x faster forward
    # and backward on CPU, where pooling dominated the loss (benchmarks/losses.py).
    c = xp.shape[1]
    if _recording(xp, yp):
        stacked = torch.cat([xp, yp, xp * xp, yp * yp, xp * yp], 1)
    else:
        # The products written straight into the convolution's input (no concatenation copy).
        stacked = xp.new_empty((xp.shape[0], 5 * c, *xp.shape[2:]))
        stacked[:, :c] = xp
        stacked[:, c : 2 * c] = yp
        torch.mul(xp, xp, out=stacked[:, 2 * c : 3 * c])
        torch.mul(yp, yp, out=stacked[:, 3 * c : 4 * c])
        torch.mul(xp, yp, out=stacked[:, 4 * c :])
    kernel = stacked.new_full((5 * c, 1, SSIM_WINDOW, SSIM_WINDOW), 1.0 / SSIM_WINDOW**2)
    return F.conv2d(stacked, kernel, groups=5 * c).split(c, 1)


def _recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors (in-place shortcuts are unsafe)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _ssim_terms(
    mu_x: torch.Tensor,
    mu_y: torch.Tensor,
    m_xx: torch.Tensor,
    m_yy: torch.Tensor,
    m_xy: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The four factors of SSIM = (A1 A2) / (B1 B2) from the window means (spec 4.1)."""
    mu_xx, mu_yy, mu_xy = mu_x**2, mu_y**2, mu_x * mu_y
    if _recording(mu_x, mu_y, m_xx, m_yy, m_xy):
        a1 = 2 * mu_x * mu_y + SSIM_C1
        a2 = 2 * (m_xy - mu_xy) + SSIM_C2
        b1 = mu_xx + mu_yy + SSIM_C1
        b2 = (m_xx - mu_xx) + (m_yy - mu_yy) + SSIM_C2
        return a1, a2, b1, b2
    # The same operations in the same order, in place on temporaries (fewer 4 MB buffers).
    a1 = (2 * mu_x).mul_(mu_y).add_(SSIM_C1)
    a2 = torch.sub(m_xy, mu_xy, out=mu_xy).mul_(2).add_(SSIM_C2)
    b1 = (mu_xx + mu_yy).add_(SSIM_C1)
    b2 = torch.sub(m_xx, mu_xx, out=mu_xx).add_(torch.sub(m_yy, mu_yy, out=mu_yy))
    return a1, a2, b1, b2.add_(SSIM_C2)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-channel SSIM index map with a 7x7 mean window and reflection padding 3 (spec 4.1).

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``,
    window moments ``s_x^2 = mean(x^2) - mu_x^2`` etc., C1 = 1e-4, C2 = 9e-4.

    Args:
        x, y: (B, C, H, W) normalised images, H, W >= 4.

    Returns:
        (B, C, H, W) SSIM index (1 for identical windows), unclamped.
    """
    _check_pair(x, y)
    pad = SSIM_WINDOW // 2
    x = F.pad(x, (pad,) * 4, mode="reflect")
    y = F.pad(y, (pad,) * 4, mode="reflect")
    a1, a2, b1, b2 = _ssim_terms(*_window_means(x, y))
    return (a1 * a2) / (b1 * b2)


def _ssim_dis_forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``clamp((1 - ssim(x, y)) / 2, 0, 1)`` (:func:`ssim`'s arithmetic op for op: the same
    values bit for bit) and what :func:`_ssim_dis_backward` needs."""
    pad = SSIM_WINDOW // 2
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    yp = F.pad(y, (pad,) * 4, mode="reflect")
    mu_x, mu_y, m_xx, m_yy, m_xy = _window_means(xp, yp)
    a1, a2, b1, b2 = _ssim_terms(mu_x, mu_y, m_xx, m_yy, m_xy)
    den = b1 * b2
    s = (a1 * a2).div_(den)
    half = (1 - s).div_(2)
    return half.clamp(0, 1), (x, y, xp, yp, mu_x, mu_y, a1, a2, b1, b2, s, den, half)


def _ssim_dis_backward(
    saved: tuple, grad: torch.Tensor, need_x: bool, need_y: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad * ssim_dissimilarity(x, y))`` with respect to x and y.

    Closed-form derivatives of SSIM with respect to the five window means, then one
    convolution with the (symmetric) box kernel, the adjoint of the window mean, for the three
    or four means that reach an input that needs a gradient (the means of x^2 and of y^2 share
    one), then the reflection padding's adjoint. ``grad`` may be broadcast from (B, 1, H, W).
    """
    x, y, xp, yp, mu_x, mu_y, a1, a2, b1, b2, s, den, half = saved
    b, c, h, w = half.shape
    n_maps = 4 if need_x else 3
    # The maps to spread are written straight into the convolution's input; channels-last on
    # CPU, where oneDNN's depthwise "full" convolution is ~3x faster on it.
    layout = torch.channels_last if half.device.type == "cpu" else torch.contiguous_format
    stacked = torch.empty(
        (b, n_maps * c, h, w), dtype=half.dtype, device=half.device, memory_format=layout
    )
    t_mu_y, t_sq, t_xy, *t_mu_x = stacked.split(c, 1)
    # With q = dL/dnum (SSIM = num / den, num = a1 a2, den = b1 b2) and d dis / d SSIM = -1/2
    # inside the clamp (clamp passes the gradient on its bounds): dSSIM/dmu_y =
    # 2 (mu_x d_a + mu_y d_b), dSSIM/dmean(y^2) = dSSIM/dmean(x^2) = -q s b1,
    # dSSIM/dmean(xy) = 2 q a1, with d_a = q (a2 - a1), d_b = q s (b1 - b2). The -1/2 and the
    # factors 2 cancel to the final minus; temporaries are updated in place.
    q = torch.where((half >= 0) & (half <= 1), grad, 0.0).div_(den)
    qs = q * s
    torch.mul(q, a1, out=t_xy)
    torch.mul(qs, b1, out=t_sq).neg_()
    d_a = q.mul_(a2).sub_(t_xy)
    d_b = qs.mul_(b2).neg_().sub_(t_sq)
    torch.mul(mu_x, d_a, out=t_mu_y).addcmul_(mu_y, d_b)
    if need_x:
        torch.mul(mu_y, d_a, out=t_mu_x[0]).addcmul_(mu_x, d_b)
    kernel = stacked.new_full((n_maps * c, 1, SSIM_WINDOW, SSIM_WINDOW), 1 / SSIM_WINDOW**2)
    # The adjoint of the valid box filter: the full one (same kernel, it is symmetric).
    spread = F.conv2d(stacked, kernel, padding=SSIM_WINDOW - 1, groups=n_maps * c)
    t_mu_y, t_sq, t_xy, *t_mu_x = spread.split(c, 1)
    pad = [SSIM_WINDOW // 2] * 4
    gx = gy = None
    if need_y:
        gyp = torch.mul(yp, t_sq).addcmul_(xp, t_xy).add_(t_mu_y).neg_()
        gy = torch.ops.aten.reflection_pad2d_backward(gyp, y, pad)
    if need_x:
        gxp = torch.mul(xp, t_sq).addcmul_(yp, t_xy).add_(t_mu_x[0]).neg_()
        gx = torch.ops.aten.reflection_pad2d_backward(gxp, x, pad)
    return gx, gy


class _SSIMDissimilarity(torch.autograd.Function):
    """``clamp((1 - SSIM) / 2, 0, 1)`` with a hand-written backward (:func:`_ssim_dis_backward`).

    The same forward values as :func:`ssim`; the backward replaces autograd's chain (~30 saved
    maps, a depthwise-convolution backward over all five window means) and made the SSIM part
    of the photometric loss about 2x faster forward + backward on CPU (benchmarks/losses.py).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dis, saved = _ssim_dis_forward(x, y)
        ctx.save_for_backward(*saved)
        return dis

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _ssim_dis_backward(ctx.saved_tensors, grad, *ctx.needs_input_grad)


class _PhotoMap(torch.autograd.Function):
    """E_p and E_c of :func:`pairwise_maps` with SSIM, in one function (spec 4.2).

    ``E_p = mean_c(0.15 clamp(|A - I_w|, 0, 1) + 0.85 SSIM_dis(A, I_w)) * weight`` and
    ``E_c = mean_c |A - I_w|`` (returned without gradient: it is only compared), computed op for
    op as the plain expressions (the same values bit for bit); the backward through the mix,
    the channel mean, the clamp and the absolute value is written out and joined to the SSIM's
    (:func:`_ssim_dis_backward`), which spares autograd a dozen full-size maps per direction.
    ``weight``: the detached ``1 - E_d`` (B, 1, H, W), or None.
    """

    @staticmethod
    def forward(
        ctx: Any, target: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        diff = target - warped
        abs_diff = diff.abs()
        color = abs_diff.mean(1, keepdim=True)
        dis, saved = _ssim_dis_forward(target, warped)
        photo = (_L1_WEIGHT * abs_diff.clamp(0, 1) + _SSIM_WEIGHT * dis).mean(1, keepdim=True)
        if weight is not None:
            photo = photo * weight
        ctx.save_for_backward(diff, abs_diff, weight, *saved)
        ctx.mark_non_differentiable(color)
        return photo, color

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad: torch.Tensor, _grad_color: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        diff, abs_diff, weight, *saved = ctx.saved_tensors
        need_t, need_w = ctx.needs_input_grad[:2]
        if weight is not None:
            grad = grad * weight
        grad = grad / diff.shape[1]  # the channel mean
        # L1 part: clamp passes where 0 <= |d| <= 1; d|d|/dd = sgn(d).
        g_diff = torch.where(abs_diff <= 1, diff.sgn(), 0.0).mul_(grad * _L1_WEIGHT)
        g_t, g_w = _ssim_dis_backward(saved, grad * _SSIM_WEIGHT, need_t, need_w)
        if g_w is not None:
            g_w = g_w.sub_(g_diff)
        if g_t is not None:
            g_t = g_t.add_(g_diff)
        return g_t, g_w, None


def ssim_dissimilarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``clamp((1 - SSIM) / 2, 0, 1)`` per pixel and channel (spec 4.1); (B, C, H, W).

    The values of ``((1 - ssim(x, y)) / 2).clamp(0, 1)`` bit for bit, with a faster hand-written
    backward (:class:`_SSIMDissimilarity`).
    """
    _check_pair(x, y)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _SSIMDissimilarity.apply(x, y)
    return ((1 - ssim(x, y)) / 2).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Pairwise maps and their combination.


class PairwiseMaps(NamedTuple):
    """Maps of one direction of one pair (spec 4.2), each (B, 1, H, W) on A's pixel grid.

    ``photo`` E_p (weighted by ``1 - E_d`` unless disabled), ``color`` E_c (mean L1 colour
    error), ``depth_diff`` E_d, ``valid`` V (float 0/1: non-zero pixels x auto-mask).
    """

    photo: torch.Tensor
    color: torch.Tensor
    depth_diff: torch.Tensor
    valid: torch.Tensor


def pairwise_maps(
    target: torch.Tensor,
    source: torch.Tensor,
    target_depth: torch.Tensor,
    source_depth: torch.Tensor,
    pose: torch.Tensor,
    K: torch.Tensor,
    *,
    no_ssim: bool = False,
    no_auto_mask: bool = False,
    no_dynamic_mask: bool = False,
    convention: Convention = "reference",
    padding_mode: str = "zeros",
) -> PairwiseMaps:
    """Photometric, colour and depth-inconsistency maps and validity of one direction (spec 4.2).

    ``(I_w, D_p, D_c) = inverse_warp(S, D_A, D_S, T)``, then per pixel
    ``E_d = |D_c - D_p| / (D_c + D_p)``; ``V = [mean_c |I_w| > 1e-3] [mean_c |A| > 1e-3]``;
    ``E_c = mean_c |A - I_w|``; auto-mask ``V *= [E_c < mean_c |A - S|]`` (the unwarped S);
    ``E_p = mean_c(0.15 clamp(|A - I_w|, 0, 1) + 0.85 SSIM_dis(A, I_w))`` and
    ``E_p *= stopgrad(1 - E_d)`` (the weight mask; may go negative, pitfall 6).

    Args:
        target: (B, 3, H, W) image A (normalised).
        source: (B, 3, H, W) image S (normalised).
        target_depth: (B, 1, H, W) D_A.
        source_depth: (B, 1, H, W) D_S.
        pose: A -> S motion, (B, 6) or (B, 3|4, 4).
        K: (B, 3, 3) or (3, 3).
        no_ssim, no_auto_mask, no_dynamic_mask: the reference's ablation flags (spec 4.10);
            ``no_dynamic_mask`` drops the ``1 - E_d`` weight.
        convention, padding_mode: see :func:`mesadepth.geometry.inverse_warp`.

    Returns:
        :class:`PairwiseMaps`.
    """
    return _pairwise_maps(
        target,
        source,
        target_depth,
        source_depth,
        pose,
        K,
        no_ssim=no_ssim,
        no_auto_mask=no_auto_mask,
        no_dynamic_mask=no_dynamic_mask,
        convention=convention,
        padding_mode=padding_mode,
    )


def _nonzero(image: torch.Tensor) -> torch.Tensor:
    """``mean_c |I| > 1e-3`` (B, 1, H, W) bool, the validity test of spec 4.2."""
    # The threshold targets the exact zeros the warp's zero padding produces (pitfall 4).
    return image.abs().mean(1, keepdim=True) > _ZERO_THRESHOLD


def _pairwise_maps(
    target: torch.Tensor,
    source: torch.Tensor,
    target_depth: torch.Tensor,
    source_depth: torch.Tensor,
    pose: torch.Tensor,
    K: torch.Tensor,
    *,
    no_ssim: bool,
    no_auto_mask: bool,
    no_dynamic_mask: bool,
    convention: Convention,
    padding_mode: str,
    target_nonzero: torch.Tensor | None = None,
    identity: torch.Tensor | None = None,
) -> PairwiseMaps:
    """:func:`pairwise_maps`; ``target_nonzero`` (``_nonzero(target)``) and ``identity``
    (``mean_c |target - source|``) may be given when the caller shares them between the two
    directions of a pair (``|a - b|`` and ``|b - a|`` are the same floats)."""
    warp = inverse_warp(
        source,
        target_depth,
        source_depth,
        pose,
        K,
        convention=convention,
        padding_mode=padding_mode,
        in_view=False,
    )
    warped = warp.image
    depth_diff = depth_inconsistency(warp.computed_depth, warp.projected_depth)
    with torch.no_grad():
        if target_nonzero is None:
            target_nonzero = _nonzero(target)
        valid = _nonzero(warped) & target_nonzero
    weight = None if no_dynamic_mask else (1 - depth_diff).detach()
    if not no_ssim and torch.is_grad_enabled() and (target.requires_grad or warped.requires_grad):
        photo, color = _PhotoMap.apply(target, warped, weight)
    else:
        abs_diff = (target - warped).abs()
        color = abs_diff.mean(1, keepdim=True)
        photo = abs_diff.clamp(0, 1)
        if not no_ssim:
            photo = _L1_WEIGHT * photo + _SSIM_WEIGHT * ssim_dissimilarity(target, warped)
        photo = photo.mean(1, keepdim=True)
        if weight is not None:
            photo = photo * weight
    if not no_auto_mask:
        if identity is None:
            identity = (target - source).abs().mean(1, keepdim=True)
        valid = valid & (color < identity)
    return PairwiseMaps(photo, color, depth_diff, valid.to(photo.dtype))


class PhotoGeometry(NamedTuple):
    """L_photo and L_geo (scalars) and the pairwise maps in the order [fwd_1, bwd_1, fwd_2, ...]
    (kept for the v3 dynamic mask of spec 4.6, which uses the forward maps)."""

    photo: torch.Tensor
    geometry: torch.Tensor
    maps: list[PairwiseMaps]


def combine_pairwise(
    maps: Sequence[PairwiseMaps], *, no_min_optimize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_photo and L_geo from stacked pairwise maps (spec 4.3).

    With view selection (default): per pixel, the map with the smallest colour error E_c
    (``torch.argmin``: the first map wins ties, pitfall 23; validity is ignored when choosing,
    pitfall 2) provides E_p, E_d and V; then ``mean_on_mask`` of each. ``no_min_optimize``: the
    masked means run over all maps together (the >100-pixel test too).

    Args:
        maps: pairwise maps in the reference's order [fwd_1, bwd_1, fwd_2, bwd_2]; all maps
            share one (B, 1, H, W) shape (backward maps live on the reference grids but are
            compared pixel by pixel with the forward ones, as in the reference).

    Returns:
        ``(photo, geometry)`` scalar tensors.
    """
    if not maps:
        raise ConfigError("combine_pairwise: need at least one pairwise map")
    photo = torch.cat([m.photo for m in maps], 1)
    color = torch.cat([m.color for m in maps], 1)
    depth_diff = torch.cat([m.depth_diff for m in maps], 1)
    valid = torch.cat([m.valid for m in maps], 1)
    if not no_min_optimize:
        # min's indices are argmin's (first minimum on ties, NaN first; documented), ~10x faster
        # on CPU over the non-contiguous map dimension.
        idx = color.min(1, keepdim=True).indices
        photo = photo.gather(1, idx)
        depth_diff = depth_diff.gather(1, idx)
        valid = valid.gather(1, idx)
    return mean_on_mask(photo, valid), geometry_consistency_loss(depth_diff, valid)


def photo_and_geometry_loss(
    target: torch.Tensor,
    refs: Sequence[torch.Tensor],
    target_depth: torch.Tensor,
    ref_depths: Sequence[torch.Tensor],
    K: torch.Tensor,
    poses: Sequence[torch.Tensor],
    poses_inv: Sequence[torch.Tensor],
    *,
    no_ssim: bool = False,
    no_auto_mask: bool = False,
    no_dynamic_mask: bool = False,
    no_min_optimize: bool = False,
    convention: Convention = "reference",
    padding_mode: str = "zeros",
) -> PhotoGeometry:
    """L_photo and L_geo over all target/reference pairs, both directions (spec 4.3, 3.4).

    For each reference j (order: frame i-k, then i+k): forward maps (A = I_t, S = I_rj,
    T_j = PoseNet(I_t, I_rj)), then backward maps (A = I_rj, S = I_t,
    T_j^inv = PoseNet(I_rj, I_t), a separate prediction, not a matrix inverse); then
    :func:`combine_pairwise`.

    Args:
        target: (B, 3, H, W) I_t (normalised).
        refs: references I_rj (v2: the ARN-rectified ones), each (B, 3, H, W).
        target_depth: (B, 1, H, W) D_t.
        ref_depths: D_rj, each (B, 1, H, W).
        K: (B, 3, 3) or (3, 3).
        poses: T_j (target -> ref j), each (B, 6) or (B, 3|4, 4).
        poses_inv: T_j^inv (ref j -> target), same.
        no_*: the reference's ablation flags (spec 4.10).
        convention, padding_mode: see :func:`mesadepth.geometry.inverse_warp`.

    Returns:
        :class:`PhotoGeometry`.
    """
    n = len(refs)
    if not n or not len(ref_depths) == len(poses) == len(poses_inv) == n:
        raise ConfigError(
            f"photo_and_geometry_loss: need as many ref_depths, poses and poses_inv as refs "
            f"(>= 1), got {n}, {len(ref_depths)}, {len(poses)}, {len(poses_inv)}"
        )
    opts = dict(
        no_ssim=no_ssim,
        no_auto_mask=no_auto_mask,
        no_dynamic_mask=no_dynamic_mask,
        convention=convention,
        padding_mode=padding_mode,
    )
    maps: list[PairwiseMaps] = []
    with torch.no_grad():
        target_nonzero = _nonzero(target)
    for ref, ref_depth, pose, pose_inv in zip(refs, ref_depths, poses, poses_inv, strict=True):
        # Computed once per pair: the two directions' validity tests of the target and their
        # auto-mask identity errors are the same values.
        identity = None
        if not no_auto_mask:
            with torch.no_grad():
                identity = (target - ref).abs().mean(1, keepdim=True)
        fwd = dict(target_nonzero=target_nonzero, identity=identity)
        maps.append(_pairwise_maps(target, ref, target_depth, ref_depth, pose, K, **opts, **fwd))
        bwd = dict(identity=identity)
        maps.append(
            _pairwise_maps(ref, target, ref_depth, target_depth, pose_inv, K, **opts, **bwd)
        )
    photo, geometry = combine_pairwise(maps, no_min_optimize=no_min_optimize)
    return PhotoGeometry(photo, geometry, maps)


# --------------------------------------------------------------------------------------------
# Smoothness and totals.


def smoothness_loss(depth: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of the mean-normalised target **depth** (spec 4.4, pitfall 3).

    ``d = D / (mean_HW D + 1e-7)``; ``mean(|d_x| exp(-mean_c |I_x|)) + mean(|d_y| exp(-mean_c
    |I_y|))`` with forward differences, each mean over B x H x (W-1) (resp. (H-1) x W).
    Invariant to the scale of D.

    Args:
        depth: (B, 1, H, W) D_t.
        image: (B, 3, H, W) I_t (normalised).

    Returns:
        Scalar tensor.
    """
    if depth.ndim != 4 or image.ndim != 4 or depth.shape[-2:] != image.shape[-2:]:
        raise ConfigError(
            f"smoothness_loss: depth (B, 1, H, W) and image (B, 3, H, W) must share H, W, got "
            f"{tuple(depth.shape)}, {tuple(image.shape)}"
        )
    d = depth / (depth.mean((2, 3), keepdim=True) + 1e-7)
    dx = (d[..., :, :-1] - d[..., :, 1:]).abs()
    dy = (d[..., :-1, :] - d[..., 1:, :]).abs()
    ix = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(1, keepdim=True)
    iy = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()


def _weights(weights: str | Mapping[str, float]) -> Mapping[str, float]:
    if isinstance(weights, str):
        if weights not in LOSS_WEIGHTS:
            raise ConfigError(
                f"weights must be one of {tuple(LOSS_WEIGHTS)} or a mapping, got {weights!r}"
            )
        return LOSS_WEIGHTS[weights]
    return weights


def total_loss(
    terms: Mapping[str, torch.Tensor], weights: str | Mapping[str, float] = "head"
) -> torch.Tensor:
    """Weighted sum of the loss terms present in ``terms`` (spec 4.10, pitfall 5).

    Only the keys of ``weights`` are summed (``photo``, ``geometry``, ``smooth``, ``rot_c``,
    ``rot_t``); other entries (logged magnitudes, ``total``) are ignored, and a weighted term
    missing from ``terms`` is skipped (v1 has no ARN terms).

    Args:
        terms: named scalar tensors, e.g. from :func:`sc_depth_v2_losses`.
        weights: ``"head"`` (default), ``"release"`` (:data:`LOSS_WEIGHTS`) or a mapping.

    Returns:
        Scalar tensor.
    """
    w = _weights(weights)
    present = [float(w[k]) * terms[k] for k in w if k in terms]
    if not present:
        raise ConfigError(f"total_loss: none of {sorted(w)} is in the terms {sorted(terms)}")
    # A plain sum promotes dtypes (mean_on_mask's float32 zero next to float64 terms).
    return sum(present[1:], present[0])


def sc_depth_v2_losses(
    target: torch.Tensor,
    refs: Sequence[torch.Tensor],
    target_depth: torch.Tensor,
    ref_depths: Sequence[torch.Tensor],
    K: torch.Tensor,
    poses: Sequence[torch.Tensor],
    poses_inv: Sequence[torch.Tensor],
    *,
    rot1: torch.Tensor | Sequence[torch.Tensor] | None = None,
    rot2: torch.Tensor | Sequence[torch.Tensor] | None = None,
    rot3: torch.Tensor | Sequence[torch.Tensor] | None = None,
    rot_target: torch.Tensor | Sequence[torch.Tensor] | None = None,
    weights: str | Mapping[str, float] = "head",
    no_ssim: bool = False,
    no_auto_mask: bool = False,
    no_dynamic_mask: bool = False,
    no_min_optimize: bool = False,
    convention: Convention = "reference",
    padding_mode: str = "zeros",
) -> dict[str, torch.Tensor]:
    """All SC-DepthV2 loss terms of one step and their weighted total (spec 0, 4.1-4.5, 4.10).

    ``refs``/``ref_depths``/``poses`` are those of the **rectified** references (the caller
    applies the ARN, spec 4.5). The ARN terms are computed when all four of ``rot1``, ``rot2``,
    ``rot3``, ``rot_target`` are given (see :func:`mesadepth.losses.consistency.arn_losses`);
    without them the result is v1's set.

    Returns:
        Dict of scalar tensors: ``photo``, ``geometry``, ``smooth``, [``rot_c``, ``rot_t``,
        ``rot_before``, ``rot_after``], and ``total`` = the weighted sum with ``weights``
        (``"head"``: 1.0/0.1/0.1/1.0/1.0; ``"release"``: 1.0/0.5/0.1/0.1/0.5 for
        photo/geometry/smooth/rot_c/rot_t).
    """
    pg = photo_and_geometry_loss(
        target,
        refs,
        target_depth,
        ref_depths,
        K,
        poses,
        poses_inv,
        no_ssim=no_ssim,
        no_auto_mask=no_auto_mask,
        no_dynamic_mask=no_dynamic_mask,
        no_min_optimize=no_min_optimize,
        convention=convention,
        padding_mode=padding_mode,
    )
    terms = {
        "photo": pg.photo,
        "geometry": pg.geometry,
        "smooth": smoothness_loss(target_depth, target),
    }
    rots = (rot1, rot2, rot3, rot_target)
    if any(r is not None for r in rots):
        if any(r is None for r in rots):
            raise ConfigError(
                "sc_depth_v2_losses: give all of rot1, rot2, rot3, rot_target or none"
            )
        terms.update(arn_losses(rot1, rot2, rot3, rot_target))
    terms["total"] = total_loss(terms, weights)
    return terms
