"""``mesadepth cka``: layer-wise CKA of encoders, within a model and pre- vs fine-tuned."""

from __future__ import annotations

import argparse
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``cka`` subcommand to ``sub``."""
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
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
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
