"""The dense CLIP teacher's window averaging, composed as per-axis matrices, against the direct
computation (every window's tokens upsampled to its pixels, summed, divided by the coverage,
resized), on a tiny random open_clip ViT of the real classes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sas_core.clip import build_tiny_clip
from sas_core.teachers.dense_clip import DenseClipConfig, DenseClipTeacher


@pytest.fixture(scope="module")
def clip_model():
    return build_tiny_clip(seed=1)


def _direct(teacher, x, out_size):
    """The straightforward sliding window: a (C, H, W) sum and count, then the resize."""
    _, _, height, width = x.shape
    ch, cw, boxes = teacher._windows(height, width)
    total = torch.zeros(teacher.dim, height, width)
    count = torch.zeros(1, height, width)
    ph, pw = teacher.patch
    hp, wp = math.ceil(ch / ph) * ph, math.ceil(cw / pw) * pw
    for y0, x0 in boxes:
        crop = F.pad(x[:, :, y0:y0 + ch, x0:x0 + cw], (0, wp - cw, 0, hp - ch))
        tokens = F.normalize(teacher.token_features(crop), dim=-1).permute(0, 3, 1, 2)
        pix = F.interpolate(tokens, size=(hp, wp), mode="bilinear", align_corners=False)[0, :, :ch, :cw]
        total[:, y0:y0 + ch, x0:x0 + cw] += pix
        count[:, y0:y0 + ch, x0:x0 + cw] += 1
    dense = total / count
    if out_size != (height, width):
        dense = F.interpolate(dense[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return dense.permute(1, 2, 0)


@pytest.mark.parametrize("crop,stride,size,out", [
    (32, 16, (40, 67), (30, 50)),    # several windows, the last ones shifted to the border; downsized
    (24, 10, (41, 53), (41, 53)),    # stride not a multiple of the patch, crop not either (padding)
    (32, 16, (40, 67), (80, 134)),   # upsized
    (None, 16, (35, 45), (35, 45)),  # one window: the whole image
])
def test_window_matrices_equal_the_direct_sum(clip_model, crop, stride, size, out):
    teacher = DenseClipTeacher(DenseClipConfig(recipe="sclip", crop_size=crop, stride=stride, batch_size=3),
                               model=clip_model)
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        fast = teacher._slide(x, out)
        ref = _direct(teacher, x, out)
    assert fast.shape == (*out, teacher.dim)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_image_features_are_unit_and_match_the_direct_path(clip_model):
    teacher = DenseClipTeacher(DenseClipConfig(recipe="naclip", short_side=40, crop_size=32, stride=16,
                                               out_dtype="float32"), model=clip_model)
    rng = np.random.default_rng(0)
    rgb = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    feats = teacher.image_features(rgb)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(40, 67), mode="bilinear", align_corners=False)
    x = (x - teacher._mean) / teacher._std
    with torch.inference_mode():
        ref = F.normalize(_direct(teacher, x, (30, 50)), dim=-1)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(30, 50), atol=1e-5, rtol=0)
