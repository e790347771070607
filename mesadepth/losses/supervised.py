"""SC-DepthV3 pseudo-depth losses: dynamic mask, normal matching, confident ranking, relative normals.

Specification: geometric-and-supervised-pretraining.md sections 0 (one v3 step), 1.4
(pseudo-depth), 3.6 (normals), 4.6 (dynamic mask), 4.7 (L_nm), 4.8 (L_mr), 4.9 (L_nr), 4.10
(v3 weights) and pitfalls 10, 11, 12, 13, 19 and 23.

The pseudo-depth P_t is affine-invariant relative depth (LeReS, stored as 0..60000) used raw;
every term here is invariant to its global scale but not to a shift (spec 1.4).

Randomness. L_mr and L_nr sample pixel pairs. Every draw takes an explicit
``generator: torch.Generator | None``; draws are made on the generator's device and moved to the
data's device, so a CPU generator gives the same pairs on CPU and GPU. ``generator=None`` uses
torch's default **CPU** generator (the global RNG that ``torch.manual_seed`` /
``lightning.seed_everything`` seed), which is what the reference does: it draws every random
number on the CPU. Order of draws in one call of :func:`sc_depth_v3_losses`: L_mr (mask-guided
``randint``, global ``rand``, ``randperm``) then L_nr (anchor ``rand``, distance ``randint``).
The L_mr draws are the reference's calls in the reference's order, so with the same generator
state the L_mr pairs and value equal the reference's (checked bit for bit on CPU); the L_nr draws are batched over images and both
samplers (one draw each instead of two per image), so they follow the same distribution with a
different stream.

Reference bugs and quirks, reproduced by default (pitfalls 11, 12, 23):

- L_mr uses a plain ``log(1 + exp(x))`` (inf in float32 for ``x > ~88``) and divides by the
  number of labelled pairs (NaN when there are none). ``ranking_numerics="safe"`` uses
  ``softplus`` and returns 0 (still attached to the graph) without labelled pairs.
- The unreliable set comes from an unstable sort, so ties at the 20 % boundary (common: M_dyn is
  exactly 1 on every invalid pixel) fall where the backend's sort puts them.
  ``stable_sort=True`` breaks ties by raster order, identically on every backend.
- L_nr is float64 and promotes the total to float64 (kept). Its validity and pair-consistency
  masks are not applied (they are no-ops for non-negative pseudo-depth and are not computed
  here); an all-zero edge map makes every pixel an anchor (and a map that is zero up to
  ~1e-16 convolution residues puts its anchors on the residues); the sampling direction folds
  the gradient's sign away (kept).

Not in the reference: ``ranking_depth="mean"`` lets L_mr compare depth divided by its per-image
mean instead of raw depth, so that no v3 term pays for rescaling or stretching the prediction
(:func:`ranking_depth`). Pair gathers use ``index_select`` on CPU so that a run repeats bit for
bit with any thread count (:func:`_take_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mesadepth.errors import ConfigError
from mesadepth.geometry import Convention, depth_to_normals
from mesadepth.losses.photometric import PairwiseMaps, photo_and_geometry_loss, total_loss

__all__ = [
    "V3_LOSS_WEIGHTS",
    "EdgePairs",
    "RankingDepth",
    "RankingNumerics",
    "RankingPairs",
    "confident_ranking_loss",
    "dynamic_mask",
    "edge_aware_normal_loss",
    "edge_guided_pairs",
    "global_pairs",
    "guidance_edge_maps",
    "mask_guided_pairs",
    "normal_edge_maps",
    "normal_matching_loss",
    "pair_normal_terms",
    "ranking_labels",
    "ranking_loss",
    "sc_depth_v3_losses",
    "sobel_edge_maps",
    "unreliable_mask",
]

RankingNumerics = Literal["reference", "safe"]
RankingDepth = Literal["raw", "mean"]

#: Loss weights of v3 (spec 4.10): only HEAD exists (v3 appeared in Nov 2022, after the last
#: weight change). Keys are the reference's option names without ``_weight``.
V3_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "head": {
        "photo": 1.0,
        "geometry": 0.1,
        "normal_matching": 0.1,
        "mask_rank": 0.1,
        "normal_rank": 0.1,
    },
}

# Confident ranking loss (spec 4.8): label ratio margin, unreliable fraction, global sampling
# probability and the "non-empty pseudo-depth" threshold of the global pairs.
RANK_THETA = 0.15
UNRELIABLE_FRACTION = 0.2
GLOBAL_SAMPLE_RATIO = 0.1
FILTER_DEPTH = 1e-8
# Edge-aware relative normal loss (spec 4.9): edge thresholds (fraction of a maximum), border
# width where normal edges are dropped, and the anchor-to-point distances 3..19 px.
EDGE_FRACTION = 0.1
NORMAL_EDGE_BORDER = 5
DIST_LOW, DIST_HIGH = 3, 19
# Un-normalised Sobel pair of spec 4.9; S2 is -S1^T, so theta's sign differs from the usual
# convention, which the sampler folds away with |sin|, |cos| anyway.
_SOBEL_1 = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_SOBEL_2 = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def _check_map(name: str, x: torch.Tensor, channels: int | tuple[int, ...] | None = None) -> None:
    allowed = (channels,) if isinstance(channels, int) else channels
    if x.ndim != 4 or (allowed is not None and x.shape[1] not in allowed):
        c = "C" if allowed is None else "|".join(map(str, allowed))
        raise ConfigError(f"{name} must be (B, {c}, H, W), got {tuple(x.shape)}")


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 with a run-to-run reproducible gradient.

    On CPU the backward of advanced indexing (``index_put_`` with accumulate) adds float32
    gradients with parallel atomic adds once there are >= 32768 elements and more than one
    thread, so repeated pairs sum in a thread-timing-dependent order and two identical runs
    drift apart (measured: the v3 stage's losses differed in the 5th digit within one epoch).
    ``index_select``'s backward (``index_add_``) adds in index order there: the same values, the
    same gradient with one thread, and the same gradient on every run with any thread count.
    On CUDA it is the other way round (``index_add_`` uses atomics, advanced indexing sorts the
    indices), so CUDA keeps advanced indexing.
    """
    return x.index_select(0, index) if x.device.type == "cpu" else x[index]


