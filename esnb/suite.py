"""The headless runner: execute the notebook suite with papermill, and execute-in-place for authors.

    python -m esnb run [--smoke] [--only 01 05 ...] [--output DIR] [-p NAME VALUE ...]
    python -m esnb execute notebooks/01_es_in_two_dimensions.ipynb [...]
    python -m esnb doctor
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._env import MAX_VALUE_CHARS, NOTEBOOKS_DIR, REPO_ROOT, OneLineParser, parse_value, read_claims, read_payloads, read_records  # noqa: F401,E501

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def find_notebooks(directory: Path = NOTEBOOKS_DIR, only: Sequence[str] | None = None) -> list[Path]:
    """The course notebooks in order; ``only`` keeps those whose number or name starts with a given prefix."""
    found = sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if not only:
        return found
    wanted = [str(o).strip() for o in only]
    chosen = [p for p in found if any(p.name.startswith(w) or p.name.startswith(w.zfill(2) + "_") for w in wanted)]
    missing = [w for w in wanted if not any(p.name.startswith(w) or p.name.startswith(w.zfill(2) + "_") for p in found)]
    if missing:
        names = ", ".join(p.name[:2] for p in found) or "none"
        raise ValueError(f"no notebook matches {', '.join(missing)} (available: {names})")
    return chosen


class _NoDefault:
    """A parameter whose default is not a literal: any value is accepted."""

    def __repr__(self) -> str:
        return "<not a literal>"


NO_DEFAULT = _NoDefault()


def declared_parameters(path: Path) -> dict[str, Any]:
    """``{name: default}`` of a notebook's ``parameters`` cell (read from the file: no kernel,
    no papermill, so that a bad ``-p`` is answered at once)."""
    nb = json.loads(Path(path).read_text())
    found: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        for stmt in ast.parse(source).body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                [stmt.target] if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else []
            for t in targets:
                if isinstance(t, ast.Name):
                    try:
                        found[t.id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        found[t.id] = NO_DEFAULT
    return found


_KINDS = [(bool, "True or False"), (int, "an integer"), (float, "a number"), (str, "a string"),
          (list, "a list"), (tuple, "a tuple"), (dict, "a dict")]


def parameter_error(name: str, value: Any, default: Any, text: str) -> str | None:
    """Why ``value`` (parsed from ``text``) cannot replace a parameter whose default is ``default``,
    or None when it can. A None default, or one that is not a literal, accepts anything."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{text!r} is not a finite number"
    if default is None or default is NO_DEFAULT:
        return None
    for kind, words in _KINDS:
        if isinstance(default, kind):
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind in (list, tuple):
                ok = isinstance(value, (list, tuple))
            if ok:
                return None
            hint = " (not a Python literal)" if isinstance(value, str) and kind is not str else ""
            return f"expects {words} (its default is {default!r}), got {text!r}{hint}"
    return None


@dataclass
class Outcome:
    notebook: str
    status: str
    seconds: float
    records: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    claims: list[dict] = field(default_factory=list)

    @property
    def claims_held(self) -> str:
        """``"12 of 12 hold"``, or ``""`` when the notebook states none."""
        if not self.claims:
            return ""
        return f"{sum(bool(c.get('holds')) for c in self.claims)} of {len(self.claims)} hold"


