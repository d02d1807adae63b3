"""Tasks: prompts plus a reward. Every task offers the same small interface (``Task``), so the
ES engine, the GRPO baseline and the evaluation code never need to know which task they run."""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """What the fine-tuning engines need from a task.

    ``items`` are task-specific records (a Countdown puzzle dict, a conciseness prompt dict).
    """

    name: str
    max_new_tokens: int          # a sensible generation cap for this task
    stop_strings: Sequence[str]  # generation may stop after any of these (besides EOS)

    def prompt(self, item: Any, tokenizer: Any = None) -> str:
        """The text fed to the model (chat-templated when the task is built for chat)."""
        ...

    def score(self, completion: str, item: Any) -> dict:
        """At least ``{"reward": float, "correct": bool}``; never raises on model output."""
        ...


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name: ``"countdown"`` (options: ``prompt_style="plain"|"paper"|"chat"|"compact"``,
    ``max_new_tokens``, ``targets="esnb"|"paper"``, ``reward="esnb"|"paper-script"``; the paper's
    all at once: ``get_task("countdown", **countdown.paper_options())``) or ``"conciseness"`` (options: ``chat``, ``max_new_tokens``, ``heldout`` = 8 or 32 prompts)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a task name such as 'countdown', got {name!r}")
    key = name.strip().lower()
    if key == "countdown":
        from .countdown import CountdownTask

        return CountdownTask(**options)
    if key == "conciseness":
        from .conciseness import ConcisenessTask

        return ConcisenessTask(**options)
    if key == "arithmetic":  # small-number sums with <answer> tags (notebook 08; see arithmetic.py)
        from .arithmetic import ArithmeticTask

        return ArithmeticTask(**options)
    raise ValueError(f"name: unknown task {name!r}; expected 'countdown', 'conciseness' or 'arithmetic'")


def task_items(task: Any, train_items: Sequence[Any] | None, test_items: Sequence[Any] | None) -> tuple[list, list]:
    """The given train/test items as lists, falling back to :func:`default_items` for a missing side."""
    if train_items is None or test_items is None:
        d_train, d_test = default_items(task)
        train_items = d_train if train_items is None else train_items
        test_items = d_test if test_items is None else test_items
    return list(train_items), list(test_items)


def default_items(task: Any) -> tuple[list, list]:
    """``(train, test)`` items of a task: its own ``train_items``/``test_items`` when it has them,
    the shipped split for Countdown."""
    if hasattr(task, "train_items") and hasattr(task, "test_items"):
        return list(task.train_items), list(task.test_items)
    if getattr(task, "name", None) == "countdown":
        from .countdown import load_split

        return load_split()
    raise ValueError(f"task: {getattr(task, 'name', task)!r} has no default items; pass train_items and test_items")
