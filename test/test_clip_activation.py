"""OpenAI CLIP weights need QuickGELU, LAION/DataComp weights GELU: the loader finds out from the
weights (or the name) and never builds the wrong one silently."""

import json

import numpy as np
import pytest

# torch.jit (the OpenAI release format we convert) warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from sas_core.clip import (TINY_CLIP_NAME, build_tiny_clip, load_open_clip, register_tiny_clip,  # noqa: E402
                           resolve_activation, split_clip_name, uses_quick_gelu)


def _tiny(quick: bool, seed: int = 3):
    register_tiny_clip()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_CLIP_NAME, pretrained=None, force_quick_gelu=quick).eval()


def _features(model):
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)(["a chair", "a red mug"])
    with torch.no_grad():
        return model.encode_image(image).numpy(), model.encode_text(tokens).numpy()


@pytest.fixture(scope="module")
def openai_release(tmp_path_factory):
    """A tiny QuickGELU CLIP saved the way OpenAI publishes CLIP: a TorchScript archive whose state
    dict also carries input_resolution / context_length / vocab_size."""
    model = _tiny(quick=True)
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):  # open_clip keeps these two as plain ints
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path, _features(_tiny(quick=True))


def test_name_suffixes():
    assert split_clip_name("ViT-B-16-quickgelu") == ("ViT-B-16", True)
    assert split_clip_name("ViT-B-16-gelu") == ("ViT-B-16", False)
    assert split_clip_name("ViT-B-16") == ("ViT-B-16", None)


def test_torchscript_release_is_refused_with_the_conversion(openai_release):
    path, _ = openai_release
    with pytest.raises(ValueError, match="import-checkpoint --trust --clip"):
        load_open_clip(TINY_CLIP_NAME, path)


def test_converted_openai_release_loads_with_quick_gelu_and_same_features(openai_release, tmp_path):
    from sas_app.commands.import_checkpoint import convert_openai_clip

    path, (want_image, want_text) = openai_release
    out = tmp_path / "tiny-openai.pt"
    assert convert_openai_clip(path, out) > 10
    model = load_open_clip(TINY_CLIP_NAME, out)
    assert uses_quick_gelu(model)
    got_image, got_text = _features(model)
    np.testing.assert_allclose(got_image, want_image, atol=1e-6)
    np.testing.assert_allclose(got_text, want_text, atol=1e-6)
    # the same weights in a GELU model give other features: the choice matters
    wrong = _tiny(quick=False)
    wrong.load_state_dict(model.state_dict())
    assert np.abs(_features(wrong)[0] - want_image).max() > 1e-3
    # a name that says GELU contradicts the weights
    with pytest.raises(ValueError, match="declares GELU"):
        resolve_activation(TINY_CLIP_NAME + "-gelu", out)


def test_openai_state_dict_buffers_mean_quick_gelu(tmp_path):
    model = _tiny(quick=True)
    state = dict(model.state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai_state.pt"
    torch.save(state, path)
    arch, quick, why = resolve_activation(TINY_CLIP_NAME, path)
    assert arch == TINY_CLIP_NAME and quick and "input_resolution" in why


def test_plain_weights_of_a_mixed_architecture_are_ambiguous(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(build_tiny_clip().state_dict(), path)
    with pytest.raises(ValueError) as err:
        resolve_activation("ViT-B-16", path)
    text = str(err.value)
    assert "ViT-B-16-quickgelu" in text and "ViT-B-16-gelu" in text and "openai" in text
    assert resolve_activation("ViT-B-16-quickgelu", path)[1] is True
    assert resolve_activation("ViT-B-16-gelu", path)[1] is False
    # an architecture published only by OpenAI is QuickGELU without a word from the user
    from sas_core.clip import published_activations

    only_openai = [a for a in ("ViT-L-14-336", "RN50x64") if set(published_activations(a).values()) == {True}]
    assert only_openai, "expected an OpenAI-only architecture in open_clip's registry"
    assert resolve_activation(only_openai[0], path)[1] is True
    # the tiny test architecture has no published weights: its own config (GELU)
    assert resolve_activation(TINY_CLIP_NAME, path)[1] is False
    assert not uses_quick_gelu(load_open_clip(TINY_CLIP_NAME, path))


def test_hugging_face_config_beside_the_file_decides(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(_tiny(quick=True).state_dict(), path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    arch, quick, why = resolve_activation("ViT-B-16", path)
    assert quick and "open_clip_config.json" in why
    assert uses_quick_gelu(load_open_clip(TINY_CLIP_NAME, path))
    with pytest.raises(ValueError, match="declares GELU"):
        resolve_activation("ViT-B-16-gelu", path)


def test_text_encoder_shares_the_activation(openai_release, tmp_path):
    from sas_app.commands.import_checkpoint import convert_openai_clip
    from sas_core.text import OpenClipTextEncoder

    path, (_, want_text) = openai_release
    out = tmp_path / "tiny-openai.pt"
    convert_openai_clip(path, out)
    encoder = OpenClipTextEncoder(TINY_CLIP_NAME, str(out))
    got = encoder.encode(["a chair", "a red mug"]).numpy()
    want = want_text / np.linalg.norm(want_text, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_models_file_keys_may_declare_the_activation():
    from sas_core.models import ModelPaths

    paths = ModelPaths(clip_model="ViT-B-16-quickgelu", clip_checkpoint="/m/b16.bin",
                       clip_checkpoints={"ViT-B-32-quickgelu": "/m/b32.bin", "ViT-L-14-336": "/m/l14.bin"})
    assert paths.clip_weights("ViT-B-16") == "/m/b16.bin"
    assert paths.clip_weights("ViT-B-32") == "/m/b32.bin"
    assert paths.clip_weights("ViT-B-32-quickgelu") == "/m/b32.bin"
    assert paths.clip_weights("ViT-L-14-336") == "/m/l14.bin"
    assert paths.clip_weights("ViT-H-14") is None
