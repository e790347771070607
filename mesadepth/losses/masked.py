"""SimMIM masked-reconstruction loss and the Swin-v2 locally normalised target.

Specification: masked-pretraining-and-finetuning.md section 1.4 (loss and ``NORM_TARGET``) and
pitfall 3 (batch-pooled mean, float32 window variance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mesadepth.errors import ConfigError

__all__ = ["local_normalised_target", "masked_l1_loss"]

# Added to the masked-pixel count so an all-visible batch gives 0 rather than 0/0 (spec 1.4).
_COUNT_EPS = 1e-5
# Added to the local variance before the square root (Swin-Transformer ``norm_targets``).
_VAR_EPS = 1e-6


def masked_l1_loss(x: torch.Tensor, x_hat: torch.Tensor, mask_pixels: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over masked pixel-channels, pooled over the whole batch (spec 1.4).

    ``L = sum_{b,c,h,w} |x - x_hat| * M / (sum_{b,h,w} M + 1e-5) / C``.

    Args:
        x: target image (B, C, H, W) (ImageNet-normalised, or the locally normalised target).
        x_hat: reconstruction (B, C, H, W).
        mask_pixels: pixel mask (B, 1, H, W), 1 = masked; broadcast over the C channels.

    Returns:
        Scalar loss tensor (0-D). Visible pixels (M = 0) contribute nothing. The mean is over
        all masked pixels of the batch, not a mean of per-image means (pitfall 3).
    """
    if x.ndim != 4 or x.shape != x_hat.shape:
        raise ConfigError(
            f"masked_l1_loss: x and x_hat must both be (B, C, H, W), got {tuple(x.shape)} "
            f"and {tuple(x_hat.shape)}"
        )
    b, c, h, w = x.shape
    if tuple(mask_pixels.shape) != (b, 1, h, w):
        raise ConfigError(
            f"masked_l1_loss: mask_pixels must be (B, 1, H, W) = {(b, 1, h, w)}, "
            f"got {tuple(mask_pixels.shape)}"
        )
    m = mask_pixels.to(torch.promote_types(x.dtype, x_hat.dtype))
    # The denominator counts pixels once (M has one channel) and the /C turns it into a count
    # of pixel-channels, exactly as the reference writes it.
    return ((x - x_hat).abs() * m).sum() / (m.sum() + _COUNT_EPS) / c


def local_normalised_target(x: torch.Tensor, patch_size: int = 47) -> torch.Tensor:
    """Per-channel locally normalised image, the Swin-v2 SimMIM target (spec 1.4 ``NORM_TARGET``).

    For every pixel and channel, over the ``patch_size`` x ``patch_size`` window centred on it
    (stride 1, zero padding ``patch_size // 2``, padded positions excluded): ``mu`` = mean of x,
    ``s2`` = mean of x^2, ``n`` = number of in-image pixels; ``var = max(0, (s2 - mu^2) *
    n / (n - 1))`` (unbiased); result ``(x - mu) / sqrt(var + 1e-6)``.

    Args:
        x: image (B, C, H, W). Half precision is computed in float32 (the reference computes
            the window variance in float32, pitfall 3); float32/float64 keep their dtype.
        patch_size: odd window side >= 3 (47 in the reference config).

    Returns:
        Tensor of the same shape as ``x`` (dimensionless), in the compute dtype.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise ConfigError(f"norm-target patch size must be an int, got {patch_size!r}")
    if patch_size % 2 != 1 or patch_size < 3:
        # Even windows have no centre pixel; a 1x1 window has n = 1 and n/(n-1) is infinite.
        raise ConfigError(f"norm-target patch size must be odd and >= 3, got {patch_size}")
    if x.ndim != 4:
        raise ConfigError(f"local_normalised_target expects (B, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    pad = patch_size // 2
    mu = F.avg_pool2d(x, patch_size, stride=1, padding=pad, count_include_pad=False)
    s2 = F.avg_pool2d(x * x, patch_size, stride=1, padding=pad, count_include_pad=False)
    # n per position: the in-image window size. Pooling a map of ones *with* the padding counted
    # gives n / k^2; it is the same for every channel and image, so one (1, 1, H, W) map suffices.
    ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
    n = F.avg_pool2d(ones, patch_size, stride=1, padding=pad, count_include_pad=True)
    n = n * (patch_size**2)
    var = ((s2 - mu * mu) * (n / (n - 1))).clamp(min=0.0)
    return (x - mu) / torch.sqrt(var + _VAR_EPS)