def _code_cells(nb: dict) -> list[dict]:
    # Count code cells as the author sees them: without papermill's injected-parameters cell.
    return [c for c in nb.get("cells", []) if c.get("cell_type") == "code"
            and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def _cell_label(i: int, cell: dict) -> str:
    source = cell.get("source", "")
    first = "".join(source).strip().splitlines()[:1] if isinstance(source, (list, str)) else []
    return f"{i}" + (f" ({first[0][:60]!r})" if first else "")


def failed_cell(nb: dict) -> tuple[str, dict] | None:
    """``(label, error output)`` of the first code cell of an executed notebook that raised,
    ``SystemExit`` included (IPython shows it as an error and papermill goes on as if nothing
    happened), or ``None``."""
    for i, c in enumerate(_code_cells(nb), start=1):
        for o in c.get("outputs", []) or []:
            if o.get("output_type") == "error":
                return _cell_label(i, c), o
    return None


def _last_started_cell(nb: dict) -> str:
    """The last code cell papermill started: the one running when the kernel died or timed out."""
    label = "?"
    for i, c in enumerate(_code_cells(nb), start=1):
        if (c.get("metadata", {}).get("papermill") or {}).get("start_time"):
            label = _cell_label(i, c)
    return label


def _describe_failure(exc: BaseException | None, nb_path: Path) -> str:
    # papermill's error names the exception; the executed notebook tells which cell it was.
    nb: dict = {}
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        pass
    found = failed_cell(nb) if isinstance(nb, dict) else None
    if found is not None:
        cell, out = found
        ename, evalue = out.get("ename", "error"), str(out.get("evalue", ""))
    else:  # no error output: the kernel died or a cell timed out while running
        cell = _last_started_cell(nb) if isinstance(nb, dict) else "?"
        ename = getattr(exc, "ename", type(exc).__name__ if exc is not None else "error")
        evalue = str(getattr(exc, "evalue", exc if exc is not None else ""))
    evalue = evalue.strip().splitlines()[-1] if evalue.strip() else ""
    return f"code cell {cell}: {ename}: {evalue}".rstrip(": ")


def _kernel_config() -> Any:
    """Talk to the kernel over IPC sockets where the system has them: over TCP ipykernel warns on
    every start that the traffic is unencrypted, noise in every clean run's output."""
    import tempfile
    import uuid

    from traitlets.config import Config

    if os.name != "posix":
        return Config()
    # An absolute socket prefix: an IPC "ip" is a file path, and a relative one would be resolved
    # in the kernel's working folder (the notebook's) by the kernel but in ours by the client.
    prefix = os.path.join(tempfile.gettempdir(), f"esnb-kernel-{uuid.uuid4().hex[:12]}")
    return Config({"KernelManager": {"transport": "ipc", "ip": prefix}})


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def run_environment(smoke: bool) -> dict[str, str]:
    """The environment a notebook runs in, whoever starts it: smoke mode as asked, and offline
    (the course's default; a caller who set ``HF_HUB_OFFLINE=0`` to reach the hub keeps it), so
    that a reader's run and the committed one see the same models."""
    env = {"ESNB_SMOKE": "1" if smoke else "0"}
    for var in OFFLINE_VARS:
        env[var] = os.environ.get(var, "1")
    return env


def run_suite(notebooks: Sequence[Path], output: Path, parameters: dict[str, Any], smoke: bool,
              kernel: str = "python3", progress: bool = True) -> list[Outcome]:
    """Execute each notebook with papermill into ``output``; a failure does not stop the rest."""
    import papermill as pm
    from tqdm.auto import tqdm

    output.mkdir(parents=True, exist_ok=True)
    outcomes = []
    bar = tqdm(notebooks, desc="notebooks", unit="nb", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.name)
        declared = declared_parameters(path)
        params = {k: v for k, v in parameters.items() if k in declared}
        if smoke and "smoke" in declared:
            params["smoke"] = True
        out_path = output / path.name
        start = time.perf_counter()
        before = _set_env(run_environment(smoke))
        try:
            pm.execute_notebook(str(path), str(out_path), parameters=params, kernel_name=kernel,
                                cwd=str(path.parent), progress_bar=False, log_output=False,
                                config=_kernel_config())
            status, error = "ok", ""
            if out_path.exists() and failed_cell(json.loads(out_path.read_text())) is not None:
                # sys.exit() in a cell: papermill carries on, but the notebook did not run through
                status, error = "FAILED", _describe_failure(None, out_path)
        except Exception as exc:  # noqa: BLE001 - any failure is reported and the suite goes on
            status, error = "FAILED", _describe_failure(exc, out_path)
        finally:
            _set_env(before)
        seconds = time.perf_counter() - start
        records, claims = {}, []
        if out_path.exists():
            try:
                executed = json.loads(out_path.read_text())
                records, claims = read_records(executed), read_claims(executed)
            except (OSError, ValueError, KeyError):
                pass
        outcomes.append(Outcome(path.name, status, seconds, records, error, claims))
        if status != "ok":
            tqdm.write(f"{path.name} failed at {error}")
    return outcomes


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(outcomes: Sequence[Outcome], smoke: bool = False, width: int = 100, numbers: bool = False) -> str:
    """A plain-text table of one line per notebook: status, seconds, how many of its claims hold
    and, if it failed, where. ``numbers``: add the headline numbers (wrapped at ``width``
    characters, between numbers). ``smoke``: say so on top, so quick-run numbers are not
    mistaken for the course's results."""
    rows = [("notebook", "status", "seconds", "claims", "headline numbers" if numbers else "")]
    for o in outcomes:
        items = [f"{k}={_fmt(v)}" for k, v in o.records.items()] if numbers else []
        if o.error:
            items.insert(0, o.error + (";" if items else ""))
        rows.append((o.notebook, o.status, f"{o.seconds:.1f}", o.claims_held or "-", items))
    return _table(rows, smoke, width)


def _table(rows: list, smoke: bool, width: int) -> str:
    ncol = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    indent = sum(widths) + 2 * ncol
    room = max(30, width - indent)
    lines = []
    if smoke:
        lines.append("SMOKE RUN: quick CI-sized versions; their numbers are not the course's results")
    for i, r in enumerate(rows):
        head = "  ".join(r[j].ljust(widths[j]) for j in range(ncol)) + "  "
        if i == 0:
            lines.append((head + r[ncol]).rstrip())
            lines.append(("  ".join("-" * w for w in widths) + "  " + ("-" * 16 if r[ncol] else "")).rstrip())
            continue
        chunks, current = [], ""
        for item in r[ncol]:
            piece = item if not current else (current + (" " if current.endswith(";") else ", ") + item)
            if current and len(piece) > room:
                chunks.append(current + ("" if current.endswith(";") else ","))
                current = item
            else:
                current = piece
        chunks.append(current)
        lines.append((head + chunks[0]).rstrip())
        lines.extend(" " * indent + c for c in chunks[1:])
    return "\n".join(lines)


# ---------------------------------------------------------------- execute in place (authors)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean_notebook(nb: Any) -> None:
    """Strip what changes from run to run or machine to machine, so diffs show real changes."""
    home = str(Path.home())
    root = str(REPO_ROOT)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("jupytext", None)
    # papermill needs to know the kernel; notebooks made from scripts may not say
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"})
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.get("output_type") == "stream":
                text = _ANSI.sub("", out.get("text", ""))
                # tqdm's bars and library warnings are noise in a committed notebook
                lines = [ln for ln in text.splitlines(keepends=True)
                         if not re.search(r"\d+%\|.*\|", ln) and "Warning:" not in ln and "warnings.warn" not in ln]
                text = "".join(lines).replace(root, "<repo>").replace(home, "~")
                if not text.strip():
                    continue
                out["text"] = text
            elif "data" in out:
                for mime in ("text/plain", "text/html"):
                    if mime in out["data"] and isinstance(out["data"][mime], str):
                        out["data"][mime] = out["data"][mime].replace(root, "<repo>").replace(home, "~")
            kept.append(out)
        cell.outputs = kept


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, remove) environment variables; returns their previous values."""
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return before


def execute_traced(nb: Any, folder: Path, smoke: bool, timeout: int = 3600) -> tuple[float, dict]:
    """Run ``nb`` (an nbformat notebook, in place) top to bottom in ``folder`` with provenance
    tracing on; returns (seconds, the merged trace of the kernel and every process it started).

    A last cell, removed again afterwards, has the kernel write its trace; other processes
    (torchrun workers, probes) write theirs when they exit."""
    import tempfile

    import nbformat
    from nbclient import NotebookClient

    from . import _trace
    from .provenance import merge_traces

    with tempfile.TemporaryDirectory(prefix="esnb-trace-") as trace_dir:
        probe = nbformat.v4.new_code_cell("import esnb._trace\nesnb._trace.dump();")
        nb.cells.append(probe)
        before = _set_env({**run_environment(smoke), _trace.ENV_VAR: trace_dir})
        start = time.perf_counter()
        try:
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=_kernel_config(),
                                    resources={"metadata": {"path": str(folder)}})
            client.execute()
        finally:
            _set_env(before)
            nb.cells[:] = [c for c in nb.cells if c is not probe]
        seconds = time.perf_counter() - start
        return seconds, merge_traces(Path(trace_dir))


def smoke_record(path: Path, timeout: int = 3600) -> tuple[dict, float]:
    """Run a notebook's smoke version (on a copy: the file is not touched) and return its
    provenance record with its comparable records (``"records"``), and the seconds it took."""
    import nbformat

    from .provenance import build_record, code_cell_sources, comparable_records

    copy = nbformat.read(str(path), as_version=4)
    seconds, trace = execute_traced(copy, path.parent, smoke=True, timeout=timeout)
    rec = build_record(trace, code_cell_sources(copy), mode="smoke")
    rec.pop("cells")
    rec["records"] = comparable_records(read_payloads(json.loads(nbformat.writes(copy))))
    return rec, seconds


def execute_in_place(path: Path, timeout: int = 3600, smoke: bool = False, with_smoke_record: bool = True) -> float:
    """Run a notebook top to bottom in its folder, clean it, store its provenance and write it back.

    A full run is followed by a smoke run of a copy, whose record and records are stored too
    (``--verify`` compares later smoke runs with them). Returns the seconds of the main run."""
    import nbformat

    from .provenance import build_record, code_cell_sources

    nb = nbformat.read(str(path), as_version=4)
    seconds, trace = execute_traced(nb, path.parent, smoke=smoke, timeout=timeout)
    clean_notebook(nb)
    rec = build_record(trace, code_cell_sources(nb), mode="smoke" if smoke else "full")
    if not smoke and with_smoke_record:
        rec["smoke"], _ = smoke_record(path, timeout)
    meta = nb.metadata.setdefault("esnb", {})
    meta.pop("sources", None)  # the record before provenance format 2
    meta["provenance"] = rec
    _write_notebook(nb, path)
    return seconds


def _write_notebook(nb: Any, path: Path) -> None:
    import nbformat

    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))
    os.replace(tmp, path)


@dataclass
class Verification:
    notebook: str
    verdict: str          # "current", "verified", "needs a full run"
    lines: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = f"{self.notebook}: {self.verdict}"
        return "\n".join([head, *("    " + ln for ln in self.lines)])


def verify_notebook(path: Path, timeout: int = 3600) -> Verification:
    """Verify a stale notebook by its smoke version instead of re-running it in full.

    Its smoke run must use every changed unit and file (else only a full run can tell) and give
    the same records and claims as the smoke run stored at its last full execution; then the
    provenance is re-stamped as verified by smoke (outputs untouched). Otherwise says why not."""
    import nbformat

    from .provenance import check_notebook, record_differences, restamp, uncovered_changes

    status = check_notebook(path)
    name = path.name
    if not status.stale:
        return Verification(name, "current")
    if not status.recorded or status.smoke_only:
        return Verification(name, "needs a full run", [status.describe()])
    nb = nbformat.read(str(path), as_version=4)
    rec = nb.metadata["esnb"]["provenance"]
    if "smoke" not in rec:
        return Verification(name, "needs a full run", ["no smoke record was stored at its last full run"])
    if status.cells_changed:
        return Verification(name, "needs a full run", ["its own code cells changed: " + "; ".join(status.changed)])
    uncovered = uncovered_changes(rec, status)
    if uncovered:
        return Verification(name, "needs a full run",
                            [f"{u}: changed, and only the full version uses it" for u in uncovered])
    new_smoke, seconds = smoke_record(path, timeout)
    diffs = record_differences(rec["smoke"]["records"], new_smoke["records"])
    if diffs:
        return Verification(name, "needs a full run",
                            [f"the smoke run's records moved ({seconds:.0f} s):", *("  " + d for d in diffs)])
    nb.metadata["esnb"]["provenance"] = restamp(rec, new_smoke, status)
    _write_notebook(nb, path)
    return Verification(name, "verified", [f"smoke run in {seconds:.0f} s gave the same "
                                           f"{len(new_smoke['records'])} records and claims after: "
                                           + "; ".join(status.changed)])


# ---------------------------------------------------------------- command line

LOCK_NAME = "esnb-execute.lock"


def machine_lock() -> Any:
    """Hold the machine-wide lock of notebook runs: two runs at once on a small machine make every
    timing in both wrong (a run logged 18x slower that way), so the second one waits, in turn
    with anyone who took the same lock with ``flock /tmp/esnb-execute.lock <command>``. A run
    started by the lock's holder (``flock ... pytest`` calling the runner) goes ahead."""
    import contextlib
    import tempfile

    path = os.environ.get("ESNB_LOCK_FILE") or os.path.join(tempfile.gettempdir(), LOCK_NAME)
    try:
        import fcntl
    except ImportError:  # not a Unix: a polling lock does the same job
        from filelock import FileLock

        return FileLock(path)
    fh = open(path, "a")

    @contextlib.contextmanager
    def held():
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if _held_by_an_ancestor(path):
                    yield
                    return
                print("another notebook run (python -m esnb run / execute, or a command under flock "
                      f"{path}) is going on this machine: waiting for it to finish, since two at once make "
                      "every timing wrong", file=sys.stderr, flush=True)
                fcntl.flock(fh, fcntl.LOCK_EX)  # blocking: the kernel queues the waiters in turn
            yield
        finally:
            fh.close()

    return held()


