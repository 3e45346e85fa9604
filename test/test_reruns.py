"""Reruns into the same folder never mix two runs: refused, or (--overwrite) exactly the new run."""

import json

import pytest

from sas_app import cli

pytest.importorskip("torch")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_synth_and_replay_export_reruns(tmp_path, capsys):
    out = tmp_path / "synth"
    base = ["synth", "--out", str(out), "--width", "48", "--height", "36", "--points-per-m2", "300",
            "--storage", "sqlite3"]
    assert cli.main(base + ["--frames", "6"]) == 0
    first = _files(out)
    assert len([f for f in first if "/color/" in f]) == 6
    # a second run into the same folder is refused and changes nothing
    assert cli.main(base + ["--frames", "3", "--seed", "5"]) == 1
    assert "not empty" in capsys.readouterr().err and _files(out) == first
    # --overwrite: exactly the new run's content (3 frames, the new seed's scene only)
    assert cli.main(base + ["--frames", "3", "--seed", "5", "--overwrite"]) == 0
    manifest = json.loads((out / "synth.json").read_text())
    again = _files(out)
    assert [s["seed"] for s in manifest["scenes"]] == [5]
    assert len([f for f in again if "/color/" in f]) == 3 and not any("synth_00000" in f for f in again)
    assert json.loads((out / ".sas-output.json").read_text())["files"] == [f for f in again if f != ".sas-output.json"]

    bag = next((out / "bags").iterdir())
    export = tmp_path / "export"
    rp = ["replay", str(bag), "--out", str(tmp_path / "maps"), "--export", str(export), "--name", "r"]
    assert cli.main(rp) == 0
    n_color = len([f for f in _files(export) if "/color/" in f])
    assert n_color == 3
    capsys.readouterr()
    assert cli.main(rp + ["--frame-step", "2"]) == 1  # refused before reading the bag
    assert "already holds scene 'r'" in capsys.readouterr().err
    assert cli.main(rp + ["--frame-step", "2", "--overwrite"]) == 0
    assert len([f for f in _files(export) if "/color/" in f]) == 2  # frames 0 and 2 only
    # other recordings in the same export folder are kept (training on several bags)
    assert cli.main(rp[:-1] + ["other"]) == 0
    assert {p.name for p in (export / "2d").iterdir() if p.is_dir()} == {"r", "other"}
    assert len([f for f in _files(export / "2d" / "r") if "/color/" in f or f.startswith("color")]) == 2


def test_synth_never_empties_a_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert cli.main(["synth", "--out", str(foreign), "--overwrite", "--frames", "2"]) == 1
    assert "not deleting anything" in capsys.readouterr().err and (foreign / "keep.txt").read_text() == "mine"
    (tmp_path / "f.txt").write_text("x")
    assert cli.main(["synth", "--out", str(tmp_path / "f.txt")]) == 1
    assert "is a file" in capsys.readouterr().err
