"""``mesadepth evaluate``: score a depth model, or saved predictions, under the official protocols.

Datasets:

- ``nyu``: the labeled ``.mat`` with ``splits.mat`` (654 test images on real NYUv2); ground truth
  = ``rawDepths`` quantised to millimetres as the official export does (spec datasets 2.5,
  3.3); valid ``1e-3 < gt < 10`` inside the Eigen crop; metrics averaged per image.
- ``ibims``: IBims-1 ``.mat`` files; global, directed, boundary and planarity errors as the
  official evaluation computes them (spec datasets 5).
- ``folder``: a user's RGB-D folder, ``<dir>/rgb/<name>.(jpg|png)`` with
  ``<dir>/depth/<name>.png`` (16-bit, millimetres unless ``--depth-scale``), NYU metrics
  without the Eigen crop.

Predictions come from a model (``model.safetensors`` of a fine-tuning run, run through the
test-time protocol: flip averaging and sliding square windows) or from a folder of saved depth
maps (``--predictions DIR``): one file per test image named by its name (``<name>.npy`` in
metres or ``<name>.png`` 16-bit millimetres) or by its 0-based position in the test order
(``00000.npy``), as the official IBims-1 script and BTS's ``eval_with_pngs`` do, so other
methods can be scored under exactly the same protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
) -> dict[str, Any]:
    """Run the dataset's protocol over every sample; returns per-image and aggregate metrics."""
    if dataset in ("nyu", "folder"):
        avg = MetricAverager()
    elif dataset == "ibims":
        avg = ibims_metrics.IbimsAverager()
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; expected nyu, ibims or folder")
    for i, s in enumerate(
        tqdm(samples, total=total, desc=f"evaluate {dataset}", disable=not progress)
    ):
        pred = predict(s, i)
        if dataset == "ibims":
            avg.add(
                ibims_metrics.ibims_image_metrics(
                    s.raw, pred, min_plane_fraction_of_image=ibims_scaled_planes
                ),
                name=s.name,
            )
        else:
            pred = sanitize_prediction(pred, mode="mim")
            mask = valid_mask(s.depth, crop="eigen" if dataset == "nyu" else None)
            avg.add(depth_metrics(pred, s.depth, mask), name=s.name)
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


def summary_table(results: dict[str, Any]) -> str:
    """The aggregate metrics in the paper's column order (Table 1 for NYUv2, Table 2 for IBims-1)."""
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
        head = "  ".join(f"{c:>8}" for c in cols)
        vals = "  ".join(
            f"{mean[c]:8.3f}" if mean[c] is not None and np.isfinite(mean[c]) else f"{'nan':>8}"
            for c in cols
        )
        return head + "\n" + vals
    return format_table(mean)
