"""Vocabularies, prompt templates and text encoders (sas_core.text)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sas_core import text as T

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- vocabularies

@pytest.mark.parametrize("name, length", [
    ("scannet20", 20), ("matterport21", 21), ("matterport40", 40), ("matterport80", 80),
    ("matterport160", 160), ("nuscenes16", 16),
])
def test_vocabulary_lengths_and_uniqueness(name, length):
    vocab = T.get_vocabulary(name)
    assert len(vocab) == length
    assert len(set(vocab)) == length
    assert all(isinstance(v, str) and v == v.strip() and v for v in vocab)


def test_vocabulary_exact_openscene_spellings():
    assert T.SCANNET_20 == (
        "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
        "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain",
        "toilet", "sink", "bathtub", "otherfurniture")
    assert T.MATTERPORT_21[:19] == T.SCANNET_20[:19]
    assert T.MATTERPORT_21[19:] == ("other", "ceiling")
    assert T.MATTERPORT_40[:4] == ("wall", "door", "ceiling", "floor")
    assert T.MATTERPORT_40[19] == "night stand" and T.MATTERPORT_40[-1] == "faucet"
    # OpenScene's longer Matterport lists extend the shorter ones, misspellings included
    assert T.MATTERPORT_80[:40] == T.MATTERPORT_40 and T.MATTERPORT_160[:80] == T.MATTERPORT_80
    assert T.MATTERPORT_80[49] == "refridgerator" and "door way" in T.MATTERPORT_80
    assert "excercise equipment" in T.MATTERPORT_160 and T.MATTERPORT_160[-1] == "alarm"
    assert T.NUSCENES_16[4] == "construction vehicle" and T.NUSCENES_16[10] == "drivable surface"
    assert T.NUSCENES_16[-2:] == ("manmade", "vegetation")


def test_get_vocabulary_names():
    assert T.get_vocabulary("ScanNet-20") is T.SCANNET_20
    assert T.get_vocabulary("matterport") is T.MATTERPORT_21
    assert T.get_vocabulary("nuscenes_16") is T.NUSCENES_16
    with pytest.raises(ValueError, match="unknown vocabulary"):
        T.get_vocabulary("coco")


def test_templates_and_prompts():
    assert T.PROMPT_TEMPLATE == "a {} in a scene"
    assert T.get_templates(None) == ("a {} in a scene",)
    assert T.get_templates("scene") == T.SCENE_TEMPLATES and len(T.SCENE_TEMPLATES) > 5
    assert T.get_templates("a photo of {}") == ("a photo of {}",)
    with pytest.raises(ValueError):
        T.get_templates("nonsense")
    with pytest.raises(ValueError):
        T.get_templates(["no slot"])
    assert T.format_prompts(["chair", "otherfurniture"]) == ["a chair in a scene", "a otherfurniture in a scene"]
    assert T.format_prompts(["chair", "otherfurniture"], openscene_other=True) == ["a chair in a scene", "other"]


# ----------------------------------------------------------------------- synthetic encoder

def test_synthetic_encoder_is_deterministic_and_unit():
    a = T.SyntheticTextEncoder(seed=3, dim=64).encode(list(T.SCANNET_20))
    b = T.SyntheticTextEncoder(seed=3, dim=64).encode(list(T.SCANNET_20))
    c = T.SyntheticTextEncoder(seed=4, dim=64).encode(list(T.SCANNET_20))
    assert a.shape == (20, 64) and a.dtype.is_floating_point
    assert np.allclose(a.norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert (a == b).all()
    assert not np.allclose(a.numpy(), c.numpy())
    gram = (a @ a.T).numpy() - np.eye(20)
    assert np.abs(gram).max() < 0.6  # distinct classes are far apart


def test_synthetic_encoder_prompts_and_captions():
    enc = T.SyntheticTextEncoder()
    chair = enc.encode(["chair"])[0]
    for prompt in ["a chair in a scene", "a photo of a chair.", "There is a chair in the scene.", "CHAIR"]:
        assert np.allclose(enc.encode([prompt])[0].numpy(), chair.numpy(), atol=1e-7), prompt
    cap = enc.encode(["a wooden chair"])[0]
    cos = float(cap @ chair)
    assert 0.98 < cos < 0.99999
    # multi-word names are matched as phrases, longest first
    sc, c = enc.encode(["a shower curtain in a scene", "a curtain in a scene"])
    assert float(sc @ c) < 0.5
    # class vectors do not depend on the vocabulary they come from
    mp = T.SyntheticTextEncoder(T.MATTERPORT_40)
    assert np.allclose(mp.encode(["chair"]).numpy(), chair.numpy()[None])
    assert mp.parse("a night stand in a scene") == (["night stand"], [])
    mp80 = T.SyntheticTextEncoder(T.MATTERPORT_80)
    assert mp80.parse("a photo of a photo.") == (["photo"], [])
    # OpenScene's bare "other" prompt maps to otherfurniture
    assert np.allclose(enc.encode(["other"]).numpy(), enc.encode(["otherfurniture"]).numpy())


def test_synthetic_encoder_unknown_words():
    enc = T.SyntheticTextEncoder()
    with pytest.raises(T.UnknownWordError, match="spaceship") as err:
        enc.encode(["a spaceship in a scene"])
    assert isinstance(err.value, ValueError) and err.value.words == ("spaceship",)
    with pytest.raises(T.UnknownWordError):
        enc.encode(["a photo of the room"])  # no class name at all
    with pytest.raises(T.UnknownWordError, match="pillow"):
        enc.encode(["a pillow"])  # Matterport class, not ScanNet
    with pytest.raises(TypeError):
        enc.encode("chair")
    with pytest.raises(ValueError, match="duplicate"):
        T.SyntheticTextEncoder(["chair", "chair"])


def test_class_embeddings_template_ensemble():
    enc = T.SyntheticTextEncoder(dim=128)
    emb = T.class_embeddings(enc, T.SCANNET_20, "scene")
    assert emb.shape == (20, 128)
    assert np.allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert np.allclose(emb.numpy(), enc.encode(list(T.SCANNET_20)).numpy(), atol=1e-6)
    other = T.class_embeddings(enc, ["chair", "otherfurniture"], openscene_other=True)
    assert other.shape == (2, 128)
    with pytest.raises(ValueError):
        T.class_embeddings(enc, [])


def test_encoder_config_round_trip():
    enc = T.SyntheticTextEncoder(T.NUSCENES_16, dim=96, seed=7)
    cfg = json.loads(json.dumps(enc.config()))
    again = T.text_encoder_from_config(cfg)
    texts = ["a car in a scene", "a construction vehicle", "drivable surface"]
    assert (again.encode(texts) == enc.encode(texts)).all()
    with pytest.raises(ValueError):
        T.text_encoder_from_config({"kind": "bert"})


# ------------------------------------------------------------------------- open_clip encoder

@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    from sas_core.clip import TINY_CLIP_NAME, save_tiny_clip

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    save_tiny_clip(path, seed=0)
    return TINY_CLIP_NAME, str(path)


def test_open_clip_text_encoder(tiny_clip_checkpoint):
    import open_clip
    import torch

    name, path = tiny_clip_checkpoint
    enc = T.OpenClipTextEncoder(name, path)
    emb = enc.encode(["a chair in a scene", "a table in a scene", "a chair in a scene"])
    assert emb.shape == (3, enc.dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])
    # same numbers as the open_clip model itself
    ref = enc.model.encode_text(open_clip.get_tokenizer(name)(["a table in a scene"]))
    assert torch.allclose(emb[1], torch.nn.functional.normalize(ref, dim=-1)[0], atol=1e-5)
    again = T.text_encoder_from_config(json.loads(json.dumps(enc.config())))
    assert torch.allclose(again.encode(["a table in a scene"])[0], emb[1], atol=1e-6)


def test_open_clip_missing_checkpoint_is_one_clear_error(tmp_path):
    missing = tmp_path / "ViT-B-16-laion.bin"
    with pytest.raises(FileNotFoundError) as err:
        T.OpenClipTextEncoder("ViT-B-16", str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "download" in msg and "ViT-B-16" in msg
    with pytest.raises(FileNotFoundError, match="ViT-B-16-laion.bin"):
        T.text_encoder_from_config({"kind": "open_clip", "model": "ViT-B-16", "checkpoint": str(missing)})
    with pytest.raises(ValueError, match="no checkpoint"):
        T.OpenClipTextEncoder("ViT-B-16", None)


def test_text_module_is_light():
    code = "import sys, sas_core.text, sas_core.teachers; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_text_labels_argmax_scores_and_normalisation():
    import torch

    from sas_core.text import text_labels

    rng = np.random.default_rng(0)
    text = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((5, 8)), dtype=torch.float32), dim=1)
    f = torch.as_tensor(rng.standard_normal((301, 8)), dtype=torch.float32) * torch.linspace(0.1, 9, 301)[:, None]
    dots = f @ text.T
    labels, scores = text_labels(f, text, chunk=64)           # chunked == one product
    assert labels.dtype == torch.int64 and torch.equal(labels, dots.argmax(1))
    torch.testing.assert_close(scores, dots.max(1).values)
    cl, cs = text_labels(f.numpy(), text.numpy(), normalize=True)  # NumPy in, cosine scores
    assert torch.equal(cl, labels)                                # |f| does not change the argmax ...
    cos = torch.nn.functional.normalize(f, dim=1) @ text.T
    torch.testing.assert_close(cs, cos.max(1).values)             # ... but it changes the scores
    assert float(cs.max()) <= 1.0 + 1e-6 and not torch.allclose(cs, scores)
    # text rows of different norms: normalising the text can change the argmax
    t2 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[0.9, 0.5]])
    assert text_labels(x, t2)[0].item() == 1 and text_labels(x, t2, normalize=True)[0].item() == 0
    # leading dimensions (an image) are kept
    img_l, img_s = text_labels(f[:300].reshape(10, 30, 8), text)
    assert img_l.shape == (10, 30) and torch.equal(img_l.reshape(-1), labels[:300])
    with pytest.raises(ValueError, match="do not match"):
        text_labels(f, text[:, :4])


def test_text_does_not_import_teachers():
    """sas_core.text sits below sas_core.teachers: open_clip loading lives in sas_core.clip."""
    import ast
    from pathlib import Path

    import sas_core.text as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "sas_core.clip" in names and not [n for n in names if n.startswith("sas_core.teachers")]
