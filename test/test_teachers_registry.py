"""The teacher registry builds every teacher by name, sharing one text space per kind."""

import pytest

from sas_core.teachers import registry
from sas_core.text import SCANNET_20


def test_simulated_pair_by_name_shares_one_encoder():
    from sas_core.teachers.simulated import make_simulated_pair
    from sas_core.text import SyntheticTextEncoder

    pairs = registry.build_teachers(["simulated"], SCANNET_20, seed=3)
    assert [t.name for t, _ in pairs] == ["sim_dense", "sim_mask"]
    assert pairs[0][1] is pairs[1][1] and pairs[0][1].vocabulary == SCANNET_20
    want = make_simulated_pair(SyntheticTextEncoder(SCANNET_20), seed=3, vocabulary=SCANNET_20)
    assert [t.config.to_dict() for t, _ in pairs] == [t.config.to_dict() for t in want]
    # order as asked, duplicates dropped
    assert [t.name for t, _ in registry.build_teachers(["sim_mask", "simulated"], SCANNET_20)] == ["sim_mask", "sim_dense"]
    teacher, encoder = registry.build_teacher("sim_dense", ("chair", "table"))
    assert teacher.name == "sim_dense" and encoder.vocabulary == ("chair", "table")


def test_unknown_and_incomplete_requests_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher 'lseg'.*precomputed"):
        registry.build_teachers(["lseg"], SCANNET_20)
    with pytest.raises(ValueError, match="no teachers"):
        registry.build_teachers([], SCANNET_20)
    with pytest.raises(ValueError, match="use build_teachers"):
        registry.build_teacher("simulated", SCANNET_20)
    with pytest.raises(ValueError, match="precomputed_root"):
        registry.build_teacher("precomputed", SCANNET_20)
    with pytest.raises(ValueError, match="no checkpoint configured"):
        registry.build_teacher("dense_clip", SCANNET_20)
    teacher, encoder = registry.build_teacher("precomputed", SCANNET_20, precomputed_root=str(tmp_path),
                                              precomputed_name="openseg")
    assert teacher.name == "openseg" and encoder is None


def test_clip_teachers_share_one_model_and_encoder(tmp_path):
    from sas_core.clip import TINY_CLIP_NAME, save_tiny_clip

    ckpt = save_tiny_clip(tmp_path / "tiny.pt")
    (dense, enc), = registry.build_teachers(["dense_clip"], SCANNET_20, clip_model=TINY_CLIP_NAME,
                                            clip_checkpoint=ckpt, recipe="maskclip")
    assert dense.model is enc.model and enc.dim == 32 and dense.config.recipe == "maskclip"
    with pytest.raises(ValueError, match="SAM"):  # mask_clip needs SAM weights, named in the error
        registry.build_teachers(["dense_clip", "mask_clip"], SCANNET_20, clip_model=TINY_CLIP_NAME,
                                clip_checkpoint=ckpt)
