"""A run is its seed log: initial state + one JSONL line per iteration, replayable bit-exactly.

ES never needs the noise vectors after the fact: an iteration is fully described by its member
seeds, their signs and the shaped fitness weights (``ES.history`` keeps exactly these). So a run
directory holds

* ``initial.pt`` — ``ES.state_dict()`` when logging started (master weights, optimizer state,
  iteration; usually iteration 0),
* ``config.json`` — the ``ESConfig`` (plus any extra metadata you pass),
* ``log.jsonl`` — one line per iteration: ``{"iteration", "seeds", "signs", "weights", ...}``,

and :func:`replay` rebuilds the weights of any iteration by calling ``ES.apply_update`` on each
line in order — the same code the live run called, with the same float64 weights (JSON writes
Python floats in their shortest round-trip form), so the result is identical bit for bit and no
model is evaluated. The log grows by about ``30 bytes x N`` per iteration, whatever the model size.

Checkpoints (:func:`save_checkpoint`) are written to a temporary file in the same folder and then
renamed over the target with ``os.replace``, which is atomic: a crash leaves the old checkpoint or
the new one, never half a file. Resume = ``load_checkpoint`` + ``ES.load_state_dict`` +
``RunLog.open(..., resume_at=iteration)`` (drops log lines past the checkpoint).
"""
from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .es import ES, ESConfig
from .files import atomic_write, match_umask, read_jsonl, umask, write_json, write_jsonl  # noqa: F401 - runlog's names too

INITIAL = "initial.pt"
CONFIG = "config.json"
LOG = "log.jsonl"

# What a log line must hold for a replay; the rest of a history entry (reward statistics) is kept
# as information.
REPLAY_KEYS = ("iteration", "seeds", "signs", "weights")


# ---------------------------------------------------------------- one writer per run folder

LOCK = ".esnb-run.lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder, held while a run writes to it.

    ``fcntl.flock`` on ``DIR/.esnb-run.lock``: the operating system drops it when the process
    ends in any way (kill -9 included), so a lock can never outlive its run. The file holds the
    holder's pid, host and start time for the message the loser gets; a file left by a killed
    run is reclaimed (``reclaimed`` then holds what it said). Re-entrant within one process
    (the command line takes it before loading the model, :func:`esnb.finetune.finetune` again).
    On a system without ``fcntl`` (Windows) the lock is advisory only: nothing is enforced.

    ``RunLock(dir).acquire()`` creates ``dir`` if needed; it raises :class:`RunLocked` naming the
    holder when another process has it. ``release()`` removes the file (and the folder, when
    this lock created it and nothing else was written there).
    """

    _held: dict[str, list] = {}  # real path -> [owner, depth, fd]: re-entrance within this process

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.reclaimed: str | None = None
        self._fd: int | None = None
        self._made_dir = False

    def _key(self) -> str:
        return os.path.realpath(self.directory)

    def acquire(self) -> "RunLock":
        held = RunLock._held.get(self._key())
        if held is not None:
            held[1] += 1
            self._fd = -1  # this handle is a nested hold of the outer lock
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory} is a file, not a folder")
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self._made_dir = True
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no enforcement
            fcntl = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    self._cleanup_dir()
                    raise RunLocked(f"{self.directory} is in use by another run ({holder}); wait for it to "
                                    f"end or choose another folder") from None
            # the holder we waited out may have removed the file: lock the file that is there now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.read(fd, 4096).decode(errors="replace").strip()
        if old:
            self.reclaimed = old  # a run killed before it could clean up; the OS freed its lock
        import socket

        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        self._fd = fd
        RunLock._held[self._key()] = [self, 1, fd]
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._fd = None
        key = self._key()
        held = RunLock._held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del RunLock._held[key]
        fd, owner = held[2], held[0]
        try:
            os.unlink(owner.path)  # still holding the lock: nobody can be between open and flock on it
        except FileNotFoundError:
            pass
        os.close(fd)
        owner._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._made_dir:
            try:
                self.directory.rmdir()  # only when empty: a refused or failed start leaves nothing
            except OSError:
                pass
            self._made_dir = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files an interrupted atomic write left in ``directory`` (a killed
    run's half-written checkpoint can be gigabytes); call it only while holding the folder's
    :class:`RunLock`. Returns the names removed."""
    directory = Path(directory)
    removed = []
    for p in sorted(directory.glob(".*.tmp")):
        if p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------- atomic files


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (e.g. ``{"es": es.state_dict(), "rng": ...}``) with ``torch.save``, atomically."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors, numbers, strings, lists, dicts only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def read_run_config(directory: str | os.PathLike) -> dict:
    """A run folder's ``config.json`` as a dict; a missing or damaged one raises ``ValueError``
    naming the file (one line a command line can print)."""
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a run folder)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged (expected a JSON object, got {type(meta).__name__})")
    return meta


