"""Small helpers every notebook uses: where the data lives, smoke mode, headline records, claims."""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
from typing import Any

from .paths import DATA_DIR, NOTEBOOKS_DIR, REPO_ROOT  # noqa: F401 - the names notebooks use

# A custom MIME type lets the headless runner find headline numbers in an executed
# notebook without scraping printed text.
RECORD_MIME = "application/vnd.esnb.record+json"
CLAIM_MIME = "application/vnd.esnb.claim+json"


def smoke_mode(flag: bool | None = None) -> bool:
    """True when a notebook should run its quick CI-sized version.

    An explicit ``flag=True`` (the papermill ``smoke`` parameter) wins; otherwise the
    environment variable ``ESNB_SMOKE`` decides, so that ``pytest --nbval`` (which cannot
    inject parameters) still gets the quick version. The answer is remembered: :func:`claim`
    fails a full run only.
    """
    global _smoke
    _smoke = bool(flag) or os.environ.get("ESNB_SMOKE", "").strip().lower() in {"1", "true", "yes", "on"}
    return _smoke


_smoke: bool | None = None  # what smoke_mode() last answered in this process
RECORDED: dict[str, Any] = {}  # this process's records, for report()


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _display(bundle: dict, text: str) -> None:
    try:
        from IPython.display import display

        display({**bundle, "text/plain": text}, raw=True)
    except ImportError:  # plain Python: printing is enough
        print(text)


def record(name: str, value: Any, timing: bool = False) -> None:
    """Show a headline number and leave it where ``python -m esnb run`` can collect it.

    ``timing=True`` marks a wall-clock time, speed or memory figure: it changes from run to run,
    so ``python -m esnb execute --verify`` does not compare it."""
    RECORDED[name] = value
    payload = {"name": name, "value": value, **({"timing": True} if timing else {})}
    _display({RECORD_MIME: payload}, f"{name} = {_shown(value)}")


class ClaimFailed(AssertionError):
    """A sentence of a notebook's prose that this run's numbers no longer support."""


def claim(text: str, holds: Any, timing: bool = False, **values: Any) -> None:
    """Check a sentence the notebook's prose states about its results against this run.

    ``holds`` is the condition computed from the run (``acc_after > acc_before``); ``values`` are
    the numbers it rests on, shown beside the verdict. A claim that does not hold stops a full run
    with :class:`ClaimFailed` (change the prose, or find out what changed); in smoke mode, whose
    sizes are too small to support most claims, it is only reported. ``timing=True``: the claim
    is about wall-clock times (``--verify`` does not compare it).
    """
    ok = bool(holds)
    shown = ", ".join(f"{k} = {_shown(v)}" for k, v in values.items())
    line = f"{'✓' if ok else '✗'} claim: {text}" + (f"  [{shown}]" if shown else "")
    smoke = _smoke if _smoke is not None else smoke_mode()
    if not ok and smoke:
        line += "  (smoke run: not checked)"
    payload = {"claim": text, "holds": ok, "values": _jsonable(values), **({"timing": True} if timing else {})}
    _display({CLAIM_MIME: payload}, line)
    if not ok and not smoke:
        raise ClaimFailed(f"this run does not support the claim: {text!r} ({shown or 'no values'})")


def _jsonable(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
            v = v.item()  # numpy / torch scalars
        elif hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else repr(v)
    return out


def report(template: str, **values: Any) -> str:
    """Show markdown whose numbers come from this run: ``{name}`` / ``{name:.3f}`` fields are
    filled from the values passed and from everything :func:`record` recorded so far."""
    try:
        text = template.format(**{**RECORDED, **values})
    except KeyError as exc:
        raise KeyError(f"report: no value named {exc.args[0]!r} (record it, or pass it)") from None
    try:
        from IPython.display import Markdown, display

        display(Markdown(text))
    except ImportError:
        print(text)
    return text


def read_payloads(nb: dict) -> list[dict]:
    """The ``record`` and ``claim`` outputs of an executed notebook (a parsed .ipynb dict), in order."""
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) or []:
            data = out.get("data") or {}
            for mime in (RECORD_MIME, CLAIM_MIME):
                payload = data.get(mime)
                if payload is not None:
                    found.append(json.loads(payload) if isinstance(payload, str) else payload)
    return found


def read_records(nb: dict) -> dict[str, Any]:
    """The ``record`` outputs of an executed notebook, ``{name: value}``."""
    return {p["name"]: p["value"] for p in read_payloads(nb) if "name" in p}


def read_claims(nb: dict) -> list[dict]:
    """The ``claim`` outputs of an executed notebook: ``{"claim", "holds", "values"}`` each."""
    return [p for p in read_payloads(nb) if "claim" in p]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with exactly one line on stderr (exit status 2), no usage
    block; sub-commands made from it inherit this."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
