"""SC-DepthV3 losses: normals, dynamic mask, L_nm, L_mr, L_nr and the v3 total (spec 3.6, 4.6-4.10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mesadepth.data.synthetic import (
    build_scene,
    hand_held_trajectory,
    nyu_intrinsics,
    render_frame,
    room_size,
    scene_rng,
)
from mesadepth.errors import ConfigError
from mesadepth.geometry import depth_to_normals
from mesadepth.losses.photometric import PairwiseMaps, photo_and_geometry_loss
from mesadepth.losses.supervised import (
    V3_LOSS_WEIGHTS,
    RankingPairs,
    confident_ranking_loss,
    dynamic_mask,
    edge_aware_normal_loss,
    edge_guided_pairs,
    global_pairs,
    guidance_edge_maps,
    mask_guided_pairs,
    normal_edge_maps,
    normal_matching_loss,
    pair_normal_terms,
    ranking_labels,
    ranking_loss,
    sc_depth_v3_losses,
    sobel_edge_maps,
    unreliable_mask,
)

D64 = torch.float64
H, W = 48, 64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pinhole(h: int, w: int, f: float = 50.0) -> torch.Tensor:
    return torch.tensor([[f, 0.0, (w - 1) / 2], [0.0, f, (h - 1) / 2], [0.0, 0.0, 1.0]], dtype=D64)


def tilted_plane(h: int, w: int, K: torch.Tensor, alpha: float, d: float = 2.0) -> torch.Tensor:
    """Depth of the plane n.X = d, n = (sin a, 0, cos a): D = d / (n . K^-1 (u, v, 1))."""
    u = torch.arange(w, dtype=D64).expand(h, w)
    x = (u - K[0, 2]) / K[0, 0]
    return (d / (math.sin(alpha) * x + math.cos(alpha)))[None, None]


@pytest.fixture(scope="module")
def video() -> dict:
    """Frames i-3, i, i+3 of a rendered hand-held walk: normalised images, exact depth, poses."""
    rng = scene_rng(0, "nyu", "video", 0)
    size = room_size(rng, "nyu", "office")
    poses = hand_held_trajectory(rng, size, 7, 0.1, 2.0)
    scene = build_scene(rng, "nyu", "office", size, poses[:, :3, 3])
    K = nyu_intrinsics(W, H)
    frames = [render_frame(scene, K, poses[i], H, W, supersample=2) for i in (0, 3, 6)]
    c2w = [torch.from_numpy(p) for p in poses[[0, 3, 6]]]

    def rel(t: int, s: int) -> torch.Tensor:  # target -> source: inv(pose_s) @ pose_t
        return (torch.linalg.inv(c2w[s]) @ c2w[t])[None]

    def norm(rgb: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(rgb).permute(2, 0, 1)[None].to(D64) / 255 - 0.45) / 0.225

    return {
        "img": [norm(f["rgb"]) for f in frames],
        "depth": [torch.from_numpy(f["depth"])[None, None].to(D64) for f in frames],
        "K": torch.from_numpy(K),
        "poses": [rel(1, 0), rel(1, 2)],
        "poses_inv": [rel(0, 1), rel(2, 1)],
    }


def v3_inputs(video: dict, pseudo_scale: float = 60000.0) -> dict:
    depth = video["depth"]
    return dict(
        target=video["img"][1],
        refs=[video["img"][0], video["img"][2]],
        target_depth=depth[1].clone().requires_grad_(),
        ref_depths=[depth[0], depth[2]],
        K=video["K"],
        poses=video["poses"],
        poses_inv=video["poses_inv"],
        pseudo_depth=(depth[1] / depth[1].max() * pseudo_scale).round(),
    )


# ------------------------------------------------------------------------- normals (spec 3.6)


def numpy_normals(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Spec 3.6 written out independently: replicate pad, Sobel / 8, cross, max(|n|, 1e-12)."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)]) * depth
    p = np.pad(pts, ((0, 0), (1, 1), (1, 1)), mode="edge")
    sx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8.0
    gx = sum(sx[i, j] * p[:, i : i + h, j : j + w] for i in range(3) for j in range(3))
    gy = sum(sx.T[i, j] * p[:, i : i + h, j : j + w] for i in range(3) for j in range(3))
    n = np.cross(gx, gy, axis=0)
    return n / np.maximum(np.linalg.norm(n, axis=0), 1e-12)


def test_depth_to_normals_matches_spec_3_6_including_borders_and_the_zero_clamp():
    rng = np.random.default_rng(0)
    depth = 1.0 + rng.random((7, 9))
    K = pinhole(7, 9, 5.0).numpy()
    got = depth_to_normals(torch.from_numpy(depth)[None, None], torch.from_numpy(K))[0].numpy()
    np.testing.assert_allclose(got, numpy_normals(depth, K), atol=1e-12)
    # Zero depth: n = 0 and the 1e-12 clamp gives 0 instead of NaN.
    zero = depth_to_normals(torch.zeros(1, 1, 4, 5, dtype=D64), torch.from_numpy(K))
    assert torch.equal(zero, torch.zeros_like(zero))


def test_plane_normals_are_exact_everywhere_and_point_away_from_the_camera():
    K = pinhole(12, 16)
    flat = depth_to_normals(torch.full((1, 1, 12, 16), 3.0, dtype=D64), K)
    torch.testing.assert_close(
        flat, torch.tensor([0.0, 0, 1], dtype=D64).view(1, 3, 1, 1).expand_as(flat)
    )
    # Sobel weights sum to zero, so on a plane both derivatives lie in it (padding included).
    alpha = 0.4
    tilted = depth_to_normals(tilted_plane(12, 16, K, alpha), K)
    n = torch.tensor([math.sin(alpha), 0, math.cos(alpha)], dtype=D64).view(1, 3, 1, 1)
    torch.testing.assert_close(tilted, n.expand_as(tilted), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------ normal matching (4.7)


def test_normal_matching_is_zero_for_a_match_and_known_for_a_tilted_plane():
    K = pinhole(12, 16)
    plane = tilted_plane(12, 16, K, 0.4)
    same = normal_matching_loss(depth_to_normals(plane, K), depth_to_normals(7.0 * plane, K))
    assert same.item() < 1e-12
    alpha = 0.3
    front = depth_to_normals(torch.full((1, 1, 12, 16), 2.0, dtype=D64), K)
    tilt = depth_to_normals(tilted_plane(12, 16, K, alpha), K)
    # mean over 3 channels of |(0, 0, 1) - (sin a, 0, cos a)|.
    expected = (math.sin(alpha) + 1 - math.cos(alpha)) / 3
    assert normal_matching_loss(front, tilt).item() == pytest.approx(expected, abs=1e-12)


def test_normal_matching_is_invariant_to_scaling_both_depths():
    K = pinhole(10, 12, 8.0)
    a = 1 + torch.rand(2, 1, 10, 12, generator=gen(0), dtype=D64)
    b = 1 + torch.rand(2, 1, 10, 12, generator=gen(1), dtype=D64)

    def l_nm(s: float) -> float:
        return normal_matching_loss(depth_to_normals(s * a, K), depth_to_normals(s * b, K)).item()

    assert l_nm(1.0) > 0.1
    assert l_nm(3.7) == pytest.approx(l_nm(1.0), rel=1e-12)
    assert l_nm(1e-3) == pytest.approx(l_nm(1.0), rel=1e-12)


# ---------------------------------------------------------------------- dynamic mask (4.6)


def maps(depth_diff: list, valid: list) -> PairwiseMaps:
    e = torch.tensor(depth_diff, dtype=D64).view(1, 1, 2, 2).requires_grad_()
    v = torch.tensor(valid, dtype=D64).view(1, 1, 2, 2)
    return PairwiseMaps(torch.zeros_like(v), torch.zeros_like(v), e, v)


def test_dynamic_mask_hand_case_leaves_the_maps_untouched():
    m1 = maps([[0.2, 0.5], [1.0, 0.1]], [[1, 0], [1, 1]])
    m2 = maps([[0.4, 0.3], [0.0, 0.7]], [[1, 1], [0, 1]])
    before = [m1.depth_diff.detach().clone(), m2.depth_diff.detach().clone()]
    m = dynamic_mask([m1, m2])
    # mean_j (1 - E_d [V >= 1]): E_d counts only where V = 1.
    expected = torch.tensor([[0.7, 0.85], [0.5, 0.6]], dtype=D64).view(1, 1, 2, 2)
    torch.testing.assert_close(m, expected)
    assert not m.requires_grad
    # An explicit copy: the maps (and any L_geo computed from them) keep E_d (pitfall 19).
    assert torch.equal(m1.depth_diff, before[0]) and torch.equal(m2.depth_diff, before[1])
    assert dynamic_mask([m1, m2], detach=False).requires_grad
    with pytest.raises(ConfigError, match="forward"):
        dynamic_mask([])


def test_dynamic_mask_of_a_static_scene_is_all_ones(video):
    img, depth = video["img"][1], video["depth"][1]
    eye = torch.eye(4, dtype=D64)[None]
    pg = photo_and_geometry_loss(
        img, [img, img], depth, [depth, depth], video["K"], [eye] * 2, [eye] * 2
    )
    # Identical frames: the auto-mask rejects every pixel, so every M_j = 1 (spec 4.3, 4.6).
    m = dynamic_mask(pg.maps[0::2])
    assert torch.equal(m, torch.ones_like(m))
    assert pg.photo.item() == 0 and pg.geometry.item() == 0


def test_dynamic_mask_flags_an_inconsistent_object_as_unreliable(video):
    depth = video["depth"][1].clone()
    depth[..., 20:32, 26:38] *= 1.5  # an "object" whose depth the references contradict
    pg = photo_and_geometry_loss(
        video["img"][1],
        [video["img"][0], video["img"][2]],
        depth,
        [video["depth"][0], video["depth"][2]],
        video["K"],
        video["poses"],
        video["poses_inv"],
    )
    m = dynamic_mask(pg.maps[0::2])
    patch = torch.zeros_like(m, dtype=torch.bool)
    patch[..., 20:32, 26:38] = True
    assert m[patch].mean() < 0.9 and m[~patch].mean() > 0.98
    assert unreliable_mask(m)[patch].float().mean() > 0.8


# ------------------------------------------------------------------------ ranking loss (4.8)


def test_ranking_labels_follow_the_two_rules_exactly_in_float32():
    a = torch.tensor([23.0, 20.0, 30.0, 20.0, 0.0, 5.0, 0.0, 7.0])
    b = torch.tensor([20.0, 23.0, 20.0, 30.0, 5.0, 0.0, 0.0, 7.0])
    # 23 / 20 is exactly 1 + 0.15 in float32: ">=" labels it, ">" does not (pitfall 23).
    mask_rule = ranking_labels(a, b, inclusive=True)
    global_rule = ranking_labels(a, b, inclusive=False)
    assert mask_rule.tolist() == [1, 0, 1, -1, -1, 1, 0, 0]
    assert global_rule.tolist() == [0, 0, 1, -1, -1, 1, 0, 0]
    assert mask_rule.dtype == torch.float32


def test_ranking_loss_hand_value_gradient_and_numerics():
    pred = torch.tensor([2.0, 1.0, 4.0, 0.5], dtype=D64).view(1, 1, 1, 4).requires_grad_()
    s1 = RankingPairs(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), torch.tensor([1.0, -1, 0]))
    s2 = RankingPairs(torch.tensor([3]), torch.tensor([0]), torch.tensor([-1.0]))
    loss = ranking_loss(pred, [s1, s2])
    # log(1 + exp(-t (D_a - D_b))) over t != 0: x = -1, -3, -1.5; divided by 3 pairs.
    terms = [math.log1p(math.exp(x)) for x in (-1.0, -3.0, -1.5)]
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-14)
    loss.backward()
    sig = [1 / (1 + math.exp(-x)) for x in (-1.0, -3.0, -1.5)]
    # d/dD_a = -t sigmoid(x) / n, d/dD_b = +t sigmoid(x) / n.
    grad = [(-sig[0] - sig[2]) / 3, (sig[0] + sig[1]) / 3, -sig[1] / 3, sig[2] / 3]
    torch.testing.assert_close(pred.grad.view(-1), torch.tensor(grad, dtype=D64))

    # Reference numerics overflow in float32 and divide by zero; "safe" does neither.
    far = torch.tensor([0.0, 100.0]).view(1, 1, 1, 2)
    one = [RankingPairs(torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))]
    assert math.isinf(ranking_loss(far, one).item())
    assert ranking_loss(far, one, numerics="safe").item() == pytest.approx(100.0)
    none = [RankingPairs(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.0]))]
    assert math.isnan(ranking_loss(far, none).item())
    p = far.clone().requires_grad_()
    zero = ranking_loss(p, none, numerics="safe")
    zero.backward()
    assert zero.item() == 0 and torch.equal(p.grad, torch.zeros_like(p))
    with pytest.raises(ConfigError, match="safe"):
        ranking_loss(far, one, numerics="fast")


def test_unreliable_set_is_the_lowest_twenty_percent_per_image():
    m = torch.rand(3, 1, 7, 5, generator=gen(0))
    u = unreliable_mask(m)
    k = int(0.2 * 7 * 5)  # 7
    assert u.sum((1, 2, 3)).tolist() == [k] * 3
    expected = torch.zeros(3, 35, dtype=torch.bool)
    expected.scatter_(1, m.view(3, -1).topk(k, largest=False).indices, True)
    assert torch.equal(u.view(3, -1), expected)
    # Ties: the stable option takes them in raster order; 2x2 images have no unreliable pixel.
    ties = unreliable_mask(torch.ones(1, 1, 2, 10), stable_sort=True)
    assert ties.view(-1).nonzero().view(-1).tolist() == [0, 1, 2, 3]
    assert not unreliable_mask(torch.rand(2, 1, 2, 2, generator=gen(1))).any()


def oracle_ranking_loss(pred, pseudo, m, seed: int) -> float:
    """Spec 4.8 with plain loops, drawing the documented sequence: randint, rand, randperm."""
    b, _, h, w = pred.shape
    hw, k = h * w, int(0.2 * h * w)
    g = gen(seed)
    draw = torch.randint(0, hw - k, (b, k), generator=g).tolist()
    u = torch.rand(1, h, w, generator=g).view(-1).numpy()
    perm = torch.randperm(hw, generator=g).tolist()
    P = pseudo.view(b, hw).numpy().astype(np.float32)
    D = pred.view(b, hw).tolist()
    theta = np.float32(1.15)
    total, count = 0.0, 0
    for i in range(b):
        order = sorted(range(hw), key=lambda p: float(m.view(b, hw)[i, p]))
        low = sorted(order[:k])
        rel = [p for p in range(hw) if p not in low]
        pairs = [(a, rel[draw[i][j]], True) for j, a in enumerate(low)]
        sel_a = [p for p in range(hw) if u[p] >= np.float32(0.9)]
        sel_b = [p for p in range(hw) if u[perm[p]] >= np.float32(0.9)]
        pairs += [(a, c, False) for a, c in zip(sel_a, sel_b, strict=True)]
        for a, c, inclusive in pairs:
            pa, pc = P[i, a], P[i, c]
            if not inclusive and not (pa > 1e-8 or pc > 1e-8):
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                up, down = pa / pc, pc / pa
            t = -1 if down > theta else (1 if (up >= theta if inclusive else up > theta) else 0)
            if t:
                total += math.log1p(math.exp(-t * (D[i][a] - D[i][c])))
                count += 1
    return total / count


def test_confident_ranking_loss_equals_a_loop_oracle_on_a_one_row_case():
    b, h, w = 2, 1, 40
    pred = 2 + torch.rand(b, 1, h, w, generator=gen(0))
    # Integers give exact ratio hits (e.g. 23 / 20) and a zero exercises the global filter.
    pseudo = torch.randint(0, 30, (b, 1, h, w), generator=gen(1)).float()
    m = torch.rand(b, 1, h, w, generator=gen(2))
    got = confident_ranking_loss(pred, pseudo, m, generator=gen(7))
    assert got.item() == pytest.approx(oracle_ranking_loss(pred, pseudo, m, 7), rel=1e-6)


def test_pair_samplers_structure():
    pseudo = 1 + torch.rand(2, 1, 10, 12, generator=gen(0))
    m = torch.rand(2, 1, 10, 12, generator=gen(1))
    unrel = unreliable_mask(m)
    guided = mask_guided_pairs(pseudo, unrel, generator=gen(2))
    flat_u = unrel.view(-1)
    # a runs over the unreliable pixels in raster order; b is reliable and in the same image.
    assert torch.equal(guided.a, flat_u.nonzero().view(-1))
    assert not flat_u[guided.b].any() and torch.equal(guided.a // 120, guided.b // 120)
    # Global pairs: one pattern for the batch; B is a permutation of A (same count).
    same = pseudo[:1].expand(2, 1, 10, 12).contiguous()
    glob = global_pairs(same, generator=gen(3))
    img0, img1 = glob.a < 120, glob.a >= 120
    assert torch.equal(glob.a[img0] + 120, glob.a[img1]) and torch.equal(
        glob.b[img0] + 120, glob.b[img1]
    )
    assert glob.a.numel() > 0 and glob.a.unique().numel() == glob.b.unique().numel()
    with pytest.raises(ConfigError, match="same number"):
        mask_guided_pairs(pseudo, torch.rand(2, 1, 10, 12, generator=gen(4)) < 0.5)


def test_samplers_use_the_inclusive_and_the_strict_rule_respectively():
    m = torch.tensor([1.0, 1, 0, 1, 1]).view(1, 1, 1, 5)
    far = torch.tensor([20.0, 20, 23, 20, 20]).view(1, 1, 1, 5)
    guided = mask_guided_pairs(far, unreliable_mask(m), generator=gen(0))
    assert guided.a.tolist() == [2] and guided.label.tolist() == [1.0]  # 23 / 20 >= 1.15
    near = torch.tensor([23.0, 23, 20, 23, 23]).view(1, 1, 1, 5)
    assert mask_guided_pairs(near, unreliable_mask(m), generator=gen(0)).label.tolist() == [0.0]
    checker = 20.0 + 3.0 * (torch.arange(400).view(1, 1, 20, 20) % 2)
    glob = global_pairs(checker, generator=gen(1))
    assert (checker.view(-1)[glob.a] != checker.view(-1)[glob.b]).any()
    assert not glob.label.any()  # 23 / 20 is not > 1.15 in float32


def test_confident_ranking_loss_scale_invariance_determinism_and_gradients():
    pred = (1 + torch.rand(2, 1, 16, 20, generator=gen(0))).requires_grad_()
    pseudo = (1 + torch.rand(2, 1, 16, 20, generator=gen(1))).requires_grad_()
    m = torch.rand(2, 1, 16, 20, generator=gen(2))
    base = confident_ranking_loss(pred, pseudo, m, generator=gen(5))
    for s in (8.0, 37.3, 1e-3):
        scaled = confident_ranking_loss(pred, s * pseudo, m, generator=gen(5))
        assert scaled.item() == pytest.approx(base.item(), rel=1e-6)
    assert torch.equal(base, confident_ranking_loss(pred, pseudo, m, generator=gen(5)))
    assert base.item() != confident_ranking_loss(pred, pseudo, m, generator=gen(6)).item()
    # Not invariant to the prediction's scale: raw depth differences (pitfall 23).
    assert confident_ranking_loss(3 * pred, pseudo, m, generator=gen(5)).item() != pytest.approx(
        base.item(), rel=1e-3
    )
    base.backward()
    assert pred.grad.abs().sum() > 0 and pseudo.grad is None


# -------------------------------------------------------------------- edge maps (4.9)


def test_sobel_edge_maps_of_step_images():
    img = torch.rand(1, 3, 6, 8, generator=gen(0), dtype=D64)
    img[:, 0] = 0.0
    img[:, 0, :, 4:] = 1.0  # a vertical step in R; G and B are noise and must be ignored
    e, th = sobel_edge_maps(img)
    expected = torch.zeros(6, 8, dtype=D64)
    expected[1:5, 3:5] = 4.0  # |(1 + 2 + 1) * (I(c+1) - I(c-1))|, zero-padded ring
    torch.testing.assert_close(e[0, 0], expected)
    assert torch.equal(th, torch.zeros_like(th))
    horiz = torch.zeros(1, 1, 6, 8, dtype=D64)
    horiz[..., 3:, :] = 1.0  # brighter below: g_y = I(r-1) - I(r+1) < 0 with S2
    e, th = sobel_edge_maps(horiz)
    expected = torch.zeros(6, 8, dtype=D64)
    expected[2:4, 1:7] = 4.0
    torch.testing.assert_close(e[0, 0], expected)
    torch.testing.assert_close(th[0, 0, 2:4, 1:7], torch.full((2, 6), -math.pi / 2, dtype=D64))


def test_normal_edge_map_of_a_normal_step():
    n = torch.zeros(1, 3, 6, 8, dtype=D64)
    n[:, 2, :, :4] = 1.0
    n[:, :, :, 4:] = torch.tensor([0.6, 0.0, 0.8], dtype=D64).view(1, 3, 1, 1)
    e, th = normal_edge_maps(n)
    expected = torch.zeros(6, 8, dtype=D64)
    expected[1:5, 3:5] = (4 * 0.6 + 0 + 4 * 0.2) / 3  # mean over channels of |4 (v_c - u_c)|
    torch.testing.assert_close(e[0, 0], expected)
    # On the edge the angle is 0; elsewhere it is the angle of ~1e-16 convolution residues.
    torch.testing.assert_close(th[0, 0, 1:5, 3:5], torch.zeros(4, 2, dtype=D64), atol=1e-12, rtol=0)


def test_guidance_edges_drop_the_border_and_the_batch_wide_depth_edges():
    b, h, w = 2, 16, 24
    img = torch.zeros(b, 3, h, w, dtype=D64)
    img[:, 0, :, 10:] = 1.0
    normals = torch.zeros(b, 3, h, w, dtype=D64)
    normals[:, 2] = 1.0
    normals[:, :, :, 10:] = torch.tensor([0.6, 0.0, 0.8], dtype=D64).view(1, 3, 1, 1)
    pseudo = torch.ones(b, 1, h, w, dtype=D64)
    pseudo[0, :, :, 10:] = 11.0  # strong depth step in image 0 (edge 40)
    pseudo[1, :, :, 10:] = 1.5  # weak one in image 1 (edge 2 < 0.1 x batch max 40)
    edges, _ = guidance_edge_maps(pseudo, img, normals)
    assert edges.shape == (b, 2, h, w)
    # Image 0: depth edges at columns 9, 10, dilated to 8..11: every edge there is dropped.
    assert edges[0].abs().max() < 1e-12
    # Image 1 keeps its image edges (rows 1..14) and its normal edges off the 5 px border.
    e_img, e_n = edges[1, 0], edges[1, 1]
    assert torch.equal(e_img[1:-1, 9:11], torch.full((h - 2, 2), 4.0, dtype=D64))
    assert (e_img > 1e-12).sum() == (h - 2) * 2
    torch.testing.assert_close(e_n[5:-5, 9:11], torch.full((h - 10, 2), 3.2 / 3, dtype=D64))
    assert (e_n > 1e-12).sum() == (h - 10) * 2


# ------------------------------------------------------------ edge-guided sampling (4.9)


def single_edge_maps(n: int, h: int, w: int, theta: float, r: int, c: int):
    edges = torch.zeros(n, h, w, dtype=D64)
    edges[:, r, c] = 1.0
    return edges, torch.full((n, h, w), theta, dtype=D64)


def test_edge_guided_pairs_along_the_gradient_with_distances_3_to_19():
    n, h, w, r, c = 300, 15, 41, 7, 20
    pairs = edge_guided_pairs(*single_edge_maps(n, h, w, 0.0, r, c), generator=gen(0))
    assert pairs.a.numel() == 3 * n  # one anchor per edge pixel, three pairs per anchor
    q = torch.stack([pairs.a[:n], pairs.b[:n], pairs.b[n : 2 * n], pairs.b[2 * n :]])
    assert torch.equal(pairs.a[n : 2 * n], q[1]) and torch.equal(pairs.a[2 * n :], q[2])
    assert torch.equal(pairs.group, torch.arange(n).repeat(3))
    assert torch.equal(q // w, torch.full_like(q, r))  # theta = 0: along the row only
    offsets = q % w - c
    assert set(offsets[:2].unique().tolist()) == set(range(-19, -2))
    assert set(offsets[2:].unique().tolist()) == set(range(3, 20))
    # theta = pi/2: along the column; theta = pi/4: equal row and column steps.
    vert = edge_guided_pairs(*single_edge_maps(50, 41, 15, math.pi / 2, 20, 7), generator=gen(1))
    assert torch.equal(vert.a % 15, torch.full_like(vert.a, 7))
    diag = edge_guided_pairs(*single_edge_maps(50, 60, 60, math.pi / 4, 30, 30), generator=gen(2))
    for idx in (diag.a, diag.b):
        assert torch.equal(idx // 60 - 30, idx % 60 - 30)


def test_edge_guided_pairs_anchor_set_clamping_and_empty_maps():
    edges = torch.zeros(2, 5, 6, dtype=D64)
    edges[0, 1, 0] = 10.0
    edges[0, 3, 5] = 1.0  # exactly 0.1 x max: an edge
    edges[0, 2, 2] = 0.99  # below: not an edge
    # Map 1 is all zero: every pixel is an edge (pitfall 12).
    pairs = edge_guided_pairs(edges, torch.zeros_like(edges), generator=gen(0))
    assert torch.bincount(pairs.group).tolist() == [3 * 2, 3 * 30]
    first = torch.cat([pairs.a[pairs.group == 0], pairs.b[pairs.group == 0]])
    # Rows of anchors 1 and 3 only; columns clamped into [0, 5].
    assert set((first // 6).tolist()) <= {1, 3}
    assert first.min() >= 0 and (first % 6).max() <= 5
    # Anchors are drawn uniformly with replacement from the edge set.
    many = edge_guided_pairs(
        edges[:1].expand(400, 5, 6), torch.zeros(400, 5, 6, dtype=D64), generator=gen(1)
    )
    row1 = (many.a[:800] // 6 == 1).double().mean().item()
    assert 0.43 < row1 < 0.57


# ------------------------------------------------------------- relative normal loss (4.9)


def step_case(b: int = 1, h: int = 16, w: int = 40, c: int = 20):
    """Vertical steps at column c in the image and both normal maps, a depth bump far away."""
    img = torch.rand(b, 3, h, w, generator=gen(0), dtype=D64)
    img[:, 0] = 0.0
    img[:, 0, :, c:] = 1.0
    pseudo_n = torch.zeros(b, 3, h, w, dtype=D64)
    pseudo_n[:, 2] = 1.0
    pseudo_n[:, :, :, c:] = torch.tensor([1.0, 0.0, 1.0], dtype=D64).view(1, 3, 1, 1) / math.sqrt(2)
    pred_n = torch.zeros(b, 3, h, w, dtype=D64)
    pred_n[:, 2] = 1.0
    pred_n[:, :, :, c:] = torch.tensor([1.0, 0.0, 0.0], dtype=D64).view(1, 3, 1, 1)
    pseudo = torch.ones(b, 1, h, w, dtype=D64)
    pseudo[:, :, :2, :3] = 5.0  # depth edges only near the top-left corner
    return pseudo, img, pred_n, pseudo_n


def test_relative_normal_loss_exact_value_on_a_step():
    pseudo, img, pred_n, pseudo_n = step_case(b=2)
    # Every anchor sits on the step with theta = 0: (q1, q2) both left, (q2, q3) across,
    # (q3, q4) both right, for both samplers: terms 0, |1/sqrt2 - 0|, 0.
    for seed in (0, 1):
        loss = edge_aware_normal_loss(pseudo, img, pred_n, pseudo_n, generator=gen(seed))
        assert loss.dtype == D64
        assert loss.item() == pytest.approx(1 / math.sqrt(2) / 3, abs=1e-15)


def test_relative_normal_loss_float64_gradient_scale_invariance_and_determinism(video):
    img, depth, K = video["img"][1].float(), video["depth"][1].float(), video["K"].float()
    pred = (depth * (1 + 0.05 * torch.rand(depth.shape, generator=gen(0)))).requires_grad_()
    pseudo = (depth / depth.max() * 60000).round()
    pn = depth_to_normals(pseudo, K)

    def l_nr(p: torch.Tensor, seed: int) -> torch.Tensor:
        return edge_aware_normal_loss(p, img, depth_to_normals(pred, K), pn, generator=gen(seed))

    loss = l_nr(pseudo, 3)
    assert loss.dtype == D64 and 0 < loss.item() < 1  # float32 inputs, float64 arithmetic
    assert torch.equal(loss, l_nr(pseudo, 3)) and loss.item() != l_nr(pseudo, 4).item()
    # Depth edges are relative to the batch max: a power-of-two scale changes nothing.
    assert torch.equal(loss, l_nr(4.0 * pseudo, 3))
    loss.backward()
    assert pred.grad.abs().sum() > 0 and torch.isfinite(pred.grad).all()


def test_pair_normal_terms_hand_values():
    pred = torch.zeros(1, 3, 1, 3, dtype=torch.float32)
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    pred[0, :, 0, 1] = torch.tensor([0.0, 0.6, -0.8])
    pred[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    pseudo = pred.flip(-1)
    terms = pair_normal_terms(
        pred, pseudo, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1, 2])
    )
    # pred cosines |-0.8|, 0; pseudo (reversed columns) 0, |-0.8|.
    assert terms.dtype == D64
    torch.testing.assert_close(terms, torch.tensor([0.8, 0.8], dtype=D64), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------- v3 total (4.10)


def test_v3_total_terms_weights_and_static_scene(video):
    kw = v3_inputs(video)
    out = sc_depth_v3_losses(**kw, generator=gen(0))
    assert set(out) == {"photo", "geometry", "normal_matching", "mask_rank", "normal_rank", "total"}
    w = V3_LOSS_WEIGHTS["head"]
    expected = sum(w[k] * out[k] for k in w)
    assert out["total"].dtype == D64 and out["normal_rank"].dtype == D64
    torch.testing.assert_close(out["total"], expected)
    assert all(0 < out[k].item() < 1 for k in w)
    only = sc_depth_v3_losses(**kw, generator=gen(0), weights={"normal_matching": 2.0})
    assert only["total"].item() == pytest.approx(2 * out["normal_matching"].item())
    with pytest.raises(ConfigError, match="smooth"):
        sc_depth_v3_losses(**kw, weights={"smooth": 0.1})
    with pytest.raises(ConfigError, match="pseudo_depth"):
        sc_depth_v3_losses(**{**kw, "pseudo_depth": kw["pseudo_depth"][..., :-1]})
    # Static camera: L_photo = L_geo = 0, M_dyn = 1; the pseudo-depth terms remain.
    eye = torch.eye(4, dtype=D64)[None]
    args = {**kw, "refs": [kw["target"]] * 2, "ref_depths": [kw["target_depth"].detach()] * 2}
    args.update(poses=[eye] * 2, poses_inv=[eye] * 2)
    static = sc_depth_v3_losses(**args, generator=gen(0))
    assert static["photo"].item() == 0 and static["geometry"].item() == 0
    rest = 0.1 * (static["normal_matching"] + static["mask_rank"] + static["normal_rank"])
    assert static["total"].item() == pytest.approx(rest.item(), rel=1e-12)


def test_v3_determinism_gradients_and_pseudo_scale_invariance(video):
    kw = v3_inputs(video)
    kw["pseudo_depth"].requires_grad_()
    a = sc_depth_v3_losses(**kw, generator=gen(1))
    b = sc_depth_v3_losses(**kw, generator=gen(1))
    c = sc_depth_v3_losses(**kw, generator=gen(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["mask_rank"].item() != c["mask_rank"].item()
    assert a["normal_rank"].item() != c["normal_rank"].item()
    scaled = sc_depth_v3_losses(
        **{**kw, "pseudo_depth": 8.0 * kw["pseudo_depth"]}, generator=gen(1)
    )
    assert all(torch.equal(a[k], scaled[k]) for k in a)
    # The global RNG path (generator=None) repeats under torch.manual_seed as well.
    torch.manual_seed(11)
    d = sc_depth_v3_losses(**kw)
    torch.manual_seed(11)
    assert torch.equal(d["total"], sc_depth_v3_losses(**kw)["total"])
    a["total"].backward()
    grad = kw["target_depth"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert kw["pseudo_depth"].grad is None


# ------------------------------------------------------------------------------ learning check


@pytest.mark.learning(seed=0)
def test_ranking_and_normal_matching_recover_the_shape_of_a_rendered_scene(
    video, learning_seed, learning_record
):
    """A free depth map trained with L_mr + L_nm against scaled pseudo-depth approaches the
    scene up to scale. (Trained much longer, L_mr alone keeps stretching raw depth differences:
    in v3 the photometric terms anchor the scale.)"""
    gt, K = video["depth"][1], video["K"]
    pseudo = (gt / gt.max() * 60000).round()
    pseudo_n = depth_to_normals(pseudo, K)
    log_d = torch.full_like(gt, math.log(2.0)).requires_grad_()
    opt = torch.optim.Adam([log_d], lr=0.01)
    g, static = gen(learning_seed), torch.ones_like(gt)

    def si_error() -> float:
        diff = log_d.detach() - gt.log()
        return diff.var(unbiased=False).sqrt().item()

    start = si_error()
    for _ in range(100):
        d = log_d.exp()
        loss = confident_ranking_loss(d, pseudo, static, generator=g) + normal_matching_loss(
            depth_to_normals(d, K), pseudo_n
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    learning_record["si error end/start (< 0.6)"] = si_error() / start
    assert start > 0.15
    assert si_error() < 0.6 * start, (start, si_error())
