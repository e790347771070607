"""``mesadepth pipeline`` (the MeSa chain from a recipe) and ``mesadepth demo`` (the chain on
the synthetic world, on CPU)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mesadepth.errors import MissingFileError

_FORMATTER = argparse.RawDescriptionHelpFormatter


def repo_configs() -> Path:
    """The ``configs/`` folder beside the package (an editable install or a source checkout)."""
    return Path(__file__).resolve().parents[2] / "configs"


def register(sub: argparse._SubParsersAction) -> None:
    from mesadepth.config import describe
    from mesadepth.pipeline import PipelineConfig

    p = sub.add_parser(
        "pipeline",
        help="the whole MeSa chain: MP -> GP -> SP, fine-tune each, evaluate, CKA, report",
        formatter_class=_FORMATTER,
        description=(
            "Run MeSa end to end from one recipe: masked (MP), geometric from MP (MP+GP),\n"
            "pseudo-depth and supervised from MP+GP (MP+GP+SP), then fine-tune each variant with\n"
            "the same recipe, evaluate each on NYUv2 and IBims-1, compare layers with CKA, and\n"
            "write RUN/report.md (Table 1 and Table 2 rows, CKA figures, depth previews).\n\n"
            "Each step is a run directory under run_dir. Running the command again skips\n"
            "finished steps and resumes an interrupted one from its last checkpoint. A stage\n"
            "can be replaced by a file: masked.checkpoint=official_simmim.pth skips MP training.\n\n"
            "  mesadepth pipeline --config configs/paper/pipeline.yaml world=/data\n"
            "  mesadepth pipeline --config configs/demo/pipeline.yaml run_dir=runs/p2\n\n"
            "Recipe paths inside the file are relative to the file's folder (or absolute)."
        ),
        epilog="pipeline keys (key=value):\n" + describe(PipelineConfig),
    )
    p.add_argument("--config", type=Path, required=True, help="pipeline recipe YAML")
    p.add_argument(
        "--dry-run", action="store_true", help="list the steps and which are done; run nothing"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(func=_run_pipeline)

    d = sub.add_parser(
        "demo",
        help="synthetic world + the MeSa pipeline on CPU in minutes, with its report",
        formatter_class=_FORMATTER,
        description=(
            "Render the synthetic world (if --out does not hold one yet) and run the whole\n"
            "MeSa pipeline on configs/demo/pipeline.yaml: tiny Swin-v2, CPU, about 5 minutes\n"
            "on 2 cores. The supervised stage's teacher is a depth network trained with ground\n"
            "truth on separate synthetic scenes of a third style (the stand-in for LeReS).\n"
            "Running it again skips what is done.\n\n"
            "  mesadepth demo                 # writes runs/demo/{world,pipeline}\n"
            "  mesadepth demo --out /tmp/mesa"
        ),
    )
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    d.add_argument("--config", type=Path, help="pipeline recipe (default: the demo recipe)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline overrides")
    d.set_defaults(func=_run_demo)


def _run_pipeline(args: argparse.Namespace) -> int:
    from mesadepth.pipeline import load_pipeline_config, plan, run_pipeline

    cfg = load_pipeline_config(args.config, args.overrides)
    if args.dry_run:
        for i, step in enumerate(plan(cfg, args.config), start=1):
            print(f"[{i}] {step.name}: {'done' if step.is_done() else 'to run'} ({step.folder})")
        return 0
    run_pipeline(cfg, config_path=args.config, command=["mesadepth", *args.argv])
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from mesadepth.config import load_config
    from mesadepth.data.world import PRESETS, SynthConfig, generate_world
    from mesadepth.pipeline import load_pipeline_config, run_pipeline

    config = args.config or repo_configs() / "demo" / "pipeline.yaml"
    if not Path(config).is_file():
        raise MissingFileError(
            config,
            "the demo pipeline recipe",
            "it ships in the repository's configs/demo/; run from a source checkout or pass "
            "--config",
        )
    out = Path(args.out)
    world = out / "world"
    if not (world / "manifest.json").is_file():
        print(f"demo: rendering the synthetic world into {world} (preset demo) ...")
        t0 = time.perf_counter()
        synth = load_config(SynthConfig, None, [], base={"preset": "demo", **PRESETS["demo"]})
        generate_world(synth, world, progress=True)
        print(f"demo: world ready in {time.perf_counter() - t0:.0f} s")
    else:
        print(f"demo: using the synthetic world in {world}")
    cfg = load_pipeline_config(
        config, [f"run_dir={out / 'pipeline'}", f"world={world}", *args.overrides]
    )
    run_pipeline(cfg, config_path=config, command=["mesadepth", *args.argv])
    return 0
