"""The ``sas`` command: one entry point, one subcommand per pipeline step.

Each subcommand lives in ``sas_app/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Subcommand modules are imported only when
listed or run, and they import their heavy dependencies inside ``run``; a subcommand's flags are
added only when it is chosen (flags come from config dataclasses, see :mod:`sas_core.config`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order shown in ``sas --help``; module name = command name with '-' replaced by '_'.
COMMANDS = (
    "synth", "fuse", "capability", "distill", "eval", "segment", "query", "replay", "bag-info", "play", "view",
    "demo", "bench", "models", "import-checkpoint",
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


DEBUG_ENV = "SAS_DEBUG"


def build_parser(lazy: bool = True) -> argparse.ArgumentParser:
    """The ``sas`` parser; ``lazy=False`` adds every subcommand's flags at once (tests, docs)."""
    parser = argparse.ArgumentParser(
        prog="sas",
        description="SAS-ROS: open-vocabulary 3D segmentation distilled from several 2D teachers.",
        epilog=f"Errors are one line; --debug (anywhere on the line) or {DEBUG_ENV}=1 shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also {DEBUG_ENV}=1)")
    parser.register("action", "parsers", _LazySubParsers)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.set_defaults(_run=module.run, _parser=p)
        if lazy:
            p._sas_pending = module.add_arguments
        else:
            module.add_arguments(p)
    return parser


def _debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _error_line(exc: BaseException) -> str:
    """One line for an exception: the message for user mistakes, type + message otherwise."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, ValueError, TimeoutError)):
        return text
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename or text} is a folder, not a file: give a file name"
    if isinstance(exc, OSError):  # permissions, full disk, existing files: the OS says what
        return f"{type(exc).__name__}: {text}"
    if isinstance(exc, ImportError):
        return f"a required package is missing ({text}); run `make env` (or scripts/setup_env.sh)"
    return f"internal error ({type(exc).__name__}: {text[:300]}); rerun with --debug for the traceback"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if extra:  # a mistyped flag: the subcommand's usage, not the top-level one
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "device", None):
            from sas_core.mapping import check_device

            check_device(args.device)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line (traceback with --debug)
        if debug:
            raise
        print(f"sas {args.command}: error: {_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
