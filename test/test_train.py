"""Distillation: losses against hand-computed values, TESD state, one step, resume."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sas_core.train.losses import (  # noqa: E402
    point_loss,
    segment_mean,
    superpoint_distillation_loss,
    superpoint_targets,
    tesd_loss,
    text_logits,
)
from sas_core.train.tesd import TemporalEnsemble  # noqa: E402



@pytest.fixture(autouse=True)
def _one_thread():
    """Small sparse convolutions are dominated by thread synchronisation on a shared 2-core
    machine (one training step of the tiny model: 20 s with 2 threads under load, 0.4 s with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


F3D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
F2D = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
SEG = torch.tensor([7, 7, 3])  # arbitrary ids: superpoint {0, 1} and {2}


def test_segment_mean_by_hand():
    means, counts = segment_mean(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([1, 1, 0]))
    assert torch.allclose(means, torch.tensor([[5.0, 6.0], [2.0, 3.0]]))
    assert counts.tolist() == [1.0, 2.0]


def test_point_loss_by_hand():
    # cos = 1, 0, 1/sqrt(2)  ->  losses 0, 1, 1 - 1/sqrt(2)
    expected = (0.0 + 1.0 + (1 - 1 / math.sqrt(2))) / 3
    assert point_loss(F3D, F2D).item() == pytest.approx(expected, abs=1e-6)
    total, count = point_loss(F3D, F2D, reduction="sum")
    assert count == 3 and total.item() == pytest.approx(expected * 3, abs=1e-6)
    with pytest.raises(ValueError):
        point_loss(F3D, F2D[:2])


def test_superpoint_losses_by_hand():
    # superpoint {0,1}: 2D mean (1, 0), 3D mean (0.5, 0.5); superpoint {2}: 2D (0, 1), 3D (1, 1)
    c = 1 - 1 / math.sqrt(2)
    lp, lsp = superpoint_distillation_loss(F3D, F2D, SEG)
    # point level against the superpoint mean of the 2D targets: 0, 1, c
    assert lp.item() == pytest.approx((0 + 1 + c) / 3, abs=1e-6)
    assert lsp.item() == pytest.approx((c + c) / 2, abs=1e-6)
    assert torch.allclose(superpoint_targets(F2D, SEG), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))


def test_superpoint_loss_equals_point_loss_when_every_point_is_a_superpoint():
    seg = torch.arange(3)
    lp, lsp = superpoint_distillation_loss(F3D, F2D, seg)
    assert lp.item() == pytest.approx(point_loss(F3D, F2D).item())
    assert lsp.item() == pytest.approx(point_loss(F3D, F2D).item())


def test_tesd_loss_by_hand():
    text = torch.eye(2)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    seg = torch.tensor([0, 1])
    labels = torch.tensor([0, 0])
    lp, lsp = tesd_loss(f, seg, labels, torch.tensor([0, 0]), text, temperature=1.0)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert lp.item() == pytest.approx(expected, abs=1e-6)
    assert lsp.item() == pytest.approx(expected, abs=1e-6)
    # temperature scales the cosine logits; None is the raw dot product of the public code
    assert torch.allclose(text_logits(2 * f, text, 0.5), 2 * f)
    assert torch.allclose(text_logits(2 * f, text, None), 2 * f)
    with pytest.raises(ValueError):
        tesd_loss(f, seg, labels, torch.tensor([0]), text)


