"""Provenance: a notebook is stale when code that ran for it, a file it read, or a library version
changed; an edit to a comment or docstring stales nothing; a smoke run can verify a change."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest

from esnb import provenance
from esnb._env import ClaimFailed, claim, read_claims, read_records, record, report
from esnb.suite import execute_in_place, find_notebooks, main, verify_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = find_notebooks()


# ------------------------------------------------------------------ units and their hashes

SOURCE = '''"""Module docstring."""
import math
from .es import zscore

SCALE = 2.0
LIMIT, OTHER = 3, 4
if math.pi > 3:
    FLAG = True
print("imported")


def f(x: float = 1.0) -> float:
    """Doc."""
    return x * SCALE


class Config:
    """A class."""
    size: int = 3

    def check(self):
        return self.size > 0

    class Inner:
        def g(self):
            return 1
'''


def test_units_of_a_module() -> None:
    units = provenance.units_of_source(SOURCE, "esnb.demo")
    assert {k: u.kind for k, u in units.items()} == {
        "esnb.demo:SCALE": "constant", "esnb.demo:LIMIT": "constant", "esnb.demo:OTHER": "constant",
        "esnb.demo:<module>": "module", "esnb.demo:f": "function", "esnb.demo:Config": "class",
        "esnb.demo:Config.check": "function", "esnb.demo:Config.Inner": "class",
        "esnb.demo:Config.Inner.g": "function"}
    assert "SCALE" in units["esnb.demo:f"].references


def _digests(source: str) -> dict[str, str]:
    return {k: u.digest for k, u in provenance.units_of_source(source, "esnb.demo").items()}


def test_comments_docstrings_and_annotations_do_not_change_a_hash() -> None:
    before = _digests(SOURCE)
    edited = (SOURCE.replace('"""Doc."""', '"""Another docstring, longer."""')
              .replace('"""A class."""', '"""Edited."""')
              .replace("    return x * SCALE", "    # why we scale\n    return x * SCALE  # scaled")
              .replace("def f(x: float = 1.0) -> float:", "def f(x: int = 1.0):"))
    assert _digests(edited) == before


def test_a_code_change_changes_only_its_unit() -> None:
    before = _digests(SOURCE)
    for old, new, unit in [("return x * SCALE", "return x * SCALE + 1", "esnb.demo:f"),
                           ("def f(x: float = 1.0)", "def f(x: float = 2.0)", "esnb.demo:f"),
                           ("size: int = 3", "size: int = 4", "esnb.demo:Config"),
                           ("return self.size > 0", "return self.size >= 0", "esnb.demo:Config.check"),
                           ("SCALE = 2.0", "SCALE = 3.0", "esnb.demo:SCALE"),
                           ('print("imported")', 'print("loaded")', "esnb.demo:<module>")]:
        after = _digests(SOURCE.replace(old, new))
        assert {k for k in before if before[k] != after.get(k)} == {unit}, (old, new)


def test_used_units_close_over_classes_constants_and_module_statements(tmp_path) -> None:
    pkg = tmp_path / "esnb"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "demo.py").write_text(SOURCE)
    index = provenance.CodeIndex(pkg)
    used = provenance.used_units(["esnb.demo:Config.Inner.g"], ["esnb", "esnb.demo"], index=index)
    assert used == {"esnb.demo:Config.Inner.g", "esnb.demo:Config.Inner", "esnb.demo:Config", "esnb.demo:<module>"}
    used = provenance.used_units(["esnb.demo:f"], ["esnb.demo"], ["print(esnb.demo.LIMIT)"], index=index)
    assert used == {"esnb.demo:f", "esnb.demo:SCALE", "esnb.demo:LIMIT", "esnb.demo:<module>"}


def test_cell_hash_ignores_comments_only() -> None:
    assert provenance.cell_digest("x = 1  # one\n# note\ny = 2") == provenance.cell_digest("x = 1\ny = 2")
    assert provenance.cell_digest("x = 1") != provenance.cell_digest("x = 2")
    assert provenance.cell_digest("%time x = 1") != provenance.cell_digest("%time x = 2")


# ------------------------------------------------------------------ the course notebooks, on scratch copies

def _scratch_package(tmp_path: Path) -> Path:
    pkg = tmp_path / "esnb"
    shutil.copytree(ROOT / "esnb", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


def _edit_every_docstring_and_comment(pkg: Path) -> int:
    """Prefix every docstring with 'Edited. ' and put a comment line before every top-level def."""
    edits = 0
    for path in pkg.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines(keepends=True)
        spots = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    spots.append((first.value.lineno - 1, first.value.col_offset))
        for row, col in sorted(spots, reverse=True):
            line = lines[row]
            start = col + (1 if line[col] in "rRuU" else 0)
            quote = line[start:start + 3] if line[start:start + 3] in ('"""', "'''") else line[start]
            at = start + len(quote)
            lines[row] = line[:at] + "Edited. " + line[at:]
            edits += 1
        out = []
        for line in lines:
            if line.startswith("def "):
                out.append("# a new comment about the function below\n")
                edits += 1
            out.append(line)
        path.write_text("".join(out))
    return edits


