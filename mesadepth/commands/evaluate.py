"""``mesadepth evaluate``: score a depth model, or saved predictions, under the NYUv2, IBims-1
or folder protocol."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand to ``sub``."""
    p = sub.add_parser(
        "evaluate",
        help="score a depth model, or saved predictions, under the NYUv2, IBims-1 or folder protocol",
        formatter_class=_FORMATTER,
        description=(
            "Score depth maps under the official protocols and print the paper's columns.\n"
            "  nyu:    labeled .mat + splits.mat test split, rawDepths in mm, Eigen crop,\n"
            "          1e-3 < gt < 10, metrics averaged per image (Table 1 columns)\n"
            "  ibims:  IBims-1 .mat files: boundary (acc, comp), planarity (plane, orientation),\n"
            "          global errors, as the official evaluation computes them (Table 2), and\n"
            "          the distance-related errors (AbsRel, log10, RMS per 1 m GT-depth bin,\n"
            "          0-20 m) of the later official metric files\n"
            "  folder: <data>/rgb/<name>.jpg|png with <data>/depth/<name>.png (uint16 mm)\n\n"
            "What is scored (exactly one):\n"
            "  --checkpoint PATH  a depth model run through MIM-Depth's test-time protocol: RGB/255,\n"
            "                     square windows of the image height sliding along the width (two\n"
            "                     at 480x640: columns 0 and 160), each with its mirror, averaged;\n"
            "                     --batch N runs N test images (4N crops) per forward pass.\n"
            "                     PATH: a fine-tuning run folder or its model.safetensors, or an\n"
            "                     official MIM-Depth-Estimation .pth (encoder.*, decoder.*,\n"
            "                     last_layer_depth.*; 'model' / 'module.' wrappers are fine), built\n"
            "                     as --encoder (default: Swin-v2-L at 480 px, windows 30/30/30/15)\n"
            "                     plus key=value encoder settings, head sized from the weights.\n"
            "  --predictions DIR  one file per test image, <name>.npy (metres) or <name>.png\n"
            "                     (uint16 millimetres), or named by test position (00000.npy, ...).\n\n"
            "  mesadepth evaluate --checkpoint runs/demo/finetune --dataset nyu --data runs/world/nyu\n"
            "  mesadepth evaluate --checkpoint nyu_swinv2_L.pth --dataset nyu --data /data/nyu \\\n"
            "      --device cuda --out metrics.json\n"
            "  mesadepth evaluate --checkpoint model.safetensors --dataset ibims --data /data/ibims1\n"
            "  mesadepth evaluate --dataset nyu --data runs/world/nyu --predictions preds/ --out metrics.json\n\n"
            "metrics.json holds the settings, the means and every image's values; the table shows\n"
            "the paper's columns (NYUv2: RMSE d1 d2 d3 AbsRel log10; IBims-1: Table 2 order)."
        ),
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=["nyu", "ibims", "folder"],
        help="protocol and data format",
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="nyu: folder with nyu_depth_v2_labeled.mat and splits.mat (or the .mat itself); ibims: dataset folder; folder: RGB-D folder",
    )
    p.add_argument("--splits", type=Path, help="nyu: splits.mat (default: beside the .mat)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--checkpoint",
        type=Path,
        help="depth model: run folder, model.safetensors, or official MIM-Depth .pth",
    )
    what.add_argument("--predictions", type=Path, help="folder of saved depth maps")
    p.add_argument(
        "--depth-scale",
        type=float,
        default=1000.0,
        help="folder: PNG value per metre (default 1000)",
    )
    p.add_argument(
        "--ibims-scaled-planes",
        action="store_true",
        help="ibims: plane size threshold = 5%% of the actual image (for images smaller than 640x480)",
    )
    p.add_argument(
        "--ibims-dbe-input",
        choices=["official", "masked"],
        default="official",
        help="ibims: what the boundary errors' Canny sees. official (default): the whole "
        "prediction, as the official v0.9 evaluation; masked: the prediction zeroed outside the "
        "valid GT pixels, as BS-Net's and DANet's evaluation copies do (invalid regions become "
        "holes that hide nearby predicted edges, so their DBE values differ)",
    )
    p.add_argument("--out", type=Path, help="write metrics.json (aggregate and per image) here")
    m = p.add_argument_group("model options (--checkpoint only)")
    m.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    m.add_argument(
        "--batch",
        type=int,
        default=1,
        help="test images per forward pass (x4 crops with flip and two windows; default 1)",
    )
    m.add_argument("--no-flip", action="store_true", help="no horizontal-flip averaging")
    m.add_argument(
        "--no-shift-window",
        action="store_true",
        help="no sliding windows: the whole image, resized to the encoder's square input",
    )
    m.add_argument(
        "--encoder",
        help="official .pth: encoder preset (default swinv2_large_window30_480; "
        "swinv2_base_window30_480 for Swin-v2-B)",
    )
    m.add_argument(
        "--model-max-depth",
        type=float,
        help="official .pth: the head's depth range in metres (default 10, the NYUv2 value)",
    )
    m.add_argument(
        "--save-predictions",
        type=Path,
        metavar="DIR",
        help="also write each prediction as DIR/<name>.npy (metres), readable by --predictions",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="encoder settings for --checkpoint, e.g. img_size=480 'window_size=[30,30,30,15]'",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mesadepth.errors import ConfigError
    from mesadepth.evaluation.evaluate import (
        evaluate,
        evaluate_model,
        folder_samples,
        ibims_samples,
        load_checkpoint_model,
        model_batch_predictor,
        nyu_samples,
        predictions_reader,
        resolve_device,
        summary_table,
        write_results,
    )

    if args.predictions is not None:
        model_only = {
            "--device": args.device != "auto",
            "--batch": args.batch != 1,
            "--no-flip": args.no_flip,
            "--no-shift-window": args.no_shift_window,
            "--encoder": args.encoder is not None,
            "--model-max-depth": args.model_max_depth is not None,
            "--save-predictions": args.save_predictions is not None,
            "key=value": bool(args.overrides),
        }
        given = [k for k, v in model_only.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --checkpoint, not --predictions")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.ibims_dbe_input != "official" and args.dataset != "ibims":
        raise ConfigError("--ibims-dbe-input applies to --dataset ibims only")
    if args.dataset == "nyu":
        mat = args.data if args.data.suffix == ".mat" else args.data / "nyu_depth_v2_labeled.mat"
        samples = nyu_samples(mat, args.splits or mat.with_name("splits.mat"))
    elif args.dataset == "ibims":
        samples = ibims_samples(args.data)
    else:
        samples = folder_samples(args.data, args.depth_scale)
    t0 = time.perf_counter()
    if args.predictions is not None:
        results = evaluate(
            args.dataset,
            samples,
            predictions_reader(args.predictions),
            progress=not args.quiet,
            ibims_scaled_planes=args.ibims_scaled_planes,
            ibims_dbe_input=args.ibims_dbe_input,
        )
        results["source"] = {"predictions": str(args.predictions)}
    else:
        from mesadepth.config import parse_overrides

        device = resolve_device(args.device)
        model, info = load_checkpoint_model(
            args.checkpoint,
            encoder=args.encoder,
            encoder_overrides=dict(parse_overrides(args.overrides)),
            max_depth=args.model_max_depth,
        )
        predict = model_batch_predictor(
            model, device=device, flip=not args.no_flip, shift_window=not args.no_shift_window
        )
        results = evaluate_model(
            args.dataset,
            samples,
            predict,
            batch=args.batch,
            progress=not args.quiet,
            ibims_scaled_planes=args.ibims_scaled_planes,
            ibims_dbe_input=args.ibims_dbe_input,
            save_predictions=args.save_predictions,
        )
        seconds = time.perf_counter() - t0
        results["source"] = {
            **info,
            "device": device,
            "flip": not args.no_flip,
            "shift_window": not args.no_shift_window,
            "batch": args.batch,
            "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / max(1, results["n_images"]), 4),
        }
    print(f"{args.dataset}: {results['n_images']} images")
    print(summary_table(results))
    if args.checkpoint is not None:
        src = results["source"]
        print(
            f"{src['format']} model on {src['device']}, flip {'on' if src['flip'] else 'off'}, "
            f"windows {'on' if src['shift_window'] else 'off'}: {src['seconds_per_image']:.3f} s/image"
        )
    if args.out:
        write_results(results, args.out)
    return 0