def _draw_device(generator: torch.Generator | None) -> torch.device:
    # The reference draws on the CPU default generator whatever the data's device.
    return generator.device if generator is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Dynamic mask and normal matching.


def dynamic_mask(forward_maps: Sequence[PairwiseMaps], *, detach: bool = True) -> torch.Tensor:
    """Per-pixel confidence ``M_dyn = mean_j (1 - E_d^{fwd_j} [V^{fwd_j} >= 1])`` (spec 4.6).

    Built from the **forward** pairs only (``PhotoGeometry.maps[0::2]``), before view selection.
    E_d is zeroed where V < 1 on a copy (the reference edits the map in place, pitfall 19), so the
    maps, and an L_geo computed from them, are untouched; M_dyn = 1 at invalid or auto-masked
    pixels, low where the depths disagree (dynamic or occluded). It is only ever sorted (L_mr),
    so detaching it (default) changes no value and no gradient.

    Args:
        forward_maps: pairwise maps of the forward pairs (target -> ref j), each with
            ``depth_diff`` and ``valid`` of shape (B, 1, H, W).
        detach: return the mask without gradient.

    Returns:
        (B, 1, H, W) M_dyn: 1 where invalid, in [0, 1] while D_c + D_p > 0, outside it
        where a computed depth D_c <= 0 makes E_d > 1 or negative (pitfall 6).
    """
    if not forward_maps:
        raise ConfigError("dynamic_mask: need at least one forward pairwise map")
    per_ref = [1 - m.depth_diff.masked_fill(m.valid < 1, 0.0) for m in forward_maps]
    out = torch.cat(per_ref, 1).mean(1, keepdim=True)
    return out.detach() if detach else out


def normal_matching_loss(pred_normals: torch.Tensor, pseudo_normals: torch.Tensor) -> torch.Tensor:
    """L_nm = mean over B x 3 x H x W of ``|N_t - N_p|`` (spec 4.7; no mask, borders included).

    Args:
        pred_normals: (B, 3, H, W) unit normals of the predicted depth (spec 3.6).
        pseudo_normals: (B, 3, H, W) unit normals of the pseudo-depth, same K.

    Returns:
        Scalar tensor.
    """
    _check_map("pred_normals", pred_normals, 3)
    if pseudo_normals.shape != pred_normals.shape:
        raise ConfigError(
            f"normal_matching_loss: pseudo_normals {tuple(pseudo_normals.shape)} must match "
            f"pred_normals {tuple(pred_normals.shape)}"
        )
    return (pred_normals - pseudo_normals).abs().mean()


# --------------------------------------------------------------------------------------------
# Confident depth ranking loss L_mr.


class RankingPairs(NamedTuple):
    """Ordinal pixel pairs of L_mr (spec 4.8).

    ``a``, ``b``: (N,) long, flat indices into the (B*H*W) raster of the batch; ``label``: (N,)
    in {-1, 0, +1} (the pseudo-depth's dtype): +1 = a is farther than b.
    """

    a: torch.Tensor
    b: torch.Tensor
    label: torch.Tensor


def ranking_labels(
    pseudo_a: torch.Tensor,
    pseudo_b: torch.Tensor,
    *,
    theta: float = RANK_THETA,
    inclusive: bool = False,
) -> torch.Tensor:
    """Ordinal labels from pseudo-depth ratios (spec 4.8 (b), (c); pitfall 11).

    ``t = +1`` if ``P_a / P_b >= 1 + theta`` (``inclusive``, the mask-guided rule) or
    ``> 1 + theta`` (the global rule); ``t = -1`` if ``P_b / P_a > 1 + theta`` (both rules;
    it wins if both hold); else 0. Ratios and the comparison run in the inputs' dtype (integer
    pseudo-depths hit ``1 + theta`` exactly, e.g. 23 / 20 in float32). 0/0 gives 0.

    Args:
        pseudo_a, pseudo_b: (N,) pseudo-depths of the two pixels of each pair.

    Returns:
        (N,) labels in the inputs' dtype.
    """
    up = pseudo_a / pseudo_b
    farther = up >= 1 + theta if inclusive else up > 1 + theta
    nearer = pseudo_b / pseudo_a > 1 + theta
    one = torch.ones_like(up)
    return torch.where(nearer, -one, torch.where(farther, one, torch.zeros_like(up)))


