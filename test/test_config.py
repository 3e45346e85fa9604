"""sas_core.config: flags generated from dataclass fields; presets lose to explicit flags."""

import argparse
from dataclasses import dataclass

import pytest

from sas_core.config import add_config_arguments, config_fields, config_from_args, explicit_args, opt


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
