"""esnb: fine-tuning neural networks, up to LLMs, with evolution strategies.

The helper package of the notebook course. Notebooks teach; this package holds the code they share.

The ES core is imported eagerly (it needs only torch). The modules that pull in transformers or TRL
(``esnb.models``, ``esnb.generation``, ``esnb.finetune``, ``esnb.grpo``, ...) load on first use, so
``import esnb`` stays fast: ``esnb.finetune.finetune(...)`` works without importing it first.
"""
import importlib

from . import _trace

_trace.start_from_env()  # before the other modules load: provenance records what runs (ESNB_TRACE_DIR)

from ._env import DATA_DIR, NOTEBOOKS_DIR, REPO_ROOT, ClaimFailed, claim, record, report, smoke_mode  # noqa: E402
from .es import ES, ESConfig, Member, centered_ranks, es_gradient, shape_fitness, zscore
from .landscapes import LANDSCAPES, get_landscape
from .noise import ParameterSet, perturbed
from .runlog import RunLog, load_checkpoint, replay, save_checkpoint

__all__ = [
    "DATA_DIR", "NOTEBOOKS_DIR", "REPO_ROOT", "ClaimFailed", "claim", "record", "report", "smoke_mode",
    "ES", "ESConfig", "Member", "centered_ranks", "es_gradient", "shape_fitness", "zscore",
    "LANDSCAPES", "get_landscape",
    "ParameterSet", "perturbed",
    "RunLog", "load_checkpoint", "replay", "save_checkpoint",
]
__version__ = "0.1.0"

_LAZY_MODULES = {"analysis", "distributed", "doctor", "finetune", "generation", "grpo", "lowrank", "models",
                 "plots", "run", "tasks", "tinylm", "toy", "widgets"}


# Names from the heavy modules, also loaded on first use: esnb.load_model("tiny") works directly.
_LAZY_NAMES = {
    "load_model": "models", "available_models": "models",
    "generate": "generation", "evaluate": "generation",
    "get_task": "tasks",
    "FinetuneConfig": "finetune", "FinetuneResult": "finetune", "load_result": "finetune", "rebuild": "finetune",
    "GRPORunConfig": "grpo", "train_grpo": "grpo",
    "LowRankES": "lowrank",
}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'esnb' has no attribute {name!r}")
