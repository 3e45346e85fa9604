"""`sas bench NAME [--json] [ARGS...]`: run a benchmark script from ``bench/``.

Each script ``bench/<name>.py`` (``-`` in NAME becomes ``_``) defines ``main(argv) -> dict``;
it measures, and this command prints the figures (as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HELP = "run a benchmark from bench/ and print its figures"

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_arguments(parser):
    parser.add_argument("name", help="benchmark name (one of: %s)" % ", ".join(available()))
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def load(name: str):
    path = BENCH_DIR / f"{name.replace('-', '_')}.py"
    if not path.exists():
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(available()) or 'none'}")
    spec = importlib.util.spec_from_file_location(f"sas_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
