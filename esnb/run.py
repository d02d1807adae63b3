"""The headless runner: execute the notebook suite with papermill, and execute-in-place for authors.

    python -m esnb run [--smoke] [--only 01 05 ...] [--output DIR] [-p NAME VALUE ...]
    python -m esnb execute notebooks/01_es_in_two_dimensions.ipynb [...]
    python -m esnb doctor
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._env import NOTEBOOKS_DIR, REPO_ROOT, OneLineParser, read_records

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


MAX_VALUE_CHARS = 10_000  # a parameter is a number, a name or a short list; not a file's worth


def parse_value(text: str) -> Any:
    """A ``-p`` value: a Python/JSON literal when it parses as one (3, 0.01, True, [1, 2]), else the string.

    Longer than ``MAX_VALUE_CHARS`` raises ``ValueError`` (deeply nested literals would exhaust
    the parser; nothing is ever run as code either way)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a string, got {type(text).__name__}")
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError(f"value of {len(text):,} characters; at most {MAX_VALUE_CHARS:,} are accepted")
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError, json.JSONDecodeError, RecursionError, MemoryError, TypeError):
            pass
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"none", "null"}:
        return None
    return text


def declared_parameters(path: Path) -> dict[str, Any]:
    """The names in a notebook's ``parameters`` cell (papermill's own inspection)."""
    import papermill as pm

    return pm.inspect_notebook(str(path))


@dataclass
class Outcome:
    notebook: str
    status: str
    seconds: float
    records: dict[str, Any] = field(default_factory=dict)
    error: str = ""


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
        env_before = os.environ.get("ESNB_SMOKE")
        if smoke:
            os.environ["ESNB_SMOKE"] = "1"
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
            if smoke:
                if env_before is None:
                    os.environ.pop("ESNB_SMOKE", None)
                else:
                    os.environ["ESNB_SMOKE"] = env_before
        seconds = time.perf_counter() - start
        records = {}
        if out_path.exists():
            try:
                records = read_records(json.loads(out_path.read_text()))
            except (OSError, ValueError, KeyError):
                pass
        outcomes.append(Outcome(path.name, status, seconds, records, error))
        if status != "ok":
            tqdm.write(f"{path.name} failed at {error}")
    return outcomes


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(outcomes: Sequence[Outcome], smoke: bool = False, width: int = 100) -> str:
    """A plain-text table: notebook, status, seconds, headline numbers (wrapped at ``width``
    characters, between numbers). ``smoke``: say so on top, so quick-run numbers are not
    mistaken for the course's results."""
    rows = [("notebook", "status", "seconds", "headline numbers")]
    for o in outcomes:
        items = [f"{k}={_fmt(v)}" for k, v in o.records.items()]
        if o.error:
            items.insert(0, o.error + (";" if items else ""))
        rows.append((o.notebook, o.status, f"{o.seconds:.1f}", items))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    indent = sum(widths) + 2 * 3
    room = max(30, width - indent)
    lines = []
    if smoke:
        lines.append("SMOKE RUN: quick CI-sized versions; their numbers are not the course's results")
    for i, r in enumerate(rows):
        head = "  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  "
        if i == 0:
            lines.append(head + r[3])
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
            continue
        chunks, current = [], ""
        for item in r[3]:
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


def execute_in_place(path: Path, timeout: int = 3600, smoke: bool = False) -> float:
    """Run a notebook top to bottom in its folder, clean it and write it back; returns seconds."""
    import nbformat
    from nbclient import NotebookClient

    from .provenance import execute_and_record

    nb = nbformat.read(str(path), as_version=4)
    env_before = os.environ.get("ESNB_SMOKE")
    os.environ["ESNB_SMOKE"] = "1" if smoke else "0"
    start = time.perf_counter()
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=_kernel_config(),
                                resources={"metadata": {"path": str(path.parent)}})
        # runs the cells and records which esnb code they imported (python -m esnb execute --stale)
        execute_and_record(client, nb)
    finally:
        if env_before is None:
            os.environ.pop("ESNB_SMOKE", None)
        else:
            os.environ["ESNB_SMOKE"] = env_before
    seconds = time.perf_counter() - start
    clean_notebook(nb)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))
    os.replace(tmp, path)
    return seconds


# ---------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m esnb", description="Run the esnb notebook course headless.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebooks with papermill and summarize")
    run.add_argument("--smoke", action="store_true", help="quick CI-sized version of every notebook")
    run.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers (or name prefixes) to run")
    run.add_argument("--output", type=Path, default=None, help="folder for executed notebooks (default runs/<time>)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a notebook parameter, e.g. -p seed 1 (only notebooks that declare it get it)")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    run.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)

    ex = sub.add_parser("execute", help="execute notebooks in place and strip run noise (for committing)")
    ex.add_argument("paths", nargs="*", type=Path)
    ex.add_argument("--stale", action="store_true",
                    help="execute nothing: list the notebooks (default all) whose outputs were made with older esnb code")
    ex.add_argument("--smoke", action="store_true", help="execute in smoke mode (default: full)")
    ex.add_argument("--timeout", type=int, default=3600, help="seconds per cell")

    sub.add_parser("doctor", help="check the environment: packages, device, offline models")

    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main()
    if args.command == "execute" and args.stale:
        from .provenance import stale_notebooks

        missing = [str(p) for p in args.paths if not p.is_file()]
        if missing:
            parser.error(f"no such notebook: {', '.join(missing)}")
        stale = stale_notebooks(args.paths or find_notebooks())
        for item in stale:
            print(item.describe())
        print(f"{len(stale)} notebook(s) stale" if stale else "every notebook's outputs match the current esnb code")
        return 0
    if args.command == "execute":
        if not args.paths:
            parser.error("execute needs notebook paths (or --stale)")
        for path in args.paths:
            if not path.exists():
                parser.error(f"no such notebook: {path}")
            seconds = execute_in_place(path, timeout=args.timeout, smoke=args.smoke)
            print(f"{path.name}: executed in {seconds:.1f} s")
        return 0

    try:
        notebooks = find_notebooks(args.notebooks, args.only)
    except ValueError as exc:
        parser.error(str(exc))
    if not notebooks:
        parser.error(f"no notebooks found in {args.notebooks}")
    params = {}
    for name, value in args.parameter:
        try:
            params[name] = parse_value(value)
        except ValueError as exc:
            parser.error(f"-p {name[:40]}: {exc}")
    declared_anywhere = set()
    for nb in notebooks:
        declared_anywhere |= set(declared_parameters(nb))
    unknown = sorted(set(params) - declared_anywhere)
    if unknown:
        parser.error(f"parameter(s) {', '.join(unknown)} not declared by any selected notebook")
    output = args.output or REPO_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    if output.exists() and not output.is_dir():
        parser.error(f"--output: {output} is a file, not a folder")
    outcomes = run_suite(notebooks, output, params, smoke=args.smoke, kernel=args.kernel)
    print()
    print(summary_table(outcomes, smoke=args.smoke))
    failed = [o for o in outcomes if o.status != "ok"]
    total = sum(o.seconds for o in outcomes)
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} notebooks ran{' (smoke mode)' if args.smoke else ''} "
          f"in {total:.0f} s; executed copies in {output}")
    return 1 if failed else 0
