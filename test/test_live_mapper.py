"""The Mapper's live-teacher hooks (ROS-free): teacher frames picked by time and viewpoint, real
teachers (tiny random open_clip / segment-anything models of the real classes) built from the
models file, and several teachers fused per voxel by capability."""

import dataclasses

import numpy as np
import pytest
import torch

from sas_core.mapping import Mapper, MapperConfig


@pytest.fixture(scope="module")
def scene():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    return generate_scene(SynthConfig(seed=6, n_frames=4, with_lidar=False))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from sas_core.clip import TINY_CLIP_NAME, save_tiny_clip

    path = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip_tiny.pt", seed=0)
    return TINY_CLIP_NAME, path


def _pose(t=(0.0, 0.0, 0.0), yaw_deg=0.0):
    a = np.radians(yaw_deg)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    T[:3, 3] = t
    return T


def test_teacher_frames_are_picked_by_time_and_viewpoint():
    m = Mapper(MapperConfig(mode="none", teacher_min_period=0.5, teacher_min_translation=0.2,
                            teacher_min_rotation=10.0))
    assert m.select_teacher_frame(10.0, _pose())                      # the first frame always
    assert not m.select_teacher_frame(10.3, _pose((1.0, 0, 0)))      # too soon, however far it moved
    assert not m.select_teacher_frame(11.0, _pose((0.1, 0, 0), 5))   # late enough but barely moved
    assert m.select_teacher_frame(11.0, _pose((0.25, 0, 0)))         # moved 25 cm
    assert not m.select_teacher_frame(11.6, _pose((0.3, 0, 0), 9))   # 5 cm and 9 degrees since the last
    assert m.select_teacher_frame(11.6, _pose((0.25, 0, 0), 12))     # turned 12 degrees
    assert m.select_teacher_frame(3.0, _pose())                      # stamps went back (bag loop): start over
    only_time = Mapper(MapperConfig(mode="none", teacher_min_period=0.1))
    picked = [s for s in np.arange(0, 1.0, 1 / 15) if only_time.select_teacher_frame(float(s), _pose())]
    assert len(picked) == 8 and np.all(np.diff(picked) >= 0.1 - 1e-9)
    every = Mapper(MapperConfig(mode="none"))  # defaults: every frame (sas replay as before)
    assert all(every.select_teacher_frame(float(s), _pose()) for s in (0.0, 0.0, 0.01))
    with pytest.raises(ValueError, match="teacher_min_period"):
        Mapper(MapperConfig(mode="none", teacher_min_period=-1.0))


def test_integrate_fuses_only_picked_frames(scene, tiny_clip):
    from sas_core.models import ModelPaths

    name, path = tiny_clip
    cfg = MapperConfig(mode="fusion", teacher="dense_clip", teacher_min_translation=100.0)  # never moves enough
    m = Mapper(cfg, models=ModelPaths(clip_model=name, clip_checkpoint=path))
    for f in scene.frames:
        m.integrate_rgbd(f)
    assert m.n_frames == len(scene.frames) and m.n_teacher_frames == 1  # only the first one
    assert m.stats()["teacher_frames"] == 1 and not m.needs_ground_truth


def test_dense_teacher_takes_the_models_file_preset_and_an_explicit_recipe_wins(tiny_clip):
    from sas_core.models import ModelPaths
    from sas_core.teachers.dense_clip import DENSE_CLIP_PRESETS

    name, path = tiny_clip
    preset = next(k for k, v in DENSE_CLIP_PRESETS.items() if v.get("recipe") not in (None, "sclip"))
    models = ModelPaths(clip_model=name, clip_checkpoint=path, clip_preset=preset)
    m = Mapper(MapperConfig(mode="fusion", teacher="dense_clip"), models=models)
    for key, value in DENSE_CLIP_PRESETS[preset].items():
        assert getattr(m.teacher.config, key) == value, key
    m = Mapper(MapperConfig(mode="fusion", teacher="dense_clip", clip_recipe="maskclip"), models=models)
    assert m.teacher.config.recipe == "maskclip"
    m = Mapper(MapperConfig(mode="fusion", teacher="dense_clip"), models=ModelPaths(clip_model=name, clip_checkpoint=path))
    assert m.teacher.config.recipe == "sclip"


def test_real_teachers_need_their_weights_and_a_capability_table(tmp_path, tiny_clip, monkeypatch):
    from segment_anything import sam_model_registry

    from sas_core.models import ModelPaths
    from sas_core.teachers.mask_teacher import build_tiny_sam

    name, path = tiny_clip
    with pytest.raises(ValueError, match="clip_checkpoint"):
        Mapper(MapperConfig(mode="fusion", teacher="dense_clip"), models=ModelPaths())
    with pytest.raises(ValueError, match="sam_checkpoint"):
        Mapper(MapperConfig(mode="fusion", teacher="mask_clip"), models=ModelPaths(clip_model=name, clip_checkpoint=path))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        Mapper(MapperConfig(mode="fusion", teacher="dense_clip"),
               models=ModelPaths(clip_model=name, clip_checkpoint=str(tmp_path / "nowhere.pt")))
    monkeypatch.setitem(sam_model_registry, "sas_tiny", lambda checkpoint=None: build_tiny_sam(seed=1))
    sam = tmp_path / "sam_tiny.pth"
    torch.save(build_tiny_sam(seed=1).state_dict(), sam)
    models = ModelPaths(clip_model=name, clip_checkpoint=path, sam_model_type="sas_tiny", sam_checkpoint=str(sam))
    with pytest.raises(ValueError, match="capability_table"):
        Mapper(MapperConfig(mode="fusion", teacher="several"), models=models)
    table = _table(tmp_path, ["dense_clip"], ["chair"], [[0.5]])
    with pytest.raises(ValueError, match="no row for teacher.*mask_clip"):
        Mapper(MapperConfig(mode="fusion", teacher="several", capability_table=table), models=models)
    table = _table(tmp_path, ["dense_clip", "mask_clip"], ["chair"], [[0.5], [0.2]])
    m = Mapper(MapperConfig(mode="fusion", teacher="several", capability_table=table), models=models)
    assert [t.name for t in m.teachers] == ["dense_clip", "mask_clip"]
    assert m.teachers[0].model is m.teachers[1].clip  # one open_clip model, one text space
    assert m._capability.shape == (2, 20)
    np.testing.assert_allclose(m._capability[:, 0 if m.vocabulary[0] == "chair" else 1], [0.5, 0.2])


