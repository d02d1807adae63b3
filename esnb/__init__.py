"""esnb: fine-tuning neural networks, up to LLMs, with evolution strategies.

The helper package of the notebook course. Notebooks teach; this package holds the code they share.
"""
from ._env import DATA_DIR, NOTEBOOKS_DIR, REPO_ROOT, record, smoke_mode
from .es import ES, ESConfig, Member, centered_ranks, es_gradient, shape_fitness, zscore
from .landscapes import LANDSCAPES, get_landscape

__all__ = [
    "DATA_DIR", "NOTEBOOKS_DIR", "REPO_ROOT", "record", "smoke_mode",
    "ES", "ESConfig", "Member", "centered_ranks", "es_gradient", "shape_fitness", "zscore",
    "LANDSCAPES", "get_landscape",
]
__version__ = "0.1.0"
