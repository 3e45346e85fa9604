"""Dense CLIP teacher, SAM+CLIP mask teacher with text alignment, precomputed features.

Everything runs the real open_clip / segment-anything classes with tiny random weights.
"""

import numpy as np
import pytest
import torch

from sas_core.teachers.base import check_teacher_output, frame_from_image
from sas_core.clip import TINY_CLIP_NAME, build_tiny_clip, save_tiny_clip
from sas_core.teachers.dense_clip import RECIPES, DenseClipConfig, DenseClipTeacher
from sas_core.teachers.mask_teacher import (
    MaskClipTeacher, MaskTeacherConfig, build_tiny_sam, mask_boxes, sam_mask_generator, smallest_mask_index,
)
from sas_core.text import SCANNET_20, SyntheticTextEncoder


@pytest.fixture(scope="module")
def clip_model():
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    save_tiny_clip(path, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    img[5:20, 10:30] = (200, 40, 40)
    return img


# --------------------------------------------------------------------------- dense CLIP

@pytest.mark.parametrize("recipe", RECIPES)
def test_dense_clip_recipes_shapes_sliding_window(recipe, clip_model, image):
    cfg = DenseClipConfig(recipe=recipe, short_side=40, crop_size=32, stride=16)
    teacher = DenseClipTeacher(cfg, model=clip_model)
    _, _, boxes = teacher._windows(40, 67)
    assert len(boxes) > 2  # the non-square image really is covered by several windows
    feats, valid = teacher.features(frame_from_image(image))
    check_teacher_output(feats, valid, 30, 50, teacher.dim)
    assert teacher.dim == 32 and feats.dtype == torch.float16 and bool(valid.all())
    assert torch.allclose(feats.float().norm(dim=-1), torch.ones(30, 50), atol=2e-3)
    assert torch.isfinite(feats.float()).all()


def test_dense_clip_recipes_differ(clip_model, image):
    outs = {}
    for recipe in RECIPES:
        cfg = DenseClipConfig(recipe=recipe, short_side=None, crop_size=None, out_dtype="float32")
        outs[recipe] = DenseClipTeacher(cfg, model=clip_model).image_features(image)
    for a in RECIPES:
        for b in RECIPES:
            if a < b:
                assert not torch.allclose(outs[a], outs[b], atol=1e-3), (a, b)


def test_dense_clip_vanilla_matches_open_clip_tokens(clip_model):
    """At the native size the unmodified block must reproduce open_clip's own patch tokens."""
    teacher = DenseClipTeacher(DenseClipConfig(recipe="vanilla"), model=clip_model)
    x = torch.randn(2, 3, 32, 32)
    clip_model.visual.output_tokens = True
    try:
        _, tokens = clip_model.visual(x)
    finally:
        clip_model.visual.output_tokens = False
    ours = teacher.token_features(x).reshape(2, -1, teacher.dim)
    assert torch.allclose(ours, tokens @ clip_model.visual.proj, atol=1e-5)


def test_dense_clip_positional_interpolation(clip_model):
    teacher = DenseClipTeacher(DenseClipConfig(recipe="naclip"), model=clip_model)
    out = teacher.token_features(torch.randn(1, 3, 48, 40))
    assert out.shape == (1, 6, 5, 32)
    pe = teacher._pos_embed(6, 5)
    assert pe.shape == (31, clip_model.visual.positional_embedding.shape[1])
    assert torch.equal(teacher._pos_embed(4, 4), clip_model.visual.positional_embedding)


def test_dense_clip_loads_checkpoint_and_missing_file(clip_checkpoint, tmp_path, image):
    teacher = DenseClipTeacher(DenseClipConfig(model=TINY_CLIP_NAME, checkpoint=clip_checkpoint, recipe="sclip",
                                               short_side=32, crop_size=32))
    feats, _ = teacher.features(frame_from_image(image))
    assert feats.shape == (30, 50, 32)
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        DenseClipTeacher(DenseClipConfig(model="ViT-B-16", checkpoint=str(missing)))
    with pytest.raises(ValueError, match="recipe"):
        DenseClipConfig(recipe="lseg")


# --------------------------------------------------------------------------- mask teacher

def test_mask_helpers():
    masks = np.zeros((3, 6, 8), bool)
    masks[0] = True                # whole image
    masks[1, 1:5, 2:7] = True      # medium
    masks[2, 2:4, 3:5] = True      # small, inside medium
    idx = smallest_mask_index(masks)
    assert idx[0, 0] == 0 and idx[1, 2] == 1 and idx[2, 3] == 2 and idx[3, 4] == 2
    assert (smallest_mask_index(masks[1:]) == -1).sum() == 48 - 20
    assert mask_boxes(masks).tolist() == [[0, 0, 8, 6], [2, 1, 7, 5], [3, 2, 5, 4]]


def _fake_generator(h, w):
    """Nested hand-made masks in SAM's record format: large box, small box inside, one tiny speck."""
    def generate(rgb):
        big = np.zeros((h, w), bool)
        big[2:26, 4:40] = True
        small = np.zeros((h, w), bool)
        small[8:16, 10:22] = True
        speck = np.zeros((h, w), bool)
        speck[0, 0] = True
        return [{"segmentation": big, "area": int(big.sum())}, {"segmentation": small, "area": int(small.sum())},
                {"segmentation": speck, "area": 1}]
    return generate


@pytest.mark.parametrize("recipe", ["masked", "multilevel"])
def test_mask_teacher_text_alignment_is_exact(recipe, clip_model, image):
    shared = SyntheticTextEncoder(dim=64)  # a different text space than the labelling CLIP (32-d)
    cfg = MaskTeacherConfig(crop_recipe=recipe, out_dtype="float32", min_area=4)
    teacher = MaskClipTeacher(cfg, text_encoder=shared, clip_model=clip_model,
                              mask_generator=_fake_generator(30, 50))
    pred = teacher.predict(image)
    assert pred.masks.shape == (2, 30, 50)  # the 1-pixel speck is dropped
    assert pred.labels.shape == (2,) and pred.labels.dtype == np.int64 and (pred.labels < 20).all()
    assert pred.captions == [f"a {SCANNET_20[l]}" for l in pred.labels]
    crops, levels = teacher.crops(image, pred.masks)
    assert crops.shape == (2 * levels, 3, 32, 32) and levels == (1 if recipe == "masked" else 3)
    feats, valid = teacher.features(frame_from_image(image))
    check_teacher_output(feats, valid, 30, 50, 64)
    for m, caption in enumerate(pred.captions):
        expected = shared.encode([caption])[0]
        only = pred.masks[m] & ~pred.masks[1 - m] if m == 0 else pred.masks[1]
        got = feats[torch.from_numpy(only)]
        assert (got - expected).abs().max() < 1e-6
    assert not valid[0, 0] and bool((feats[~valid] == 0).all())
    assert int(valid.sum()) == int(pred.masks.any(0).sum())


def test_mask_teacher_captioner_hook_and_vocabulary(clip_model, image):
    shared = SyntheticTextEncoder(dim=64)
    teacher = MaskClipTeacher(MaskTeacherConfig(out_dtype="float32"), text_encoder=shared, clip_model=clip_model,
                              mask_generator=_fake_generator(30, 50),
                              captioner=lambda rgb, mask, label: f"a wooden {label} in the room")
    pred = teacher.predict(image)
    assert all(c.startswith("a wooden ") for c in pred.captions)
    feats, valid = teacher.features(frame_from_image(image))
    small = torch.from_numpy(pred.masks[1])
    assert (feats[small] - shared.encode([pred.captions[1]])[0]).abs().max() < 1e-6
    teacher.set_vocabulary(["chair", "table"])
    assert set(teacher.predict(image).labels.tolist()) <= {0, 1}


def test_mask_teacher_with_tiny_sam(clip_model, image):
    sam = build_tiny_sam(seed=0)
    cfg = MaskTeacherConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=1)
    teacher = MaskClipTeacher(cfg, clip_model=clip_model, mask_generator=sam_mask_generator(sam, cfg))
    feats, valid = teacher.features(frame_from_image(image))
    check_teacher_output(feats, valid, 30, 50, teacher.dim)
    assert feats.dtype == torch.float16 and teacher.dim == 32  # default: the CLIP's own text tower
    if valid.any():
        assert torch.allclose(feats[valid].float().norm(dim=-1), torch.ones(int(valid.sum())), atol=2e-3)


