"""How many CPU cores other processes leave to this one, and PyTorch threads to match.

PyTorch runs a parallel region on all its threads and waits for the slowest. When another process
holds one of the cores, the thread that shares that core runs half the time, and every region
waits for it: on 2 cores with one busy, an ES iteration of the tiny model took 3x its idle time
with 2 threads and 1.55x with 1 (benchmarks/contention.py). So esnb measures what the other
processes use (Linux ``/proc/stat``: all CPU time minus this process's own, over the time since the
last look) and gives PyTorch only the cores left, at most the threads it already had: on an idle
machine nothing changes.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import torch

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_FRESH = 5.0    # seconds: an older sample says little about now; take a new one
_SAMPLE = 0.1   # seconds: the window of a fresh sample
_last: tuple[float, float, float] | None = None   # (wall, busy CPU seconds of all processes, own CPU seconds)
_previous: float | None = None                    # the last measured load


def _busy_seconds() -> float | None:
    """CPU seconds all processes have run (not idle, not waiting for I/O) since boot, or ``None``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _sample() -> tuple[float, float, float] | None:
    busy = _busy_seconds()
    return None if busy is None else (time.monotonic(), busy, _own_seconds())


def others_load() -> float | None:
    """Cores' worth of CPU that other processes used since the last call (a fresh 0.1 s sample when
    that was long ago or never), or ``None`` where it cannot be measured (not Linux)."""
    global _last, _previous
    now = _sample()
    if now is None:
        return None
    if _last is None or now[0] - _last[0] > _FRESH:
        _last = now
        time.sleep(_SAMPLE)
        now = _sample()
    wall = now[0] - _last[0]
    if wall < _SAMPLE / 2 and _previous is not None:  # too short to say: keep the window open
        return _previous
    load = max(0.0, ((now[1] - _last[1]) - (now[2] - _last[2])) / wall)
    _last, _previous = now, load
    return load


def free_cores() -> int:
    """Cores that other processes leave free now (at least 1; all of them where it cannot be
    measured). A process counts once it uses half a core or more."""
    cores = os.cpu_count() or 1
    load = others_load()
    if load is None:
        try:  # elsewhere: the load average, which also counts this process
            return 1 if os.getloadavg()[0] >= cores else cores
        except (AttributeError, OSError):
            return cores
    return max(1, cores - int(load + 0.5))


def threads_now(cap: int) -> int:
    """PyTorch threads to run on now: ``cap``, or fewer when other processes hold cores."""
    return max(1, min(cap, free_cores()))


@contextmanager
def share_cores(cap: int | None = None) -> Iterator[int]:
    """Run the block with PyTorch on :func:`threads_now` of ``cap`` (default: its current threads),
    restoring the setting after; yields the number used. On an idle machine this is the current
    setting (so an explicit ``torch.set_num_threads`` or ``--threads`` is kept as the ceiling)."""
    old = torch.get_num_threads()
    n = threads_now(cap or old)
    if n != old:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != old:
            torch.set_num_threads(old)


_cell_hook = None   # the pre-cell callback adapt_threads registered, so a second call replaces it


def adapt_threads(cap: int) -> int:
    """Give PyTorch at most ``cap`` threads, fewer while other processes hold cores, now and, in a
    notebook, again before every cell. For notebook code that runs tensor work of its own: the
    package's trainers and ``generate`` already adapt inside, but a setting chosen once at the top
    keeps two threads spin-waiting on each other when another job starts later (notebook 09 ran 4x
    slower so). Returns the threads set now."""
    global _cell_hook
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap: expected an integer >= 1, got {cap!r}")
    torch.set_num_threads(threads_now(cap))
    try:
        from IPython import get_ipython
    except ImportError:
        return torch.get_num_threads()
    shell = get_ipython()
    if shell is not None and hasattr(shell, "events"):
        if _cell_hook is not None:
            try:
                shell.events.unregister("pre_run_cell", _cell_hook)
            except ValueError:
                pass

        def _cell_hook(info=None) -> None:   # IPython passes the cell's ExecutionInfo
            torch.set_num_threads(threads_now(cap))

        shell.events.register("pre_run_cell", _cell_hook)
    return torch.get_num_threads()
