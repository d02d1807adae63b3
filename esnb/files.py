"""Files that survive a crash: atomic writes with ordinary file modes, and JSON / JSONL in one
place (strict reading, atomic writing), for run folders, seed logs and notebook records alike."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = ["umask", "match_umask", "atomic_write", "write_json", "json_default", "write_jsonl", "read_jsonl"]


def umask() -> int:
    """The process's umask (read without changing it for longer than two calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` (and, for a folder, everything in it) the mode an ordinary ``open`` would:
    ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders.

    Why: ``tempfile.mkstemp`` (our atomic writes) and safetensors create files 0600, so a run or
    a model another user should read came out private to its writer.
    """
    path = Path(path)
    mask = umask()
    items = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then ``os.replace`` it onto ``path``.
    The file gets the mode the umask gives (mkstemp alone makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def json_default(o: Any) -> Any:
    """numpy and torch scalars as plain numbers (``json.dumps(..., default=json_default)``)."""
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> Path:
    """JSON, atomically."""
    data = (json.dumps(obj, indent=1, sort_keys=sort_keys, default=json_default) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], line=None) -> Path:
    """One JSON value per line, atomically (``line``: a row's text; compact JSON by default)."""
    line = line or (lambda r: json.dumps(r, default=json_default))
    body = "".join(line(r) + "\n" for r in rows).encode()
    return atomic_write(path, lambda f: f.write(body))


def read_jsonl(path: str | os.PathLike, missing_ok: bool = False) -> list:
    """The values of a JSONL file, strictly: a last line cut off by a crash (no newline) is dropped
    with a warning; any other bad line raises ``ValueError`` naming the file and line.
    ``missing_ok``: a missing file reads as no rows."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    lines = path.read_text().split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    rows = []
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    if tail.strip():
        warnings.warn(f"{path}:{len(lines) + 1}: incomplete last line dropped (interrupted write)")
    return rows