def test_mask_teacher_missing_sam_checkpoint(clip_model, tmp_path):
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError) as err:
        MaskClipTeacher(MaskTeacherConfig(sam_checkpoint=str(missing)), clip_model=clip_model)
    assert str(missing) in str(err.value) and "segment-anything" in str(err.value)
    with pytest.raises(ValueError, match="no SAM checkpoint"):
        MaskClipTeacher(MaskTeacherConfig(), clip_model=clip_model)


# ----------------------------------------------------------------------- precomputed features

def test_precomputed_openscene_files(tmp_path):
    from sas_core.teachers.precomputed import PrecomputedConfig, PrecomputedTeacher

    rng = np.random.default_rng(0)
    n = 100
    for k in range(2):
        mask = rng.random(n) < 0.6
        feat = torch.from_numpy(rng.standard_normal((int(mask.sum()), 16))).half()
        torch.save({"feat": feat, "mask_full": torch.from_numpy(mask)}, tmp_path / f"scene0000_00_{k}.pt")
        if k == 1:
            expected_mask, expected_feat = mask, feat
    torch.save({"feat": torch.zeros(3, 16).half(), "mask_full": torch.ones(3, dtype=torch.bool)}, tmp_path / "s.pt")
    teacher = PrecomputedTeacher(PrecomputedConfig(root=str(tmp_path), name="lseg"))
    assert [p.name for p in teacher.files("scene0000_00")] == ["scene0000_00_0.pt", "scene0000_00_1.pt"]
    feats, mask = teacher.point_features("scene0000_00", file_index=1)
    assert feats.shape == (n, 16) and feats.dtype == torch.float16 and mask.dtype == torch.bool
    assert np.array_equal(mask.numpy(), expected_mask)
    assert torch.equal(feats[mask], expected_feat) and bool((feats[~mask] == 0).all())
    assert teacher.point_features("s")[0].shape == (3, 16) and teacher.dim == 16
    merged, merged_mask = teacher.point_features("scene0000_00")  # default: every chunk file merged
    assert bool((merged_mask >= mask).all()) and int(merged_mask.sum()) > int(mask.sum())
    with pytest.raises(FileNotFoundError, match="scene0999_00"):
        teacher.point_features("scene0999_00")
    with pytest.raises(FileNotFoundError, match="fused"):
        PrecomputedTeacher(PrecomputedConfig(root=str(tmp_path / "nope")))
    torch.save({"feat": torch.zeros(5, 16), "mask_full": torch.ones(3, dtype=torch.bool)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="mask_full"):
        teacher.point_features("bad")
