"""The mistakes newcomers make end in one line on stderr, exit code 1 (2 for usage), no traceback;
--debug / SAS_DEBUG=1 shows the traceback."""

import re
import subprocess
import sys

import pytest

from sas_app import cli


def _run(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_line(err):
    # progress bars (tqdm's "... [00:00, ?frame/s]") are not error lines
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not re.search(r"\[\d\d:\d\d.*/s\]\s*$", ln)]
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


def test_wrong_kind_of_file_is_named(capsys, tmp_path):
    """A `sas fuse` output passed as a checkpoint is called fused features, with the command to use."""
    torch = pytest.importorskip("torch")
    fused = tmp_path / "scene0000_00_0.pt"
    torch.save({"feat": torch.zeros(4, 8, dtype=torch.float16), "mask_full": torch.ones(4, dtype=torch.bool)}, fused)
    cloud = tmp_path / "c.ply"
    cloud.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                     "property float z\nend_header\n0 0 0\n")
    rc, err = _run(capsys, ["segment", str(fused), str(cloud), "--out", str(tmp_path / "o.ply")])
    line = _one_line(err)
    assert rc == 1 and "fused 2D features" in line and "sas distill" in line, line
    assert "load_openscene_checkpoint" not in line and not (tmp_path / "o.ply").exists()


def test_simulated_teacher_on_real_frames_names_a_real_teacher(capsys, tmp_path):
    """Frames without ground-truth labels (a replay export) and the default simulated teacher."""
    import shutil
    data = tmp_path / "data"
    assert cli.main(["synth", "--out", str(data), "--width", "48", "--height", "36", "--points-per-m2", "300",
                     "--frames", "2"]) == 0
    labels = [p for p in data.rglob("label") if p.is_dir()]
    assert labels
    for p in labels:
        shutil.rmtree(p)
    capsys.readouterr()
    rc, err = _run(capsys, ["fuse", "--data", str(data / "openscene"), "--out", str(tmp_path / "fused")])
    line = _one_line(err)
    assert rc == 1 and "ground-truth labels" in line and "dense_clip" in line, line
    assert not any((tmp_path / "fused").glob("*.pt"))
