"""The headless runner: notebook discovery, parameters, failure reporting, and a real papermill rerun."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from esnb import REPO_ROOT
from esnb.suite import clean_notebook, find_notebooks, main, parse_value, run_suite, summary_table


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
    assert "FAILED" in table and "doubled=42" not in table and len(table.splitlines()) == 4
    assert "doubled=42" in summary_table(outcomes, numbers=True)


def test_cli_exit_status_and_parameter_errors(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _notebook(src / "01_fails.ipynb", "assert x == 1")
    assert main(["run", "--notebooks", str(src), "--output", str(tmp_path / "o1")]) == 0
    assert main(["run", "--notebooks", str(src), "--output", str(tmp_path / "o2"), "-p", "x", "2"]) == 1
    with pytest.raises(SystemExit):
        main(["run", "--notebooks", str(src), "-p", "nonexistent", "1"])
    assert "not declared" in capsys.readouterr().err
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["environment"]["HF_HUB_OFFLINE"] and summary["notebooks"][0]["status"] == "FAILED"


@pytest.mark.parametrize("args, message", [
    (["-p", "seed", "[1,"], "-p seed: notebook 01 expects an integer (its default is 0), got '[1,' (not a Python literal)"),
    (["-p", "seed", "1e999"], "'1e999' is not a finite number"),
    (["-p", "seed", "True"], "expects an integer"),
    (["-p", "sigma", "x"], "-p sigma: notebook 01 expects a number (its default is 0.01), got 'x'"),
    (["-p", "smoke", "no"], "-p smoke: takes True or False, got 'no'"),
    (["-p", "sizes", "3"], "expects a list"),
])
def test_bad_parameters_are_refused_before_anything_runs(tmp_path, args, message):
    src = tmp_path / "src"
    src.mkdir()
    _notebook(src / "01_a.ipynb", "pass", params="smoke = False\nseed = 0\nsigma = 0.01\nsizes = [1, 2]\nname = 'x'\n"
                                                 "device = None")
    code = ("import sys\nfrom esnb.suite import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "run", "--notebooks", str(src), "--output",
                           str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=60)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "exit 2" in proc.stdout and "torch imported: False" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/proc/locks").exists() or not __import__("shutil").which("flock"), reason="Linux flock")
def test_runs_wait_for_each_other_but_not_for_their_own_parent(tmp_path):
    lock = tmp_path / "lock"
    env = {**__import__("os").environ, "ESNB_LOCK_FILE": str(lock)}
    code = "from esnb.suite import machine_lock\nwith machine_lock():\n    print('got it')"
    # under `flock LOCK python ...` (the lock's holder is the parent): goes ahead
    proc = subprocess.run(["flock", str(lock), sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "got it" and "waiting" not in proc.stderr
    # while an unrelated process holds it: waits, says why, and gets it once released
    holder = subprocess.Popen(["flock", str(lock), "sleep", "3"])
    try:
        import time as _time
        _time.sleep(0.5)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    finally:
        holder.wait()
    assert proc.stdout.strip() == "got it" and "waiting for it to finish" in proc.stderr


def test_good_parameters_pass_the_check(tmp_path):
    from esnb.suite import declared_parameters, parameter_error

    path = _notebook(tmp_path / "01_a.ipynb", "pass", params="seed = 0\nsigma = 0.01\nname = 'x'\ndevice = None")
    defaults = declared_parameters(path)
    assert defaults == {"seed": 0, "sigma": 0.01, "name": "x", "device": None}
    for name, text in [("seed", "3"), ("sigma", "1"), ("sigma", "2e-3"), ("name", "[1,"), ("device", "cuda")]:
        assert parameter_error(name, parse_value(text), defaults[name], text) is None, (name, text)


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
    assert "1 of 1 notebooks ran" in proc.stdout and "rosenbrock_final_value=" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and "rosenbrock_final_value" in summary["notebooks"][0]["records"]
