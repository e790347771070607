"""Camera geometry: Euler poses, back-projection, both warp conventions, rotation warp, normals."""

from __future__ import annotations

import math

import pytest
import torch

from mesadepth.data.synthetic import nyu_intrinsics
from mesadepth.errors import ConfigError
from mesadepth.geometry import (
    backproject,
    depth_to_normals,
    euler_to_rotation,
    inverse_warp,
    invert_pose,
    pair_translation_cos,
    pixel_grid,
    pose_errors,
    pose_mat_to_vec,
    pose_vec_to_mat,
    project,
    relative_pose,
    rotation_to_euler,
    rotation_warp,
    sampling_positions,
    spatial_gradient,
)

H, W = 48, 64
D64 = torch.float64


def K64() -> torch.Tensor:
    return torch.from_numpy(nyu_intrinsics(W, H))


def rx(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=D64)


def ry(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=D64)


def rz(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=D64)


# ------------------------------------------------------------------------------ rotations, poses


def test_euler_90_degrees_about_each_axis_is_the_hand_built_rotation():
    q = math.pi / 2
    hand = {
        0: [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
        1: [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],
        2: [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
    }
    for axis, expected in hand.items():
        angles = torch.zeros(3, dtype=D64)
        angles[axis] = q
        R = euler_to_rotation(angles)
        torch.testing.assert_close(R, torch.tensor(expected, dtype=D64), atol=1e-15, rtol=0)
        torch.testing.assert_close(rotation_to_euler(R), angles, atol=1e-12, rtol=0)


def test_euler_order_is_x_then_y_then_z_and_round_trips():
    a = (0.3, -0.7, 1.1)
    R = euler_to_rotation(torch.tensor(a, dtype=D64))
    torch.testing.assert_close(R, rx(a[0]) @ ry(a[1]) @ rz(a[2]))
    # The opposite order is a different rotation, so the test above pins the order down.
    assert (R - rz(a[2]) @ ry(a[1]) @ rx(a[0])).abs().max() > 0.1
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(100, 3, generator=g, dtype=D64) * 2 - 1) * torch.tensor(
        [math.pi * 0.99, math.pi / 2 * 0.99, math.pi * 0.99], dtype=D64
    )
    Rs = euler_to_rotation(angles)
    torch.testing.assert_close(Rs @ Rs.transpose(-1, -2), torch.eye(3, dtype=D64).expand(100, 3, 3))
    torch.testing.assert_close(torch.linalg.det(Rs), torch.ones(100, dtype=D64))
    torch.testing.assert_close(rotation_to_euler(Rs), angles)


def test_pose_vector_matrix_round_trip_and_point_mapping():
    g = torch.Generator().manual_seed(1)
    vec = torch.cat(
        [
            torch.randn(8, 3, generator=g, dtype=D64),
            0.5 * torch.randn(8, 3, generator=g, dtype=D64),
        ],
        1,
    )
    M = pose_vec_to_mat(vec)
    assert M.shape == (8, 4, 4)
    torch.testing.assert_close(M[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=D64).expand(8, 4))
    torch.testing.assert_close(M[:, :3, 3], vec[:, :3])  # translation first
    torch.testing.assert_close(M[:, :3, :3], euler_to_rotation(vec[:, 3:]))
    torch.testing.assert_close(pose_mat_to_vec(M), vec)
    torch.testing.assert_close(pose_mat_to_vec(M[:, :3]), vec)
    torch.testing.assert_close(invert_pose(M) @ M, torch.eye(4, dtype=D64).expand(8, 4, 4))
    # X_b = R X_a + t: a pure translation moves a point by t.
    T = pose_vec_to_mat(torch.tensor([0.1, -0.2, 0.3, 0, 0, 0], dtype=D64))
    x = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=D64)
    torch.testing.assert_close(T @ x, torch.tensor([1.1, 1.8, 3.3, 1.0], dtype=D64))


def test_relative_pose_maps_target_camera_points_to_source_camera():
    g = torch.Generator().manual_seed(2)
    pose_t = pose_vec_to_mat(torch.randn(6, generator=g, dtype=D64))
    pose_s = pose_vec_to_mat(torch.randn(6, generator=g, dtype=D64))
    x_t = torch.tensor([0.3, -0.4, 2.0, 1.0], dtype=D64)
    world = pose_t @ x_t
    torch.testing.assert_close(
        relative_pose(pose_t, pose_s) @ x_t, torch.linalg.solve(pose_s, world)
    )


