"""Capability construction: attention capture, pseudo-mask prompts, tables, sources, end to end."""

import json
import string
from functools import partial

import numpy as np
import pytest
import torch

from sas_core.capability.pseudo_masks import PseudoMaskConfig, clear_border, prompt_points
from sas_core.capability.tables import CapabilityAccumulator, CapabilityTable

# ------------------------------------------------------------------------------------ tiny models


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer with a character-level vocabulary (no merges), written offline."""
    from transformers import CLIPTokenizer

    vocab = {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    ).eval()


def tiny_pipeline(folder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer(folder)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_unet(), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sam(img=64):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(2)
    e, ps = 32, 16
    enc = ImageEncoderViT(depth=1, embed_dim=32, img_size=img, mlp_ratio=2, num_heads=2, patch_size=ps,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, out_chans=e)
    pe = PromptEncoder(embed_dim=e, image_embedding_size=(img // ps, img // ps), input_image_size=(img, img),
                       mask_in_chans=4)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=e, mlp_dim=32,
                     num_heads=2), transformer_dim=e, iou_head_depth=2, iou_head_hidden_dim=16)
    return Sam(enc, pe, md, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


# ------------------------------------------------------------------------------------ attention capture


def _run_unet(unet, store, cond, uncond=None):
    from sas_core.capability.diffusion import install_recorder

    install_recorder(unet, store)
    torch.manual_seed(3)
    lat = torch.randn(1, 4, 16, 16)
    if uncond is None:
        x, ctx = lat, cond
    else:
        x, ctx = torch.cat([lat, lat]), torch.cat([uncond, cond])
    with torch.no_grad():
        unet(x, torch.tensor(10), encoder_hidden_states=ctx)


def test_attention_capture_shapes_and_distribution():
    from sas_core.capability.diffusion import AttentionStore

    unet = tiny_unet()
    store = AttentionStore(latent_hw=(16, 16), cfg=False, factors=(1, 2))
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, 32, generator=g)
    _run_unet(unet, store, cond)
    # down blocks: one cross-attn layer each; up blocks: two; the mid block (8x8) is not recorded
    assert sorted(store.sums) == [(8, 8), (16, 16)]
    heads = 8
    assert store.counts[(16, 16)] == 3 * heads and store.counts[(8, 8)] == 3 * heads
    for hw in store.sums:
        m = store.mean(hw)
        assert m.shape == (1, hw[0], hw[1], 77)
        torch.testing.assert_close(m.sum(-1), torch.ones(1, *hw), rtol=0, atol=1e-5)  # softmax over tokens
        assert (m >= 0).all()
    # running sums: a second step doubles the sums and keeps the mean a distribution, memory flat
    before = {hw: s.clone() for hw, s in store.sums.items()}
    ptrs = {hw: s.data_ptr() for hw, s in store.sums.items()}
    _run_unet(unet, store, cond)
    for hw in store.sums:
        torch.testing.assert_close(store.sums[hw], 2 * before[hw])
        assert store.sums[hw].data_ptr() == ptrs[hw]
    # factors select sizes: only 16x16 kept
    only = AttentionStore(latent_hw=(16, 16), cfg=False, factors=(1,))
    _run_unet(unet, only, cond)
    assert list(only.sums) == [(16, 16)]


def test_attention_capture_keeps_only_conditional_half():
    from sas_core.capability.diffusion import AttentionStore

    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g) * 3.0  # very different text -> different attention
    with_cfg = AttentionStore((16, 16), cfg=True, factors=(1, 2))
    _run_unet(unet, with_cfg, cond, uncond)
    cond_only = AttentionStore((16, 16), cfg=False, factors=(1, 2))
    _run_unet(unet, cond_only, cond)
    uncond_only = AttentionStore((16, 16), cfg=False, factors=(1, 2))
    _run_unet(unet, uncond_only, uncond)
    for hw in cond_only.sums:
        assert with_cfg.sums[hw].shape == cond_only.sums[hw].shape  # batch 1, not 2
        torch.testing.assert_close(with_cfg.sums[hw], cond_only.sums[hw], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(uncond_only.sums[hw], cond_only.sums[hw], atol=1e-3)


def test_class_token_indices_finds_all_word_pieces(tmp_path):
    from sas_core.capability.diffusion import class_token_indices

    tok = tiny_tokenizer(tmp_path)
    prompt = "a good photo of a shower curtain in a room"
    idx = class_token_indices(tok, prompt, "shower curtain")
    ids = tok(prompt).input_ids
    pieces = [i for i in tok("shower curtain").input_ids if i not in (tok.bos_token_id, tok.eos_token_id)]
    assert len(idx) == len("showercurtain") and [ids[i] for i in idx] == pieces
    assert idx[0] == 1 + len("agoodphotoofa")  # after <start> and the characters before it
    with pytest.raises(ValueError, match="not found"):
        class_token_indices(tok, "a good photo of a chair", "sofa")


def test_aggregate_maps_follow_the_class_token():
    from sas_core.capability.diffusion import AttentionStore, aggregate_maps, coarse_mask

    store = AttentionStore((16, 16), cfg=False, factors=(1, 2))
    for h in (16, 8):
        p = torch.full((1, h * h, 5), 0.2)
        grid = p.reshape(1, h, h, 5)
        # token 3 attends to the top-left quadrant; token 4 to the bottom-right
        grid[:, : h // 2, : h // 2, 3] = 0.9
        grid[:, : h // 2, : h // 2, :3] = 0.1 / 4
        grid[:, : h // 2, : h // 2, 4] = 0.1 / 4
        store.sums[(h, h)] = grid.reshape(1, h * h, 5) * 6
        store.counts[(h, h)] = 6
    m = aggregate_maps(store, [3], (64, 64), factors=(1, 2))[0]
    assert m.shape == (64, 64) and float(m.min()) == pytest.approx(0) and float(m.max()) == pytest.approx(1)
    mask = coarse_mask(m, 0.7)
    assert mask[:24, :24].all() and not mask[40:, :].any() and not mask[:, 40:].any()
    other = coarse_mask(aggregate_maps(store, [4], (64, 64), factors=(1, 2))[0], 0.7)
    assert not other[:24, :24].any()


# ------------------------------------------------------------------------------------ prompts


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_prompt_points_single_two_and_many_components():
    one = _disk(100, 120, 50, 60, 20)
    pts = prompt_points(one)
    assert pts.shape == (3, 2)
    assert tuple(pts[0]) == (60, 50)  # (x, y) of the disk centre, the deepest point
    assert all(one[int(y), int(x)] for x, y in pts) and len({tuple(p) for p in pts}) == 3
    two = _disk(100, 120, 30, 30, 15) | _disk(100, 120, 70, 90, 8)
    pts = prompt_points(two)
    big = _disk(100, 120, 30, 30, 15)
    assert big[int(pts[0, 1]), int(pts[0, 0])] and big[int(pts[1, 1]), int(pts[1, 0])]
    assert tuple(pts[2]) == (90, 70)
    many = _disk(100, 120, 20, 20, 10) | _disk(100, 120, 20, 90, 12) | _disk(100, 120, 75, 30, 14) | \
        _disk(100, 120, 80, 100, 4)
    pts = {tuple(p) for p in prompt_points(many)}
    assert pts == {(20, 20), (90, 20), (30, 75)}  # the three largest; the 4-px disk loses
    with pytest.raises(ValueError, match="empty"):
        prompt_points(np.zeros((5, 5), bool))


def test_clear_border_scales_and_seeds():
    m = np.ones((256, 512), bool)
    c = clear_border(m)
    by, bx = 35, 70  # 70 px at 512 -> 35 px for 256 rows
    assert not c[:by].any() and not c[-by:].any() and not c[:, :bx].any() and not c[:, -bx:].any()
    assert c[by:-by, bx:-bx].all()
    corner = np.zeros((512, 512), bool)
    corner[:50, :50] = True  # only in the border -> centre seeds
    s = clear_border(corner, PseudoMaskConfig())
    assert s.sum() == 16 and s[240:242, 240:242].all() and s[270:272, 270:272].all()


def test_pseudo_masker_with_tiny_sam():
    from sas_core.capability.pseudo_masks import PseudoMasker

    masker = PseudoMasker(tiny_sam(), PseudoMaskConfig())
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    mask, pts, score = masker(rgb, _disk(48, 64, 24, 32, 8))
    assert mask.shape == (48, 64) and mask.dtype == bool and pts.shape == (3, 2) and np.isfinite(score)
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939"):
        PseudoMasker(None, PseudoMaskConfig(sam_checkpoint="/nonexistent/sam.pth"))


# ------------------------------------------------------------------------------------ tables


def test_accumulator_sum_over_images_and_table_roundtrip(tmp_path):
    acc = CapabilityAccumulator(["A", "B"], ["chair", "table", "sofa"])
    ref1 = np.zeros((4, 4), bool)
    ref1[:2] = True  # 8 px
    pred1 = np.zeros((4, 4), bool)
    pred1[:1] = True  # 4 px inside
    ref2 = np.zeros((4, 4), bool)
    ref2[:, :1] = True  # 4 px
    pred2 = np.ones((4, 4), bool)  # 16 px
    acc.add(0, 0, pred1, ref1)  # I 4, U 8
    acc.add(0, 0, pred2, ref2)  # I 4, U 16
    acc.add(1, 0, ref1, ref1)  # I 8, U 8
    acc.add(1, 1, np.zeros((4, 4), bool), ref2)  # I 0, U 4
    t = acc.table({"source": "test", "seed": 0})
    assert t.score("A", "chair") == pytest.approx(8 / 24)  # sum I / sum U, not the mean of 0.5 and 0.25
    assert acc.table(reduce="mean").score("A", "chair") == pytest.approx((0.5 + 0.25) / 2)
    assert t.score("B", "chair") == 1.0 and t.score("B", "table") == 0.0
    assert np.isnan(t.score("A", "sofa"))
    path = t.save(tmp_path / "cap.json")
    back = CapabilityTable.load(path)
    assert back.teachers == ["A", "B"] and back.vocabulary == ["chair", "table", "sofa"]
    np.testing.assert_array_equal(np.isnan(back.scores), np.isnan(t.scores))
    np.testing.assert_allclose(np.nan_to_num(back.scores), np.nan_to_num(t.scores))
    assert back.provenance["source"] == "test" and back.provenance["reduce"] == "sum"
    assert back.intersection[0, 0] == 8 and back.union[0, 0] == 24
    # matrix in a requested order; NaN filled by the teacher's mean over its other classes
    m = back.matrix(["B", "A"], ["sofa", "chair"])
    np.testing.assert_allclose(m, [[0.5, 1.0], [8 / 24, 8 / 24]], rtol=1e-6)  # A has only chair
    assert back.matrix(fill=0.0)[0, 2] == 0.0
    with pytest.raises(ValueError, match="teacher"):
        back.matrix(["C"])


def test_table_load_validation(tmp_path):
    with pytest.raises(FileNotFoundError, match="sas capability"):
        CapabilityTable.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        CapabilityTable.load(bad)
    good = CapabilityTable(["A"], ["x", "y"], [[0.5, 0.25]], {"source": "t"}).to_json()
    for mutate, msg in [
        (lambda d: d.update(format="other"), "not a SAS capability"),
        (lambda d: d.update(scores=[[0.5]]), "2 entries"),
        (lambda d: d.update(scores=[[0.5, 1.5]]), r"\[0, 1\]"),
        (lambda d: d.update(scores=[[0.5, "x"]]), "finite"),
        (lambda d: d.update(teachers=["A", "A"], scores=[[0.1, 0.1], [0.1, 0.1]]), "unique"),
        (lambda d: d.update(version=99), "version"),
    ]:
        d = json.loads(json.dumps(good))
        mutate(d)
        bad.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=msg):
            CapabilityTable.load(bad)


# ------------------------------------------------------------------------------------ sources


class ColourTeacher:
    """A stand-in teacher: class 0 where the red channel is high, else class 1 (features one-hot)."""

    dim = 2

    def __init__(self, name, invert=False):
        self.name, self.invert = name, invert

    def features(self, frame):
        red = torch.from_numpy(frame.color[..., 0] > 127)
        if self.invert:
            red = ~red
        f = torch.stack([red.float(), (~red).float()], dim=-1)
        return f, torch.ones(red.shape, dtype=torch.bool)


def _write_folder(root):
    from PIL import Image

    for cls, n in (("chair", 2), ("shower curtain", 1)):
        (root / cls.replace(" ", "_") / "images").mkdir(parents=True)
        (root / cls.replace(" ", "_") / "masks").mkdir(parents=True)
        for i in range(n):
            rgb = np.zeros((20, 30, 3), np.uint8)
            rgb[:10, :15, 0] = 255  # red object in the top-left
            mask = np.zeros((20, 30), np.uint8)
            mask[:10, :10] = 255  # reference: 100 px, the red area is 150 px
            Image.fromarray(rgb).save(root / cls.replace(" ", "_") / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / cls.replace(" ", "_") / "masks" / f"{i}.png")


def test_folder_source_build_and_resume(tmp_path):
    from sas_core.capability.sources import FolderSource, build_table

    _write_folder(tmp_path / "imgs")
    vocab = ["chair", "shower curtain", "sofa"]
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    teachers = [ColourTeacher("red"), ColourTeacher("inverted", invert=True)]
    src = FolderSource(tmp_path / "imgs")
    res = build_table(src, teachers, text, vocab, cache_dir=tmp_path / "cache", output=tmp_path / "t.json",
                      progress=False)
    t = CapabilityTable.load(tmp_path / "t.json")
    # chair: teacher "red" predicts class 0 on the 150 red px: I 100, U 150 per image
    assert t.score("red", "chair") == pytest.approx(100 / 150)
    # shower curtain (class 1): "red" predicts it on the 450 non-red px: I 0, U 100 + 450
    assert t.score("red", "shower curtain") == 0.0
    # "inverted" predicts class 1 on the red px -> I 100, U 150 for shower curtain, 0 for chair
    assert t.score("inverted", "shower curtain") == pytest.approx(100 / 150) and t.score("inverted", "chair") == 0
    assert np.isnan(t.scores[0, 2]) and t.images.tolist() == [2, 1, 0]
    assert t.provenance["source"] == "folder" and res.reused == 0
    # resume: all per-sample counts are reused and give the same table
    res2 = build_table(src, teachers, text, vocab, cache_dir=tmp_path / "cache", progress=False)
    assert res2.reused == 6
    np.testing.assert_array_equal(np.nan_to_num(res2.table.scores), np.nan_to_num(t.scores))
    with pytest.raises(FileNotFoundError):
        FolderSource(tmp_path / "nope")


def test_missing_diffusion_model_names_what_to_download(tmp_path):
    from sas_core.capability.diffusion import DiffusionConfig, load_pipeline

    with pytest.raises(FileNotFoundError, match="stable-diffusion-v1-5"):
        load_pipeline(DiffusionConfig(model_path=str(tmp_path / "sd15")))


def test_end_to_end_tiny_diffusion_sam_clip(tmp_path):
    """Tiny random diffusion + SAM + a dense CLIP teacher -> a valid table (proves the path)."""
    from sas_core.capability.diffusion import DiffusionConfig, DiffusionSynthesizer
    from sas_core.capability.pseudo_masks import PseudoMasker
    from sas_core.capability.sources import DiffusionSource, build_table

    teachers_mod = pytest.importorskip("sas_core.teachers.dense_clip")
    from sas_core.clip import build_tiny_clip
    from sas_core.text import OpenClipTextEncoder, class_embeddings

    clip = build_tiny_clip(seed=0)
    teacher = teachers_mod.DenseClipTeacher(
        teachers_mod.DenseClipConfig(model="sas-tiny-vit", recipe="maskclip", short_side=None, crop_size=None,
                                     out_dtype="float32", name="dense_clip"), model=clip)
    encoder = OpenClipTextEncoder("sas-tiny-vit", None, model=clip)
    vocab = ["chair", "table"]
    text = class_embeddings(encoder, vocab)
    cfg = DiffusionConfig(steps=2, guidance=7.0, height=64, width=64, attention_factors=(1, 2), images_per_class=1)
    synth = DiffusionSynthesizer(cfg, pipeline=tiny_pipeline(tmp_path))
    source = DiffusionSource(synth, PseudoMasker(tiny_sam()), cfg.images_per_class, tmp_path / "cache")
    res = build_table(source, [teacher], text, vocab, cache_dir=tmp_path / "cache", output=tmp_path / "cap.json",
                      progress=False)
    table = CapabilityTable.load(res.path)
    assert table.teachers == ["dense_clip"] and table.vocabulary == vocab
    assert table.scores.shape == (1, 2) and table.images.tolist() == [1, 1]
    assert table.provenance["source"] == "diffusion" and table.provenance["steps"] == 2
    finite = table.scores[np.isfinite(table.scores)]
    assert ((finite >= 0) & (finite <= 1)).all()
    for name in ("image", "attention", "coarse", "pseudo"):
        assert (tmp_path / "cache" / "images" / "chair" / f"0000_{name}.png").exists()
    # a rerun finds the cached images and counts: nothing is synthesised again
    synth.synthesize = None  # would raise if called
    res2 = build_table(source, [teacher], text, vocab, cache_dir=tmp_path / "cache", progress=False)
    assert res2.reused == 2


def test_sas_capability_synthetic_source_cli(tmp_path, capsys):
    """`sas capability --source synthetic` with the simulated teachers writes a valid table."""
    pytest.importorskip("sas_core.teachers.simulated")
    pytest.importorskip("sas_core.data.synthetic")
    from sas_app.cli import main

    out = tmp_path / "cap.json"
    rc = main(["capability", "--source", "synthetic", "--teachers", "simulated", "--classes", "chair", "door",
               "--probes", "2", "--probe-size", "80", "60", "-o", str(out), "--no-progress"])
    assert rc == 0
    t = CapabilityTable.load(out)
    assert t.teachers == ["sim_dense", "sim_mask"] and len(t.vocabulary) == 20
    k = [t.vocabulary.index("chair"), t.vocabulary.index("door")]
    assert np.isfinite(t.scores[:, k]).all() and ((t.scores[:, k] >= 0) & (t.scores[:, k] <= 1)).all()
    assert np.isnan(np.delete(t.scores, k, axis=1)).all()
    assert t.provenance["source"] == "synthetic" and t.provenance["vocabulary_name"] == "scannet20"
    assert t.images[k].tolist() == [2, 2]
    assert "sim_dense" in capsys.readouterr().out
