"""Command-line flags that come from the config dataclasses themselves.

A config field that the command line may set says so in its metadata (flag, help text, parse
type), as TRL's configs do for ``transformers.HfArgumentParser``; :func:`add_config_arguments`
turns those fields into argparse arguments, and :func:`config_settings` reads them back. Every
launcher (``python -m esnb.finetune``, ``torchrun -m esnb.distributed``) builds its parser from
the same fields, so a flag cannot mean one thing in one and another in the other.

Imports nothing heavy: a bad flag is answered before torch loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

__all__ = ["cli_field", "number", "positive_int", "nonneg_int", "positive_float", "nonneg_float",
           "add_config_arguments", "config_settings", "flag_of"]


def number(kind: type, low: float, strict: bool) -> Callable[[str], Any]:
    """An argparse ``type``: parse ``kind`` and require ``> low`` (strict) or ``>= low``, finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text!r}")
        return value
    return parse


positive_int = number(int, 0, strict=True)
nonneg_int = number(int, 0, strict=False)
positive_float = number(float, 0, strict=True)
nonneg_float = number(float, 0, strict=False)


def cli_field(default: Any, help: str, flag: str | None = None, group: str | None = None,
              show_default: bool = True, **argparse_kwargs: Any) -> Any:
    """A dataclass field the command line can set: ``flag`` (default ``--field-name``), ``help``
    (the field's documentation; ``(default X)`` is appended unless ``show_default=False``), an
    argument ``group`` title, and anything else ``ArgumentParser.add_argument`` takes (``type``,
    ``choices``, ``action="store_const"`` with ``const``...)."""
    return dataclasses.field(default=default, metadata={"cli": {"flag": flag, "help": help, "group": group,
                                                               "show_default": show_default, **argparse_kwargs}})


def add_config_arguments(parser: argparse.ArgumentParser, *configs: type,
                         groups: dict[str, Any] | None = None) -> dict[str, str]:
    """Add an argument for every :func:`cli_field` of each dataclass in ``configs`` (dest = the
    field's name, default ``None`` = not given). ``groups``: title -> argument group to use.
    Returns {field name: flag}, for error messages."""
    groups = {} if groups is None else groups
    flags = {}
    for config in configs:
        for f in dataclasses.fields(config):
            spec = dict(f.metadata.get("cli") or {})
            if not spec:
                continue
            flag = spec.pop("flag") or "--" + f.name.replace("_", "-")
            help_text, group, show = spec.pop("help"), spec.pop("group"), spec.pop("show_default")
            if show and f.default is not dataclasses.MISSING:
                help_text = f"{help_text} (default {f.default})"
            target = parser
            if group:
                if group not in groups:
                    groups[group] = parser.add_argument_group(group)
                target = groups[group]
            target.add_argument(flag, dest=f.name, default=None, help=help_text, **spec)
            flags[f.name] = flag
    return flags


def config_settings(settings: dict[str, Any], *configs: type) -> dict[str, Any]:
    """The entries of ``settings`` that are fields of ``configs`` (``None``: not given, left out)."""
    names = {f.name for config in configs for f in dataclasses.fields(config)}
    return {k: v for k, v in settings.items() if k in names and v is not None}


def flag_of(name: str, *configs: type) -> str:
    """The command-line flag of setting ``name`` (a :func:`cli_field` of one of ``configs``, else
    ``--name-with-dashes``)."""
    for config in configs:
        for f in dataclasses.fields(config):
            if f.name == name and f.metadata.get("cli"):
                return f.metadata["cli"]["flag"] or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")
