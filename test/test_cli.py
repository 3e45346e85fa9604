"""The `sas` CLI: every subcommand has help; unknown benchmarks fail clearly."""

import subprocess
import sys
from pathlib import Path

import pytest

from sas_app import cli

ROOT = Path(__file__).resolve().parents[1]


def run_sas(*args):
    return subprocess.run([sys.executable, "-m", "sas_app.cli", *args], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_subcommand_has_help(command):
    out = run_sas(command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"usage: sas {command}" in out.stdout


def test_top_level_help_lists_commands():
    out = run_sas("--help")
    assert out.returncode == 0
    for command in cli.COMMANDS:
        assert command in out.stdout


def test_unknown_benchmark_is_a_clear_error():
    out = run_sas("bench", "no-such-bench")
    assert out.returncode == 1
    assert "unknown benchmark 'no-such-bench'" in out.stderr


def test_bench_json_flag_after_name(monkeypatch, capsys, tmp_path):
    import sas_app.bench

    (tmp_path / "tiny.py").write_text("def main(argv):\n    return {'argv': argv}\n")
    monkeypatch.setattr(sas_app.bench, "__path__", [*sas_app.bench.__path__, str(tmp_path)])
    assert cli.main(["bench", "tiny", "--json", "--quick"]) == 0
    assert '"argv": [\n    "--quick"\n  ]' in capsys.readouterr().out


# ---- one config mechanism: flags generated from the dataclasses carry their defaults

def _configs():
    """command -> [(dataclass, flag prefix, fields the command takes from it (None: all))]."""
    from sas_app.demo import DemoConfig
    from sas_core.capability.diffusion import DiffusionConfig
    from sas_core.capability.pseudo_masks import PseudoMaskConfig
    from sas_core.data.synthetic import SynthConfig
    from sas_core.geometry.multiview import MultiViewFusionConfig
    from sas_core.infer import InferenceConfig
    from sas_core.teachers.dense_clip import DenseClipConfig
    from sas_core.teachers.mask_teacher import MaskTeacherConfig
    from sas_core.train.distill import DistillConfig

    inference = [(InferenceConfig, "", ("max_voxels", "chunk_margin", "point_chunk", "fp16_matmul_on_cpu",
                                        "precision"))]
    return {
        "synth": [(SynthConfig, "", ("seed", "n_frames", "width", "height", "points_per_m2", "with_lidar",
                                        "sensor"))],
        "fuse": [(MaskTeacherConfig, "", ("clip_model", "clip_checkpoint", "sam_model", "sam_checkpoint", "device")),
                 (DenseClipConfig, "clip-", ("model", "checkpoint", "recipe")),
                 (MultiViewFusionConfig, "", None), (SynthConfig, "", ("seed", "n_frames", "points_per_m2"))],
        "capability": [(DenseClipConfig, "clip-", ("model", "checkpoint", "recipe")), (DiffusionConfig, "", None),
                       (PseudoMaskConfig, "", None)],
        "distill": [(DenseClipConfig, "clip-", ("model", "checkpoint")), (DistillConfig, "", None)],
        "eval": inference, "segment": inference, "query": inference,
        "demo": [(DemoConfig, "", None)],
    }


def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flaggable(cls, f):
    import dataclasses

    from sas_core.config import _optional_type

    d = f.default
    if d is dataclasses.MISSING or isinstance(d, dict):
        return False
    if d is None:
        return _optional_type(cls, f.name) is not None
    return not (isinstance(d, tuple) and any(isinstance(v, (tuple, list, dict)) or v is None for v in d))


def test_every_flag_of_a_config_field_has_the_field_default():
    """Walk every subcommand: a flag whose dest is a field of a config the command uses has that
    field's default, and every field the command takes from the config has a flag."""
    import argparse

    from sas_core.config import config_fields

    subs = _subparsers(cli.build_parser(lazy=False))
    assert set(subs) == set(cli.COMMANDS)
    configs = _configs()
    checked = 0
    for command, sub in subs.items():
        actions = {}
        for a in sub._actions:
            if a.default is not argparse.SUPPRESS:
                actions.setdefault(a.dest, a)
        for cls, prefix, only in configs.get(command, []):
            for f in config_fields(cls):
                if only is not None and f.name not in only:
                    continue
                dest = prefix.replace("-", "_") + f.name
                if dest not in actions:
                    assert not _flaggable(cls, f), f"sas {command}: no flag for {cls.__name__}.{f.name}"
                    continue
                default = actions[dest].default
                if isinstance(f.default, tuple) and isinstance(default, list):
                    default = tuple(default)
                assert default == f.default, (f"sas {command} {actions[dest].option_strings[0]}: default "
                                              f"{default!r}, {cls.__name__}.{f.name} = {f.default!r}")
                checked += 1
    assert checked > 100  # the walk really compared flags


def test_one_flag_name_per_concept():
    subs = _subparsers(cli.build_parser(lazy=False))
    base = {"fuse": [], "capability": ["-o", "x"], "distill": ["--data", "d", "--features", "f"], "eval": [],
            "segment": ["cloud.ply"], "synth": ["--out", "x"]}
    for command in ("fuse", "capability", "distill", "eval", "segment"):
        args = subs[command].parse_args(base[command] + ["--vocab", "matterport21"])
        assert args.vocabulary == "matterport21", command
        assert subs[command].parse_args(base[command] + ["--vocabulary", "nuscenes16"]).vocabulary == "nuscenes16"
    for command in ("fuse", "synth"):
        assert subs[command].parse_args(base[command] + ["--frames", "7"]).n_frames == 7
        assert subs[command].parse_args(base[command] + ["--n-frames", "7"]).n_frames == 7
    args = subs["segment"].parse_args(["cloud.ply"])  # the checkpoint may come from the models file
    assert (args.checkpoint, args.cloud) == (None, "cloud.ply")
    args = subs["segment"].parse_args(["model.pt", "cloud.ply"])
    assert (args.checkpoint, args.cloud) == ("model.pt", "cloud.ply")
    assert subs["fuse"].parse_args(["--recipe", "naclip"]).clip_recipe == "naclip"
    assert subs["synth"].parse_args(["--out", "x", "--no-lidar"]).with_lidar is False


def test_distill_flags_build_the_distill_config():
    from sas_app.commands.distill import add_arguments  # noqa: F401  (the command module imports light)
    from sas_core.config import config_from_args
    from sas_core.train.distill import DistillConfig

    sub = _subparsers(cli.build_parser(lazy=False))["distill"]
    args = sub.parse_args(["--data", "d", "--features", "f", "--out", "run", "--quiet", "--no-resume",
                           "--epochs", "5", "--mode", "sp"])
    cfg = config_from_args(DistillConfig, args)
    assert (cfg.out_dir, cfg.progress, cfg.resume, cfg.epochs, cfg.mode) == ("run", False, False, 5, "sp")
    cfg = config_from_args(DistillConfig, sub.parse_args(["--data", "d", "--features", "f"]))
    assert cfg == DistillConfig()
    with pytest.raises(SystemExit):
        sub.parse_args(["--data", "d", "--features", "f", "--mode", "nope"])


def test_demo_quick_preset_loses_to_explicit_flags():
    from sas_app.commands.demo import config
    from sas_app.demo import DEMO_PRESETS, DemoConfig, demo_config

    parser = cli.build_parser()
    quick = DEMO_PRESETS["quick"]
    cfg = config(parser.parse_args(["demo", "--quick", "--epochs", "50"]))
    assert cfg.epochs == 50  # the explicit flag wins over the preset's 3
    assert (cfg.frames, cfg.voxel_size, cfg.train_rooms) == (quick["frames"], quick["voxel_size"], quick["train_rooms"])
    # an explicit flag equal to the dataclass default still beats the preset
    assert config(parser.parse_args(["demo", "--quick", "--epochs", "100"])).epochs == 100
    assert config(parser.parse_args(["demo", "--quick"])).epochs == quick["epochs"] != DemoConfig().epochs
    assert config(parser.parse_args(["demo"])) == DemoConfig()
    assert config(parser.parse_args(["demo", "--quick"])) == demo_config("quick")
    with pytest.raises(ValueError, match="unknown demo preset"):
        demo_config("slow")


def test_capability_flags_build_diffusion_and_pseudo_mask_configs():
    from sas_core.capability.diffusion import DiffusionConfig
    from sas_core.capability.pseudo_masks import PseudoMaskConfig
    from sas_core.config import config_from_args

    sub = _subparsers(cli.build_parser(lazy=False))["capability"]
    args = sub.parse_args(["-o", "x.json", "--sd-model", "sd", "--seed", "4", "--fp16", "--width", "256",
                           "--sam-model", "vit_b", "--device", "cuda"])
    d = config_from_args(DiffusionConfig, args)
    assert (d.model_path, d.seed_offset, d.dtype, d.width, d.height, d.device) == ("sd", 4, "float16", 256, 512,
                                                                                    "cuda")
    p = config_from_args(PseudoMaskConfig, args)
    assert (p.sam_model, p.device, p.border) == ("vit_b", "cuda", PseudoMaskConfig().border)
    assert config_from_args(DiffusionConfig, sub.parse_args(["-o", "x"])) == DiffusionConfig()