def _recorded(paths):
    return [p for p in paths if (json.loads(p.read_text())["metadata"].get("esnb") or {}).get("provenance")]


def test_docstring_and_comment_edits_stale_no_notebook(tmp_path) -> None:
    pkg = _scratch_package(tmp_path)
    assert _edit_every_docstring_and_comment(pkg) > 100
    index = provenance.CodeIndex(pkg)
    for p in NOTEBOOKS:
        before = provenance.check_notebook(p)
        after = provenance.check_notebook(p, pkg, index=index)
        assert after.changed == before.changed, (p.name, after.changed)


def test_a_change_in_noise_correlation_stales_notebook_03_alone(tmp_path) -> None:
    pkg = _scratch_package(tmp_path)
    noise = pkg / "noise.py"
    text = noise.read_text()
    old = "return float(torch.corrcoef(torch.stack([a, b]))[0, 1])"
    assert old in text
    noise.write_text(text.replace(old, "return float(torch.corrcoef(torch.stack([b, a]))[0, 1])"))
    index = provenance.CodeIndex(pkg)
    became_stale = []
    for p in _recorded(NOTEBOOKS):
        before, after = provenance.check_notebook(p), provenance.check_notebook(p, pkg, index=index)
        if set(after.changed) - set(before.changed):
            became_stale.append(p.name[:2])
            assert set(after.changed) - set(before.changed) == {"esnb.noise:noise_correlation changed"}
    assert became_stale == ["03"]


# ------------------------------------------------------------------ a real kernel

