"""``mesadepth evaluate``: score a depth model, or saved predictions, under the official protocols.

Datasets:

- ``nyu``: the labeled ``.mat`` with ``splits.mat`` (654 test images on real NYUv2); ground truth
  = ``rawDepths`` quantised to millimetres as the official export does (spec datasets 2.5,
  3.3); valid ``1e-3 < gt < 10`` inside the Eigen crop; metrics averaged per image.
- ``ibims``: IBims-1 ``.mat`` files; global, directed, boundary and planarity errors as the
  official evaluation computes them (spec datasets 5), plus the distance-related errors of the
  later official metric files (5.10); ``ibims_dbe_input="masked"`` gives the boundary errors of
  the BS-Net / DANet drivers instead (5.12).
- ``folder``: a user's RGB-D folder, ``<dir>/rgb/<name>.(jpg|png)`` with
  ``<dir>/depth/<name>.png`` (16-bit, millimetres unless ``--depth-scale``), NYU metrics
  without the Eigen crop.

Predictions come from a model (``model.safetensors`` of a fine-tuning run, run through the
test-time protocol: flip averaging and sliding square windows) or from a folder of saved depth
maps (``--predictions DIR``): one file per test image named by its name (``<name>.npy`` in
metres or ``<name>.png`` 16-bit millimetres) or by its 0-based position in the test order
(``00000.npy``), as the official IBims-1 script and BTS's ``eval_with_pngs`` do, so other
methods can be scored under exactly the same protocol.

Models (``--checkpoint``): :func:`load_checkpoint_model` opens this project's depth models
(``model.safetensors``, or a run folder holding one) and official MIM-Depth-Estimation ``.pth``
depth models (:func:`~mesadepth.models.depth_head.load_official_depth_model`);
:func:`model_batch_predictor` runs several images of one size, their windows and their mirrors as
one forward batch; :func:`evaluate_model` scores a model through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.evaluation import ibims as ibims_metrics
from mesadepth.evaluation.metrics import (
    MetricAverager,
    depth_metrics,
    format_table,
    sanitize_prediction,
    valid_mask,
)
from mesadepth.evaluation.protocol import predict_with_tta
from mesadepth.io import atomic_write_text, read_png_uint16

if TYPE_CHECKING:
    from mesadepth.models.depth_head import DepthModel

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Sample:
    """One test image: RGB (H, W, 3) uint8, ground truth, its name and the raw dataset sample."""

    name: str
    image: np.ndarray
    depth: np.ndarray
    raw: dict[str, Any]


# ----------------------------------------------------------------------------- datasets


def nyu_samples(mat: str | os.PathLike[str], splits: str | os.PathLike[str]) -> Iterator[Sample]:
    """The labeled test split, ground truth = uint16(rawDepths x 1000) / 1000 (the official export)."""
    from mesadepth.data.nyu import NYULabeledDataset

    ds = NYULabeledDataset(mat, splits, split="test", depth="raw")
    for i in range(len(ds)):
        s = ds[i]
        gt = np.floor(s["depth"].astype(np.float32) * np.float32(1000)) / np.float32(1000)
        yield Sample(s["name"], s["image"], gt.astype(np.float32), s)


def ibims_samples(root: str | os.PathLike[str]) -> Iterator[Sample]:
    from mesadepth.data.ibims import IBimsDataset

    ds = IBimsDataset(root)
    for i in range(len(ds)):
        s = ds[i]
        yield Sample(s["name"], s["image"], s["depth"].astype(np.float32), s)


def folder_samples(root: str | os.PathLike[str], depth_scale: float = 1000.0) -> Iterator[Sample]:
    """``<root>/rgb/<name>.jpg|png`` paired with ``<root>/depth/<name>.png`` (value / depth_scale m)."""
    from mesadepth.io import read_rgb

    root = Path(root)
    rgb_dir, depth_dir = root / "rgb", root / "depth"
    if not rgb_dir.is_dir() or not depth_dir.is_dir():
        raise MissingFileError(root, "RGB-D folder with rgb/ and depth/ sub-folders")
    images = sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise DataError(rgb_dir, "no .jpg/.png image found")
    for p in images:
        d = depth_dir / f"{p.stem}.png"
        gt = read_png_uint16(d, "16-bit depth PNG").astype(np.float32) / np.float32(depth_scale)
        yield Sample(p.stem, read_rgb(p), gt, {"name": p.stem})


# ----------------------------------------------------------------------------- predictions


def model_predictor(
    model: torch.nn.Module, device: str = "cpu", flip: bool = True, shift_window: bool = True
) -> Callable[[np.ndarray], np.ndarray]:
    """(H, W, 3) uint8 -> (H, W) metres with the MIM-Depth test-time protocol.

    The image goes in as RGB / 255 without mean/std normalisation (the fine-tuning convention,
    spec pitfall 11). Square windows of the image's shorter side slide along the longer one
    (two at 480 x 640: offsets 0 and 160); each window is resized to the encoder's input size
    when it differs, and the prediction resized back (bilinear), so any image size works.
    """
    model = model.to(device).eval()
    side = _input_side(model)

    def net(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        y = model(x)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y

    def predict(image: np.ndarray) -> np.ndarray:
        x = (
            torch.from_numpy(np.array(image, dtype=np.float32))
            .permute(2, 0, 1)[None]
            .div(255.0)
            .to(device)
        )
        with torch.no_grad():
            y = predict_with_tta(net, x, shift_window=shift_window, flip=flip)
        return y[0, 0].float().cpu().numpy()

    return predict


def _input_side(model: torch.nn.Module) -> int:
    enc = getattr(model, "encoder", model)
    size = getattr(getattr(enc, "patch_embed", None), "img_size", None)
    if size is None:
        raise ConfigError("cannot tell the model's input size (no encoder.patch_embed.img_size)")
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ConfigError(f"the test-time protocol uses square windows; the encoder takes {size}")
    return int(size[0])


def predictions_reader(directory: str | os.PathLike[str]) -> Callable[[Sample, int], np.ndarray]:
    """Saved predictions: ``<name>.npy`` (metres) / ``<name>.png`` (uint16 mm), or by index ``%05d``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(directory, "folder of saved predictions")

    def read(sample: Sample, index: int) -> np.ndarray:
        for stem in (sample.name, f"{index:05d}"):
            npy, png = directory / f"{stem}.npy", directory / f"{stem}.png"
            if npy.is_file():
                pred = np.load(npy, allow_pickle=False).astype(np.float32)
                break
            if png.is_file():
                pred = (
                    read_png_uint16(png, "16-bit prediction PNG (millimetres)").astype(np.float32)
                    / 1000.0
                )
                break
        else:
            raise MissingFileError(
                directory / f"{sample.name}.npy",
                f"prediction for test image {index} ('{sample.name}'); also looked for .png and {index:05d}.npy/.png",
            )
        if pred.ndim == 3 and pred.shape[0] == 1:
            pred = pred[0]
        if pred.shape != sample.depth.shape:
            raise DataError(
                directory / sample.name,
                f"prediction is {pred.shape}, expected the ground truth's {sample.depth.shape}",
            )
        return pred

    return read


