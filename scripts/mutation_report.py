#!/usr/bin/env python3
"""Mutation testing report (`make mutate`): run mutmut over setup.cfg's modules, then count.

    python scripts/mutation_report.py --run          # mutmut run, then the report
    python scripts/mutation_report.py                # report of the last run (mutants/)
    python scripts/mutation_report.py --json         # counts as JSON

mutmut writes, per mutated file, ``mutants/<path>.meta`` with each mutant's exit code; this
script turns them into counts per module (killed, survived, no tests, timeout, ...) and lists the
surviving mutants with their diffs (``mutmut show``) in ``mutation_report.txt``. A survivor is a
change to the code that no test noticed: either a real gap in the tests (kill it with a test) or
an equivalent mutant (a change that cannot alter behaviour; say so in the report's review).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mutmut's own meanings of a mutant's exit code (mutmut.__main__.status_by_exit_code, 3.8)
FALLBACK_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
                   35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
                   152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}


def statuses() -> dict:
    try:
        from mutmut.__main__ import status_by_exit_code
        return status_by_exit_code
    except Exception:  # noqa: BLE001 - a mutmut without that table: our copy of 3.8's
        return collections.defaultdict(lambda: "suspicious", FALLBACK_STATUS)


def collect(mutants: Path) -> dict:
    """module -> {mutant name: status}."""
    status_of = statuses()
    out: dict = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        out[module] = {name: status_of[code] for name, code in codes.items()}
    return out


def show(name: str) -> str:
    r = subprocess.run(["mutmut", "show", name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return (r.stdout or r.stderr).strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run mutmut first (slow)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutmut --max-children")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument("--out", default=str(ROOT / "mutation_report.txt"), help="report file")
    p.add_argument("--no-diffs", action="store_true", help="do not list the survivors' diffs")
    args = p.parse_args(argv)
    if args.run:
        # mutmut forks a worker per mutant from a process that already ran numba's parallel kernels:
        # GNU OpenMP (numba's first choice here, sas_core.numba_support) kills such a child with
        # SIGTERM ("fork() called from a process already using GNU OpenMP"), which mutmut counts as
        # "suspicious". The workqueue layer is fork-safe.
        env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
        rc = subprocess.run(["mutmut", "run", "--max-children", str(args.jobs)], cwd=ROOT, env=env).returncode
        if rc not in (0, 1):
            print(f"mutmut run failed (rc {rc})", file=sys.stderr)
            return rc
    mutants = ROOT / "mutants"
    if not mutants.is_dir():
        print("no mutants/ folder: run with --run first", file=sys.stderr)
        return 1
    results = collect(mutants)
    counts = {m: dict(collections.Counter(s.values())) for m, s in results.items()}
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    if args.json:
        print(json.dumps({"modules": counts, "total": dict(total)}, indent=2, sort_keys=True))
    lines = ["# Mutation testing report (mutmut; setup.cfg [mutmut])", ""]
    kinds = ["killed", "survived", "no tests", "timeout", "suspicious", "not checked"]
    lines.append("| module | " + " | ".join(kinds) + " |")
    lines.append("|---|" + "---:|" * len(kinds))
    for m, c in counts.items():
        lines.append(f"| {m} | " + " | ".join(str(c.get(k, 0)) for k in kinds) + " |")
    lines.append("| total | " + " | ".join(str(total.get(k, 0)) for k in kinds) + " |")
    survivors = [n for s in results.values() for n, st in s.items() if st == "survived"]
    lines += ["", f"## Survivors ({len(survivors)})", ""]
    for name in survivors:
        lines.append(f"### {name}")
        if not args.no_diffs:
            lines += ["```diff", show(name), "```"]
        lines.append("")
    text = "\n".join(lines) + "\n"
    tmp = Path(args.out + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    if not args.json:
        print("\n".join(lines[: 4 + len(counts) + 1]))
        print(f"\n{len(survivors)} survivors listed in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
