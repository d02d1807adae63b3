"""Which package code made a notebook's committed outputs, and is that code still current?

When ``python -m esnb execute`` runs a notebook it asks the kernel, after the last cell, which
``esnb`` modules it actually imported, and stores a SHA-256 of each module's source file in the
notebook metadata::

    metadata["esnb"]["sources"] = {"esnb.es": "3f1c...", "esnb.toy": "9a0b...", ...}

Only the imported modules count, so editing ``esnb/generation.py`` does not make notebook 01 (which
never imports it) stale. ``python -m esnb execute --stale`` lists the notebooks whose record no
longer matches the package on disk, and those that carry no record at all.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

PACKAGE = "esnb"
PACKAGE_DIR = Path(__file__).resolve().parent

# Run in the kernel after the notebook's own cells: the esnb modules it imported, with their files.
# The printed line starts with a marker so it is found even if something else prints too.
MARKER = "__esnb_provenance__"
PROBE_SOURCE = (
    "import json as _j, sys as _s\n"
    f"print({MARKER!r} + _j.dumps({{_n: getattr(_m, '__file__', None) for _n, _m in list(_s.modules.items())\n"
    f"    if _m is not None and (_n == {PACKAGE!r} or _n.startswith({PACKAGE!r} + '.'))}}))\n"
)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def hash_modules(modules: Iterable[str], package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """``{module: sha256 of its source}`` for the given esnb module names that have a source file here."""
    hashes = {}
    for name in sorted(set(modules)):
        path = module_path(name, package_dir)
        if path is not None:
            hashes[name] = file_sha256(path)
    return hashes


def parse_probe_output(outputs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The module names printed by :data:`PROBE_SOURCE` (outputs of the probe cell)."""
    for out in outputs:
        if out.get("output_type") != "stream":
            continue
        for line in str(out.get("text", "")).splitlines():
            if line.startswith(MARKER):
                return sorted(json.loads(line[len(MARKER):]))
    raise ValueError("the provenance probe printed no module list")


def record_sources(nb: Any, modules: Iterable[str], package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Store the hashes of ``modules`` in ``nb.metadata["esnb"]["sources"]`` (replacing an old record)."""
    sources = hash_modules(modules, package_dir)
    meta = nb.metadata.setdefault("esnb", {})
    meta["sources"] = sources
    return sources


@dataclass
class Staleness:
    """What one notebook's record says against the package on disk."""

    notebook: str
    recorded: bool
    changed: list[str] = field(default_factory=list)  # modules whose source differs or is gone

    @property
    def stale(self) -> bool:
        return not self.recorded or bool(self.changed)

    def describe(self) -> str:
        if not self.recorded:
            return f"{self.notebook}: no record of the package code (executed before the record existed)"
        if self.changed:
            return f"{self.notebook}: outputs made with older code of {', '.join(self.changed)}"
        return f"{self.notebook}: current"


def check_notebook(path: Path, package_dir: Path = PACKAGE_DIR) -> Staleness:
    """Compare the ``metadata.esnb.sources`` record of a notebook with the current package sources."""
    nb = json.loads(Path(path).read_text())
    sources = (nb.get("metadata", {}).get("esnb") or {}).get("sources")
    if not isinstance(sources, dict):
        return Staleness(Path(path).name, recorded=False)
    changed = []
    for name, digest in sorted(sources.items()):
        current = module_path(name, package_dir)
        if current is None or file_sha256(current) != digest:
            changed.append(name)
    return Staleness(Path(path).name, recorded=True, changed=changed)


def stale_notebooks(paths: Iterable[Path], package_dir: Path = PACKAGE_DIR) -> list[Staleness]:
    """The notebooks among ``paths`` whose outputs were made with other package code, or carry no record."""
    return [s for s in (check_notebook(p, package_dir) for p in paths) if s.stale]


def execute_and_record(client: Any, nb: Any) -> dict[str, str]:
    """Execute ``nb`` with an nbclient ``NotebookClient`` and record which esnb code it imported.

    A probe cell is appended, run last in the same kernel, read, and removed again, so the
    notebook's own cells and outputs are untouched.
    """
    import nbformat

    probe = nbformat.v4.new_code_cell(PROBE_SOURCE)
    nb.cells.append(probe)
    try:
        client.execute()
    finally:
        nb.cells[:] = [c for c in nb.cells if c is not probe]
    return record_sources(nb, parse_probe_output(probe.outputs))
