"""The hand-written backward passes of the GP/SP losses against autograd of the plain formulas.

SSIM dissimilarity and the photometric map (photometric.py), depth_to_normals (geometry.py) and
L_nr (supervised.py) compute their forward op for op as the plain expressions and their
gradients by hand for speed (benchmarks/losses.py). Here, in float64 on small random inputs:
the forward values equal the plain expressions exactly, and the gradients equal autograd's
through the plain expressions to 1e-10 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mesadepth.geometry import backproject, depth_to_normals, inverse_warp, spatial_gradient
from mesadepth.losses.photometric import pairwise_maps, ssim, ssim_dissimilarity
from mesadepth.losses.supervised import (
    edge_aware_normal_loss,
    edge_guided_pairs,
    guidance_edge_maps,
    pair_normal_terms,
)

D64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pinhole(h: int, w: int, f: float = 20.0) -> torch.Tensor:
    return torch.tensor([[f, 0.0, (w - 1) / 2], [0.0, f, (h - 1) / 2], [0.0, 0.0, 1.0]], dtype=D64)


def smooth(b: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random maps (bilinear upsampling of coarse noise) with some fine noise."""
    g = gen(seed)
    coarse = torch.rand(b, c, 4, 5, generator=g, dtype=D64)
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return up + 0.05 * torch.rand(b, c, h, w, generator=g, dtype=D64)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def assert_grads_close(got: tuple, want: tuple) -> None:
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().item()
        assert scale > 0
        assert (g - w).abs().max().item() <= 1e-10 * scale


@pytest.mark.parametrize("need", ["x", "y", "both"])
def test_ssim_dissimilarity_gradients_equal_autograd_of_the_plain_formula(need: str) -> None:
    x0 = (smooth(2, 3, 12, 14, 0) - 0.45) / 0.225
    y0 = x0 + 0.3 * torch.randn(x0.shape, generator=gen(1), dtype=D64)
    x, y = leaf(x0), leaf(y0)
    x.requires_grad_(need in ("x", "both"))
    y.requires_grad_(need in ("y", "both"))
    weights = torch.rand(x0.shape, generator=gen(2), dtype=D64)
    inputs = [t for t in (x, y) if t.requires_grad]
    got_value = ssim_dissimilarity(x, y)
    got = torch.autograd.grad((weights * got_value).sum(), inputs)
    plain = ((1 - ssim(x, y)) / 2).clamp(0, 1)
    want = torch.autograd.grad((weights * plain).sum(), inputs)
    assert torch.equal(got_value, plain)
    assert_grads_close(got, want)


def plain_photo(target: torch.Tensor, warped: torch.Tensor, depth_diff: torch.Tensor):
    """E_p of spec 4.2 written plainly (autograd through every op)."""
    l1 = (target - warped).abs().clamp(0, 1)
    dis = ((1 - ssim(target, warped)) / 2).clamp(0, 1)
    return (0.15 * l1 + 0.85 * dis).mean(1, keepdim=True) * (1 - depth_diff).detach()


def test_photometric_map_gradients_equal_autograd_of_the_plain_formula() -> None:
    b, h, w = 2, 16, 20
    K = pinhole(h, w)
    target = leaf((smooth(b, 3, h, w, 5) - 0.45) / 0.225)
    source = leaf(torch.roll(target.detach(), 1, -1))
    depth = leaf(1.0 + 2.0 * smooth(b, 1, h, w, 6))
    source_depth = leaf(torch.roll(depth.detach(), 1, -1))
    pose = leaf(torch.tensor([[0.05, -0.02, 0.03, 0.01, -0.02, 0.015]] * b, dtype=D64))
    inputs = [target, source, depth, pose]  # E_p's weight 1 - E_d, with D_s, is detached
    weights = torch.rand(b, 1, h, w, generator=gen(7), dtype=D64)

    maps = pairwise_maps(target, source, depth, source_depth, pose, K)
    got = torch.autograd.grad((weights * maps.photo).sum(), inputs)

    warp = inverse_warp(source, depth, source_depth, pose, K)
    d_c, d_p = warp.computed_depth, warp.projected_depth
    photo = plain_photo(target, warp.image, (d_c - d_p).abs() / (d_c + d_p))
    want = torch.autograd.grad((weights * photo).sum(), inputs)
    assert torch.equal(maps.photo, photo)
    assert torch.equal(maps.color, (target - warp.image).abs().mean(1, keepdim=True))
    assert_grads_close(got, want)


def plain_normals(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    grad = spatial_gradient(backproject(depth, K))
    n = torch.linalg.cross(grad[:, :, 0], grad[:, :, 1], dim=1)
    return F.normalize(n, p=2.0, dim=1, eps=1e-12)


def test_normal_gradients_equal_autograd_of_the_plain_formula() -> None:
    h, w = 11, 13
    K = pinhole(h, w)
    depth = leaf(1.0 + smooth(2, 1, h, w, 8))
    weights = torch.randn(2, 3, h, w, generator=gen(9), dtype=D64)
    got_value = depth_to_normals(depth, K)
    got = torch.autograd.grad((weights * got_value).sum(), depth)
    plain = plain_normals(depth, K)
    want = torch.autograd.grad((weights * plain).sum(), depth)
    assert torch.equal(got_value, plain)
    assert_grads_close(got, want)


def test_relative_normal_loss_value_and_gradient_equal_the_public_composition() -> None:
    """L_nr's gather-once path equals pair_normal_terms on edge_guided_pairs' pairs, drawn
    from the same generator state: the same value bit for bit, autograd's gradient."""
    b, h, w = 2, 24, 28
    K = pinhole(h, w)
    pseudo = 1e4 * (1.0 + smooth(b, 1, h, w, 11))
    image = (smooth(b, 3, h, w, 12) - 0.45) / 0.225
    pseudo_normals = depth_to_normals(pseudo, K)
    pred = leaf(depth_to_normals(1.0 + smooth(b, 1, h, w, 13), K))

    got_value = edge_aware_normal_loss(pseudo, image, pred, pseudo_normals, generator=gen(14))
    (got,) = torch.autograd.grad(got_value, pred)

    edges, thetas = guidance_edge_maps(pseudo, image, pseudo_normals)
    pairs = edge_guided_pairs(
        edges.reshape(2 * b, h, w), thetas.reshape(2 * b, h, w), generator=gen(14)
    )
    plain = pair_normal_terms(pred, pseudo_normals, pairs.group // 2, pairs.a, pairs.b).mean()
    (want,) = torch.autograd.grad(plain, pred)
    assert torch.equal(got_value, plain)
    assert_grads_close((got,), (want,))


def test_warp_without_the_in_view_mask_gives_the_same_maps() -> None:
    h, w = 10, 12
    K = pinhole(h, w)
    img = smooth(1, 3, h, w, 15)
    depth, ref_depth = 1.0 + smooth(1, 1, h, w, 16), 1.0 + smooth(1, 1, h, w, 17)
    pose = torch.tensor([[0.1, 0.0, -0.05, 0.02, 0.01, -0.03]], dtype=D64)
    for convention in ("reference", "exact"):
        full = inverse_warp(img, depth, ref_depth, pose, K, convention=convention)
        bare = inverse_warp(img, depth, ref_depth, pose, K, convention=convention, in_view=False)
        assert bare.in_view is None and full.in_view.dtype == torch.bool
        for a, b in zip(full[:3], bare[:3], strict=True):
            assert torch.equal(a, b)
