"""Where things live, computed once: the package, the repository around it, and its data.

Imports nothing from esnb (the tracer loads it first), so every module can take its paths from here.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
TINY_DIR = DATA_DIR / "tiny"            # the shipped instruction-tuned tiny model
TINY_BASE_DIR = DATA_DIR / "tiny-base"  # and its base (pretrained only) sibling
TINY_BASE_SEED1_DIR = DATA_DIR / "tiny-base-seed1"  # the base recipe from another seed (06's third base model)
