"""``mesadepth pretrain geometric`` (SC-DepthV2, GP) and ``mesadepth pretrain supervised``
(SC-DepthV3 with teacher pseudo-depth, SP): MeSa stages 2 and 3 on monocular video."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter

_LAYOUT = (
    "Data: SC-Depth video folders (`mesadepth synth` writes them under <world>/video):\n"
    "  ROOT/training/train.txt, val.txt       one scene folder per line\n"
    "  ROOT/training/<scene>/*.jpg, cam.txt   frames (time = sorted names) and 3x3 intrinsics\n"
    "  ROOT/training/<scene>/depth/*.png      val scenes: ground truth (m x 5000) -> depth-mode\n"
    "                                         validation (abs_rel, ...); without it: photometric\n"
    "  ROOT/training/<scene>/poses.txt        optional known camera poses, one line per frame:\n"
    "                                         12 numbers = top 3x4 of camera-to-world, OpenCV\n"
    "                                         axes (x right, y down, z forward), metres\n\n"
    "Known poses (pose.source=poses, not in SC-Depth): each pair's motion comes from poses.txt\n"
    "instead of a PoseNet (none is built; the ARN is off unless pose.rectify=true), so depth is\n"
    "learned in metres. ScanNet pose/*.txt: keep the top 3 rows; ARKit (OpenGL camera axes):\n"
    "right-multiply by diag(1,-1,-1,1); TUM groundtruth.txt: quaternion to matrix, nearest\n"
    "timestamp (mesadepth.data.video.poses_from_scannet / _arkit / _tum, write_poses).\n"
)

_GEOMETRIC = (
    "MeSa stage 2 (GP), SC-DepthV2: self-supervised depth and pose from monocular video with\n"
    "the auto-rectify network. Per step: DepthNet (the Swin-v2 encoder + DispNet decoder) on\n"
    "the target frame, the ARN rotates both reference frames towards it, DepthNet and PoseNet\n"
    "on the rectified references, then photometric + geometry-consistency + smoothness +\n"
    "ARN rotation losses (weights 1 / 0.1 / 0.1 / 1 / 1; loss.weights=release for the values\n"
    "the released NYU v2 model was trained with). Adam lr 1e-4, epochs of 1000 steps.\n\n"
    + _LAYOUT
    + "\nWhere the encoder starts (init=...): a masked run's model.safetensors (MeSa: MP -> GP;\n"
    "192-px weights open at data.size with their windows as pretrained windows), an official\n"
    "Swin-v2 / SimMIM .pth (set encoder.preset), a released SC-Depth .ckpt, or random.\n\n"
    "Examples:\n"
    "  mesadepth pretrain geometric --config configs/demo/geometric.yaml\n"
    "  mesadepth pretrain geometric --config configs/demo/geometric.yaml optim.epochs=2 \\\n"
    "      init=random run_dir=runs/demo/geometric_random\n"
    "  mesadepth pretrain geometric --config configs/demo/geometric.yaml pose.source=poses\n"
    "  mesadepth pretrain geometric --config configs/paper/geometric.yaml \\\n"
    "      data.root=/data/nyu_sc init=runs/paper/masked/model.safetensors\n\n"
    "Writes RUN/config.yaml, RUN/model.safetensors (encoder.* for the next stage, plus\n"
    "depth_decoder.* and, when built, pose_net.* and rectify_net.*), RUN/metrics.json (loss\n"
    "start/end per term, validation of the final and the initial model and of a constant\n"
    "depth, the pose source) and RUN/figures/depth_preview.png. A run directory holding\n"
    "checkpoints/last.ckpt is resumed (same batches and random draws); --restart starts over."
)

_SUPERVISED = (
    "MeSa stage 3 (SP), SC-DepthV3: the photometric and geometry losses of stage 2 (no ARN,\n"
    "no smoothness) plus three losses driven by a teacher's pseudo-depth: normal matching,\n"
    "confident depth ranking and edge-aware relative normal ranking (weights 1 / 0.1 / 0.1 /\n"
    "0.1 / 0.1). MeSa starts it from the geometric run: init=<GP run>/model.safetensors\n"
    "continues the encoder, the DepthNet decoder and the PoseNet.\n\n"
    + _LAYOUT
    + "  ROOT/training/<scene>/leres_depth/*.png  pseudo-depth, one 16-bit PNG per frame\n"
    "                                         (data.pseudo_depth names the folder)\n\n"
    "Write the pseudo-depth first (LeReS in the paper; any teacher works):\n"
    "  mesadepth pseudo-depth --teacher SPEC --data ROOT\n\n"
    "Examples:\n"
    "  mesadepth pretrain supervised --config configs/demo/supervised.yaml\n"
    "  mesadepth pretrain supervised --config configs/paper/supervised.yaml \\\n"
    "      data.root=/data/nyu_sc init=runs/paper/geometric/model.safetensors\n\n"
    "Writes the same run directory as `pretrain geometric` (model.safetensors without\n"
    "rectify_net.*). A run directory holding checkpoints/last.ckpt is resumed; --restart\n"
    "starts over."
)


def register(stages: argparse._SubParsersAction) -> None:
    """Add ``geometric`` and ``supervised`` to the ``mesadepth pretrain`` stages."""
    from mesadepth.config import describe
    from mesadepth.stages.video import VideoRecipe

    for name, version, summary, description in (
        ("geometric", "v2", "stage 2: SC-DepthV2 (depth + pose + ARN) on video", _GEOMETRIC),
        (
            "supervised",
            "v3",
            "stage 3: SC-DepthV3 with a teacher's pseudo-depth on video",
            _SUPERVISED,
        ),
    ):
        p = stages.add_parser(
            name,
            help=summary,
            formatter_class=_FORMATTER,
            description=description,
            epilog="recipe keys (key=value):\n" + describe(VideoRecipe),
        )
        p.add_argument(
            "--config",
            type=Path,
            help=f"recipe YAML (configs/demo/{name}.yaml, configs/paper/{name}.yaml)",
        )
        p.add_argument(
            "--restart", action="store_true", help="ignore an existing checkpoints/last.ckpt"
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
        p.set_defaults(func=_run, video_stage=name, video_version=version)


def _run(args: argparse.Namespace) -> int:
    from mesadepth.config import load_config
    from mesadepth.errors import ConfigError
    from mesadepth.stages.video import VideoRecipe, run_video

    recipe = load_config(
        VideoRecipe, args.config, args.overrides, base={"version": args.video_version}
    )
    if recipe.version != args.video_version:
        other = "supervised" if recipe.version == "v3" else "geometric"
        raise ConfigError(
            f"`mesadepth pretrain {args.video_stage}` trains version {args.video_version}, but the "
            f"recipe sets version={recipe.version}: run `mesadepth pretrain {other}` instead"
        )
    metrics = run_video(
        recipe, command=["mesadepth", *args.argv], resume="never" if args.restart else "auto"
    )
    if not metrics:
        return 0
    start, end = metrics.get("loss_start") or {}, metrics.get("loss_end") or {}
    print(
        f"{args.video_stage} pre-training ({recipe.version}): {metrics['steps']} steps in "
        f"{metrics['train_seconds']:.0f} s; weights in {Path(recipe.run_dir) / 'model.safetensors'}"
    )
    if recipe.pose.source == "poses":
        print("  motion from the known camera poses (poses.txt), not a PoseNet: depth in metres")
    if metrics.get("skipped_train"):
        print(f"  training data: {metrics['skipped_train']}")
    for term in end:
        if term in start:
            print(f"  {term:16s} {start[term]:.4f} -> {end[term]:.4f}")
    val = metrics.get("validation")
    if val:
        mode = metrics.get("validation_mode")
        print(f"validation ({mode}): val_loss {val['val_loss']:.4f}")
        if mode == "depth":
            keys = ("abs_rel", "rmse", "a1")
            rows = [("final model", val)]
            for label, key in (
                ("initial model", "validation_start"),
                ("constant depth", "baseline_constant_depth"),
            ):
                if metrics.get(key):
                    rows.append((label, metrics[key]))
            for label, row in rows:
                print(f"  {label:15s} " + "  ".join(f"{k} {row[k]:.4f}" for k in keys))
        line = pose_summary(metrics.get("validation_start") or {}, val)
        if line:
            print(line)
    return 0


def pose_summary(first: Mapping[str, float], last: Mapping[str, float]) -> str | None:
    """One line of PoseNet validation scores, start -> end (None when there are none): the
    motion is what depth from video is learned through (README, "GP on CPU")."""
    labels = {
        "pose_t_cos": "t cos",
        "pose_rot_err_deg": "rotation error",
        "pose_pair_cos": "pair cos",
    }
    parts = [
        f"{label} {first[key]:.3f} -> {last[key]:.3f}"
        if key in first
        else f"{label} {last[key]:.3f}"
        for key, label in labels.items()
        if key in last
    ]
    if "pose_rot_none_deg" in last:
        parts.append(f"no-rotation error {last['pose_rot_none_deg']:.3f}")
    return "  PoseNet         " + ", ".join(parts) if parts else None
