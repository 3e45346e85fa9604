"""sas_core.config: flags generated from dataclass fields; presets lose to explicit flags."""

import argparse
from dataclasses import dataclass
from typing import Optional

import pytest

from sas_core.config import (Recorded, add_config_arguments, config_fields, config_from_args, explicit_args,
                             field_choices, opt)


@dataclass
class _Cfg:
    epochs: int = opt(100, "training epochs")
    lr: float = opt(1e-4, "learning rate")
    device: str = opt("cpu", "torch device", choices=("cpu", "cuda"))
    augment: bool = opt(True, "augmentation on")
    sizes: tuple = opt((2, 4), "sizes")
    hidden: int = opt(3, "not a flag", cli=False)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    return parser, parser.parse_args(argv)


def test_flags_carry_the_dataclass_defaults_and_help():
    parser, args = _parse([])
    assert (args.epochs, args.lr, args.device, args.augment, args.sizes) == (100, 1e-4, "cpu", True, (2, 4))
    assert not hasattr(args, "hidden")
    text = parser.format_help()
    assert "training epochs (default: 100)" in text and "--no-augment" in text
    assert config_from_args(_Cfg, args) == _Cfg()


def test_explicit_flags_beat_the_preset_and_the_preset_beats_defaults():
    _, args = _parse(["--epochs", "50", "--no-augment", "--sizes", "8", "9"])
    assert explicit_args(args) == {"epochs", "augment", "sizes"}
    cfg = config_from_args(_Cfg, args, preset={"epochs": 3, "lr": 1e-3})
    assert (cfg.epochs, cfg.lr, cfg.augment, cfg.sizes) == (50, 1e-3, False, (8, 9))
    # an explicit flag equal to the default still wins over the preset
    _, args = _parse(["--epochs", "100"])
    assert config_from_args(_Cfg, args, preset={"epochs": 3}).epochs == 100


def test_choices_and_unknown_preset_keys_are_errors():
    with pytest.raises(SystemExit):
        _parse(["--device", "tpu"])
    _, args = _parse([])
    with pytest.raises(ValueError, match="unknown _Cfg fields: nope"):
        config_from_args(_Cfg, args, preset={"nope": 1})


def test_config_fields_for_ros_skip_cli_only_and_report_types():
    fields = {f.name: f for f in config_fields(_Cfg, target="ros")}
    assert fields["lr"].type is float and fields["lr"].help == "learning rate"
    assert "hidden" in fields  # cli=False does not hide a field from ROS


@dataclass
class _More:
    threshold: Optional[float] = opt(None, "metres, or none")
    name: Optional[str] = opt(None, "a name")
    runtime: Optional[object] = opt(None, "a run-time object: no flag")
    pairs: tuple = opt(((0, 1), (2, 3)), "nested: no flag")
    progress: bool = opt(True, "progress bars")
    out_dir: str = opt("out", "output folder")
    mode: str = opt("a", "mode", choices=("a", "b"))


def test_optional_fields_aliases_off_aliases_and_only():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _More, aliases={"out_dir": "--out"}, off_aliases={"progress": "--quiet"})
    args = parser.parse_args([])
    assert (args.threshold, args.name, args.progress, args.out_dir) == (None, None, True, "out")
    assert not hasattr(args, "runtime") and not hasattr(args, "pairs")
    args = parser.parse_args(["--threshold", "0.5", "--name", "x", "--quiet", "--out", "o"])
    assert (args.threshold, args.name, args.progress, args.out_dir) == (0.5, "x", False, "o")
    assert explicit_args(args) == {"threshold", "name", "progress", "out_dir"}
    assert config_from_args(_More, args, preset={"progress": True}).progress is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--threshold", "far"])
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _More, only=("mode",), prefix="x-")
    assert vars(parser.parse_args(["--x-mode", "b"])) == {"x_mode": "b", "_sas_explicit": {"x_mode"}}
    assert field_choices(_More, "mode") == ("a", "b") and field_choices(_More, "name") is None
    with pytest.raises(ValueError, match="no field nope"):
        add_config_arguments(argparse.ArgumentParser(), _More, only=("nope",))


def test_recorded_hand_written_options_count_as_explicit():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None, action=Recorded)
    assert explicit_args(parser.parse_args([])) == set()
    assert explicit_args(parser.parse_args(["--checkpoint", "a.pt"])) == {"checkpoint"}
