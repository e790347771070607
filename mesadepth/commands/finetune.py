"""``mesadepth finetune``: NYUv2 depth fine-tuning of a pre-trained encoder (Xie et al. 2022 recipe)."""

from __future__ import annotations

import argparse
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` subcommand to ``sub``."""
    from mesadepth.config import describe
    from mesadepth.stages.finetune import FinetuneRecipe

    p = sub.add_parser(
        "finetune",
        help="fine-tune an encoder for depth on NYUv2 (SILog, layer decay, triangle lr)",
        formatter_class=_FORMATTER,
        description=(
            "Depth fine-tuning as MeSa does it (the Xie et al. 2022 NYUv2 recipe): the Swin-v2\n"
            "encoder's last stage feeds a deconvolution head (depth = sigmoid x 10 m), trained\n"
            "with SILog on random 480x480 crops of the NYUv2 sync pairs (CutDepth on every 4th\n"
            "sample, flip, colour jitter), AdamW with layer-wise lr decay (0.85 for Swin-v2-L)\n"
            "on a triangle schedule (5e-4 peak at half the epochs, 3e-5 at both ends), and\n"
            "validated on the labeled test split with flip and sliding-window averaging.\n\n"
            "Where the encoder starts (init=...):\n"
            "  init=RUN/model.safetensors  the encoder.* of any earlier stage: MP (pretrain masked),\n"
            "                              MP+GP (geometric), MP+GP+SP (supervised); 192-px\n"
            "                              weights open at the crop size, their pre-training\n"
            "                              windows read from the file (pretrained_window_sizes=auto)\n"
            "  init=FILE.pth               an official SimMIM / Swin-v2 / MIM-Depth checkpoint\n"
            "                              (set encoder.pretrained_window_sizes, e.g. [12,12,12,6])\n"
            "  init=random                 no pre-training (the baseline row)\n\n"
            "Examples:\n"
            "  mesadepth finetune --config configs/demo/finetune.yaml\n"
            "  mesadepth finetune --config configs/demo/finetune.yaml init=random \\\n"
            "      run_dir=runs/demo/finetune_random\n"
            "  mesadepth finetune --config configs/paper/finetune.yaml data.root=/data/nyu \\\n"
            "      init=runs/paper/masked/model.safetensors run_dir=runs/paper/finetune/MP\n\n"
            "Writes RUN/config.yaml, RUN/model.safetensors (encoder.* + decoder.*, for\n"
            "`mesadepth evaluate` and `mesadepth cka`), RUN/metrics.json (loss start/end, the\n"
            "NYUv2-protocol metrics of the final model and of predicting the training mean\n"
            "depth) and RUN/figures/depth_preview.png. A run directory that holds\n"
            "checkpoints/last.ckpt is resumed (same data order and schedule); --restart starts\n"
            "over."
        ),
        epilog="recipe keys (key=value):\n" + describe(FinetuneRecipe),
    )
    p.add_argument(
        "--config",
        type=Path,
        help="recipe YAML (configs/demo/finetune.yaml, configs/paper/finetune.yaml)",
    )
    p.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoints/last.ckpt"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mesadepth.config import load_config
    from mesadepth.stages.finetune import FinetuneRecipe, run_finetune

    recipe = load_config(FinetuneRecipe, args.config, args.overrides)
    metrics = run_finetune(
        recipe, command=["mesadepth", *args.argv], resume="never" if args.restart else "auto"
    )
    if not metrics:
        return 0
    print(
        f"fine-tuning: {metrics['steps']} steps in {metrics['train_seconds']:.0f} s, SILog "
        f"{metrics['loss_start']:.4f} -> {metrics['loss_end']:.4f}; weights in "
        f"{Path(recipe.run_dir) / 'model.safetensors'}"
    )
    val = metrics.get("validation")
    if val:
        from mesadepth.evaluation.metrics import format_table

        print(f"NYUv2 protocol, {val['n_images']} test images (final model):")
        print(format_table(val))
        base = metrics.get("baseline_mean_depth")
        if base:
            print(
                f"predicting the training mean depth ({base['depth_m']:.2f} m) everywhere: "
                f"RMSE {base['rmse']:.3f}, d1 {base['d1']:.3f}"
            )
    return 0