# ---------------------------------------------------------------- the log


def log_line(entry: dict) -> str:
    """One JSON line for a history entry; the replay keys are required, other JSON-able keys are kept."""
    missing = [k for k in REPLAY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"log entry lacks {missing} (needs {list(REPLAY_KEYS)})")
    out = {k: entry[k] for k in REPLAY_KEYS}
    for k, v in entry.items():
        if k not in out and isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
    out["seeds"] = [int(s) for s in out["seeds"]]
    out["signs"] = [int(s) for s in out["signs"]]
    out["weights"] = [float(w) for w in out["weights"]]
    if not len(out["seeds"]) == len(out["signs"]) == len(out["weights"]):
        raise ValueError(f"iteration {out['iteration']}: seeds, signs and weights differ in length")
    return json.dumps(out, separators=(",", ":"))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``log.jsonl``. A last line cut off by a crash (no newline) is dropped with a
    warning; any other bad line raises ``ValueError`` naming the file and line."""
    path = Path(path)
    entries = read_jsonl(path)
    for lineno, e in enumerate(entries, 1):
        missing = [k for k in REPLAY_KEYS if k not in e] if isinstance(e, dict) else list(REPLAY_KEYS)
        if missing:
            raise ValueError(f"{path}: entry {lineno}: log line lacks {missing}")
    for a, b in zip(entries, entries[1:]):
        if b["iteration"] != a["iteration"] + 1:
            raise ValueError(f"{path}: iteration {b['iteration']} follows {a['iteration']} (lines out of order or missing)")
    return entries


class RunLog:
    """Append-only seed log of an ES run in ``directory``.

    ``RunLog.create(dir, es)`` writes the initial state and config; then ``log.append(es.tell(r))``
    after every iteration (each line is flushed, so a crash loses at most the line being written).
    ``RunLog.open(dir, resume_at=k)`` continues a run whose checkpoint is at iteration ``k``.
    """

    def __init__(self, directory: str | os.PathLike, _file: io.TextIOBase, next_iteration: int):
        self.directory = Path(directory)
        self._file = _file
        self.next_iteration = next_iteration

    @classmethod
    def create(cls, directory: str | os.PathLike, es: ES, metadata: dict | None = None, overwrite: bool = False) -> "RunLog":
        directory = Path(directory)
        if (directory / LOG).exists() and not overwrite:
            raise FileExistsError(f"{directory / LOG} exists; pass overwrite=True or RunLog.open() to continue it")
        directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(directory / INITIAL, es.state_dict())
        write_json(directory / CONFIG, {"config": es.config.to_dict(), "names": list(es.params.names),
                                        "start_iteration": es.iteration, **(metadata or {})})
        f = open(directory / LOG, "w")
        return cls(directory, f, es.iteration)

    @classmethod
    def open(cls, directory: str | os.PathLike, resume_at: int | None = None) -> "RunLog":
        """Reopen for appending. With ``resume_at=k`` lines for iterations >= k (written after the
        checkpoint you resume from) are dropped, so the log and the weights agree again."""
        directory = Path(directory)
        path = directory / LOG
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = read_log(path)
        start = json.loads((directory / CONFIG).read_text()).get("start_iteration", 0)
        if resume_at is not None:
            if resume_at < start:
                raise ValueError(f"resume_at={resume_at} is before the log's first iteration {start}")
            entries = [e for e in entries if e["iteration"] < resume_at]
            have = entries[-1]["iteration"] + 1 if entries else start
            if have != resume_at:
                raise ValueError(f"{path} ends at iteration {have - 1}; cannot resume at {resume_at}")
        # Rewrite the kept lines (atomically) so that a cut-off or stale tail is gone.
        write_jsonl(path, entries, line=log_line)
        nxt = entries[-1]["iteration"] + 1 if entries else start
        return cls(directory, open(path, "a"), nxt)

    def append(self, entry: dict) -> None:
        """Write one iteration (a ``tell`` return value or a ``history`` entry)."""
        if entry["iteration"] != self.next_iteration:
            raise ValueError(f"expected iteration {self.next_iteration}, got {entry['iteration']}")
        self._file.write(log_line(entry) + "\n")
        self._file.flush()
        self.next_iteration += 1

    def extend(self, entries: Iterable[dict]) -> None:
        for e in entries:
            self.append(e)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_run(directory: str | os.PathLike, initial_state: dict, history: Iterable[dict], metadata: dict | None = None) -> Path:
    """Write a finished run after the fact: ``initial_state`` (``es.state_dict()`` taken before the
    first ``tell``) and ``es.history``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / INITIAL, initial_state)
    write_json(directory / CONFIG, {"config": initial_state["config"], "start_iteration": int(initial_state["iteration"]),
                                    **(metadata or {})})
    write_jsonl(directory / LOG, history, line=log_line)
    return directory


