"""``mesadepth inspect``: read datasets with mesadepth's loaders and summarise what they hold."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand to ``sub``."""
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
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
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
