"""The GP (SC-DepthV2) and SP (SC-DepthV3) loss computation alone, against straightforward versions.

    python benchmarks/losses.py                        # every row
    python benchmarks/losses.py --threads 1            # single-threaded CPU figures
    python benchmarks/losses.py --threads 1 --clock cpu  # CPU time: steadier on a busy machine
    python benchmarks/losses.py --only sp --repeats 10
    python benchmarks/losses.py --device cuda --skip-paper
    OMP_WAIT_POLICY=PASSIVE python benchmarks/losses.py --threads 2 --sizes nyu --repeats 7

Times the loss computation of one batch, nothing else (no network), for the project's functions
and for a straightforward implementation written here from the spec
(geometric-and-supervised-pretraining.md sections 3 and 4), and prints the ratio
straightforward / ours. Before any timing both run on the batch and every loss term must agree
to 1e-5 relative (an AssertionError otherwise), so the ratio compares the same work: once on a
float64 copy of the batch and once on the float32 batch that is timed; both largest absolute
differences are printed. The plain warp rounds exactly like the project's (the same grid
normalisation; R_x R_y R_z as a matrix product rounds like the project's written-out product,
bit for bit on CPU): with any ulp-level difference, a few of the ~10^6 strict mask tests
(auto-mask ``<`` with its exact ties, validity ``> 1e-3``) flip at 480x480 and move L_photo or
L_geo by ~1e-5 relative. The v3 normals do differ by ulps in float32 (index arithmetic versus
the project's convolution); when that moves an edge pixel across L_nr's 10 % threshold (it
happens at 480x480), the random draws no longer line up (below), and the float32 check then
leaves out L_nr and the total ("L_nr not compared"); the float64 check always compares every
term.

Groups (``--only``):

- ``gp``: :func:`mesadepth.losses.photometric.sc_depth_v2_losses` (inverse warps, SSIM,
  validity, auto-mask, weight mask, view selection, L_photo, L_geo, smoothness, ARN terms)
  against a term-by-term version: per pair and per direction, the image and the depth warped by
  two separate calls of a plain inverse warp, SSIM with its own pooling calls, the auto-mask's
  identity error from its own colour-error call, one ``mean_on_mask`` per term.
- ``sp``: two rows. ``v3 terms``: the SC-DepthV3 terms alone from a given M_dyn (normals of D_t
  and P_t, L_nm, L_mr, L_nr: :func:`mesadepth.geometry.depth_to_normals`,
  :func:`~mesadepth.losses.supervised.normal_matching_loss`,
  :func:`~mesadepth.losses.supervised.confident_ranking_loss`,
  :func:`~mesadepth.losses.supervised.edge_aware_normal_loss`); ``all v3``:
  :func:`~mesadepth.losses.supervised.sc_depth_v3_losses` (photometric + geometry + dynamic mask
  + the v3 terms). The straightforward version loops over the batch as the reference does:
  per image, normals from each pixel's 3x3 neighbourhood by explicit (clamped) index arithmetic
  (vectorised over the pixels of that image: a Python loop over pixels would time the
  interpreter, not the algorithm, and could not run backward at 480x480), the unreliable set,
  pairs and labels of L_mr, the edge maps, edge-guided pairs and relative-normal terms of L_nr.

Random sampling. L_mr and L_nr draw random numbers. Ours gets a CPU generator seeded 0 (drawing
is part of its timed work); the straightforward version gets the same numbers drawn beforehand
by the same calls in the same order (``randint`` (B, k), ``rand`` (1, H, W), ``randperm``, then
float64 ``rand`` (N) and ``randint`` (4, N), as in ``mask_guided_pairs``, ``global_pairs`` and
``edge_guided_pairs``; N, the anchor count, from the project's ``guidance_edge_maps``), and turns
them into pixels itself. If its own anchor counts differ (the float32 case above), it draws for
its own counts instead: the same work, other L_nr pairs. Both use ``stable_sort=True`` for the
20 % unreliable set, so ties at the boundary cannot split differently between a batched and a
per-image sort.

Sizes: ``demo`` = batch 4 at 96x128, 3-frame snippets (target + 2 references), the demo
configuration; ``nyu`` = batch 4 at 256x320 (SC-Depth's NYU training resolution; the size of
the speed goal of issue 19: both GP and SP at <= 0.5x the straightforward version's time,
forward + backward, 2 CPU threads); ``paper`` = batch 2 at 480x480 (the paper's per-GPU shape,
doubled); ``--sizes`` picks some. A row's
repeats shrink so that it stays within ``--budget`` seconds; if one straightforward pass alone
exceeds the budget, its columns read "skipped".

Columns: ms per call of ours and of the straightforward version, forward only (autograd
recording, as in training) and forward + backward (gradients of the total to every input that
carries one in training: depths, poses, v2's rectified references and ARN rotations); ratios
straightforward / ours; repeats; the largest absolute difference over the loss terms, float32
and float64. Each time is the best of the repeats after warm-up passes (on a shared machine the
least disturbed call is the steadiest estimate); the four timed cells of a row run interleaved
call by call, so both sides see the same load; the clock is the wall clock or, with
``--clock cpu``, the process's CPU time. "median paired ratio fwd+bwd": the median over the
repeats of straightforward / ours of the two forward + backward calls made back to back (each
pair saw about the same load). Timings on a shared machine vary; the table prints what it
measured, with the load average at the start. On a machine busier than its cores, OpenMP's
spinning threads make multi-threaded wall times erratic (seconds per call);
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers) keeps them usable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mesadepth.geometry import depth_to_normals
from mesadepth.losses.photometric import photo_and_geometry_loss, sc_depth_v2_losses
from mesadepth.losses.supervised import (
    confident_ranking_loss,
    dynamic_mask,
    edge_aware_normal_loss,
    guidance_edge_maps,
    normal_matching_loss,
    sc_depth_v3_losses,
)

Batch = dict[str, Any]
Terms = dict[str, torch.Tensor]

SIZES: dict[str, tuple[int, int, int]] = {
    "demo": (4, 96, 128),
    "nyu": (4, 256, 320),
    "paper": (2, 480, 480),
}
SEED = 0
# Agreement required of every loss term, on the float64 copy and on the timed float32 batch.
RTOL = 1e-5

# Spec constants, restated here so the straightforward version depends on nothing of the project.
V2_WEIGHTS = {"photo": 1.0, "geometry": 0.1, "smooth": 0.1, "rot_c": 1.0, "rot_t": 1.0}
V3_WEIGHTS = {
    "photo": 1.0,
    "geometry": 0.1,
    "normal_matching": 0.1,
    "mask_rank": 0.1,
    "normal_rank": 0.1,
}


# --------------------------------------------------------------------------------------------
# Synthetic batch.


def _smooth(b: int, c: int, h: int, w: int, cells: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random maps in [0, 1]: cells x cells noise upsampled bilinearly."""
    return F.interpolate(torch.rand(b, c, cells, cells, generator=g), size=(h, w), mode="bilinear")


