"""Every name a notebook's `parameters` cell assigns must be a parameter papermill can set.

papermill parses that cell line by line and silently drops a line it cannot parse (a comment
holding `=` was enough), after which `python -m esnb run -p NAME VALUE` refuses NAME as
undeclared. This test keeps that from coming back.
"""
from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import papermill as pm
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _parameters_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(tagged)}"
    return "".join(tagged[0]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_assigned_name_is_a_papermill_parameter(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assigned = [t.id for node in ast.parse(_parameters_source(path)).body
                if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]
    assert assigned, f"{path.name}: the parameters cell assigns nothing"
    with caplog.at_level(logging.WARNING):
        seen = pm.inspect_notebook(str(path))
    missing = [name for name in assigned if name not in seen]
    assert not missing, f"{path.name}: papermill does not see {missing} (a comment with '=' on the line?)"
    unparsed = [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert not unparsed, f"{path.name}: papermill warns: {unparsed}"
    for name in ("smoke", "seed"):
        assert name in seen, f"{path.name}: every notebook declares `{name}`"
