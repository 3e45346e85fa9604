"""Simulated teachers: ground-truth driven, class-dependent and instance-coherent errors."""

import numpy as np
import pytest
import torch

from sas_core.teachers.base import check_teacher_output, frame_from_image
from sas_core.teachers.simulated import (
    DENSE_CLASS_ERROR, MASK_CLASS_ERROR, SimulatedTeacher, SimulatedTeacherConfig, hash_uniform,
    make_simulated_pair,
)
from sas_core.text import MATTERPORT_40, SCANNET_20, SyntheticTextEncoder
from sas_core.types import IGNORE_LABEL

CLS = {n: i for i, n in enumerate(SCANNET_20)}


def grid_frame(classes, block=12, rows=None, stamp=0.0, ignore_rows=2):
    """A frame tiled with square objects (instance id = tile index) of the given classes,
    a strip of "wall" without instance ids on top and an ignored (255) strip at the bottom."""
    classes = np.asarray(classes)
    n = len(classes)
    cols = int(np.ceil(np.sqrt(n))) if rows is None else int(np.ceil(n / rows))
    rows = int(np.ceil(n / cols))
    h, w = (rows + 1 + ignore_rows) * block, cols * block
    sem = np.full((h, w), CLS["wall"], np.int64)
    inst = np.full((h, w), -1, np.int64)
    for i, c in enumerate(classes):
        r, q = divmod(i, cols)
        sl = (slice((r + 1) * block, (r + 2) * block), slice(q * block, (q + 1) * block))
        sem[sl], inst[sl] = c, i
    sem[h - ignore_rows * block:] = IGNORE_LABEL
    inst[h - ignore_rows * block:] = -1
    return frame_from_image(np.zeros((h, w, 3), np.uint8), sem, inst, stamp=stamp)


@pytest.fixture(scope="module")
def encoder():
    return SyntheticTextEncoder(dim=128)


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(1)
    return grid_frame(rng.integers(0, 20, 64))


def argmax_class(feats, encoder):
    return (feats.float() @ encoder.encode(list(SCANNET_20)).T).argmax(-1).numpy()


@pytest.mark.parametrize("kind", ["dense", "mask"])
def test_shapes_dtypes_and_ignore(kind, encoder, frame):
    teacher = SimulatedTeacher(SimulatedTeacherConfig(kind=kind), encoder)
    feats, valid = teacher.features(frame)
    h, w = frame.semantic.shape
    check_teacher_output(feats, valid, h, w, 128)
    assert feats.dtype == torch.float16 and teacher.dim == 128
    v = valid.numpy()
    assert (frame.semantic[-12:] == IGNORE_LABEL).all()
    assert not v[-12:].any()  # the ignored strip (away from blurred borders) has no prediction
    assert torch.allclose(feats[valid].float().norm(dim=-1), torch.ones(int(valid.sum())), atol=2e-3)
    assert bool((feats[~valid] == 0).all())
    assert v.mean() > (0.8 if kind == "dense" else 0.6)


@pytest.mark.parametrize("kind", ["dense", "mask"])
def test_deterministic_by_seed(kind, encoder, frame):
    a = SimulatedTeacher(SimulatedTeacherConfig(kind=kind, seed=5), encoder).features(frame)
    b = SimulatedTeacher(SimulatedTeacherConfig(kind=kind, seed=5), encoder).features(frame)
    c = SimulatedTeacher(SimulatedTeacherConfig(kind=kind, seed=6), encoder).features(frame)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mask_teacher_is_instance_coherent_and_text_aligned(encoder, frame):
    cfg = SimulatedTeacherConfig(kind="mask", boundary_px=0.0, gap_prob=0.0, miss_prob=0.0, flip_prob=0.0,
                                 default_error=0.4, min_area=1)
    teacher = SimulatedTeacher(cfg, encoder)
    feats, valid = teacher.features(frame)
    pred = argmax_class(feats, encoder)
    inst = frame.instance
    for i in np.unique(inst[inst >= 0]):
        labels = np.unique(pred[inst == i])
        assert len(labels) == 1, (i, labels)  # every pixel of an object gets the same class
    # mask features are exactly text embeddings of captions (alignment via text)
    uniq = torch.unique(feats[valid].float(), dim=0)
    obj, keys, classes = teacher._objects(frame)
    decided, _ = teacher._decide(keys, classes, teacher._frame_key(frame))
    captions = teacher.captions(keys, classes, decided)
    text = encoder.encode(captions).half().float()
    assert len(uniq) <= len(set(captions))
    assert (uniq[:, None, :] - text[None]).abs().amax(-1).min(1).values.max() < 1e-6
    # the same objects get the same labels in another frame (different stamp)
    assert np.array_equal(teacher.predicted_classes(frame), teacher.predicted_classes(
        frame_from_image(frame.color, frame.semantic, frame.instance, stamp=99.0)))


