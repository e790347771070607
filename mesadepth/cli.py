"""The ``mesadepth`` command line: one entry point, one subcommand per job.

Each subcommand is a module of :mod:`mesadepth.commands` with ``register(sub)``, which adds its
parser and the function that runs it; :func:`build_parser` registers those named in
:data:`COMMANDS`, in that order. Only commands that work are registered. Each
subcommand's ``--help`` lists its options and, for recipe-driven commands, every configuration
key with its default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mesadepth import __version__
from mesadepth.errors import MesaError

_FORMATTER = argparse.RawDescriptionHelpFormatter

#: The modules of :mod:`mesadepth.commands`, in the order ``mesadepth --help`` lists them; a new
#: command is one module with ``register(sub)`` and one name here.
COMMANDS: tuple[str, ...] = (
    "synth",
    "inspect",
    "pretrain",
    "evaluate",
    "cka",
    "predict",
    "pipeline",
    "pseudo_depth",
    "finetune",
    "export",
)


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
    for name in COMMANDS:
        importlib.import_module(f"mesadepth.commands.{name}").register(sub)
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
