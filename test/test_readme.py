"""The README stays true: its walkthrough blocks run in order and succeed, and every other `sas`
command line it shows parses with today's flags."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARK = "<!-- run by test/test_readme.py -->"


def walkthrough_blocks():
    """The ```bash blocks right after the marker comment, in README order."""
    return re.findall(re.escape(MARK) + r"\s*```bash\n(.*?)```", README, flags=re.S)


def test_the_walkthrough_is_marked():
    blocks = walkthrough_blocks()
    assert len(blocks) == 2 and README.count(MARK) == 2
    assert "./sas synth" in blocks[0] and "./sas play" in blocks[1]


@pytest.mark.slow
@pytest.mark.ros
def test_walkthrough_runs_in_order(tmp_path):
    """Run as a new user would, from a folder of their own: `./sas` is the clone's wrapper and
    `config/` the clone's (the only two substitutions)."""
    script = "set -euo pipefail\n" + "\n".join(walkthrough_blocks())
    script = script.replace("./sas ", f"{ROOT / 'sas'} ").replace(" config/", f" {ROOT / 'config'}/")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=1500, env=env)
    tail = (r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, tail
    try_dir = tmp_path / "try"
    assert (try_dir / "run" / "last.pt").is_file() and (try_dir / "chairs.ply").is_file(), tail
    assert (try_dir / "maps" / "synth_00000_mcap" / "manifest.json").is_file()
    assert "published" in r.stdout and "-r color/image_raw:=/camera/color/image_raw" in r.stdout, tail
    assert "a chair" in r.stdout and "Traceback" not in r.stderr, tail


def _sas_commands():
    """[(command, full)] for every `sas ...` / `./sas ...` the README shows: full for code-block
    lines (a whole command), not for inline code in prose (often a fragment: `sas eval --instances`)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append((line.split("#", 1)[0].strip(), True))
    found += [(m, False) for m in re.findall(r"`((?:\./)?sas [^`]+)`", README)]
    out = []
    for line, full in found:
        m = re.match(r"(?:\./)?sas (\S.*)", line.rstrip("&").strip())
        if m and not re.search(r"[<>]|\.\.\.", m.group(1)):
            out.append((m.group(1), full))
    return out


def test_every_readme_sas_command_parses():
    from sas_app import cli

    parser = cli.build_parser(lazy=False)
    subparsers = parser._subparsers._group_actions[0].choices
    full_checked = flags_checked = 0
    for cmd, full in _sas_commands():
        words = shlex.split(cmd.replace("$HOME", "/home/u").replace("$PWD", "/w"))
        if words[0] in ("node", "shell", "COMMAND", "NAME") or words[0].startswith("-"):
            continue  # the wrapper's own (the node's parameters are checked by test_mapping_ros.py)
        assert words[0] in subparsers, f"README shows `sas {cmd}`, but there is no `sas {words[0]}`"
        if words[0] == "bench":  # a benchmark's own flags are its module's (sas_app/bench/NAME.py)
            from sas_app.commands.bench import available

            assert len(words) == 1 or words[1] in available() + ["NAME"], f"README shows `sas {cmd}`: no such benchmark"
            continue
        if full:
            try:
                parser.parse_args(words)
            except SystemExit as exc:
                raise AssertionError(f"README shows `sas {cmd}`, which does not parse") from exc
            full_checked += 1
        known = subparsers[words[0]]._option_string_actions
        for w in words[1:]:
            if w.startswith("--"):
                assert w.split("=", 1)[0] in known, f"README shows `sas {cmd}`: `sas {words[0]}` has no {w}"
                flags_checked += 1
    assert full_checked >= 6 and flags_checked >= 30
