"""``mesadepth pseudo-depth``: write SC-DepthV3 pseudo-depth beside every video frame.

Specification: teacher-and-cka.md A5 (writer), A8 (teachers); geometric-and-supervised-
pretraining.md 1.4. The work is done by :func:`mesadepth.teachers.write_pseudo_depth_tree`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pseudo-depth`` subcommand to ``sub``."""
    p = sub.add_parser(
        "pseudo-depth",
        help="write a teacher's pseudo-depth beside each video frame (<scene>/leres_depth/)",
        formatter_class=_FORMATTER,
        description=(
            "Run a depth teacher over the frames of an SC-Depth video folder and write what\n"
            "SC-DepthV3 (MeSa's supervised stage) reads: <data>/<split>/<scene>/leres_depth/\n"
            "<frame stem>.png, one per *.jpg, single-channel uint16 = trunc(d / max(d) * 60000)\n"
            "of the teacher's relative depth (larger = farther). Files are written atomically;\n"
            "frames already done are skipped (--overwrite rewrites them); each scene's folder\n"
            "gets a teacher.json that records the teacher and its conversion.\n\n"
            "Teacher specs (KIND:TARGET, then optional ,key=value items):\n"
            "  leres:resnext101:weights/res101.pth   LeReS (the reference teacher), ResNeXt-101\n"
            "  leres:resnet50:weights/res50.pth      LeReS ResNet-50; leres:PATH detects it\n"
            "      options: input_size=448, resize=opencv|torch|auto, per_image_min=true\n"
            "      resize=opencv (default) reproduces the reference pseudo-depth; resize=torch\n"
            "      approximates it (recorded in teacher.json), auto = OpenCV if installed\n"
            "      The weights are not on a model hub: get res101.pth / res50.pth through the\n"
            "      links in the AdelaiDepth LeReS README and pass the local path.\n"
            "  hf:models/depth-anything-v2-small     a transformers depth model saved locally\n"
            "      (config.json, model.safetensors, preprocessor_config.json), loaded offline;\n"
            "      disparity outputs (Depth Anything, MiDaS DPT) become 1 / (d / max d + delta)\n"
            "      options: output=auto|inverse_relative|depth, delta=0.01, backend=auto|pil|torchvision\n"
            "  files:/data/precomputed               stored maps: <scene>/leres_depth/*.png or\n"
            "      <scene>/*.npy, paired with the frames by sorted position\n"
            "      options: kind=depth|inverse, delta=0.01, format=auto|png|npy, subdir=leres_depth\n"
            "  mesadepth:runs/demo/teacher/model.safetensors   a model of `mesadepth finetune`\n"
            "      (the demo's teacher); options: flip=true, shift_window=true\n\n"
            "Examples:\n"
            "  mesadepth pseudo-depth --teacher leres:resnext101:weights/res101.pth \\\n"
            "      --data /data/nyu_video --batch 16 --device cuda\n"
            "  mesadepth pseudo-depth --teacher hf:models/dpt-large,output=inverse_relative \\\n"
            "      --data runs/world/video --scenes scene_000,scene_001 --npy\n"
            "  mesadepth pseudo-depth --teacher mesadepth:runs/demo/teacher/model.safetensors \\\n"
            "      --data runs/world/video"
        ),
    )
    p.add_argument("--teacher", required=True, metavar="SPEC", help="teacher spec (see above)")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="video root in the SC-Depth layout (holds training/<scene>/*.jpg)",
    )
    p.add_argument(
        "--split", default="training", help="sub-folder that holds the scenes (default training)"
    )
    p.add_argument(
        "--scenes", help="comma-separated scene folder names (default: every scene with frames)"
    )
    p.add_argument("--batch", type=int, default=8, help="frames per forward pass (default 8)")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    p.add_argument("--overwrite", action="store_true", help="rewrite frames that are done")
    p.add_argument(
        "--npy",
        action="store_true",
        help="also write <stem>.npy: the float32 depth before the uint16 scaling",
    )
    p.add_argument("--summary", type=Path, help="also write the summary as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mesadepth.io import atomic_write_text
    from mesadepth.teachers import build_teacher, write_pseudo_depth_tree

    scenes = [s for s in args.scenes.split(",") if s] if args.scenes else None
    teacher = build_teacher(args.teacher, device=args.device)
    result = write_pseudo_depth_tree(
        teacher,
        args.data,
        split=args.split,
        scenes=scenes,
        batch_size=args.batch,
        overwrite=args.overwrite,
        npy=args.npy,
        progress=not args.quiet,
    )
    print(f"pseudo-depth: teacher {teacher.spec}")
    if result["teacher"].get("reference_deviation"):
        print(f"  differs from the reference: {result['teacher']['reference_deviation']}")
    for s in result["scenes"]:
        rng = (
            f"depth {s['depth_min']:.4g} .. {s['depth_max']:.4g}" if s["written"] else "nothing new"
        )
        print(
            f"  {s['scene']}: {s['frames']} frames, {s['written']} written, "
            f"{s['skipped']} skipped, {rng}"
        )
    print(
        f"{result['frames_written']} written, {result['frames_skipped']} skipped in "
        f"{result['seconds']:.1f} s -> {result['data']}/<scene>/leres_depth/"
    )
    if args.summary:
        atomic_write_text(args.summary, json.dumps(result, indent=2) + "\n")
    return 0
