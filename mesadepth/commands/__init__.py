"""The subcommands of ``mesadepth``, one module each.

Each module has ``register(subparsers)``, which adds its parser and sets ``func`` to the
function that runs it (``func(args) -> exit status``); :func:`mesadepth.cli.build_parser` calls
them, one line each. A module's imports of torch-heavy code stay inside its functions, so
``mesadepth --help`` does not load what it does not need. ``pretrain`` groups its stages the
same way: each stage module has ``register(stages)``.
"""