def test_temporal_ensemble_ema_pseudo_labels_and_state(tmp_path):
    ens = TemporalEnsemble(alpha=0.5)
    seg = torch.tensor([0, 0, 1])
    ens.initialize("s", torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0]]), superpoints=seg)
    assert ens.get("s").dtype == torch.float16
    assert torch.allclose(ens.get("s").float(), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 4.0]]))
    new = ens.update("s", torch.tensor([[0.0, 2.0], [0.0, 2.0]]), index=torch.tensor([0, 1]))
    assert torch.allclose(new, torch.tensor([[0.5, 1.0], [0.5, 1.0]]))
    assert torch.allclose(ens.get("s")[2].float(), torch.tensor([0.0, 4.0]))  # untouched row
    hist = torch.tensor([[3.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    p, sp = TemporalEnsemble.pseudo_labels(hist, seg, torch.eye(2))
    assert sp.tolist() == [0, 1] and p.tolist() == [0, 0, 1]  # superpoint 0 mean (1.5, 1) -> class 0 for both points
    p, _ = TemporalEnsemble.pseudo_labels(hist, seg, torch.eye(2), point_from_superpoint=False)
    assert p.tolist() == [0, 1, 1]  # eq. 12 per point
    # state round trip, in memory and offloaded to disk
    state = ens.state_dict()
    disk = TemporalEnsemble(alpha=0.1, offload_dir=tmp_path / "hist")
    disk.load_state_dict(state)
    assert disk.alpha == 0.5 and disk.scenes() == ["s"]
    assert torch.equal(disk.get("s"), ens.get("s"))
    with pytest.raises(ValueError):
        TemporalEnsemble(alpha=1.0)


# ------------------------------------------------------------------------------------------------
# the training loop on tiny scenes with a small real MinkUNet

K_CLASSES, DIM = 3, 8


def tiny_scenes(n_scenes=2, n_points=300, seed=0):
    """Scenes in a 4 m cube: class = x-slab, 2D features = noisy class vectors, 3x3 superpoint grid."""
    from sas_core.train.datasets import scene_from_arrays

    rng = np.random.default_rng(seed)
    text = torch.nn.functional.normalize(torch.randn(K_CLASSES, DIM, generator=torch.Generator().manual_seed(1)), dim=1)
    scenes = []
    for s in range(n_scenes):
        p = rng.uniform(0, 4, (n_points, 3)).astype(np.float32)
        lab = np.minimum((p[:, 0] / 4 * K_CLASSES).astype(np.int64), K_CLASSES - 1)
        feats = text[lab].numpy() + 0.3 * rng.normal(size=(n_points, DIM))
        mask = rng.random(n_points) > 0.1
        sp = (np.floor(p[:, 0] / 4 * 3) * 3 + np.floor(p[:, 1] / 4 * 3)).astype(np.int64)
        scenes.append(scene_from_arrays(f"scene{s}", p, feats, mask, sp, lab))
    return scenes, text


def tiny_config(tmp_path, **kw):
    from sas_core.train.distill import DistillConfig

    base = dict(arch="MinkUNet14A", epochs=4, stage2_fraction=0.5, batch_size=1, lr=1e-3, final_lr=1e-4,
                voxel_size=0.25, out_dir=str(tmp_path), progress=False, val_every=0, tesd_alpha=0.5)
    base.update(kw)
    return DistillConfig(**base)


def test_one_training_step_reduces_the_loss_on_a_fixed_batch(tmp_path):
    from sas_core.train.distill import Distiller

    scenes, text = tiny_scenes(1)
    d = Distiller(tiny_config(tmp_path, mode="sp"), scenes, text, ["a", "b", "c"])
    batch = d.batch([0], epoch=0)
    d.model.eval()  # fixed BatchNorm statistics: the same function before and after the step
    with torch.no_grad():
        before = d.losses(batch, 0, 0, tesd=False)["loss"].item()
    d.optimizer.zero_grad()
    d.losses(batch, 0, 0, tesd=False)["loss"].backward()
    d.optimizer.step()
    with torch.no_grad():
        after = d.losses(batch, 0, 0, tesd=False)["loss"].item()
    assert after < before - 1e-4, (before, after)


def test_schedule_and_modes(tmp_path):
    from sas_core.train.distill import DistillConfig

    assert DistillConfig(epochs=100).stage1_epochs == 70
    assert DistillConfig(epochs=100, mode="sp").stage1_epochs == 100
    with pytest.raises(ValueError):
        DistillConfig(mode="nope")
    from sas_core.train.distill import Distiller

    scenes, text = tiny_scenes(1)
    d = Distiller(tiny_config(tmp_path, epochs=3, lr=1e-4, final_lr=1e-5), scenes, text, ["a", "b", "c"])
    lrs = []
    for _ in range(3):
        lrs.append(d.optimizer.param_groups[0]["lr"])
        d.optimizer.step()
        d.scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5)  # linear 1e-4 -> 1e-5
    with pytest.raises(ValueError):  # features and text of different sizes
        Distiller(tiny_config(tmp_path), scenes, text[:, :4], ["a", "b", "c"])


def test_collate_aligns_voxels_with_points_targets_and_superpoints():
    """Each voxel carries the target / superpoint / label of its representative point, and every point
    maps (inverse) to the voxel that contains it (with and without augmentation)."""
    from sas_core.train.datasets import DataConfig, VoxelDataset, collate

    scenes, _ = tiny_scenes(1, n_points=400)
    scene = scenes[0]
    rows = scene.feature_rows()
    for augment in (False, True):
        ds = VoxelDataset([scene], DataConfig(voxel_size=0.25, augment=augment), seed=3)
        smp = ds.sample(0, epoch=1)
        b = collate([smp], [scene], feature_dim=DIM)
        assert b.n_voxels == len(smp.first) and len(smp.inverse) == scene.n_points
        assert np.array_equal(smp.inverse[smp.first], np.arange(b.n_voxels))  # representative point is inside
        has = rows[smp.first] >= 0
        assert np.array_equal(b.supervised.numpy(), has)
        np.testing.assert_allclose(b.target.numpy()[has], scene.features[rows[smp.first][has]].astype(np.float32))
        assert np.array_equal(b.labels.numpy(), scene.labels[smp.first])
        sp = b.superpoints.numpy()  # same voxel superpoint <=> same scene superpoint of the representatives
        same_b = sp[:, None] == sp[None, :]
        same_s = scene.superpoints[smp.first][:, None] == scene.superpoints[smp.first][None, :]
        assert np.array_equal(same_b, same_s)
        if not augment:  # plain voxelisation: a point's voxel is floor(p / size) - min
            q = np.floor(scene.positions / 0.25).astype(np.int64)
            assert np.array_equal(smp.coords[smp.inverse], q - q.min(0))


def test_transductive_fit_on_the_training_scene(tmp_path):
    """Without augmentation, a short distillation labels its own training scene like the targets do
    (guards the voxel<->point mapping of training and inference and the loss sign)."""
    from sas_core.train.distill import Distiller, predict_labels, scene_point_features

    scenes, text = tiny_scenes(1, n_points=400)
    scene = scenes[0]
    cfg = tiny_config(tmp_path, mode="sp", epochs=25, lr=1e-2, final_lr=1e-3, augment=False, voxel_size=0.1)
    model = Distiller(cfg, scenes, text, ["a", "b", "c"]).run().model
    pred = predict_labels(scene_point_features(model, scene, cfg.voxel_size), text)
    target = predict_labels(torch.from_numpy(scene.features.astype(np.float32)), text)
    agree = (pred[scene.mask] == target).mean()
    assert agree > 0.9, agree
    assert (pred == scene.labels).mean() > 0.85


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path):
    from sas_core.train.distill import Distiller

    scenes, text = tiny_scenes(2, n_points=200)
    names = ["a", "b", "c"]
    # 3 epochs: stage 1 = epoch 1, TESD in epochs 2-3; one step of two scenes per epoch
    kw = dict(epochs=3, stage2_fraction=2 / 3, batch_size=2, val_every=3)
    full = Distiller(tiny_config(tmp_path / "full", **kw), scenes, text, names, scenes[:1])
    full.run()
    assert full.epoch == 3 and len(full.tesd.scenes()) == 2
    # interrupted after epoch 2 (inside stage 2: the TESD history must survive), then a new process resumes
    Distiller(tiny_config(tmp_path / "cut", **kw), scenes, text, names, scenes[:1]).run(stop_after_epochs=2)
    resumed = Distiller(tiny_config(tmp_path / "cut", **kw), scenes, text, names, scenes[:1])
    assert resumed.epoch == 0
    resumed.run()
    assert resumed.epoch == 3
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert full.scheduler.state_dict() == resumed.scheduler.state_dict()
    for name in full.tesd.scenes():
        assert torch.equal(full.tesd.get(name), resumed.tesd.get(name))
    assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history])
    # the log has one line per epoch and one per step
    lines = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert sum(x["kind"] == "epoch" for x in lines) == 3 and sum(x["kind"] == "step" for x in lines) == 3
    assert "val_miou" in lines[-1] and lines[-1]["tesd"] and not lines[1]["tesd"]
    # the checkpoint rebuilds the network and says which text space it lives in
    from sas_core.nn import load_checkpoint

    model, config, extra = load_checkpoint(tmp_path / "full" / "last.pt")
    assert config["vocabulary"] == names and config["out_channels"] == DIM and extra["epoch"] == 3


