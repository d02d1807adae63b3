"""Which code and data made a notebook's committed outputs, and do they still hold?

``python -m esnb execute`` runs a notebook with :mod:`esnb._trace` switched on and stores in the
notebook's metadata (``metadata["esnb"]["provenance"]``) what the run depended on:

* ``code``: a hash of each esnb *unit* that ran: a function, a method, a class's own statements
  (its fields and defaults: recorded when a method of it ran or an instance was made), a module-level
  constant that a recorded unit or the notebook's cells name, and each imported module's remaining
  top-level statements. A unit's hash is taken from its syntax tree with docstrings and annotations
  of arguments left out, so an edit to a comment or a docstring changes nothing;
* ``cells``: a hash of each of the notebook's own code cells (comments left out);
* ``data``: a SHA-256 of every file it read under ``data/`` or ``runs/`` (with the other files of
  that folder: model weights are read by code that no audit hook sees), minus files it wrote;
* ``versions``: Python and, where the run imported them, torch, numpy, transformers and trl;
* ``smoke``: the same for the notebook's smoke version, run right after, with its records: what
  ``python -m esnb execute --verify`` compares a later smoke run with.

:func:`check_notebook` compares a record with the code, files and versions here and says what
changed; a notebook is stale only when something it depended on did.
"""
from __future__ import annotations

import ast
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ._trace import PACKAGE
from .paths import PACKAGE_DIR, REPO_ROOT

FORMAT = 2
# Machinery that records provenance does not make outputs: its own code is never a dependency.
INFRASTRUCTURE = {"esnb._trace", "esnb.provenance", "esnb.suite", "esnb.__main__"}
MODULE_UNIT = "<module>"
CACHE_DIRS = ("data/cache",)  # converted-model caches: derived, machine-local, not inputs
MAX_HASHED_BYTES = 2 << 30


# ------------------------------------------------------------------ units of code

def module_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of an ``esnb`` module name (``esnb.tasks.countdown``), or None if there is none."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"module must be {PACKAGE!r} or inside it, got {module!r}")
    parts = module.split(".")[1:]
    base = package_dir.joinpath(*parts) if parts else package_dir
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


class _Normalize(ast.NodeTransformer):
    """Drop what does not change behaviour: docstrings and function annotations."""

    @staticmethod
    def _strip_docstring(body: list) -> list:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            return body[1:] or [ast.Pass()]
        return body

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        node.body = self._strip_docstring(node.body)
        node.returns = None
        for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg):
            if a is not None:
                a.annotation = None
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.generic_visit(node)
        node.body = self._strip_docstring(node.body)
        return node


def _digest(nodes: Sequence[ast.AST]) -> str:
    text = "\n".join(ast.dump(_Normalize().visit(n), include_attributes=False) for n in nodes)
    return hashlib.sha256(text.encode()).hexdigest()


def _names(nodes: Iterable[ast.AST]) -> set[str]:
    found = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                found.add(sub.id)
            elif isinstance(sub, ast.Attribute):
                found.add(sub.attr)
    return found


@dataclass
class Unit:
    """One recordable piece of a module: ``kind`` is function, class, constant or module."""

    name: str
    kind: str
    nodes: list = field(default_factory=list)

    @property
    def digest(self) -> str:
        import copy

        return _digest([copy.deepcopy(n) for n in self.nodes])

    @property
    def references(self) -> set[str]:
        """Names the unit mentions (for a constant, in its value: not the names it binds)."""
        if self.kind == "constant":
            return _names(n.value for n in self.nodes if getattr(n, "value", None) is not None)
        return _names(self.nodes)


def _class_units(node: ast.ClassDef, prefix: str, units: dict[str, Unit]) -> None:
    name = f"{prefix}{node.name}"
    shell = ast.ClassDef(name=node.name, bases=node.bases, keywords=node.keywords, decorator_list=node.decorator_list,
                         body=[], type_params=[]) if hasattr(ast.ClassDef, "type_params") else \
        ast.ClassDef(name=node.name, bases=node.bases, keywords=node.keywords, decorator_list=node.decorator_list, body=[])
    for stmt in node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            units[f"{name}.{stmt.name}"] = Unit(f"{name}.{stmt.name}", "function", [stmt])
        elif isinstance(stmt, ast.ClassDef):
            _class_units(stmt, f"{name}.", units)
        else:
            shell.body.append(stmt)
    shell.body = shell.body or [ast.Pass()]
    units[name] = Unit(name, "class", [shell])


