"""The `sas` CLI: every subcommand has help; unknown benchmarks fail clearly."""

import subprocess
import sys
from pathlib import Path

import pytest

from sas_app import cli

ROOT = Path(__file__).resolve().parents[1]


def run_sas(*args):
    return subprocess.run([sys.executable, "-m", "sas_app.cli", *args], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_subcommand_has_help(command):
    out = run_sas(command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"usage: sas {command}" in out.stdout


def test_top_level_help_lists_commands():
    out = run_sas("--help")
    assert out.returncode == 0
    for command in cli.COMMANDS:
        assert command in out.stdout


def test_unknown_benchmark_is_a_clear_error():
    out = run_sas("bench", "no-such-bench")
    assert out.returncode == 1
    assert "unknown benchmark 'no-such-bench'" in out.stderr


def test_bench_json_flag_after_name(monkeypatch, capsys, tmp_path):
    import sas_app.bench

    (tmp_path / "tiny.py").write_text("def main(argv):\n    return {'argv': argv}\n")
    monkeypatch.setattr(sas_app.bench, "__path__", [*sas_app.bench.__path__, str(tmp_path)])
    assert cli.main(["bench", "tiny", "--json", "--quick"]) == 0
    assert '"argv": [\n    "--quick"\n  ]' in capsys.readouterr().out
