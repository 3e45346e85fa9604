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
import re
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


def field_choices(cls, name: str) -> Optional[tuple]:
    """The ``choices`` of field ``name`` of dataclass ``cls`` (None: any value)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("choices")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


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
        elif kind == "off":  # an option that only sets a boolean False (--quiet for --no-progress)
            kwargs["nargs"] = 0
            kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.kind == "bool":
            values = not (option_string or "").startswith("--no-")
        elif self.kind == "off":
            values = False
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, _EXPLICIT, set()))
        explicit.add(self.dest)
        setattr(namespace, _EXPLICIT, explicit)

    def format_usage(self):
        return " | ".join(self.option_strings)


#: The store action of generated flags, for hand-written options that should also record that
#: they were given (``parser.add_argument("--checkpoint", action=Recorded)``).
Recorded = _Record


def flag_name(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def _optional_type(cls, name: str):
    """``X`` when field ``name`` of ``cls`` is annotated ``Optional[X]`` with X in (int, float, str), else None.

    Resolves string annotations (``from __future__ import annotations``) with typing, falling back
    to reading the annotation text when the module's names do not resolve."""
    import typing

    try:
        hint = typing.get_type_hints(cls).get(name)
    except Exception:  # forward references that do not resolve at run time
        hint = None
    if hint is not None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1 and args[0] in (int, float, str):
            return args[0]
        return None
    text = str(next((f.type for f in dataclasses.fields(cls) if f.name == name), ""))
    m = re.fullmatch(r"\s*(?:typing\.)?Optional\[\s*(int|float|str)\s*\]\s*", text)
    return {"int": int, "float": float, "str": str}[m.group(1)] if m else None


def _names(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: Iterable[str] = (), prefix: str = "",
                         overrides: Optional[Mapping[str, Any]] = None, only: Optional[Iterable[str]] = None,
                         aliases: Optional[Mapping[str, Any]] = None,
                         off_aliases: Optional[Mapping[str, Any]] = None) -> None:
    """Add ``--field-name`` options for the documented fields of dataclass ``cls``.

    Defaults and help come from the fields (``overrides`` changes a default shown and used by
    this command only, e.g. a command that stores its output elsewhere). ``only`` limits the
    flags to these fields (a command that exposes a few fields of a larger config). ``aliases``
    maps a field to extra option strings (``{"vocabulary": "--vocab"}``; a boolean alias gets its
    ``--no-`` form too); ``off_aliases`` maps a boolean field to options that set it False
    (``{"progress": "--quiet"}``). Fields whose default is a dict, or None without an
    ``Optional[int | float | str]`` annotation, are skipped (no sensible flag); tuples of scalars
    become ``nargs='+'`` (nested tuples are skipped); booleans get ``--x / --no-x``. Every option
    records that it was given (see :func:`explicit_args`).
    """
    overrides = dict(overrides or {})
    aliases = dict(aliases or {})
    off_aliases = dict(off_aliases or {})
    only = None if only is None else set(only)
    if only is not None:
        unknown = only - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    for f in config_fields(cls, skip):
        if only is not None and f.name not in only:
            continue
        default = overrides.get(f.name, f.default)
        if default is dataclasses.MISSING or isinstance(default, dict):
            continue
        flags = [flag_name(f.name, prefix)] + _names(aliases.get(f.name))
        dest = prefix.replace("-", "_") + f.name
        text = f"{f.help} (default: {_show(default)})"
        if default is None:
            kind = _optional_type(cls, f.name)
            if kind is None:
                continue
            parser.add_argument(*flags, dest=dest, type=kind, default=None, action=_Record,
                                choices=f.choices, help=text)
        elif isinstance(default, bool):
            parser.add_argument(*flags, dest=dest, default=default, action=_Record, kind="bool", help=text)
            if f.name in off_aliases:
                parser.add_argument(*_names(off_aliases[f.name]), dest=dest, action=_Record, kind="off",
                                    help=f"same as --no-{(prefix + f.name).replace('_', '-')}")
        elif isinstance(default, (tuple, list)):
            if any(isinstance(v, (tuple, list, dict)) or v is None for v in default):
                continue  # nested values: no flag
            kind = type(default[0]) if default else str
            parser.add_argument(*flags, dest=dest, nargs="+", type=kind, default=default, action=_Record,
                                choices=f.choices, help=text)
        else:
            parser.add_argument(*flags, dest=dest, type=type(default), default=default, action=_Record,
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
