"""`sas bench NAME [--json] [ARGS...]`: run a benchmark of the ``sas_app.bench`` package.

Each module ``sas_app/bench/<name>.py`` (``-`` in NAME becomes ``_``) defines ``main(argv) -> dict``;
it measures, and this command prints the figures (as JSON with ``--json``). The benchmarks are
installed with the package (setup.py), so ``sas bench`` works outside a clone too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

HELP = "run a benchmark (sas_app/bench/) and print its figures"


def available() -> list[str]:
    from sas_app import bench

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def add_arguments(parser):
    parser.add_argument("name", help="benchmark name (one of: %s)" % ", ".join(available()))
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def load(name: str):
    if name not in available():
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(available()) or 'none'}")
    return importlib.import_module(f"sas_app.bench.{name.replace('-', '_')}")


def run(args) -> int:
    rest = list(args.rest)
    if "--json" in rest:  # `sas bench NAME --json ARGS` as well as `sas bench --json NAME ARGS`
        rest.remove("--json")
        args.json = True
    module = load(args.name)
    result = module.main(rest)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    sys.stdout.flush()
    return 0
