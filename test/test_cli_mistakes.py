"""The mistakes newcomers make end in one line on stderr, exit code 1 (2 for usage), no traceback;
--debug / SAS_DEBUG=1 shows the traceback."""

import subprocess
import sys

import pytest

from sas_app import cli


def _run(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_files_and_cuda(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    rc, err = _run(capsys, ["segment", str(tmp_path / "none.pt"), str(tmp_path / "none.ply")])
    assert rc == 1 and "not found" in _one_line(err)
    if not torch.cuda.is_available():
        rc, err = _run(capsys, ["segment", str(tmp_path / "none.pt"), str(tmp_path / "none.ply"), "--device", "cuda"])
        line = _one_line(err)
        assert rc == 1 and "CUDA is not available" in line and "cpu" in line
    rc, err = _run(capsys, ["segment", str(tmp_path / "none.pt"), str(tmp_path / "none.ply"), "--device", "tpu"])
    line = _one_line(err)
    assert rc == 1 and ("not a torch device" in line or "not supported" in line), line


def test_a_folder_where_a_file_is_expected(capsys, tmp_path):
    pytest.importorskip("torch")
    rc, err = _run(capsys, ["segment", str(tmp_path), str(tmp_path)])
    assert rc == 1
    _one_line(err)


def test_typo_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", "bag", "--frame-stpe", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sas replay" in err and "unrecognized arguments: --frame-stpe" in err


def test_unexpected_errors_are_one_line_unless_debug(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda lazy=True: parser)
    parser._subparsers._group_actions[0].choices["models"].set_defaults(_run=boom)
    rc, err = _run(capsys, ["models"])
    line = _one_line(err)
    assert rc == 1 and "internal error (RuntimeError: kernel exploded second line)" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="kernel exploded"):
        cli.main(["models", "--debug"])
    monkeypatch.setenv("SAS_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["models"])


def test_real_process_prints_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sas_app.cli", "query", "a chair", "--checkpoint",
                        str(tmp_path / "none.pt"), "--cloud", str(tmp_path / "none.ply")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_output_suffix_and_folder_are_checked_first(capsys, tmp_path):
    rc, err = _run(capsys, ["query", "a chair", "--checkpoint", "x.pt", "--cloud", "y.ply", "--out",
                            str(tmp_path / "q.png")])
    assert rc == 1 and "give a .ply name" in _one_line(err)
    folder = tmp_path / "out.ply"
    folder.mkdir()
    rc, err = _run(capsys, ["query", "a chair", "--checkpoint", "x.pt", "--cloud", "y.ply", "--out", str(folder)])
    assert rc == 1 and "is a folder" in _one_line(err)
    assert not (tmp_path / "q.png").exists()
