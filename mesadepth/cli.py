"""The ``mesadepth`` command line: one entry point, one subcommand per job.

Only commands that work are registered. Each subcommand's ``--help`` lists its options and,
for recipe-driven commands, every configuration key with its default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mesadepth import __version__
from mesadepth.errors import MesaError

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _synth_parser(sub: argparse._SubParsersAction) -> None:
    from mesadepth.config import describe
    from mesadepth.data.world import PRESETS, SynthConfig

    p = sub.add_parser(
        "synth",
        help="render the synthetic indoor world in the real dataset formats",
        formatter_class=_FORMATTER,
        description=(
            "Render procedural indoor rooms (vectorised ray casting, textures fixed to surfaces,\n"
            "Lambertian light, hand-held camera paths) and write them exactly as the real\n"
            "datasets are laid out: SC-Depth video folders, NYUv2 sync pairs + labeled .mat +\n"
            "splits.mat, LSUN lmdb + exported image folders, IBims-1 .mat files.\n\n"
            "Presets: tiny (64x48, seconds, for tests), demo (128x96, the CPU demo),\n"
            "small (320x240), full (640x480, every protocol constant applies as is).\n"
            "Any configuration key below can be overridden as key=value, e.g.\n"
            "  mesadepth synth --out runs/world --preset demo video.frames=60 ibims.images=50"
        ),
        epilog="configuration keys (key=value):\n" + describe(SynthConfig),
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder (created; must be empty unless --overwrite)",
    )
    p.add_argument(
        "--preset", default="demo", choices=sorted(PRESETS), help="size preset (default: demo)"
    )
    p.add_argument(
        "--config", type=Path, help="YAML file of SynthConfig values applied on top of the preset"
    )
    p.add_argument(
        "--seed", type=int, help="world seed (same seed, same files); shorthand for seed=N"
    )
    p.add_argument("--workers", type=int, help="worker processes; shorthand for workers=N")
    p.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    p.add_argument(
        "--no-inspect", action="store_true", help="skip reading the world back with the loaders"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from mesadepth.config import load_config, save_config
    from mesadepth.data.inspect import format_table, inspect_world
    from mesadepth.data.world import PRESETS, SynthConfig, generate_world

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    base = {"preset": args.preset, **PRESETS[args.preset]}
    cfg = load_config(SynthConfig, args.config, overrides, base=base)
    t0 = time.perf_counter()
    manifest = generate_world(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    save_config(cfg, args.out / "config.yaml", command=["mesadepth", *args.argv])
    dt = time.perf_counter() - t0
    mb = {k: round(v / 2**20, 2) for k, v in manifest["bytes"].items()}
    print(f"wrote {args.out} in {dt:.1f} s (preset {cfg.preset}, seed {cfg.seed})")
    print("counts: " + json.dumps(manifest["counts"]))
    print("MiB on disk: " + json.dumps(mb))
    if manifest["world_checks"]:
        c = manifest["world_checks"]
        print(
            f"world checks: reprojection median {c['reproj_px_median']:.4f} px (p95 {c['reproj_px_p95']:.4f}), "
            f"photometric warp error {c['photo_gl_mean']:.2f} grey levels (no-motion baseline {c['photo_static_gl_mean']:.2f})"
        )
    if not args.no_inspect:
        print()
        print(format_table(inspect_world(args.out)))
    return 0


def _inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="read datasets with mesadepth's loaders and summarise what they contain",
        formatter_class=_FORMATTER,
        description=(
            "Read every dataset format with the same loaders training uses and print what they\n"
            "found: sample counts, image and depth sizes, depth ranges, intrinsics. Point it at a\n"
            "world written by `mesadepth synth`, or at your real datasets one by one:\n"
            "  mesadepth inspect runs/world\n"
            "  mesadepth inspect --nyu /data/nyu --nyu-train-list train_list.txt --nyu-test-list test_list.txt\n"
            "  mesadepth inspect --video /data/nyu_sc --lsun /data/lsun --ibims /data/ibims1"
        ),
    )
    p.add_argument("world", nargs="?", type=Path, help="a folder written by `mesadepth synth`")
    p.add_argument(
        "--video", type=Path, help="SC-Depth dataset folder (with training/ and testing/)"
    )
    p.add_argument(
        "--nyu", type=Path, help="folder holding nyu_depth_v2/ (sync scenes, official_splits/)"
    )
    p.add_argument(
        "--nyu-train-list",
        type=Path,
        help="MIM/BTS train list (default: <nyu>/splits/train_list.txt)",
    )
    p.add_argument(
        "--nyu-test-list", type=Path, help="MIM/BTS test list (default: <nyu>/splits/test_list.txt)"
    )
    p.add_argument(
        "--nyu-mat",
        type=Path,
        help="nyu_depth_v2_labeled.mat (default: <nyu>/nyu_depth_v2_labeled.mat)",
    )
    p.add_argument("--nyu-splits", type=Path, help="splits.mat (default: beside the .mat)")
    p.add_argument("--lsun", type=Path, help="folder holding <category>_train_lmdb/ folders")
    p.add_argument(
        "--lsun-images", type=Path, help="image folder of LSUN-style images (<category>/**/*)"
    )
    p.add_argument("--ibims", type=Path, help="IBims-1 folder (ibims1_core_mat/ and imagelist.txt)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from mesadepth.data.inspect import DatasetPaths, format_table, inspect_paths, inspect_world

    if args.world is not None:
        rows = inspect_world(args.world)
    else:
        paths = DatasetPaths(
            video=args.video,
            nyu=args.nyu,
            nyu_train_list=args.nyu_train_list,
            nyu_test_list=args.nyu_test_list,
            nyu_mat=args.nyu_mat,
            nyu_splits=args.nyu_splits,
            lsun=args.lsun,
            lsun_images=args.lsun_images,
            ibims=args.ibims,
        )
        if paths.empty():
            print(
                "mesadepth inspect: give a world folder or at least one of --video/--nyu/--lsun/--lsun-images/--ibims",
                file=sys.stderr,
            )
            return 2
        rows = inspect_paths(paths)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _pretrain_parser(sub: argparse._SubParsersAction) -> None:
    from mesadepth.config import describe
    from mesadepth.stages.masked import MaskedRecipe

    p = sub.add_parser(
        "pretrain",
        help="pre-train the encoder: masked (SimMIM), geometric (SC-DepthV2), supervised (SC-DepthV3)",
        formatter_class=_FORMATTER,
        description="Pre-training stages of MeSa. Each writes a run directory whose\n"
        "model.safetensors holds the encoder (encoder.*) for the next stage.",
    )
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    m = stages.add_parser(
        "masked",
        help="stage 1: SimMIM masked image modelling on LSUN or image folders",
        formatter_class=_FORMATTER,
        description=(
            "MeSa stage 1: SimMIM on a Swin-v2 encoder (mask token after the patch-embedding\n"
            "norm, 1x1 conv + PixelShuffle decoder, L1 on masked pixels, AdamW, warm-up and\n"
            "multistep/cosine schedule, lr per 512 images scaled by the total batch).\n\n"
            "  mesadepth pretrain masked --config configs/demo/masked.yaml\n"
            "  mesadepth pretrain masked --config configs/paper/masked.yaml data.root=/data/lsun\n\n"
            "A run directory that holds checkpoints/last.ckpt is resumed (same data order and\n"
            "schedule); --restart starts over."
        ),
        epilog="recipe keys (key=value):\n" + describe(MaskedRecipe),
    )
    m.add_argument(
        "--config",
        type=Path,
        help="recipe YAML (configs/demo/masked.yaml, configs/paper/masked.yaml)",
    )
    m.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoints/last.ckpt"
    )
    m.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    m.set_defaults(func=_run_pretrain_masked)
    # further pre-training stages register here, one line each (register(stages))
    __import__("mesadepth.commands.pretrain_video", fromlist=["register"]).register(stages)


def _run_pretrain_masked(args: argparse.Namespace) -> int:
    from mesadepth.config import load_config
    from mesadepth.stages.masked import MaskedRecipe, run_masked

    recipe = load_config(MaskedRecipe, args.config, args.overrides)
    metrics = run_masked(
        recipe, command=["mesadepth", *args.argv], resume="never" if args.restart else "auto"
    )
    if metrics:
        print(
            f"masked pre-training: {metrics['steps']} steps, loss {metrics['loss_start']:.4f} -> "
            f"{metrics['loss_end']:.4f}; weights in {Path(recipe.run_dir) / 'model.safetensors'}"
        )
    return 0


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
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


def _cka_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cka",
        help="CKA layer-wise analysis of encoders (within a model and pre- vs fine-tuned)",
        formatter_class=_FORMATTER,
        description=(
            "Centered kernel alignment between encoder layers, computed in one pass over a\n"
            "dataset (every encoder runs on every batch, so all see the same images in the same\n"
            "order). Two analyses, as in the MeSa paper:\n"
            "  within   each encoder's layer-vs-layer matrix (9 x 9 for the paper layers of\n"
            "           Swin-v2-L; row 0 = similarity of every layer to layer 0)\n"
            "  cross    pre-trained A vs fine-tuned B (--pairs A:B): layer i of A vs layer j of B;\n"
            "           the diagonal shows how much fine-tuning changed each layer\n\n"
            "Estimators: minibatch (default; Nguyen et al., sums of unbiased HSIC over batches,\n"
            "memory bounded by one batch, estimates debiased CKA), debiased and biased (full\n"
            "n x n Gram matrices: every image's features are held, see --max-feature-gb).\n"
            "Biased linear CKA is inflated when features outnumber images (flattened Swin maps):\n"
            "compare debiased or minibatch values. --kernel rbf needs debiased or biased.\n\n"
            "Images: centre-cropped to the encoder's aspect ratio (NYUv2 480x640 -> columns\n"
            "80..559), bilinear-resized to its img_size, ImageNet mean/std. Compare pre-trained\n"
            "weights in the fine-tuning geometry: key=value arguments rebuild every encoder with\n"
            "those settings, e.g. img_size=480 'window_size=[30,30,30,15]'\n"
            "'pretrained_window_sizes=[12,12,12,6]'.\n\n"
            "Outputs in --out: cka.json (settings, image ids, all matrices), within_<name>.csv\n"
            "and cross_<A>__<B>.csv, heatmaps (PNG + PDF, colour scale 0..1, layers 0..n-1), and\n"
            "with several encoders comparison.png (heatmaps side by side + layer-0 curves),\n"
            "layer0_rows.png and cross_diagonal.png.\n\n"
            "  mesadepth cka --encoders runs/demo/masked/model.safetensors --data runs/world/nyu \\\n"
            "      --dataset nyu --out runs/demo/cka\n"
            "  mesadepth cka --encoders mp.safetensors mp_ft.safetensors --names MP MP-ft \\\n"
            "      --pairs MP:MP-ft --data /data/nyu --dataset nyu --out cka/ --batch-size 64"
        ),
    )
    p.add_argument(
        "--encoders",
        nargs="+",
        required=True,
        type=Path,
        metavar="FILE",
        help="encoder weights (.safetensors with encoder.* keys, e.g. a run's model.safetensors)",
    )
    p.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="one name per encoder, used in titles, file names and --pairs (default: the run folder or file stem)",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder (see --dataset)")
    p.add_argument(
        "--dataset",
        required=True,
        choices=["nyu", "folder", "ibims"],
        help="nyu: folder with nyu_depth_v2_labeled.mat + splits.mat (or the .mat); folder: images (recursive); ibims: IBims-1 folder",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument(
        "--pairs",
        nargs="+",
        metavar="PRE:FINE",
        help="encoder pairs to compare layer by layer, by name (default: every pair in the given order)",
    )
    p.add_argument("--no-within", action="store_true", help="skip the within-encoder matrices")
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="timm module names or paper indices 0-8 (default: the paper's nine layers, scaled to the encoder's depth)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per forward pass; for minibatch CKA also the HSIC batch (default 32; batches < 4 are skipped)",
    )
    p.add_argument("--max-images", type=int, help="use only the first N images")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "train", "all"],
        help="nyu split (default test: 654 images)",
    )
    p.add_argument(
        "--estimator",
        default="minibatch",
        choices=["minibatch", "debiased", "biased"],
        help="CKA estimator (default minibatch)",
    )
    p.add_argument(
        "--kernel", default="linear", choices=["linear", "rbf"], help="kernel (default linear)"
    )
    p.add_argument(
        "--rbf-threshold",
        type=float,
        default=0.5,
        help="RBF bandwidth t: sigma^2 = t^2 x median squared distance (default 0.5)",
    )
    p.add_argument(
        "--flatten",
        default="flatten",
        choices=["flatten", "mean_pool", "tokens_as_examples"],
        help="how a tap becomes rows: all values per image (default), token mean per image, or one row per token (biased only)",
    )
    p.add_argument(
        "--crop",
        default="center",
        choices=["center", "none"],
        help="centre-crop to the encoder's aspect ratio before resizing (default) or stretch",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=1,
        help="minibatch: passes over the data, reshuffled each time",
    )
    p.add_argument("--seed", type=int, help="shuffle the image order with this seed")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument(
        "--max-feature-gb",
        type=float,
        default=8.0,
        help="debiased/biased: refuse runs whose held features exceed this (default 8)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="encoder settings applied to every file"
    )
    p.set_defaults(func=_run_cka)


def _run_cka(args: argparse.Namespace) -> int:
    from mesadepth.analysis.cka import run_cka
    from mesadepth.config import parse_overrides

    layers = None
    if args.layers:
        layers = [int(x) if x.lstrip("-").isdigit() else x for x in args.layers]
    result, written = run_cka(
        args.encoders,
        args.data,
        args.dataset,
        args.out,
        names=args.names,
        pairs=args.pairs,
        layers=layers,
        batch_size=args.batch_size,
        max_images=args.max_images,
        estimator=args.estimator,
        kernel=args.kernel,
        mode=args.flatten,
        rbf_threshold=args.rbf_threshold,
        crop=args.crop,
        split=args.split,
        passes=args.passes,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        within=not args.no_within,
        encoder_overrides=dict(parse_overrides(args.overrides)),
        feature_budget_gb=args.max_feature_gb,
        progress=not args.quiet,
    )
    print(
        f"cka: {result.label()}, {result.n_images} images, {result.mode}, "
        f"{result.seconds:.1f} s; wrote {len(written)} files to {args.out}"
    )
    for name, m in result.within.items():
        print(f"  {name} layer 0 row: " + " ".join(f"{v:.2f}" for v in m[0]))
    for a, b in result.cross:
        print(f"  {a} vs {b} diagonal: " + " ".join(f"{v:.2f}" for v in result.diagonal(a, b)))
    for flag in result.flags:
        print(f"  note: {flag}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``mesadepth`` parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="mesadepth",
        formatter_class=_FORMATTER,
        description=(
            "MeSa: masked, geometric and supervised pre-training of one Swin-v2 encoder for\n"
            "monocular depth. Start with `mesadepth synth --out runs/world` to get a small world\n"
            "in the real dataset formats, then `mesadepth inspect runs/world`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mesadepth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _synth_parser(sub)
    _inspect_parser(sub)
    _pretrain_parser(sub)
    _evaluate_parser(sub)
    _cka_parser(sub)
    # new subcommands register here, one line each
    __import__("mesadepth.commands.predict", fromlist=["register"]).register(sub)
    __import__("mesadepth.commands.pipeline", fromlist=["register"]).register(sub)
    __import__("mesadepth.commands.pseudo_depth", fromlist=["register"]).register(sub)
    __import__("mesadepth.commands.finetune", fromlist=["register"]).register(sub)
    __import__("mesadepth.commands.export", fromlist=["register"]).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (errors print one clear line, exit 2)."""
    parser = build_parser()
    # key=value overrides may stand anywhere among the options (argparse alone would take
    # only the first run of positionals), so unknown items that look like overrides join them.
    args, extra = parser.parse_known_args(argv)
    stray = [
        x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (MesaError, FileExistsError, FileNotFoundError) as exc:
        print(f"mesadepth {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