def _targets(stmt: ast.stmt) -> list[str] | None:
    """The names a simple module-level assignment binds, or None for any other statement."""
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    else:
        return None
    names = []
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        for e in elts:
            if not isinstance(e, ast.Name):
                return None
            names.append(e.id)
    return names


def units_of_source(source: str, module: str) -> dict[str, Unit]:
    """The units of one module's source, keyed ``"module:qualname"`` (``"module:<module>"`` holds
    the top-level statements that are neither imports, definitions nor simple assignments)."""
    tree = ast.parse(source)
    local: dict[str, Unit] = {}
    rest = []
    body = _Normalize._strip_docstring(tree.body) if tree.body else []
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Pass)):
            continue
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local[stmt.name] = Unit(stmt.name, "function", [stmt])
        elif isinstance(stmt, ast.ClassDef):
            _class_units(stmt, "", local)
        elif (names := _targets(stmt)) is not None:
            for n in names:
                local.setdefault(n, Unit(n, "constant")).nodes.append(stmt)
        else:
            rest.append(stmt)
    if rest:
        local[MODULE_UNIT] = Unit(MODULE_UNIT, "module", rest)
    return {f"{module}:{k}": Unit(f"{module}:{k}", u.kind, u.nodes) for k, u in local.items()}


class CodeIndex:
    """The units of the esnb package as it is on disk now (parsed lazily, module by module)."""

    def __init__(self, package_dir: Path = PACKAGE_DIR):
        self.package_dir = package_dir
        self._modules: dict[str, dict[str, Unit]] = {}

    def units(self, module: str) -> dict[str, Unit]:
        if module not in self._modules:
            path = module_path(module, self.package_dir)
            self._modules[module] = units_of_source(path.read_text(), module) if path else {}
        return self._modules[module]

    def get(self, unit: str) -> Unit | None:
        return self.units(unit.split(":", 1)[0]).get(unit)

    def digests(self, units: Iterable[str]) -> dict[str, str | None]:
        return {u: (x.digest if (x := self.get(u)) is not None else None) for u in sorted(units)}


def used_units(hits: Iterable[str], modules: Iterable[str], cell_sources: Sequence[str] = (),
               index: CodeIndex | None = None) -> set[str]:
    """Close the units that ran over what they depend on: their classes' own statements, the
    module-level constants they (or the notebook's cells) name, and each imported module's rest."""
    index = index or CodeIndex()
    modules = sorted(m for m in set(modules) if m not in INFRASTRUCTURE)
    used = {u for u in hits if u.split(":", 1)[0] not in INFRASTRUCTURE}
    for u in list(used):  # a method ran: its class's fields and defaults were in play
        mod, qual = u.split(":", 1)
        parts = qual.split(".")
        for k in range(1, len(parts)):
            if f"{mod}:{'.'.join(parts[:k])}" in index.units(mod):
                used.add(f"{mod}:{'.'.join(parts[:k])}")
    for mod in modules:
        if f"{mod}:{MODULE_UNIT}" in index.units(mod):
            used.add(f"{mod}:{MODULE_UNIT}")
    constants = {}  # name -> the constant units of that name, own module first
    for mod in modules:
        for key, unit in index.units(mod).items():
            if unit.kind == "constant":
                constants.setdefault(key.split(":", 1)[1], []).append(key)
    todo = list(used)
    cell_names = _cell_identifiers(cell_sources)
    todo.extend(k for n in cell_names for k in constants.get(n, []))
    seen = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        used.add(key)
        unit = index.get(key)
        if unit is None:
            continue
        mod = key.split(":", 1)[0]
        for name in unit.references:
            own = f"{mod}:{name}"
            if own in index.units(mod) and index.units(mod)[own].kind == "constant":
                todo.append(own)
            else:
                todo.extend(constants.get(name, []))
    return used


def _cell_identifiers(sources: Sequence[str]) -> set[str]:
    import re

    found = set()
    for s in sources:
        found |= set(re.findall(r"[A-Za-z_]\w*", s))
    return found


# ------------------------------------------------------------------ cells, files, versions

def cell_digest(source: str) -> str:
    """Hash of a code cell: its syntax tree (comments do not count), or its text when it is not
    plain Python (a cell magic)."""
    try:
        text = ast.dump(ast.parse(source), include_attributes=False)
    except SyntaxError:
        text = "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith("#"))
    return hashlib.sha256(text.encode()).hexdigest()