def _table(folder, teachers, vocabulary, scores):
    from sas_core.capability.tables import CapabilityTable

    path = folder / f"cap_{len(teachers)}_{len(vocabulary)}.json"
    CapabilityTable(list(teachers), list(vocabulary), np.asarray(scores, np.float64)).save(path)
    return str(path)


class _BoxMasks:
    """A deterministic mask generator (SAM's record format): a grid of boxes over part of the image."""

    def __call__(self, rgb):
        h, w = rgb.shape[:2]
        out = []
        for y0 in range(0, h // 2, h // 4):
            for x0 in range(0, w, w // 3):
                seg = np.zeros((h, w), bool)
                seg[y0:y0 + h // 4, x0:x0 + w // 3] = True
                out.append({"segmentation": seg, "area": int(seg.sum())})
        return out


def test_several_teachers_are_fused_per_voxel_by_capability(scene, tiny_clip, tmp_path):
    """Two real teachers (dense CLIP and the SAM+CLIP mask teacher on a tiny random ViT, masks from
    a fixed generator): each voxel's feature is capability_fusion (eq. 6-8) of each teacher's own
    multi-view mean, computed here independently with fuse_frames over the voxel centres."""
    from sas_core.clip import load_open_clip
    from sas_core.fusion import FusionConfig, capability_fusion
    from sas_core.geometry.multiview import fuse_frames
    from sas_core.teachers.dense_clip import DenseClipConfig, DenseClipTeacher
    from sas_core.teachers.mask_teacher import MaskClipTeacher, MaskTeacherConfig
    from sas_core.text import OpenClipTextEncoder

    name, path = tiny_clip
    model = load_open_clip(name, path)
    encoder = OpenClipTextEncoder(name, path, model=model)
    vocabulary = ["wall", "floor", "chair", "table", "sofa"]
    dense = DenseClipTeacher(DenseClipConfig(model=name, short_side=64, crop_size=48, stride=24), model=model)
    mask = MaskClipTeacher(MaskTeacherConfig(clip_model=name, clip_checkpoint=path, vocabulary=vocabulary, min_area=1),
                           text_encoder=encoder, clip_model=model, mask_generator=_BoxMasks())
    scores = [[0.9, 0.8, 0.1, 0.2, 0.3], [0.1, 0.2, 0.9, 0.7, 0.6]]
    table = _table(tmp_path, ["dense_clip", "mask_clip"], vocabulary, scores)
    cfg = MapperConfig(mode="fusion", teacher="several", capability_table=table, vocabulary=",".join(vocabulary))
    m = Mapper(cfg, teacher=[dense, mask], text_encoder=encoder)
    for f in scene.frames:  # geometry first, so every voxel exists for every teacher frame
        m.integrate_rgbd(f, fuse=False)
    inputs = [m.teacher_input(f) for f in scene.frames]
    for tf in inputs:
        m.fuse_frame(tf)
    assert m.n_teacher_frames == len(scene.frames)
    slots = m.map.slots()
    centres = m.map.centers(slots)
    exact = dataclasses.replace(m.fusion_config, out_dtype="float32")  # the mapper fuses float32 means
    refs = [fuse_frames(centres, inputs, t, exact, progress=False) for t in (dense, mask)]
    assert refs[1].mask.float().mean() < refs[0].mask.float().mean()  # the mask teacher leaves holes
    assert refs[1].mask.any()
    expected = capability_fusion([r.features.float() for r in refs], m.class_text, np.asarray(scores, np.float32),
                                 FusionConfig().tau, masks=[r.mask for r in refs]).numpy()
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731 (the map stores unit rows)
    expected, dense_mean = unit(expected), unit(refs[0].features.float().numpy())
    seen = refs[0].mask.numpy() | refs[1].mask.numpy()
    got = m.map.features[slots].astype(np.float32)
    np.testing.assert_allclose(got[seen], expected[seen], atol=3e-3)
    # where only one teacher saw a voxel, it is that teacher's mean; both present: a real mixture
    both = refs[0].mask.numpy() & refs[1].mask.numpy()
    only_dense = refs[0].mask.numpy() & ~refs[1].mask.numpy()
    np.testing.assert_allclose(got[only_dense], dense_mean[only_dense], atol=3e-3)
    assert both.any()
    d = np.abs(got[both] - dense_mean[both]).max(1)
    assert (d > 1e-2).mean() > 0.5
    assert m.stats()["map_bytes"] > 2 * len(slots) * 32 * 4  # two accumulators
