"""``mesadepth pretrain masked``: MeSa stage 1 (MP), SimMIM masked image modelling."""

from __future__ import annotations

import argparse
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(stages: argparse._SubParsersAction) -> None:
    """Add ``masked`` to the ``mesadepth pretrain`` stages."""
    from mesadepth.config import describe
    from mesadepth.stages.masked import MaskedRecipe

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
    m.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
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