def load_run(directory: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(initial state, log entries) of a run directory."""
    directory = Path(directory)
    return load_checkpoint(directory / INITIAL), read_log(directory / LOG)


def run_size(directory: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of each file of a run directory."""
    directory = Path(directory)
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")}


# ---------------------------------------------------------------- replay


def replay(run: str | os.PathLike | tuple[dict, list[dict]], params: nn.Module | torch.Tensor | Iterable[torch.Tensor] | None = None,
           until: int | None = None, master_device: str | torch.device | None = None) -> ES:
    """Rebuild the weights of a logged run without evaluating anything.

    ``run`` is a run directory or ``(initial_state, entries)``. ``params`` is what to write the
    weights into (a module of the run's architecture, or tensors); without it, fresh tensors
    shaped like the initial master are used (``es.params.master`` then holds the result).
    ``until=k`` stops before iteration ``k``. Returns the ES, ready to continue the run.
    """
    initial, entries = load_run(run) if not isinstance(run, tuple) else run
    config = ESConfig.from_dict(initial["config"])
    if params is None:
        params = [m.detach().clone() for m in initial["master"]]
    es = ES(params, config, master_device=master_device)
    es.load_state_dict(initial)
    for e in entries:
        if e["iteration"] < es.iteration:
            continue
        if until is not None and e["iteration"] >= until:
            break
        if e["iteration"] != es.iteration:
            raise ValueError(f"log jumps from iteration {es.iteration} to {e['iteration']}")
        if es.config.precision == "paper":
            # the paper's restore-by-subtraction leaves bf16 rounding behind: redo every member's
            # perturb/restore round trip (arithmetic only, nothing evaluated) as the live run did
            for s, sg in zip(e["seeds"], e["signs"]):
                es.params.perturb(s, sg * es.config.sigma)
                es.params.restore()
        es.apply_update(e["seeds"], e["signs"], e["weights"])
        es.iteration += 1
        es.history.append(e)
    return es


def max_abs_diff(a: nn.Module | Iterable[torch.Tensor], b: nn.Module | Iterable[torch.Tensor]) -> float:
    """Largest elementwise |a - b| over matching tensors (0.0 means bit-identical values)."""
    ta = list(a.parameters()) if isinstance(a, nn.Module) else list(a)
    tb = list(b.parameters()) if isinstance(b, nn.Module) else list(b)
    if len(ta) != len(tb):
        raise ValueError(f"{len(ta)} tensors vs {len(tb)}")
    return max((float((x.detach().double() - y.detach().double().to(x.device)).abs().max()) for x, y in zip(ta, tb)), default=0.0)


def bit_equal(a: nn.Module | Iterable[torch.Tensor], b: nn.Module | Iterable[torch.Tensor]) -> bool:
    """True when every tensor pair is identical bit for bit (same dtype and bytes)."""
    ta = list(a.parameters()) if isinstance(a, nn.Module) else list(a)
    tb = list(b.parameters()) if isinstance(b, nn.Module) else list(b)
    return len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(ta, tb))


class ResultTables:
    """The views that ES and GRPO results share, so notebooks compare them with the same code.

    Subclasses hold ``log_rows`` (one dict per iteration or optimizer step, with ``samples`` and
    ``seconds``) and ``eval_rows`` (held-out evaluations, the first one of the starting model).
    """

    log_rows: list
    eval_rows: list

    @property
    def log(self):
        import pandas as pd

        return pd.DataFrame(self.log_rows)

    @property
    def evals(self):
        import pandas as pd

        return pd.DataFrame(self.eval_rows)

    @property
    def accuracy_before(self) -> float:
        return float(self.eval_rows[0]["test_accuracy"]) if self.eval_rows else float("nan")

    @property
    def accuracy_after(self) -> float:
        return float(self.eval_rows[-1]["test_accuracy"]) if self.eval_rows else float("nan")

    @property
    def samples(self) -> int:
        """Completions scored so far (the budget both methods are compared at)."""
        return int(self.log_rows[-1]["samples"]) if self.log_rows else 0

    @property
    def seconds(self) -> float:
        """Training seconds, held-out evaluation excluded."""
        return float(self.log_rows[-1]["seconds"]) if self.log_rows else 0.0

    @property
    def seconds_per_iteration(self) -> float:
        """Median seconds of one iteration (ES: population evaluation + update; GRPO: one step)."""
        if not self.log_rows:
            return float("nan")
        return float(np.median([r["iter_seconds"] for r in self.log_rows]))
