"""The stale-output record: `python -m esnb execute` stores a hash of the esnb modules the kernel
imported; `python -m esnb execute --stale` lists notebooks whose record no longer matches."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nbformat
import pytest

from esnb import provenance
from esnb.run import execute_in_place, find_notebooks, main

ROOT = Path(__file__).resolve().parent.parent


def _fake_package(tmp_path: Path) -> Path:
    pkg = tmp_path / "esnb"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "toy.py").write_text("y = 2\n")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "tasks" / "countdown.py").write_text("z = 3\n")
    return pkg


def _notebook_with(tmp_path: Path, sources: dict | None) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("1 + 1"))
    if sources is not None:
        nb.metadata["esnb"] = {"sources": sources}
    path = tmp_path / "01_demo.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_module_path_maps_names_to_files(tmp_path) -> None:
    pkg = _fake_package(tmp_path)
    assert provenance.module_path("esnb", pkg) == pkg / "__init__.py"
    assert provenance.module_path("esnb.toy", pkg) == pkg / "toy.py"
    assert provenance.module_path("esnb.tasks", pkg) == pkg / "tasks" / "__init__.py"
    assert provenance.module_path("esnb.tasks.countdown", pkg) == pkg / "tasks" / "countdown.py"
    assert provenance.module_path("esnb.gone", pkg) is None
    with pytest.raises(ValueError, match="module"):
        provenance.module_path("numpy", pkg)


def test_only_recorded_modules_make_a_notebook_stale(tmp_path) -> None:
    pkg = _fake_package(tmp_path)
    record = provenance.hash_modules(["esnb", "esnb.toy"], pkg)
    path = _notebook_with(tmp_path, record)
    assert not provenance.check_notebook(path, pkg).stale
    # a module the notebook never imported changes: still current
    (pkg / "tasks" / "countdown.py").write_text("z = 4\n")
    assert provenance.stale_notebooks([path], pkg) == []
    # a module it imported changes: stale, and the report names the module
    (pkg / "toy.py").write_text("y = 3\n")
    [item] = provenance.stale_notebooks([path], pkg)
    assert item.recorded and item.changed == ["esnb.toy"]
    assert "esnb.toy" in item.describe()


def test_a_notebook_without_a_record_is_listed(tmp_path) -> None:
    pkg = _fake_package(tmp_path)
    [item] = provenance.stale_notebooks([_notebook_with(tmp_path, None)], pkg)
    assert not item.recorded and "no record" in item.describe()


def test_execute_records_what_the_kernel_imported(tmp_path, capfd) -> None:
    # A real kernel: the notebook imports esnb.toy (and, through `import esnb`, the eager core) but
    # not esnb.generation, so only the former are recorded; the probe cell leaves no trace.
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import esnb.toy\nprint('hello')"))
    path = tmp_path / "01_demo.ipynb"
    nbformat.write(nb, str(path))
    execute_in_place(path, timeout=120)
    assert "TCP" not in "".join(capfd.readouterr())  # IPC transport: no unencrypted-traffic warning
    done = nbformat.read(str(path), as_version=4)
    assert len(done.cells) == 1 and done.cells[0].outputs[0]["text"] == "hello\n"
    sources = done.metadata["esnb"]["sources"]
    assert {"esnb", "esnb.toy", "esnb.es"} <= set(sources)
    assert "esnb.generation" not in sources
    assert sources["esnb.toy"] == provenance.file_sha256(ROOT / "esnb" / "toy.py")
    assert not provenance.check_notebook(path).stale
    # and the command line agrees
    assert main(["execute", "--stale", str(path)]) == 0
    assert "match the current esnb code" in capfd.readouterr().out


def test_stale_cli_lists_a_notebook_without_record(tmp_path, capsys) -> None:
    path = _notebook_with(tmp_path, None)
    assert main(["execute", "--stale", str(path)]) == 0
    assert "01_demo.ipynb: no record" in capsys.readouterr().out


def test_report_stale_course_notebooks() -> None:
    """Warns (never fails: many hands change the package) with the notebooks to re-execute."""
    stale = provenance.stale_notebooks(find_notebooks())
    if stale:
        warnings.warn("notebooks whose outputs were made with older esnb code (re-execute with "
                      "`python -m esnb execute`):\n  " + "\n  ".join(s.describe() for s in stale),
                      UserWarning, stacklevel=1)
