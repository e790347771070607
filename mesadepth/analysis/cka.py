"""CKA layer-wise analysis of encoders, streamed over a dataset (spec teacher-and-cka.md Part B).

Two analyses, computed in **one** pass over the images (every encoder runs on every batch, so
all of them see the same images in the same order, pitfall 19):

1. within an encoder: the all-layer-vs-all-layer matrix (9 x 9 for the paper layers of spec
   masked-pretraining-and-finetuning.md 3.1; row 0 is MeSa's "layer vs layer 0" curve);
2. between two encoders (pre-trained ``A`` vs fine-tuned ``B``): layer i of A vs layer j of B,
   whose diagonal is the per-layer change caused by fine-tuning (B5).

Estimators (B1-B4), chosen with ``estimator`` and ``kernel``:

- ``minibatch`` (default): Nguyen et al.'s minibatch CKA (B3), the sum over batches of the
  unbiased HSIC_1 of every layer pair divided by the geometric mean of the self sums. The
  per-batch sums are kept in float64 for every (i, j) pair; features are never stored, so memory
  is bounded by one batch (:class:`CKAAccumulator`). It estimates **debiased** CKA (pitfall 18),
  and equals it exactly when one batch holds every image. Batches of fewer than 4 images are
  skipped (pitfall 22).
- ``debiased`` / ``biased``: full n x n Gram matrices (U-centred, B2, or centred, B1). Gram
  entries pair every image with every other, so the flattened features of all images are held
  (float32, on the CPU) until the end (B6 (a)); ``feature_budget_bytes`` refuses runs that
  would not fit. Biased linear CKA is strongly inflated when features outnumber images
  (pitfall 17): prefer the debiased or minibatch estimators for flattened Swin maps.
- ``kernel="rbf"`` (full-Gram estimators only): K = exp(-D / (2 t^2 median(D))), the median
  over all n^2 squared distances including the zero diagonal (B4, pitfall 21).

Flattening of a tap (B5.1): ``flatten`` (one row per image, all h*w*C values; default),
``mean_pool`` (mean over tokens, C values) or ``tokens_as_examples`` (one row per image token,
exact streaming biased linear CKA in feature space; pairs of layers with different token grids
are undefined and reported as NaN, pitfall 23).

Numerics (B7): features are centred over examples and every Gram product is formed in float64
(never TF32); a layer whose features are constant over the images (e.g. a freshly built timm
encoder, whose res-post-norm ``norm1`` weights are zero) has no defined CKA: its rows and
columns are NaN and listed in :attr:`CKAResult.flags`. Raw values are kept (debiased values may
be slightly negative, pitfall 27); only the heatmaps' colour scale is clipped to [0, 1].

Input images (uint8 (H, W, 3) RGB) are prepared per encoder by :class:`ImagePreprocess`:
centre crop to the encoder's aspect ratio (480 x 640 NYUv2 -> columns 80..559 for a square
encoder, B5), bilinear resize to the encoder's ``img_size`` (half-pixel centres, no
antialiasing, the OpenCV ``INTER_LINEAR`` rule), /255, ImageNet mean/std. Pass ``preprocess``
to use another convention.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.models.backbone import paper_layers, resolve_layers, tap

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CKAAccumulator",
    "CKAResult",
    "FeatureStore",
    "ImagePreprocess",
    "TokenCKAAccumulator",
    "analyse",
    "centre_gram",
    "cka",
    "cka_from_grams",
    "cka_matrix_from_grams",
    "collate_images",
    "encoder_features",
    "flatten_features",
    "gram_linear",
    "hsic_unbiased",
    "linear_cka_features",
    "make_loader",
    "minibatch_cka",
    "open_dataset",
    "rbf_gram",
    "run_cka",
    "u_centre_gram",
    "write_outputs",
]

log = logging.getLogger(__name__)

Estimator = Literal["minibatch", "debiased", "biased"]
Kernel = Literal["linear", "rbf"]
Mode = Literal["flatten", "mean_pool", "tokens_as_examples"]
ESTIMATORS: tuple[str, ...] = ("minibatch", "debiased", "biased")
KERNELS: tuple[str, ...] = ("linear", "rbf")
MODES: tuple[str, ...] = ("flatten", "mean_pool", "tokens_as_examples")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_F64 = torch.float64
# Elements of one float64 column chunk when forming a Gram matrix: 2^24 x 8 B = 128 MiB.
_CHUNK_ELEMS = 2**24


# ---------------------------------------------------------------------------------------------
# Gram matrices and their centrings (B1, B2, B4).


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x
    a = np.asarray(x)
    # torch rejects negative strides (reversed views) and warns on read-only arrays
    # (memory-mapped images); a copy fixes both and is cheap next to the Gram products.
    if not a.flags.writeable or any(st < 0 for st in a.strides):
        a = a.copy()
    return torch.from_numpy(a)


def gram_linear(x: Tensor | np.ndarray, chunk_elems: int = _CHUNK_ELEMS) -> Tensor:
    """Linear Gram K = X~ X~^T (n, n) float64 of features x (n, ...) (spec B1, B6, B7).

    Trailing axes are flattened (feature order is irrelevant, B1). Columns are centred over the
    n examples and multiplied in float64, ``chunk_elems`` values at a time, so large feature
    offsets cannot cancel catastrophically (B7) and memory stays O(n^2 + chunk). The centring
    makes K the centred Gram H K H; every estimator here is invariant to it.
    """
    x = _as_tensor(x)
    n = int(x.shape[0])
    x = x.reshape(n, -1)
    step = max(1, chunk_elems // max(n, 1))
    k = torch.zeros((n, n), dtype=_F64, device=x.device)
    for s in range(0, x.shape[1], step):
        c = x[:, s : s + step].to(_F64)
        c = c - c.mean(0, keepdim=True)
        k.addmm_(c, c.T)
    return k


def centre_gram(k: Tensor | np.ndarray) -> Tensor:
    """H K H with H = I - 11^T/n (spec B1), computed from row/column means in float64."""
    k = _as_tensor(k).to(_F64)
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def u_centre_gram(k: Tensor | np.ndarray) -> Tensor:
    """U-centring of a symmetric Gram matrix (spec B2; Szekely & Rizzo 2014), float64, n >= 4.

    Zero diagonal; s_j = sum_i K_ij / (n - 2) - sum(s) / (2 (n - 1)); K_u,ij = K_ij - s_i - s_j
    off the diagonal. <K_u, L_u> / (n (n - 3)) is the unbiased HSIC estimator.
    """
    k = _as_tensor(k).to(_F64).clone()
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"U-centring needs n >= 4 examples, got {n}")
    k.fill_diagonal_(0.0)
    s = k.sum(0) / (n - 2)
    s = s - s.sum() / (2 * (n - 1))
    k = k - s[:, None] - s[None, :]
    k.fill_diagonal_(0.0)
    return k


def hsic_unbiased(k: Tensor | np.ndarray, l: Tensor | np.ndarray) -> float:
    """Unbiased HSIC_1 of one batch (spec B3 formula; Song et al. 2012), n >= 4.

    [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3)), K~ = K with a
    zero diagonal. O(n^2): 1'K~L~1 is the dot product of K~'s column sums and L~'s row sums.
    """
    kt = _as_tensor(k).to(_F64).clone()
    lt = _as_tensor(l).to(_F64).clone()
    n = kt.shape[0]
    if n < 4:
        raise ValueError(f"HSIC_1 needs n >= 4 examples, got {n}")
    kt.fill_diagonal_(0.0)
    lt.fill_diagonal_(0.0)
    trace = (kt * lt.T).sum()
    sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (kt.sum(0) @ lt.sum(1))
    return float((trace + sums - cross) / (n * (n - 3)))


def rbf_gram(gram: Tensor | np.ndarray, threshold: float = 0.5) -> Tensor:
    """RBF kernel matrix from a linear Gram G (spec B4), float64.

    D_ij = G_ii + G_jj - 2 G_ij (tiny negatives clamped to 0); sigma^2 = t^2 median(D) with the
    median over all n^2 entries **including** the zero diagonal (the Demo's rule, pitfall 21);
    K = exp(-D / (2 sigma^2)). All-identical examples (median 0) give a constant K, whose CKA
    is then undefined (NaN).
    """
    if not threshold > 0:
        raise ConfigError(f"RBF threshold t must be > 0, got {threshold!r}")
    g = _as_tensor(gram).to(_F64)
    d = torch.diagonal(g)
    dist = (d[:, None] + d[None, :] - 2.0 * g).clamp_(min=0.0)
    # numpy's median averages the two middle values of an even count, as the Demo does;
    # torch.median would return the lower one.
    med = float(np.median(dist.cpu().numpy()))
    if med <= 0:
        return torch.ones_like(dist)
    return torch.exp(-dist / (2.0 * threshold**2 * med))


def _kernel(gram: Tensor, kernel: str, threshold: float) -> Tensor:
    if kernel == "linear":
        return gram
    if kernel == "rbf":
        return rbf_gram(gram, threshold)
    raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def cka_from_grams(k: Tensor | np.ndarray, l: Tensor | np.ndarray, debiased: bool = False) -> float:
    """CKA of two kernel matrices (n, n) over the same examples (spec B1 / B2).

    Biased: <K_c, L_c> / (|K_c| |L_c|) with K_c = H K H; debiased: the same with U-centred
    matrices. NaN when a denominator is 0 (constant features, B7).
    """
    kc = u_centre_gram(k) if debiased else centre_gram(k)
    lc = u_centre_gram(l) if debiased else centre_gram(l)
    den = math.sqrt(float((kc * kc).sum()) * float((lc * lc).sum()))
    return float((kc * lc).sum()) / den if den > 0 else math.nan


def cka(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    kernel: Kernel = "linear",
    debiased: bool = False,
    threshold: float = 0.5,
) -> float:
    """CKA between features x (n, ...) and y (n, ...) of the same n examples (spec B1, B2, B4).

    Trailing axes are flattened. ``kernel="rbf"`` uses :func:`rbf_gram` with ``threshold``.
    """
    gx, gy = gram_linear(x), gram_linear(y)
    if gx.shape != gy.shape:
        raise ValueError(
            f"x and y need the same number of examples, got {gx.shape[0]} and {gy.shape[0]}"
        )
    return cka_from_grams(
        _kernel(gx, kernel, threshold), _kernel(gy, kernel, threshold), debiased=debiased
    )


def linear_cka_features(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, debiased: bool = False
) -> float:
    """Linear CKA in feature space (spec B1, B2): cheaper than Grams when p, q < n.

    x: (n, p), y: (n, q). Biased: |Y~'X~|_F^2 / (|X~'X~|_F |Y~'Y~|_F); debiased: the D(...)
    correction of B2 with the row squared norms of the centred features.
    """
    xt = _as_tensor(x).to(_F64)
    yt = _as_tensor(y).to(_F64)
    n = xt.shape[0]
    xt = xt.reshape(n, -1)
    yt = yt.reshape(n, -1)
    xt = xt - xt.mean(0, keepdim=True)
    yt = yt - yt.mean(0, keepdim=True)
    xy = float((yt.T @ xt).square().sum())
    xx = float((xt.T @ xt).square().sum())
    yy = float((yt.T @ yt).square().sum())
    if debiased:
        if n < 4:
            raise ValueError(f"debiased CKA needs n >= 4 examples, got {n}")
        rx, ry = xt.square().sum(1), yt.square().sum(1)
        sx, sy = float(rx.sum()), float(ry.sum())

        def d(a: float, ra: Tensor, rb: Tensor, sa: float, sb: float) -> float:
            return a - n / (n - 2) * float(ra @ rb) + sa * sb / ((n - 1) * (n - 2))

        xy, xx, yy = d(xy, rx, ry, sx, sy), d(xx, rx, rx, sx, sx), d(yy, ry, ry, sy, sy)
        den = math.sqrt(max(xx, 0.0) * max(yy, 0.0))
    else:
        den = math.sqrt(xx * yy)
    return xy / den if den > 0 else math.nan


def _centred_stack(
    grams: Sequence[Tensor], kernel: str, debiased: bool, threshold: float
) -> Tensor:
    """(L, n*n) stack of centred (or U-centred) kernel matrices, one row per layer."""
    rows = []
    for g in grams:
        k = _kernel(g, kernel, threshold)
        rows.append((u_centre_gram(k) if debiased else centre_gram(k)).reshape(-1))
    return torch.stack(rows)


def _ratio(num: Tensor, den_a: Tensor, den_b: Tensor) -> np.ndarray:
    """num / sqrt(den_a den_b^T), NaN where a self term is not positive (B7 guard)."""
    den = torch.sqrt(torch.outer(den_a.clamp(min=0), den_b.clamp(min=0)))
    ok = (den_a[:, None] > 0) & (den_b[None, :] > 0)
    out = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.nan)
    return out.cpu().numpy()


def cka_matrix_from_grams(
    grams_a: Sequence[Tensor],
    grams_b: Sequence[Tensor] | None = None,
    kernel: Kernel = "linear",
    debiased: bool = False,
    threshold: float = 0.5,
) -> np.ndarray:
    """(La, Lb) CKA matrix between two lists of linear Grams (n, n) over the same images.

    ``grams_b=None`` gives the within-model matrix of ``grams_a`` (symmetric, unit diagonal).
    One matrix product of the stacked centred kernels gives every pair at once.
    """
    a = _centred_stack(grams_a, kernel, debiased, threshold)
    b = a if grams_b is None else _centred_stack(grams_b, kernel, debiased, threshold)
    if a.shape[1] != b.shape[1]:
        raise ValueError("the two Gram lists cover different numbers of examples")
    na = (a * a).sum(1)
    nb = na if b is a else (b * b).sum(1)
    return _ratio(a @ b.T, na, nb)


# ---------------------------------------------------------------------------------------------
# Streaming accumulators.


def _rows(feats: Sequence[Tensor], what: str) -> int:
    if len(feats) == 0:
        raise ValueError(f"{what}: expected at least one layer's features")
    n = {int(f.shape[0]) for f in feats}
    if len(n) != 1:
        raise ValueError(f"{what}: layers disagree on the number of examples: {sorted(n)}")
    return n.pop()


def u_centred_stack(feats: Sequence[Tensor]) -> Tensor:
    """(L, n*n) float64: the U-centred linear Gram of each layer's batch features (n, ...)."""
    return torch.stack([u_centre_gram(gram_linear(f)).reshape(-1) for f in feats])


class CKAAccumulator:
    """Minibatch CKA (Nguyen et al. 2021, spec B3) for every (layer i of A, layer j of B).

    State (all float64, fixed size whatever the number of batches): ``hsic_ab`` (La, Lb), the
    sums over batches of HSIC_1(K_i, L_j); ``hsic_aa`` (La,) and ``hsic_bb`` (Lb,), the self
    sums. :meth:`result` = hsic_ab / sqrt(hsic_aa hsic_bb^T). Both sides must be fed the same
    examples in the same order. A batch with fewer than 4 examples is skipped and counted.
    """

    def __init__(self, n_layers_a: int, n_layers_b: int) -> None:
        if n_layers_a < 1 or n_layers_b < 1:
            raise ConfigError(
                f"CKAAccumulator needs >= 1 layer per side, got {n_layers_a}, {n_layers_b}"
            )
        self.n_layers_a = int(n_layers_a)
        self.n_layers_b = int(n_layers_b)
        self.hsic_ab = torch.zeros((self.n_layers_a, self.n_layers_b), dtype=_F64)
        self.hsic_aa = torch.zeros(self.n_layers_a, dtype=_F64)
        self.hsic_bb = torch.zeros(self.n_layers_b, dtype=_F64)
        self.batches = 0
        self.examples = 0
        self.skipped_batches = 0
        self.skipped_examples = 0

    def skip(self, n: int) -> None:
        """Record a batch left out (fewer than 4 examples: HSIC_1 divides by n (n - 3))."""
        self.skipped_batches += 1
        self.skipped_examples += int(n)

    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> bool:
        """Add one batch: ``feats_a[i]`` (n, ...) per layer of A, ``feats_b[j]`` likewise.

        Passing the same list object twice (within-model) computes its Grams once. Returns
        False when the batch was skipped (n < 4).
        """
        if len(feats_a) != self.n_layers_a or len(feats_b) != self.n_layers_b:
            raise ValueError(
                f"expected {self.n_layers_a} and {self.n_layers_b} layers, got {len(feats_a)} and {len(feats_b)}"
            )
        n = _rows(feats_a, "feats_a")
        if _rows(feats_b, "feats_b") != n:
            raise ValueError("feats_a and feats_b must hold the same examples (same batch size)")
        if n < 4:
            self.skip(n)
            return False
        ua = u_centred_stack(feats_a)
        ub = ua if feats_b is feats_a else u_centred_stack(feats_b)
        self.update_u(ua, ub)
        return True

    def update_u(self, ua: Tensor, ub: Tensor) -> None:
        """Add one batch given as U-centred Gram stacks (La, n*n) and (Lb, n*n) (shared Grams)."""
        n2 = ua.shape[1]
        n = math.isqrt(n2)
        if (
            n * n != n2
            or ub.shape[1] != n2
            or ua.shape[0] != self.n_layers_a
            or ub.shape[0] != self.n_layers_b
        ):
            raise ValueError(
                f"U-centred stacks of shape {tuple(ua.shape)} and {tuple(ub.shape)} do not fit"
            )
        if n < 4:
            self.skip(n)
            return
        scale = 1.0 / (n * (n - 3))
        self.hsic_ab += (ua @ ub.T).cpu() * scale
        aa = (ua * ua).sum(1).cpu() * scale
        self.hsic_aa += aa
        self.hsic_bb += aa if ub is ua else (ub * ub).sum(1).cpu() * scale
        self.batches += 1
        self.examples += n

    def result(self) -> np.ndarray:
        """(La, Lb) minibatch CKA; NaN for a constant layer or before any batch."""
        return _ratio(self.hsic_ab, self.hsic_aa, self.hsic_bb)

    def buffers(self) -> dict[str, Tensor]:
        """The stored state (what memory boundedness is about)."""
        return {"hsic_ab": self.hsic_ab, "hsic_aa": self.hsic_aa, "hsic_bb": self.hsic_bb}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers().values())


