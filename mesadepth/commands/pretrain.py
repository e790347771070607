"""``mesadepth pretrain STAGE``: the three pre-training stages of MeSa, one subcommand each.

The stages live in their own modules, each with ``register(stages)``: ``masked`` in
:mod:`mesadepth.commands.pretrain_masked`, ``geometric`` and ``supervised`` in
:mod:`mesadepth.commands.pretrain_video`.
"""

from __future__ import annotations

import argparse

from mesadepth.commands import pretrain_masked, pretrain_video

_FORMATTER = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand, with its stages, to ``sub``."""
    p = sub.add_parser(
        "pretrain",
        help="pre-train the encoder: masked (SimMIM), geometric (SC-DepthV2), supervised (SC-DepthV3)",
        formatter_class=_FORMATTER,
        description="Pre-training stages of MeSa. Each writes a run directory whose\n"
        "model.safetensors holds the encoder (encoder.*) for the next stage.",
    )
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    # stages register here, one line each, in the order --help lists them
    pretrain_masked.register(stages)
    pretrain_video.register(stages)
