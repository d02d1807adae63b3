"""Memory of a training run: peak resident memory (sampled while it runs), the exact bytes of
the state a gradient method keeps, and a probe that measures a short ES or GRPO run in a fresh
process (so that an allocator's leftovers from earlier runs are not counted)."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import torch

__all__ = ["rss_bytes", "PeakRSS", "training_state_bytes", "measure_memory"]


def rss_bytes() -> int:
    """Resident set size of this process now (psutil if installed, else /proc, else maxrss)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class PeakRSS:
    """Peak extra process memory inside a ``with`` block, sampled by a thread every ``interval`` s.

    ``peak`` = highest RSS seen minus RSS at entry (bytes): what the computation in the block added
    (gradients, optimizer state, activations, caches, a reference model...). ``tracemalloc`` cannot
    do this (torch allocates outside Python's allocator) and ``ru_maxrss`` never goes down, so it
    cannot measure one block of a long-lived process. Memory freed back to the allocator but kept
    by the process still counts, as it does for the operating system. On CUDA, ``cuda_peak`` is
    ``torch.cuda.max_memory_allocated`` over the block, minus what was allocated at entry.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = 0
        self.max_rss = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda0 = 0

    @property
    def peak(self) -> int:
        return max(0, self.max_rss - self.start)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_rss = max(self.max_rss, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self.start = self.max_rss = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.max_rss = max(self.max_rss, rss_bytes())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak = int(torch.cuda.max_memory_allocated() - self._cuda0)


def training_state_bytes(model: torch.nn.Module, optimizer: Any = None,
                         ref_model: torch.nn.Module | None = None) -> dict:
    """Exact bytes of what a gradient method keeps besides the weights: gradients (one per
    trainable weight), optimizer state (AdamW: two moments) and a frozen reference model.
    ES keeps none of these (its noise is regenerated from seeds)."""
    params = [p for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    opt += v.numel() * v.element_size()
    ref = 0
    if ref_model is not None:
        ref = sum(p.numel() * p.element_size() for p in ref_model.parameters())
    return {"weights": weights, "gradients": grads, "optimizer": opt, "reference_model": ref}


# ------------------------------------------------------------------------------------ memory probe


def measure_memory(method: str, model: str = "tiny", task: str = "countdown",
                   task_options: dict | None = None, settings: dict | None = None,
                   n_train: int = 64, n_test: int = 16, threads: int = 1, timeout: float = 600) -> dict:
    """Peak extra memory of a short ES or GRPO run, measured in a **fresh Python process**.

    In a long-lived notebook process the allocator keeps memory from earlier runs, so a second
    measurement sees almost nothing; a child process starts clean. The child loads the model and
    the task, imports both training stacks (so library imports are not counted against either
    method), then runs ``method`` (``"es"``: :func:`esnb.finetune.finetune` with
    ``FinetuneConfig.of(**settings)``; ``"grpo"``: :func:`esnb.grpo.train_grpo` with
    ``GRPORunConfig(**settings)``) inside :class:`PeakRSS`. Returns ``{"method", "peak_rss",
    "rss_start", "cuda_peak", "weights_bytes", "seconds"}`` (bytes).
    """
    import subprocess
    import sys

    if method not in ("es", "grpo"):
        raise ValueError(f"method: expected 'es' or 'grpo', got {method!r}")
    spec = {"method": method, "model": model, "task": task, "task_options": task_options or {},
            "settings": settings or {}, "n_train": n_train, "n_test": n_test, "threads": threads}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "esnb.memory", "--probe", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe ({method}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _probe(spec: dict) -> dict:
    torch.set_num_threads(int(spec.get("threads") or 1))
    # both stacks imported (and the Trainer's lazy modules loaded) before the baseline
    import datasets  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401

    from .finetune import FinetuneConfig, finetune
    from .grpo import GRPORunConfig, train_grpo
    from .models import load_model
    from .tasks import default_items, get_task

    model, tok = load_model(spec["model"], device="cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(spec["task"], **spec["task_options"])
    train, test = default_items(task)
    train, test = train[:spec["n_train"]], test[:spec["n_test"]]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    t = time.perf_counter()
    with PeakRSS() as mem:
        if spec["method"] == "es":
            cfg = FinetuneConfig.of(**{"train_size": len(train), "save_final": False, **spec["settings"]})
            finetune(model, tok, task, train, test, cfg, progress=False)
        else:
            cfg = GRPORunConfig(**{"progress": False, **spec["settings"]})
            train_grpo(model, tok, task, train, test, cfg)
    return {"method": spec["method"], "peak_rss": mem.peak, "rss_start": mem.start,
            "cuda_peak": mem.cuda_peak, "weights_bytes": weights,
            "seconds": time.perf_counter() - t}


if __name__ == "__main__":

    from ._env import OneLineParser

    ap = OneLineParser(prog="python -m esnb.memory",
                       description="Internal: the memory probe behind measure_memory().")
    ap.add_argument("--probe", required=True, help="JSON spec (see measure_memory)")
    print(json.dumps(_probe(json.loads(ap.parse_args().probe))))