def _boxes(b: int, h: int, w: int, g: torch.Generator, count: int = 3) -> torch.Tensor:
    """(B, 1, H, W) bool: a few random rectangles per image (objects in front of the scene)."""
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool)
    for i in range(b):
        for _ in range(count):
            y, x, dy, dx = (int(v) for v in torch.rand(4, generator=g) * torch.tensor([h, w, h, w]))
            mask[i, 0, y : y + h // 8 + dy // 3, x : x + w // 8 + dx // 3] = True
    return mask


def make_batch(b: int, h: int, w: int, device: str) -> Batch:
    """One snippet batch shaped like the training step's loss inputs (normalised frames, K,
    depths, PoseNet 6-vectors, v2 ARN rotations, v3 pseudo-depth): smooth textured scenes with a
    few nearer, differently coloured boxes, so that depth and colour have sharp edges too."""
    g = torch.Generator().manual_seed(SEED)
    raw = 0.7 * _smooth(b, 3, h, w, 8, g) + 0.3 * _smooth(b, 3, h, w, 32, g)
    boxes = _boxes(b, h, w, g)
    raw = torch.where(boxes, 0.5 * raw + 0.4, raw)
    image = (raw - 0.45) / 0.225
    # References: the target shifted a few pixels plus a little noise, like a small motion.
    refs = [
        torch.roll(image, s, dims=-1) + 0.05 * torch.randn(image.shape, generator=g)
        for s in (-2, 2)
    ]
    depth = 1.0 + 4.0 * _smooth(b, 1, h, w, 6, g)
    depth = torch.where(boxes, 0.6 * depth, depth)
    ref_depths = [torch.roll(depth, s, dims=-1) for s in (-2, 2)]
    K = torch.tensor([[0.8 * w, 0, w / 2], [0, 0.8 * w, h / 2], [0, 0, 1]]).expand(b, 3, 3)

    def pose() -> torch.Tensor:
        scale = torch.tensor([0.05, 0.05, 0.05, 0.01, 0.01, 0.01])
        return torch.randn(b, 6, generator=g) * scale

    poses = [pose() for _ in refs]
    poses_inv = [-p + 0.1 * pose() for p in poses]
    rots = {k: 0.03 * torch.randn(2, b, 3, generator=g) for k in ("rot1", "rot2", "rot3")}
    rots["rot_target"] = 0.03 * torch.randn(2, b, 3, generator=g)
    # Pseudo-depth: relative depth at LeReS's scale (about 1e4..7e4), correlated with D_t.
    pseudo = 12000.0 * (depth + 0.5 * _smooth(b, 1, h, w, 12, g))
    batch: Batch = {
        "image": image,
        "refs": refs,
        "depth": depth,
        "ref_depths": ref_depths,
        "K": K.contiguous(),
        "poses": poses,
        "poses_inv": poses_inv,
        "pseudo": pseudo,
        **rots,
    }
    return {
        k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device))
        for k, v in batch.items()
    }