# ----------------------------------------------------------------------------- evaluation loops


def evaluate(
    dataset: str,
    samples: Iterator[Sample],
    predict: Callable[[Sample, int], np.ndarray],
    *,
    total: int | None = None,
    progress: bool = True,
    ibims_scaled_planes: bool = False,
    ibims_dbe_input: str = "official",
) -> dict[str, Any]:
    """Run the dataset's protocol over every sample; returns per-image and aggregate metrics.

    IBims-1 only: ``ibims_scaled_planes`` (plane size threshold relative to the image, see
    :func:`~mesadepth.evaluation.ibims.planarity_errors`) and ``ibims_dbe_input``
    (``"official"``: boundary errors on the unmasked prediction; ``"masked"``: on the
    prediction masked by the valid set, as BS-Net's and DANet's drivers do; see
    :func:`~mesadepth.evaluation.ibims.ibims_image_metrics`). Both are recorded under
    ``protocol`` in the result.
    """
    if dataset in ("nyu", "folder"):
        avg = MetricAverager()
    elif dataset == "ibims":
        avg = ibims_metrics.IbimsAverager()
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; expected nyu, ibims or folder")
    if ibims_dbe_input not in ibims_metrics.DBE_INPUTS:
        raise ConfigError(
            f"ibims_dbe_input must be one of {', '.join(ibims_metrics.DBE_INPUTS)}, "
            f"got {ibims_dbe_input!r}"
        )
    for i, s in enumerate(
        tqdm(samples, total=total, desc=f"evaluate {dataset}", disable=not progress)
    ):
        pred = predict(s, i)
        if dataset == "ibims":
            avg.add(
                ibims_metrics.ibims_image_metrics(
                    s.raw,
                    pred,
                    min_plane_fraction_of_image=ibims_scaled_planes,
                    dbe_input=ibims_dbe_input,
                ),
                name=s.name,
            )
        else:
            pred = sanitize_prediction(pred, mode="mim")
            mask = valid_mask(s.depth, crop="eigen" if dataset == "nyu" else None)
            avg.add(depth_metrics(pred, s.depth, mask), name=s.name)
    if dataset == "ibims":
        protocol = {"dbe_input": ibims_dbe_input, "scaled_planes": bool(ibims_scaled_planes)}
        return {"dataset": dataset, "protocol": protocol, **avg.to_dict()}
    return {"dataset": dataset, **avg.to_dict()}