def _scratch_notebook(folder: Path, body: str, name: str = "01_demo.ipynb") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("smoke = False", metadata={"tags": ["parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell("import esnb\nsmoke = esnb.smoke_mode(smoke)\n" + body))
    path = folder / name
    nbformat.write(nb, str(path))
    return path


BODY = ("from esnb.noise import noise_correlation\n"
        "from esnb.tasks.countdown import load_split\n"
        "train, test = load_split()\n"
        "n = 2 if smoke else 3\n"
        "c = noise_correlation((64,), 1, 0, 2, 0)\n"
        "esnb.record('n_items', len(train[:n]))\n"
        "esnb.record('seconds', 0.5 if smoke else 1.5, timing=True)\n"
        "esnb.claim('the noise of two seeds is nearly uncorrelated', abs(c) < 0.5, c=c)\n"
        "print('hello')")


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nb")
    path = _scratch_notebook(folder, BODY)
    execute_in_place(path, timeout=300)
    return path


def test_execute_records_what_ran(executed, capfd) -> None:
    nb = nbformat.read(str(executed), as_version=4)
    assert [o.get("text") for o in nb.cells[1].outputs if o["output_type"] == "stream"] == ["hello\n"]
    assert len(nb.cells) == 2  # the trace cell is gone
    rec = nb.metadata["esnb"]["provenance"]
    assert rec["mode"] == "full" and "sources" not in nb.metadata["esnb"]
    code = rec["code"]
    assert "esnb.noise:noise_correlation" in code and "esnb.tasks.countdown:load_split" in code
    assert "esnb.noise:perturbed" not in code and "esnb.generation:generate" not in code  # imported, never ran
    assert not any(u.startswith(("esnb.provenance", "esnb._trace")) for u in code)
    assert set(rec["data"]) == {"data/countdown_test.jsonl", "data/countdown_train.jsonl"}
    assert rec["versions"]["torch"] and rec["versions"]["python"]
    assert len(rec["cells"]) == 2
    smoke = rec["smoke"]
    assert smoke["records"] == {"n_items": 2, "claim: the noise of two seeds is nearly uncorrelated":
                                {"holds": True, "values": {"c": pytest.approx(smoke["records"][
                                    "claim: the noise of two seeds is nearly uncorrelated"]["values"]["c"])}}}
    assert read_records(json.loads(executed.read_text()))["n_items"] == 3  # the outputs are the full run's
    assert not provenance.check_notebook(executed).stale
    capfd.readouterr()
    assert main(["execute", "--stale", str(executed)]) == 0
    assert "no notebook is stale" in capfd.readouterr().out


def _tamper(path: Path, change) -> Path:
    nb = json.loads(path.read_text())
    change(nb["metadata"]["esnb"]["provenance"])
    path.write_text(json.dumps(nb))
    return path


def test_stale_says_what_changed(executed, tmp_path, capsys) -> None:
    path = shutil.copy(executed, tmp_path / executed.name)
    _tamper(path, lambda r: (r["code"].update({"esnb.noise:noise_correlation": "0" * 64}),
                             r["data"].update({"data/countdown_test.jsonl": "1" * 64, "data/gone.jsonl": "2" * 64}),
                             r["versions"].update({"torch": "0.1"})))
    status = provenance.check_notebook(path)
    assert status.stale and status.changed == [
        "esnb.noise:noise_correlation changed", "input data/countdown_test.jsonl changed",
        "input data/gone.jsonl is missing", f"torch 0.1 -> {provenance.current_versions(['torch'])['torch']}"]
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].source += "\nprint('more')"
    nbformat.write(nb, str(path))
    assert "code cell 2 changed" in provenance.check_notebook(path).changed
    assert main(["execute", "--stale", str(path)]) == 0
    out = capsys.readouterr().out
    assert "01_demo.ipynb: stale: esnb.noise:noise_correlation changed" in out and "1 notebook(s) stale" in out


def test_a_notebook_without_a_record_is_listed(tmp_path, capsys) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("1 + 1"))
    path = tmp_path / "01_old.ipynb"
    nbformat.write(nb, str(path))
    [item] = provenance.stale_notebooks([path])
    assert not item.recorded and "no provenance record" in item.describe()


def test_verify_restamps_when_the_smoke_records_hold(executed, tmp_path, capsys) -> None:
    path = Path(shutil.copy(executed, tmp_path / executed.name))
    outputs_before = [c.get("outputs") for c in json.loads(path.read_text())["cells"]]
    _tamper(path, lambda r: (r["code"].update({"esnb.noise:noise_correlation": "0" * 64}),
                             r["smoke"]["code"].update({"esnb.noise:noise_correlation": "0" * 64})))
    result = verify_notebook(path, timeout=300)
    assert result.verdict == "verified", result.describe()
    status = provenance.check_notebook(path)
    assert not status.stale and status.verified == ["esnb.noise:noise_correlation changed"]
    assert "verified by smoke after changes to esnb.noise:noise_correlation changed" in status.describe()
    assert [c.get("outputs") for c in json.loads(path.read_text())["cells"]] == outputs_before
    assert main(["execute", "--stale", str(path)]) == 0
    assert "current (verified by smoke" in capsys.readouterr().out


def test_verify_refuses_what_smoke_cannot_vouch_for(executed, tmp_path) -> None:
    # a unit only the full version used
    path = Path(shutil.copy(executed, tmp_path / executed.name))
    _tamper(path, lambda r: (r["code"].update({"esnb.noise:noise_correlation": "0" * 64}),
                             r["smoke"]["code"].pop("esnb.noise:noise_correlation")))
    result = verify_notebook(path, timeout=300)
    assert result.verdict == "needs a full run" and "only the full version uses it" in result.describe()
    # records that moved
    _tamper(path, lambda r: (r["smoke"]["code"].update({"esnb.noise:noise_correlation": "0" * 64}),
                             r["smoke"]["records"].update({"n_items": 7})))
    result = verify_notebook(path, timeout=300)
    assert result.verdict == "needs a full run" and "n_items: 7 -> 2" in result.describe()
    assert provenance.check_notebook(path).stale


def test_a_subprocess_records_what_it_ran(tmp_path) -> None:
    code = ("import esnb\nfrom esnb.noise import noise_correlation\nnoise_correlation((8,), 1, 0, 2, 0)\n"
            "esnb.ESConfig(population_size=4)\n")
    env = {**__import__("os").environ, "ESNB_TRACE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path)
    trace = provenance.merge_traces(tmp_path)
    assert {"esnb.noise:noise_correlation", "esnb.es:ESConfig", "esnb.es:ESConfig.__post_init__"} <= set(trace["units"])


def test_a_file_written_by_rename_is_an_output_not_an_input(tmp_path) -> None:
    # esnb's atomic writes rename a temporary file over the target; reading the target back later
    # (a run loading its own checkpoint) must not make the run depend on it
    work = Path(__file__).resolve().parents[1] / "runs" / f"_trace_test_{tmp_path.name}"
    code = (f"import os, esnb\nfrom pathlib import Path\nd = Path({str(work)!r}); d.mkdir(parents=True, exist_ok=True)\n"
            "(d / 'x.tmp').write_text('1')\nos.replace(d / 'x.tmp', d / 'x.json')\n(d / 'x.json').read_text()\n")
    env = {**__import__("os").environ, "ESNB_TRACE_DIR": str(tmp_path)}
    try:
        subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path)
        trace = provenance.merge_traces(tmp_path)
        target = f"runs/{work.name}/x.json"
        assert target in trace["writes"] and target not in trace["reads"]
        assert provenance.input_files(trace["reads"], trace["writes"]) == []
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def test_a_module_run_with_dash_m_records_what_it_ran(tmp_path) -> None:
    # runpy executes `python -m esnb.x` in its own globals, which the instrumenting loader never sees
    env = {**__import__("os").environ, "ESNB_TRACE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "esnb.finetune", "--help"], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(u.startswith("esnb.finetune:") for u in provenance.merge_traces(tmp_path)["units"])


# ------------------------------------------------------------------ claims and reports

def test_claims_check_in_full_runs_and_report_in_smoke(monkeypatch, capsys) -> None:
    import esnb._env as env

    monkeypatch.setattr(env, "_smoke", False)
    claim("two is more than one", 2 > 1, a=2)
    assert "✓ claim: two is more than one  [a = 2]" in capsys.readouterr().out
    with pytest.raises(ClaimFailed, match="one is more than two"):
        claim("one is more than two", 1 > 2, a=1)
    monkeypatch.setattr(env, "_smoke", True)
    claim("one is more than two", 1 > 2)
    assert "✗ claim: one is more than two  (smoke run: not checked)" in capsys.readouterr().out


def test_report_fills_in_recorded_values(capsys) -> None:
    record("accuracy_demo", 0.25)
    assert report("accuracy {accuracy_demo:.1%}, {extra} more", extra=3) == "accuracy 25.0%, 3 more"
    with pytest.raises(KeyError, match="no value named 'nothing'"):
        report("{nothing}")


def test_claims_are_read_back_from_outputs(executed) -> None:
    [c] = read_claims(json.loads(executed.read_text()))
    assert c["claim"] == "the noise of two seeds is nearly uncorrelated" and c["holds"] is True


def test_report_stale_course_notebooks() -> None:
    """Warns (never fails: many hands change the package) with the notebooks to re-execute."""
    stale = provenance.stale_notebooks(NOTEBOOKS)
    if stale:
        warnings.warn("notebooks whose outputs depend on changed code, files or versions (re-execute with "
                      "`python -m esnb execute`, or try `--verify`):\n  " + "\n  ".join(s.describe() for s in stale),
                      UserWarning, stacklevel=1)