def code_cell_sources(nb: Any) -> list[str]:
    cells = nb["cells"] if isinstance(nb, dict) else nb.cells
    out = []
    for c in cells:
        if c["cell_type"] != "code":
            continue
        tags = c.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags:
            continue
        src = c["source"]
        out.append("".join(src) if isinstance(src, list) else src)
    return out


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_files(reads: Iterable[str], writes: Iterable[str] = (), root: Path = REPO_ROOT) -> list[str]:
    """The files a run depended on: each file it read under data/ or runs/ and the other files of
    that folder (model weights and tokenizers are opened by native code no audit hook sees), minus
    files it wrote itself and converted-model caches."""
    written = set(writes)
    found = set()
    for rel in reads:
        folder = (root / rel).parent
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            r = p.relative_to(root).as_posix()
            if p.is_file() and r not in written and not r.startswith(CACHE_DIRS) and not p.name.endswith(".tmp"):
                found.add(r)
    return sorted(found)


def hash_files(files: Iterable[str], root: Path = REPO_ROOT) -> dict[str, str | None]:
    out = {}
    for rel in sorted(files):
        p = root / rel
        out[rel] = file_sha256(p) if p.is_file() and p.stat().st_size <= MAX_HASHED_BYTES else None
    return out


def current_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    from importlib import metadata

    out = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------ a run's record

def merge_traces(trace_dir: Path) -> dict:
    """Merge the JSON files :func:`esnb._trace.dump` wrote (the kernel and any process it started)."""
    merged = {"units": set(), "modules": set(), "reads": set(), "writes": set(), "versions": {}}
    files = sorted(Path(trace_dir).glob("*.json"))
    if not files:
        raise ValueError(f"no provenance trace in {trace_dir}: did the notebook import esnb?")
    for f in files:
        t = json.loads(f.read_text())
        for k in ("units", "modules", "reads", "writes"):
            merged[k] |= set(t.get(k, []))
        merged["versions"].update(t.get("versions", {}))
    merged["reads"] -= merged["writes"]
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in merged.items()}


def build_record(trace: Mapping[str, Any], cell_sources: Sequence[str], mode: str,
                 index: CodeIndex | None = None, root: Path = REPO_ROOT) -> dict:
    """The provenance record of one execution (see the module docstring)."""
    index = index or CodeIndex()
    units = used_units(trace["units"], trace["modules"], cell_sources, index)
    code = {u: d for u, d in index.digests(units).items() if d is not None}
    return {"format": FORMAT, "mode": mode, "code": code,
            "cells": [cell_digest(s) for s in cell_sources],
            "data": hash_files(input_files(trace["reads"], trace["writes"], root), root),
            "versions": dict(sorted(trace["versions"].items()))}


# ------------------------------------------------------------------ staleness

@dataclass
class Staleness:
    """What one notebook's record says against the code, files and versions here."""

    notebook: str
    recorded: bool
    changed: list[str] = field(default_factory=list)   # what differs, one phrase each
    cells_changed: bool = False
    smoke_only: bool = False                            # outputs from a smoke run
    verified: list[str] = field(default_factory=list)   # changes a smoke run verified earlier
    changed_units: list[str] = field(default_factory=list)
    changed_files: list[str] = field(default_factory=list)
    changed_versions: list[str] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return not self.recorded or self.smoke_only or bool(self.changed)

    def describe(self) -> str:
        if not self.recorded:
            return f"{self.notebook}: no provenance record (executed before the record existed): re-execute it"
        if self.smoke_only:
            return f"{self.notebook}: its outputs come from a smoke run: execute it in full"
        if self.changed:
            return f"{self.notebook}: stale: " + "; ".join(self.changed)
        tail = f" (verified by smoke after changes to {', '.join(self.verified)})" if self.verified else ""
        return f"{self.notebook}: current{tail}"