def test_openscene_layout_dataset(tmp_path):
    from sas_core.train.datasets import DataConfig, OpenSceneScenes, VoxelDataset, collate

    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    (tmp_path / "feat").mkdir()
    n = 200
    coords = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    torch.save((coords, rng.uniform(-1, 1, (n, 3)).astype(np.float32), np.full(n, 255)), tmp_path / "train" / "room.pth")
    mask = np.arange(n) % 2 == 0
    feat = torch.randn(int(mask.sum()), DIM).half()
    from sas_core.data import fused_features

    fused_features.save_fused_features(tmp_path / "feat" / "room_0.pt", feat, torch.from_numpy(mask))
    scenes = OpenSceneScenes(tmp_path, "train", tmp_path / "feat", superpoints="points")
    scene = scenes[0]
    assert scene.name == "room" and scene.n_points == n and scene.feature_dim == DIM
    assert np.array_equal(scene.superpoints, np.arange(n))
    ds = VoxelDataset(scenes, DataConfig(voxel_size=0.2))
    a, b = ds.sample(0, epoch=1), ds.sample(0, epoch=1)
    assert np.array_equal(a.coords, b.coords)  # deterministic per (seed, epoch, scene)
    assert not np.array_equal(ds.sample(0, epoch=2).coords, a.coords)
    batch = collate([a, a], [scene, scene])
    assert batch.coords.shape[1] == 4 and set(batch.coords[:, 0].tolist()) == {0, 1}
    rows = scene.feature_rows()[a.first]
    assert torch.allclose(batch.target[: len(a.first)][rows >= 0], feat[rows[rows >= 0]].float())
    assert batch.supervised[: len(a.first)].numpy().tolist() == (rows >= 0).tolist()
    # superpoint ids of the two scenes do not collide
    m = len(a.first)
    assert not set(batch.superpoints[:m].tolist()) & set(batch.superpoints[m:].tolist())
    with pytest.raises(FileNotFoundError):
        OpenSceneScenes(tmp_path, "val")


