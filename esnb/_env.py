"""Small helpers every notebook uses: where the data lives, smoke mode, headline records."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

# A custom MIME type lets the headless runner find headline numbers in an executed
# notebook without scraping printed text.
RECORD_MIME = "application/vnd.esnb.record+json"


def smoke_mode(flag: bool | None = None) -> bool:
    """True when a notebook should run its quick CI-sized version.

    An explicit ``flag=True`` (the papermill ``smoke`` parameter) wins; otherwise the
    environment variable ``ESNB_SMOKE`` decides, so that ``pytest --nbval`` (which cannot
    inject parameters) still gets the quick version.
    """
    if flag:
        return True
    return os.environ.get("ESNB_SMOKE", "").strip().lower() in {"1", "true", "yes", "on"}


def record(name: str, value: Any) -> None:
    """Show a headline number and leave it where ``python -m esnb run`` can collect it."""
    if isinstance(value, float) and not math.isfinite(value):
        shown = str(value)
    elif isinstance(value, float):
        shown = f"{value:.4g}"
    else:
        shown = str(value)
    try:
        from IPython.display import display

        display({RECORD_MIME: {"name": name, "value": value}, "text/plain": f"{name} = {shown}"}, raw=True)
    except ImportError:  # plain Python: printing is enough
        print(f"{name} = {shown}")


def read_records(nb: dict) -> dict[str, Any]:
    """Collect the ``record`` outputs of an executed notebook (a parsed .ipynb dict)."""
    found: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) or []:
            payload = (out.get("data") or {}).get(RECORD_MIME)
            if payload is None:
                continue
            if isinstance(payload, str):
                payload = json.loads(payload)
            found[payload["name"]] = payload["value"]
    return found


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with exactly one line on stderr (exit status 2), no usage
    block; sub-commands made from it inherit this."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
