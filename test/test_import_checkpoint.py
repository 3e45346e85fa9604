"""`sas import-checkpoint`: an OpenScene-layout release checkpoint becomes a Segmenter checkpoint."""

import numpy as np
import pytest
import torch

from sas_app import cli


def test_import_openscene_checkpoint_then_segment(tmp_path):
    from sas_core.infer import Segmenter
    from sas_core.nn import build_model

    net = build_model("MinkUNet14A", in_channels=3, out_channels=32)
    release = tmp_path / "openscene_release.pth.tar"
    torch.save({"epoch": 100, "state_dict": {f"module.net3d.{k}": v for k, v in net.state_dict().items()}}, release)
    out = tmp_path / "imported.pt"
    assert cli.main(["import-checkpoint", str(release), str(out), "--arch", "MinkUNet14A",
                     "--voxel-size", "0.05", "--synthetic-text"]) == 0

    seg = Segmenter.from_checkpoint(out)
    assert seg.config.voxel_size == pytest.approx(0.05)
    for k, v in net.state_dict().items():  # weights carried over exactly
        assert torch.equal(seg.model.state_dict()[k], v), k
    rng = np.random.default_rng(0)
    feats = seg.features(rng.uniform(0, 2, size=(500, 3)).astype(np.float32))
    assert tuple(feats.shape) == (500, 32)
    seg.set_vocabulary(["chair", "table", "wall"])
    labels, _ = seg.classify(feats)
    assert set(np.unique(np.asarray(labels))) <= {0, 1, 2}


def test_import_needs_a_text_space_and_the_right_architecture(tmp_path, capsys):
    from sas_core.nn import build_model

    net = build_model("MinkUNet14A", in_channels=3, out_channels=32)
    release = tmp_path / "r.pth.tar"
    torch.save({"state_dict": net.state_dict()}, release)
    assert cli.main(["import-checkpoint", str(release), str(tmp_path / "o.pt")]) == 1
    assert "--clip-model" in capsys.readouterr().err
    # A 14A checkpoint read as 18A fails strictly, naming keys.
    assert cli.main(["import-checkpoint", str(release), str(tmp_path / "o.pt"), "--synthetic-text"]) == 1
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()
