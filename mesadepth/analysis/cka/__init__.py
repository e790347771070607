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

The package, by concern:

- :mod:`~mesadepth.analysis.cka.estimators`: the mathematics on tensors (Grams, centrings, HSIC,
  biased / debiased / minibatch / RBF / token CKA): what a reader checks against the papers;
- :mod:`~mesadepth.analysis.cka.features`: images in, layer taps out; datasets, loaders and the
  encoders' weight files;
- :mod:`~mesadepth.analysis.cka.analysis`: :func:`analyse` (one pass, every matrix) and
  :func:`run_cka` (the work of ``mesadepth cka``);
- :mod:`~mesadepth.analysis.cka.outputs`: ``cka.json``, CSV files and figures.

Every public name of these modules is importable from ``mesadepth.analysis.cka`` itself.
"""

# The package's face is its modules' faces: each module's __all__ says what it offers.
from mesadepth.analysis.cka import analysis, estimators, features, outputs
from mesadepth.analysis.cka.analysis import *  # noqa: F403
from mesadepth.analysis.cka.estimators import *  # noqa: F403
from mesadepth.analysis.cka.features import *  # noqa: F403
from mesadepth.analysis.cka.outputs import *  # noqa: F403

__all__: list[str] = []
__all__ += estimators.__all__
__all__ += features.__all__
__all__ += analysis.__all__
__all__ += outputs.__all__