def leaves(batch: Batch, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Mark the named inputs as requiring grad and return them flat (the backward targets)."""
    out = []
    for name in names:
        items = batch[name] if isinstance(batch[name], list) else [batch[name]]
        for t in items:
            t.requires_grad_(True)
            out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# Straightforward GP: spec 3.1-3.3, 4.1-4.5, written term by term.


def plain_pose_matrix(vec: torch.Tensor) -> torch.Tensor:
    """(B, 6) (t, Euler x, y, z) -> (B, 3, 4) [R | t] with R = R_x R_y R_z (spec 3.1)."""
    x, y, z = vec[:, 3], vec[:, 4], vec[:, 5]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], 1)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], 1)
    rot = rx.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rz.view(-1, 3, 3)
    return torch.cat([rot, vec[:, :3, None]], 2)


def plain_inverse_warp(
    src: torch.Tensor, depth: torch.Tensor, pose: torch.Tensor, K: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``src`` into the target frame (spec 3.2-3.3, the faithful grid); also returns D_c."""
    b, _, h, w = depth.shape
    v, u = torch.meshgrid(
        torch.arange(h, dtype=depth.dtype, device=depth.device),
        torch.arange(w, dtype=depth.dtype, device=depth.device),
        indexing="ij",
    )
    fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
    cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
    d = depth[:, 0]
    points = torch.stack([(u - cx) / fx * d, (v - cy) / fy * d, d], 1).reshape(b, 3, -1)
    proj = K @ plain_pose_matrix(pose)
    q = proj[:, :, :3] @ points + proj[:, :, 3:]
    u2 = q[:, 0] / (q[:, 2] + 1e-7)
    v2 = q[:, 1] / (q[:, 2] + 1e-7)
    grid = torch.stack([u2 * (2 / (w - 1)) - 1, v2 * (2 / (h - 1)) - 1], -1).reshape(b, h, w, 2)
    sampled = F.grid_sample(src, grid, padding_mode="zeros", align_corners=False)
    return sampled, q[:, 2].reshape(b, 1, h, w)


def plain_ssim_dissimilarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """clamp((1 - SSIM) / 2, 0, 1) with a 7x7 mean window after reflection padding (spec 4.1)."""
    x = F.pad(x, (3, 3, 3, 3), mode="reflect")
    y = F.pad(y, (3, 3, 3, 3), mode="reflect")
    mu_x = F.avg_pool2d(x, 7, stride=1)
    mu_y = F.avg_pool2d(y, 7, stride=1)
    sigma_x = F.avg_pool2d(x**2, 7, stride=1) - mu_x**2
    sigma_y = F.avg_pool2d(y**2, 7, stride=1) - mu_y**2
    sigma_xy = F.avg_pool2d(x * y, 7, stride=1) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2)
    return ((1 - num / den) / 2).clamp(0, 1)


def plain_color_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_c |a - b|, (B, 1, H, W)."""
    return (a - b).abs().mean(1, keepdim=True)


def plain_mean_on_mask(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum(E V) / sum(V), or a float32 zero when sum(V) <= 100 (spec 4.3)."""
    if valid.sum() > 100:
        return (err * valid).sum() / valid.sum()
    return torch.tensor(0.0, device=err.device)


