"""OpenScene fused-feature files: format, round trips, multi-file scenes, legacy layout, errors."""

import pytest
import torch

from sas_core.data.fused_features import (
    fused_feature_paths,
    load_fused_features,
    load_scene_features,
    save_fused_features,
    save_scene_features,
    scene_name,
)
from sas_core.geometry.multiview import FusedFeatures


def random_fused(n=500, dim=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).half()
    mask = torch.rand(n, generator=g) > 0.3
    feat[~mask] = 0
    return feat, mask


@pytest.mark.parametrize("dim", [512, 768])  # LSeg, OpenSeg
def test_file_is_openscene_format_and_round_trips(tmp_path, dim):
    feat, mask = random_fused(dim=dim)
    path = save_fused_features(tmp_path / "scene0000_00_0.pt", feat, mask)
    # exactly what OpenScene's loader expects: two keys, fp16 (M, C) rows of the masked points
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["feat", "mask_full"]
    assert raw["feat"].dtype == torch.float16 and raw["feat"].shape == (int(mask.sum()), dim)
    assert raw["mask_full"].dtype == torch.bool and raw["mask_full"].shape == (500,)
    assert torch.equal(raw["feat"], feat[mask])
    f2, m2 = load_fused_features(path, dim=dim)
    assert torch.equal(f2, feat[mask]) and torch.equal(m2, mask)
    # OpenScene's val/test reconstruction: dense features indexed by mask_full
    dense = torch.zeros(500, dim, dtype=torch.float16)
    dense[m2] = f2
    assert torch.equal(dense, feat)
    with pytest.raises(ValueError, match="768-d" if dim == 512 else "512-d"):
        load_fused_features(path, dim=768 if dim == 512 else 512)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_numpy_mask_and_trailing_axis_are_read(tmp_path):
    feat, mask = random_fused(dim=16)
    torch.save({"feat": feat[mask].unsqueeze(-1), "mask_full": mask.numpy()}, tmp_path / "a_0.pt")
    f, m = load_fused_features(tmp_path / "a_0.pt")
    assert f.shape == (int(mask.sum()), 16) and torch.equal(m, mask)


def test_legacy_three_key_layout(tmp_path):
    n = 50
    chunk = torch.zeros(n, dtype=torch.bool)
    chunk[::2] = True  # 25 points in the chunk
    feat_chunk = torch.randn(25, 8).half()
    visible = torch.tensor([0, 3, 4, 10, 24])  # rows of the chunk that were visible
    torch.save({"feat": feat_chunk, "mask": visible, "mask_full": chunk}, tmp_path / "old_0.pt")
    f, m = load_fused_features(tmp_path / "old_0.pt")
    assert torch.equal(f, feat_chunk[visible])
    assert m.nonzero().squeeze(1).tolist() == [0, 6, 8, 20, 48]


def test_training_chunks_and_scene_merge(tmp_path):
    feat, mask = random_fused(n=3000, dim=32)
    paths = save_scene_features(tmp_path, "data/train/scene0007_01_vh_clean_2.pth", feat, mask,
                                n_files=5, n_split_points=800)
    assert [p.name for p in paths] == [f"scene0007_01_{k}.pt" for k in range(5)]
    assert fused_feature_paths(tmp_path, "scene0007_01") == paths
    masks = [load_fused_features(p)[1] for p in paths]
    for m in masks:
        assert int(m.sum()) <= 800 and not bool((m & ~mask).any())  # subsets of the visible points
    assert not torch.equal(masks[0], masks[1])  # different random chunks
    merged = load_scene_features(tmp_path, "scene0007_01", n_points=3000)
    union = torch.stack(masks).any(0)
    assert torch.equal(merged.mask, union)
    assert torch.equal(merged.features[union], feat[union])
    one = load_scene_features(tmp_path, "scene0007_01", file=3)
    assert torch.equal(one.mask, masks[3])
    with pytest.raises(ValueError, match="points"):
        load_scene_features(tmp_path, "scene0007_01", n_points=10)
    with pytest.raises(FileNotFoundError):
        load_scene_features(tmp_path, "scene0007_01", file=9)


def test_single_file_naming(tmp_path):
    feat, mask = random_fused(n=200, dim=768)
    save_scene_features(tmp_path, "scene-0103", feat, mask, single_file=True)
    save_scene_features(tmp_path, "scene0001_00", feat, mask)
    assert fused_feature_paths(tmp_path, "scene-0103") == [tmp_path / "scene-0103.pt"]
    assert fused_feature_paths(tmp_path, "scene0001_00") == [tmp_path / "scene0001_00_0.pt"]
    fused = load_scene_features(tmp_path, "scene-0103", n_points=200, dim=768)
    assert isinstance(fused, FusedFeatures) and fused.dim == 768
    assert torch.equal(fused.features, feat) and torch.equal(fused.mask, mask)
    assert fused.counts.dtype == torch.int32 and torch.equal(fused.counts > 0, mask)


def test_errors_for_corrupt_or_inconsistent_files(tmp_path):
    (tmp_path / "bad_0.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad_0.pt"):
        load_fused_features(tmp_path / "bad_0.pt")
    torch.save({"feat": torch.zeros(3, 4)}, tmp_path / "nokey_0.pt")
    with pytest.raises(ValueError, match="mask_full"):
        load_fused_features(tmp_path / "nokey_0.pt")
    torch.save({"feat": torch.zeros(3, 4).half(), "mask_full": torch.ones(5, dtype=torch.bool)}, tmp_path / "n_0.pt")
    with pytest.raises(ValueError, match="rows"):
        load_fused_features(tmp_path / "n_0.pt")
    with pytest.raises(FileNotFoundError):
        load_fused_features(tmp_path / "absent_0.pt")
    with pytest.raises(FileNotFoundError, match="absent"):
        load_scene_features(tmp_path, "absent")
    with pytest.raises(ValueError):
        save_fused_features(tmp_path / "x_0.pt", torch.zeros(4, 8), torch.ones(6, dtype=torch.bool))


def test_scene_name():
    assert scene_name("/d/scannet_3d/train/scene0000_00_vh_clean_2.pth") == "scene0000_00"
    assert scene_name("17DRP5sb8fy_region0.pth") == "17DRP5sb8fy_region0"
    assert scene_name("scene0000_00") == "scene0000_00"


def test_text_space_record(tmp_path):
    """`sas fuse` records the text space beside the features; another space in the same folder and a
    broken record are refused with a clear error."""
    from sas_core.data.fused_features import TEXT_SPACE_FILE, read_text_space, write_text_space
    from sas_core.text import SyntheticTextEncoder, text_encoder_from_config

    assert read_text_space(tmp_path) is None
    enc = SyntheticTextEncoder(("wall", "chair"), dim=16)
    write_text_space(tmp_path, enc.config(), "sim_dense")
    write_text_space(tmp_path, enc.config(), "sim_mask")  # the same space: fine
    rec = read_text_space(tmp_path)
    again = text_encoder_from_config(rec["text_encoder"])
    assert again.config() == enc.config() and rec["teacher"] == "sim_mask"
    with pytest.raises(ValueError, match="another text space"):
        write_text_space(tmp_path, {"kind": "open_clip", "model": "ViT-B-16", "checkpoint": None}, "dense_clip")
    (tmp_path / TEXT_SPACE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a text space record"):
        read_text_space(tmp_path)