def test_pose_errors_against_hand_built_poses():
    def pose(axis: int, deg: float, t: tuple[float, float, float]) -> torch.Tensor:
        angles = torch.zeros(3, dtype=D64)
        angles[axis] = math.radians(deg)
        return pose_vec_to_mat(torch.cat([torch.tensor(t, dtype=D64), angles]))

    gt = torch.stack([pose(1, 2.0, (0.05, 0.0, 0.0))] * 4)
    pred = torch.stack(
        [
            pose(1, 2.0, (0.5, 0.0, 0.0)),  # exact up to scale
            pose(1, 0.0, (-0.05, 0.0, 0.0)),  # no rotation, reversed motion
            pose(1, 2.5, (0.0, 0.0, 0.05)),  # 0.5 deg short on the same axis, orthogonal t
            pose(0, 2.0, (0.05, 0.05, 0.0)),  # 2 deg about another axis, 45 deg off in t
        ]
    )
    e = pose_errors(pred, gt)
    # Two 2-degree rotations about orthogonal axes differ by the angle of R_x(2)^T R_y(2).
    cross = math.degrees(
        math.acos((math.cos(math.radians(2)) * 2 + math.cos(math.radians(2)) ** 2 - 1) / 2)
    )
    torch.testing.assert_close(e["rot_err_deg"], torch.tensor([0.0, 2.0, 0.5, cross], dtype=D64))
    torch.testing.assert_close(e["rot_gt_deg"], torch.full((4,), 2.0, dtype=D64))
    torch.testing.assert_close(e["t_cos"], torch.tensor([1.0, -1.0, 0.0, 0.5**0.5], dtype=D64))
    # float32 keeps hundredths of a degree (arccos of the trace alone would not).
    small = pose_errors(pose(2, 0.01, (1, 0, 0)).float(), torch.eye(4))
    assert abs(float(small["rot_err_deg"]) - 0.01) < 1e-4
    assert math.isnan(float(pose_errors(torch.eye(4), torch.eye(4))["t_cos"]))


def test_pair_translation_cos_tells_a_motion_reading_posenet_from_a_constant_one():
    toward_prev = torch.tensor([[0.05, 0.0, 0.01], [0.05, 0.0, 0.01], [1.0, 0, 0], [0.0, 0, 0]])
    toward_next = torch.tensor([[-0.05, 0.0, -0.01], [0.5, 0.0, 0.1], [0, 0, 2.0], [1.0, 0, 0]])
    cos = pair_translation_cos(toward_prev, toward_next)
    # Opposite motions (a smooth path read right): -1; one translation for both pairs (the
    # degenerate), at any scale: +1; orthogonal: 0; a zero translation has no direction.
    torch.testing.assert_close(cos[:3], torch.tensor([-1.0, 1.0, 0.0]))
    assert math.isnan(float(cos[3]))


# ------------------------------------------------------------------------ projection round trips


def test_backprojection_then_projection_is_identity_on_the_pixel_grid():
    g = torch.Generator().manual_seed(3)
    depth = 0.5 + 4 * torch.rand(2, 1, H, W, generator=g, dtype=D64)
    K = K64()
    pts = backproject(depth, K)
    # Hand check of one point: X = D ((u - cx) / fx, (v - cy) / fy, 1).
    u, v = 7, 5
    expected = depth[0, 0, v, u] * torch.tensor(
        [(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], 1.0], dtype=D64
    )
    torch.testing.assert_close(pts[0, :, v, u], expected)
    uv, z = project(pts, K, eps=0.0)
    grid = pixel_grid(H, W, dtype=D64)[:2].expand(2, 2, H, W)
    torch.testing.assert_close(uv, grid, atol=1e-10, rtol=0)
    torch.testing.assert_close(z, depth)
    # The reference's 1e-7 in the divide: u' = u z / (z + 1e-7), a shift below 2e-5 px here.
    uv_ref, _ = project(pts, K)
    torch.testing.assert_close(uv_ref, grid * depth / (depth + 1e-7), atol=1e-10, rtol=0)
    assert 0 < (uv_ref - grid).abs().max() < 2e-5
    # Through a pose and back: X_a -> camera b pixels -> back-project -> X_a again.
    T = pose_vec_to_mat(torch.tensor([[0.1, 0.05, -0.2, 0.03, -0.02, 0.01]], dtype=D64))
    uv_b, z_b = project(pts[:1], K, T, eps=0.0)
    rays = torch.linalg.inv(K) @ torch.cat([uv_b, torch.ones_like(z_b)], 1).reshape(1, 3, -1)
    back = invert_pose(T) @ torch.cat(
        [rays * z_b.reshape(1, 1, -1), torch.ones(1, 1, H * W, dtype=D64)], 1
    )
    torch.testing.assert_close(back[:, :3].reshape(1, 3, H, W), pts[:1])


