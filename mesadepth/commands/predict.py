"""``mesadepth predict``: depth maps for any images with a depth model, in three file formats.

For every input image ``<stem>.(jpg|png)`` the command writes, in ``--out``:

- ``<stem>.npy``: float32 depth in metres, the image's height x width;
- ``<stem>_depth.png``: 16-bit PNG in millimetres, ``round(depth x 1000)`` (half to even, in
  float64) clipped to 0..65535 (the NYUv2 / BTS export convention, spec datasets 3.5);
- ``<stem>_preview.png``: an 8-bit colour preview through a matplotlib colormap (default
  ``magma_r``: near is bright, far is dark). The colour scale spans the image's own smallest to
  largest predicted depth, or 0 .. a fixed ``--max-depth`` so previews of several images compare.

The model runs the evaluation's test-time protocol (spec masked-pretraining-and-finetuning.md
2.8): RGB / 255, square windows of the shorter image side sliding along the longer one (resized
to the encoder's input), each averaged with its mirror;
:func:`~mesadepth.evaluation.evaluate.model_batch_predictor` batches images of one size. Any image
size works.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mesadepth.errors import ConfigError, DataError, MissingFileError

_FORMATTER = argparse.RawDescriptionHelpFormatter

#: Suffixes picked up when walking a directory (case-insensitive). Files named explicitly are
#: decoded by content whatever their suffix.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Files this command writes; skipped when walking a directory so a re-run over a folder that
#: also holds its outputs does not predict depth of depth previews.
_OUTPUT_SUFFIXES = ("_depth.png", "_preview.png")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand to ``sub``."""
    p = sub.add_parser(
        "predict",
        help="depth maps for images with a depth model (.npy metres, 16-bit PNG mm, colour preview)",
        formatter_class=_FORMATTER,
        description=(
            "Predict metric depth for images with a fine-tuned depth model and write, per image\n"
            "<stem>.jpg|png, into --out:\n"
            "  <stem>.npy          float32 depth in metres (the image's height x width)\n"
            "  <stem>_depth.png    16-bit PNG, millimetres = round(depth x 1000), clipped to 65535\n"
            "  <stem>_preview.png  colour preview (--colormap, default magma_r: near = bright);\n"
            "                      colour scale: the image's own min .. max depth, or 0 .. --max-depth\n"
            "                      metres for every image, so that previews compare\n\n"
            "The model runs the evaluation protocol: RGB/255, square windows of the shorter side\n"
            "sliding along the longer one (resized to the encoder input), each averaged with its\n"
            "mirror (--no-flip turns that off); any image size works. Directories are walked\n"
            "recursively (.jpg/.jpeg/.png, sorted; *_depth.png and *_preview.png, this command's\n"
            "outputs, are skipped). Two inputs with the same stem are refused unless\n"
            "--prefix-parent names outputs <folder>_<stem>.\n\n"
            "  mesadepth predict --checkpoint runs/demo/finetune photo.jpg --out depth/\n"
            "  mesadepth predict --checkpoint runs/demo/finetune/model.safetensors images/ \\\n"
            "      --out depth/ --max-depth 10 --batch 4\n"
            "  mesadepth predict --checkpoint nyu_swinv2_L.pth --device cuda scans/ --out depth/\n\n"
            "--checkpoint takes what `mesadepth evaluate --checkpoint` takes: a fine-tuning run\n"
            "folder, its model.safetensors, or an official MIM-Depth-Estimation .pth (encoder\n"
            "--encoder, default Swin-v2-L at 480 px, plus key=value encoder settings)."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="depth model: run folder, model.safetensors, or official MIM-Depth .pth",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files and/or folders (walked recursively); key=value items set encoder options",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="images of one size per forward pass (x4 crops with flip and two windows; default 1)",
    )
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip averaging")
    p.add_argument(
        "--no-shift-window",
        action="store_true",
        help="no sliding windows: the whole image, resized to the encoder's square input",
    )
    p.add_argument(
        "--colormap",
        default="magma_r",
        help="matplotlib colormap of the previews (default magma_r)",
    )
    p.add_argument(
        "--max-depth",
        type=float,
        metavar="M",
        help="fixed preview scale 0..M metres for every image (default: each image's min..max)",
    )
    p.add_argument(
        "--prefix-parent",
        action="store_true",
        help="name outputs <parent folder>_<stem> (for inputs whose stems repeat across folders)",
    )
    p.add_argument(
        "--encoder",
        help="official .pth: encoder preset (default swinv2_large_window30_480)",
    )
    p.add_argument(
        "--model-max-depth",
        type=float,
        help="official .pth: the head's depth range in metres (default 10, the NYUv2 value)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, overrides=[])


# ----------------------------------------------------------------------------- inputs


def _output_stem(path: Path, prefix_parent: bool) -> str:
    return f"{path.parent.name}_{path.stem}" if prefix_parent and path.parent.name else path.stem


def collect_images(
    inputs: Sequence[str | os.PathLike[str]],
    prefix_parent: bool = False,
    exclude: str | os.PathLike[str] | None = None,
) -> list[tuple[Path, str]]:
    """Image files of ``inputs`` with their output stems, in order: files as given, folders walked.

    Folders contribute their ``.jpg/.jpeg/.png`` files (recursively, sorted by path), minus files
    this command writes and anything under ``exclude`` (the output folder). A path given twice
    is used once. Two images with the same output stem raise :class:`ConfigError` naming both;
    a missing path raises :class:`MissingFileError`, a folder without images :class:`DataError`.
    """
    found: list[Path] = []
    skip = Path(exclude).resolve() if exclude is not None else None
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            walked = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.name.endswith(_OUTPUT_SUFFIXES)
                and not (skip is not None and skip in p.resolve().parents)
            )
            if not walked:
                raise DataError(path, f"no image found (looked for {', '.join(IMAGE_SUFFIXES)})")
            found.extend(walked)
        else:
            raise MissingFileError(path, "input image or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    by_stem: dict[str, Path] = {}
    out: list[tuple[Path, str]] = []
    for path in unique:
        stem = _output_stem(path, prefix_parent)
        if stem in by_stem:
            hint = (
                "rename one or run them separately"
                if prefix_parent
                else "pass --prefix-parent to name outputs <folder>_<stem>, or run them separately"
            )
            raise ConfigError(
                f"two inputs would write the same outputs {stem}.npy / {stem}_depth.png: "
                f"{by_stem[stem]} and {path}; {hint}"
            )
        by_stem[stem] = path
        out.append((path, stem))
    return out


# ----------------------------------------------------------------------------- outputs


def depth_to_png16(depth: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres: round half to even of ``depth x 1000`` (float64), clipped.

    Values outside 0..65.535 m clip to 0 / 65535; NaN (no prediction) becomes 0, the formats'
    "no depth" value.
    """
    mm = np.round(np.asarray(depth, dtype=np.float64) * 1000.0)
    mm = np.nan_to_num(mm, nan=0.0, posinf=65535.0, neginf=0.0)
    return np.clip(mm, 0, 65535).astype(np.uint16)


def colormap(name: str) -> Any:
    """A matplotlib colormap by name; unknown names raise :class:`ConfigError` with close ones."""
    import difflib

    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        names = sorted(matplotlib.colormaps)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        raise ConfigError(
            f"unknown colormap {name!r}; close: {', '.join(close) or '(none)'} "
            "(any matplotlib colormap name, e.g. magma_r, viridis, turbo, Spectral_r)"
        ) from None


def colorize(depth: np.ndarray, cmap: Any, max_depth: float | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 colours.

    Scale: 0 .. ``max_depth`` metres when given (the same colours mean the same depth in every
    image; deeper values take the end colour); otherwise this image's own finite minimum ..
    maximum, the usual per-image contrast stretch of depth previews (a constant map takes the
    start colour). NaN takes the colormap's "bad" colour.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if max_depth is not None:
        if not max_depth > 0:
            raise ConfigError(f"preview scale --max-depth must be > 0 metres, got {max_depth!r}")
        lo, span = 0.0, float(max_depth)
    else:
        finite = depth[np.isfinite(depth)]
        lo = float(finite.min()) if finite.size else 0.0
        span = float(finite.max()) - lo if finite.size else 0.0
    unit = (
        np.clip((depth - lo) / span, 0.0, 1.0)
        if span > 0
        else np.where(np.isnan(depth), np.nan, 0.0)
    )
    return np.ascontiguousarray(cmap(unit, bytes=True)[..., :3])


def write_outputs(
    out_dir: Path, stem: str, depth: np.ndarray, cmap: Any, max_depth: float | None
) -> list[Path]:
    """Write ``<stem>.npy``, ``<stem>_depth.png`` and ``<stem>_preview.png`` (atomically)."""
    from mesadepth.io import atomic_path, write_png

    depth = np.asarray(depth, dtype=np.float32)
    npy = out_dir / f"{stem}.npy"
    with atomic_path(npy) as tmp:
        np.save(tmp, depth, allow_pickle=False)
    png = out_dir / f"{stem}_depth.png"
    write_png(png, depth_to_png16(depth))
    preview = out_dir / f"{stem}_preview.png"
    write_png(preview, colorize(depth, cmap, max_depth))
    return [npy, png, preview]


# ----------------------------------------------------------------------------- the loop


def predict_images(
    predict_batch: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
    images: Sequence[tuple[Path, str]],
    out_dir: str | os.PathLike[str],
    *,
    batch: int = 1,
    colormap_name: str = "magma_r",
    max_depth: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predict and write every image of :func:`collect_images`; returns one record per image.

    ``predict_batch`` is a :func:`~mesadepth.evaluation.evaluate.model_batch_predictor`; images
    are read and predicted ``batch`` at a time (the predictor groups equal sizes). An unreadable
    image raises :class:`DataError` naming it (outputs of earlier images stay written).
    """
    from tqdm.auto import tqdm

    from mesadepth.io import read_rgb

    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    cmap = colormap(colormap_name)  # fail before any work on a bad name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), desc="predict", unit="img", disable=not progress)
    try:
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            rgbs = [read_rgb(path) for path, _ in chunk]
            depths = predict_batch(rgbs)
            for (path, stem), rgb, depth in zip(chunk, rgbs, depths, strict=True):
                write_outputs(out, stem, depth, cmap, max_depth)
                records.append(
                    {
                        "image": os.fspath(path),
                        "stem": stem,
                        "height": int(rgb.shape[0]),
                        "width": int(rgb.shape[1]),
                        "depth_min": float(np.nanmin(depth)),
                        "depth_max": float(np.nanmax(depth)),
                    }
                )
            bar.update(len(chunk))
    finally:
        bar.close()
    return records


def _run(args: argparse.Namespace) -> int:
    from mesadepth.config import parse_overrides
    from mesadepth.evaluation.evaluate import (
        load_checkpoint_model,
        model_batch_predictor,
        resolve_device,
    )

    # key=value items among the positionals are encoder settings, unless such a file exists.
    overrides = list(args.overrides)
    inputs: list[str] = []
    for item in args.inputs:
        (overrides if _OVERRIDE.match(item) and not Path(item).exists() else inputs).append(item)
    if not inputs:
        raise ConfigError("no input image or folder given")
    if args.max_depth is not None and not args.max_depth > 0:
        raise ConfigError(f"--max-depth must be > 0 metres, got {args.max_depth}")
    images = collect_images(inputs, prefix_parent=args.prefix_parent, exclude=args.out)
    colormap(args.colormap)
    device = resolve_device(args.device)
    model, info = load_checkpoint_model(
        args.checkpoint,
        encoder=args.encoder,
        encoder_overrides=dict(parse_overrides(overrides)),
        max_depth=args.model_max_depth,
    )
    predict = model_batch_predictor(
        model, device=device, flip=not args.no_flip, shift_window=not args.no_shift_window
    )
    t0 = time.perf_counter()
    records = predict_images(
        predict,
        images,
        args.out,
        batch=args.batch,
        colormap_name=args.colormap,
        max_depth=args.max_depth,
        progress=not args.quiet,
    )
    dt = time.perf_counter() - t0
    scale = f"0..{args.max_depth:g} m" if args.max_depth is not None else "min..max per image"
    print(
        f"predict: {len(records)} image(s) with the {info['format']} model on {device} "
        f"({dt / max(1, len(records)):.3f} s/image); wrote <stem>.npy, <stem>_depth.png, "
        f"<stem>_preview.png ({args.colormap}, {scale}) to {args.out}"
    )
    return 0
