"""The models file (sas_core.models) and `sas models`: precedence, relative paths, unknown keys,
conventional names, and strict load checks on tiny real-class models (present, missing, wrong shapes)."""

import json

import numpy as np
import pytest

from sas_core import models
from sas_core.models import ModelPaths, check_model_paths, load_model_paths, model_paths_from_dir


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch):
    monkeypatch.delenv(models.ENV_FILE, raising=False)
    monkeypatch.delenv(models.ENV_DIR, raising=False)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------- the file


def test_precedence_explicit_then_env_file_then_env_dir_then_none(tmp_path, monkeypatch):
    a = _write(tmp_path / "a" / "models.yaml", "checkpoint: a.pt\n")
    b = _write(tmp_path / "b" / "models.yaml", "checkpoint: b.pt\n")
    c = _write(tmp_path / "c" / "models.yaml", "checkpoint: c.pt\n")
    assert load_model_paths() == ModelPaths()  # nothing configured: every entry unset
    monkeypatch.setenv(models.ENV_DIR, str(c.parent))
    assert load_model_paths().checkpoint == str(tmp_path / "c" / "c.pt")
    monkeypatch.setenv(models.ENV_FILE, str(b))
    paths = load_model_paths()
    assert paths.checkpoint == str(tmp_path / "b" / "b.pt") and "$SAS_MODELS" in paths.source
    assert load_model_paths(a).checkpoint == str(tmp_path / "a" / "a.pt")
    assert load_model_paths(str(a)).source == str(a)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_model_paths(tmp_path / "nope.yaml")
    monkeypatch.setenv(models.ENV_FILE, str(tmp_path / "gone.yaml"))
    with pytest.raises(FileNotFoundError, match="gone.yaml"):
        load_model_paths()


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    f = _write(tmp_path / "cfg" / "models.yaml",
               "# comment\nclip_model: ViT-B-32\nclip_checkpoint: weights/clip.bin\n"
               "sam_checkpoint: ~/sam/sam_vit_l_0b3195.pth\nstable_diffusion: /abs/sd\n"
               "checkpoints:\n  office: ../ckpt/office.pt\nclip_checkpoints:\n  ViT-L-14-336: l14.bin\n"
               "lseg_features:\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir("/")  # the working directory does not matter
    p = load_model_paths(f)
    assert p.clip_model == "ViT-B-32"  # a name, not a path
    assert p.clip_checkpoint == str(tmp_path / "cfg" / "weights" / "clip.bin")
    assert p.sam_checkpoint == str(tmp_path / "home" / "sam" / "sam_vit_l_0b3195.pth")
    assert p.sam_model_type == "vit_l"  # from the release file name
    assert p.stable_diffusion == "/abs/sd" and p.lseg_features is None
    assert p.checkpoints == {"office": str(tmp_path / "ckpt" / "office.pt")}
    assert p.clip_weights() == p.clip_checkpoint and p.clip_weights("ViT-B-32") == p.clip_checkpoint
    assert p.clip_weights("ViT-L-14-336") == str(tmp_path / "cfg" / "l14.bin") and p.clip_weights("RN50") is None


def test_unknown_keys_and_bad_values_are_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'sam_chekpoint'.*known keys: clip_model"):
        load_model_paths(_write(tmp_path / "m1.yaml", "sam_chekpoint: x.pth\n"))
    with pytest.raises(ValueError, match="checkpoints must map names to paths"):
        load_model_paths(_write(tmp_path / "m2.yaml", "checkpoints: [a.pt]\n"))
    with pytest.raises(ValueError, match="clip_checkpoint must be a string"):
        load_model_paths(_write(tmp_path / "m3.yaml", "clip_checkpoint: 3\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_model_paths(_write(tmp_path / "m4.yaml", "a: [\n"))
    with pytest.raises(ValueError, match="mapping"):
        load_model_paths(_write(tmp_path / "m5.yaml", "- a\n- b\n"))
    assert load_model_paths(_write(tmp_path / "empty.yaml", "# nothing set\n")) == \
        ModelPaths(source=str(tmp_path / "empty.yaml"))


def test_template_has_every_key_and_sets_none(tmp_path):
    from pathlib import Path

    template = Path(__file__).resolve().parents[1] / "config" / "models.yaml"
    text = template.read_text()
    for key in models.FILE_KEYS:
        assert f"# {key}:" in text, key
    p = load_model_paths(template)
    assert all(getattr(p, k) in (None, {}) for k in models.FILE_KEYS)


def test_models_dir_conventional_names(tmp_path, monkeypatch):
    for name in ("open_clip_ViT-B-16.bin", "open_clip_ViT-B-32.safetensors", "sam_vit_b_01ec64.pth",
                 "sam_vit_h_4b8939.pth", "sas.pt", "checkpoints/office.pt", "lseg_features/s_0.pt",
                 "stable-diffusion-v1-5/model_index.json", "notes.txt"):
        _write(tmp_path / name, "x")
    monkeypatch.setenv(models.ENV_DIR, str(tmp_path))
    p = load_model_paths()
    assert (p.clip_model, p.clip_checkpoint) == ("ViT-B-16", str(tmp_path / "open_clip_ViT-B-16.bin"))
    assert p.clip_checkpoints == {"ViT-B-32": str(tmp_path / "open_clip_ViT-B-32.safetensors")}
    assert (p.sam_model_type, p.sam_checkpoint) == ("vit_h", str(tmp_path / "sam_vit_h_4b8939.pth"))
    assert p.checkpoint == str(tmp_path / "sas.pt") and p.checkpoints == {"office": str(tmp_path / "checkpoints" /
                                                                                       "office.pt")}
    assert p.lseg_features == str(tmp_path / "lseg_features") and p.openseg_features is None
    assert p.stable_diffusion == str(tmp_path / "stable-diffusion-v1-5")
    # a models.yaml in the folder is used instead of the conventional names
    _write(tmp_path / "models.yaml", "checkpoint: other.pt\n")
    assert model_paths_from_dir(tmp_path) == ModelPaths(checkpoint=str(tmp_path / "other.pt"),
                                                        source=str(tmp_path / "models.yaml"))
    monkeypatch.setenv(models.ENV_DIR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SAS_MODELS_DIR"):
        load_model_paths()


def test_command_defaults_from_the_models_file_and_explicit_flags_win(tmp_path):
    from sas_app.commands import apply_model_paths
    from sas_app.cli import build_parser

    f = _write(tmp_path / "m.yaml", "clip_model: ViT-B-32\nclip_checkpoint: b32.bin\nsam_checkpoint: "
                                    "sam_vit_h_4b8939.pth\nclip_checkpoints:\n  ViT-L-14: l14.bin\n"
                                    "stable_diffusion: sd\n")
    parser = build_parser()

    def fuse(*argv):
        args = parser.parse_args(["fuse", "--models", str(f), *argv])
        apply_model_paths(args, {"clip_model": "clip_model", "clip_checkpoint": "clip_checkpoint",
                                 "sam_model_type": "sam_model", "sam_checkpoint": "sam_checkpoint"})
        return args

    a = fuse()
    assert (a.clip_model, a.clip_checkpoint) == ("ViT-B-32", str(tmp_path / "b32.bin"))
    assert (a.sam_model, a.sam_checkpoint) == ("vit_h", str(tmp_path / "sam_vit_h_4b8939.pth"))
    a = fuse("--clip-checkpoint", "mine.bin", "--sam-model", "vit_b")
    assert (a.clip_model, a.clip_checkpoint) == ("ViT-B-32", "mine.bin")
    assert (a.sam_model, a.sam_checkpoint) == ("vit_b", None)  # the file's SAM is a vit_h: not used for vit_b
    a = fuse("--clip-model", "ViT-L-14")
    assert a.clip_checkpoint == str(tmp_path / "l14.bin")  # the weights of the architecture asked for
    a = fuse("--clip-model", "RN50")
    assert a.clip_checkpoint is None
    args = parser.parse_args(["capability", "-o", "x", "--models", str(f)])
    apply_model_paths(args, {"stable_diffusion": "model_path"})
    assert args.model_path == str(tmp_path / "sd")


def _tiny_checkpoint(path, dim=16):
    import torch

    from sas_core.nn import build_model, save_checkpoint
    from sas_core.text import SyntheticTextEncoder

    torch.manual_seed(0)
    save_checkpoint(path, build_model("MinkUNet14A", 3, dim), {"voxel_size": 0.05,
                                                               "text_encoder": SyntheticTextEncoder(dim=dim).config()})
    return path


def test_segment_and_query_take_the_checkpoint_from_the_models_file(tmp_path, capsys):
    from sas_app import cli

    ckpt = _tiny_checkpoint(tmp_path / "w" / "tiny.pt")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "cloud.npy", rng.random((300, 3)).astype(np.float32))
    f = _write(tmp_path / "models.yaml", "checkpoint: w/tiny.pt\ncheckpoints:\n  office: w/tiny.pt\n")
    assert cli.main(["segment", str(tmp_path / "cloud.npy"), "--models", str(f), "--out",
                     str(tmp_path / "seg.ply")]) == 0
    assert np.load(tmp_path / "seg.npy").shape == (300,)
    assert cli.main(["query", "a chair", "--cloud", str(tmp_path / "cloud.npy"), "--checkpoint", "office",
                     "--models", str(f), "--out", str(tmp_path / "rel.ply"), "--top", "0"]) == 0
    capsys.readouterr()
    # an explicit checkpoint wins over the file's
    assert cli.main(["segment", str(tmp_path / "nope.pt"), str(tmp_path / "cloud.npy"), "--models", str(f),
                     "--out", str(tmp_path / "x.ply")]) == 1
    assert "nope.pt" in capsys.readouterr().err
    assert ckpt.is_file()


# ---------------------------------------------------------------------------------- the checks


@pytest.fixture
def tiny_sam_type(monkeypatch):
    from segment_anything import sam_model_registry

    from sas_core.teachers.mask_teacher import build_tiny_sam

    monkeypatch.setitem(sam_model_registry, "sas_tiny", lambda checkpoint=None: build_tiny_sam(seed=1))
    return "sas_tiny"


def _save_state(path, module):
    import torch

    torch.save(module.state_dict(), path)
    return str(path)


def test_check_model_paths_present_missing_and_wrong_shapes(tmp_path, tiny_sam_type):
    from sas_core.clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, build_tiny_clip, save_tiny_clip
    from sas_core.teachers.mask_teacher import build_tiny_sam

    clip_ok = save_tiny_clip(tmp_path / "clip.pt")
    wider = json.loads(json.dumps(TINY_CLIP_CONFIG))
    wider["vision_cfg"]["width"] = 48
    clip_bad = _save_state(tmp_path / "clip_wide.pt", build_tiny_clip(name="sas-tiny-vit-wide", config=wider))
    sam_ok = _save_state(tmp_path / "sam_ok.pth", build_tiny_sam(seed=2))
    sam_bad = _save_state(tmp_path / "sam_bad.pth", build_tiny_sam(seed=2, img_size=32))
    ckpt = _tiny_checkpoint(tmp_path / "tiny.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    _write(tmp_path / "feats" / "scene0_0.pt", "x")
    paths = ModelPaths(clip_model=TINY_CLIP_NAME, clip_checkpoint=clip_ok,
                       clip_checkpoints={"sas-tiny-vit-wide": clip_ok, "missing-model": str(tmp_path / "no.bin")},
                       sam_model_type=tiny_sam_type, sam_checkpoint=sam_ok, stable_diffusion=str(tmp_path / "sd"),
                       checkpoint=str(ckpt), checkpoints={"broken": str(tmp_path / "broken.pt")},
                       lseg_features=str(tmp_path / "feats"), openseg_features=str(tmp_path / "nofeats"))
    st = {s.key: s for s in check_model_paths(paths)}
    assert st["clip_checkpoint"].ok and st["clip_checkpoint"].loads and "32-d embeddings" in st["clip_checkpoint"].detail
    wide = st["clip_checkpoints.sas-tiny-vit-wide"]  # a 32-wide file claimed as the 48-wide model
    assert wide.exists and wide.loads is False and not wide.ok
    assert "wrong shape" in wide.detail and "48" in wide.detail
    missing = st["clip_checkpoints.missing-model"]
    assert not missing.exists and missing.loads is None and "open_clip_missing-model.bin" in missing.hint
    assert st["sam_checkpoint"].ok and "SAM sas_tiny" in st["sam_checkpoint"].detail
    assert st["checkpoint"].ok and "MinkUNet14A: 16-d features" in st["checkpoint"].detail
    assert st["checkpoints.broken"].loads is False and "corrupt" in st["checkpoints.broken"].detail
    assert st["stable_diffusion"].loads is False and "model_index.json" in st["stable_diffusion"].detail
    assert st["lseg_features"].ok and "1 fused-feature files" in st["lseg_features"].detail
    assert not st["openseg_features"].exists and "openseg_features" in st["openseg_features"].hint
    # a SAM file of another architecture fails with the offending key and both shapes
    bad = {s.key: s for s in check_model_paths(ModelPaths(sam_model_type=tiny_sam_type, sam_checkpoint=sam_bad))}
    assert bad["sam_checkpoint"].loads is False and "pos_embed" in bad["sam_checkpoint"].detail
    # no load: existence only
    fast = {s.key: s for s in check_model_paths(paths, load=False)}
    assert fast["checkpoints.broken"].exists and fast["checkpoints.broken"].loads is None
    # unset entries say what to download
    empty = {s.key: s for s in check_model_paths(ModelPaths())}
    assert empty["sam_checkpoint"].path is None and "sam_vit_h_4b8939.pth" in empty["sam_checkpoint"].hint
    assert clip_bad  # the wide file itself is a valid wide model


def test_check_never_unpickles(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import torch

    torch.save({"w": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    st = check_model_paths(ModelPaths(clip_model="ViT-B-16", clip_checkpoint=str(tmp_path / "evil.pt")))[0]
    assert st.loads is False and not marker.exists()


def test_sas_models_command_text_and_json(tmp_path, capsys, tiny_sam_type):
    from sas_app import cli
    from sas_core.clip import TINY_CLIP_NAME, save_tiny_clip
    from sas_core.teachers.mask_teacher import build_tiny_sam

    save_tiny_clip(tmp_path / "clip.pt")
    _save_state(tmp_path / "sam.pth", build_tiny_sam(seed=0, img_size=32))  # wrong shapes for sas_tiny
    ok = _write(tmp_path / "ok.yaml", f"clip_model: {TINY_CLIP_NAME}\nclip_checkpoint: clip.pt\n")
    assert cli.main(["models", "--models", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "clip_checkpoint" in out and "loads" in out and "more entries not set" in out
    bad = _write(tmp_path / "bad.yaml", f"clip_model: {TINY_CLIP_NAME}\nclip_checkpoint: clip.pt\n"
                                        f"sam_model_type: {tiny_sam_type}\nsam_checkpoint: sam.pth\n"
                                        "checkpoint: gone.pt\n")
    assert cli.main(["models", "--models", str(bad), "--all"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT LOAD" in out and "MISSING" in out and "-> train one with `sas distill`" in out
    assert "not set" in out and "stable-diffusion-v1-5" in out
    assert cli.main(["models", "--models", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    by_key = {m["key"]: m for m in report["models"]}
    assert report["ok"] is False and report["source"] == str(bad)
    assert by_key["clip_checkpoint"]["ok"] and by_key["clip_checkpoint"]["loads"]
    assert by_key["sam_checkpoint"]["exists"] and by_key["sam_checkpoint"]["loads"] is False
    assert by_key["checkpoint"]["exists"] is False and by_key["checkpoint"]["hint"]
    unknown = _write(tmp_path / "unknown.yaml", "clip_chekpoint: clip.pt\n")
    assert cli.main(["models", "--models", str(unknown)]) == 1
    assert "unknown key 'clip_chekpoint'" in capsys.readouterr().err


def test_node_entry_point_is_ros_free():
    """The node reads the file through load_model_paths(path); sas_core.models imports nothing heavy."""
    import subprocess
    import sys

    code = ("import sys, sas_core.models as m; m.load_model_paths(None); "
            "print(sorted(x for x in ('torch', 'rclpy', 'open_clip', 'segment_anything') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