def _compare_record(rec: Mapping[str, Any], cells: Sequence[str] | None, index: CodeIndex,
                    root: Path) -> tuple[list[str], list[str], list[str], list[str], bool]:
    changed, units, files, versions = [], [], [], []
    for unit, (old, new) in sorted((u, (d, index.digests([u])[u])) for u, d in rec.get("code", {}).items()):
        if new is None:
            changed.append(f"{unit} removed"); units.append(unit)
        elif new != old:
            changed.append(f"{unit} changed"); units.append(unit)
    cells_changed = False
    if cells is not None:
        old_cells, new_cells = rec.get("cells", []), [cell_digest(s) for s in cells]
        if old_cells != new_cells:
            cells_changed = True
            if len(old_cells) != len(new_cells):
                changed.append(f"its code cells changed ({len(old_cells)} -> {len(new_cells)} cells)")
            else:
                which = [str(i + 1) for i, (a, b) in enumerate(zip(old_cells, new_cells)) if a != b]
                changed.append(f"code cell{'s' if len(which) > 1 else ''} {', '.join(which)} changed")
    for rel, old in sorted(rec.get("data", {}).items()):
        p = root / rel
        if not p.is_file():
            changed.append(f"input {rel} is missing"); files.append(rel)
        elif old is not None and file_sha256(p) != old:
            changed.append(f"input {rel} changed"); files.append(rel)
    now = current_versions(rec.get("versions", {}))
    for name, old in sorted(rec.get("versions", {}).items()):
        if now[name] != old:
            changed.append(f"{name} {old} -> {now[name]}"); versions.append(name)
    return changed, units, files, versions, cells_changed


def check_notebook(path: Path, package_dir: Path = PACKAGE_DIR, root: Path = REPO_ROOT,
                   index: CodeIndex | None = None) -> Staleness:
    """Compare a notebook's provenance record with the code, files and versions here
    (``index``: the package's units, to share between notebooks)."""
    nb = json.loads(Path(path).read_text())
    rec = (nb.get("metadata", {}).get("esnb") or {}).get("provenance")
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        return Staleness(Path(path).name, recorded=False)
    changed, units, files, versions, cells_changed = _compare_record(
        rec, code_cell_sources(nb), index or CodeIndex(package_dir), root)
    return Staleness(Path(path).name, True, changed, cells_changed, rec.get("mode") == "smoke",
                     list(rec.get("verified_by_smoke", [])), units, files, versions)


def stale_notebooks(paths: Iterable[Path], package_dir: Path = PACKAGE_DIR, root: Path = REPO_ROOT) -> list[Staleness]:
    """The notebooks among ``paths`` whose outputs something they depend on has since changed."""
    index = CodeIndex(package_dir)
    return [s for s in (check_notebook(p, package_dir, root, index) for p in paths) if s.stale]


# ------------------------------------------------------------------ verification by smoke

TIMING_KEY = "timing"


def comparable_records(payloads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Records and claims of a run that must come out the same when nothing that matters changed:
    every ``esnb.record`` and ``esnb.claim`` output except those marked as timings."""
    out = {}
    for p in payloads:
        if p.get(TIMING_KEY):
            continue
        if "claim" in p:
            out[f"claim: {p['claim']}"] = {"holds": p.get("holds"), "values": p.get("values", {})}
        else:
            out[p["name"]] = p.get("value")
    return out


def record_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per record that is not the same in both (missing on either side included)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            lines.append(f"{key}: no longer recorded")
        elif key not in old:
            lines.append(f"{key}: new ({_short(new[key])})")
        elif json.dumps(old[key], sort_keys=True) != json.dumps(new[key], sort_keys=True):
            lines.append(f"{key}: {_short(old[key])} -> {_short(new[key])}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def uncovered_changes(rec: Mapping[str, Any], status: Staleness) -> list[str]:
    """The changes a smoke run cannot vouch for: units or files the stored smoke run did not use."""
    smoke = rec.get("smoke") or {}
    out = [u for u in status.changed_units if u not in smoke.get("code", {})]
    out += [f for f in status.changed_files if f not in smoke.get("data", {})]
    return out


def restamp(rec: dict, smoke_rec: Mapping[str, Any], status: Staleness, index: CodeIndex | None = None,
            root: Path = REPO_ROOT) -> dict:
    """The record after a smoke run verified the changes: current hashes of the units that still
    exist plus those the new smoke run used, current files and versions, the new smoke record, and
    the verified changes listed (cumulatively)."""
    index = index or CodeIndex()
    units = {u for u in rec["code"] if index.get(u) is not None} | set(smoke_rec["code"])
    files = {f for f in rec["data"] if (root / f).is_file()} | set(smoke_rec["data"])
    new = dict(rec)
    new["code"] = {u: d for u, d in index.digests(units).items() if d is not None}
    new["data"] = hash_files(files, root)
    new["versions"] = {**current_versions(rec.get("versions", {})), **smoke_rec.get("versions", {})}
    new["smoke"] = dict(smoke_rec)
    verified = list(rec.get("verified_by_smoke", []))
    verified += [c for c in status.changed if c not in verified]
    new["verified_by_smoke"] = verified
    return new
