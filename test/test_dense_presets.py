"""Dense CLIP presets (each recipe's paper settings) and PAMR against a per-pixel oracle."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sas_core.teachers.dense_clip import DENSE_CLIP_PRESETS, dense_clip_config, pamr  # noqa: E402


def test_presets_and_overrides():
    cfg = dense_clip_config("clearclip")
    assert (cfg.recipe, cfg.short_side, cfg.crop_size, cfg.stride, cfg.pamr_steps) == ("clearclip", 448, 448, 224, 0)
    cfg = dense_clip_config("naclip", stride=64, recipe=None)
    assert (cfg.recipe, cfg.crop_size, cfg.stride, cfg.pamr_steps) == ("naclip", None, 64, 10)
    assert dense_clip_config(None).recipe == "sclip"
    assert set(DENSE_CLIP_PRESETS) >= {"sclip", "clearclip", "naclip", "sclip_outdoor"}
    with pytest.raises(ValueError, match="unknown dense CLIP preset"):
        dense_clip_config("lseg")


def _pamr_oracle(image, feats, steps, dilations):
    """Straight per-pixel loops of the PAMR definition (clamped neighbours = replicate padding)."""
    _, H, W = image.shape
    offs = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    aff = np.zeros((H, W, 8 * len(dilations)))
    for y, x in itertools.product(range(H), range(W)):
        logits = []
        for d in dilations:
            nb = [image[:, min(max(y + dy * d, 0), H - 1), min(max(x + dx * d, 0), W - 1)] for dy, dx in offs]
            std = np.std(np.stack(nb + [image[:, y, x]]), axis=0, ddof=1)
            logits += [np.mean(-np.abs(n - image[:, y, x]) / (1e-8 + 0.1 * std)) for n in nb]
        e = np.exp(np.array(logits) - max(logits))
        aff[y, x] = e / e.sum()
    f = feats.copy()
    for _ in range(steps):
        out = np.zeros_like(f)
        for y, x in itertools.product(range(H), range(W)):
            k = 0
            for d in dilations:
                for dy, dx in offs:
                    out[:, y, x] += aff[y, x, k] * f[:, min(max(y + dy * d, 0), H - 1), min(max(x + dx * d, 0), W - 1)]
                    k += 1
        f = out
    return f


def test_pamr_matches_the_per_pixel_definition():
    rng = np.random.default_rng(0)
    image = rng.random((3, 7, 9))
    feats = rng.normal(size=(4, 7, 9))
    got = pamr(torch.from_numpy(image)[None].float(), torch.from_numpy(feats).float(), steps=3, dilations=(1, 2))
    want = _pamr_oracle(image, feats, 3, (1, 2))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


def test_pamr_smooths_inside_regions_and_keeps_the_edge():
    rng = np.random.default_rng(1)
    image = np.zeros((3, 32, 32))
    image[:, :, 16:] = 1.0
    image += rng.normal(scale=0.01, size=image.shape)
    truth = np.zeros((2, 32, 32))
    truth[0, :, :16] = 1.0
    truth[1, :, 16:] = 1.0
    noisy = truth + rng.normal(scale=0.5, size=truth.shape)
    out = pamr(torch.from_numpy(image)[None].float(), torch.from_numpy(noisy).float(), steps=10,
               dilations=(1, 2)).numpy()
    assert np.abs(out - truth).mean() < 0.5 * np.abs(noisy - truth).mean()
    assert (out.argmax(0) == truth.argmax(0)).mean() > 0.97  # the edge does not bleed


def test_registry_builds_the_preset(tmp_path):
    from sas_core.clip import TINY_CLIP_NAME, save_tiny_clip
    from sas_core.teachers.registry import build_teacher

    ckpt = save_tiny_clip(tmp_path / "tiny.pt")
    teacher, _ = build_teacher("dense_clip", ["chair", "table"], clip_model=TINY_CLIP_NAME, clip_checkpoint=ckpt,
                               dense_preset="naclip")
    assert (teacher.config.recipe, teacher.config.crop_size, teacher.config.pamr_steps) == ("naclip", None, 10)
    rgb = (np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)
    feats = teacher.image_features(rgb)
    assert feats.shape[:2] == (24, 40)
    np.testing.assert_allclose(feats.float().norm(dim=-1).numpy(), 1.0, atol=2e-3)
    teacher, _ = build_teacher("dense_clip", ["chair"], clip_model=TINY_CLIP_NAME, clip_checkpoint=ckpt,
                               dense_preset="naclip", recipe="sclip")
    assert teacher.config.recipe == "sclip" and teacher.config.pamr_steps == 10


def test_cli_explicit_recipe_wins_over_the_preset():
    from sas_app.cli import build_parser
    from sas_app.commands import dense_options

    parser = build_parser()
    args = parser.parse_args(["fuse", "--synthetic", "--clip-preset", "clearclip"])
    assert dense_options(args) == {"recipe": None, "dense_preset": "clearclip"}
    args = parser.parse_args(["fuse", "--synthetic", "--clip-preset", "clearclip", "--recipe", "maskclip"])
    assert dense_options(args) == {"recipe": "maskclip", "dense_preset": "clearclip"}
    args = parser.parse_args(["fuse", "--synthetic"])
    assert dense_options(args)["dense_preset"] is None and dense_options(args)["recipe"] == "sclip"


def test_models_file_chooses_the_preset(tmp_path):
    from sas_app.cli import build_parser
    from sas_app.commands import apply_model_paths, dense_options
    from sas_core.models import read_models_file

    models = tmp_path / "models.yaml"
    models.write_text("clip_model: ViT-B-16-quickgelu\nclip_preset: clearclip\n")
    assert read_models_file(models).clip_preset == "clearclip"
    args = build_parser().parse_args(["fuse", "--synthetic", "--models", str(models)])
    apply_model_paths(args, {"clip_model": "clip_model", "clip_preset": "clip_preset"})
    assert dense_options(args) == {"recipe": None, "dense_preset": "clearclip"}
    args = build_parser().parse_args(["fuse", "--synthetic", "--models", str(models), "--clip-preset", "naclip"])
    apply_model_paths(args, {"clip_model": "clip_model", "clip_preset": "clip_preset"})
    assert dense_options(args)["dense_preset"] == "naclip"  # the flag wins
    models.write_text("clip_preset: lseg\n")
    with pytest.raises(ValueError, match="not a dense CLIP preset"):
        read_models_file(models)
