"""Subcommands of ``mesadepth`` beyond the first few in :mod:`mesadepth.cli`.

Each module has ``register(subparsers)`` which adds its parser; :func:`mesadepth.cli.build_parser`
calls it. Keeping one module per command keeps ``cli.py`` small and lets each command's
imports stay lazy (``mesadepth --help`` does not import torch-heavy modules it does not need).
"""