def test_sas_distill_command_on_an_openscene_layout(tmp_path, capsys):
    from conftest import tiny_openscene
    from sas_app.cli import main

    tiny_openscene(tmp_path)
    out = tmp_path / "run"
    rc = main(["distill", "--data", str(tmp_path), "--features", str(tmp_path / "feat"), "--superpoints", "points",
               "--text-encoder", "synthetic", "--text-dim", "16", "--arch", "MinkUNet14A", "--epochs", "1",
               "--voxel-size", "0.25", "--out", str(out), "--quiet", "--threads", "1"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checkpoint"] == str(out / "last.pt") and "val_miou" in printed["last"]
    assert (out / "last.pt").is_file() and (out / "log.jsonl").is_file()
    # a missing feature folder is one clear error
    assert main(["distill", "--data", str(tmp_path), "--features", str(tmp_path / "nope"), "--text-encoder",
                 "synthetic", "--out", str(out)]) == 1


def test_mesh_superpoints_of_the_synthetic_world_never_cross_objects():
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.train.datasets import synthetic_scene_data

    scene = generate_scene(SynthConfig(seed=3, n_frames=1, width=32, height=24, with_lidar=False, points_per_m2=30,
                                       room_min=(3.6, 3.0), room_max=(4.0, 3.5)))
    data = synthetic_scene_data(scene, superpoint_mode="mesh")
    sp, inst = data.superpoints, scene.points.instances
    assert len(np.unique(sp)) > 10
    # every superpoint holds points of one instance only (the mesh parts are separate components)
    pairs = np.unique(np.stack([sp, inst]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]


def test_sas_distill_takes_the_text_space_sas_fuse_recorded(tmp_path, capsys):
    """Without --text-encoder, distill uses the features folder's text_space.json (what sas fuse wrote);
    a flag naming another space is one clear error."""
    from conftest import tiny_openscene
    from sas_app.cli import main
    from sas_core.data.fused_features import write_text_space
    from sas_core.text import SCANNET_20, SyntheticTextEncoder

    tiny_openscene(tmp_path)
    write_text_space(tmp_path / "feat", SyntheticTextEncoder(SCANNET_20, dim=16).config(), "sim_dense")
    base = ["distill", "--data", str(tmp_path), "--features", str(tmp_path / "feat"), "--superpoints", "points",
            "--arch", "MinkUNet14A", "--epochs", "1", "--voxel-size", "0.25", "--quiet", "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "run")]) == 0  # no --text-encoder, no --text-dim: the record's
    capsys.readouterr()
    from sas_core.nn import load_checkpoint

    _, config, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert json.dumps(config).count('"dim": 16') >= 1
    assert main(base + ["--out", str(tmp_path / "run2"), "--text-encoder", "open_clip"]) == 1
    assert "drop the flag" in capsys.readouterr().err


def test_sp_tesd_branched_from_the_sp_run_is_bit_identical_to_a_run_from_scratch(tmp_path):
    """Stage 1 of SP+TESD is the SP run's prefix (same seed, schedule, samples): branching the TESD run
    from the SP run's checkpoint at the TESD start (what the demo and the generalisation bench do, so
    stage 1 is trained once) gives exactly the weights, optimiser state and TESD history of a run
    from scratch."""
    import shutil

    from sas_core.train.distill import Distiller

    scenes, text = tiny_scenes(2, n_points=200)
    names = ["a", "b", "c"]
    kw = dict(epochs=4, stage2_fraction=0.5, augment=True, lr_schedule="onecycle", warmup_fraction=0.25)
    scratch = Distiller(tiny_config(tmp_path / "scratch", mode="sp_tesd", keep_epochs=True, **kw), scenes, text, names)
    scratch.run()
    sp = Distiller(tiny_config(tmp_path / "sp", mode="sp", **kw), scenes, text, names)
    sp.run(stop_after_epochs=scratch.cfg.stage1_epochs)
    assert sp.epoch == 2
    from sas_core.nn import load_checkpoint

    prefix, _, _ = load_checkpoint(tmp_path / "scratch" / "epoch_002.pt")
    for (k, a), (_, b) in zip(prefix.state_dict().items(), sp.model.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "branch").mkdir()
    shutil.copyfile(tmp_path / "sp" / "last.pt", tmp_path / "branch" / "last.pt")
    branch = Distiller(tiny_config(tmp_path / "branch", mode="sp_tesd", **kw), scenes, text, names)
    branch.run()
    assert branch.epoch == 4 and branch.history[-1]["tesd"]
    for (k, a), (_, b) in zip(scratch.model.state_dict().items(), branch.model.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = scratch.optimizer.state_dict()["state"], branch.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    for name in scratch.tesd.scenes():
        assert torch.equal(scratch.tesd.get(name), branch.tesd.get(name))
    # the SP run goes on from its prefix to its own end (no TESD), a different network
    sp.run()
    assert sp.epoch == 4 and not any(h["tesd"] for h in sp.history)
    assert any(not torch.equal(a, b) for a, b in zip(sp.model.parameters(), branch.model.parameters()))


def test_lr_schedules(tmp_path):
    from sas_core.train.distill import DistillConfig, Distiller, lr_factor

    lin = [lr_factor(s, 11, 0.1) for s in range(11)]
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(lin, lin[1:]))
    one = [lr_factor(s, 101, 0.01, "onecycle", warmup=0.2) for s in range(101)]
    assert one[0] == pytest.approx(0.01) and one[20] == pytest.approx(1.0) and one[-1] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(one[:20], one[1:21]))  # warm-up rises
    assert all(a > b for a, b in zip(one[20:], one[21:]))  # then the cosine falls to the end
    assert one[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half way down the cosine: the mid value
    with pytest.raises(ValueError, match="lr_schedule"):
        DistillConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="warmup"):
        DistillConfig(warmup_fraction=1.0)
    # the trainer's scheduler follows it: lr after each step of a 2-scene, 2-epoch run
    scenes, text = tiny_scenes(2, n_points=100)
    d = Distiller(tiny_config(tmp_path, mode="sp", epochs=2, lr=1e-2, final_lr=1e-4,
                              lr_schedule="onecycle", warmup_fraction=0.5), scenes, text, ["a", "b", "c"])
    seen = []
    for step in range(4):
        seen.append(d.scheduler.get_last_lr()[0])
        d.train_step(d.batch([step % 2], 0), 0, step, tesd=False)
    assert seen == pytest.approx([1e-2 * lr_factor(s, 4, 1e-2, "onecycle", 0.5) for s in range(4)])


def test_a_branched_tesd_run_keeps_its_own_ema_constant(tmp_path):
    """The TESD constant comes from the run's config, not from the checkpoint it starts from (an SP+TESD
    row branched from the SP run's checkpoint, alpha 0.99 there, must run with its own alpha)."""
    import shutil

    from sas_core.train.distill import Distiller

    scenes, text = tiny_scenes(2, n_points=150)
    names = ["a", "b", "c"]
    kw = dict(epochs=2, stage2_fraction=0.5)
    Distiller(tiny_config(tmp_path / "sp", mode="sp", tesd_alpha=0.99, **kw), scenes, text, names).run(
        stop_after_epochs=1)
    ens = {}
    for alpha in (0.0, 0.5):
        out = tmp_path / f"a{alpha}"
        out.mkdir()
        shutil.copyfile(tmp_path / "sp" / "last.pt", out / "last.pt")
        d = Distiller(tiny_config(out, mode="sp_tesd", tesd_alpha=alpha, **kw), scenes, text, names)
        d.run()
        assert d.tesd.alpha == alpha
        ens[alpha] = {n: d.tesd.get(n).float() for n in d.tesd.scenes()}
    # alpha 0: the history is the last output itself; 0.5: half of it is the superpoint-mean initialisation
    assert any(not torch.equal(ens[0.0][n], ens[0.5][n]) for n in ens[0.0])


def test_tesd_temperature_zero_is_the_raw_dot_product_of_the_public_code(tmp_path, monkeypatch):
    """``tesd_temperature = 0`` (a CLI / ROS-friendly float) reaches the TESD loss as None: raw logits f . text."""
    from sas_core.train import losses
    from sas_core.train.distill import DistillConfig, Distiller

    with pytest.raises(ValueError, match="tesd_temperature"):
        DistillConfig(tesd_temperature=-0.1)
    scenes, text = tiny_scenes(2, n_points=120)
    seen = []
    real = losses.tesd_loss

    def spy(*args, **kw):
        seen.append(args[5])
        return real(*args, **kw)

    monkeypatch.setattr(losses, "tesd_loss", spy)
    for temperature in (0.0, 0.07):
        d = Distiller(tiny_config(tmp_path / str(temperature), mode="sp_tesd", epochs=1, stage2_fraction=1.0,
                                  tesd_temperature=temperature), scenes, text, ["a", "b", "c"])
        d.initialize_tesd()
        res = d.losses(d.batch([0], 0), 0, 0, tesd=True)
        assert res["tesd_point"] > 0
    assert seen == [None, 0.07]


def test_tesd_diagnostics_by_hand(tmp_path):
    """tesd_fit: the network's argmax equals its pseudo-label; pseudo / net accuracy against the known labels."""
    from sas_core.train.distill import Distiller
    from sas_core.types import IGNORE_LABEL

    scenes, text = tiny_scenes(1, n_points=60)
    d = Distiller(tiny_config(tmp_path, mode="sp_tesd", epochs=1), scenes, text, ["a", "b", "c"])
    d.text = torch.eye(3)  # class k = axis k
    out = torch.tensor([[2.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0], [0, 0, 1.0]])  # argmax 0, 1, 2, 2
    pseudo = torch.tensor([0, 1, 1, 2])
    labels = torch.tensor([0, 0, 1, IGNORE_LABEL])
    res = d._tesd_diagnostics(out, pseudo, labels)
    assert res["tesd_fit"] == pytest.approx(3 / 4)
    assert res["tesd_pseudo_acc"] == pytest.approx(2 / 3)  # pseudo 0, 1, 1 against 0, 0, 1
    assert res["tesd_net_acc"] == pytest.approx(1 / 3)  # net 0, 1, 2 against 0, 0, 1
    none = d._tesd_diagnostics(out, pseudo, torch.full((4,), IGNORE_LABEL))
    assert none["tesd_fit"] == pytest.approx(3 / 4) and math.isnan(none["tesd_pseudo_acc"])


def test_class_balanced_tesd_weighs_every_pseudo_class_the_same():
    from sas_core.train.losses import class_balance_weights

    labels = torch.tensor([0, 0, 0, 1])
    w = class_balance_weights(labels)
    assert w.tolist() == pytest.approx([4 / 6, 4 / 6, 4 / 6, 2.0]) and w.sum().item() == pytest.approx(4.0)
    text = torch.eye(2)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # all say class 0
    seg = torch.arange(4)
    plain, _ = tesd_loss(f, seg, labels, labels, text, temperature=1.0)
    bal, bal_sp = tesd_loss(f, seg, labels, labels, text, temperature=1.0, balance=True)
    right, wrong = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    assert plain.item() == pytest.approx((3 * right + wrong) / 4, abs=1e-6)
    assert bal.item() == pytest.approx((right + wrong) / 2, abs=1e-6)  # the one class-1 point weighs 3 class-0 ones
    assert bal_sp.item() == pytest.approx(bal.item(), abs=1e-6)


def test_fused_guided_pseudo_labels_take_the_2d_label_where_it_scores_higher():
    """tesd_guide (not in the paper): per superpoint, OpenScene's rule between the ensemble and the fused 2D mean."""
    text = torch.eye(3)
    seg = torch.tensor([0, 0, 1, 1, 2])
    ens = torch.tensor([[1.0, 0.2, 0], [1.0, 0.2, 0], [0, 1.0, 0.9], [0, 1.0, 0.9], [1.0, 0, 0]])
    fused = torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [0, 0, 1.0], [0, 0, 0], [0, 1.0, 0]])
    sup = torch.tensor([True, True, True, False, False])
    plain_p, plain_sp = TemporalEnsemble.pseudo_labels(ens, seg, text)
    assert plain_sp.tolist() == [0, 1, 0]
    p, sp = TemporalEnsemble.pseudo_labels(ens, seg, text, fused=fused, supervised=sup)
    # sp 0: fused cos 1.0 > ensemble 0.98 -> 2; sp 1: its one supervised voxel says 2 (cos 1 > 0.74) -> 2;
    # sp 2: no supervised voxel -> the ensemble's 0
    assert sp.tolist() == [2, 2, 0] and p.tolist() == [2, 2, 2, 2, 0]
    with pytest.raises(ValueError, match="scene-level"):
        TemporalEnsemble.pseudo_labels(ens, seg, text, allowed=torch.ones(5, 3, dtype=torch.bool), fused=fused,
                                       supervised=sup)