def minibatch_cka(batches: Iterable[tuple[Tensor | np.ndarray, Tensor | np.ndarray]]) -> float:
    """Minibatch CKA of one pair of representations over ``(x_batch, y_batch)`` pairs (B3)."""
    acc = CKAAccumulator(1, 1)
    for x, y in batches:
        acc.update([_as_tensor(x)], [_as_tensor(y)])
    return float(acc.result()[0, 0])


class FeatureStore:
    """Every image's flattened features per layer, for the full-Gram estimators (spec B6 (a)).

    Batches are kept as they come (float32 unless given float64, on the CPU); :meth:`grams`
    forms each layer's n x n Gram by column chunks across the stored batches, centred over all
    n images in float64. Memory grows with n (n x p values per layer): the streaming
    alternative is :class:`CKAAccumulator`.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = int(n_layers)
        self.batches: list[list[Tensor]] = [[] for _ in range(self.n_layers)]
        self.n = 0
        self.nbytes = 0

    def add(self, feats: Sequence[Tensor]) -> None:
        """Append one batch, ``feats[l]`` (b, ...) per layer."""
        if len(feats) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {len(feats)}")
        b = _rows(feats, "feats")
        for store, f in zip(self.batches, feats, strict=True):
            f = f.detach().reshape(b, -1).cpu()
            if f.dtype != _F64:
                f = f.float()
            store.append(f)
            self.nbytes += f.numel() * f.element_size()
        self.n += b

    def grams(self, chunk_elems: int = _CHUNK_ELEMS) -> list[Tensor]:
        """One centred linear Gram (n, n) float64 per layer."""
        out = []
        step = max(1, chunk_elems // max(self.n, 1))
        for store in self.batches:
            k = torch.zeros((self.n, self.n), dtype=_F64)
            p = store[0].shape[1] if store else 0
            for s in range(0, p, step):
                c = torch.cat([t[:, s : s + step] for t in store]).to(_F64)
                c = c - c.mean(0, keepdim=True)
                k.addmm_(c, c.T)
            out.append(k)
        return out


class TokenCKAAccumulator:
    """Biased linear CKA with every (image, token) pair as an example (spec B5.1), streamed.

    Exact in feature space: per layer the row count N, a shift, the sum of shifted rows and
    X'X (C x C) in float64; per pair X'Y; then X~'Y~ = X'Y - N m_x m_y' (shifted). The shift is
    the first batch's mean, which removes large common offsets before the float64 sums (B7).
    Pairs whose token grids differ have no defined value (pitfall 23) and give NaN. State size
    depends on the channel counts only.
    """

    def __init__(self, n_layers_a: int, n_layers_b: int) -> None:
        self.n_layers_a = int(n_layers_a)
        self.n_layers_b = int(n_layers_b)
        self.grids_a: list[tuple[int, ...]] | None = None
        self.grids_b: list[tuple[int, ...]] | None = None
        self.side_a: list[dict[str, Tensor]] = []
        self.side_b: list[dict[str, Tensor]] = []
        self.cross: dict[tuple[int, int], Tensor] = {}
        self.rows = 0
        self.batches = 0

    @staticmethod
    def _grid(f: Tensor) -> tuple[int, ...]:
        return tuple(int(s) for s in f.shape[1:-1])

    @staticmethod
    def _tokens(f: Tensor, shift: Tensor) -> Tensor:
        return f.reshape(-1, f.shape[-1]).to(_F64) - shift

    def _init_side(self, feats: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        side = []
        for f in feats:
            c = int(f.shape[-1])
            shift = f.reshape(-1, c).to(_F64).mean(0).cpu()
            side.append(
                {
                    "shift": shift,
                    "sum": torch.zeros(c, dtype=_F64),
                    "xtx": torch.zeros((c, c), dtype=_F64),
                }
            )
        return side

    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        """Add one batch of tap outputs (B, h, w, C) or (B, T, C) for A and B."""
        if len(feats_a) != self.n_layers_a or len(feats_b) != self.n_layers_b:
            raise ValueError(
                f"expected {self.n_layers_a} and {self.n_layers_b} layers, got {len(feats_a)} and {len(feats_b)}"
            )
        same = feats_b is feats_a
        if self.grids_a is None:
            self.grids_a = [self._grid(f) for f in feats_a]
            self.grids_b = [self._grid(f) for f in feats_b]
            self.side_a = self._init_side(feats_a)
            self.side_b = self.side_a if same else self._init_side(feats_b)
            for i, ga in enumerate(self.grids_a):
                for j, gb in enumerate(self.grids_b):
                    if ga == gb:
                        ca, cb = feats_a[i].shape[-1], feats_b[j].shape[-1]
                        self.cross[(i, j)] = torch.zeros((ca, cb), dtype=_F64)
        if [self._grid(f) for f in feats_a] != self.grids_a or [
            self._grid(f) for f in feats_b
        ] != self.grids_b:
            raise ValueError("token grids changed between batches")
        n = _rows(feats_a, "feats_a")
        if _rows(feats_b, "feats_b") != n:
            raise ValueError("feats_a and feats_b must hold the same images")
        ta = [
            self._tokens(f, s["shift"].to(f.device))
            for f, s in zip(feats_a, self.side_a, strict=True)
        ]
        tb = (
            ta
            if same
            else [
                self._tokens(f, s["shift"].to(f.device))
                for f, s in zip(feats_b, self.side_b, strict=True)
            ]
        )
        for side, toks in ((self.side_a, ta),) if same else ((self.side_a, ta), (self.side_b, tb)):
            for s, t in zip(side, toks, strict=True):
                s["sum"] += t.sum(0).cpu()
                s["xtx"] += (t.T @ t).cpu()
        for (i, j), m in self.cross.items():
            m += (ta[i].T @ tb[j]).cpu()
        self.rows += n
        self.batches += 1

    def result(self) -> np.ndarray:
        """(La, Lb) CKA; NaN for pairs with different token grids or constant features."""
        out = np.full((self.n_layers_a, self.n_layers_b), np.nan)
        if self.grids_a is None:
            return out

        def centred(m: Tensor, sa: dict[str, Tensor], sb: dict[str, Tensor], count: int) -> Tensor:
            return m - torch.outer(sa["sum"], sb["sum"]) / count

        for (i, j), m in self.cross.items():
            ga, gb = self.grids_a[i], self.grids_b[j]  # type: ignore[index]
            count = self.rows * math.prod(ga)
            sa, sb = self.side_a[i], self.side_b[j]
            num = float(centred(m, sa, sb, count).square().sum())
            da = float(centred(sa["xtx"], sa, sa, count).square().sum())
            db = float(centred(sb["xtx"], sb, sb, count).square().sum())
            if da > 0 and db > 0 and ga == gb:
                out[i, j] = num / math.sqrt(da * db)
        return out

    def buffers(self) -> dict[str, Tensor]:
        bufs = {f"cross.{i}.{j}": m for (i, j), m in self.cross.items()}
        for tag, side in (("a", self.side_a), ("b", self.side_b)):
            for i, s in enumerate(side):
                bufs.update({f"{tag}.{i}.{k}": v for k, v in s.items()})
        return bufs

    @property
    def nbytes(self) -> int:
        seen = {id(t): t for t in self.buffers().values()}
        return sum(t.numel() * t.element_size() for t in seen.values())


# ---------------------------------------------------------------------------------------------
# Images in, tap outputs out.


def _size_of(encoder: nn.Module) -> tuple[int, int]:
    size = getattr(getattr(encoder, "patch_embed", None), "img_size", None)
    if size is None:
        raise ConfigError(
            f"{type(encoder).__name__} has no patch_embed.img_size; pass preprocess= explicitly"
        )
    return (int(size[0]), int(size[1]))


class ImagePreprocess:
    """uint8 RGB images -> normalised encoder input (B, 3, H, W) float32 (spec B5, B9 pitfall 19).

    Per image: ``crop="center"`` takes the largest centred window with the target's aspect
    ratio (480 x 640 NYUv2 -> columns 80..559 for a square target; ``"none"`` keeps the whole
    image, stretching it), then bilinear resize to ``size`` = (H, W) (half-pixel centres, no
    antialiasing, OpenCV's INTER_LINEAR rule; skipped when already that size), /255, then
    (x - mean) / std per channel (ImageNet by default, the fine-tuning convention).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop: Literal["center", "none"] = "center",
    ) -> None:
        self.size = (
            (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        if crop not in ("center", "none"):
            raise ConfigError(f"crop must be 'center' or 'none', got {crop!r}")
        self.crop = crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the centred crop of an h x w image (exclusive ends)."""
        if self.crop == "none":
            return (0, h, 0, w)
        th, tw = self.size
        if w * th > h * tw:  # wider than the target: keep the height
            cw = max(1, round(h * tw / th))
            x0 = (w - cw) // 2
            return (0, h, x0, x0 + cw)
        ch = max(1, round(w * th / tw))
        y0 = (h - ch) // 2
        return (y0, y0 + ch, 0, w)

    def one(self, image: np.ndarray | Tensor) -> Tensor:
        """(H, W, 3) uint8 -> (3, size) float32 in [0, 1], cropped and resized (not normalised)."""
        src = _as_tensor(image)
        if src.dim() != 3 or src.shape[-1] != 3:
            raise DataError(
                "<image>", f"expected an (H, W, 3) RGB image, got shape {tuple(src.shape)}"
            )
        y0, y1, x0, x1 = self.crop_box(int(src.shape[0]), int(src.shape[1]))
        t = src[y0:y1, x0:x1].permute(2, 0, 1).float()
        if src.dtype == torch.uint8:  # float images are taken to be in [0, 1] already
            t = t / 255.0
        if tuple(t.shape[1:]) != self.size:
            t = F.interpolate(
                t[None], size=self.size, mode="bilinear", align_corners=False, antialias=False
            )[0]
        return t

    def __call__(self, images: Sequence[np.ndarray] | Tensor) -> Tensor:
        """A batch of (H, W, 3) uint8 images (list, or a (B, H, W, 3) tensor) -> (B, 3, H, W)."""
        x = torch.stack([self.one(im) for im in images])
        return (x - self.mean) / self.std

    def describe(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "crop": self.crop,
            "resize": "bilinear, half-pixel, no antialias",
            "mean": [round(float(v), 6) for v in self.mean.flatten()],
            "std": [round(float(v), 6) for v in self.std.flatten()],
        }


def encoder_features(
    encoder: nn.Module, images: Tensor, layers: Sequence[str | int] | None = None
) -> list[Tensor]:
    """Tap outputs of ``layers`` (default: the paper's nine, scaled) for a normalised batch.

    images: (B, 3, H, W) at the encoder's input size. Returns one tensor per layer in the
    given order, timm NHWC (B, h, w, C) (masked-pretraining spec 3.1). Runs in eval mode
    under no-grad (pitfall 26) and restores the encoder's previous mode.
    """
    names = resolve_layers(layers, encoder) if layers is not None else paper_layers(encoder)  # type: ignore[arg-type]
    param = next(encoder.parameters(), None)
    if param is not None:
        images = images.to(param.device)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), tap(encoder, names) as store:
            encoder.forward_features(images)  # type: ignore[operator]
    finally:
        encoder.train(was_training)
    return [store[n] for n in names]


def flatten_features(f: Tensor, mode: Mode = "flatten") -> Tensor:
    """One tap output (B, h, w, C) -> estimator rows (spec B5.1).

    ``flatten``: (B, h*w*C); ``mean_pool``: (B, C) float64 token mean; ``tokens_as_examples``:
    (B*h*w, C).
    """
    b, c = int(f.shape[0]), int(f.shape[-1])
    if mode == "flatten":
        return f.reshape(b, -1)
    if mode == "mean_pool":
        return f.reshape(b, -1, c).to(_F64).mean(1)
    if mode == "tokens_as_examples":
        return f.reshape(-1, c)
    raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Data: datasets, loaders, batches.


def collate_images(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DataLoader collate keeping images as a list (sizes may differ) plus an id per image."""
    ids = []
    for s in samples:
        ident = next((s[k] for k in ("name", "key", "index") if k in s), None)
        ids.append(None if ident is None else str(ident))
    return {"image": [s["image"] for s in samples], "id": ids}


def make_loader(
    dataset: Any,
    batch_size: int = 32,
    max_images: int | None = None,
    shuffle_seed: int | None = None,
    workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over the first ``max_images`` samples with :func:`collate_images`.

    Order is fixed (pitfall 19) unless ``shuffle_seed`` is given: then each pass draws a new
    permutation from one seeded generator, reproducibly (minibatch passes, B3).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if max_images is not None:
        if max_images < 1:
            raise ConfigError(f"max images must be >= 1, got {max_images}")
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    sampler = None
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(int(shuffle_seed))
        sampler = torch.utils.data.RandomSampler(dataset, generator=g)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
    )


def open_dataset(kind: str, data: str | os.PathLike[str], split: str = "test") -> Any:
    """The dataset ``mesadepth cka --dataset`` reads; every sample has ``image`` (H, W, 3) uint8.

    ``nyu``: a folder holding ``nyu_depth_v2_labeled.mat`` and ``splits.mat`` (or the .mat),
    split ``test`` = the 654 Eigen test images; ``folder``: an image folder (recursive,
    categories as sub-folders); ``ibims``: an IBims-1 folder.
    """
    path = Path(data)
    if kind == "nyu":
        from mesadepth.data.nyu import NYULabeledDataset

        mat = path if path.suffix == ".mat" else path / "nyu_depth_v2_labeled.mat"
        if not mat.is_file():
            raise MissingFileError(
                mat, "NYUv2 labeled .mat", "give --data the folder holding it or the file"
            )
        splits = mat.with_name("splits.mat")
        return NYULabeledDataset(mat, splits if split != "all" else None, split=split)
    if kind == "folder":
        from mesadepth.data.lsun import ImageFolderDataset

        return ImageFolderDataset(path)
    if kind == "ibims":
        from mesadepth.data.ibims import IBimsDataset

        if not path.is_dir():
            raise MissingFileError(path, "IBims-1 folder (ibims1_core_mat/ and imagelist.txt)")
        return IBimsDataset(path)
    raise ConfigError(f"dataset must be nyu, folder or ibims, got {kind!r}")


def _unpack(batch: Any) -> tuple[Sequence[Any] | Tensor, list[str | None] | None, bool]:
    """-> (images, ids, already_normalised)."""
    ids = None
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ConfigError(f"a batch dict needs an 'image' entry, got keys {sorted(batch)}")
        ids = batch.get("id")
        images = batch["image"]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
    else:
        images = batch
    if (
        isinstance(images, Tensor)
        and images.is_floating_point()
        and images.dim() == 4
        and images.shape[1] == 3
    ):
        return images, ids, True
    return images, ids, False


# ---------------------------------------------------------------------------------------------
# The analysis.


@dataclass
class CKAResult:
    """Output of :func:`analyse`. Matrices are float64 (rows: layers of the first encoder)."""

    names: list[str]
    layers: dict[str, list[str]]
    within: dict[str, np.ndarray]
    cross: dict[tuple[str, str], np.ndarray]
    n_images: int
    """Distinct images read (first pass)."""
    n_used: int
    """Examples entering the estimator, over all passes (minibatch skips batches of < 4)."""
    image_ids: list[str]
    estimator: dict[str, Any]
    mode: str
    inputs: dict[str, dict[str, Any]]
    flags: list[str] = field(default_factory=list)
    seconds: float = 0.0
    state_bytes: int = 0
    """Largest size of the estimator's own state: accumulators, or the held features."""

    def diagonal(self, a: str, b: str) -> np.ndarray:
        """CKA(layer l of a, layer l of b) for l = 0..min(La, Lb) - 1 (pre vs fine, B5)."""
        return np.diagonal(self.cross[(a, b)]).copy()

    @property
    def image_hash(self) -> str:
        return hashlib.sha256("\n".join(self.image_ids).encode()).hexdigest()

    def label(self) -> str:
        """Short estimator description for titles."""
        e = self.estimator
        if e["name"] == "minibatch":
            return f"minibatch CKA (linear, batch {e.get('batch_size', '?')})"
        kern = "linear" if e["kernel"] == "linear" else f"RBF t={e['rbf_threshold']:g}"
        return f"{'debiased' if e['name'] == 'debiased' else 'biased'} {kern} CKA"


def _parse_pairs(pairs: Any, names: Sequence[str]) -> list[tuple[str, str]]:
    if pairs is None:
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    out = []
    for p in pairs:
        if isinstance(p, str):
            a, sep, b = p.partition(":")
            if not sep:
                raise ConfigError(f"pair {p!r}: expected PRE:FINE, e.g. MP:MP-ft")
        else:
            a, b = p
        for x in (a, b):
            if x not in names:
                raise ConfigError(
                    f"pair {a}:{b}: unknown encoder name {x!r}; names are {list(names)}"
                )
        out.append((a, b))
    return out


def _check_options(estimator: str, kernel: str, mode: str, passes: int) -> None:
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if kernel == "rbf" and estimator == "minibatch":
        raise ConfigError(
            "RBF CKA needs the full Gram matrix (spec B4): use estimator 'debiased' or 'biased'"
        )
    if mode == "tokens_as_examples" and (estimator != "biased" or kernel != "linear"):
        raise ConfigError(
            "tokens_as_examples is computed exactly in feature space as biased linear CKA "
            "(spec B5.1; with n*h*w rows >> C features the bias is negligible): use estimator "
            "'biased' and kernel 'linear'"
        )
    if passes < 1:
        raise ConfigError(f"passes must be >= 1, got {passes}")
    if passes > 1 and estimator != "minibatch":
        raise ConfigError("several passes only make sense for the minibatch estimator")


def analyse(
    encoders: Mapping[str, nn.Module],
    loader: Iterable[Any],
    layers: Sequence[str | int] | None = None,
    pairs: Sequence[str | tuple[str, str]] | None = None,
    *,
    within: bool = True,
    estimator: Estimator = "minibatch",
    kernel: Kernel = "linear",
    mode: Mode = "flatten",
    rbf_threshold: float = 0.5,
    preprocess: Callable[[Any], Tensor] | Mapping[str, Callable[[Any], Tensor]] | None = None,
    device: str | torch.device | None = None,
    passes: int = 1,
    feature_budget_bytes: int | None = 8 * 2**30,
    progress: bool = False,
) -> CKAResult:
    """Within-encoder and between-encoder CKA matrices in one pass over ``loader`` (spec B5).

    ``encoders``: name -> Swin-v2 encoder. ``loader`` yields batches: dicts with ``image`` (a
    list of (H, W, 3) uint8 arrays or a (B, H, W, 3) uint8 tensor; optional ``id`` list) as made
    by :func:`make_loader`, or already-normalised (B, 3, H, W) float tensors. ``layers``: names
    or paper indices for every encoder (default: each encoder's :func:`paper_layers`).
    ``pairs``: ``"A:B"`` strings or (A, B) tuples, A pre-trained (rows), B fine-tuned
    (columns); default every (i < j) pair in the given order. ``preprocess``: one callable or
    one per name (default :class:`ImagePreprocess` at each encoder's ``img_size``). With
    ``device`` the encoders are moved there (and stay). Options as in the module docstring;
    invalid combinations raise :class:`ConfigError`. ``passes`` > 1 (minibatch only) re-reads
    the loader, which should then shuffle (:func:`make_loader` with a seed).
    """
    _check_options(estimator, kernel, mode, passes)
    names = list(encoders)
    if not names:
        raise ConfigError("analyse needs at least one encoder")
    pair_list = _parse_pairs(pairs, names)
    if not within and not pair_list:
        raise ConfigError("nothing to compute: within=False and no pairs")
    active = [n for n in names if within or any(n in p for p in pair_list)]
    layer_names = {
        n: (
            resolve_layers(layers, encoders[n]) if layers is not None else paper_layers(encoders[n])
        )  # type: ignore[arg-type]
        for n in active
    }
    if isinstance(preprocess, Mapping):
        prep = {n: preprocess[n] for n in active}
    elif preprocess is not None:
        prep = {n: preprocess for n in active}
    else:
        prep = {n: ImagePreprocess(_size_of(encoders[n])) for n in active}
    inputs = {
        n: (p.describe() if isinstance(p, ImagePreprocess) else {"preprocess": repr(p)})
        for n, p in prep.items()
    }
    flags: list[str] = []
    for a, b in pair_list:
        if inputs[a] != inputs[b]:
            flags.append(
                f"{a} and {b} see differently prepared inputs ({inputs[a]} vs {inputs[b]}); "
                "pre-trained weights belong in the fine-tuning geometry (pitfall 25)"
            )
            log.warning(flags[-1])

    dev = torch.device(device) if device is not None else None
    modes_before = {n: encoders[n].training for n in active}
    if dev is not None:
        for n in active:
            encoders[n].to(dev)

    within_acc: dict[str, Any] = {}
    cross_acc: dict[tuple[str, str], Any] = {}
    stores: dict[str, FeatureStore] = {}
    if mode == "tokens_as_examples":
        within_acc = {
            n: TokenCKAAccumulator(len(layer_names[n]), len(layer_names[n]))
            for n in names
            if within
        }
        cross_acc = {
            (a, b): TokenCKAAccumulator(len(layer_names[a]), len(layer_names[b]))
            for a, b in pair_list
        }
    elif estimator == "minibatch":
        within_acc = {
            n: CKAAccumulator(len(layer_names[n]), len(layer_names[n])) for n in names if within
        }
        cross_acc = {
            (a, b): CKAAccumulator(len(layer_names[a]), len(layer_names[b])) for a, b in pair_list
        }
    else:
        stores = {n: FeatureStore(len(layer_names[n])) for n in active}

    ids: list[str] = []
    n_used = skipped = state_bytes = largest = 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(loader) * passes if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, desc="cka", unit="batch")
    try:
        for p in range(passes):
            for batch in loader:
                images, batch_ids, normalised = _unpack(batch)
                b = len(images)
                largest = max(largest, b)
                if p == 0:
                    start = len(ids)
                    ids.extend(
                        str(i) if i is not None else f"#{start + k}"
                        for k, i in enumerate(batch_ids or [None] * b)
                    )
                if bar is not None:
                    bar.update(1)
                if estimator == "minibatch" and mode != "tokens_as_examples" and b < 4:
                    # HSIC_1 divides by n (n - 3): a tail batch this small is left out (B3).
                    skipped += b
                    for acc in (*within_acc.values(), *cross_acc.values()):
                        acc.skip(b)
                    continue
                feats = _run_encoders(encoders, active, images, normalised, prep, layer_names)
                n_used += b
                if mode == "tokens_as_examples":
                    for n, acc in within_acc.items():
                        acc.update(feats[n], feats[n])
                    for (a, c), acc in cross_acc.items():
                        acc.update(feats[a], feats[c])
                elif estimator == "minibatch":
                    stacks = {
                        n: u_centred_stack([flatten_features(f, mode) for f in feats[n]])
                        for n in active
                    }
                    del feats
                    for n, acc in within_acc.items():
                        acc.update_u(stacks[n], stacks[n])
                    for (a, c), acc in cross_acc.items():
                        acc.update_u(stacks[a], stacks[c])
                else:
                    for n in active:
                        stores[n].add([flatten_features(f, mode) for f in feats[n]])
                    held = sum(s.nbytes for s in stores.values())
                    state_bytes = max(state_bytes, held)
                    _check_budget(held, len(ids), loader, feature_budget_bytes)
    finally:
        if bar is not None:
            bar.close()
        for n in active:
            encoders[n].train(modes_before[n])

    if n_used == 0:
        raise DataError(
            "<loader>",
            f"no usable batch (read {len(ids)} images; minibatch CKA needs batches of >= 4)",
        )
    within_m: dict[str, np.ndarray] = {}
    cross_m: dict[tuple[str, str], np.ndarray] = {}
    if stores:
        debiased = estimator == "debiased"
        grams = {n: stores[n].grams() for n in active}
        stores.clear()
        if debiased and len(ids) < 4:
            raise DataError("<loader>", f"debiased CKA needs >= 4 images, got {len(ids)}")
        stacks = {n: _centred_stack(grams[n], kernel, debiased, rbf_threshold) for n in active}
        norms = {n: (s * s).sum(1) for n, s in stacks.items()}
        if within:
            within_m = {n: _ratio(stacks[n] @ stacks[n].T, norms[n], norms[n]) for n in names}
        cross_m = {
            (a, b): _ratio(stacks[a] @ stacks[b].T, norms[a], norms[b]) for a, b in pair_list
        }
    else:
        within_m = {n: acc.result() for n, acc in within_acc.items()}
        cross_m = {k: acc.result() for k, acc in cross_acc.items()}
        state_bytes = sum(acc.nbytes for acc in (*within_acc.values(), *cross_acc.values()))

    undefined: dict[str, set[int]] = {n: set() for n in active}
    for n, m in within_m.items():
        undefined[n].update(int(i) for i in np.flatnonzero(np.isnan(np.diagonal(m))))
    for (a, b), m in cross_m.items():
        undefined[a].update(int(i) for i in np.flatnonzero(np.isnan(m).all(1)))
        undefined[b].update(int(j) for j in np.flatnonzero(np.isnan(m).all(0)))
    for n in active:
        for i in sorted(undefined[n]):
            flags.append(
                f"{n}: layer {i} ({layer_names[n][i]}) has no defined CKA (constant over the "
                "images, or no compatible pair); its row and column are NaN"
            )
    if mode == "tokens_as_examples":
        flags.append(
            "tokens_as_examples: pairs of layers with different token grids are NaN (pitfall 23)"
        )

    est: dict[str, Any] = {"name": estimator, "kernel": kernel}
    if kernel == "rbf":
        est["rbf_threshold"] = float(rbf_threshold)
    if estimator == "minibatch":
        bs = getattr(loader, "batch_size", None) or largest
        est.update({"batch_size": bs, "passes": passes, "skipped_examples": skipped})
        sampler = getattr(loader, "sampler", None)
        est["shuffled"] = isinstance(sampler, torch.utils.data.RandomSampler)
    return CKAResult(
        names=names,
        layers=layer_names,
        within=within_m,
        cross=cross_m,
        n_images=len(ids),
        n_used=n_used,
        image_ids=ids,
        estimator=est,
        mode=mode,
        inputs=inputs,
        flags=flags,
        seconds=time.perf_counter() - t0,
        state_bytes=state_bytes,
    )


def _run_encoders(
    encoders: Mapping[str, nn.Module],
    active: Sequence[str],
    images: Any,
    normalised: bool,
    prep: Mapping[str, Callable[[Any], Tensor]],
    layer_names: Mapping[str, list[str]],
) -> dict[str, list[Tensor]]:
    # Encoders sharing one preprocess object get the same input tensor (prepared once).
    prepared: dict[int, Tensor] = {}
    feats = {}
    for n in active:
        if normalised:
            x = images
        else:
            key = id(prep[n])
            if key not in prepared:
                prepared[key] = prep[n](images)
            x = prepared[key]
        feats[n] = encoder_features(encoders[n], x, layer_names[n])
    return feats


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _check_budget(held: int, n_read: int, loader: Any, budget: int | None) -> None:
    if budget is None:
        return
    total = None
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and n_read:
        total = held / n_read * len(dataset)
    if held > budget or (total is not None and total > budget):
        need = total if total is not None else held
        raise ConfigError(
            f"the full-Gram estimators hold every image's features: this run needs about "
            f"{_gib(need)} (budget {_gib(budget)}). Use the streaming "
            "estimator 'minibatch', mode 'mean_pool', fewer images, or raise the budget"
        )


# ---------------------------------------------------------------------------------------------
# Outputs (spec B8): JSON, CSV, heatmaps.


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "encoder"


def _nested(m: np.ndarray) -> list[Any]:
    # JSON has no NaN: undefined values are written as null.
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(m)]


def _write_csv(path: Path, m: np.ndarray, rows: str, cols: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{rows}\\{cols}", *range(m.shape[1])])
        for i, row in enumerate(m):
            # repr round-trips a float64 exactly.
            w.writerow([i, *(repr(float(v)) for v in row)])


def read_csv_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """Read back a matrix written by :func:`write_outputs` (header row and column dropped)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap(
    fig: Any,
    ax: Any,
    m: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    yticklabels: Sequence[str] | None = None,
    colorbar: bool = True,
) -> None:
    """One CKA matrix: fixed colour scale [0, 1], two-decimal cells, layer indices on the axes."""
    from matplotlib import colormaps

    cmap = colormaps["magma"].with_extremes(bad="#bbbbbb")
    rows, cols = m.shape
    im = ax.imshow(
        np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", aspect="auto"
    )
    fs = 7 if max(rows, cols) <= 9 else 5
    for i in range(rows):
        for j in range(cols):
            v = m[i, j]
            text = "nan" if not np.isfinite(v) else f"{v:.2f}"
            colour = "black" if np.isfinite(v) and v > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=fs, color=colour)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    if yticklabels is not None:
        ax.set_yticklabels(yticklabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(im, ax=ax, label="CKA", fraction=0.046, pad=0.04)


def _save(fig: Any, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    # The layout is settled by the first save; solving it again for the PDF only costs time.
    fig.set_layout_engine("none")
    fig.savefig(paths[1])
    return paths


def _subtitle(result: CKAResult) -> str:
    return f"{result.label()}, n={result.n_images}, {result.mode}"


def write_outputs(
    result: CKAResult,
    out_dir: str | os.PathLike[str],
    encoder_info: Mapping[str, Mapping[str, Any]] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``cka.json``, one CSV and one heatmap (PNG + PDF) per matrix, and summaries (B8).

    Files: ``within_<name>.*`` (layer x layer of one encoder), ``cross_<A>__<B>.*`` (rows A,
    columns B); with several encoders ``comparison.*`` (the within heatmaps side by side and
    each encoder's layer-0 row as a line plot, plus the pairs' diagonals), ``layer0_rows.*``
    (one strip per encoder) and, with pairs, ``cross_diagonal.*`` (rows = pairs, columns =
    layers). ``encoder_info``: per name, e.g. checkpoint path; ``source``: dataset description.
    Returns {label: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sub = _subtitle(result)

    roles: dict[str, str] = {}
    for a, b in result.cross:
        roles[a] = "pre" if roles.get(a, "pre") == "pre" else "pre+fine"
        roles[b] = "fine" if roles.get(b, "fine") == "fine" else "pre+fine"
    doc: dict[str, Any] = {
        "spec": "teacher-and-cka.md Part B",
        "encoders": [
            {
                "name": n,
                **{
                    k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                    for k, v in (encoder_info or {}).get(n, {}).items()
                },
                "role": roles.get(n, "single"),
                "layers": result.layers.get(n, []),
                "input": result.inputs.get(n),
            }
            for n in result.names
        ],
        "n": result.n_images,
        "n_used": result.n_used,
        "images": {
            "ids": result.image_ids,
            "sha256": result.image_hash,
            "source": dict(source or {}),
        },
        "mode": result.mode,
        "estimator": result.estimator,
        "within": {n: _nested(m) for n, m in result.within.items()},
        "within_layer0_row": {n: _nested(m[:1])[0] for n, m in result.within.items()},
        "cross": [
            {
                "pre": a,
                "fine": b,
                "matrix": _nested(m),
                "diagonal": _nested(result.diagonal(a, b)[None])[0],
            }
            for (a, b), m in result.cross.items()
        ],
        "flags": result.flags,
        "seconds": round(result.seconds, 3),
    }
    jpath = out / "cka.json"
    jpath.write_text(json.dumps(doc, indent=1) + "\n")
    written["json"] = jpath

    for n, m in result.within.items():
        stem = out / f"within_{_safe(n)}"
        _write_csv(stem.with_suffix(".csv"), m, "layer", "layer")
        written[f"within_{n}.csv"] = stem.with_suffix(".csv")
        fig = _figure(4.6, 4.0)
        ax = fig.add_subplot()
        _heatmap(fig, ax, m, f"{n}: layer vs layer\n{sub}", "layer", "layer")
        for p in _save(fig, stem):
            written[f"within_{n}{p.suffix}"] = p
    for (a, b), m in result.cross.items():
        stem = out / f"cross_{_safe(a)}__{_safe(b)}"
        _write_csv(stem.with_suffix(".csv"), m, a, b)
        written[f"cross_{a}:{b}.csv"] = stem.with_suffix(".csv")
        fig = _figure(4.6, 4.0)
        ax = fig.add_subplot()
        _heatmap(fig, ax, m, f"{a} (pre) vs {b} (fine)\n{sub}", f"{b} layer", f"{a} layer")
        for p in _save(fig, stem):
            written[f"cross_{a}:{b}{p.suffix}"] = p

    if result.cross:
        diag_rows = [result.diagonal(a, b) for a, b in result.cross]
        width = max(len(r) for r in diag_rows)
        d = np.full((len(diag_rows), width), np.nan)
        for i, r in enumerate(diag_rows):
            d[i, : len(r)] = r
        labels = [f"{a} vs {b}" for a, b in result.cross]
        fig = _figure(max(4.5, 0.55 * width + 2.5), 1.2 + 0.45 * len(labels))
        ax = fig.add_subplot()
        _heatmap(fig, ax, d, f"pre-trained vs fine-tuned, same layer\n{sub}", "layer", "", labels)
        ax.invert_yaxis()  # first pair on top, as listed
        for p in _save(fig, out / "cross_diagonal"):
            written[f"cross_diagonal{p.suffix}"] = p

    if len(result.within) > 1:
        mats = list(result.within.items())
        width = max(m.shape[1] for _, m in mats)
        strip = np.full((len(mats), width), np.nan)
        for i, (_, m) in enumerate(mats):
            strip[i, : m.shape[1]] = m[0]
        fig = _figure(max(4.5, 0.55 * width + 2.5), 1.2 + 0.45 * len(mats))
        ax = fig.add_subplot()
        _heatmap(fig, ax, strip, f"CKA with layer 0\n{sub}", "layer", "", [n for n, _ in mats])
        ax.invert_yaxis()
        for p in _save(fig, out / "layer0_rows"):
            written[f"layer0_rows{p.suffix}"] = p
        written.update(_comparison(result, out, sub))
    return written


def _comparison(result: CKAResult, out: Path, sub: str) -> dict[str, Path]:
    """The paper's comparison: within heatmaps side by side, layer-0 rows (and diagonals) below."""
    mats = list(result.within.items())
    k = len(mats)
    lines = 2 if result.cross else 1
    fig = _figure(max(4.2 * k, 4.5 * lines + 1), 8.0)
    grid = fig.add_gridspec(2, k * lines, height_ratios=[1.15, 1.0])
    for i, (n, m) in enumerate(mats):
        ax = fig.add_subplot(grid[0, i * lines : (i + 1) * lines])
        _heatmap(fig, ax, m, n, "layer", "layer" if i == 0 else "", colorbar=i == k - 1)
    ax = fig.add_subplot(grid[1, :k] if lines == 2 else grid[1, :])
    for n, m in mats:
        ax.plot(range(m.shape[1]), m[0], marker="o", label=n)
    ax.set(xlabel="layer", ylabel="CKA with layer 0", ylim=(0, 1.02), title="layer 0 vs layer l")
    ax.set_xticks(range(max(m.shape[1] for _, m in mats)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if result.cross:
        ax = fig.add_subplot(grid[1, k:])
        for a, b in result.cross:
            d = result.diagonal(a, b)
            ax.plot(range(len(d)), d, marker="s", label=f"{a} vs {b}")
        ax.set(
            xlabel="layer",
            ylabel="CKA(pre, fine)",
            ylim=(0, 1.02),
            title="pre-trained vs fine-tuned, layer l",
        )
        ax.set_xticks(range(max(len(result.diagonal(a, b)) for a, b in result.cross)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(sub, fontsize=10)
    return {f"comparison{p.suffix}": p for p in _save(fig, out / "comparison")}


# ---------------------------------------------------------------------------------------------
# The command's work (``mesadepth cka``).


def _default_name(path: Path) -> str:
    # A run directory's weights are all called model.safetensors: the folder names the run.
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def run_cka(
    encoders: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str],
    dataset: str,
    out: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    pairs: Sequence[str] | None = None,
    layers: Sequence[str | int] | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    estimator: Estimator = "minibatch",
    kernel: Kernel = "linear",
    mode: Mode = "flatten",
    rbf_threshold: float = 0.5,
    crop: Literal["center", "none"] = "center",
    split: str = "test",
    passes: int = 1,
    seed: int | None = None,
    device: str = "auto",
    workers: int = 0,
    within: bool = True,
    encoder_overrides: Mapping[str, Any] | None = None,
    feature_budget_gb: float = 8.0,
    progress: bool = True,
) -> tuple[CKAResult, dict[str, Path]]:
    """Load encoder files, read a dataset, :func:`analyse`, :func:`write_outputs` into ``out``.

    ``encoder_overrides`` are applied when rebuilding every encoder (e.g. img_size,
    window_size, pretrained_window_sizes: the fine-tuning geometry, pitfall 25). Every file is
    checked before any work starts; a missing one raises :class:`MissingFileError` naming it.
    """
    from mesadepth.models.backbone import load_encoder

    paths = [Path(p) for p in encoders]
    if not paths:
        raise ConfigError("give at least one encoder file")
    for p in paths:
        if not p.is_file():
            raise MissingFileError(
                p,
                "encoder weights (.safetensors with encoder.* keys, e.g. a run's model.safetensors)",
            )
    names = list(names) if names else [_default_name(p) for p in paths]
    if len(names) != len(paths):
        raise ConfigError(
            f"{len(names)} names for {len(paths)} encoder files: give one name per file"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"encoder names must be distinct, got {names}")
    if passes > 1 and seed is None:
        seed = 0
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    _check_options(estimator, kernel, mode, passes)
    models = {
        n: load_encoder(p, overrides=dict(encoder_overrides or {}) or None)
        for n, p in zip(names, paths, strict=True)
    }
    ds = open_dataset(dataset, data, split)
    loader = make_loader(ds, batch_size, max_images, seed, workers)
    prep = {}
    shared: dict[tuple[int, int], ImagePreprocess] = {}
    for n, m in models.items():
        size = _size_of(m)
        prep[n] = shared.setdefault(size, ImagePreprocess(size, crop=crop))
    result = analyse(
        models,
        loader,
        layers=layers,
        pairs=pairs,
        within=within,
        estimator=estimator,
        kernel=kernel,
        mode=mode,
        rbf_threshold=rbf_threshold,
        preprocess=prep,
        device=dev,
        passes=passes,
        feature_budget_bytes=int(feature_budget_gb * 2**30),
        progress=progress,
    )
    info = {
        n: {"checkpoint": os.fspath(p), "overrides": dict(encoder_overrides or {})}
        for n, p in zip(names, paths, strict=True)
    }
    src = {
        "dataset": dataset,
        "data": os.fspath(data),
        "split": split if dataset == "nyu" else None,
        "max_images": max_images,
        "seed": seed,
    }
    written = write_outputs(result, out, info, src)
    return result, written
