"""SC-DepthV2 losses: SSIM, pairwise maps, view selection, mean_on_mask, smoothness, ARN, weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mesadepth.data.synthetic import (
    build_scene,
    hand_held_trajectory,
    nyu_intrinsics,
    render_frame,
    room_size,
    scene_rng,
)
from mesadepth.errors import ConfigError
from mesadepth.geometry import (
    inverse_warp,
    pose_errors,
    pose_mat_to_vec,
    pose_vec_to_mat,
    rotation_warp,
)
from mesadepth.losses.consistency import (
    arn_losses,
    depth_inconsistency,
    mean_on_mask,
    rot_consistency_target,
)
from mesadepth.losses.photometric import (
    LOSS_WEIGHTS,
    PairwiseMaps,
    combine_pairwise,
    pairwise_maps,
    photo_and_geometry_loss,
    sc_depth_v2_losses,
    smoothness_loss,
    ssim,
    ssim_dissimilarity,
    total_loss,
)

D64 = torch.float64
H, W = 48, 64


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> SC-Depth's normalised (1, 3, H, W) float64 (spec 1.5)."""
    return (torch.from_numpy(rgb).permute(2, 0, 1)[None].to(D64) / 255 - 0.45) / 0.225


def render_walk(
    index: int, scene_type: str, n_frames: int, step_m: float, keep: list[int] | None = None
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Frames ``keep`` (default all) of a hand-held walk (2 deg per frame) through synthetic
    room ``index``: the rendered frames, their camera-to-world poses (n, 4, 4) and K."""
    rng = scene_rng(0, "nyu", "video", index)
    size = room_size(rng, "nyu", scene_type)
    poses = hand_held_trajectory(rng, size, n_frames, step_m, 2.0)
    scene = build_scene(rng, "nyu", scene_type, size, poses[:, :3, 3])
    poses = poses if keep is None else poses[keep]
    K = nyu_intrinsics(W, H)
    return [render_frame(scene, K, p, H, W, supersample=2) for p in poses], poses, K


@pytest.fixture(scope="module")
def video() -> dict:
    """Three frames (i-3, i, i+3) of a hand-held walk, exact depth and camera-to-world poses."""
    frames, poses, K = render_walk(0, "office", 7, 0.1, keep=[0, 3, 6])
    c2w = [torch.from_numpy(p) for p in poses]

    def rel(t: int, s: int) -> torch.Tensor:  # target -> source: inv(pose_s) @ pose_t
        return (torch.linalg.inv(c2w[s]) @ c2w[t])[None]

    edges = torch.stack([torch.from_numpy(f["edges"]) for f in frames])[:, None].to(D64)
    return {
        "img": [normalise(f["rgb"]) for f in frames],
        "depth": [torch.from_numpy(f["depth"])[None, None].to(D64) for f in frames],
        # Pixels within 3 px of an occluding edge (bilinear depth sampling mixes surfaces there).
        "near_edge": [m[None] for m in F.max_pool2d(edges, 7, 1, 3) > 0],
        "K": torch.from_numpy(K),
        "rel": rel,
    }


# ---------------------------------------------------------------------------------------- SSIM


def test_ssim_of_an_image_with_itself_is_one():
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0), dtype=D64)
    torch.testing.assert_close(ssim(x, x), torch.ones_like(x))
    assert ssim_dissimilarity(x, x).abs().max() < 1e-12
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    assert ssim_dissimilarity(x, y).mean() > 0.3


def test_ssim_of_constant_images_is_the_luminance_term():
    x = torch.ones(1, 1, 8, 8, dtype=D64)
    y = torch.zeros(1, 1, 8, 8, dtype=D64)
    # sigma = 0: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) = 1e-4 / 1.0001.
    torch.testing.assert_close(ssim(x, y), torch.full_like(x, 1e-4 / 1.0001))
    torch.testing.assert_close(
        ssim_dissimilarity(x, y), torch.full_like(x, (1 - 1e-4 / 1.0001) / 2)
    )


def direct_ssim(x: np.ndarray, y: np.ndarray, r: int, c: int) -> float:
    """SSIM at (r, c) from the 7x7 window of the reflection-padded images, population moments."""
    xp, yp = np.pad(x, 3, mode="reflect"), np.pad(y, 3, mode="reflect")
    a, b = xp[r : r + 7, c : c + 7], yp[r : r + 7, c : c + 7]
    mx, my = a.mean(), b.mean()
    vx, vy = a.var(), b.var()
    cxy = ((a - mx) * (b - my)).mean()
    c1, c2 = 0.01**2, 0.03**2
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_matches_the_direct_formula_inside_and_at_the_reflected_border():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 11))
    y = 0.6 * x + 0.4 * rng.normal(size=(9, 11)) + 0.3
    got = ssim(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None])[0, 0]
    for r, c in [(4, 5), (0, 0), (8, 10), (2, 9)]:
        assert got[r, c].item() == pytest.approx(direct_ssim(x, y, r, c), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------- mean_on_mask


def test_mean_on_mask_needs_more_than_100_valid_pixels():
    err = torch.arange(400, dtype=D64).reshape(1, 1, 20, 20).requires_grad_()
    valid = torch.zeros(1, 1, 20, 20, dtype=D64)
    valid.view(-1)[:100] = 1
    zero = mean_on_mask(err, valid)
    # Constant float32 zero without gradient, even for float64 inputs (pitfalls 7, 23).
    assert zero.item() == 0 and zero.dtype == torch.float32 and not zero.requires_grad
    valid.view(-1)[100] = 1
    m = mean_on_mask(err, valid)
    assert m.dtype == D64 and m.item() == pytest.approx(sum(range(101)) / 101)
    m.backward()
    torch.testing.assert_close(err.grad, valid / 101)
    # A one-channel mask broadcasts over channels and counts once per channel.
    err2 = torch.ones(1, 2, 10, 6, dtype=D64)
    assert mean_on_mask(err2, torch.ones(1, 1, 10, 6)).item() == 1.0  # 120 > 100
    assert mean_on_mask(err2[:, :, :8], torch.ones(1, 1, 8, 6)).item() == 0.0  # 96 <= 100 pixels


# ------------------------------------------------------------------------------ pairwise maps


def flat_scene(h: int = 16, w: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    img = torch.randn(1, 3, h, w, generator=g, dtype=D64)
    depth = torch.full((1, 1, h, w), 2.0, dtype=D64)
    K = torch.tensor([[20.0, 0, (w - 1) / 2], [0, 20.0, (h - 1) / 2], [0, 0, 1]], dtype=D64)
    return img, depth, K


def test_pairwise_maps_follow_the_formulas():
    img, depth, K = flat_scene()
    g = torch.Generator().manual_seed(5)
    source = img + 0.3 * torch.randn(img.shape, generator=g, dtype=D64)
    src_depth = depth * (1 + 0.1 * torch.rand(depth.shape, generator=g, dtype=D64))
    pose = torch.tensor([[0.05, -0.02, 0.03, 0.01, 0.02, -0.01]], dtype=D64)
    for convention in ("reference", "exact"):
        m = pairwise_maps(img, source, depth, src_depth, pose, K, convention=convention)
        w = inverse_warp(source, depth, src_depth, pose, K, convention=convention)
        e_d = (w.computed_depth - w.projected_depth).abs() / (w.computed_depth + w.projected_depth)
        torch.testing.assert_close(m.depth_diff, e_d)
        color = (img - w.image).abs().mean(1, keepdim=True)
        torch.testing.assert_close(m.color, color)
        raw = (
            0.15 * (img - w.image).abs().clamp(0, 1) + 0.85 * ssim_dissimilarity(img, w.image)
        ).mean(1, keepdim=True)
        torch.testing.assert_close(m.photo, raw * (1 - e_d))
        nonzero = (w.image.abs().mean(1, keepdim=True) > 1e-3) & (
            img.abs().mean(1, keepdim=True) > 1e-3
        )
        auto = color < (img - source).abs().mean(1, keepdim=True)
        torch.testing.assert_close(m.valid, (nonzero & auto).to(D64))
        assert 0 < m.valid.mean() < 1
        # Ablations: no SSIM, no auto-mask, no weight mask.
        m2 = pairwise_maps(
            img, source, depth, src_depth, pose, K, convention=convention,
            no_ssim=True, no_auto_mask=True, no_dynamic_mask=True,
        )  # fmt: skip
        torch.testing.assert_close(
            m2.photo, (img - w.image).abs().clamp(0, 1).mean(1, keepdim=True)
        )
        torch.testing.assert_close(m2.valid, nonzero.to(D64))


def test_weight_mask_is_detached_and_outside_pixels_have_unit_inconsistency():
    img, depth, K = flat_scene()
    src_depth = depth.clone().requires_grad_()
    tgt_depth = depth.clone().requires_grad_()
    pose = torch.tensor([[0.05, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=D64)
    m = pairwise_maps(img, img.flip(-1), tgt_depth, src_depth, pose, K)
    # The source depth reaches E_p only through the stop-gradient weight 1 - E_d.
    (g_src,) = torch.autograd.grad(m.photo.sum(), src_depth, allow_unused=True)
    assert g_src is None
    (g_tgt,) = torch.autograd.grad(m.photo.sum(), tgt_depth)
    assert g_tgt.abs().sum() > 0  # ... while the target depth moves the sampling grid
    # Shift everything out of view: D_p = 0 so E_d = |D_c| / D_c = 1 exactly; nothing is valid.
    far = torch.tensor([[50.0, 0, 0, 0, 0, 0]], dtype=D64)
    out = pairwise_maps(img, img, depth, depth, far, K)
    torch.testing.assert_close(out.depth_diff, torch.ones_like(depth))
    assert out.valid.sum() == 0 and out.photo.abs().max() == 0
    torch.testing.assert_close(
        depth_inconsistency(torch.tensor(3.0), torch.tensor(1.0)), torch.tensor(0.5)
    )


def test_identical_frames_contribute_nothing_only_because_of_the_auto_mask():
    img, depth, K = flat_scene()
    zero = torch.zeros(1, 6, dtype=D64)
    args = (img, [img, img], depth, [depth, depth], K, [zero, zero], [zero, zero])
    for convention in ("reference", "exact"):
        pg = photo_and_geometry_loss(*args, convention=convention)
        assert pg.photo.item() == 0 and pg.geometry.item() == 0  # spec 4.3 consequence
    # Without the auto-mask the reference's identity warp is not an identity (pitfall 23) ...
    ref = photo_and_geometry_loss(*args, no_auto_mask=True)
    assert ref.photo.item() > 0.01 and ref.geometry.item() > 0
    # ... while the exact convention's is.
    exact = photo_and_geometry_loss(*args, no_auto_mask=True, convention="exact")
    assert exact.photo.item() < 1e-9 and exact.geometry.item() < 1e-12


# ------------------------------------------------------------------ view selection and order


def const_maps(
    color: float, photo: float, depth: float, valid: float, shape=(1, 1, 16, 16)
) -> PairwiseMaps:
    return PairwiseMaps(*(torch.full(shape, v, dtype=D64) for v in (photo, color, depth, valid)))


def test_view_selection_takes_the_first_map_on_ties_and_ignores_validity():
    maps = [
        const_maps(0.5, 1.0, 0.2, 0.0),  # fwd_1: best colour, invalid
        const_maps(0.5, 2.0, 0.3, 1.0),  # bwd_1: tied, valid
        const_maps(0.6, 3.0, 0.4, 1.0),
        const_maps(0.7, 4.0, 0.5, 1.0),
    ]
    # Ties everywhere: fwd_1 wins and its invalidity drops every pixel (pitfall 2).
    photo, geo = combine_pairwise(maps)
    assert photo.item() == 0 and geo.item() == 0 and photo.dtype == torch.float32
    # Make bwd_1 strictly better on the top 8 rows (128 pixels > 100): they count, rest dropped.
    maps[1].color[..., :8, :] = 0.4
    photo, geo = combine_pairwise(maps)
    assert photo.item() == pytest.approx(2.0) and geo.item() == pytest.approx(0.3)
    # 6 rows = 96 selected valid pixels: below the threshold, constant 0.
    maps[1].color[..., 6:8, :] = 0.5
    assert combine_pairwise(maps)[0].item() == 0
    # no_min_optimize: masked mean over all four maps (3 x 256 valid pixels).
    photo, geo = combine_pairwise(maps, no_min_optimize=True)
    assert photo.item() == pytest.approx((2 + 3 + 4) / 3) and geo.item() == pytest.approx(0.4)
    # There the >100 test counts over all maps together: 4 x 30 valid pixels pass, 30 do not.
    few = [const_maps(0.5, 1.0 + i, 0.1, 0.0) for i in range(4)]
    for m in few:
        m.valid.view(-1)[:30] = 1
    assert combine_pairwise(few, no_min_optimize=True)[0].item() == pytest.approx(2.5)
    assert combine_pairwise(few)[0].item() == 0


def test_maps_are_stacked_forward_backward_per_reference(video):
    img, depth, K, rel = video["img"], video["depth"], video["K"], video["rel"]
    pg = photo_and_geometry_loss(
        img[1], [img[0], img[2]], depth[1], [depth[0], depth[2]], K,
        [rel(1, 0), rel(1, 2)], [rel(0, 1), rel(2, 1)],
    )  # fmt: skip
    expected = [
        pairwise_maps(img[1], img[0], depth[1], depth[0], rel(1, 0), K),
        pairwise_maps(img[0], img[1], depth[0], depth[1], rel(0, 1), K),
        pairwise_maps(img[1], img[2], depth[1], depth[2], rel(1, 2), K),
        pairwise_maps(img[2], img[1], depth[2], depth[1], rel(2, 1), K),
    ]
    assert len(pg.maps) == 4
    for got, want in zip(pg.maps, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    photo, geo = combine_pairwise(expected)
    torch.testing.assert_close(pg.photo, photo)
    torch.testing.assert_close(pg.geometry, geo)
    with pytest.raises(ConfigError, match="as many"):
        photo_and_geometry_loss(img[1], [img[0]], depth[1], [], K, [rel(1, 0)], [rel(0, 1)])


# ------------------------------------------------------------ the rendered scene, true geometry


def scene_errors(video: dict, convention: str, depth_scale: float = 1.0, pose_error=None) -> dict:
    """Forward pair target = frame i, source = frame i+3: errors over in-view, edge-free pixels."""
    img, depth, K = video["img"], video["depth"], video["K"]
    pose = video["rel"](1, 2)
    if pose_error is not None:
        pose = pose @ pose_vec_to_mat(torch.tensor([pose_error], dtype=D64))
    d_t = depth[1] * depth_scale
    w = inverse_warp(img[2], d_t, depth[2], pose, K, convention=convention)
    m = pairwise_maps(
        img[1], img[2], d_t, depth[2], pose, K, convention=convention, no_auto_mask=True
    )
    ok = (w.in_view & ~video["near_edge"][1]).to(D64)
    assert ok.mean() > 0.5
    return {
        "color": mean_on_mask(m.color, ok).item(),
        "photo": mean_on_mask(m.photo, ok).item(),
        "geometry": mean_on_mask(m.depth_diff, ok).item(),
    }


def test_true_geometry_reproduces_the_target_under_the_exact_convention(video):
    true = scene_errors(video, "exact")
    msg = f"exact, true geometry: {true}"
    # Normalised units: 0.06 = 3.4 grey levels; what is left is resampling of anti-aliased texture.
    assert true["color"] < 0.06 and true["photo"] < 0.12, msg
    for name, kw in [
        ("depth x 0.7", {"depth_scale": 0.7}),
        ("depth x 1.5", {"depth_scale": 1.5}),
        ("pose +3 cm x, +1.1 deg y", {"pose_error": [0.03, 0, 0, 0, 0.02, 0]}),
    ]:
        bad = scene_errors(video, "exact", **kw)
        assert bad["color"] > 1.8 * true["color"] and bad["photo"] > 1.5 * true["photo"], (
            f"{name}: {bad} vs {msg}"
        )
    ref = scene_errors(video, "reference")
    assert ref["color"] > 1.2 * true["color"], f"reference {ref} vs {msg}"


def test_geometry_consistency_vanishes_at_the_true_geometry_away_from_edges(video):
    true = scene_errors(video, "exact")
    assert true["geometry"] < 1e-3, f"exact, true geometry: {true}"
    ref = scene_errors(video, "reference")
    # The half-pixel offset of the reference samples the wrong depth (pitfall 1).
    assert ref["geometry"] > 5 * true["geometry"], f"reference {ref} vs exact {true}"
    for scale in (0.7, 1.5):
        bad = scene_errors(video, "exact", depth_scale=scale)
        assert bad["geometry"] > 0.1, f"depth x {scale}: {bad}"


def test_v2_losses_on_the_rendered_clip(video):
    img, depth, K, rel = video["img"], video["depth"], video["K"], video["rel"]
    d_t = depth[1].clone().requires_grad_()
    refs = [img[0], img[2]]
    out = {}
    for convention in ("exact", "reference"):
        out[convention] = sc_depth_v2_losses(
            img[1], refs, d_t, [depth[0], depth[2]], K,
            [rel(1, 0), rel(1, 2)], [rel(0, 1), rel(2, 1)], convention=convention,
        )  # fmt: skip
    terms = out["exact"]
    assert set(terms) == {"photo", "geometry", "smooth", "total"}
    figures = {c: {k: round(v.item(), 5) for k, v in t.items()} for c, t in out.items()}
    assert terms["photo"] < 0.1 and terms["geometry"] < 0.01, figures
    assert out["reference"]["photo"] > terms["photo"], figures
    torch.testing.assert_close(
        terms["total"], terms["photo"] + 0.1 * terms["geometry"] + 0.1 * terms["smooth"]
    )
    terms["total"].backward()
    assert d_t.grad is not None and d_t.grad.abs().sum() > 0
    # Scaling the target depth alone breaks consistency with the reference depths and poses.
    scaled = sc_depth_v2_losses(
        img[1], refs, depth[1] * 1.5, [depth[0], depth[2]], K,
        [rel(1, 0), rel(1, 2)], [rel(0, 1), rel(2, 1)], convention="exact",
    )  # fmt: skip
    assert scaled["geometry"] > 5 * terms["geometry"] and scaled["photo"] > terms["photo"], figures
    # Smoothness acts on mean-normalised depth: identical for the scaled depth.
    torch.testing.assert_close(scaled["smooth"], terms["smooth"])


@pytest.fixture(scope="module")
def walk() -> dict:
    """Six consecutive frames of a hand-held walk (the tiny world's 0.05 m and 2 deg per frame:
    1-3 px of flow at 64x48): images, exact depth, the five true motions frame i -> i+1 as
    (5, 4, 4) matrices, and K."""
    frames, poses, K = render_walk(1, "bedroom", 6, 0.05)
    c2w = torch.from_numpy(poses)
    return {
        "img": torch.cat([normalise(f["rgb"]) for f in frames]),
        "depth": torch.stack([torch.from_numpy(f["depth"])[None] for f in frames]).to(D64),
        "truth": torch.linalg.inv(c2w[1:]) @ c2w[:-1],
        "K": torch.from_numpy(K),
    }


@pytest.mark.learning  # no random source: only the thread count can move it
def test_photometric_gradient_leads_a_free_pose_to_the_true_motion(walk, learning_record):
    """What a PoseNet learns from: descending L_photo (true depth, exact convention) from zero
    motion reaches the true relative poses of five consecutive hand-held frame pairs."""
    img, depth, truth, K = walk["img"], walk["depth"], walk["truth"], walk["K"]

    def loss(pose: torch.Tensor) -> torch.Tensor:
        m = pairwise_maps(img[:-1], img[1:], depth[:-1], depth[1:], pose, K, convention="exact")
        return mean_on_mask(m.photo, m.valid)

    vec = torch.zeros(5, 6, dtype=D64, requires_grad=True)
    opt = torch.optim.Adam([vec], lr=2e-3)
    start = loss(vec).item()
    for _ in range(100):
        opt.zero_grad()
        loss(vec).backward()
        opt.step()
    err = pose_errors(pose_vec_to_mat(vec.detach()), truth)
    figures = {k: v.numpy().round(3).tolist() for k, v in err.items()}
    at_truth = loss(pose_mat_to_vec(truth)).item()
    learning_record["min t cos (> 0.9)"] = float(err["t_cos"].min())
    learning_record["mean rot err / rot (< 0.3)"] = float(
        (err["rot_err_deg"] / err["rot_gt_deg"]).mean()
    )
    learning_record["loss end / at truth (< 1.02)"] = loss(vec).item() / at_truth
    learning_record["loss at truth / start (< 0.3)"] = at_truth / start
    assert err["t_cos"].min() > 0.9, figures
    assert (err["rot_err_deg"] / err["rot_gt_deg"]).mean() < 0.3, figures
    assert loss(vec).item() < 1.02 * at_truth < 0.3 * start, (loss(vec).item(), at_truth, start)


@pytest.mark.learning  # no random source: only the thread count can move it
def test_reference_warp_pulls_every_translation_forward(walk, learning_record):
    """Pitfall 1 in practice: the reference warp samples u W/(W-1) - 0.5, a magnification by
    W/(W-1) about the centre that a forward translation can undo. From the true motion of five
    frame pairs (true depth), descending L_photo adds one common +z translation under the
    reference convention -- the one-translation-for-every-pair degenerate of a PoseNet
    (``pose_pair_cos`` +1) -- of 75-100 % of the true translation's length; under the exact
    convention the truth moves less than half as far."""
    img, depth, K = walk["img"], walk["depth"], walk["K"]
    truth = pose_mat_to_vec(walk["truth"])
    drift = {}
    for convention in ("reference", "exact"):
        vec = truth.clone().requires_grad_()
        opt = torch.optim.Adam([vec], lr=2e-3)
        for _ in range(40):
            m = pairwise_maps(
                img[:-1], img[1:], depth[:-1], depth[1:], vec, K, convention=convention
            )
            opt.zero_grad()
            mean_on_mask(m.photo, m.valid).backward()
            opt.step()
        drift[convention] = (vec.detach() - truth)[:, :3]
    ref, exact = drift["reference"], drift["exact"]
    t_true = truth[:, :3].norm(dim=1).mean()
    figures = {k: v.numpy().round(4).tolist() for k, v in drift.items()} | {"|t|": float(t_true)}
    learning_record["min ref z drift / |t| (> 0.2)"] = float(ref[:, 2].min() / t_true)
    learning_record["min ref z / max ref |xy| (> 2)"] = float(
        (ref[:, 2] / ref[:, :2].abs().max(dim=1).values).min()
    )
    learning_record["max exact drift / min ref z (< 0.5)"] = float(
        exact.norm(dim=1).max() / ref[:, 2].min()
    )
    # Every pair moves forward, by a sizeable fraction of the true motion ...
    assert (ref[:, 2] > 0.2 * t_true).all(), figures
    assert (ref[:, 2] > 2 * ref[:, :2].abs().max(dim=1).values).all(), figures
    # ... while under the exact convention every pair moves less than half as far.
    assert exact.norm(dim=1).max() < 0.5 * ref[:, 2].min(), figures


# ----------------------------------------------------------------------------------- smoothness


def test_smoothness_hand_values_and_scale_invariance():
    depth = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=D64)
    flat = torch.zeros(1, 3, 2, 2, dtype=D64)
    # d = D / 2.5: |dx| = 0.4, |dy| = 0.8, no image edges.
    assert smoothness_loss(depth, flat).item() == pytest.approx(0.4 + 0.8, rel=1e-6)
    ramp = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=D64).expand(1, 3, 2, 2)
    # An image step of 1 across x damps the x term by exp(-1).
    assert smoothness_loss(depth, ramp).item() == pytest.approx(0.4 * math.exp(-1) + 0.8, rel=1e-6)
    g = torch.Generator().manual_seed(6)
    d = 1 + torch.rand(2, 1, 8, 9, generator=g, dtype=D64)
    im = torch.randn(2, 3, 8, 9, generator=g, dtype=D64)
    torch.testing.assert_close(smoothness_loss(7.0 * d, im), smoothness_loss(d, im))


# -------------------------------------------------------------------------------------- ARN


def test_arn_losses_hand_values():
    r1 = [torch.tensor([[0.1, -0.2, 0.0]]), torch.tensor([[0.0, 0.0, 0.3]])]
    r2 = [torch.tensor([[0.05, 0.3, 0.0]]), torch.tensor([[0.0, 0.0, -0.1]])]
    r3 = [torch.tensor([[0.1, 0.1, 0.1]]), torch.zeros(1, 3)]
    g = [torch.tensor([[0.0, 0.0, 0.1]]), torch.zeros(1, 3)]
    out = arn_losses(r1, r2, r3, g)
    # rot_t: max(0, |r2| - |r1| + 0.05) = [0, 0.15, 0.05] and [0.05, 0.05, 0] over 6 entries.
    assert out["rot_t"].item() == pytest.approx(0.3 / 6)
    assert out["rot_c"].item() == pytest.approx(0.2 / 6)
    assert out["rot_before"].item() == pytest.approx(0.6 / 6)
    assert out["rot_after"].item() == pytest.approx(0.45 / 6)
    stacked = arn_losses(torch.stack(r1), torch.stack(r2), torch.stack(r3), torch.stack(g))
    assert stacked["rot_t"].item() == pytest.approx(0.3 / 6)


def test_rot_consistency_target_branches():
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(2, 3, 12, 16, generator=g, dtype=D64)
    K = torch.tensor([[15.0, 0, 7.5], [0, 15.0, 5.5], [0, 0, 1]], dtype=D64)
    r1 = torch.full((2, 3), 0.05, dtype=D64, requires_grad=True)
    rect = rotation_warp(ref, r1, K)
    # 0.02 < mean |r1| < 0.1: r1 and its rectified frame, detached.
    target, q = rot_consistency_target(r1, rect, ref, K)
    torch.testing.assert_close(target, r1.detach())
    torch.testing.assert_close(q, rect.detach())
    assert not target.requires_grad and not q.requires_grad
    # The rule looks at mean |r1|: negative angles of the same size keep r1 too.
    target, _ = rot_consistency_target(-r1, rect, ref, K)
    torch.testing.assert_close(target, -r1.detach())
    # Outside (0.02, 0.1): U(-0.05, 0.05) draws, and Q = ref warped by them.
    for value in (0.0, 0.01, 0.125):
        small = torch.full((2, 3), value, dtype=D64)
        target, q = rot_consistency_target(
            small, rect, ref, K, generator=torch.Generator().manual_seed(8)
        )
        assert target.shape == (2, 3) and target.abs().max() <= 0.05
        assert not torch.allclose(target, small)
        torch.testing.assert_close(q, rotation_warp(ref, target, K))
    again, _ = rot_consistency_target(
        small, rect, ref, K, generator=torch.Generator().manual_seed(8)
    )
    torch.testing.assert_close(again, target)


# ---------------------------------------------------------------------------------- weights


def test_total_loss_weights_head_and_release():
    assert LOSS_WEIGHTS["head"] == {
        "photo": 1.0,
        "geometry": 0.1,
        "smooth": 0.1,
        "rot_c": 1.0,
        "rot_t": 1.0,
    }
    assert LOSS_WEIGHTS["release"] == {
        "photo": 1.0, "geometry": 0.5, "smooth": 0.1, "rot_c": 0.1, "rot_t": 0.5,
    }  # fmt: skip
    terms = {
        k: torch.tensor(v, dtype=D64)
        for k, v in zip(
            ["photo", "geometry", "smooth", "rot_c", "rot_t"],
            [1.0, 2.0, 3.0, 5.0, 7.0],
            strict=True,
        )
    }
    terms["rot_before"] = torch.tensor(100.0)  # logged only, never weighted
    assert total_loss(terms).item() == pytest.approx(1 + 0.2 + 0.3 + 5 + 7)
    assert total_loss(terms, "release").item() == pytest.approx(1 + 1.0 + 0.3 + 0.5 + 3.5)
    assert total_loss(terms, {"photo": 2.0}).item() == pytest.approx(2.0)
    # float32 zero from mean_on_mask next to float64 terms promotes.
    mixed = {"photo": torch.tensor(0.0), "geometry": torch.tensor(1.0, dtype=D64)}
    assert total_loss(mixed).dtype == D64
    with pytest.raises(ConfigError, match="weights"):
        total_loss(terms, "paper")


def test_v2_losses_include_arn_terms_and_weights():
    img, depth, K = flat_scene()
    g = torch.Generator().manual_seed(9)
    ref = img + 0.2 * torch.randn(img.shape, generator=g, dtype=D64)
    pose = torch.tensor([[0.02, 0.0, 0.01, 0.0, 0.01, 0.0]], dtype=D64)
    r = [torch.rand(1, 3, generator=g, dtype=D64) * 0.1 for _ in range(4)]
    common = (img, [ref], depth, [depth], K, [pose], [-pose])
    head = sc_depth_v2_losses(*common, rot1=[r[0]], rot2=[r[1]], rot3=[r[2]], rot_target=[r[3]])
    assert {"photo", "geometry", "smooth", "rot_c", "rot_t", "total"} <= set(head)
    torch.testing.assert_close(head["total"], total_loss(head, "head"))
    release = sc_depth_v2_losses(
        *common, rot1=[r[0]], rot2=[r[1]], rot3=[r[2]], rot_target=[r[3]], weights="release"
    )
    want = (
        head["photo"] + 0.5 * head["geometry"] + 0.1 * head["smooth"]
        + 0.1 * head["rot_c"] + 0.5 * head["rot_t"]
    )  # fmt: skip
    torch.testing.assert_close(release["total"], want)
    with pytest.raises(ConfigError, match="rot"):
        sc_depth_v2_losses(*common, rot1=[r[0]])
