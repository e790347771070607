"""CKA estimators: the mathematics on feature tensors (spec teacher-and-cka.md B1-B4, B6, B7).

What a reader checks against the papers, and nothing else: no models, files or figures.

- Gram matrices and centrings: :func:`gram_linear` (B1, B7), :func:`centre_gram` (H K H),
  :func:`u_centre_gram` (B2), :func:`rbf_gram` (B4).
- CKA of two representations: :func:`cka` / :func:`cka_from_grams` (biased B1 or debiased B2,
  linear or RBF), :func:`linear_cka_features` (the same in feature space), and
  :func:`hsic_unbiased` (HSIC_1 of one batch, B3).
- Every layer pair at once: :func:`cka_matrix_from_grams` (full Grams),
  :class:`CKAAccumulator` / :func:`minibatch_cka` (Nguyen et al.'s minibatch CKA, B3),
  :class:`FeatureStore` (features held for the full-Gram estimators, B6 (a)) and
  :class:`TokenCKAAccumulator` (tokens as examples, B5.1).

Every product is formed in float64 after centring over the examples (B7); an undefined value
(a constant layer) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mesadepth.errors import ConfigError

__all__ = [
    "ESTIMATORS",
    "KERNELS",
    "MODES",
    "CKAAccumulator",
    "Estimator",
    "FeatureStore",
    "Kernel",
    "Mode",
    "TokenCKAAccumulator",
    "as_tensor",
    "centre_gram",
    "centred_kernel_stack",
    "cka",
    "cka_from_grams",
    "cka_matrix_from_grams",
    "cka_ratio",
    "gram_linear",
    "hsic_unbiased",
    "linear_cka_features",
    "minibatch_cka",
    "rbf_gram",
    "u_centre_gram",
    "u_centred_stack",
]

Estimator = Literal["minibatch", "debiased", "biased"]
Kernel = Literal["linear", "rbf"]
Mode = Literal["flatten", "mean_pool", "tokens_as_examples"]
ESTIMATORS: tuple[str, ...] = ("minibatch", "debiased", "biased")
KERNELS: tuple[str, ...] = ("linear", "rbf")
MODES: tuple[str, ...] = ("flatten", "mean_pool", "tokens_as_examples")

_F64 = torch.float64
# Elements of one float64 column chunk when forming a Gram matrix: 2^24 x 8 B = 128 MiB.
_CHUNK_ELEMS = 2**24


# ---------------------------------------------------------------------------------------------
# Gram matrices and their centrings (B1, B2, B4).


def as_tensor(x: Tensor | np.ndarray) -> Tensor:
    """``x`` as a torch tensor (a tensor is returned as is; an array shares memory if it can)."""
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
    x = as_tensor(x)
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
    k = as_tensor(k).to(_F64)
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def u_centre_gram(k: Tensor | np.ndarray) -> Tensor:
    """U-centring of a symmetric Gram matrix (spec B2; Szekely & Rizzo 2014), float64, n >= 4.

    Zero diagonal; s_j = sum_i K_ij / (n - 2) - sum(s) / (2 (n - 1)); K_u,ij = K_ij - s_i - s_j
    off the diagonal. <K_u, L_u> / (n (n - 3)) is the unbiased HSIC estimator.
    """
    k = as_tensor(k).to(_F64).clone()
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
    kt = as_tensor(k).to(_F64).clone()
    lt = as_tensor(l).to(_F64).clone()
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
    g = as_tensor(gram).to(_F64)
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
    xt = as_tensor(x).to(_F64)
    yt = as_tensor(y).to(_F64)
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


def centred_kernel_stack(
    grams: Sequence[Tensor], kernel: str, debiased: bool, threshold: float
) -> Tensor:
    """(L, n*n) stack of centred (or U-centred) kernel matrices, one row per layer.

    ``grams``: linear Grams (n, n) as :func:`gram_linear` returns; ``kernel`` and ``threshold``
    as in :func:`cka`. Rows of two stacks multiply into every layer pair's CKA numerator.
    """
    rows = []
    for g in grams:
        k = _kernel(g, kernel, threshold)
        rows.append((u_centre_gram(k) if debiased else centre_gram(k)).reshape(-1))
    return torch.stack(rows)


def cka_ratio(num: Tensor, den_a: Tensor, den_b: Tensor) -> np.ndarray:
    """num / sqrt(den_a den_b^T) as a (La, Lb) array, NaN where a self term is not positive (B7).

    num (La, Lb): cross terms <K_i, L_j>; den_a (La,), den_b (Lb,): self terms <K_i, K_i>.
    """
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
    a = centred_kernel_stack(grams_a, kernel, debiased, threshold)
    b = a if grams_b is None else centred_kernel_stack(grams_b, kernel, debiased, threshold)
    if a.shape[1] != b.shape[1]:
        raise ValueError("the two Gram lists cover different numbers of examples")
    na = (a * a).sum(1)
    nb = na if b is a else (b * b).sum(1)
    return cka_ratio(a @ b.T, na, nb)


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
        return cka_ratio(self.hsic_ab, self.hsic_aa, self.hsic_bb)

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
        acc.update([as_tensor(x)], [as_tensor(y)])
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
