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
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["cli_field", "number", "positive_int", "nonneg_int", "positive_float", "nonneg_float",
           "add_config_arguments", "config_settings", "flag_of",
           "cli_task_and_items", "parse_task_options", "add_run_arguments", "add_data_argument", "new_run_folder"]


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


def cli_task_and_items(ap: argparse.ArgumentParser, settings: dict, paper: bool = False,
                       train_size: int = 1) -> tuple[Any, list, list]:
    """The task and its (train, test) items as the command line asks: ``--task`` with its options,
    paper mode's task options for Countdown, the compact prompt for the shipped models, and
    ``--data`` (the paper's countdown.json) when given. ``python -m esnb.finetune``, ``torchrun
    -m esnb.distributed`` and ``python -m esnb.grpo`` all build their run with it, so they train on
    the same puzzles. ``paper``: paper mode; ``train_size``: the training items the run needs. A
    bad option or data file stops with ``ap.error`` naming the flag, before any model is loaded."""
    from .models import SHIPPED
    from .tasks import default_items, get_task

    options = dict(settings.get("task_options") or {})
    countdown = settings["task"].strip().lower() == "countdown"
    if countdown and paper:  # the paper's prompt, target rule and reward (explicit options win)
        options.setdefault("prompt_style", "paper")
        options.setdefault("targets", "paper")
        options.setdefault("reward", "esnb" if settings.get("legacy_reward") else "paper-script")
    if countdown and settings["model"].strip().lower() in SHIPPED:
        options.setdefault("prompt_style", "compact")
    if settings.get("data") and not countdown:
        ap.error(f"--data: reads the paper's countdown.json; the task is {settings['task']!r}")
    try:
        task = get_task(settings["task"], **options)
    except (ValueError, TypeError) as e:
        ap.error(f"--task: {e}")
    try:
        if settings.get("data"):
            from .tasks.countdown import load_paper_data

            train_items, test_items = load_paper_data(settings["data"])
        else:
            train_items, test_items = default_items(task)
    except ValueError as e:
        ap.error(f"--{'data' if settings.get('data') else 'task'}: {str(e).splitlines()[0][:300]}")
    if len(train_items) < train_size:
        ap.error(f"--train-size: the task has {len(train_items)} training items, {train_size} requested")
    return task, train_items, test_items


def parse_task_options(ap: argparse.ArgumentParser, pairs: Sequence[str] | None) -> dict:
    """``--task-option KEY=VALUE`` pairs as a dict of Python literals (errors through ``ap.error``)."""
    from ._env import parse_value

    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            ap.error(f"--task-option: expected KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = parse_value(value)
        except ValueError as e:
            ap.error(f"--task-option {key.strip()[:40]}: {e}")
    return options


def add_run_arguments(ap: argparse.ArgumentParser, what: str) -> None:
    """The flags every trainer's command line shares: what to train (model, task and its options)
    and where the run goes (a new folder, or one to resume)."""
    ap.add_argument("--model", help="'tiny', 'tiny-base', 'smollm2-135m', a Hugging Face id or a folder (required "
                                    "unless --resume)")
    ap.add_argument("--task", help="a task name from esnb.tasks, e.g. 'countdown' (required unless --resume)")
    ap.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                    help="task option, e.g. prompt_style=compact (repeatable); countdown on 'tiny' and 'tiny-base' "
                         "defaults to compact")
    ap.add_argument("--output", help=f"{what} directory (required unless --resume)")
    ap.add_argument("--resume", metavar="DIR", help=f"continue the {what} in DIR from its last checkpoint")
    ap.add_argument("--overwrite", action="store_const", const=True,
                    help=f"allow --output to be a non-empty folder, or a finished {what} to replace")


def add_data_argument(ap: Any) -> None:
    ap.add_argument("--data", metavar="PATH",
                    help="countdown: the paper's countdown.json (you bring it); first 200 puzzles train, last 2,000 test")


def new_run_folder(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The ``--output`` folder of a new run, once ``--model``, ``--task`` and ``--output`` are all
    given and ``--output`` is not a file (errors through ``ap.error``)."""
    missing = [f"--{k}" for k in ("model", "task", "output") if getattr(args, k) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)} (or --resume DIR)")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        ap.error(f"--output: {out} is a file, not a folder")
    return out
