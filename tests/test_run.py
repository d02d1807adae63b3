"""The headless runner: notebook discovery, parameters, failure reporting, and a real papermill rerun."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from esnb import REPO_ROOT
from esnb.run import clean_notebook, find_notebooks, main, parse_value, run_suite, summary_table


def _notebook(path: Path, body: str, params: str = "smoke = False\nx = 1") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import esnb"),
        nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_find_notebooks_orders_and_filters(tmp_path):
    for name in ["10_c.ipynb", "02_b.ipynb", "01_a.ipynb", "notes.ipynb"]:
        _notebook(tmp_path / name, "pass")
    assert [p.name for p in find_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in find_notebooks(tmp_path, ["10", "1"])] == ["01_a.ipynb", "10_c.ipynb"]
    with pytest.raises(ValueError, match="no notebook matches 07"):
        find_notebooks(tmp_path, ["07"])


@pytest.mark.parametrize("text, value", [("3", 3), ("0.01", 0.01), ("True", True), ("true", True), ("[1, 2]", [1, 2]),
                                         ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"), ("none", None)])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_suite_reports_failures_with_the_cell_and_keeps_going(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _notebook(src / "01_fails.ipynb", "raise RuntimeError('boom at x=%d' % x)")
    _notebook(src / "02_works.ipynb", "esnb.record('doubled', 2 * x)\nesnb.record('smoke_seen', smoke)")
    outcomes = run_suite(find_notebooks(src), tmp_path / "out", {"x": 21, "unused": 5}, smoke=True, progress=False)
    failed, ok = outcomes
    assert failed.status == "FAILED" and "RuntimeError" in failed.error and "boom at x=21" in failed.error
    assert "code cell 3" in failed.error
    assert ok.status == "ok" and ok.records == {"doubled": 42, "smoke_seen": True}
    assert (tmp_path / "out" / "02_works.ipynb").exists()
    table = summary_table(outcomes)
    assert "FAILED" in table and "doubled=42" in table


def test_cli_exit_status_and_parameter_errors(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _notebook(src / "01_fails.ipynb", "assert x == 1")
    assert main(["run", "--notebooks", str(src), "--output", str(tmp_path / "o1")]) == 0
    assert main(["run", "--notebooks", str(src), "--output", str(tmp_path / "o2"), "-p", "x", "2"]) == 1
    with pytest.raises(SystemExit):
        main(["run", "--notebooks", str(src), "-p", "nonexistent", "1"])
    assert "not declared" in capsys.readouterr().err


def test_clean_notebook_strips_machine_paths_and_progress_bars():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=" 50%|#####     | 5/10 [00:01<00:01]\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"saved to {REPO_ROOT}/data/x\n"),
    ]
    cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00"}
    nb.cells = [cell]
    clean_notebook(nb)
    assert len(cell.outputs) == 1 and cell.outputs[0]["text"] == "saved to <repo>/data/x\n"
    assert "execution" not in cell.metadata


def test_every_course_notebook_has_parameters_and_smoke():
    import papermill as pm

    notebooks = find_notebooks()
    assert notebooks, "no notebooks found"
    for path in notebooks:
        params = pm.inspect_notebook(str(path))
        assert "smoke" in params and "seed" in params, f"{path.name} needs smoke and seed parameters"
        text = path.read_text()
        assert "/work/" not in text and "/root/" not in text, f"{path.name} output holds a machine path"
        assert " object at 0x" not in text, f"{path.name} output holds a memory address"


def test_papermill_rerun_of_a_course_notebook(tmp_path):
    """The README's headless command, on notebook 01 in smoke mode, through a real subprocess."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "esnb", "run", "--smoke", "--only", "01", "--output", str(out),
                           "-p", "seed", "1"], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    executed = json.loads((out / "01_es_in_two_dimensions.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "seed = 1" in "".join(injected[0]["source"]) and "smoke = True" in "".join(injected[0]["source"])
    assert "1 of 1 notebooks ran" in proc.stdout and "rosenbrock_final_value=" in proc.stdout