def unreliable_mask(
    dyn_mask: torch.Tensor,
    *,
    fraction: float = UNRELIABLE_FRACTION,
    stable_sort: bool = False,
) -> torch.Tensor:
    """The ``int(fraction * H * W)`` pixels of each image with the smallest M_dyn (spec 4.8 (a)).

    Args:
        dyn_mask: (B, 1, H, W) M_dyn from :func:`dynamic_mask`.
        fraction: share of unreliable pixels (0.2 in the reference).
        stable_sort: break ties by raster order (lower index = less reliable); the reference's
            unstable sort (default) leaves ties to the backend (module docstring).

    Returns:
        (B, 1, H, W) bool, True on the unreliable pixels; exactly the same count per image.
    """
    _check_map("dyn_mask", dyn_mask, 1)
    b, _, h, w = dyn_mask.shape
    # Same float expression as the reference, e.g. int(0.2 * 5 * 7) = 7.
    k = int(fraction * h * w)
    order = torch.sort(dyn_mask.detach().reshape(b, -1), dim=1, stable=stable_sort).indices
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=dyn_mask.device)
    mask.scatter_(1, order[:, :k], True)
    return mask.reshape(b, 1, h, w)


def mask_guided_pairs(
    pseudo_depth: torch.Tensor,
    unreliable: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    theta: float = RANK_THETA,
) -> RankingPairs:
    """Pairs (unreliable a, reliable b) of spec 4.8 (b).

    Each unreliable pixel a (raster order, image by image) is paired with a pixel b drawn
    uniformly **with replacement** from the same image's reliable pixels (one ``randint`` of
    shape (B, k), equal to the reference's per-image draws in sequence). Labels with the
    inclusive rule of :func:`ranking_labels`.

    Args:
        pseudo_depth: (B, 1, H, W) P_t.
        unreliable: (B, 1, H, W) bool with the same number k of True pixels per image (as
            :func:`unreliable_mask` returns).
        generator: RNG (module docstring); None = torch's default CPU generator.
        theta: ratio margin.

    Returns:
        :class:`RankingPairs` with B * k pairs.
    """
    _check_map("pseudo_depth", pseudo_depth, 1)
    if unreliable.shape != pseudo_depth.shape or unreliable.dtype != torch.bool:
        raise ConfigError(
            f"mask_guided_pairs: unreliable must be a bool mask shaped like pseudo_depth "
            f"{tuple(pseudo_depth.shape)}, got {unreliable.dtype} {tuple(unreliable.shape)}"
        )
    b, _, h, w = pseudo_depth.shape
    flat = unreliable.reshape(b, h * w)
    counts = flat.sum(1)
    k = int(counts[0]) if b else 0
    if bool((counts != k).any()):
        raise ConfigError(
            f"mask_guided_pairs: every image needs the same number of unreliable pixels, got "
            f"{counts.tolist()}"
        )
    device = pseudo_depth.device
    n_rel = h * w - k
    base = torch.arange(b, device=device)[:, None] * (h * w)
    # nonzero lists positions row by row in raster order, k (resp. n_rel) per row.
    pos_a = flat.nonzero()[:, 1].reshape(b, k)
    pos_rel = (~flat).nonzero()[:, 1].reshape(b, n_rel)
    if k and not n_rel:
        raise ConfigError("mask_guided_pairs: every pixel is unreliable; no reliable partner")
    draw = torch.randint(
        0, max(n_rel, 1), (b, k), generator=generator, device=_draw_device(generator)
    ).to(device)
    pos_b = pos_rel.gather(1, draw)
    a = (base + pos_a).reshape(-1)
    bb = (base + pos_b).reshape(-1)
    p = pseudo_depth.reshape(-1)
    return RankingPairs(a, bb, ranking_labels(p[a], p[bb], theta=theta, inclusive=True))


def global_pairs(
    pseudo_depth: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    theta: float = RANK_THETA,
    sample_ratio: float = GLOBAL_SAMPLE_RATIO,
    filter_depth: float = FILTER_DEPTH,
) -> RankingPairs:
    """Global random pairs of spec 4.8 (c), one pattern shared by the whole batch.

    A position is selected when a float32 uniform draw over (1, H, W) is ``>= 1 - sample_ratio``;
    the B pattern is that pattern permuted by ``randperm(H W)`` (same count); in every image the
    k-th selected A pixel (raster order) pairs with the k-th selected B pixel (possibly itself).
    Pairs are kept where ``P_a > filter_depth or P_b > filter_depth``; labels with the strict
    rule of :func:`ranking_labels`.

    Args:
        pseudo_depth: (B, 1, H, W) P_t.
        generator: RNG (module docstring); None = torch's default CPU generator.
        theta, sample_ratio, filter_depth: 0.15, 0.1, 1e-8 in the reference.

    Returns:
        :class:`RankingPairs`.
    """
    _check_map("pseudo_depth", pseudo_depth, 1)
    b, _, h, w = pseudo_depth.shape
    device, draw_device = pseudo_depth.device, _draw_device(generator)
    u = torch.rand(1, h, w, generator=generator, device=draw_device, dtype=torch.float32)
    sel_a = (u >= 1 - sample_ratio).reshape(-1)
    perm = torch.randperm(h * w, generator=generator, device=draw_device)
    sel_b = sel_a[perm]
    pos_a, pos_b = sel_a.nonzero()[:, 0].to(device), sel_b.nonzero()[:, 0].to(device)
    base = torch.arange(b, device=device)[:, None] * (h * w)
    a = (base + pos_a).reshape(-1)
    bb = (base + pos_b).reshape(-1)
    p = pseudo_depth.reshape(-1)
    pa, pb = p[a], p[bb]
    keep = (pa > filter_depth) | (pb > filter_depth)
    return RankingPairs(
        a[keep], bb[keep], ranking_labels(pa[keep], pb[keep], theta=theta, inclusive=False)
    )


