"""The ``sas`` command: one entry point, one subcommand per pipeline step.

Each subcommand lives in ``sas_app/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Subcommand modules are imported only when
listed or run, and they import their heavy dependencies inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order shown in ``sas --help``; module name = command name with '-' replaced by '_'.
COMMANDS = (
    "synth", "fuse", "capability", "distill", "eval", "segment", "query", "replay", "demo", "bench",
    "import-checkpoint",
)


def _module(name: str):
    return importlib.import_module(f"sas_app.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sas",
        description="SAS-ROS: open-vocabulary 3D segmentation distilled from several 2D teachers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
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
    except (FileNotFoundError, ValueError) as exc:  # user-facing errors: one clear line
        print(f"sas {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
