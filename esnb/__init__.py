"""esnb: fine-tuning neural networks, up to LLMs, with evolution strategies.

The helper package of the notebook course. Notebooks teach; this package holds the code they share.

Every module loads on first use, so ``import esnb`` (and a mistyped ``python -m esnb`` command)
stays fast: ``esnb.ES``, ``esnb.load_model`` and ``esnb.finetune.finetune(...)`` work without
importing anything first.
"""
import importlib

from . import _trace

_trace.start_from_env()  # before the other modules load: provenance records what runs (ESNB_TRACE_DIR)

from ._env import DATA_DIR, NOTEBOOKS_DIR, REPO_ROOT, ClaimFailed, claim, record, report, smoke_mode  # noqa: E402

__all__ = [
    "DATA_DIR", "NOTEBOOKS_DIR", "REPO_ROOT", "ClaimFailed", "claim", "record", "report", "smoke_mode",
    "ES", "ESConfig", "Member", "centered_ranks", "es_gradient", "shape_fitness", "zscore",
    "LANDSCAPES", "get_landscape",
    "ParameterSet", "perturbed",
    "RunLog", "load_checkpoint", "replay", "save_checkpoint",
]
__version__ = "0.1.0"

_LAZY_MODULES = {"ablation", "analysis", "comparison", "distributed", "doctor", "es", "finetune", "generation", "grpo",
                 "landscapes", "lowrank", "models", "noise", "plots", "population", "runlog", "suite", "stats",
                 "tasks", "tinylm", "toy", "widgets", "zeroth_order"}


# Every name is loaded on first use, so that `python -m esnb ...` answers a bad argument before
# torch is imported: esnb.ES and esnb.load_model("tiny") work directly all the same.
_LAZY_NAMES = {
    "ES": "es", "ESConfig": "es", "Member": "es", "centered_ranks": "es", "es_gradient": "es",
    "shape_fitness": "es", "zscore": "es",
    "LANDSCAPES": "landscapes", "get_landscape": "landscapes",
    "ParameterSet": "noise", "perturbed": "noise",
    "RunLog": "runlog", "load_checkpoint": "runlog", "replay": "runlog", "save_checkpoint": "runlog",
    "load_model": "models", "available_models": "models",
    "generate": "generation", "evaluate": "generation",
    "get_task": "tasks",
    "FinetuneConfig": "finetune", "FinetuneResult": "finetune", "load_result": "finetune", "rebuild": "finetune",
    "GRPORunConfig": "grpo", "train_grpo": "grpo",
    "LowRankES": "lowrank",
    "adapt_threads": "_cpu",
}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'esnb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_MODULES | set(_LAZY_NAMES))