def _held_by_an_ancestor(path: str) -> bool:
    """Whether the flock on ``path`` is held by this process's parent, grandparent, ... (Linux)."""
    try:
        inode = os.stat(path).st_ino
        holders = set()
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                continue
            if int(fields[5].rsplit(":", 1)[1]) == inode:
                holders.add(int(fields[4]))
        pid = os.getpid()
        while pid > 1:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid in holders:
                return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def build_parser() -> argparse.ArgumentParser:
    """``python -m esnb``'s arguments: ``run``, ``execute`` and ``doctor``."""
    parser = OneLineParser(prog="python -m esnb", description="Run the esnb notebook course headless.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebooks with papermill and summarize")
    run.add_argument("--smoke", action="store_true", help="quick CI-sized version of every notebook")
    run.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers (or name prefixes) to run")
    run.add_argument("--output", type=Path, default=None, help="folder for executed notebooks (default runs/<time>)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a notebook parameter, e.g. -p seed 1 (only notebooks that declare it get it)")
    run.add_argument("--numbers", action="store_true",
                     help="also print each notebook's headline numbers (they are always written to DIR/summary.json)")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    run.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)

    ex = sub.add_parser("execute", help="execute notebooks in place and strip run noise (for committing)")
    ex.add_argument("paths", nargs="*", type=Path)
    ex.add_argument("--stale", action="store_true",
                    help="execute nothing: list the notebooks (default all) whose outputs depend on code, files or "
                         "versions that changed since, and what changed")
    ex.add_argument("--verify", action="store_true",
                    help="re-run the stale notebooks among PATHS (default all) in smoke mode; where the changes are "
                         "all used by the smoke run and its records are unchanged, mark them verified by smoke")
    ex.add_argument("--smoke", action="store_true", help="execute in smoke mode (default: full)")
    ex.add_argument("--timeout", type=int, default=3600, help="seconds per cell")

    sub.add_parser("doctor", help="check the environment: packages, device, offline models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main()
    if args.command == "execute":
        return _execute_command(parser, args)
    return _run_command(parser, args)


def _execute_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.stale or args.verify:
        return _check_command(parser, args)
    if not args.paths:
        parser.error("execute needs notebook paths (or --stale)")
    for path in args.paths:
        if not path.exists():
            parser.error(f"no such notebook: {path}")
    with machine_lock():
        for path in args.paths:
            seconds = execute_in_place(path, timeout=args.timeout, smoke=args.smoke)
            print(f"{path.name}: executed in {seconds:.1f} s ({'smoke' if args.smoke else 'full'}; "
                  f"provenance{'' if args.smoke else ' and smoke record'} stored)", flush=True)
    return 0


def _check_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``execute --stale`` (list) or ``execute --verify`` (smoke-verify) over PATHS, default all."""
    from .provenance import check_notebook

    missing = [str(p) for p in args.paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.stale and args.verify:
        parser.error("--stale lists, --verify acts: give one of them")
    paths = args.paths or find_notebooks()
    if args.verify:
        with machine_lock():
            results = [verify_notebook(p, timeout=args.timeout) for p in paths]
        for r in results:
            print(r.describe(), flush=True)
        left = [r.notebook for r in results if r.verdict == "needs a full run"]
        print(f"{len(left)} notebook(s) need a full run: {', '.join(left)}" if left
              else "every notebook is current or verified by smoke")
        return 1 if left else 0
    statuses = [check_notebook(p) for p in paths]
    stale = [s for s in statuses if s.stale]
    for item in statuses:
        if item.stale or item.verified:
            print(item.describe())
    print(f"{len(stale)} notebook(s) stale" if stale else "no notebook is stale: every one's outputs match the "
          "code, files and versions it depends on")
    return 0


def _checked_parameters(parser: argparse.ArgumentParser, pairs: Sequence[Sequence[str]],
                        notebooks: Sequence[Path]) -> dict[str, Any]:
    """``-p NAME VALUE`` pairs as values, each checked against the default of every selected
    notebook that declares it; errors go through ``parser.error`` (one line, before anything runs)."""
    params = {}
    declared = {nb: declared_parameters(nb) for nb in notebooks}
    for name, text in pairs:
        try:
            params[name] = parse_value(text)
        except ValueError as exc:
            parser.error(f"-p {name[:40]}: {exc}")
        if name == "smoke" and not isinstance(params[name], bool):
            parser.error(f"-p smoke: takes True or False, got {text!r} (or use --smoke)")
        for nb, defaults in declared.items():
            if name in defaults and (why := parameter_error(name, params[name], defaults[name], text)):
                parser.error(f"-p {name}: notebook {nb.name[:2]} {why}")
    unknown = sorted(set(params) - {n for d in declared.values() for n in d})
    if unknown:
        parser.error(f"parameter(s) {', '.join(unknown)} not declared by any selected notebook")
    return params


def _run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        notebooks = find_notebooks(args.notebooks, args.only)
    except ValueError as exc:
        parser.error(str(exc))
    if not notebooks:
        parser.error(f"no notebooks found in {args.notebooks}")
    params = _checked_parameters(parser, args.parameter, notebooks)
    output = args.output or REPO_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    if output.exists() and not output.is_dir():
        parser.error(f"--output: {output} is a file, not a folder")
    with machine_lock():
        outcomes = run_suite(notebooks, output, params, smoke=args.smoke, kernel=args.kernel)
    summary = output / "summary.json"
    summary.write_text(json.dumps({"smoke": args.smoke, "environment": run_environment(args.smoke),
                                   "notebooks": [asdict(o) for o in outcomes]}, indent=1, default=str))
    print()
    print(summary_table(outcomes, smoke=args.smoke, numbers=args.numbers))
    failed = [o for o in outcomes if o.status != "ok"]
    total = sum(o.seconds for o in outcomes)
    env = run_environment(args.smoke)
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} notebooks ran{' (smoke mode)' if args.smoke else ''} "
          f"in {total:.0f} s, with {', '.join(f'{k}={v}' for k, v in env.items() if k in OFFLINE_VARS)}; "
          f"executed copies in {output}, headline numbers and claims in {summary}")
    return 1 if failed else 0