def write_results(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """metrics.json: aggregate and per-image values (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return None if not np.isfinite(v) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        return v

    atomic_write_text(path, json.dumps(clean(results), indent=2) + "\n")


def _cell(value: Any, width: int = 8) -> str:
    if value is None or not np.isfinite(value):
        return f"{'nan':>{width}}"
    return f"{value:{width}.3f}"


def summary_table(results: dict[str, Any]) -> str:
    """The aggregate metrics in the paper's column order (Table 1 for NYUv2, Table 2 for IBims-1).

    IBims-1 adds the distance-related errors (spec datasets 5.10): one row per GT-depth bin
    that holds pixels of at least one image (empty bins are left out), with AbsRel, log10,
    RMS (m) and the number of images contributing; and a note when the boundary errors were
    computed on the masked prediction (``dbe_input: masked``).
    """
    mean = results["mean"]
    if results["dataset"] == "ibims":
        cols = [
            c
            for c in (
                "dbe_acc",
                "dbe_com",
                "pe_fla",
                "pe_ori",
                "rel",
                "rms",
                "log10",
                "thr1",
                "thr2",
                "thr3",
            )
            if c in mean
        ]
        lines = [
            "  ".join(f"{c:>8}" for c in cols),
            "  ".join(_cell(mean[c]) for c in cols),
        ]
        if results.get("protocol", {}).get("dbe_input", "official") != "official":
            lines.append(
                "dbe_acc/dbe_com: masked prediction (BS-Net/DANet drivers), not the official input"
            )
        dist = results.get("distance")
        if dist is not None and any(dist["n_images"]):
            edges = dist["bin_edges"]
            lines += [
                "",
                "distance-related errors (GT depth bins, closed [lo, hi] metres; empty bins left out)",
                f"{'bin (m)':>9}  {'rel':>8}  {'log10':>8}  {'rms':>8}  {'images':>6}",
            ]
            for i, n in enumerate(dist["n_images"]):
                if n:
                    label = f"{edges[i]:g}-{edges[i + 1]:g}"
                    lines.append(
                        f"{label:>9}  {_cell(dist['rel'][i])}  {_cell(dist['log10'][i])}  "
                        f"{_cell(dist['rms'][i])}  {n:>6}"
                    )
        return "\n".join(lines)
    return format_table(mean)


# ----------------------------------------------------------------------------- models from checkpoints

#: Encoder of an official depth checkpoint unless told otherwise: the paper's Swin-v2-L at 480 px.
OFFICIAL_ENCODER = "swinv2_large_window30_480"
#: The reference's ``--max_depth`` for NYUv2 (metres); official files do not store it.
OFFICIAL_MAX_DEPTH = 10.0


def _is_project_file(path: Path) -> bool:
    """A safetensors file written by this project (its metadata names the format)."""
    if path.suffix != ".safetensors":
        return False
    from mesadepth.models.backbone import META_FORMAT, read_safetensors_header

    meta, _ = read_safetensors_header(path)  # a corrupt header is a DataError naming the file
    return META_FORMAT in meta


def load_checkpoint_model(
    path: str | os.PathLike[str],
    encoder: str | None = None,
    encoder_overrides: Mapping[str, Any] | None = None,
    max_depth: float | None = None,
) -> tuple[DepthModel, dict[str, Any]]:
    """Open a depth model for evaluation or prediction; returns (model in eval mode, description).

    ``path`` is a fine-tuning run folder (its ``model.safetensors``), this project's depth model
    file (:func:`~mesadepth.models.depth_head.load_depth_model`; the file records its encoder and
    head, ``encoder_overrides`` such as ``img_size`` re-open it in another geometry) or an
    official MIM-Depth-Estimation depth model (``.pth`` / ``.pt`` / foreign ``.safetensors``;
    :func:`~mesadepth.models.depth_head.load_official_depth_model`), whose encoder is the preset
    ``encoder`` (default :data:`OFFICIAL_ENCODER`) with the overrides and whose ``max_depth``
    defaults to :data:`OFFICIAL_MAX_DEPTH`. ``encoder`` / ``max_depth`` with a project file are
    a :class:`ConfigError` (the file already says what it is).
    """
    from mesadepth.models.depth_head import load_depth_model, load_official_depth_model

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise MissingFileError(
                path, "depth model of a fine-tuning run", "written by `mesadepth finetune`"
            )
    if not path.is_file():
        raise MissingFileError(
            path,
            "depth model checkpoint",
            "a fine-tuning run's model.safetensors (mesadepth finetune) or an official "
            "MIM-Depth-Estimation .pth depth model",
        )
    overrides = dict(encoder_overrides or {})
    if _is_project_file(path):
        given = [n for n, v in (("encoder", encoder), ("max_depth", max_depth)) if v is not None]
        if given:
            raise ConfigError(
                f"{path}: a mesadepth depth model records its encoder and head; {', '.join(given)} "
                "only apply to official .pth checkpoints (use key=value overrides to change the "
                "encoder geometry)"
            )
        model = load_depth_model(path, overrides or None)
        info = {"format": "mesadepth"}
    else:
        model = load_official_depth_model(
            path,
            encoder or OFFICIAL_ENCODER,
            overrides,
            OFFICIAL_MAX_DEPTH if max_depth is None else max_depth,
        )
        info = {"format": "official", "encoder": encoder or OFFICIAL_ENCODER}
    info.update(
        {
            "checkpoint": os.fspath(path),
            "encoder_overrides": overrides,
            "encoder_config": getattr(model.encoder, "config", None),
            "head_config": model.decoder.config,
        }
    )
    return model.eval(), info


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device without CUDA is a
    :class:`ConfigError` (instead of torch's assertion deep inside ``.to()``)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use cpu")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device {device!r}: {err}") from None
    return device


# ----------------------------------------------------------------------------- batched prediction


def windows_to_cover(length: int, side: int, n_windows: int = 2) -> int:
    """``n_windows``, raised to the fewest windows of ``side`` that cover ``length`` (ours).

    The protocol's two windows cover any image up to twice as long as high (480 x 640 needs 2);
    a wider panorama would leave an uncovered strip, so more windows slide along it.
    """
    if length <= side:
        return max(1, n_windows)
    return max(n_windows, -(-(length - side) // side) + 1)


def model_batch_predictor(
    model: torch.nn.Module,
    device: str = "cpu",
    flip: bool = True,
    shift_window: bool = True,
    n_windows: int = 2,
) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """[(H_i, W_i, 3) uint8, ...] -> [(H_i, W_i) float32 metres, ...], batched test-time protocol.

    The same protocol and numerics as :func:`model_predictor` (RGB / 255 without mean/std
    normalisation, square windows of the shorter side resized to the encoder input, flip
    averaging, spec 2.8), but images of one size go through the model together: B images with
    flip and two windows are one forward pass of 4B crops (the reference's batch of 4 per image).
    Images of different sizes are grouped by size. With one image per call the result is
    bit-identical to :func:`model_predictor`; batches agree to float rounding. Images longer
    than two windows get more windows (:func:`windows_to_cover`) instead of an uncovered strip.
    """
    model = model.to(device).eval()
    side = _input_side(model)

    def net(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        y = model(x)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y

    def predict(images: Sequence[np.ndarray]) -> list[np.ndarray]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ConfigError(f"image {i}: expected (H, W, 3) RGB, got shape {image.shape}")
            groups.setdefault((int(image.shape[0]), int(image.shape[1])), []).append(i)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(images)
        for (h, w), idx in groups.items():
            stack = np.stack([np.asarray(images[i], dtype=np.float32) for i in idx])
            x = torch.from_numpy(stack).permute(0, 3, 1, 2).div(255.0).to(device)
            n = windows_to_cover(max(h, w), min(h, w), n_windows)
            with torch.inference_mode():
                y = predict_with_tta(net, x, shift_window=shift_window, flip=flip, n_windows=n)
            depth = y[:, 0].float().cpu().numpy()
            for k, i in enumerate(idx):
                out[i] = depth[k]
        return out

    return predict


def _at_gt_size(pred: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # Spec datasets 5.4: metrics are computed at the ground-truth resolution; a prediction of
    # another size (an RGB-D folder whose images and depth maps differ) is resized bilinearly.
    if pred.shape == tuple(shape):
        return pred
    t = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


def evaluate_model(
    dataset: str,
    samples: Iterator[Sample],
    predict_batch: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
    *,
    batch: int = 1,
    total: int | None = None,
    progress: bool = True,
    ibims_scaled_planes: bool = False,
    ibims_dbe_input: str = "official",
    save_predictions: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` with predictions from a model, ``batch`` test images per forward call.

    ``predict_batch`` is a :func:`model_batch_predictor`. Up to ``batch`` samples are read ahead
    and predicted together; scoring is per image, exactly as :func:`evaluate`. Predictions are
    resized to the ground truth's size when they differ (bilinear). ``save_predictions`` writes
    ``<name>.npy`` (float32 metres) per image, readable by ``--predictions``.
    """
    from collections import deque
    from itertools import islice

    from mesadepth.io import atomic_path

    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    out_dir = Path(save_predictions) if save_predictions is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    ready: deque[tuple[Sample, np.ndarray]] = deque()

    def read_ahead() -> Iterator[Sample]:
        it = iter(samples)
        while chunk := list(islice(it, batch)):
            preds = predict_batch([s.image for s in chunk])
            ready.extend(
                (s, _at_gt_size(p, s.depth.shape)) for s, p in zip(chunk, preds, strict=True)
            )
            yield from chunk

    def read(sample: Sample, _index: int) -> np.ndarray:
        held, pred = ready.popleft()
        if held is not sample:  # evaluate() scores each sample as soon as it is yielded
            raise RuntimeError("evaluate_model: prediction order out of step with the samples")
        if out_dir is not None:
            with atomic_path(out_dir / f"{sample.name}.npy") as tmp:
                np.save(tmp, pred.astype(np.float32), allow_pickle=False)
        return pred

    return evaluate(
        dataset,
        read_ahead(),
        read,
        total=total,
        progress=progress,
        ibims_scaled_planes=ibims_scaled_planes,
        ibims_dbe_input=ibims_dbe_input,
    )