def ranking_loss(
    pred_depth: torch.Tensor,
    pairs: Sequence[RankingPairs],
    *,
    numerics: RankingNumerics = "reference",
) -> torch.Tensor:
    """Logistic ranking loss over the labelled pairs of all sets (spec 4.8 (d)).

    ``sum log(1 + exp(-t (D_a - D_b))) / n`` over the pairs with ``t != 0`` of every set, n =
    their total count; D is the raw predicted depth (not log, not normalised), so the loss is
    **not** invariant to the prediction's scale. ``numerics="reference"`` reproduces the plain
    formula (inf in float32 beyond ~88, NaN for n = 0); ``"safe"`` uses softplus and gives 0
    for n = 0 (pitfall 11).

    Args:
        pred_depth: (B, 1, H, W) D_t.
        pairs: sets from :func:`mask_guided_pairs` and :func:`global_pairs`.
        numerics: ``"reference"`` or ``"safe"``.

    Returns:
        Scalar tensor in D_t's dtype.
    """
    if numerics not in ("reference", "safe"):
        raise ConfigError(f"ranking numerics must be 'reference' or 'safe', got {numerics!r}")
    flat = pred_depth.reshape(-1)

    def logistic(x: torch.Tensor) -> torch.Tensor:
        return torch.log(1 + torch.exp(x)) if numerics == "reference" else F.softplus(x)

    # One sum per set, then their sum: the reference's grouping, so the value is bit-identical.
    total = flat.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=flat.device)
    for p in pairs:
        keep = p.label != 0
        t = p.label[keep].to(flat.dtype)
        diff = _take_rows(flat, p.a[keep]) - _take_rows(flat, p.b[keep])
        total = total + logistic(-t * diff).sum()
        count = count + keep.sum()
    if numerics == "reference":
        return total / count
    return total / count.clamp(min=1)


def confident_ranking_loss(
    pred_depth: torch.Tensor,
    pseudo_depth: torch.Tensor,
    dyn_mask: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    theta: float = RANK_THETA,
    numerics: RankingNumerics = "reference",
    stable_sort: bool = False,
    depth: RankingDepth = "raw",
) -> torch.Tensor:
    """L_mr, the confident depth ranking loss (spec 4.8).

    Mask-guided pairs between the lowest-20 % M_dyn pixels and random reliable ones, plus
    global random pairs, labelled from pseudo-depth ratios, logistic loss on raw predicted
    depth differences normalised by the total count of labelled pairs. Invariant to a positive
    scale of the pseudo-depth.

    Args:
        pred_depth: (B, 1, H, W) D_t (gradient flows here).
        pseudo_depth: (B, 1, H, W) P_t (any positive scale; only compared, never differentiated).
        dyn_mask: (B, 1, H, W) M_dyn (only sorted).
        generator: RNG (module docstring); draws: randint (B, k), rand (1, H, W), randperm.
        theta: label ratio margin (0.15).
        numerics: see :func:`ranking_loss`.
        stable_sort: see :func:`unreliable_mask`.
        depth: what the logistic compares (:func:`ranking_depth`); ``"raw"`` = the reference.

    Returns:
        Scalar tensor in D_t's dtype.
    """
    _check_map("pred_depth", pred_depth, 1)
    if pseudo_depth.shape != pred_depth.shape or dyn_mask.shape != pred_depth.shape:
        raise ConfigError(
            f"confident_ranking_loss: pred_depth {tuple(pred_depth.shape)}, pseudo_depth "
            f"{tuple(pseudo_depth.shape)} and dyn_mask {tuple(dyn_mask.shape)} must match"
        )
    pseudo = pseudo_depth.detach()
    unreliable = unreliable_mask(dyn_mask, stable_sort=stable_sort)
    guided = mask_guided_pairs(pseudo, unreliable, generator=generator, theta=theta)
    rand_pairs = global_pairs(pseudo, generator=generator, theta=theta)
    return ranking_loss(ranking_depth(pred_depth, depth), [guided, rand_pairs], numerics=numerics)


def ranking_depth(pred_depth: torch.Tensor, mode: RankingDepth = "raw") -> torch.Tensor:
    """The predicted depth as L_mr's logistic sees it.

    ``"raw"``: D_t itself, the reference (spec 4.8 (d)). ``"mean"``: D_t divided by its
    per-image mean (not detached), which makes L_mr invariant to the prediction's global scale,
    as every other v3 term is. Not in the reference. Why: on raw depth the logistic
    ``log(1 + exp(-t (D_a - D_b)))`` falls for correctly ordered pairs and grows for wrongly
    labelled ones as the depth's scale grows, which no other v3 term constrains; where
    the photometric terms hold no depth (a PoseNet that reads no motion) and the teacher's labels
    are noisy, the DepthNet follows that pay-off and stretches its depth map until held-out depth
    gets worse (docs/experiments/2026-12-05-sp-stability.md).

    Args:
        pred_depth: (B, 1, H, W) positive D_t.
        mode: ``"raw"`` or ``"mean"``.

    Returns:
        (B, 1, H, W) tensor.
    """
    if mode == "raw":
        return pred_depth
    if mode == "mean":
        return pred_depth / pred_depth.mean(dim=(1, 2, 3), keepdim=True)
    raise ConfigError(f"ranking depth must be 'raw' or 'mean', got {mode!r}")


# --------------------------------------------------------------------------------------------
# Edge-aware relative normal loss L_nr.


