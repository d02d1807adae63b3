"""Every exercise solution in solutions/ runs and passes its own checks.

A solution file is named after its notebook (`solutions/01_es_in_two_dimensions.py`), so it is
loaded by path (module names may not start with a digit); every `exercise_K` function in it is
one test.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py"))


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"esnb_solutions_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases() -> list:
    cases = []
    for path in SOLUTIONS:
        for name, fn in inspect.getmembers(_load(path), inspect.isfunction):
            if name.startswith("exercise_") and fn.__module__.startswith("esnb_solutions_"):
                cases.append(pytest.param(fn, id=f"{path.stem[:2]}-{name}"))
    return cases


def test_every_solution_file_matches_a_notebook() -> None:
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    orphans = [p.name for p in SOLUTIONS if p.stem not in notebooks]
    assert not orphans, f"solution files without a notebook of the same name: {orphans}"


@pytest.mark.parametrize("solution", _cases())
def test_solution_runs_and_checks_itself(solution) -> None:
    solution()