def plain_pair_maps(
    a: torch.Tensor,
    s: torch.Tensor,
    depth_a: torch.Tensor,
    depth_s: torch.Tensor,
    pose: torch.Tensor,
    K: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E_p, E_c, E_d, V) of one direction of one pair (spec 4.2)."""
    warped, computed = plain_inverse_warp(s, depth_a, pose, K)
    projected, _ = plain_inverse_warp(depth_s, depth_a, pose, K)
    e_d = (computed - projected).abs() / (computed + projected)
    valid = (warped.abs().mean(1, keepdim=True) > 1e-3) & (a.abs().mean(1, keepdim=True) > 1e-3)
    e_c = plain_color_error(a, warped)
    valid = valid & (e_c < plain_color_error(a, s))
    l1 = (a - warped).abs().clamp(0, 1)
    e_p = (0.15 * l1 + 0.85 * plain_ssim_dissimilarity(a, warped)).mean(1, keepdim=True)
    e_p = e_p * (1 - e_d).detach()
    return e_p, e_c, e_d, valid.float()


def plain_photo_geometry(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list]:
    """L_photo, L_geo (spec 4.3) and the forward maps (for v3's M_dyn)."""
    tgt, depth, K = batch["image"], batch["depth"], batch["K"]
    maps = []
    for ref, ref_depth, pose, pose_inv in zip(
        batch["refs"], batch["ref_depths"], batch["poses"], batch["poses_inv"], strict=True
    ):
        maps.append(plain_pair_maps(tgt, ref, depth, ref_depth, pose, K))
        maps.append(plain_pair_maps(ref, tgt, ref_depth, depth, pose_inv, K))
    e_p, e_c, e_d, valid = (torch.cat(m, 1) for m in zip(*maps, strict=True))
    best = e_c.argmin(1, keepdim=True)
    e_p, e_d, valid = e_p.gather(1, best), e_d.gather(1, best), valid.gather(1, best)
    photo = plain_mean_on_mask(e_p, valid)
    geometry = plain_mean_on_mask(e_d, valid)
    return photo, geometry, maps[0::2]


def plain_smoothness(depth: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of the mean-normalised depth (spec 4.4)."""
    d = depth / (depth.mean(dim=(2, 3), keepdim=True) + 1e-7)
    dx = (d[:, :, :, 1:] - d[:, :, :, :-1]).abs()
    dy = (d[:, :, 1:, :] - d[:, :, :-1, :]).abs()
    ix = (image[:, :, :, 1:] - image[:, :, :, :-1]).abs().mean(1, keepdim=True)
    iy = (image[:, :, 1:, :] - image[:, :, :-1, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()


def plain_v2(batch: Batch) -> Terms:
    """All SC-DepthV2 terms (spec 4.1-4.5, 4.10 HEAD weights)."""
    photo, geometry, _ = plain_photo_geometry(batch)
    r1, r2, r3, g = (batch[k] for k in ("rot1", "rot2", "rot3", "rot_target"))
    terms = {
        "photo": photo,
        "geometry": geometry,
        "smooth": plain_smoothness(batch["depth"], batch["image"]),
        "rot_c": (r3 - g).abs().mean(),
        "rot_t": torch.relu(r2.abs() - r1.abs() + 0.05).mean(),
    }
    terms["total"] = sum(V2_WEIGHTS[k] * v for k, v in terms.items())
    return terms


def ours_v2(batch: Batch) -> Terms:
    return sc_depth_v2_losses(
        batch["image"],
        batch["refs"],
        batch["depth"],
        batch["ref_depths"],
        batch["K"],
        batch["poses"],
        batch["poses_inv"],
        rot1=batch["rot1"],
        rot2=batch["rot2"],
        rot3=batch["rot3"],
        rot_target=batch["rot_target"],
    )


# --------------------------------------------------------------------------------------------
# Straightforward SP: spec 3.6, 4.6-4.10, one image at a time.


def plain_normals(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Unit normals of one (H, W) depth map from each pixel's 3x3 neighbourhood (spec 3.6).

    Back-projection with K's skew ignored, normalised Sobel derivatives with replicate padding
    written as clamped neighbour indices, cross product, normalisation. Returns (3, H, W).
    """
    h, w = depth.shape
    rows = torch.arange(h, device=depth.device)
    cols = torch.arange(w, device=depth.device)
    u, v = cols.to(depth.dtype)[None, :], rows.to(depth.dtype)[:, None]
    p = torch.stack(
        [(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth]
    )  # (3, H, W)

    def at(dr: int, dc: int) -> torch.Tensor:
        # Neighbour (row + dr, col + dc), border pixels repeated (replicate padding).
        return p[:, (rows + dr).clamp(0, h - 1)][:, :, (cols + dc).clamp(0, w - 1)]

    gu = (at(-1, 1) - at(-1, -1) + 2 * (at(0, 1) - at(0, -1)) + at(1, 1) - at(1, -1)) / 8
    gv = (at(1, -1) - at(-1, -1) + 2 * (at(1, 0) - at(-1, 0)) + at(1, 1) - at(-1, 1)) / 8
    n = torch.stack(
        [
            gu[1] * gv[2] - gu[2] * gv[1],
            gu[2] * gv[0] - gu[0] * gv[2],
            gu[0] * gv[1] - gu[1] * gv[0],
        ]
    )
    return n / torch.sqrt((n * n).sum(0)).clamp(min=1e-12)


def plain_dynamic_mask(forward_maps: list) -> torch.Tensor:
    """M_dyn = mean_j (1 - E_d^{fwd_j} [V >= 1]) on copies (spec 4.6); (B, 1, H, W)."""
    per_ref = [
        1 - torch.where(valid < 1, torch.zeros_like(e_d), e_d) for _, _, e_d, valid in forward_maps
    ]
    return (sum(per_ref) / len(per_ref)).detach()


class Draws:
    """The random numbers of one v3 step, drawn in the project's order (module docstring).

    ``counts``: anchors per L_nr edge map in the project's group order (image b's image edges,
    then its normal edges, for b = 0..B-1); their sum is the length of the L_nr draws.
    ``aligned``: the counts are the project's (both sides then draw the same pairs).
    """

    def __init__(
        self, b: int, h: int, w: int, counts: list[int], device: str, aligned: bool = True
    ) -> None:
        self.counts = counts
        # False: drawn for the straightforward version's own counts (L_nr pairs then differ).
        self.aligned = aligned
        n_anchors = sum(counts)
        g = torch.Generator().manual_seed(SEED)
        k = int(0.2 * h * w)
        self.mr_index = torch.randint(0, h * w - k, (b, k), generator=g).to(device)
        self.mr_u = torch.rand(1, h, w, generator=g).to(device)
        self.mr_perm = torch.randperm(h * w, generator=g).to(device)
        self.nr_u = torch.rand(n_anchors, generator=g, dtype=torch.float64).to(device)
        self.nr_dist = torch.randint(3, 20, (4, n_anchors), generator=g).to(device)


class DrawsMisaligned(Exception):
    """The straightforward version finds other anchor counts than the draws were made for."""

    def __init__(self, counts: list[int], expected: list[int]) -> None:
        super().__init__(
            f"straightforward L_nr: anchor counts per edge map {counts}, the draws were made "
            f"for the project's {expected}"
        )
        self.counts = counts


def plain_labels(pa: torch.Tensor, pb: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """+1 / -1 / 0 ordinal labels from pseudo-depth ratios (spec 4.8 (b), (c))."""
    farther = pa / pb >= 1.15 if inclusive else pa / pb > 1.15
    nearer = pb / pa > 1.15
    one = torch.ones_like(pa)
    return torch.where(nearer, -one, torch.where(farther, one, torch.zeros_like(pa)))


def plain_ranking(
    depth: torch.Tensor, pseudo: torch.Tensor, m_dyn: torch.Tensor, draws: Draws
) -> torch.Tensor:
    """L_mr (spec 4.8), one image at a time."""
    b, _, h, w = depth.shape
    k = int(0.2 * h * w)
    total, count = depth.new_zeros(()), 0

    def add(d: torch.Tensor, a: torch.Tensor, bb: torch.Tensor, t: torch.Tensor) -> None:
        nonlocal total, count
        keep = t != 0
        total = total + torch.log(1 + torch.exp(-t[keep] * (d[a[keep]] - d[bb[keep]]))).sum()
        count += int(keep.sum())

    sel_a = (draws.mr_u >= 0.9).reshape(-1)
    glob_a = sel_a.nonzero()[:, 0]
    glob_b = sel_a[draws.mr_perm].nonzero()[:, 0]
    for i in range(b):
        d, p = depth[i, 0].reshape(-1), pseudo[i, 0].reshape(-1)
        # (b) the k least reliable pixels, each with a random reliable partner.
        order = torch.sort(m_dyn[i, 0].reshape(-1), stable=True).indices
        unreliable = torch.zeros(h * w, dtype=torch.bool, device=d.device)
        unreliable[order[:k]] = True
        a = unreliable.nonzero()[:, 0]
        bb = (~unreliable).nonzero()[:, 0][draws.mr_index[i]]
        add(d, a, bb, plain_labels(p[a], p[bb], inclusive=True))
        # (c) the global random pairs with at least one non-empty pseudo-depth.
        keep = (p[glob_a] > 1e-8) | (p[glob_b] > 1e-8)
        a, bb = glob_a[keep], glob_b[keep]
        add(d, a, bb, plain_labels(p[a], p[bb], inclusive=False))
    return total / count


_S1 = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
_S2 = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]


def plain_sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid cross-correlation of (C, H, W) maps with S1 and S2 -> two (C, H-2, W-2)."""
    s1 = torch.tensor(_S1, dtype=x.dtype, device=x.device)[None, None]
    s2 = torch.tensor(_S2, dtype=x.dtype, device=x.device)[None, None]
    x = x[:, None]
    return F.conv2d(x, s1)[:, 0], F.conv2d(x, s2)[:, 0]


def plain_edges(gx: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, theta), zero-padded back to H x W."""
    return F.pad(torch.sqrt(gx**2 + gy**2), (1, 1, 1, 1)), F.pad(torch.atan2(gy, gx), (1, 1, 1, 1))


def plain_edge_sampler(
    edges: torch.Tensor, thetas: torch.Tensor, u: torch.Tensor, dist: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge-guided pairs of one (H, W) map (spec 4.9 steps 1-5), given the random numbers."""
    h, w = edges.shape
    flat = edges.reshape(-1)
    loc = (flat >= 0.1 * flat.max()).nonzero()[:, 0]
    n = loc.shape[0]
    assert u.shape[0] == n, "anchor count differs from the project's: the draws misalign"
    anchor = loc[(u * n).long().clamp(max=n - 1)]
    theta = thetas.reshape(-1)[anchor]
    row, col = anchor // w, anchor % w
    points = []
    for k, sign in enumerate((-1.0, -1.0, 1.0, 1.0)):
        step = dist[k].to(torch.float64) * sign
        r = (row + torch.round(step * theta.sin().abs()).long()).clamp(0, h - 1)
        c = (col + torch.round(step * theta.cos().abs()).long()).clamp(0, w - 1)
        points.append(r * w + c)
    return torch.cat(points[:3]), torch.cat(points[1:])


def plain_normal_ranking(
    pseudo: torch.Tensor,
    image: torch.Tensor,
    pred_normals: list[torch.Tensor],
    pseudo_normals: list[torch.Tensor],
    draws: Draws,
) -> torch.Tensor:
    """L_nr (spec 4.9), one image at a time; normals given per image as (3, H, W)."""
    b, _, h, w = pseudo.shape
    with torch.no_grad():
        # The depth-edge threshold uses the batch maximum (pitfall 12): all images first.
        depth_edges = [plain_edges(*plain_sobel(pseudo[i, :1]))[0] for i in range(b)]
        threshold = 0.1 * max(float(e.max()) for e in depth_edges)
        maps = []
        for i in range(b):
            e_img, th_img = plain_edges(*plain_sobel(image[i, :1]))
            gx, gy = plain_sobel(pseudo_normals[i])
            e_n, th_n = plain_edges(gx.abs().mean(0, keepdim=True), gy.abs().mean(0, keepdim=True))
            dilated = F.conv2d(
                (depth_edges[i] >= threshold).to(pseudo.dtype)[None],
                torch.ones(1, 1, 3, 3, dtype=pseudo.dtype, device=pseudo.device),
                padding=1,
            )
            near = dilated[0].clamp(0, 1) > 0
            e_img = torch.where(near, torch.zeros_like(e_img), e_img)
            border = torch.ones(h, w, dtype=torch.bool, device=pseudo.device)
            border[5 : h - 5, 5 : w - 5] = False
            e_n = torch.where(near | border, torch.zeros_like(e_n), e_n)
            for e, th in ((e_img, th_img), (e_n, th_n)):
                maps.append((i, e[0].to(torch.float64), th[0].to(torch.float64)))
    counts = [int((e >= 0.1 * e.max()).sum()) for _, e, _ in maps]
    if counts != draws.counts:
        raise DrawsMisaligned(counts, draws.counts)
    terms, offset = [], 0
    for (i, e, th), n in zip(maps, counts, strict=True):
        u, dist = draws.nr_u[offset : offset + n], draws.nr_dist[:, offset : offset + n]
        a, bb = plain_edge_sampler(e, th, u, dist)
        offset += n
        nt = pred_normals[i].reshape(3, -1).to(torch.float64)
        npd = pseudo_normals[i].reshape(3, -1).to(torch.float64)
        c_pred = (nt[:, a] * nt[:, bb]).sum(0).abs()
        c_gt = (npd[:, a] * npd[:, bb]).sum(0).abs()
        terms.append((c_gt - c_pred).abs())
    return torch.cat(terms).mean()


def plain_v3_terms(batch: Batch, m_dyn: torch.Tensor, draws: Draws) -> Terms:
    """L_nm, L_mr, L_nr of one batch (spec 4.7-4.9), one image at a time."""
    depth, pseudo, K = batch["depth"], batch["pseudo"].detach(), batch["K"]
    b = depth.shape[0]
    pred_normals = [plain_normals(depth[i, 0], K[i]) for i in range(b)]
    pseudo_normals = [plain_normals(pseudo[i, 0], K[i]) for i in range(b)]
    nm = sum((pred_normals[i] - pseudo_normals[i]).abs().sum() for i in range(b))
    return {
        "normal_matching": nm / (b * pred_normals[0].numel()),
        "mask_rank": plain_ranking(depth, pseudo, m_dyn, draws),
        "normal_rank": plain_normal_ranking(
            pseudo, batch["image"], pred_normals, pseudo_normals, draws
        ),
    }


def plain_v3_only(batch: Batch) -> Terms:
    terms = plain_v3_terms(batch, batch["m_dyn"], batch["draws"])
    terms["total"] = sum(V3_WEIGHTS[k] * v for k, v in terms.items())
    return terms


def plain_v3_all(batch: Batch) -> Terms:
    photo, geometry, forward_maps = plain_photo_geometry(batch)
    terms = {"photo": photo, "geometry": geometry}
    terms.update(plain_v3_terms(batch, plain_dynamic_mask(forward_maps), batch["draws"]))
    terms["total"] = sum(V3_WEIGHTS[k] * v for k, v in terms.items())
    return terms


def ours_v3_only(batch: Batch) -> Terms:
    gen = torch.Generator().manual_seed(SEED)
    depth, pseudo, K = batch["depth"], batch["pseudo"].detach(), batch["K"]
    pred_normals = depth_to_normals(depth, K)
    pseudo_normals = depth_to_normals(pseudo, K)
    terms = {
        "normal_matching": normal_matching_loss(pred_normals, pseudo_normals),
        "mask_rank": confident_ranking_loss(
            depth, pseudo, batch["m_dyn"], generator=gen, stable_sort=True
        ),
        "normal_rank": edge_aware_normal_loss(
            pseudo, batch["image"], pred_normals, pseudo_normals, generator=gen
        ),
    }
    terms["total"] = sum(V3_WEIGHTS[k] * v for k, v in terms.items())
    return terms


def ours_v3_all(batch: Batch) -> Terms:
    return sc_depth_v3_losses(
        batch["image"],
        batch["refs"],
        batch["depth"],
        batch["ref_depths"],
        batch["K"],
        batch["poses"],
        batch["poses_inv"],
        batch["pseudo"],
        generator=torch.Generator().manual_seed(SEED),
        stable_sort=True,
    )


def prepare_sp(batch: Batch) -> Batch:
    """Add the v3 extras: ``m_dyn`` (the project's M_dyn, input of the "v3 terms" row, shared by
    both sides) and ``draws`` (the random numbers for the straightforward version)."""
    b, _, h, w = batch["depth"].shape
    device = batch["depth"].device
    with torch.no_grad():
        pseudo_normals = depth_to_normals(batch["pseudo"], batch["K"])
        edges, _ = guidance_edge_maps(batch["pseudo"], batch["image"], pseudo_normals)
        flat = edges.to(torch.float64).flatten(2)
        # Anchors of the L_nr draws: edge pixels of each of the 2B guidance maps.
        counts = (flat >= 0.1 * flat.amax(2, keepdim=True)).sum(2).reshape(-1).tolist()
        pg = photo_and_geometry_loss(
            batch["image"],
            batch["refs"],
            batch["depth"],
            batch["ref_depths"],
            batch["K"],
            batch["poses"],
            batch["poses_inv"],
        )
        m_dyn = dynamic_mask(pg.maps[0::2])
    return {**batch, "m_dyn": m_dyn, "draws": Draws(b, h, w, counts, device)}


def as_float64(batch: Batch) -> Batch:
    """A detached float64 copy of the batch's tensors (the equality check's exact twin)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float64)

    return {
        k: ([cast(t) for t in v] if isinstance(v, list) else cast(v))
        for k, v in batch.items()
        if isinstance(v, (list, torch.Tensor))
    }


# --------------------------------------------------------------------------------------------
# Timing.


# Wall clock (default) or process CPU time (``--clock cpu``: summed over threads, and blind to
# the time other processes take from this one on a shared machine).
_clock: Callable[[], float] = time.perf_counter


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn: Callable[[], Terms], grads: list[torch.Tensor] | None, device: str) -> float:
    _sync(device)
    t0 = _clock()
    terms = fn()
    if grads is not None:
        torch.autograd.grad(terms["total"], grads, allow_unused=True)
    _sync(device)
    return _clock() - t0


def compare(
    ours: Terms, plain: Terms, rtol: float, where: str, skip: tuple[str, ...] = ()
) -> float:
    """Assert every term of ``plain`` (but ``skip``) agrees with ours to ``rtol`` relative;
    return the largest absolute difference."""
    worst = 0.0
    for key in (k for k in plain if k not in skip):
        o, p = float(ours[key].detach()), float(plain[key].detach())
        diff = abs(o - p)
        assert diff <= rtol * max(abs(p), 1e-6), (
            f"{where}: {key} differs: ours {o!r}, straightforward {p!r} (rtol {rtol})"
        )
        worst = max(worst, diff)
    return worst


def bench_row(
    label: str,
    shape: str,
    ours: Callable[[Batch], Terms],
    plain: Callable[[Batch], Terms],
    batch: Batch,
    grads: list[torch.Tensor],
    device: str,
    repeats: int,
    budget: float,
) -> dict:
    """Check equality (float64 copy, then the float32 batch), then time both on the batch."""
    batch64 = as_float64(batch)
    if "draws" in batch:
        batch64 = prepare_sp(batch64)
    diff64 = compare(ours(batch64), plain(batch64), RTOL, f"{label}, {shape}, float64")
    del batch64
    # The float32 check doubles as the warm-up pass (allocator, kernels, first-call costs).
    _sync(device)
    t0 = _clock()
    ours_terms = ours(batch)
    _sync(device)
    t_ours = _clock() - t0
    try:
        plain_terms = plain(batch)
    except DrawsMisaligned as err:
        # In float32 the two normal computations differ by ulps, which can move an edge pixel
        # across L_nr's 10 % threshold; then the straightforward side draws for its own anchor
        # counts: the same work, other L_nr pairs, so L_nr (and the total) are not compared.
        b, _, h, w = batch["depth"].shape
        batch["draws"] = Draws(b, h, w, err.counts, device, aligned=False)
    _sync(device)
    t0 = _clock()
    plain_terms = plain(batch)
    _sync(device)
    t_plain = _clock() - t0
    aligned = "draws" not in batch or batch["draws"].aligned
    skip = () if aligned else ("normal_rank", "total")
    diff32 = compare(ours_terms, plain_terms, RTOL, f"{label}, {shape}, float32", skip)
    del ours_terms, plain_terms
    row = {
        "group": label,
        "size": shape,
        "max abs diff f32": f"{diff32:.1e}" + ("" if aligned else " (L_nr not compared)"),
        "max abs diff f64": f"{diff64:.1e}",
    }
    run_plain = t_plain <= budget
    # Per repeat: one forward plus a forward + backward (about three forwards).
    per_repeat = 4 * (t_ours + (t_plain if run_plain else 0.0))
    n = max(1, min(repeats, int(budget // max(per_repeat, 1e-9))))
    cells = {("ours", "fwd"): (ours, None), ("ours", "fwd+bwd"): (ours, grads)}
    if run_plain:
        cells.update({("plain", "fwd"): (plain, None), ("plain", "fwd+bwd"): (plain, grads)})
    for fn, _ in cells.values():
        _once(lambda fn=fn: fn(batch), grads, device)  # backward warm-up
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cells}
    # Interleaved, so that both sides see the same share of a shared machine's load.
    for _ in range(n):
        for key, (fn, g) in cells.items():
            times[key].append(_once(lambda fn=fn: fn(batch), g, device))
    for (who, what), ts in times.items():
        row[f"{who} {what} ms"] = 1e3 * min(ts)
    if run_plain:
        row["ratio fwd"] = row["plain fwd ms"] / row["ours fwd ms"]
        row["ratio fwd+bwd"] = row["plain fwd+bwd ms"] / row["ours fwd+bwd ms"]
        # Per repeat, the two fwd+bwd calls ran back to back: their ratio saw one load.
        paired = [
            p / o for p, o in zip(times["plain", "fwd+bwd"], times["ours", "fwd+bwd"], strict=True)
        ]
        row["median paired ratio fwd+bwd"] = statistics.median(paired)
    row["repeats"] = n
    return row


def rows_for(group: str, size: str, device: str, repeats: int, budget: float) -> list[dict]:
    b, h, w = SIZES[size]
    shape = f"{size} {b}x{h}x{w}"
    batch = make_batch(b, h, w, device)
    opts = dict(device=device, repeats=repeats, budget=budget)
    if group == "gp":
        names = ("depth", "ref_depths", "poses", "poses_inv", "refs", "rot1", "rot2", "rot3")
        grads = leaves(batch, names)
        return [bench_row("gp: all v2 terms", shape, ours_v2, plain_v2, batch, grads, **opts)]
    batch = prepare_sp(batch)
    grads = leaves(batch, ("depth", "ref_depths", "poses", "poses_inv"))
    terms = "sp: v3 terms (normals, L_nm, L_mr, L_nr)"
    return [
        bench_row(terms, shape, ours_v3_only, plain_v3_only, batch, grads[:1], **opts),
        bench_row("sp: all v3 losses", shape, ours_v3_all, plain_v3_all, batch, grads, **opts),
    ]


COLUMNS = [
    "group",
    "size",
    "ours fwd ms",
    "plain fwd ms",
    "ratio fwd",
    "ours fwd+bwd ms",
    "plain fwd+bwd ms",
    "ratio fwd+bwd",
    "median paired ratio fwd+bwd",
    "repeats",
    "max abs diff f32",
    "max abs diff f64",
]


def _cell(row: dict, col: str) -> str:
    if col not in row:
        return "skipped"
    v = row[col]
    if isinstance(v, float):
        return f"{v:.2f}" if "ratio" in col else f"{v:.1f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", choices=("gp", "sp"), help="one group")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per cell (best of)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per row, roughly")
    ap.add_argument("--skip-paper", action="store_true", help="leave out the paper size")
    ap.add_argument(
        "--sizes", nargs="+", choices=tuple(SIZES), default=None, help="sizes to run (all)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or process CPU time (CPU device; steadier on a shared machine)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu":
            ap.error("--clock cpu needs --device cpu")
        global _clock
        _clock = time.process_time
    groups = [args.only] if args.only else ["gp", "sp"]
    sizes = args.sizes or list(SIZES)
    if args.skip_paper:
        sizes = [s for s in sizes if s != "paper"]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    clock = "wall" if args.clock == "wall" else "process CPU time"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"device {dev}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"clock: {clock}, load average at start: {load} ({os.cpu_count()} cores)"
    )
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for group in groups:
        for size in sizes:
            for row in rows_for(group, size, args.device, args.repeats, args.budget):
                print("| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
