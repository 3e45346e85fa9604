"""The ``sas`` command: one entry point, one subcommand per pipeline step.

Each subcommand lives in ``sas_app/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Subcommand modules are imported only when
listed or run, and they import their heavy dependencies inside ``run``; a subcommand's flags are
added only when it is chosen (flags come from config dataclasses, see :mod:`sas_core.config`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order shown in ``sas --help``; module name = command name with '-' replaced by '_'.
COMMANDS = (
    "synth", "fuse", "capability", "distill", "eval", "segment", "query", "replay", "bag-info", "demo", "bench",
    "models", "import-checkpoint",
)


def _module(name: str):
    return importlib.import_module(f"sas_app.commands.{name.replace('-', '_')}")


class _LazySubParsers(argparse._SubParsersAction):
    """Subparsers whose arguments are added when their command is chosen.

    ``sas --help`` then imports no command's dependencies (some config dataclasses live in modules
    that import torch); ``sas NAME ...`` builds only NAME's flags."""

    def __call__(self, parser, namespace, values, option_string=None):
        sub = self._name_parser_map.get(values[0]) if values else None
        build = getattr(sub, "_sas_pending", None)
        if build is not None:
            sub._sas_pending = None
            build(sub)
        super().__call__(parser, namespace, values, option_string)


def build_parser(lazy: bool = True) -> argparse.ArgumentParser:
    """The ``sas`` parser; ``lazy=False`` adds every subcommand's flags at once (tests, docs)."""
    parser = argparse.ArgumentParser(
        prog="sas",
        description="SAS-ROS: open-vocabulary 3D segmentation distilled from several 2D teachers.",
    )
    parser.register("action", "parsers", _LazySubParsers)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.set_defaults(_run=module.run)
        if lazy:
            p._sas_pending = module.add_arguments
        else:
            module.add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TimeoutError) as exc:  # user-facing errors: one clear line
        print(f"sas {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
