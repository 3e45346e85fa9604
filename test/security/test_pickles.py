"""Files are data, never code: every .pt/.pth/.pth.tar reader refuses a hostile pickle before it runs.

A hostile object's ``__reduce__`` writes a marker file when unpickled. Each loadable file type
(backbone checkpoint, OpenScene release checkpoint, OpenScene scene .pth, fused feature .pt,
TESD history, SAM weights, any point-cloud .pth) holding it must be refused with a clear error
(which type, that it could run code, how to convert a trusted file) and the marker never appears.
"""

import argparse
import io
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from sas_app import cli
from sas_core.io import UnsafeFileError, load_torch_file

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = (".pt", ".pth", ".pth.tar")


def _write_marker(path):
    Path(path).write_text("code ran")
    return 0


class Hostile:
    """Unpickling this calls ``_write_marker(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "a hostile pickle ran code"


def test_the_hostile_object_really_runs_code_when_unpickled(tmp_path):
    # The fixture's check can fail: plain pickle executes the payload.
    m = tmp_path / "m"
    pickle.loads(pickle.dumps(Hostile(m)))
    assert m.read_text() == "code ran"


def _refused(exc_info, path):
    msg = str(exc_info.value)
    assert "_write_marker" in msg, msg               # names the refused type
    assert "run arbitrary code" in msg, msg
    assert f"sas import-checkpoint --trust {path}" in msg, msg
    assert isinstance(exc_info.value, UnsafeFileError) and isinstance(exc_info.value, ValueError)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_safe_loader_refuses_hostile_files(tmp_path, marker, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Hostile(marker)}, path)
    with pytest.raises(UnsafeFileError) as e:
        load_torch_file(path)
    _refused(e, path)
    # the legacy (non-zip) torch format and a raw pickle are refused too
    torch.save([Hostile(marker)], path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError):
        load_torch_file(path)
    path.write_bytes(pickle.dumps(Hostile(marker), protocol=2))
    with pytest.raises(ValueError):
        load_torch_file(path)


def _every_reader():
    """(name, suffixes, write(path, hostile), load(path)) for every loadable file type."""
    from sas_core.nn import build_model, load_checkpoint, load_openscene_checkpoint, save_checkpoint

    def own_checkpoint(path, evil):
        save_checkpoint(path, build_model("MinkUNet14A", 3, 8), {"voxel_size": 0.05})
        payload = load_torch_file(path)
        payload["extra"] = {"epoch": evil}
        torch.save(payload, path)

    def release_checkpoint(path, evil):
        torch.save({"epoch": 100, "best_iou": np.float64(0.5), "args": evil,
                    "state_dict": {f"module.{k}": v for k, v in build_model("MinkUNet14A", 3, 8).state_dict().items()}},
                   path)

    def scene(path, evil):
        torch.save((np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32), evil), path)

    def fused(path, evil):
        torch.save({"feat": torch.zeros(4, 8).half(), "mask_full": evil}, path)

    def segmenter(path):
        from sas_core.infer import Segmenter

        return Segmenter.from_checkpoint(path)

    def point_cloud(path):
        from sas_core.infer import load_point_cloud

        return load_point_cloud(path)

    def dataset(path):
        from sas_core.train.datasets import OpenSceneScenes

        return OpenSceneScenes(path.parent.parent, split=path.parent.name)[0]

    def read_pth(path):
        from sas_core.data.openscene import read_pth as f

        return f(path)

    def fused_reader(path):
        from sas_core.data.fused_features import load_fused_features

        return load_fused_features(path)

    def tesd(path):
        from sas_core.train.tesd import TemporalEnsemble

        return TemporalEnsemble(0.9, offload_dir=str(path.parent)).get(path.name[: -len(".pt")])

    def sam(path):
        from sas_core.teachers.mask_teacher import load_sam

        return load_sam("vit_b", str(path))

    def tensor(path, evil):
        torch.save({"h": torch.zeros(3), "e": evil}, path)

    return [
        ("backbone checkpoint", SUFFIXES, own_checkpoint, lambda p: load_checkpoint(p)),
        ("segmenter checkpoint", SUFFIXES, own_checkpoint, segmenter),
        ("release checkpoint", SUFFIXES, release_checkpoint, lambda p: load_openscene_checkpoint(p, "MinkUNet14A")),
        ("OpenScene scene", (".pth",), scene, read_pth),
        ("point cloud", (".pth",), scene, point_cloud),
        ("training scene", (".pth",), scene, dataset),
        ("fused features", (".pt",), fused, fused_reader),
        ("TESD history", (".pt",), tensor, tesd),
        ("SAM weights", SUFFIXES, tensor, sam),
    ]


@pytest.mark.parametrize("case", range(len(_every_reader())), ids=[c[0] for c in _every_reader()])
def test_every_file_type_refuses_a_hostile_pickle(tmp_path, marker, case):
    name, suffixes, write, load = _every_reader()[case]
    for suffix in suffixes:
        folder = tmp_path / "train"
        folder.mkdir(exist_ok=True)
        path = folder / f"scene0000_00{suffix}"
        write(path, Hostile(marker))
        with pytest.raises(ValueError) as e:
            load(path)
        _refused(e, path)
        path.unlink()


def test_legacy_openscene_checkpoint_with_numpy_values_loads(tmp_path):
    """A release file as OpenScene writes it: numpy best_iou, numpy arrays, pickled by NumPy 1.x or 2.x."""
    from sas_core.nn import build_model, load_openscene_checkpoint

    net = build_model("MinkUNet14A", 3, 16)
    obj = {"epoch": 100, "best_iou": np.float64(0.5), "iou_per_class": np.arange(3, dtype=np.float32),
           "state_dict": OrderedDict((f"module.net3d.{k}", v) for k, v in net.state_dict().items())}
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    assert b"numpy._core.multiarray" in raw
    for i, data in enumerate((raw, raw.replace(b"numpy._core.", b"numpy.core."))):  # NumPy 2.x, then 1.x names
        path = tmp_path / f"release{i}.pth.tar"
        path.write_bytes(data)
        loaded = load_torch_file(path)
        assert loaded["best_iou"] == 0.5 and loaded["iou_per_class"].tolist() == [0, 1, 2]
        model = load_openscene_checkpoint(path, "MinkUNet14A")
        for k, v in net.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_namespace_is_refused_and_trust_converts(tmp_path, capsys):
    from sas_core.infer import Segmenter
    from sas_core.nn import UnsafeCheckpointError, build_model, load_openscene_checkpoint

    net = build_model("MinkUNet14A", 3, 16)
    src = tmp_path / "release.pth.tar"
    torch.save({"args": argparse.Namespace(arch="mink_18A", lr=1e-4), "best_iou": np.float32(0.3),
                "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, src)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        load_openscene_checkpoint(src, "MinkUNet14A")
    out = tmp_path / "safe.pt"
    args = ["import-checkpoint", str(src), str(out), "--arch", "MinkUNet14A", "--synthetic-text"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "--trust" in err and not out.exists()
    assert cli.main(args + ["--trust"]) == 0
    seg = Segmenter.from_checkpoint(out)
    for k, v in net.state_dict().items():
        assert torch.equal(seg.model.state_dict()[k], v), k
    # --trust --data rewrites a data file as plain data the safe readers accept
    from sas_core.data.openscene import read_pth

    scene = tmp_path / "scene.pth"
    coords = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    torch.save({"coords": coords, "colors": np.zeros((5, 3), np.float32), "labels": np.arange(5),
                "meta": argparse.Namespace(scene="scene0000_00")}, scene)
    with pytest.raises(UnsafeFileError):
        read_pth(scene)
    assert cli.main(["import-checkpoint", str(scene), str(tmp_path / "plain.pth"), "--data"]) == 1
    assert "--trust" in capsys.readouterr().err
    assert cli.main(["import-checkpoint", str(scene), str(tmp_path / "plain.pth"), "--trust", "--data"]) == 0
    c, _, labels = read_pth(tmp_path / "plain.pth")
    np.testing.assert_array_equal(c, coords)
    np.testing.assert_array_equal(labels, np.arange(5))
    assert load_torch_file(tmp_path / "plain.pth")["meta"] == {"scene": "scene0000_00"}


def test_trust_is_documented_as_the_only_unpickling_place(capsys):
    with pytest.raises(SystemExit):
        cli.main(["import-checkpoint", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust" in text and "UNPICKLE" in text and "only place" in text and "arbitrary code" in text


# ------------------------------------------------------------------------------ content hash

def _own(tmp_path, name="m.pt"):
    from sas_core.nn import build_model, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp_path / name, build_model("MinkUNet14A", 3, 8), {"voxel_size": 0.05})


def test_checkpoint_content_hash_detects_tampering(tmp_path):
    from sas_core.nn import CheckpointError, load_checkpoint
    from sas_core.nn.checkpoint import state_dict_sha256

    path = _own(tmp_path)
    payload = load_torch_file(path)
    assert payload["state_dict_sha256"] == state_dict_sha256(payload["state_dict"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hashed checkpoint loads without warnings
        load_checkpoint(path)
    # one weight changed, the stored hash kept: refused
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1e-3
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="content hash"):
        load_checkpoint(tmp_path / "tampered.pt")
    # bytes flipped inside the stored weights: refused (hash or container check)
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    n, m = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + n + m  # first byte of the largest tensor's storage
    for off in range(start + info.file_size // 2, start + info.file_size // 2 + 16):
        data[off] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "flipped.pt")
    # an older checkpoint without a hash loads, with a warning
    payload = load_torch_file(path)
    del payload["state_dict_sha256"]
    payload["format_version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="no content hash"):
        model, cfg, _ = load_checkpoint(tmp_path / "old.pt")
    assert cfg == {"voxel_size": 0.05} and model.out_channels == 8


def test_hash_depends_on_values_shapes_dtypes_and_keys():
    from sas_core.nn.checkpoint import state_dict_sha256

    base = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    h = state_dict_sha256(base)
    assert h == state_dict_sha256(OrderedDict(reversed(list(base.items()))))  # order of insertion irrelevant
    assert h != state_dict_sha256({**base, "a": base["a"].reshape(3, 2)})
    assert h != state_dict_sha256({**base, "b": base["b"].int()})
    assert h != state_dict_sha256({"a2": base["a"], "b": base["b"]})
    changed = base["a"].clone()
    changed[1, 2] = 5.5
    assert h != state_dict_sha256({**base, "a": changed})


@pytest.mark.parametrize("field,value,match", [
    ("model_json", {"arch": "MinkUNet14A", "in_channels": 3, "out_channels": 100_000}, "out_channels"),
    ("model_json", {"arch": "MinkUNet14A", "in_channels": 3.5, "out_channels": 8}, "in_channels"),
    ("model_json", {"arch": "os.system", "in_channels": 3, "out_channels": 8}, "unknown architecture"),
    ("model_json", [1, 2], "JSON object"),
    ("config_json", {"voxel_size": "big"}, "voxel_size"),
    ("config_json", {"voxel_size": -0.1}, "voxel_size"),
    ("config_json", {"data": {"voxel_size": 1e9}}, "data.voxel_size"),
    ("config_json", {"input_color": "yes"}, "input_color"),
    ("config_json", {"out_channels": 1 << 20}, "out_channels"),
    ("config_json", {"text_encoder": "clip"}, "text_encoder"),
    ("config_json", [], "JSON object"),
])
def test_config_json_is_validated_before_any_model_is_built(tmp_path, monkeypatch, field, value, match):
    import json

    from sas_core.nn import CheckpointError, checkpoint, load_checkpoint

    path = _own(tmp_path)
    payload = load_torch_file(path)
    payload[field] = json.dumps(value)
    torch.save(payload, path)

    def no_build(*a, **k):
        raise AssertionError("a model was built from an invalid description")

    monkeypatch.setattr(checkpoint, "build_model", no_build)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ static scan

def test_only_import_checkpoint_unpickles():
    """No source file outside the safe loader calls torch.load, and only --trust unpickles fully."""
    allowed_load = {"sas_core/io.py", "sas_app/commands/import_checkpoint.py"}
    offenders = []
    for folder in ("sas_core", "sas_ros", "sas_app"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            text = f.read_text(encoding="utf-8")
            if re.search(r"\btorch\.load\(", text) and rel not in allowed_load:
                offenders.append(f"{rel}: torch.load")
            if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True", text) \
                    and rel != "sas_app/commands/import_checkpoint.py":
                offenders.append(f"{rel}: unpickling")
    assert not offenders, offenders
