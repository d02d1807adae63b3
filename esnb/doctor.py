"""Environment check for notebook 00 and ``python -m esnb doctor``: what is installed, which
device and how many threads, which offline models are present, and what to do about anything missing."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass

# (distribution, import name, needed for)
PACKAGES = [
    ("torch", "torch", "everything"),
    ("transformers", "transformers", "language models (notebooks 04-10)"),
    ("accelerate", "accelerate", "loading SmolLM2 from GGUF"),
    ("gguf", "gguf", "loading SmolLM2 from GGUF"),
    ("trl", "trl", "the GRPO baseline (notebooks 06-07)"),
    ("numpy", "numpy", "everything"),
    ("pandas", "pandas", "run logs and tables"),
    ("matplotlib", "matplotlib", "figures"),
    ("ipywidgets", "ipywidgets", "slider panels"),
    ("tqdm", "tqdm", "progress bars"),
    ("papermill", "papermill", "python -m esnb run"),
    ("nbval", "nbval", "notebook tests"),
]

FIX = "pip install -r requirements.txt"


@dataclass
class Check:
    what: str
    ok: bool
    detail: str
    fix: str = ""


def package_checks() -> list[Check]:
    checks = []
    for dist, module, needed_for in PACKAGES:
        try:
            version = md.version(dist)
            importlib.import_module(module)
            checks.append(Check(dist, True, version))
        except Exception as exc:  # noqa: BLE001 - a broken install is as missing as an absent one
            checks.append(Check(dist, False, f"missing ({type(exc).__name__}); needed for {needed_for}", FIX))
    return checks


def device_checks() -> list[Check]:
    import torch

    checks = [Check("python", sys.version_info >= (3, 10), platform.python_version(),
                    "use Python 3.10 or newer (3.11 is what CI uses)")]
    checks.append(Check("torch threads", True, f"{torch.get_num_threads()} (CPU cores seen: {_cpu_count()})"))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        checks.append(Check("device", True, f"cuda: {torch.cuda.device_count()} x {name} ({mem:.0f} GiB)"))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        checks.append(Check("device", True, "mps (Apple GPU)"))
    else:
        checks.append(Check("device", True, "cpu only: every notebook has a CPU-sized default; the GPU recipes need CUDA"))
    return checks


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def model_checks() -> list[Check]:
    """Which offline models are present (without loading them)."""
    from .models import available_models

    checks = []
    for row in available_models().to_dict("records"):
        hub = row["name"].startswith("<")
        # The hub is optional (offline is the default here): report it, never fail on it.
        ok = True if hub else bool(row["available"])
        detail = f"{row['what']}: {row['note']}"
        fix = "" if ok else row["note"].removeprefix("missing: ")
        checks.append(Check(f"model {row['name']}", ok, detail, fix))
    return checks


def check_environment(include_models: bool = True) -> list[Check]:
    checks = device_checks() + package_checks()
    if include_models:
        try:
            checks += model_checks()
        except Exception as exc:  # noqa: BLE001 - the report must still show what it can
            checks.append(Check("models", False, f"could not inspect models: {exc}", FIX))
    return checks


def report(checks: list[Check]) -> str:
    width = max(len(c.what) for c in checks)
    lines = []
    for c in checks:
        mark = "ok " if c.ok else "MISSING"
        lines.append(f"{mark:7} {c.what.ljust(width)}  {c.detail}" + (f"\n{'':7} {'':{width}}  fix: {c.fix}" if not c.ok and c.fix else ""))
    return "\n".join(lines)


def main() -> int:
    checks = check_environment()
    print(report(checks))
    return 0 if all(c.ok for c in checks) else 1
