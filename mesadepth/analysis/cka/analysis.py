"""The CKA analysis: every encoder on every batch, one pass, all matrices (spec B5, B8).

:func:`analyse` runs in-memory encoders over a loader and returns a :class:`CKAResult` (the
within-encoder and pre-vs-fine matrices, the images used, the estimator's settings, flags);
:func:`run_cka` is the work of ``mesadepth cka``: open the weight files and the dataset,
:func:`analyse`, then :func:`~mesadepth.analysis.cka.outputs.write_outputs`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mesadepth.analysis.cka.estimators import (
    ESTIMATORS,
    KERNELS,
    MODES,
    CKAAccumulator,
    Estimator,
    FeatureStore,
    Kernel,
    Mode,
    TokenCKAAccumulator,
    centred_kernel_stack,
    cka_ratio,
    u_centred_stack,
)
from mesadepth.analysis.cka.features import (
    ImagePreprocess,
    encoder_features,
    encoder_input_size,
    flatten_features,
    load_encoders,
    make_loader,
    name_encoder_files,
    open_dataset,
)
from mesadepth.analysis.cka.outputs import write_outputs
from mesadepth.errors import ConfigError, DataError
from mesadepth.models.backbone import paper_layers, resolve_layers

__all__ = ["CKAResult", "analyse", "run_cka"]

log = logging.getLogger(__name__)


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
        prep = {n: ImagePreprocess(encoder_input_size(encoders[n])) for n in active}
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
        stacks = {
            n: centred_kernel_stack(grams[n], kernel, debiased, rbf_threshold) for n in active
        }
        norms = {n: (s * s).sum(1) for n, s in stacks.items()}
        if within:
            within_m = {n: cka_ratio(stacks[n] @ stacks[n].T, norms[n], norms[n]) for n in names}
        cross_m = {
            (a, b): cka_ratio(stacks[a] @ stacks[b].T, norms[a], norms[b]) for a, b in pair_list
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
# The command's work (``mesadepth cka``).


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
    files = name_encoder_files(encoders, names)
    if passes > 1 and seed is None:
        seed = 0
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    _check_options(estimator, kernel, mode, passes)
    models = load_encoders(files, encoder_overrides)
    ds = open_dataset(dataset, data, split)
    loader = make_loader(ds, batch_size, max_images, seed, workers)
    prep = {}
    shared: dict[tuple[int, int], ImagePreprocess] = {}
    for n, m in models.items():
        size = encoder_input_size(m)
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
        for n, p in files.items()
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