def test_backprojection_ignores_skew_like_kornia_unless_asked():
    K = K64().clone()
    K[0, 1] = 3.0
    depth = torch.full((1, 1, 4, 5), 2.0, dtype=D64)
    kornia_like = backproject(depth, K)
    full = backproject(depth, K, ignore_skew=False)
    u, v = 4, 3
    torch.testing.assert_close(kornia_like[0, 0, v, u], 2.0 * (u - K[0, 2]) / K[0, 0])
    pix = torch.tensor([u, v, 1.0], dtype=D64)
    torch.testing.assert_close(full[0, :, v, u], 2.0 * torch.linalg.solve(K, pix))
    assert (full[0, 0] - kornia_like[0, 0]).abs().max() > 1e-3


# --------------------------------------------------------------------- identity warps, conventions


def ramp_image(h: int = 6, w: int = 8) -> torch.Tensor:
    """I(u, v) = u + 1 in channel 0 and v + 1 in channel 1 (bilinear interpolation is exact)."""
    v, u = torch.meshgrid(torch.arange(h, dtype=D64), torch.arange(w, dtype=D64), indexing="ij")
    return torch.stack([u + 1, v + 1])[None]


def bilinear_1d_with_zeros(values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` at positions ``s`` with zeros outside 0..n-1."""
    n = values.numel()
    lo = torch.floor(s).long()
    frac = s - lo
    padded = torch.cat([torch.zeros(1, dtype=D64), values, torch.zeros(1, dtype=D64)])
    a = padded[(lo + 1).clamp(0, n + 1)]
    b = padded[(lo + 2).clamp(0, n + 1)]
    return a * (1 - frac) + b * frac


def test_reference_identity_warp_is_not_identity_half_pixel_effect():
    img = ramp_image()
    _, _, h, w = img.shape
    depth = torch.full((1, 1, h, w), 2.0, dtype=D64)
    K = torch.tensor([[10.0, 0, 3.5], [0, 10.0, 2.5], [0, 0, 1]], dtype=D64)
    identity = torch.zeros(1, 6, dtype=D64)
    ref = inverse_warp(img, depth, depth, identity, K, convention="reference")
    # The reference reads pixel u * W / (W - 1) - 0.5 (pitfall 1); bilinear with zero padding
    # is separable, so the expected map is a product of 1-D interpolations.
    # u' = u z / (z + 1e-7) with z = 2 (the reference's divide guard), then the grid mismatch.
    shrink = 2.0 / (2.0 + 1e-7)
    su = torch.arange(w, dtype=D64) * shrink * w / (w - 1) - 0.5
    sv = torch.arange(h, dtype=D64) * shrink * h / (h - 1) - 0.5
    fu = bilinear_1d_with_zeros(torch.arange(w, dtype=D64) + 1, su)
    fv = bilinear_1d_with_zeros(torch.arange(h, dtype=D64) + 1, sv)
    cov_u = bilinear_1d_with_zeros(torch.ones(w, dtype=D64), su)
    cov_v = bilinear_1d_with_zeros(torch.ones(h, dtype=D64), sv)
    torch.testing.assert_close(ref.image[0, 0], cov_v[:, None] * fu[None, :])
    torch.testing.assert_close(ref.image[0, 1], fv[:, None] * cov_u[None, :])
    # The first and last columns are blended 50 % with zero ...
    torch.testing.assert_close(
        cov_u[[0, -1]], torch.tensor([0.5, 0.5], dtype=D64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(ref.image[0, 0, 2, 0], torch.tensor(0.5, dtype=D64))
    torch.testing.assert_close(
        ref.image[0, 0, 2, w - 1], torch.tensor(0.5 * w, dtype=D64), atol=1e-5, rtol=0
    )
    # ... and an interior pixel reads u W/(W-1) - 0.5 instead of u.
    half = torch.tensor(1 + 3 * w / (w - 1) - 0.5, dtype=D64)
    torch.testing.assert_close(ref.image[0, 0, 2, 3], half, atol=1e-5, rtol=0)
    assert (ref.image - img).abs().max() > 0.4
    torch.testing.assert_close(
        sampling_positions(ref.image.new_zeros(1, 2, 1, 1) + 3, h, w)[0, :, 0, 0],
        torch.tensor([3 * w / (w - 1) - 0.5, 3 * h / (h - 1) - 0.5], dtype=D64),
    )
    # Depth is sampled the same way; the computed depth is exactly q3 = D.
    torch.testing.assert_close(ref.projected_depth[0, 0], 2.0 * cov_v[:, None] * cov_u[None, :])
    torch.testing.assert_close(ref.computed_depth, depth)
    # The exact convention is an identity warp.
    exact = inverse_warp(img, depth, depth, identity, K, convention="exact")
    torch.testing.assert_close(exact.image, img, atol=1e-9, rtol=0)
    torch.testing.assert_close(exact.projected_depth, depth, atol=1e-9, rtol=0)
    assert bool(exact.in_view.all())
    # Reference in-view: positions -0.5 (first column/row) and W - 0.5 (last) are outside.
    assert not bool(ref.in_view[0, 0, :, 0].any()) and not bool(ref.in_view[0, 0, 0].any())
    assert bool(ref.in_view[0, 0, 1:-1, 1:-1].all())


def test_points_behind_the_source_camera_keep_their_negative_depth():
    img = ramp_image()
    depth = torch.ones(1, 1, 6, 8, dtype=D64)
    K = torch.tensor([[10.0, 0, 3.5], [0, 10.0, 2.5], [0, 0, 1]], dtype=D64)
    back = torch.tensor([[0.0, 0.0, -5.0, 0.0, 0.0, 0.0]], dtype=D64)
    for convention in ("reference", "exact"):
        warp = inverse_warp(img, depth, depth, back, K, convention=convention)
        # No clamp (pitfall 6): D_c = 1 - 5.
        torch.testing.assert_close(warp.computed_depth, torch.full_like(depth, -4.0))
        assert not bool(warp.in_view.any())
    # The reference still samples the mirrored projection; the exact warp returns nothing.
    ref = inverse_warp(img, depth, depth, back, K, convention="reference")
    exact = inverse_warp(img, depth, depth, back, K, convention="exact")
    assert ref.image.abs().sum() > 0
    assert exact.image.abs().sum() == 0


def test_warp_rejects_bad_arguments():
    img = torch.zeros(1, 3, 6, 8)
    depth = torch.ones(1, 1, 6, 8)
    with pytest.raises(ConfigError, match="convention"):
        inverse_warp(img, depth, depth, torch.zeros(1, 6), torch.eye(3), convention="kornia")
    with pytest.raises(ConfigError, match="pose"):
        inverse_warp(img, depth, depth, torch.zeros(1, 5), torch.eye(3))
    with pytest.raises(ConfigError, match="share"):
        inverse_warp(img, depth[..., :5], depth, torch.zeros(1, 6), torch.eye(3))


# ------------------------------------------------------------------ an analytic textured plane


def texture(x: torch.Tensor) -> torch.Tensor:
    """Smooth colour (normalised units) of a camera-frame point field (B, 3, H, W)."""
    X, Y, Z = x.unbind(1)
    return torch.stack(
        [
            0.9 * torch.sin(9 * X + 4 * Y) + 0.4 * torch.cos(6 * Y - 3 * Z),
            0.8 * torch.cos(7 * X - 8 * Y + 1.0),
            0.7 * torch.sin(5 * X + 9 * Y + 2 * Z + 0.5),
        ],
        1,
    )


def plane_views(T: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Target and source views of the plane n . X = 2 (target frame), exact depth and colour.

    ``T`` (1, 4, 4) maps target-camera points to the source camera. Colour is a function of the
    target-frame point, so brightness constancy holds exactly.
    """
    K = K64()
    n = torch.tensor([0.25, -0.3, 1.0], dtype=D64)
    n = n / n.norm()
    d = 2.0
    rays = (torch.linalg.inv(K) @ pixel_grid(H, W, dtype=D64).reshape(3, -1)).reshape(1, 3, H, W)
    depth_t = d / torch.einsum("c,bchw->bhw", n, rays)[:, None]
    img_t = texture(rays * depth_t)
    R, t = T[0, :3, :3], T[0, :3, 3]
    n_s = R @ n
    d_s = d + n_s @ t
    depth_s = d_s / torch.einsum("c,bchw->bhw", n_s, rays)[:, None]
    x_s = (rays * depth_s).reshape(3, -1)
    x_t = (R.T @ (x_s - t[:, None])).reshape(1, 3, H, W)
    assert depth_t.min() > 0 and depth_s.min() > 0
    return img_t, depth_t, texture(x_t), depth_s, K


PLANE_POSE = pose_vec_to_mat(torch.tensor([[0.15, -0.05, 0.1, 0.02, -0.03, 0.01]], dtype=D64))


def masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(a.dtype)
    return float(((a - b).abs().mean(1, keepdim=True) * m).sum() / m.sum())


def test_exact_warp_with_true_geometry_reproduces_the_plane_view():
    img_t, depth_t, img_s, depth_s, K = plane_views(PLANE_POSE)
    exact = inverse_warp(img_s, depth_t, depth_s, PLANE_POSE, K, convention="exact")
    inside = exact.in_view
    assert inside.double().mean() > 0.7
    err = masked_l1(img_t, exact.image, inside)
    # Only bilinear interpolation of a smooth texture remains.
    assert err < 0.0125, f"exact warp L1 at the true geometry: {err:.5f}"
    # Projected and computed depth agree (a plane's depth is smooth; bilinear is near exact).
    rel = ((exact.computed_depth - exact.projected_depth).abs() / exact.computed_depth)[inside]
    assert rel.max() < 1e-4, f"max relative depth mismatch {float(rel.max()):.2e}"
    # Wrong pose, scaled depth and the reference convention are all clearly worse.
    wrong_t = PLANE_POSE.clone()
    wrong_t[0, 0, 3] += 0.05
    wrong_r = PLANE_POSE @ pose_vec_to_mat(torch.tensor([[0, 0, 0, 0, 0.02, 0]], dtype=D64))
    for name, depth, pose in [
        ("translation +5 cm", depth_t, wrong_t),
        ("rotation 1.1 deg", depth_t, wrong_r),
        ("depth x 1.3", depth_t * 1.3, PLANE_POSE),
        ("depth x 0.8", depth_t * 0.8, PLANE_POSE),
    ]:
        w = inverse_warp(img_s, depth, depth_s, pose, K, convention="exact")
        bad = masked_l1(img_t, w.image, w.in_view & inside)
        assert bad > 8 * err, f"{name}: L1 {bad:.4f} vs {err:.5f} at the true geometry"
    ref = inverse_warp(img_s, depth_t, depth_s, PLANE_POSE, K, convention="reference")
    ref_err = masked_l1(img_t, ref.image, ref.in_view & inside)
    assert ref_err > 3 * err, f"reference convention L1 {ref_err:.4f} vs exact {err:.5f}"


# ---------------------------------------------------------------------------- rotation-only warp


def smooth_image(h: int = H, w: int = W) -> torch.Tensor:
    v, u = torch.meshgrid(torch.arange(h, dtype=D64), torch.arange(w, dtype=D64), indexing="ij")
    return torch.stack(
        [torch.sin(u / 5 + v / 9), torch.cos(u / 7 - v / 6), 0.5 * torch.sin((u + 2 * v) / 8)]
    )[None]


def test_rotation_warp_about_y_shifts_the_principal_point_by_f_tan():
    K = torch.tensor([[50.0, 0, 31.0], [0, 50.0, 23.0], [0, 0, 1]], dtype=D64)
    v, u = torch.meshgrid(torch.arange(H, dtype=D64), torch.arange(W, dtype=D64), indexing="ij")
    img = torch.stack([u, v])[None]
    theta = 0.05
    out = rotation_warp(img, torch.tensor([[0.0, theta, 0.0]], dtype=D64), K, convention="exact")
    # The pixel at the principal point reads R_y (0, 0, 1) = (sin, 0, cos): u' = cx + f tan.
    torch.testing.assert_close(
        out[0, 0, 23, 31], torch.tensor(31 + 50 * math.tan(theta), dtype=D64)
    )
    torch.testing.assert_close(out[0, 1, 23, 31], torch.tensor(23.0, dtype=D64))
    ref = rotation_warp(img, torch.tensor([[0.0, theta, 0.0]], dtype=D64), K)
    torch.testing.assert_close(ref[0, :, 23, 31], out[0, :, 23, 31], atol=1e-5, rtol=0)
    # A zero rotation is an identity (align_corners=True; the 1e-7 shifts < 1e-5 px).
    zero = rotation_warp(img, torch.zeros(1, 3, dtype=D64), K)
    torch.testing.assert_close(zero, img, atol=1e-5, rtol=0)


def test_rotation_warp_then_inverse_rotation_returns_the_image_on_the_overlap():
    img = smooth_image()
    K = K64()
    rot = torch.tensor([[0.1, -0.15, 0.08]], dtype=D64)
    R = euler_to_rotation(rot)
    inv = rotation_to_euler(R.transpose(-1, -2))
    # Not simply -rot: R_x R_y R_z inverts to R_z^T R_y^T R_x^T.
    assert (inv + rot).abs().max() > 1e-4
    there = rotation_warp(img, rot, K, convention="exact")
    back = rotation_warp(there, inv, K, convention="exact")
    ones = torch.ones(1, 1, H, W, dtype=D64)
    overlap = rotation_warp(
        rotation_warp(ones, rot, K, convention="exact"), inv, K, convention="exact"
    )
    overlap = overlap > 1 - 1e-9
    assert overlap.double().mean() > 0.6
    # Two bilinear resamplings of a smooth image (amplitude 1): only interpolation blur remains.
    err = (back - img).abs()[overlap.expand_as(img)]
    assert err.max() < 0.02 and err.mean() < 0.006, f"round trip error {float(err.max()):.4f}"
    # Undoing with -rot instead of the true inverse leaves a visible error.
    wrong = (rotation_warp(there, -rot, K, convention="exact") - img).abs()[overlap.expand_as(img)]
    assert wrong.mean() > 8 * err.mean() and wrong.max() > 0.5


# ----------------------------------------------------------------------------------- normals


def test_spatial_gradient_is_the_normalised_sobel_with_replicate_padding():
    v, u = torch.meshgrid(torch.arange(5, dtype=D64), torch.arange(6, dtype=D64), indexing="ij")
    x = (3 * u - 2 * v + u * v)[None, None]
    g = spatial_gradient(x)
    # Interior: central differences of a bilinear function, averaged with weights 1-2-1 / 4.
    torch.testing.assert_close(g[0, 0, 0, 2, 3], torch.tensor(3 + 2.0, dtype=D64))
    torch.testing.assert_close(g[0, 0, 1, 2, 3], torch.tensor(-2 + 3.0, dtype=D64))
    # Left border, replicate padding: (x(1) - x(0)) / 2 per row.
    torch.testing.assert_close(g[0, 0, 0, 2, 0], torch.tensor((3 + 2.0) / 2, dtype=D64))


def test_normals_of_planes_equal_their_analytic_normal():
    K = K64()
    rays = (torch.linalg.inv(K) @ pixel_grid(H, W, dtype=D64).reshape(3, -1)).reshape(1, 3, H, W)
    flat = depth_to_normals(torch.full((1, 1, H, W), 3.0, dtype=D64), K)
    torch.testing.assert_close(
        flat, torch.tensor([0, 0, 1.0], dtype=D64)[None, :, None, None].expand(1, 3, H, W)
    )
    for n in ([0.3, -0.2, 1.0], [-0.5, 0.4, 0.8]):
        n = torch.tensor(n, dtype=D64)
        n = n / n.norm()
        depth = 2.5 / torch.einsum("c,bchw->bhw", n, rays)[:, None]
        assert depth.min() > 0
        normals = depth_to_normals(depth, K)
        # Every pixel, borders included: finite differences of points on a plane lie in it.
        torch.testing.assert_close(
            normals, n[None, :, None, None].expand(1, 3, H, W), atol=1e-9, rtol=0
        )