def _sobel_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid cross-correlation of (N, 1, H, W) with S1, S2 -> two (N, 1, H-2, W-2) maps."""
    n, _, h, w = x.shape
    kernel = torch.tensor([_SOBEL_1, _SOBEL_2], dtype=x.dtype, device=x.device)[:, None]
    # The N maps as the channels of one image, one group each: the same values as N one-channel
    # images (bit for bit on CPU), up to 5x faster there (oneDNN handles one input channel
    # poorly).
    g = F.conv2d(x.reshape(1, n, h, w), kernel.repeat(n, 1, 1, 1), groups=n)
    g = g.reshape(n, 2, h - 2, w - 2)
    return g[:, :1], g[:, 1:]


def _edges_from(gx: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Valid convolution, then zero padding back to H x W (spec 4.9): border edges are 0.
    edges = F.pad(torch.sqrt(gx * gx + gy * gy), (1, 1, 1, 1))
    thetas = F.pad(torch.atan2(gy, gx), (1, 1, 1, 1))
    return edges, thetas


def sobel_edge_maps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge magnitude and angle of an image's first channel or a depth map (spec 4.9).

    ``g_x = x * S1``, ``g_y = x * S2`` (valid cross-correlation, un-normalised Sobel,
    S2 = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]), ``E = sqrt(g_x^2 + g_y^2)``,
    ``theta = atan2(g_y, g_x)``, both zero-padded by one pixel. For a 3-channel image only the
    first (R) channel of the normalised image is used (pitfall 4).

    Args:
        x: (B, 1, H, W) depth or (B, 3, H, W) normalised image.

    Returns:
        ``(edges, thetas)``, each (B, 1, H, W) in x's dtype (thetas in radians).
    """
    _check_map("x", x, (1, 3))
    return _edges_from(*_sobel_pair(x[:, :1]))


