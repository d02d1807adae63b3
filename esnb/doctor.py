"""Environment check for notebook 00 and ``python -m esnb doctor``: what is installed, which
device and how many threads, which offline models are present, and what to do about anything missing.

Each line says only what was checked: ``ok``, ``MISSING`` (something the README's Quickstart needs:
the exit status is then 1), ``optional`` (missing, but only an extra needs it) or ``not checked``."""
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
    ("pytest", "pytest", "the tests"),
    ("filelock", "filelock", "python -m esnb run / execute"),
    ("jupyterlab", "jupyterlab", "stepping through the notebooks"),
    ("ipykernel", "ipykernel", "running notebooks (the Python kernel)"),
    ("jupyterlab_widgets", "jupyterlab_widgets", "the slider panels in JupyterLab (ipywidgets' front end)"),
    ("selenium", "selenium", "the browser tests"),
]

FIX = "pip install -r requirements.txt"


@dataclass
class Check:
    what: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True    # the Quickstart needs it; False: an optional extra
    checked: bool = True   # False: doctor could not (or would not) check it here

    @property
    def mark(self) -> str:
        if not self.checked:
            return "not checked"
        if self.ok:
            return "ok"
        return "MISSING" if self.needed else "optional"


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
    """Which offline models are present (without loading them); the hub is not contacted."""
    from .models import available_models

    checks = []
    for row in available_models().to_dict("records"):
        if row["name"].startswith("<"):
            # Offline is the course's default: whether the hub answers is not something doctor tries.
            checks.append(Check(f"model {row['name']}", True, f"{row['what']}: not checked (it needs the hub, "
                                "which the course never contacts by default; HF_HUB_OFFLINE="
                                f"{__import__('os').environ.get('HF_HUB_OFFLINE', 'unset')})",
                                needed=False, checked=False))
            continue
        ok = bool(row["available"])
        detail = f"{row['what']}: {row['note']}"
        fix = "" if ok else row["note"].removeprefix("missing: ")
        checks.append(Check(f"model {row['name']}", ok, detail, fix))
    return checks


def browser_checks() -> list[Check]:
    """Chromium and its driver, for ``tests/test_browser.py`` (which skips without them)."""
    import shutil

    checks = []
    for exe, names in (("chromium", ("chromium", "chromium-browser", "google-chrome")), ("chromedriver", ("chromedriver",))):
        found = next((shutil.which(n) for n in names if shutil.which(n)), None)
        checks.append(Check(exe, found is not None, "found" if found else "not found: tests/test_browser.py will skip",
                            "apt-get install chromium chromium-driver (as root; .ci/run does this)", needed=False))
    return checks


def widgets_frontend_check() -> Check:
    """ipywidgets' JupyterLab extension: installed as a labextension folder by jupyterlab_widgets."""
    import sys
    from pathlib import Path

    folders = [Path(p) / "share" / "jupyter" / "labextensions" / "@jupyter-widgets" / "jupyterlab-manager"
               for p in {sys.prefix, sys.base_prefix}]
    found = any(f.is_dir() for f in folders)
    return Check("widgets front end", found, "JupyterLab extension @jupyter-widgets/jupyterlab-manager " +
                 ("installed" if found else "not found: panels will not draw in JupyterLab"),
                 FIX, needed=True)


def check_environment(include_models: bool = True, include_browser: bool = False) -> list[Check]:
    """Everything doctor checks; ``include_browser`` adds Chromium for the browser tests (optional)."""
    checks = device_checks() + package_checks() + [widgets_frontend_check()]
    if include_browser:
        checks += browser_checks()
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
        lines.append(f"{c.mark:11} {c.what.ljust(width)}  {c.detail}"
                     + (f"\n{'':11} {'':{width}}  fix: {c.fix}" if c.checked and not c.ok and c.fix else ""))
    return "\n".join(lines)


def main() -> int:
    checks = check_environment(include_browser=True)
    print(report(checks))
    missing = [c.what for c in checks if c.mark == "MISSING"]
    print(f"\n{len(missing)} thing(s) the Quickstart needs are missing: {', '.join(missing)}" if missing
          else "\neverything the Quickstart needs is here")
    return 1 if missing else 0
