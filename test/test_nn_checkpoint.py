"""OpenScene checkpoints load strictly (with module./net3d. prefixes); our checkpoints round-trip."""

from collections import OrderedDict

import pytest
import torch

from sas_core.nn import (CheckpointError, SparseTensor, build_model, load_checkpoint, load_openscene_checkpoint,
                         save_checkpoint)




@pytest.fixture(scope="module")
def openscene_sd():
    torch.manual_seed(1)
    model = build_model("MinkUNet18A", 3, 768)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.state_dict()


def _write(path, sd, prefix, wrap=True):
    keyed = OrderedDict((prefix + k, v) for k, v in sd.items())
    obj = {"epoch": 100, "state_dict": keyed, "best_iou": 0.5} if wrap else keyed
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("prefix,wrap", [("module.net3d.", True), ("net3d.", True), ("", True), ("module.", False)])
def test_openscene_layout_loads_strictly(tmp_path, openscene_sd, prefix, wrap):
    assert len(openscene_sd) == 289
    path = _write(tmp_path / "scannet_openseg.pth.tar", openscene_sd, prefix, wrap)
    model = load_openscene_checkpoint(path, "MinkUNet18A", 768)
    for k, v in model.state_dict().items():
        assert torch.equal(v, openscene_sd[k]), k
    # out_channels can be read from the head
    assert load_openscene_checkpoint(path, "MinkUNet18A").out_channels == 768


def test_wrong_shape_names_key_and_both_shapes(tmp_path, openscene_sd):
    sd = OrderedDict(openscene_sd)
    sd["block3.0.conv1.kernel"] = torch.zeros(27, 64, 64)
    path = _write(tmp_path / "bad.pth.tar", sd, "module.net3d.")
    with pytest.raises(CheckpointError) as e:
        load_openscene_checkpoint(path, "MinkUNet18A", 768)
    msg = str(e.value)
    assert "block3.0.conv1.kernel" in msg and "(27, 64, 64)" in msg and "(27, 64, 128)" in msg


def test_missing_unexpected_and_wrong_architecture(tmp_path, openscene_sd):
    sd = OrderedDict(openscene_sd)
    del sd["bn0.bn.weight"]
    sd["extra_head.weight"] = torch.zeros(3)
    path = _write(tmp_path / "odd.pth.tar", sd, "net3d.")
    with pytest.raises(CheckpointError, match=r"missing \(1\): bn0.bn.weight"):
        load_openscene_checkpoint(path, "MinkUNet18A", 768)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra_head.weight"):
        load_openscene_checkpoint(path, "MinkUNet18A", 768)
    good = _write(tmp_path / "good.pth.tar", openscene_sd, "")
    with pytest.raises(CheckpointError, match="MinkUNet34C"):
        load_openscene_checkpoint(good, "MinkUNet34C", 768)


def test_own_checkpoint_roundtrip_is_self_describing(tmp_path):
    torch.manual_seed(0)
    model = build_model("MinkUNet14A", 3, 8)
    model.eval()
    config = {"voxel_size": 0.02, "teachers": ["a", "b"], "epochs": 100}
    extra = {"epoch": 7, "loss_curve": torch.arange(3.0)}
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", model, config, extra)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left behind
    loaded, cfg, ext = load_checkpoint(path)
    assert type(loaded).__name__ == "MinkUNet14A" and loaded.out_channels == 8 and not loaded.training
    assert cfg == config and ext["epoch"] == 7 and torch.equal(ext["loss_curve"], torch.arange(3.0))
    coords = torch.unique(torch.randint(0, 12, (200, 4)), dim=0).int()
    coords[:, 0] = 0
    coords = torch.unique(coords, dim=0)
    x = SparseTensor(torch.ones(len(coords), 3), coords)
    with torch.no_grad():
        assert torch.equal(model(x).F, loaded(SparseTensor(torch.ones(len(coords), 3), coords)).F)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "x.pt", model, {"bad": object()})


def test_truncated_corrupt_missing_and_foreign_files(tmp_path, openscene_sd):
    model = build_model("MinkUNet14A", 3, 8)
    path = save_checkpoint(tmp_path / "m.pt", model, {})
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_openscene_checkpoint(junk, "MinkUNet18A", 768)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = _write(tmp_path / "openscene.pth.tar", openscene_sd, "module.net3d.")
    with pytest.raises(CheckpointError, match="sas import-checkpoint"):
        load_checkpoint(foreign)