def normal_edge_maps(normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge magnitude and angle of a normal map (spec 4.9).

    Per channel ``|N_c * S1|`` and ``|N_c * S2|``, each averaged over the 3 channels into
    ``g_x, g_y >= 0``; ``E = sqrt(g_x^2 + g_y^2)``, ``theta = atan2(g_y, g_x)`` in [0, pi/2];
    zero padding by one pixel. (The border suppression is applied by the caller.)

    Args:
        normals: (B, 3, H, W).

    Returns:
        ``(edges, thetas)``, each (B, 1, H, W).
    """
    _check_map("normals", normals, 3)
    b, c, h, w = normals.shape
    gx, gy = _sobel_pair(normals.reshape(b * c, 1, h, w))
    gx = gx.abs().reshape(b, c, h - 2, w - 2).mean(1, keepdim=True)
    gy = gy.abs().reshape(b, c, h - 2, w - 2).mean(1, keepdim=True)
    return _edges_from(gx, gy)


class EdgePairs(NamedTuple):
    """Pixel pairs of the edge-guided sampler (spec 4.9), each field (3N,) long.

    ``group``: index of the edge map (along the first axis of the sampler's input) the pair
    belongs to; ``a``, ``b``: flat pixel indices ``row * W + col`` within that map. Layout:
    ``[(q1, q2) for all anchors, (q2, q3) ..., (q3, q4) ...]``.
    """

    group: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def edge_guided_pairs(
    edges: torch.Tensor,
    thetas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    fraction: float = EDGE_FRACTION,
) -> EdgePairs:
    """Edge-guided point pairs for a stack of edge maps, vectorised over the stack (spec 4.9).

    Per map: edge pixels ``S = {E >= fraction * max E}`` (per-map maximum; an all-zero map
    makes every pixel an edge), n = |S| anchors drawn uniformly with replacement from S, per
    anchor four distances uniform in {3..19} with signs (-, -, +, +), points
    ``q_k = (row + round(s_k d_k |sin theta|), col + round(s_k d_k |cos theta|))`` clamped to
    the image (``torch.round``: half to even), pairs (q1, q2), (q2, q3), (q3, q4).

    Draws (on the generator's device): one float64 ``rand`` of all anchors of all maps, then
    one ``randint(3, 20, (4, N))``.

    Args:
        edges: (G, H, W) edge magnitudes, float64 (the spec's arithmetic precision).
        thetas: (G, H, W) edge angles in radians, float64.
        generator: RNG (module docstring); None = torch's default CPU generator.
        fraction: edge threshold relative to each map's maximum (0.1).

    Returns:
        :class:`EdgePairs` with 3 N pairs, N = total anchor count.
    """
    owner, idx = _edge_guided_points(edges, thetas, generator=generator, fraction=fraction)
    return EdgePairs(owner.repeat(3), idx[:3].reshape(-1), idx[1:].reshape(-1))


def _edge_guided_points(
    edges: torch.Tensor,
    thetas: torch.Tensor,
    *,
    generator: torch.Generator | None,
    fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`edge_guided_pairs`' anchors and points: ``owner`` (N,), the map of each anchor,
    and ``idx`` (4, N), the flat pixels ``row * W + col`` of q1..q4 (same draws, same order)."""
    if edges.ndim != 3 or thetas.shape != edges.shape:
        raise ConfigError(
            f"edge_guided_pairs: edges and thetas must be equal (G, H, W), got "
            f"{tuple(edges.shape)}, {tuple(thetas.shape)}"
        )
    g, h, w = edges.shape
    device, draw_device = edges.device, _draw_device(generator)
    flat = edges.reshape(g, -1)
    is_edge = flat >= fraction * flat.amax(1, keepdim=True)
    # Edge pixels grouped by map, raster order within (as nonzero lists them), as flat indices
    # into the (G * H * W) stack; n anchors per map, as many as the map has edge pixels.
    loc = is_edge.reshape(-1).nonzero().squeeze(1)
    counts = is_edge.sum(1)
    owner = torch.repeat_interleave(torch.arange(g, device=device), counts, output_size=len(loc))
    starts = counts.cumsum(0) - counts
    n = owner.shape[0]
    u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64).to(device)
    size = counts[owner]
    pick = starts[owner] + (u * size).long().clamp(max=size - 1)
    stacked = loc[pick]
    anchor = stacked - owner * (h * w)
    theta = thetas.reshape(-1)[stacked]
    dist = torch.randint(
        DIST_LOW, DIST_HIGH + 1, (4, n), generator=generator, device=draw_device
    ).to(device)
    step = dist.to(torch.float64)
    step[:2].neg_()  # signs (-, -, +, +)
    # In place where the operands are temporaries (the same values; 1.4 M-element arrays).
    rows = torch.mul(step, theta.sin().abs_()).round_().long().add_(anchor // w).clamp_(0, h - 1)
    cols = step.mul_(theta.cos().abs_()).round_().long().add_(anchor % w).clamp_(0, w - 1)
    return owner, rows.mul_(w).add_(cols)


def pair_normal_terms(
    pred_normals: torch.Tensor,
    pseudo_normals: torch.Tensor,
    image: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """``|c_gt - c_pred|`` per pair, ``c = |N(a) . N(b)|``, in float64 (spec 4.9).

    Args:
        pred_normals, pseudo_normals: (B, 3, H, W) N_t and N_p.
        image: (M,) long, the batch index of each pair.
        a, b: (M,) long, flat pixel indices ``row * W + col``.

    Returns:
        (M,) float64 terms (gradient flows to ``pred_normals``).
    """
    hw = pred_normals.shape[2] * pred_normals.shape[3]
    at_a, at_b = image * hw + a, image * hw + b
    c_pred = _dots(_gather_normals(pred_normals, at_a), _gather_normals(pred_normals, at_b))
    c_gt = _dots(_gather_normals(pseudo_normals, at_a), _gather_normals(pseudo_normals, at_b))
    return (c_gt.abs() - c_pred.abs()).abs()


def _gather_normals(normals: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """float64 (3, ...) normals of (B, 3, H, W) ``normals`` at flat pixels ``at`` (...) of the
    (B * H * W) raster."""
    # A channel-major copy, then one gather along its pixels: several times faster forward and
    # backward than a strided gather on CPU; gathered first, then widened (the same values as
    # widening the map; a float32 gather moves half the bytes). On CPU index_select, whose
    # backward adds in index order whatever the thread count; on CUDA advanced indexing, whose
    # backward sorts the indices (index_add_ there uses atomics).
    chans = normals.transpose(0, 1).reshape(normals.shape[1], -1)
    flat = at.reshape(-1)
    picked = chans.index_select(1, flat) if chans.device.type == "cpu" else chans[:, flat]
    return picked.reshape(-1, *at.shape).to(torch.float64)


def _dots(na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """``N(a) . N(b)`` of channel-major (3, ...) normals; the products summed in channel
    order, as a sum over a last dim of 3 adds them."""
    return (na[0] * nb[0] + na[1] * nb[1]) + na[2] * nb[2]


def guidance_edge_maps(
    pseudo_depth: torch.Tensor, image: torch.Tensor, pseudo_normals: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two edge maps that guide L_nr's sampling, after suppression (spec 4.9).

    Image edges (:func:`sobel_edge_maps` of I_t's R channel) and normal edges
    (:func:`normal_edge_maps` of N_p, set to 0 within 5 px of the border); both set to 0 on
    the dilated depth edges of P_t: ``E_d >= 0.1 max E_d`` with the max over the **whole
    batch** (pitfall 12), dilated by a 3x3 all-ones kernel (zero padding). Computed in the
    inputs' dtype, like the reference, without gradient.

    Args:
        pseudo_depth: (B, 1, H, W) P_t.
        image: (B, 3, H, W) I_t, normalised.
        pseudo_normals: (B, 3, H, W) N_p.

    Returns:
        ``(edges, thetas)``, each (B, 2, H, W): channel 0 image edges, channel 1 normal edges.
    """
    _check_map("pseudo_depth", pseudo_depth, 1)
    _check_map("image", image, 3)
    _check_map("pseudo_normals", pseudo_normals, 3)
    b, _, h, w = pseudo_depth.shape
    if image.shape != (b, 3, h, w) or pseudo_normals.shape != (b, 3, h, w):
        raise ConfigError(
            f"guidance_edge_maps: pseudo_depth {tuple(pseudo_depth.shape)}, image "
            f"{tuple(image.shape)} and pseudo_normals {tuple(pseudo_normals.shape)} must share "
            "B, H, W"
        )
    if h < 3 or w < 3:
        raise ConfigError(f"guidance_edge_maps: need H, W >= 3, got {h}x{w}")
    with torch.no_grad():
        e_img, th_img = sobel_edge_maps(image)
        e_n, th_n = normal_edge_maps(pseudo_normals)
        border = torch.ones(h, w, dtype=torch.bool, device=e_n.device)
        inner = slice(NORMAL_EDGE_BORDER, -NORMAL_EDGE_BORDER)
        border[inner, inner] = False
        e_d, _ = sobel_edge_maps(pseudo_depth)
        depth_edge = (e_d >= e_d.max() * EDGE_FRACTION).to(e_d.dtype)
        ones = torch.ones(1, 1, 3, 3, dtype=e_d.dtype, device=e_d.device)
        # Pairs across depth discontinuities are left to the ranking loss.
        near_depth_edge = F.conv2d(depth_edge, ones, padding=1).clamp(0, 1) > 0
        e_img = e_img.masked_fill(near_depth_edge, 0.0)
        e_n = e_n.to(e_img.dtype).masked_fill(border | near_depth_edge, 0.0)
        return torch.cat([e_img, e_n], 1), torch.cat([th_img, th_n.to(th_img.dtype)], 1)


def edge_aware_normal_loss(
    pseudo_depth: torch.Tensor,
    image: torch.Tensor,
    pred_normals: torch.Tensor,
    pseudo_normals: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_nr, the edge-aware relative normal loss (spec 4.9, pitfall 12).

    Edge maps from :func:`guidance_edge_maps`; then in float64, per image, one edge-guided
    sampler on the image edges and one on the normal edges (:func:`edge_guided_pairs`, all
    images and both samplers in one call), and the mean of
    ``| |N_p(a).N_p(b)| - |N_t(a).N_t(b)| |`` over all pairs of both samplers and all images.
    Invariant to a positive scale of the pseudo-depth.

    Args:
        pseudo_depth: (B, 1, H, W) P_t.
        image: (B, 3, H, W) I_t, normalised.
        pred_normals: (B, 3, H, W) N_t (gradient flows here).
        pseudo_normals: (B, 3, H, W) N_p.
        generator: RNG (module docstring).

    Returns:
        float64 scalar tensor.
    """
    _check_map("pred_normals", pred_normals, 3)
    if pred_normals.shape != pseudo_normals.shape:
        raise ConfigError(
            f"edge_aware_normal_loss: pred_normals {tuple(pred_normals.shape)} must match "
            f"pseudo_normals {tuple(pseudo_normals.shape)}"
        )
    edges, thetas = guidance_edge_maps(
        pseudo_depth.detach(), image.detach(), pseudo_normals.detach()
    )
    b, _, h, w = edges.shape
    # (B, 2) maps -> 2B groups: image b's image sampler is group 2b, its normal sampler 2b + 1.
    owner, idx = _edge_guided_points(
        edges.to(torch.float64).reshape(2 * b, h, w),
        thetas.to(torch.float64).reshape(2 * b, h, w),
        generator=generator,
        fraction=EDGE_FRACTION,
    )
    image = owner // 2
    if torch.is_grad_enabled() and pseudo_normals.requires_grad:
        # Not the training case (N_p comes from data): autograd through the generic terms.
        a, b_ = idx[:3].reshape(-1), idx[1:].reshape(-1)
        return pair_normal_terms(pred_normals, pseudo_normals, image.repeat(3), a, b_).mean()
    at = image * (h * w) + idx  # (4, N) flat pixels of the (B * H * W) raster
    if torch.is_grad_enabled() and pred_normals.requires_grad:
        return _RelativeNormalLoss.apply(pred_normals, pseudo_normals, at)
    return _RelativeNormalLoss.forward(None, pred_normals, pseudo_normals, at)


class _RelativeNormalLoss(torch.autograd.Function):
    """Mean of :func:`pair_normal_terms` over edge-guided pairs given as four points per anchor.

    ``at`` (4, N): flat pixels of q1..q4 in the (B * H * W) raster; the pairs (q1, q2),
    (q2, q3), (q3, q4) in :func:`edge_guided_pairs`' layout, so the value equals
    ``pair_normal_terms(...).mean()`` on its pairs bit for bit. The four points are gathered
    once (not six times) and the backward is written out: autograd's chain through the
    slices of the gathered normals materialised a dozen zero-filled (3, 3, N) gradients.
    """

    @staticmethod
    def forward(
        ctx: Any, pred_normals: torch.Tensor, pseudo_normals: torch.Tensor, at: torch.Tensor
    ) -> torch.Tensor:
        n_pred = _gather_normals(pred_normals, at)  # (3, 4, N) float64
        n_gt = _gather_normals(pseudo_normals, at)
        dot = _dots(n_pred[:, :-1], n_pred[:, 1:])  # (3, N): (q1, q2), (q2, q3), (q3, q4)
        diff = _dots(n_gt[:, :-1], n_gt[:, 1:]).abs() - dot.abs()
        if ctx is not None:
            ctx.save_for_backward(n_pred, dot, diff, at)
            ctx.shape = pred_normals.shape
            ctx.dtype = pred_normals.dtype
        return diff.abs().reshape(-1).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        n_pred, dot, diff, at = ctx.saved_tensors
        b, c, h, w = ctx.shape
        # d mean |c_gt - |dot|| / d dot, per pair (autograd's sgn: 0 at 0).
        coef = (grad / diff.numel()) * -(diff.sgn() * dot.sgn())  # (3, N)
        g_pts = torch.zeros_like(n_pred)  # (3, 4, N): d loss / d normal at q1..q4
        g_pts[:, :-1] += coef * n_pred[:, 1:]
        g_pts[:, 1:] += coef * n_pred[:, :-1]
        flat, g_flat = at.reshape(-1), g_pts.reshape(c, -1)
        if g_pts.device.type == "cpu":
            # Adds in index order: the same gradient on every run with any thread count.
            g_map = n_pred.new_zeros(c, b * h * w).index_add_(1, flat, g_flat)
        else:
            # index_add_ uses atomics on CUDA; accumulating index_put_ sorts the indices.
            g_rows = n_pred.new_zeros(b * h * w, c).index_put_((flat,), g_flat.t(), accumulate=True)
            g_map = g_rows.t()
        g_map = g_map.to(ctx.dtype).reshape(c, b, h, w).transpose(0, 1)
        return g_map, None, None


# --------------------------------------------------------------------------------------------
# Total.


def _v3_weights(weights: str | Mapping[str, float]) -> Mapping[str, float]:
    if isinstance(weights, str):
        if weights not in V3_LOSS_WEIGHTS:
            raise ConfigError(
                f"weights must be one of {tuple(V3_LOSS_WEIGHTS)} or a mapping, got {weights!r}"
            )
        return V3_LOSS_WEIGHTS[weights]
    unknown = set(weights) - set(V3_LOSS_WEIGHTS["head"])
    if unknown:
        raise ConfigError(
            f"v3 weights: unknown term(s) {sorted(unknown)}; expected keys from "
            f"{sorted(V3_LOSS_WEIGHTS['head'])}"
        )
    return weights


def sc_depth_v3_losses(
    target: torch.Tensor,
    refs: Sequence[torch.Tensor],
    target_depth: torch.Tensor,
    ref_depths: Sequence[torch.Tensor],
    K: torch.Tensor,
    poses: Sequence[torch.Tensor],
    poses_inv: Sequence[torch.Tensor],
    pseudo_depth: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    weights: str | Mapping[str, float] = "head",
    ranking_numerics: RankingNumerics = "reference",
    stable_sort: bool = False,
    ranking_depth: RankingDepth = "raw",
    no_ssim: bool = False,
    no_auto_mask: bool = False,
    no_dynamic_mask: bool = False,
    no_min_optimize: bool = False,
    convention: Convention = "reference",
    padding_mode: str = "zeros",
) -> dict[str, torch.Tensor]:
    """All SC-DepthV3 loss terms of one step and their weighted total (spec 0, 4.6-4.10).

    Same arguments as :func:`mesadepth.losses.photometric.sc_depth_v2_losses` plus the target's
    pseudo-depth; v3 has no ARN (raw references, pitfall 13) and no smoothness term.
    ``N_t = normals(D_t, K)``, ``N_p = normals(P_t, K)`` (spec 3.6, same K); L_photo, L_geo
    (4.1-4.3); M_dyn from the forward maps (4.6); L_nm (4.7); L_mr (4.8); L_nr (4.9).
    The pseudo-depth is detached (it is data; no gradient reaches it).

    Args:
        target: (B, 3, H, W) I_t (normalised).
        refs: I_rj, each (B, 3, H, W), order frame i-k then i+k.
        target_depth: (B, 1, H, W) D_t.
        ref_depths: D_rj, each (B, 1, H, W).
        K: (B, 3, 3) or (3, 3) intrinsics of the training images.
        poses, poses_inv: T_j = PoseNet(I_t, I_rj) and PoseNet(I_rj, I_t), (B, 6) or matrices.
        pseudo_depth: (B, 1, H, W) P_t, raw (any positive scale, e.g. 0..60000).
        generator: RNG of L_mr then L_nr (module docstring); None = torch's default CPU one.
        weights: ``"head"`` (1.0/0.1/0.1/0.1/0.1 for photo/geometry/normal_matching/mask_rank/
            normal_rank) or a mapping with a subset of these keys.
        ranking_numerics: L_mr's ``"reference"`` or ``"safe"`` logistic (:func:`ranking_loss`).
        stable_sort: L_mr's tie breaking (:func:`unreliable_mask`).
        ranking_depth: what L_mr's logistic compares (:func:`ranking_depth`; ``"raw"`` =
            the reference).
        no_*: the reference's ablation flags (spec 4.10).
        convention, padding_mode: see :func:`mesadepth.geometry.inverse_warp`.

    Returns:
        Dict of scalar tensors: ``photo``, ``geometry``, ``normal_matching``, ``mask_rank``,
        ``normal_rank`` (float64) and ``total`` (float64, promoted by L_nr as in the reference).
    """
    if pseudo_depth.shape != target_depth.shape:
        raise ConfigError(
            f"sc_depth_v3_losses: pseudo_depth {tuple(pseudo_depth.shape)} must match "
            f"target_depth {tuple(target_depth.shape)} (B, 1, H, W)"
        )
    w = _v3_weights(weights)
    pseudo = pseudo_depth.detach()
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
    # maps are [fwd_1, bwd_1, fwd_2, bwd_2, ...]: the forward ones are the even entries.
    m_dyn = dynamic_mask(pg.maps[0::2])
    pred_normals = depth_to_normals(target_depth, K)
    pseudo_normals = depth_to_normals(pseudo, K)
    terms = {
        "photo": pg.photo,
        "geometry": pg.geometry,
        "normal_matching": normal_matching_loss(pred_normals, pseudo_normals),
        "mask_rank": confident_ranking_loss(
            target_depth,
            pseudo,
            m_dyn,
            generator=generator,
            numerics=ranking_numerics,
            stable_sort=stable_sort,
            depth=ranking_depth,
        ),
        "normal_rank": edge_aware_normal_loss(
            pseudo, target, pred_normals, pseudo_normals, generator=generator
        ),
    }
    terms["total"] = total_loss(terms, w)
    return terms
