"""Record what a process really used of esnb: which functions ran, which data files it read.

Off unless the environment variable ``ESNB_TRACE_DIR`` names a folder (``python -m esnb execute``
sets it for the kernel, and so for every process the notebook starts: torchrun workers, probes).
Then ``import esnb`` calls :func:`start_from_env`, and from there on

* every ``esnb`` module is compiled with one extra first statement in each top-level function and
  method, ``__esnb_hit__("esnb.noise:noise_correlation")``, that adds the function's name to a set
  (about 0.1 us a call, only in esnb's own functions: a tracer such as ``sys.settrace`` would slow
  every line of every library by up to a third, and the notebooks time things);
* the generated ``__init__`` of each esnb dataclass notes its class the same way;
* an audit hook notes the files opened under ``data/`` and ``runs/``, read or written;

and :func:`dump` (called by the runner's last cell, and at exit in other processes) writes them as
JSON into that folder. ``esnb.provenance`` turns the names into hashes of the code and files.
Stdlib only: this module is imported before anything else of esnb.
"""
from __future__ import annotations

import ast
import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys

ENV_VAR = "ESNB_TRACE_DIR"
PACKAGE = "esnb"
from .paths import REPO_ROOT  # noqa: E402
WATCHED_DIRS = ("data", "runs")  # inputs a notebook may read, relative to the repository
HIT = "__esnb_hit__"  # the global name instrumented code calls

_hits: set[str] = set()
_reads: set[str] = set()
_writes: set[str] = set()
_started = False
_dumped_to: str | None = None


def _hit(unit: str) -> None:
    _hits.add(unit)


# ------------------------------------------------------------------ instrumented compilation

class _Instrument(ast.NodeTransformer):
    """Insert ``__esnb_hit__(unit)`` at the top of each top-level function and method body."""

    def __init__(self, module: str):
        self.module = module
        self.scope: list[str] = []

    def _body(self, node, unit: str):
        call = ast.Expr(ast.Call(ast.Name(HIT, ast.Load()), [ast.Constant(unit)], []))
        ast.copy_location(call, node.body[0])
        ast.fix_missing_locations(call)
        node.body.insert(0, call)

    def visit_ClassDef(self, node: ast.ClassDef):
        self.scope.append(node.name)
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.visit(stmt)
        self.scope.pop()
        return node

    def visit_FunctionDef(self, node):
        # Nested functions are part of their outer function's unit: it ran if they did.
        self._body(node, f"{self.module}:{'.'.join([*self.scope, node.name])}")
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def instrument(self, tree: ast.Module) -> ast.Module:
        for stmt in tree.body:  # top level only: defs inside if/try belong to the module's own unit
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.visit(stmt)
        return tree


class _Loader(importlib.machinery.SourceFileLoader):
    """Compiles esnb modules with the hit calls; never reads or writes .pyc files (a cached
    instrumented module would call ``__esnb_hit__`` in a process that does not define it)."""

    def get_code(self, fullname):
        source = self.get_data(self.path)
        tree = _Instrument(fullname).instrument(ast.parse(source, self.path))
        return compile(tree, self.path, "exec", dont_inherit=True)

    def exec_module(self, module):
        module.__dict__[HIT] = _hit
        super().exec_module(module)
        _note_dataclasses(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _Loader(fullname, spec.origin)
        return spec


def _note_dataclasses(module) -> None:
    """Wrap each dataclass's generated ``__init__`` (it has no source to instrument) so that
    making an instance notes the class: its field defaults are code the notebook used."""
    import dataclasses
    import functools

    for obj in list(vars(module).values()):
        if not (isinstance(obj, type) and obj.__module__ == module.__name__ and dataclasses.is_dataclass(obj)):
            continue
        init = obj.__dict__.get("__init__")
        if init is None or getattr(init, "__code__", None) is None or init.__code__.co_filename != "<string>":
            continue
        unit = f"{module.__name__}:{obj.__qualname__}"

        def wrapped(*args, __init=init, __unit=unit, **kwargs):
            _hits.add(__unit)
            return __init(*args, **kwargs)

        functools.update_wrapper(wrapped, init)
        obj.__init__ = wrapped


# ------------------------------------------------------------------ files

_WATCHED = tuple(str(REPO_ROOT / d) + os.sep for d in WATCHED_DIRS)


def _watched(path) -> str | None:
    """``path`` relative to the repository when it lies under a watched folder, else None."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return None  # a file descriptor
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO_ROOT) if path.startswith(_WATCHED) else None


def _audit(event: str, args) -> None:
    if event == "os.rename" and len(args) >= 2:
        # an atomic write (a temporary file renamed over the target, os.replace too) writes its target:
        # a run that reads back what it wrote itself does not depend on that file
        target = _watched(args[1])
        if target is not None:
            _writes.add(target)
        return
    if event != "open" or not args:
        return
    path = _watched(args[0])
    if path is None:
        return
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    if isinstance(mode, str):
        writing = any(ch in mode for ch in "wax+")
    else:
        writing = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    (_writes if writing else _reads).add(path)


# ------------------------------------------------------------------ start and dump

def start(directory: str | os.PathLike) -> None:
    """Start recording in this process (once); :func:`dump` writes into ``directory``."""
    global _started, _dumped_to
    if _started:
        return
    _started = True
    _dumped_to = str(directory)
    # Also a builtin: ``python -m esnb.x`` runs the instrumented module in runpy's own globals,
    # which our loader never sees.
    import builtins

    setattr(builtins, HIT, _hit)
    sys.meta_path.insert(0, _Finder())
    sys.addaudithook(_audit)
    atexit.register(dump)


def start_from_env() -> None:
    """Start recording if ``ESNB_TRACE_DIR`` is set (called by ``import esnb``)."""
    directory = os.environ.get(ENV_VAR)
    if directory:
        start(directory)


def snapshot() -> dict:
    """What this process used so far: function units, modules, files and library versions."""
    modules = sorted(n for n, m in list(sys.modules.items())
                     if m is not None and (n == PACKAGE or n.startswith(PACKAGE + ".")))
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    from importlib import metadata

    for name in ("torch", "numpy", "transformers", "trl"):  # the ones whose numbers reach the outputs
        if name in sys.modules:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = getattr(sys.modules[name], "__version__", "?")
    return {"pid": os.getpid(), "units": sorted(_hits), "modules": modules,
            "reads": sorted(_reads - _writes), "writes": sorted(_writes), "versions": versions}


def dump() -> str | None:
    """Write :func:`snapshot` to ``<ESNB_TRACE_DIR>/<pid>.json``; returns the path (None if off)."""
    if not _started or not _dumped_to:
        return None
    os.makedirs(_dumped_to, exist_ok=True)
    path = os.path.join(_dumped_to, f"{os.getpid()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(snapshot(), fh)
    os.replace(tmp, path)
    return path