def test_per_frame_flips(encoder, frame):
    base = dict(kind="mask", default_error=0.3)
    stable = SimulatedTeacher(SimulatedTeacherConfig(**base, flip_prob=0.0), encoder)
    flipped = SimulatedTeacher(SimulatedTeacherConfig(**base, flip_prob=1.0), encoder)
    p0, p1 = stable.predicted_classes(frame), flipped.predicted_classes(frame)
    has = frame.semantic != IGNORE_LABEL
    correct0 = p0[has] == frame.semantic[has]
    correct1 = p1[has] == frame.semantic[has]
    assert np.array_equal(correct0, ~correct1)  # every decision toggled
    f = 0.2
    some = SimulatedTeacher(SimulatedTeacherConfig(**base, flip_prob=f), encoder)
    changes = [np.mean(some.predicted_classes(frame_from_image(frame.color, frame.semantic, frame.instance,
                                                                stamp=float(s)))[has] != p0[has]) for s in range(6)]
    assert 0.0 < np.mean(changes) < 0.5


def test_per_class_accuracy_follows_configuration(encoder):
    n = 1600
    classes = np.where(np.arange(n) % 2 == 0, CLS["chair"], CLS["table"])
    frame = grid_frame(classes, block=3)
    cfg = SimulatedTeacherConfig(kind="mask", class_error={"chair": 0.3, "table": 0.0}, default_error=0.0,
                                 flip_prob=0.0)
    teacher = SimulatedTeacher(cfg, encoder)
    obj, keys, cls = teacher._objects(frame)
    pred, _ = teacher._decide(keys, cls, 0)
    chair = (cls == CLS["chair"]) & (keys >= 0)
    table = (cls == CLS["table"]) & (keys >= 0)
    assert abs(np.mean(pred[chair] != CLS["chair"]) - 0.3) < 0.05
    assert np.all(pred[table] == CLS["table"])
    assert set(pred[chair][pred[chair] != CLS["chair"]].tolist()) <= {CLS["sofa"], CLS["otherfurniture"]}
    rates = teacher.class_error_rates()
    assert rates["chair"] == 0.3 and rates["table"] == 0.0 and rates["sofa"] == 0.0
    acc = teacher.expected_accuracy()
    assert acc.shape == (20,) and abs(acc[CLS["chair"]] - 0.7) < 1e-12
    # pixel level, through the features, for the dense teacher too
    dense = SimulatedTeacher(SimulatedTeacherConfig(kind="dense", class_error={"chair": 0.3, "table": 0.0},
                                                    default_error=0.0, flip_prob=0.0, pixel_error=0.0, blur_px=0.0),
                             encoder)
    feats, valid = dense.features(frame)
    p = argmax_class(feats, encoder)
    sem = frame.semantic
    assert abs(np.mean(p[sem == CLS["chair"]] != CLS["chair"]) - 0.3) < 0.05
    assert np.mean(p[sem == CLS["table"]] == CLS["table"]) > 0.99


