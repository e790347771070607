"""Camera geometry of SC-Depth: Euler poses, back-projection, projection, warps, normals.

Specification: geometric-and-supervised-pretraining.md sections 2.3 (pose output
parametrisation), 3.1-3.6 (geometry) and pitfalls 1, 6 and 23.

Conventions (all shared with the reference):

- pixels ``p = (u, v)``: u = column 0..W-1, v = row 0..H-1, integer pixel centres (no +0.5);
- camera frame: OpenCV (x right, y down, z forward); depth = z in the camera frame;
- a pose ``T = [R | t]`` maps points of camera *a* to camera *b*: ``X_b = R X_a + t``;
  PoseNet(I_a, I_b) predicts the 6-vector ``(t_x, t_y, t_z, r_x, r_y, r_z)`` of that motion
  (translation first, Euler angles in radians, section 3.1);
- intrinsics ``K`` are (B, 3, 3) or one (3, 3) matrix shared by the batch.

Sampling conventions (``convention=``):

- ``"reference"`` (default, faithful): projected coordinates are normalised with
  ``g = 2 u' / (W - 1) - 1`` but the inverse warp samples with ``align_corners=False``, so the
  effective sampling position is ``u' W / (W - 1) - 0.5`` (and likewise for v): an identity pose
  is *not* an identity warp, borders are blended 50 % with the zero padding (pitfalls 1, 23).
  The divide uses ``q3 + 1e-7`` and points behind the camera are projected anyway (pitfall 6).
  That sampling position magnifies the source by ``W / (W - 1)`` about the centre, which a
  forward translation undoes: with the true depth, L_photo is lower at the true motion plus
  one common +z translation (about the true translation's size at 64 x 48, 0.03 m at 128 x 96)
  than at the true motion. A PoseNet trained through it is pulled towards one translation for
  every pair (``tests/test_photometric.py``; README, "GP on CPU"). The pull fades as ``W``
  grows.
- ``"exact"``: samples exactly at the projected pixel ``(u', v')`` (the same normalisation with
  ``align_corners=True``), divides by ``q3`` itself, and sends points with ``q3 <= 0`` (behind
  the source camera) outside the image. The computed depth ``D_c = q3`` is never clamped in
  either convention.

The rotation-only warp of the ARN (section 3.5) already normalises and samples consistently
(``align_corners=True``) in the reference; there the two conventions differ only by the 1e-7
in the divide (a shift of up to ~2e-5 px) and by the handling of points behind the camera.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mesadepth.errors import ConfigError

__all__ = [
    "Convention",
    "Warp",
    "backproject",
    "depth_to_normals",
    "euler_to_rotation",
    "inverse_warp",
    "invert_pose",
    "pixel_grid",
    "pose_errors",
    "pose_mat_to_vec",
    "pose_vec_to_mat",
    "project",
    "relative_pose",
    "rotation_to_euler",
    "rotation_warp",
    "sampling_positions",
    "spatial_gradient",
]

Convention = Literal["reference", "exact"]
_CONVENTIONS = ("reference", "exact")
_PADDING = ("zeros", "border", "reflection")

# The reference's guard in the perspective divide (section 3.3).
_DIVIDE_EPS = 1e-7
# Normalised coordinate that lies fully outside the image for any W, H >= 2 under
# align_corners=True; used by the exact convention for points behind the camera.
_OUTSIDE = -3.0


# --------------------------------------------------------------------------------------------
# Rotations and poses.


def euler_to_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Euler angles -> rotation matrix, ``R = R_x(x) R_y(y) R_z(z)`` (spec 3.1).

    Args:
        angles: (..., 3) angles (x, y, z) in radians.

    Returns:
        (..., 3, 3) rotation matrices, same dtype and device.
    """
    if angles.shape[-1] != 3:
        raise ConfigError(f"euler_to_rotation: expected (..., 3) angles, got {tuple(angles.shape)}")
    x, y, z = angles.unbind(-1)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    # Expanded product R_x R_y R_z (written out rather than three matmuls: one op per entry).
    rows = [
        [cy * cz, -cy * sz, sy],
        [cx * sz + sx * sy * cz, cx * cz - sx * sy * sz, -sx * cy],
        [sx * sz - cx * sy * cz, sx * cz + cx * sy * sz, cx * cy],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def rotation_to_euler(rot: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_to_rotation` for ``|y| < pi/2`` (spec 3.1 order).

    From ``R = R_x R_y R_z``: ``R[0, 2] = sin y``, ``R[1, 2] / R[2, 2] = -tan x``,
    ``R[0, 1] / R[0, 0] = -tan z``.

    Args:
        rot: (..., 3, 3) rotation matrices.

    Returns:
        (..., 3) angles (x, y, z) in radians; x, z in (-pi, pi], y in [-pi/2, pi/2].
    """
    if rot.shape[-2:] != (3, 3):
        raise ConfigError(f"rotation_to_euler: expected (..., 3, 3), got {tuple(rot.shape)}")
    y = torch.asin(rot[..., 0, 2].clamp(-1.0, 1.0))
    x = torch.atan2(-rot[..., 1, 2], rot[..., 2, 2])
    z = torch.atan2(-rot[..., 0, 1], rot[..., 0, 0])
    return torch.stack([x, y, z], -1)


def pose_vec_to_mat(vec: torch.Tensor) -> torch.Tensor:
    """Pose 6-vector ``(t_x, t_y, t_z, r_x, r_y, r_z)`` -> homogeneous 4x4 ``[R | t]`` (spec 3.1).

    Args:
        vec: (..., 6); translation in the depth's units, Euler angles in radians.

    Returns:
        (..., 4, 4) matrix mapping points of camera a to camera b (``X_b = R X_a + t``).
    """
    if vec.shape[-1] != 6:
        raise ConfigError(f"pose_vec_to_mat: expected (..., 6), got {tuple(vec.shape)}")
    top = torch.cat([euler_to_rotation(vec[..., 3:]), vec[..., :3, None]], -1)
    bottom = torch.zeros(*vec.shape[:-1], 1, 4, dtype=vec.dtype, device=vec.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], -2)


def pose_mat_to_vec(mat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 4) or (..., 4, 4) ``[R | t]`` -> (..., 6) ``(t, euler angles)``; see spec 3.1."""
    if mat.shape[-1] != 4 or mat.shape[-2] not in (3, 4):
        raise ConfigError(f"pose_mat_to_vec: expected (..., 3|4, 4), got {tuple(mat.shape)}")
    return torch.cat([mat[..., :3, 3], rotation_to_euler(mat[..., :3, :3])], -1)


def invert_pose(mat: torch.Tensor) -> torch.Tensor:
    """Inverse of a rigid (..., 3|4, 4) pose, returned as (..., 4, 4): ``[R^T | -R^T t]``."""
    if mat.shape[-1] != 4 or mat.shape[-2] not in (3, 4):
        raise ConfigError(f"invert_pose: expected (..., 3|4, 4), got {tuple(mat.shape)}")
    rt = mat[..., :3, :3].transpose(-1, -2)
    t = -(rt @ mat[..., :3, 3:])
    out = torch.zeros(*mat.shape[:-2], 4, 4, dtype=mat.dtype, device=mat.device)
    out[..., :3, :3] = rt
    out[..., :3, 3:] = t
    out[..., 3, 3] = 1.0
    return out


def relative_pose(
    cam_to_world_target: torch.Tensor, cam_to_world_source: torch.Tensor
) -> torch.Tensor:
    """Target -> source motion from two camera-to-world poses (spec 3.3, 3.4).

    ``T_ts = inv(pose_s) @ pose_t``: the pose :func:`inverse_warp` needs to sample the source
    frame into the target frame (what PoseNet(I_t, I_s) predicts). The backward pair of 3.4
    uses ``relative_pose(pose_s, pose_t)`` (in training, a separate PoseNet(I_s, I_t) call).

    Args:
        cam_to_world_target, cam_to_world_source: (..., 4, 4).

    Returns:
        (..., 4, 4).
    """
    return invert_pose(cam_to_world_source) @ cam_to_world_target


def pose_errors(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair errors of a predicted relative pose against the truth, both (..., 3|4, 4).

    Monocular poses are known up to scale, so translation is compared by direction only.

    Returns (each (...)): ``rot_err_deg`` = geodesic angle of ``R_pred^T R_gt`` in degrees;
    ``rot_gt_deg`` = the true rotation angle (the error of predicting no rotation);
    ``t_cos`` = cosine between predicted and true translation (1 = right direction, 0 = no
    relation, NaN where either translation is zero).
    """
    for name, m in (("pred", pred), ("gt", gt)):
        if m.shape[-1] != 4 or m.shape[-2] not in (3, 4):
            raise ConfigError(f"pose_errors: {name} must be (..., 3|4, 4), got {tuple(m.shape)}")

    def angle(rot: torch.Tensor) -> torch.Tensor:
        # atan2(sin, cos) instead of arccos(cos): float32 arccos cannot resolve the
        # fractions of a degree that frame-to-frame rotations are.
        cos = (rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
        skew = rot - rot.transpose(-1, -2)
        sin = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1).norm(dim=-1) / 2
        return torch.rad2deg(torch.atan2(sin, cos))

    r_pred, r_gt = pred[..., :3, :3], gt[..., :3, :3]
    return {
        "rot_err_deg": angle(r_pred.transpose(-1, -2) @ r_gt),
        "rot_gt_deg": angle(r_gt),
        "t_cos": _direction_cos(pred[..., :3, 3], gt[..., :3, 3]),
    }


def pair_translation_cos(toward_first: torch.Tensor, toward_last: torch.Tensor) -> torch.Tensor:
    """Cosine between the translations predicted from a target frame towards its earliest and
    its latest reference, both (..., 3); NaN where either is zero.

    Needs no ground truth: on a smooth camera path the two motions point in nearly opposite
    directions (about -1). A PoseNet that predicts one translation whatever the pair scores
    +1, the degenerate a from-scratch PoseNet fell into in the demo's GP runs.
    """
    return _direction_cos(toward_first, toward_last)


def _direction_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between vectors (..., 3), NaN where either is zero (it has no direction)."""
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(-1) / norms
    return torch.where(norms > 0, cos, torch.full_like(cos, float("nan")))


def _pose_3x4(pose: torch.Tensor, batch: int) -> torch.Tensor:
    """A (B, 6) vector, (B, 3, 4) or (B, 4, 4) matrix (or one unbatched) -> (B, 3, 4)."""
    if pose.shape[-1] == 6 and pose.ndim in (1, 2):
        pose = pose_vec_to_mat(pose)
    if pose.shape[-1] != 4 or pose.shape[-2] not in (3, 4) or pose.ndim not in (2, 3):
        raise ConfigError(f"pose must be (B, 6), (B, 3, 4) or (B, 4, 4), got {tuple(pose.shape)}")
    pose = pose[..., :3, :]
    if pose.ndim == 2:
        pose = pose.unsqueeze(0)
    return pose.expand(batch, 3, 4)


def _intrinsics(K: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) or (3, 3) intrinsics -> (B, 3, 3) in ``like``'s dtype and device."""
    if K.shape[-2:] != (3, 3) or K.ndim not in (2, 3):
        raise ConfigError(f"K must be (B, 3, 3) or (3, 3), got {tuple(K.shape)}")
    K = K.to(dtype=like.dtype, device=like.device)
    if K.ndim == 2:
        K = K.unsqueeze(0)
    if K.shape[0] not in (1, batch):
        raise ConfigError(f"K has batch {K.shape[0]}, the images have {batch}")
    return K.expand(batch, 3, 3)


def _check_map(name: str, x: torch.Tensor, channels: int | None = None) -> None:
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        c = "C" if channels is None else str(channels)
        raise ConfigError(f"{name} must be (B, {c}, H, W), got {tuple(x.shape)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Back-projection and projection.


def pixel_grid(
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Homogeneous integer pixel centres ``(u, v, 1)`` as a (3, H, W) tensor (spec 3.2)."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack([u, v, torch.ones_like(u)])


def backproject(depth: torch.Tensor, K: torch.Tensor, *, ignore_skew: bool = True) -> torch.Tensor:
    """Back-project a depth map: ``X(p) = D(p) K^{-1} (u, v, 1)^T`` (spec 3.2).

    ``ignore_skew=True`` (default) is kornia's ``depth_to_3d`` as the reference calls it:
    ``X = D ((u - c_x) / f_x, (v - c_y) / f_y, 1)``, i.e. K's skew and last row are ignored
    (pitfall 23). ``ignore_skew=False`` uses the full inverse of K. The two agree for every K
    the pipeline produces (zero skew, last row (0, 0, 1)).

    Args:
        depth: (B, 1, H, W) z-depth (any unit; X has the same unit).
        K: (B, 3, 3) or (3, 3) intrinsics in pixels.

    Returns:
        (B, 3, H, W) camera-frame points.
    """
    _check_map("depth", depth, 1)
    return _rays(depth, K, ignore_skew=ignore_skew) * depth


def _rays(depth: torch.Tensor, K: torch.Tensor, *, ignore_skew: bool) -> torch.Tensor:
    """(B, 3, H, W) ``K^{-1} (u, v, 1)^T`` on depth's grid, dtype and device (see backproject)."""
    b, _, h, w = depth.shape
    K = _intrinsics(K, b, depth)
    pix = pixel_grid(h, w, dtype=depth.dtype, device=depth.device).reshape(3, -1)
    if ignore_skew:
        fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]
        cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
        x = (pix[0] - cx) / fx
        y = (pix[1] - cy) / fy
        rays = torch.stack([x, y, torch.ones_like(x)], 1)
    else:
        rays = torch.linalg.inv(K) @ pix
    return rays.reshape(b, 3, h, w)


def _to_pixels(points: torch.Tensor, K: torch.Tensor, pose: torch.Tensor | None) -> torch.Tensor:
    """``q = K (R X + t)`` as (B, 3, H*W); computed as ``(K R) X + K t`` like the reference."""
    b = points.shape[0]
    K = _intrinsics(K, b, points)
    flat = points.reshape(b, 3, -1)
    if pose is None:
        return K @ flat
    proj = K @ _pose_3x4(pose.to(dtype=points.dtype, device=points.device), b)
    return proj[:, :, :3] @ flat + proj[:, :, 3:]


def project(
    points: torch.Tensor,
    K: torch.Tensor,
    pose: torch.Tensor | None = None,
    *,
    eps: float = _DIVIDE_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project camera points into pixels: ``q = K (R X + t)``, ``u' = q1 / (q3 + eps)`` (spec 3.3).

    Args:
        points: (B, 3, H, W) points in camera a.
        K: (B, 3, 3) or (3, 3) intrinsics of camera b.
        pose: optional a -> b pose, (B, 6) vector or (B, 3|4, 4) matrix; None = identity.
        eps: added to q3 in the divide; 1e-7 is the reference's guard.

    Returns:
        ``(uv, z)``: (B, 2, H, W) continuous pixel coordinates (u', v') and (B, 1, H, W) the
        depth q3 of the points in camera b (unclamped; <= 0 behind the camera, pitfall 6).
    """
    _check_map("points", points, 3)
    b, _, h, w = points.shape
    q = _to_pixels(points, K, pose)
    uv = q[:, :2] / (q[:, 2:] + eps)
    return uv.reshape(b, 2, h, w), q[:, 2:].reshape(b, 1, h, w)


def _grid(
    q: torch.Tensor, h: int, w: int, convention: str, eps: float, positions: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Normalised sampling grid (B, H, W, 2), effective sample positions (B, 2, H, W) in pixels
    (None unless ``positions``) and the front-of-camera mask (B, 1, H, W) from homogeneous
    pixels ``q`` (B, 3, H*W)."""
    b = q.shape[0]
    z = q[:, 2:]
    front = z > 0
    if convention == "reference":
        uv = q[:, :2] / (z + eps)
    else:
        # Divide only where the point is in front; the rest is sent outside below.
        uv = q[:, :2] / torch.where(front, z, torch.ones_like(z))
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], dtype=q.dtype, device=q.device)
    g = uv * scale[None, :, None] - 1.0
    pos = None
    if convention == "exact":
        g = torch.where(front, g, torch.full_like(g, _OUTSIDE))
        pos = uv.detach() if positions else None
    elif positions:
        # align_corners=False reads g as ((g + 1) W - 1) / 2 = u' W / (W - 1) - 0.5 (pitfall 1).
        size = torch.tensor([w, h], dtype=q.dtype, device=q.device)
        with torch.no_grad():
            pos = ((g + 1.0) * size[None, :, None] - 1.0) / 2.0
    grid = g.reshape(b, 2, h, w).permute(0, 2, 3, 1)
    if pos is not None:
        pos = pos.reshape(b, 2, h, w)
    return grid, pos, front.reshape(b, 1, h, w)


def sampling_positions(
    uv: torch.Tensor, height: int, width: int, convention: Convention = "reference"
) -> torch.Tensor:
    """Pixel position the inverse warp actually reads for projected coordinates ``uv`` (spec 3.3).

    ``"reference"``: ``(u' W / (W - 1) - 0.5, v' H / (H - 1) - 0.5)``; ``"exact"``: ``(u', v')``.

    Args:
        uv: (..., 2, ...) with u' and v' along dim -3 when 4-D, else the last dim; pixels.

    Returns:
        Same shape as ``uv``.
    """
    _check_choice("convention", convention, _CONVENTIONS)
    if convention == "exact":
        return uv
    dim = -3 if uv.ndim == 4 else -1
    u, v = uv.unbind(dim)
    return torch.stack([u * width / (width - 1) - 0.5, v * height / (height - 1) - 0.5], dim)


# --------------------------------------------------------------------------------------------
# Warps.


class Warp(NamedTuple):
    """Result of :func:`inverse_warp`; every map is on the target's pixel grid.

    - ``image``: (B, C, H, W) the source image sampled into the target frame (I_w);
    - ``projected_depth``: (B, 1, H, W) the source depth sampled the same way (D_p);
    - ``computed_depth``: (B, 1, H, W) the target points' depth in the source camera (D_c = q3,
      unclamped);
    - ``in_view``: (B, 1, H, W) bool, the point is in front of the source camera and the
      position actually sampled lies within the source image's pixel centres
      ``[0, W-1] x [0, H-1]``. Not part of the reference, whose losses derive validity from
      zero values instead (spec 4.2); provided for analysis and the exact convention. None
      when the warp was asked not to compute it (``inverse_warp(..., in_view=False)``).
    """

    image: torch.Tensor
    projected_depth: torch.Tensor
    computed_depth: torch.Tensor
    in_view: torch.Tensor | None


def inverse_warp(
    img: torch.Tensor,
    depth: torch.Tensor,
    ref_depth: torch.Tensor,
    pose: torch.Tensor,
    K: torch.Tensor,
    *,
    convention: Convention = "reference",
    padding_mode: str = "zeros",
    in_view: bool = True,
) -> Warp:
    """Sample a source image and depth into the target frame with target depth and pose (spec 3.3).

    For every target pixel p: ``q = K (R X_t(p) + t)``, ``u' = q1 / (q3 + 1e-7)``,
    ``D_c = q3``; ``img`` and ``ref_depth`` are sampled bilinearly at ``(u', v')`` under the
    chosen ``convention`` (module docstring; ``"reference"`` reproduces the half-pixel grid
    mismatch of pitfall 1, ``"exact"`` samples exactly at ``(u', v')`` and sends points
    behind the source camera outside the image, where ``padding_mode`` decides their value).

    Args:
        img: (B, C, H, W) source image I_s (normalised, spec 1.5).
        depth: (B, 1, H, W) target depth D_t.
        ref_depth: (B, 1, H, W) source depth D_s.
        pose: target -> source motion (``X_s = R X_t + t``): (B, 6) PoseNet vector or
            (B, 3|4, 4) matrix.
        K: (B, 3, 3) or (3, 3) intrinsics (shared by both frames).
        convention: ``"reference"`` or ``"exact"``.
        padding_mode: grid-sample padding; the reference uses ``"zeros"``.
        in_view: compute :attr:`Warp.in_view` (False: None; the losses do not use it).

    Returns:
        :class:`Warp` ``(image, projected_depth, computed_depth, in_view)``.
    """
    _check_map("img", img)
    _check_map("depth", depth, 1)
    _check_map("ref_depth", ref_depth, 1)
    _check_choice("convention", convention, _CONVENTIONS)
    _check_choice("padding_mode", padding_mode, _PADDING)
    b, _, h, w = img.shape
    if depth.shape != (b, 1, h, w) or ref_depth.shape != (b, 1, h, w):
        raise ConfigError(
            f"inverse_warp: img {tuple(img.shape)}, depth {tuple(depth.shape)} and ref_depth "
            f"{tuple(ref_depth.shape)} must share B, H, W"
        )
    q = _to_pixels(backproject(depth, K), K, pose)
    grid, pos, front = _grid(q, h, w, convention, _DIVIDE_EPS, positions=in_view)
    align = convention == "exact"
    # The grid follows the depth's dtype; grid_sample wants it in each input's own dtype.
    image = F.grid_sample(img, grid.to(img.dtype), padding_mode=padding_mode, align_corners=align)
    projected = F.grid_sample(
        ref_depth, grid.to(ref_depth.dtype), padding_mode=padding_mode, align_corners=align
    )
    computed = q[:, 2:].reshape(b, 1, h, w)
    if pos is None:
        return Warp(image, projected, computed, None)
    seen = (
        front
        & (pos[:, :1] >= 0)
        & (pos[:, :1] <= w - 1)
        & (pos[:, 1:] >= 0)
        & (pos[:, 1:] <= h - 1)
    )
    return Warp(image, projected, computed, seen)


def rotation_warp(
    img: torch.Tensor,
    rot: torch.Tensor,
    K: torch.Tensor,
    *,
    convention: Convention = "reference",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Rotation-only (homography) warp used by the ARN (spec 3.5).

    For every pixel p: ``q = K R(rot) K^{-1} (u, v, 1)^T``, sample ``img`` at
    ``(q1 / (q3 + 1e-7), q2 / (q3 + 1e-7))`` with ``align_corners=True`` (the reference; unlike
    :func:`inverse_warp` this is grid-consistent, so a zero rotation is an identity up to the
    1e-7 shift). ``"exact"`` divides by q3 itself and leaves points with ``q3 <= 0`` empty.
    ``RotWarp(I_b, ARN(I_a, I_b), K)`` is rotationally aligned with I_a (spec 2.4).

    Args:
        img: (B, C, H, W) image (normalised; out-of-view pixels become 0 with zero padding).
        rot: (B, 3) Euler angles (x, y, z) in radians (spec 3.1).
        K: (B, 3, 3) or (3, 3) intrinsics.

    Returns:
        (B, C, H, W) warped image.
    """
    _check_map("img", img)
    _check_choice("convention", convention, _CONVENTIONS)
    _check_choice("padding_mode", padding_mode, _PADDING)
    b, _, h, w = img.shape
    if rot.shape != (b, 3):
        raise ConfigError(f"rotation_warp: rot must be (B, 3) = {(b, 3)}, got {tuple(rot.shape)}")
    ones = torch.ones(b, 1, h, w, dtype=img.dtype, device=img.device)
    rays = backproject(ones, K)
    Kb = _intrinsics(K, b, img)
    q = (Kb @ euler_to_rotation(rot.to(img.dtype))) @ rays.reshape(b, 3, -1)
    # Same normalisation as the inverse warp; only the sampling call differs (align_corners).
    grid, _, _ = _grid(q, h, w, convention, _DIVIDE_EPS, positions=False)
    return F.grid_sample(img, grid.to(img.dtype), padding_mode=padding_mode, align_corners=True)


# --------------------------------------------------------------------------------------------
# Normals.


def spatial_gradient(x: torch.Tensor) -> torch.Tensor:
    """Per-channel normalised Sobel derivatives, kornia's ``spatial_gradient`` (spec 3.6).

    Cross-correlation with ``S_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8`` and
    ``S_y = S_x^T`` after replicate padding by one pixel.

    Args:
        x: (B, C, H, W).

    Returns:
        (B, C, 2, H, W): index 0 along dim 2 is d/du (columns), 1 is d/dv (rows).
    """
    _check_map("x", x)
    b, c, h, w = x.shape
    # One grouped convolution, (d/du, d/dv) per channel: the same values as convolving each
    # channel as its own one-channel image (bit for bit on CPU), and several times faster
    # forward and backward there (oneDNN handles a single input channel poorly).
    kernel = _sobel_kernels(x).repeat(c, 1, 1)[:, None]  # (2C, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel, groups=c).reshape(b, c, 2, h, w)


def _sobel_kernels(like: torch.Tensor) -> torch.Tensor:
    """(2, 3, 3) normalised Sobel kernels (S_x, S_y = S_x^T) in ``like``'s dtype and device."""
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=like.dtype) / 8
    return torch.stack([sx, sx.T]).to(like.device)


def depth_to_normals(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Unit surface normals of a depth map, kornia's ``depth_to_normals`` (spec 3.6).

    Back-projects with K's skew ignored (kornia, pitfall 23), takes per-coordinate normalised
    Sobel derivatives G_u, G_v (:func:`spatial_gradient`) and returns
    ``n = G_u x G_v / max(|G_u x G_v|, 1e-12)``. A fronto-parallel plane gives (0, 0, +1),
    i.e. normals point away from the camera.

    Args:
        depth: (B, 1, H, W) depth.
        K: (B, 3, 3) or (3, 3) intrinsics.

    Returns:
        (B, 3, H, W) unit normals in the camera frame.
    """
    _check_map("depth", depth, 1)
    rays = _rays(depth, K, ignore_skew=True)
    if torch.is_grad_enabled() and depth.requires_grad and not rays.requires_grad:
        return _DepthToNormals.apply(depth, rays)
    return _normals_of_points(rays * depth)[0]


_NORMAL_EPS = 1e-12


def _normals_of_points(
    points: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit normals of (B, 3, H, W) points, with G_u, G_v and the norm of G_u x G_v."""
    grad = spatial_gradient(points)
    g_u, g_v = grad[:, :, 0], grad[:, :, 1]
    n = torch.linalg.cross(g_u, g_v, dim=1)
    norm = _channel_norm(n)
    return n / norm.clamp_min(_NORMAL_EPS), g_u, g_v, norm


class _DepthToNormals(torch.autograd.Function):
    """:func:`depth_to_normals` (the same forward) with a hand-written backward.

    Autograd's chain through the normalisation, the cross product, the grouped convolution and
    the padding kept about 30 maps and took about 70 % of the normals' forward + backward time
    on CPU; written out it is the projection ``(g - n (n . g)) / |m|`` (``g / eps`` where
    ``|m| < eps``, as the clamp), two cross products, one convolution with the flipped Sobel
    kernels (the adjoint of the forward one), the replicate-padding adjoint and the rays.
    """

    @staticmethod
    def forward(ctx: Any, depth: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
        out, g_u, g_v, norm = _normals_of_points(rays * depth)
        ctx.save_for_backward(rays, g_u, g_v, out, norm)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rays, g_u, g_v, out, norm = ctx.saved_tensors
        b, c, h, w = rays.shape
        # Through n = m / max(|m|, eps): the clamp passes the norm's gradient where
        # |m| >= eps (autograd's clamp_min), else m / eps is linear in m.
        along = _channel_dot(out, grad) * (norm >= _NORMAL_EPS)
        g_m = (grad - out * along) / norm.clamp_min(_NORMAL_EPS)
        # Through m = G_u x G_v, into (B, C, 2, H, W) as spatial_gradient lays them out.
        stacked = torch.empty(b, c, 2, h, w, dtype=grad.dtype, device=grad.device)
        _cross(g_v, g_m, out=stacked[:, :, 0])
        _cross(g_m, g_u, out=stacked[:, :, 1])
        # Through the Sobel convolution: its adjoint is the full correlation with the kernels
        # flipped in both axes, then the replicate padding's adjoint.
        stacked = stacked.reshape(b, 2 * c, h, w)
        if stacked.device.type == "cpu":
            # oneDNN's grouped convolution is ~2x faster on channels-last input.
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        kernel = _sobel_kernels(rays).flip(-1, -2).repeat(c, 1, 1, 1)  # (C, 2, 3, 3)
        g_padded = F.conv2d(stacked, kernel, padding=2, groups=c).contiguous()
        g_points = torch.ops.aten.replication_pad2d_backward(g_padded, rays, [1, 1, 1, 1])
        return _channel_dot(rays, g_points), None


def _cross(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``a x b`` over dim 1 of (B, 3, H, W) maps into ``out``; written out (torch.linalg.cross
    over a strided dim is ~3x slower on CPU; it also rounds differently, fused multiply-adds,
    so the forward keeps it)."""
    a0, a1, a2 = a.unbind(1)
    b0, b1, b2 = b.unbind(1)
    torch.sub(a1 * b2, a2 * b1, out=out[:, 0])
    torch.sub(a2 * b0, a0 * b2, out=out[:, 1])
    torch.sub(a0 * b1, a1 * b0, out=out[:, 2])


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel dot product over the 3 channels of (B, 3, H, W) maps, keepdim."""
    return (a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2])[:, None]


def _channel_norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over dim 1 of (B, 3, H, W), keepdim: ``F.normalize``'s denominator."""
    if v.device.type == "cpu" and v.dtype == torch.float32:
        # torch.linalg.vector_norm over a strided dim is slow on CPU (a third of the normals'
        # time); for float32 it sums the squares in float32 in channel order and takes the
        # square root in float64, which this reproduces bit for bit at a fraction of the cost.
        a, b, c = v.unbind(1)
        return ((a * a + b * b) + c * c).double().sqrt().float()[:, None]
    return torch.linalg.vector_norm(v, dim=1, keepdim=True)
