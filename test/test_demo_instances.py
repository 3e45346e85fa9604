"""The demo's instance picture and rows on a small synthetic room (the full demo runs in test_demo)."""

import numpy as np


def test_instances_picture_on_a_small_room(tmp_path):
    from sas_app.demo import instances_png
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.instances import InstanceConfig
    from sas_core.instances.synthetic import simulated_teachers, synthetic_instances
    from sas_core.text import SCANNET_20, SyntheticTextEncoder, class_embeddings

    scene = generate_scene(SynthConfig(seed=2, n_frames=10, width=160, height=120, with_lidar=False,
                                       points_per_m2=150, room_min=(4.0, 3.5), room_max=(4.5, 4.0)))
    names = list(SCANNET_20)
    enc = SyntheticTextEncoder(names, dim=16, seed=0)
    text = class_embeddings(enc, names).float().numpy()
    inst, _, _ = synthetic_instances(scene, enc, names, text, masks="oracle", teachers=simulated_teachers(enc, 2),
                                     config=InstanceConfig(min_points=30))
    assert len(inst) >= 5 and all(i.name in names for i in inst)
    path = tmp_path / "instances.png"
    instances_png(scene.points.positions, inst, path, "test room - SYNTHETIC", mask=scene.points.labels != 255)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] >= 600 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # coloured, not blank
