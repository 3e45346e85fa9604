"""One config mechanism: dataclass fields carry their default and a one-line help.

Every component has a small dataclass config. Its fields are declared with :func:`opt`, which
stores the help text (and optional ``choices``) in the field's metadata::

    @dataclass
    class VoxelMapConfig:
        voxel_size: float = opt(0.05, "voxel edge in metres (one point per voxel)")

Command-line flags (:func:`add_config_arguments`, in the application layer) and ROS parameters
(``sas_ros.params``) are generated from these fields, so each default exists exactly once.
Presets (``--quick``) are plain dicts of field values; :func:`config_from_args` applies a preset
first and then only the flags the user gave explicitly, so an explicit flag always wins.

This module is pure Python (no NumPy): building a parser stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional

_EXPLICIT = "_sas_explicit"  # namespace attribute: the dests the user set on the command line


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, choices: Optional[Iterable] = None,
        cli: bool = True, ros: bool = True) -> Any:
    """A dataclass field with a help text (and optional choices) in its metadata.

    ``factory`` replaces ``default`` for mutable values; ``cli`` / ``ros`` = False keep a field
    out of generated flags / ROS parameters (internal knobs, run-time objects).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "cli": cli, "ros": ros}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigField(NamedTuple):
    """One documented field of a config dataclass."""

    name: str
    default: Any
    help: str
    choices: Optional[tuple]
    type: type


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def config_fields(cls, skip: Iterable[str] = (), target: str = "cli") -> Iterator[ConfigField]:
    """The documented fields of dataclass ``cls`` meant for ``target`` ("cli" or "ros")."""
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_") or not f.metadata.get(target, True):
            continue
        default = field_default(f)
        kind = type(default) if default is not dataclasses.MISSING and default is not None else str
        yield ConfigField(f.name, default, f.metadata.get("help", ""), f.metadata.get("choices"), kind)


def field_help(cls) -> dict:
    """``{field name: help}`` of dataclass ``cls``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


class _Record(argparse.Action):
    """Store like argparse does, and remember that the user gave this option."""

    def __init__(self, option_strings, dest, kind="store", **kwargs):
        self.kind = kind
        if kind == "bool":
            # --flag / --no-flag, as BooleanOptionalAction
            option_strings = list(option_strings) + ["--no-" + s[2:] for s in option_strings if s.startswith("--")]
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.kind == "bool":
            values = not (option_string or "").startswith("--no-")
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, _EXPLICIT, set()))
        explicit.add(self.dest)
        setattr(namespace, _EXPLICIT, explicit)

    def format_usage(self):
        return " | ".join(self.option_strings)


def flag_name(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: Iterable[str] = (), prefix: str = "",
                         overrides: Optional[Mapping[str, Any]] = None) -> None:
    """Add ``--field-name`` options for the documented fields of dataclass ``cls``.

    Defaults and help come from the fields (``overrides`` changes a default shown and used by
    this command only, e.g. a command that stores its output elsewhere). Fields whose default is
    None or a dict are skipped (no sensible flag); tuples become ``nargs='+'``; booleans get
    ``--x / --no-x``. Every option records that it was given (see :func:`explicit_args`).
    """
    overrides = dict(overrides or {})
    for f in config_fields(cls, skip):
        default = overrides.get(f.name, f.default)
        if default is dataclasses.MISSING or default is None or isinstance(default, dict):
            continue
        flag = flag_name(f.name, prefix)
        dest = prefix.replace("-", "_") + f.name
        text = f"{f.help} (default: {_show(default)})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=dest, default=default, action=_Record, kind="bool", help=text)
        elif isinstance(default, (tuple, list)):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, dest=dest, nargs="+", type=kind, default=default, action=_Record,
                                choices=f.choices, help=text)
        else:
            parser.add_argument(flag, dest=dest, type=type(default), default=default, action=_Record,
                                choices=f.choices, help=text)


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def explicit_args(args: argparse.Namespace) -> set:
    """The dests of the options the user gave explicitly (options added by
    :func:`add_config_arguments`)."""
    return set(getattr(args, _EXPLICIT, set()))


def config_from_args(cls, args: argparse.Namespace, preset: Optional[Mapping[str, Any]] = None,
                     prefix: str = "", **fixed):
    """Build ``cls`` from parsed ``args``: dataclass defaults, then ``preset``, then every flag
    value that differs from the defaults or was given explicitly, then ``fixed`` (values the
    command sets itself). Unknown preset keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    preset = dict(preset or {})
    unknown = set(preset) - names
    if unknown:
        raise ValueError(f"preset sets unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    explicit = explicit_args(args)
    values = dict(preset)
    for name in names:
        dest = prefix.replace("-", "_") + name
        if not hasattr(args, dest):
            continue
        if dest in explicit or name not in preset:
            values[name] = getattr(args, dest)
    values.update(fixed)
    for name, value in list(values.items()):
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if isinstance(field_default(f), tuple) and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def replace_checked(config, **changes):
    """``dataclasses.replace`` that names the bad field instead of a TypeError."""
    names = {f.name for f in dataclasses.fields(config)}
    bad = set(changes) - names
    if bad:
        raise ValueError(f"{type(config).__name__} has no field {', '.join(sorted(bad))}")
    return dataclasses.replace(config, **changes)