def test_dense_teacher_noise_and_blur(encoder, frame):
    teacher = SimulatedTeacher(SimulatedTeacherConfig(kind="dense", default_error=0.0, flip_prob=0.0,
                                                      pixel_error=0.0, blur_px=0.0), encoder)
    feats, valid = teacher.features(frame)
    inst = frame.instance
    f = feats.float()
    some = inst == inst[inst >= 0][0]
    block = f[torch.from_numpy(some)]
    assert block.std(dim=0).mean() > 1e-3  # per-pixel noise
    assert np.mean(argmax_class(feats, encoder)[frame.semantic != IGNORE_LABEL] ==
                   frame.semantic[frame.semantic != IGNORE_LABEL]) > 0.99
    blurred = SimulatedTeacher(SimulatedTeacherConfig(kind="dense", default_error=0.0, flip_prob=0.0,
                                                      pixel_error=0.0, blur_px=2.0), encoder)
    p = argmax_class(blurred.features(frame)[0], encoder)
    has = frame.semantic != IGNORE_LABEL
    acc = np.mean(p[has] == frame.semantic[has])
    assert 0.7 < acc < 0.99  # boundaries are blurred, interiors are right


def test_mask_teacher_leaves_gaps_and_misses(encoder, frame):
    teacher = SimulatedTeacher(SimulatedTeacherConfig(kind="mask", gap_prob=1.0, miss_prob=0.0, boundary_px=0.0),
                               encoder)
    _, valid = teacher.features(frame)
    has = frame.semantic != IGNORE_LABEL
    assert 0.5 < valid.numpy()[has].mean() < 0.95
    missing = SimulatedTeacher(SimulatedTeacherConfig(kind="mask", miss_prob=1.0), encoder)
    assert not missing.features(frame)[1].any()


def test_pair_is_good_at_different_classes(encoder, frame):
    dense, mask = make_simulated_pair(encoder, seed=3)
    assert dense.name != mask.name and dense.kind == "dense" and mask.kind == "mask"
    da, ma = dense.expected_accuracy(), mask.expected_accuracy()
    for name in DENSE_CLASS_ERROR:
        assert da[CLS[name]] < ma[CLS[name]], name
    for name in MASK_CLASS_ERROR:
        assert ma[CLS[name]] < da[CLS[name]], name
    for t in (dense, mask):
        feats, valid = t.features(frame)
        assert feats.shape[-1] == 128 and valid.any()


def test_other_vocabulary():
    enc = SyntheticTextEncoder(MATTERPORT_40, dim=64)
    dense, mask = make_simulated_pair(enc, seed=0)
    assert dense.config.vocabulary == MATTERPORT_40
    rng = np.random.default_rng(0)
    f = grid_frame(rng.integers(0, 40, 30))
    for t in (dense, mask):
        feats, valid = t.features(f)
        assert feats.shape == (*f.semantic.shape, 64)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        SimulatedTeacher(SimulatedTeacherConfig(vocabulary=SCANNET_20[:5], class_error={"sink": 0.5}),
                         SyntheticTextEncoder())


def test_bad_input(encoder):
    teacher = SimulatedTeacher(SimulatedTeacherConfig(), encoder)
    with pytest.raises(ValueError, match="semantic"):
        teacher.features(frame_from_image(np.zeros((4, 4, 3), np.uint8)))
    bad = grid_frame([CLS["chair"]])
    bad.semantic[0, 0] = 40
    with pytest.raises(ValueError, match="outside"):
        teacher.features(bad)
    with pytest.raises(ValueError):
        SimulatedTeacherConfig(kind="pixel")
    with pytest.raises(ValueError):
        SimulatedTeacherConfig(flip_prob=1.5)


def test_hash_uniform_is_vectorised_and_uniform():
    u = hash_uniform(0, 1, np.arange(20000), 3)
    assert u.shape == (20000,) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u, hash_uniform(0, 1, np.arange(20000), 3))


def test_on_synthetic_world_frames(encoder):
    synthetic = pytest.importorskip("sas_core.data.synthetic")
    scene = synthetic.generate_scene(synthetic.SynthConfig(seed=0, n_frames=2, with_lidar=False, width=160,
                                                           height=120, points_per_m2=50))
    enc = SyntheticTextEncoder(dim=64)
    dense, mask = make_simulated_pair(enc, seed=0)
    text = enc.encode(list(SCANNET_20))
    for t in (dense, mask):
        for fr in scene.frames:
            feats, valid = t.features(fr)
            check_teacher_output(feats, valid, 120, 160, 64)
            has = valid.numpy() & (fr.semantic != IGNORE_LABEL)
            acc = np.mean((feats.float() @ text.T).argmax(-1).numpy()[has] == fr.semantic[has])
            assert acc > 0.2  # mostly right, with realistic mistakes
