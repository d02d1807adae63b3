"""Full-parameter ES fine-tuning of a causal language model on a task (Qiu et al. 2025, Alg. 1).

One iteration::

    seeds  = N integers, a pure function of (run seed, iteration)
    batch  = the training prompts of this iteration (all of them, as the paper, or a subset that
             is also a pure function of (run seed, iteration)); every member sees the same batch
    for each member n:
        perturb every parameter in place: theta + sigma * eps_n     (eps regenerated from seed n)
        greedy-generate completions for the batch (one batched call), score them with the task
        reward_n = mean reward over the batch
        restore theta by copy from the float32 master (exact)
    z = zscore(rewards);  theta += alpha * mean_n z_n * eps_n   (noise regenerated tensor by tensor)

Use from Python::

    model, tok = esnb.models.load_model("tiny")
    task = esnb.tasks.get_task("countdown", prompt_style="compact")
    train, test = esnb.tasks.countdown.load_split()
    result = finetune(model, tok, task, train, test, FinetuneConfig(sigma=0.01, iterations=50))
    result.log      # one row per iteration: reward mean/min/max, accuracy, seconds, samples
    result.evals    # held-out evaluations (iteration 0 = the starting model)

or from the shell::

    python -m esnb.finetune --model tiny --task countdown --iterations 50 --output runs/es-tiny

A run directory holds ``config.json`` (the settings), ``initial.pt`` + ``log.jsonl`` (the seed
log: :func:`esnb.runlog.replay` rebuilds any iteration's weights from it without evaluating
anything), ``eval.jsonl`` (held-out evaluations), ``checkpoint.pt`` (written atomically every
``checkpoint_every`` iterations), ``log.csv``/``eval.csv`` and ``final/`` (the model and tokenizer
in Hugging Face format: ``AutoModelForCausalLM.from_pretrained(DIR / "final")``).

Resume: run again with ``resume=True`` (CLI: ``--resume DIR``). Seeds and batches depend only on
(seed, iteration), the weights only on the master copy in the checkpoint, so a resumed run ends
with weights bit-identical to an uninterrupted one (on the same machine and thread count).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ._cpu import share_cores
from ._env import OneLineParser
from .cli import (add_config_arguments, add_data_argument, add_run_arguments, cli_field, cli_task_and_items, config_settings, flag_of,
                  new_run_folder, nonneg_int, parse_task_options, positive_int)
from .models import SHIPPED, check_context, model_name
from .es import ES, PAPER_GROUP, PAPER_SEED, SEED_SCHEDULES, ESConfig, PaperSeedsES
from .generation import DECODERS, decoder, evaluate, generate
from .tasks import default_items, task_items
from .files import atomic_write, json_default, match_umask, read_jsonl, write_json, write_jsonl
from .runlog import (LOCK, ResultTables, RunLock, RunLocked, RunLog, load_checkpoint, read_log, read_run_config,
                     remove_stale_temps, save_checkpoint)

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "score_members", "batch_indices", "default_items",
           "load_result", "main"]

CHECKPOINT = "checkpoint.pt"
EVAL_LOG = "eval.jsonl"
FINAL = "final"
SAMPLES_BEFORE = "samples_before.jsonl"
SAMPLES_AFTER = "samples_after.jsonl"

FIDELITIES = ("esnb", "paper")

# Settings that may change between a run and its resumption (they do not change the weights).
_RESUMABLE = {"iterations", "eval_every", "checkpoint_every", "test_size", "eval_batch_size",
              "gen_batch_size", "save_final", "population_batch"}


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer{' or None' if allow_none else ''}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


@dataclass
class FinetuneConfig:
    """Settings of one ES fine-tuning run. Defaults are the paper's (N=30, sigma=1e-3,
    alpha=5e-4, 200 training puzzles, all of them every iteration, greedy decoding, 500 iterations).

    Every field is validated on construction; a bad value raises ``ValueError`` naming it.

    * ``es``: the ES engine's settings, an :class:`esnb.es.ESConfig` (population, sigma, alpha,
      shaping, optimizer, seed, noise, precision...). ``None``: ``ESConfig()``, or
      ``ESConfig.paper()`` with ``fidelity="paper"``; a dict of ESConfig fields: those on top of
      that default. :meth:`FinetuneConfig.of` takes the ES fields and these in one flat dict.
    * ``iterations``: ES updates in total (a resumed run continues up to this number).
    * ``train_size``: how many training items are used (the first ``train_size``).
    * ``batch_size``: prompts per member per iteration; ``None`` = all ``train_size`` (the paper).
      A smaller batch is drawn without replacement per iteration, the same for every member.
    * ``test_size``: held-out items per evaluation (the first ``test_size``; ``None`` = all).
    * ``eval_every``: held-out evaluation every K iterations (also before the first and after the
      last); 0 = only before and after.
    * ``checkpoint_every``: atomic checkpoint every K iterations (and at the end); 0 = at the end only.
    * ``max_new_tokens``: generation cap; ``None`` = the task's.
    * ``gen_batch_size``: prompts per generate() batch (memory knob; the results do not depend on it
      only up to floating-point batching effects, so keep it fixed across a resumed run's siblings).
    * ``eval_batch_size``: the same for held-out evaluation.
    * ``device``, ``dtype``: where and in which precision the working weights live (``None``: leave
      the model as it is); the ES master copy is always float32, on ``master_device`` (``None`` =
      the model's device).
    * ``save_initial``: write ``initial.pt`` (the starting weights, float32) so that the seed log
      replays on its own; switch off for large models you can reload by name.
    * ``save_final``: write the final model in Hugging Face format to ``DIR/final``.
    * ``population_batch``: ``"auto"`` (default), ``True`` or ``False``: decode all members
      together with their own stacked full-rank weights (:mod:`esnb.population`; same completions,
      several times fewer operations). ``"auto"`` does so for small models on the lean decoder.
    * ``fidelity``: ``"esnb"`` (default) or ``"paper"``, one switch for the pieces of the paper's
      released code; each piece is also a setting of its own (an explicit value wins): the ES
      engine's ``es.noise`` (``"independent"``: a stream per tensor; ``"paper"``: every tensor of
      a member seeded with the member's seed, so same-shaped tensors get the same noise;
      ``"table"``: windows of one shared Gaussian table, :class:`esnb.noise.NoiseTable`),
      ``es.precision`` (``"master"``: float32 master copy, exact restore by copy; ``"paper"``:
      perturb, restore by subtraction and update in the model's dtype) and ``es.seed`` (33), and
      these fields:
    * ``early_stop``: stop generating at the task's stop strings (esnb: ``True``, e.g. at the first
      ``</answer>``) or run to EOS / ``max_new_tokens`` as the paper (``False``). The reward reads
      the LAST answer block either way; with early stop that block is the first one, so a wrong
      answer followed by a right one scores 1 in the paper and 0 here. Early stop is faster.
    * ``seeds``: the member seeds' schedule. ``"esnb"``: a pure function of (seed, iteration)
      (:func:`esnb.es.iteration_seeds`); ``"paper"``: as the paper's script, numpy seeded once with
      ``seed`` (33 there) and ``randint(0, 2**30, N)`` drawn each iteration
      (:func:`esnb.es.paper_iteration_seeds`). Seed logs record the seeds themselves, so replay and
      rebuild need no schedule; a resume draws the same schedule. A run folder whose
      ``config.json`` has no ``seeds`` (made before this field) used ``"esnb"``.
    * ``decoder``: ``"esnb"`` (this course's greedy decoder: the lean one for Llama/Qwen2,
      population-batched for small models) or ``"generate"`` (Hugging Face ``generate``,
      ``do_sample=False``, with the checkpoint's generation config, its ``repetition_penalty``
      included, prompts in their order: what the paper's script calls; slower). The two can pick
      different tokens in bf16 and wherever the checkpoint sets a repetition penalty. A run
      folder whose ``config.json`` has no ``decoder`` used ``"esnb"``.

    The paper's prompt, target rule, reward and data are task and data choices:
    ``get_task("countdown", **countdown.paper_options())`` (``prompt_style="paper"``,
    ``targets="paper"``, ``reward="paper-script"``: the prompt + completion scored as the paper's
    script does, with its 0.06 floor) and :func:`esnb.tasks.countdown.load_paper_data` (the CLI's
    ``--paper-faithful --data PATH`` sets all of it). Paper mode follows the paper's ORIGINAL script
    (``countdown/es_fine-tuning_countdown.py``), not its accelerated vLLM one
    (``es_fine-tuning_countdown_accl.py``: fp16, reward of the completion alone, the raw target
    string, so negative and decimal targets can be reached, seeds from ``random.randint``).

    What paper mode still does not reproduce: answers are checked by esnb's safe evaluator, never
    ``eval`` (``2**5+3`` or ``7//2+3`` score 1.1 in the paper, 0.1 here, and so do answers longer or
    deeper than the evaluator's bounds); a member's reward is ``np.mean`` of its prompts' rewards
    (the script: ``sum / len``, equal up to float rounding). And esnb's single-process paper mode
    is the script run as ONE process with ``--gpu_threads 1``: every member is perturbed and
    restored (by subtraction, so with bf16 drift) on the one model that is updated. With several
    processes the script has each rank restore only its own members (``seed_idx % world == rank``),
    so the ranks' weights drift apart and rank 0's model is the one saved; with its default
    ``--gpu_threads 4`` each thread perturbs its own copy of the model, only copy 0's drift (members
    0, 4, 8, ... of each rank) stays in the model that is updated and saved, and the copies are
    reset to it after every update. (:mod:`esnb.distributed` with ``precision="paper"`` also lets
    each rank drift by its own members only, while its seed log replays the one-process drift.)
    """

    es: ESConfig | dict | None = None  # None: ESConfig(), or ESConfig.paper() with fidelity="paper"
    iterations: int = cli_field(500, "ES iterations in total", type=nonneg_int)
    train_size: int = cli_field(200, "training items used", type=positive_int)
    batch_size: int | None = cli_field(None, "prompts per member per iteration (default: all)", type=positive_int,
                                       show_default=False)
    test_size: int | None = cli_field(None, "held-out items per evaluation (default: all)", type=positive_int,
                                      show_default=False)
    eval_every: int = cli_field(10, "held-out evaluation every K iterations", type=nonneg_int)
    checkpoint_every: int = cli_field(10, "checkpoint every K iterations", type=nonneg_int)
    max_new_tokens: int | None = cli_field(None, "generation cap (default: the task's)", type=positive_int,
                                           show_default=False)
    gen_batch_size: int = 256
    eval_batch_size: int = 256
    device: str | None = cli_field(None, "cpu, cuda, mps (default: the best available)", show_default=False)
    dtype: str | None = cli_field(None, "working precision (default bf16 on a GPU, fp32 on a CPU); the master copy "
                                  "is fp32 (none with --precision paper)", show_default=False,
                                  choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"])
    master_device: str | None = None
    save_initial: bool = True
    save_final: bool = True
    population_batch: bool | str = "auto"
    fidelity: str = cli_field("esnb", "all of the paper's choices: --noise paper --precision paper --no-early-stop "
                              f"--seeds paper (run seed {PAPER_SEED}) and, for countdown, prompt_style=paper, "
                              "targets=paper and reward=paper-script (give --data for the paper's puzzles)",
                              flag="--paper-faithful", group=PAPER_GROUP, show_default=False, action="store_const",
                              const="paper")
    # None: from fidelity (True for esnb)
    early_stop: bool | None = cli_field(None, "generate to EOS or the token cap and reward the last answer block "
                                        "(default: stop at the task's stop strings, e.g. the first </answer>)",
                                        flag="--no-early-stop", group=PAPER_GROUP, show_default=False,
                                        action="store_const", const=False)
    # None: from fidelity ("esnb" for esnb, "paper" for paper)
    seeds: str | None = cli_field(None, "member seeds: 'paper': numpy seeded once with --seed, randint(0, 2**30, N) "
                                  "per iteration, as the paper's script (default: esnb's, a function of seed and "
                                  "iteration)", group=PAPER_GROUP, show_default=False, choices=list(SEED_SCHEDULES))
    # None: from fidelity ("esnb" for esnb, "generate" for paper)
    decoder: str | None = cli_field(None, "'generate': Hugging Face generate with the checkpoint's generation config "
                                    "(repetition penalty included), as the paper's script (default: esnb's faster "
                                    "decoder)", group=PAPER_GROUP, show_default=False, choices=list(DECODERS))

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}, got {self.fidelity!r}")
        paper = self.fidelity == "paper"
        self.es = self._es_config(self.es, paper)
        if self.early_stop is None:
            self.early_stop = not paper
        if not isinstance(self.early_stop, bool):
            raise ValueError(f"early_stop must be True, False or None, got {self.early_stop!r}")
        if self.seeds is None:
            self.seeds = "paper" if paper else "esnb"
        if self.seeds not in SEED_SCHEDULES:
            raise ValueError(f"seeds must be one of {SEED_SCHEDULES}, got {self.seeds!r}")
        if self.decoder is None:
            self.decoder = "generate" if paper else "esnb"
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        self.iterations = _check_int("iterations", self.iterations, 0)
        self.train_size = _check_int("train_size", self.train_size, 1)
        self.batch_size = _check_int("batch_size", self.batch_size, 1, allow_none=True)
        if self.batch_size is not None and self.batch_size > self.train_size:
            raise ValueError(f"batch_size must be <= train_size ({self.train_size}), got {self.batch_size}")
        self.test_size = _check_int("test_size", self.test_size, 1, allow_none=True)
        self.eval_every = _check_int("eval_every", self.eval_every, 0)
        self.checkpoint_every = _check_int("checkpoint_every", self.checkpoint_every, 0)
        self.max_new_tokens = _check_int("max_new_tokens", self.max_new_tokens, 1, allow_none=True)
        self.gen_batch_size = _check_int("gen_batch_size", self.gen_batch_size, 1)
        self.eval_batch_size = _check_int("eval_batch_size", self.eval_batch_size, 1)
        for name in ("device", "master_device"):
            value = getattr(self, name)
            if value is not None:
                try:
                    torch.device(value)
                except (RuntimeError, TypeError):
                    raise ValueError(f"{name} must be a torch device string like 'cpu' or 'cuda', got {value!r}") from None
                setattr(self, name, str(value))
        if self.dtype is not None:
            from .models import DTYPES

            key = str(self.dtype).replace("torch.", "").lower()
            if key not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")
            self.dtype = key
        for name in ("save_initial", "save_final"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.population_batch, bool) or self.population_batch == "auto"):
            raise ValueError(f"population_batch must be True, False or 'auto', got {self.population_batch!r}")

    @staticmethod
    def _es_config(es: ESConfig | dict | None, paper: bool) -> ESConfig:
        if isinstance(es, ESConfig):
            return es
        if es is not None and not isinstance(es, dict):
            raise ValueError(f"es must be an ESConfig, a dict of its fields or None, got {type(es).__name__}")
        return (ESConfig.paper if paper else ESConfig)(**(es or {}))

    @classmethod
    def of(cls, **settings: Any) -> "FinetuneConfig":
        """A config from flat settings: :class:`ESConfig`'s fields (``population_size``, ``sigma``,
        ``alpha``, ...) and this class's own, in one dict (a sweep's or the command line's). A
        ``None`` ES setting means "the default" (the paper's with ``fidelity="paper"``)."""
        es_names = {f.name for f in fields(ESConfig)}
        own = {f.name for f in fields(cls)} - {"es"}
        unknown = sorted(set(settings) - es_names - own)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}: not a field of FinetuneConfig or ESConfig")
        es = {k: v for k, v in settings.items() if k in es_names and v is not None}
        return cls(es=es, **{k: v for k, v in settings.items() if k in own})

    @property
    def prompts_per_member(self) -> int:
        return self.batch_size or self.train_size

    def to_dict(self) -> dict:
        return {**asdict(self), "es": self.es.to_dict()}

    def flat(self) -> dict:
        """Every setting in one flat dict: the ES engine's fields beside this config's own."""
        d = self.to_dict()
        return {**d.pop("es"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        """The config of a saved ``to_dict()``. One saved before ``seeds`` or ``decoder`` existed
        used esnb's (``"esnb"`` for both); one saved before the ES settings were an ``es`` entry
        has them flat beside the others."""
        d = {"seeds": "esnb", "decoder": "esnb", **d}
        es_names = {f.name for f in fields(ESConfig)}
        if "es" not in d:
            d["es"] = {k: d[k] for k in es_names if k in d}
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "es": ESConfig.from_dict(d["es"])})


def batch_indices(seed: int, iteration: int, train_size: int, batch_size: int | None) -> list[int]:
    """The training items of one iteration: all of them, or ``batch_size`` drawn without
    replacement as a pure function of (seed, iteration) (so resume and replay draw the same)."""
    if batch_size is None or batch_size >= train_size:
        return list(range(train_size))
    rng = np.random.default_rng(np.random.SeedSequence([seed, iteration, 0xBA7C]))
    return sorted(int(i) for i in rng.choice(train_size, size=batch_size, replace=False))


@dataclass
class FinetuneResult(ResultTables):
    """What :func:`finetune` returns (also what a callback receives while the run goes on).

    * ``log``: pandas DataFrame, one row per ES iteration: ``iteration``, ``reward_mean``,
      ``reward_min``, ``reward_max``, ``reward_std``, ``accuracy`` (mean over the population),
      ``accuracy_max`` (best member), ``update_norm``, ``iter_seconds``, ``seconds`` (cumulative
      training time, held-out evaluation excluded), ``samples`` (completions scored so far:
      N x prompts per iteration, counted as GRPO counts them).
    * ``evals``: DataFrame of held-out evaluations of the unperturbed weights: ``iteration``
      (updates applied so far; 0 = the starting model), ``test_accuracy``, ``test_reward``,
      ``samples``, ``seconds``, ``eval_seconds``.
    * ``samples_before`` / ``samples_after``: the held-out completions (prompt, completion,
      reward, correct, ...) of the first and the latest evaluation.
    """

    config: FinetuneConfig
    log_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    samples_before: Any = None
    samples_after: Any = None
    model: Any = None
    tokenizer: Any = None
    es: ES | None = None
    output_dir: Path | None = None
    resumed_from: int | None = None

    def __repr__(self) -> str:
        return (f"FinetuneResult({len(self.log_rows)} iterations, held-out accuracy "
                f"{self.accuracy_before:.3f} -> {self.accuracy_after:.3f}, "
                f"{self.seconds_per_iteration:.2f} s/iteration)")


def _samples_frame(path: Path):
    import pandas as pd

    return pd.read_json(path, lines=True) if path.is_file() else None


_METRICS = ("iteration", "reward_mean", "reward_min", "reward_max", "reward_std", "accuracy", "accuracy_max",
            "update_norm", "iter_seconds", "seconds", "samples")


def _metrics(entries: Sequence[dict]) -> list[dict]:
    """The metric columns of seed-log lines (without seeds, signs and weights)."""
    return [{k: e[k] for k in _METRICS if k in e} for e in entries]


def _write_csvs(directory: Path, result: FinetuneResult) -> None:
    for name, frame in (("log.csv", result.log), ("eval.csv", result.evals)):
        data = frame.to_csv(index=False).encode()
        atomic_write(directory / name, lambda f, data=data: f.write(data))


def _prepare_model(model, config: FinetuneConfig):
    if config.device is not None or config.dtype is not None:
        from .models import DTYPES

        kwargs = {}
        if config.device is not None:
            kwargs["device"] = torch.device(config.device)
        if config.dtype is not None:
            kwargs["dtype"] = DTYPES[config.dtype]
        model.to(**kwargs)
    model.eval()
    return model


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def prompt_fingerprint(train_prompts: Sequence[str], test_prompts: Sequence[str]) -> dict:
    """What a run's puzzles and prompts were: a hash of all its training prompts, in order, and one
    hash per held-out prompt for the first 8 (the held-out count may change on resume). Stored in
    ``config.json``; a resume whose prompts differ (another ``--data`` file, another prompt style)
    is refused instead of silently training on other puzzles."""
    return {"train": _short_hash(json.dumps([str(p) for p in train_prompts])), "n_train": len(train_prompts),
            "test_first": [_short_hash(str(p)) for p in test_prompts[:8]]}


def _check_resume_prompts(saved: dict | None, now: dict, where: Path) -> None:
    if not saved:  # a run saved before fingerprints
        return
    if (saved.get("train"), saved.get("n_train")) != (now["train"], now["n_train"]):
        raise ValueError(f"{where}: cannot resume: the training prompts differ from the run's (another data file, "
                         f"task option or prompt style?); resume with the settings the run was made with")
    old, new = saved.get("test_first") or [], now["test_first"]
    k = min(len(old), len(new))
    if old[:k] != new[:k]:
        raise ValueError(f"{where}: cannot resume: the held-out prompts differ from the run's, so its evaluations "
                         f"would mix two test sets; resume with the settings the run was made with")


def output_refusal(out: Path, overwrite: bool, resume: bool = False, cli: bool = False) -> str | None:
    """Why a new run may not be written to ``out`` (``None``: it may): a run is already there
    (resume it, or overwrite), or the folder holds something else (a model, say), which is never
    written over unless ``overwrite``. ``cli``: the advice names the command line's flags."""
    out = Path(out)
    existing = (out / "log.jsonl").exists() or (out / CHECKPOINT).exists()
    if existing and not overwrite and not resume:
        return (f"{out} already holds a run; continue it with --resume {out}, replace it with --overwrite, or "
                f"choose another folder" if cli else
                f"{out} already holds a run; pass resume=True to continue it or overwrite=True")
    foreign = [p.name for p in sorted(out.iterdir()) if p.name != LOCK] if out.is_dir() else []
    if foreign and not existing and not overwrite:  # e.g. a model folder: never overwrite it
        return (f"{out} is not empty and holds no run ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                f"choose a new or empty folder, or pass {'--overwrite' if cli else 'overwrite=True'}")
    return None


def _check_resume_config(saved: dict, config: FinetuneConfig, where: Path) -> None:
    try:
        run = FinetuneConfig.from_dict(saved).flat()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot resume: the run's settings do not read ({e})") from None
    diffs = [f"{k}: {run.get(k)!r} in the run, {v!r} now" for k, v in config.flat().items()
             if k not in _RESUMABLE and run.get(k) != v]
    if diffs:
        raise ValueError(f"{where}: cannot resume with different settings ({'; '.join(diffs)})")


class NoEarlyStop:
    """A task without its stop strings (``FinetuneConfig(early_stop=False)``, the paper): every
    completion runs to EOS or the token cap, and the reward reads its LAST answer block."""

    stop_strings: tuple[str, ...] = ()

    def __init__(self, task: Any):
        self.task = task

    def __getattr__(self, name: str) -> Any:  # everything else is the task's own
        return getattr(self.task, name)

    def __repr__(self) -> str:
        return f"NoEarlyStop({self.task!r})"


def score_members(es: ES, members: Sequence[Any], model: Any, tokenizer: Any, task: Any,
                  prompts: Sequence[str], items: Sequence[Any], max_new_tokens: int,
                  batch_size: int = 256, population_batch: bool | str = "auto") -> tuple[list[float], list[float]]:
    """Mean reward and accuracy over ``prompts`` of each member (``es.ask()`` entries), in order.

    Each member: perturb the model in place, greedy-generate one batched call, restore exactly,
    score with ``task``. This is the population evaluation of one iteration; :func:`finetune`
    calls it with all members, :mod:`esnb.distributed` with each process's share.
    ``population_batch``: decode all members at once instead (:mod:`esnb.population`, same
    completions); ``"auto"`` for small models on the lean decoder.
    """
    from .population import score_population as _batched, use_population

    if members and use_population(population_batch, model, es):
        return _batched(es, members, model, tokenizer, task, prompts, items, max_new_tokens, batch_size)
    rewards, accs = [], []
    for member in members:
        with es.perturbed(member):
            completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   stop_strings=task.stop_strings, batch_size=batch_size)
        scores = [task.score(c, item) for c, item in zip(completions, items)]
        rewards.append(float(np.mean([float(s["reward"]) for s in scores])))
        accs.append(float(np.mean([bool(s["correct"]) for s in scores])))
    return rewards, accs


def _under_its_decoder(run: Callable[..., FinetuneResult]) -> Callable[..., FinetuneResult]:
    """Run ``run`` under its config's decoder (:func:`esnb.generation.decoder`), so that every
    completion of a run, training and held-out, comes from the one decoder the config names."""
    import functools
    import inspect

    signature = inspect.signature(run)

    @functools.wraps(run)
    def decoding(*args: Any, **kwargs: Any) -> FinetuneResult:
        config = signature.bind(*args, **kwargs).arguments.get("config") or FinetuneConfig()
        with decoder(config.decoder):
            return run(*args, **kwargs)
    return decoding


def _one_writer(run: Callable[..., FinetuneResult]) -> Callable[..., FinetuneResult]:
    """Hold the run folder's :class:`esnb.runlog.RunLock` for the whole of ``run`` (when it has an
    ``output_dir``): a second run on the same folder is refused instead of interleaving logs."""
    import functools
    import inspect

    signature = inspect.signature(run)

    @functools.wraps(run)
    def locked(*args: Any, **kwargs: Any) -> FinetuneResult:
        out = signature.bind(*args, **kwargs).arguments.get("output_dir")
        if out is None:
            return run(*args, **kwargs)
        with RunLock(out) as lock:
            if lock.reclaimed:
                print(f"note: {out}: took over the lock left by a run that ended without releasing it "
                      f"({lock.reclaimed})", file=sys.stderr)
            return run(*args, **kwargs)
    return locked


@dataclass
class _Data:
    """A run's puzzles and prompts: the first ``train_size`` training items, the held-out items,
    their prompts (built once) and the generation cap."""

    train_items: list
    test_items: list
    train_prompts: list[str]
    test_prompts: list[str]
    max_new: int

    @classmethod
    def build(cls, model: Any, tokenizer: Any, task: Any, train_items: Sequence[Any] | None,
              test_items: Sequence[Any] | None, config: FinetuneConfig) -> "_Data":
        train_items, test_items = task_items(task, train_items, test_items)
        if len(train_items) < config.train_size:
            raise ValueError(f"train_size: {config.train_size} training items requested, {len(train_items)} given")
        train_items = train_items[:config.train_size]
        if config.test_size is not None:
            test_items = test_items[:config.test_size]
        if not test_items:
            raise ValueError("test_items: held-out evaluation needs at least one item")
        max_new = config.max_new_tokens or task.max_new_tokens
        data = cls(train_items, test_items, [task.prompt(item, tokenizer) for item in train_items],
                   [task.prompt(item, tokenizer) for item in test_items], max_new)
        # before anything is written: a prompt past the model's context is refused, not trained on
        check_context(model, tokenizer, data.train_prompts, max_new, "training")
        check_context(model, tokenizer, data.test_prompts, max_new, "held-out")
        return data

    def batch(self, config: FinetuneConfig, iteration: int) -> tuple[list[str], list]:
        """The prompts and items every member sees at ``iteration``."""
        idx = batch_indices(config.es.seed, iteration, config.train_size, config.batch_size)
        return [self.train_prompts[i] for i in idx], [self.train_items[i] for i in idx]


class _Run:
    """The bookkeeping of one :func:`finetune` call: the result tables, and (with an output
    folder) the seed log, held-out evaluations, completions and checkpoints on disk."""

    def __init__(self, model: Any, tokenizer: Any, task: Any, data: _Data, config: FinetuneConfig, es: ES,
                 output_dir: str | os.PathLike | None, callback: Callable[[FinetuneResult], None] | None):
        self.model, self.tokenizer, self.task, self.data, self.config, self.es = model, tokenizer, task, data, config, es
        self.callback = callback
        self.result = FinetuneResult(config=config, model=model, tokenizer=tokenizer, es=es)
        self.out = Path(output_dir) if output_dir is not None else None
        self.result.output_dir = self.out
        self.runlog: RunLog | None = None
        self.elapsed, self.samples = 0.0, 0

    # -- opening the folder: a new run, or the state of the one to resume

    def open(self, resume: bool, overwrite: bool, metadata: dict | None) -> None:
        if self.out is None:
            return
        remove_stale_temps(self.out)  # a killed run's half-written checkpoint (we hold the lock)
        ckpt = self._checkpoint_to_resume() if resume else None
        fingerprint = prompt_fingerprint(self.data.train_prompts, self.data.test_prompts)
        if resume and (ckpt is not None or (self.out / "log.jsonl").is_file()):
            self._resume(ckpt, fingerprint, metadata)
        else:
            self._create(overwrite, resume, fingerprint, metadata)

    def _checkpoint_to_resume(self) -> dict | None:
        path = self.out / CHECKPOINT
        if not path.exists():
            return None
        if not (self.out / "log.jsonl").is_file():
            raise ValueError(f"{self.out}: the seed log log.jsonl is missing, so the run cannot be resumed")
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
            ckpt["es"], ckpt["seconds"], ckpt["samples"]
            return ckpt
        except Exception as e:  # noqa: BLE001 - any damage: the seed log still holds the run
            print(f"note: {path} is damaged ({type(e).__name__}); rebuilding the weights from the "
                  f"seed log instead", file=sys.stderr)
            return None

    def _resume(self, ckpt: dict | None, fingerprint: dict, metadata: dict | None) -> None:
        out, es, config = self.out, self.es, self.config
        saved_meta = read_run_config(out)
        _check_resume_config(saved_meta.get("finetune", {}), config, out / "config.json")
        _check_resume_prompts(saved_meta.get("prompts"), fingerprint, out / "config.json")
        if ckpt is not None:
            es.load_state_dict(ckpt["es"])
            self.elapsed, self.samples = float(ckpt["seconds"]), int(ckpt["samples"])
        else:  # no checkpoint (checkpoint_every=0, or killed before the first): replay the seed log
            from .runlog import INITIAL, replay

            entries = read_log(out / "log.jsonl")
            initial = load_checkpoint(out / INITIAL) if (out / INITIAL).is_file() else es.state_dict()
            es.load_state_dict(replay((initial, entries), self.model, master_device=config.master_device).state_dict())
            last = entries[-1] if entries else {}
            self.elapsed, self.samples = float(last.get("seconds", 0.0)), int(last.get("samples", 0))
        if config.iterations < es.iteration:
            raise ValueError(f"iterations: {config.iterations} is below the {es.iteration} iterations the run "
                             f"in {out} has already done")
        result = self.result
        result.resumed_from = es.iteration
        # drops the log lines written after the checkpoint: they are recomputed identically
        self.runlog = RunLog.open(out, resume_at=es.iteration)
        result.log_rows = _metrics(read_log(out / "log.jsonl"))
        result.eval_rows = [r for r in read_jsonl(out / EVAL_LOG, missing_ok=True) if r["iteration"] <= es.iteration]
        write_jsonl(out / EVAL_LOG, result.eval_rows)
        result.samples_before = _samples_frame(out / SAMPLES_BEFORE)
        result.samples_after = _samples_frame(out / SAMPLES_AFTER)
        # the settings that may change (iterations, evaluation) are updated in config.json
        meta = read_run_config(out)
        meta["finetune"] = config.to_dict()
        meta.setdefault("prompts", fingerprint)  # a run from before fingerprints gets one now
        meta.update(metadata or {})
        write_json(out / "config.json", meta)

    def _create(self, overwrite: bool, resume: bool, fingerprint: dict, metadata: dict | None) -> None:
        out, es = self.out, self.es
        refused = output_refusal(out, overwrite, resume)
        if refused:
            raise FileExistsError(refused)
        meta = {"finetune": self.config.to_dict(), "task": getattr(self.task, "name", type(self.task).__name__),
                "task_repr": repr(self.task), "max_new_tokens": self.data.max_new, "model": model_name(self.model),
                "prompts": fingerprint, **(metadata or {})}
        if self.config.save_initial:
            self.runlog = RunLog.create(out, es, metadata=meta, overwrite=True)
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", {"config": es.config.to_dict(), "names": list(es.params.names),
                                             "start_iteration": 0, **meta})
            self.runlog = RunLog(out, open(out / "log.jsonl", "w"), 0)
        for stale in (CHECKPOINT, EVAL_LOG, SAMPLES_BEFORE, SAMPLES_AFTER):
            if (out / stale).exists():
                (out / stale).unlink()

    # -- during the run

    def evaluation_due(self) -> bool:
        """A held-out evaluation is due after this many updates: on the schedule, at the end, and
        at the start (the starting model's, or a scheduled one a kill interrupted; a resume at an
        iteration off the schedule adds no row)."""
        done, config, rows = self.es.iteration, self.config, self.result.eval_rows
        due = done == 0 or (config.eval_every and done % config.eval_every == 0) or done == config.iterations
        return bool(due or not rows) and (not rows or rows[-1]["iteration"] != done)

    def held_out(self, log_row: bool = True) -> None:
        """Evaluate the unperturbed weights on the held-out items; keep their completions."""
        t0 = time.perf_counter()
        result, out, data = self.result, self.out, self.data
        ev = evaluate(self.model, self.tokenizer, self.task, data.test_items, batch_size=self.config.eval_batch_size,
                      max_new_tokens=data.max_new, progress=False)
        frame = ev["samples"].assign(iteration=self.es.iteration)
        result.samples_after = frame
        if out is not None:  # always the latest evaluation's completions
            write_jsonl(out / SAMPLES_AFTER, frame.to_dict("records"))
        if not log_row:
            return
        row = {"iteration": self.es.iteration, "test_accuracy": ev["accuracy"], "test_reward": ev["mean_reward"],
               "samples": self.samples, "seconds": self.elapsed, "eval_seconds": time.perf_counter() - t0}
        result.eval_rows.append(row)
        if result.samples_before is None:
            result.samples_before = frame
            if out is not None:
                write_jsonl(out / SAMPLES_BEFORE, frame.to_dict("records"))
        if out is not None:
            with open(out / EVAL_LOG, "a") as f:
                f.write(json.dumps(row, default=json_default) + "\n")
        if self.callback is not None:
            self.callback(self.result)

    def log(self, iteration: int, entry: dict, accs: Sequence[float], n_prompts: int, seconds: float) -> dict:
        """Record one iteration: the metrics row, and the seed log line that carries them too."""
        self.samples += n_prompts * len(accs)
        self.elapsed += seconds
        row = {"iteration": iteration, "reward_mean": entry["reward_mean"], "reward_min": entry["reward_min"],
               "reward_max": entry["reward_max"], "reward_std": entry["reward_std"],
               "accuracy": float(np.mean(accs)), "accuracy_max": float(np.max(accs)),
               "update_norm": entry["update_norm"], "iter_seconds": seconds, "seconds": self.elapsed,
               "samples": self.samples}
        self.result.log_rows.append(row)
        if self.runlog is not None:
            self.runlog.append({**entry, **row})
        if self.callback is not None:
            self.callback(self.result)
        return row

    def checkpoint(self) -> None:
        if self.out is None:
            return
        save_checkpoint(self.out / CHECKPOINT, {"es": self.es.state_dict(), "seconds": self.elapsed,
                                                "samples": self.samples})
        _write_csvs(self.out, self.result)

    def close(self) -> None:
        if self.runlog is not None:
            self.runlog.close()

    def finish(self) -> FinetuneResult:
        """The last checkpoint, the latest completions and the final model."""
        self.checkpoint()
        if self.out is not None:
            after = self.result.samples_after
            if after is None or "iteration" not in after or int(after["iteration"].iloc[0]) != self.es.iteration:
                self.held_out(log_row=False)  # a resumed run whose last evaluation's completions were not kept
            if self.config.save_final:
                save_final(self.model, self.tokenizer, self.out / FINAL)
        return self.result

    def progress_bar(self, show: bool):
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.iterations, initial=min(self.es.iteration, self.config.iterations), desc="ES",
                    unit="it", dynamic_ncols=True)


@_one_writer
@_under_its_decoder
def finetune(model: Any, tokenizer: Any, task: Any, train_items: Sequence[Any] | None = None,
             test_items: Sequence[Any] | None = None, config: FinetuneConfig | None = None,
             output_dir: str | os.PathLike | None = None, callback: Callable[[FinetuneResult], None] | None = None,
             resume: bool = False, overwrite: bool = False, progress: bool = True,
             metadata: dict | None = None, population_evaluator: Callable | None = None,
             noise_cache: int | str | None = "auto") -> FinetuneResult:
    """ES fine-tuning of ``model`` (in place) on ``task``; returns a :class:`FinetuneResult`.

    ``train_items``/``test_items``: task items (``None``: :func:`default_items`). Only the first
    ``config.train_size`` training items are used; held-out evaluation uses ``test_items`` (never
    the training items).

    ``output_dir``: where the seed log, held-out evaluations, checkpoints and the final model go
    (``None``: nothing is written, no resume). The run holds the folder's lock
    (:class:`esnb.runlog.RunLock`) throughout: a second run on it raises ``RunLocked``. With
    ``resume=True`` the run continues from the checkpoint in ``output_dir`` (settings must match,
    except ``iterations``, ``eval_every``, ``checkpoint_every``, ``test_size`` and batch sizes);
    when there is no checkpoint, or it is damaged, the weights are rebuilt from the seed log
    (``initial.pt`` + ``log.jsonl``; without ``initial.pt``, ``model`` must be the run's starting
    model); with neither, it starts afresh. ``iterations`` below those already done raises
    ``ValueError``. An existing run, or any non-empty folder that is not a run (a model folder,
    say), is never written to unless ``overwrite=True``.

    ``callback(result)`` is called after every iteration and every held-out evaluation (use it
    for live curves: ``esnb.plots.LiveCurves``). ``progress``: tqdm bars.

    ``noise_cache``: bytes (or ``"auto"``, or 0) for keeping each member's noise from its
    perturbation to the update (:meth:`esnb.noise.ParameterSet.cache_noise`): time, not results;
    ``"auto"`` uses it for models of 20M parameters or more where a quarter of the free memory holds it.
    ``population_evaluator``: replaces :func:`score_members` as the function that scores a
    population (same signature); :mod:`esnb.distributed` passes one that spreads the members over
    processes and gathers their rewards.
    """
    config = config or FinetuneConfig()
    data = _Data.build(model, tokenizer, task, train_items, test_items, config)
    if not config.early_stop and tuple(getattr(task, "stop_strings", ()) or ()):
        task = NoEarlyStop(task)
    score_population = population_evaluator or functools.partial(score_members, population_batch=config.population_batch)
    model = _prepare_model(model, config)
    es = (PaperSeedsES if config.seeds == "paper" else ES)(model, config.es, master_device=config.master_device,
                                                            noise_cache=noise_cache)
    run = _Run(model, tokenizer, task, data, config, es, output_dir, callback)
    run.open(resume, overwrite, metadata)
    if run.evaluation_due():
        run.held_out()
    bar = run.progress_bar(progress)
    try:
        while es.iteration < config.iterations:
            t0, it = time.perf_counter(), es.iteration
            prompts, items = data.batch(config, it)
            with share_cores():  # fewer threads while another process holds a core (esnb._cpu)
                rewards, accs = score_population(es, es.ask(), model, tokenizer, task, prompts, items,
                                                 max_new_tokens=data.max_new, batch_size=config.gen_batch_size)
                entry = es.tell(rewards)
            row = run.log(it, entry, accs, len(prompts), time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}",
                                test=f"{run.result.eval_rows[-1]['test_accuracy']:.3f}")
            if run.evaluation_due():
                run.held_out()
            done = es.iteration
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.iterations:
                run.checkpoint()
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return run.finish()


def save_final(model: Any, tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Save model and tokenizer in Hugging Face format (``from_pretrained(directory)`` loads them)."""
    from .models import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar in notebooks
    directory = Path(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return match_umask(directory)  # safetensors writes model.safetensors 0600


def load_result(directory: str | os.PathLike) -> FinetuneResult:
    """Read a finished (or interrupted) run directory back: config, log, held-out evaluations and
    example completions (no model; load ``DIR/final`` with ``from_pretrained`` or
    :func:`esnb.models.load_model`)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a run directory)")
    meta = json.loads((directory / "config.json").read_text())
    config = FinetuneConfig.from_dict(meta.get("finetune", {}))
    result = FinetuneResult(config=config, output_dir=directory,
                            log_rows=_metrics(read_log(directory / "log.jsonl")),
                            eval_rows=read_jsonl(directory / EVAL_LOG, missing_ok=True))
    result.samples_before = _samples_frame(directory / SAMPLES_BEFORE)
    result.samples_after = _samples_frame(directory / SAMPLES_AFTER)
    return result


def rebuild(directory: str | os.PathLike, model: Any, until: int | None = None) -> ES:
    """Rebuild the weights of a logged run into ``model`` from its seed log alone, generating nothing.

    ``model`` must be the run's starting model (e.g. a fresh ``load_model("tiny")``); its weights
    are the initial state when the run directory has no ``initial.pt`` (the small logs shipped in
    ``data/runs/`` keep only the seed log). ``until=k`` stops before iteration ``k``. Bit-identical
    to the live run's weights: the same ``ES.apply_update`` calls on the same float64 weights.
    """
    from .runlog import INITIAL, replay

    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    config = FinetuneConfig.from_dict(meta.get("finetune", {}))
    if (directory / INITIAL).is_file():
        initial = load_checkpoint(directory / INITIAL)
    else:
        initial = ES(model, config.es).state_dict()
    return replay((initial, read_log(directory / "log.jsonl")), model, until=until,
                  master_device=config.master_device)


# ---------------------------------------------------------------- command line


# What may change when a run is resumed from the command line.
_CLI_RESUMABLE = ("iterations", "eval_every", "checkpoint_every", "test_size", "threads", "no_progress")
# Settings a run folder's config.json may hold under an older name.
_CLI_RENAMED = {"population": "population_size"}


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m esnb.finetune`` (and of ``torchrun -m esnb.distributed``): the
    run's own (model, task, folders) and one flag per command-line field of :class:`FinetuneConfig`
    and :class:`esnb.es.ESConfig`, help text and checks taken from the fields."""
    ap = OneLineParser(
        prog="python -m esnb.finetune", allow_abbrev=False,
        description="Full-parameter ES fine-tuning of a causal LM on a task (Qiu et al. 2025). "
                    "Writes the seed log, held-out evaluations, checkpoints and the final model to --output.")
    add_run_arguments(ap, "run")
    ap.add_argument("--threads", type=positive_int, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_const", const=True, help="one printed line per iteration instead of a bar")
    groups: dict = {}
    add_config_arguments(ap, ESConfig, FinetuneConfig, groups=groups)
    add_data_argument(groups[PAPER_GROUP])
    return ap


def cli_arguments(settings: dict) -> list[str]:
    """The command-line arguments of saved settings (a run folder's ``cli`` block): the command that
    made the run, less its ``--output``."""
    args: list[str] = []
    for key, value in settings.items():
        key = _CLI_RENAMED.get(key, key)
        flag = "--task-option" if key == "task_options" else flag_of(key, ESConfig, FinetuneConfig)
        if key == "task_options":
            args += [a for k, v in value.items() for a in (flag, f"{k}={v}")]
        elif key == "fidelity":
            args += ["--paper-faithful"] if value == "paper" else []
        elif key == "early_stop":
            args += [] if value else ["--no-early-stop"]
        elif value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def config_from_settings(settings: dict) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of command-line settings (``vars(args)``, or a run folder's
    saved ``cli`` settings): the fields they set, defaults for the rest."""
    return FinetuneConfig.of(**config_settings(settings, ESConfig, FinetuneConfig))


def cli_settings(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, dict, bool]:
    """(run directory, settings, resuming) from the parsed arguments; errors go through ``ap.error``."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "output", "overwrite")}
    if args.resume:
        out = Path(args.resume)
        if args.output and Path(args.output) != out:
            ap.error("--output and --resume name different directories; give one of them")
        cfg_path = out / "config.json"
        if not cfg_path.is_file():
            ap.error(f"--resume: {out} holds no run (no config.json)")
        try:
            saved = read_run_config(out).get("cli")
        except ValueError as e:
            ap.error(f"--resume: {e}")
        if not saved or not isinstance(saved, dict):
            ap.error(f"--resume: {out} was not started from the command line (config.json has no 'cli' settings)")
        saved = {_CLI_RENAMED.get(k, k): v for k, v in saved.items()}
        if not (out / "log.jsonl").is_file():
            ap.error(f"--resume: {out / 'log.jsonl'} is missing: the run's seed log is gone, so it cannot be resumed")
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a line cut off by a kill is expected
                done = len(read_log(out / "log.jsonl"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            ap.error(f"--resume: the seed log is damaged: {str(e).splitlines()[0][:200]}")
        if args.iterations is not None and args.iterations < done:
            ap.error(f"--iterations: {args.iterations} is below the {done} iterations the run in {out} has already "
                     f"done (its seed log has them)")
        if "task_option" in given:
            given["task_options"] = parse_task_options(ap, given.pop("task_option"))
        clash = sorted(k for k, v in given.items() if k not in _CLI_RESUMABLE and saved.get(k) != v)
        if clash:
            ap.error(f"--resume: {', '.join(flag_of(k, ESConfig, FinetuneConfig) for k in clash)} differ from the "
                     f"run in {out}; only {', '.join(flag_of(k, ESConfig, FinetuneConfig) for k in _CLI_RESUMABLE)} "
                     f"may change")
        return out, {**saved, **given}, True
    out = new_run_folder(ap, args)
    refused = output_refusal(out, bool(args.overwrite), cli=True)  # a run, a model folder: never written over
    if refused:
        ap.error(f"--output: {refused}")
    settings = dict(given)
    settings["task_options"] = parse_task_options(ap, settings.pop("task_option", None))
    model = settings["model"]
    if model.strip().lower() not in _MODEL_NAMES and Path(model).exists():
        settings["model"] = str(Path(model).resolve())  # a resume from another folder finds it too
    if settings.get("data"):
        settings["data"] = str(Path(settings["data"]).resolve())
    return out, settings, False


# The model names load_model knows (anything else is a hub id or a folder).
_MODEL_NAMES = (*SHIPPED, "smollm2-135m", "smollm2")
# Bytes per population member that live in memory every iteration whatever the model (the
# member list, rewards, shaped weights, the seed log line), rounded up from a measurement.
_BYTES_PER_MEMBER = 300


def _check_population_fits(ap: argparse.ArgumentParser, population: int) -> None:
    """Refuse, before anything is loaded, a population whose bookkeeping alone exceeds the RAM."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this system: assume a large machine
        ram = 1 << 40
    need = population * _BYTES_PER_MEMBER
    if need > ram:
        def size(n: float) -> str:
            for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
                if n < 1000 or unit == "PB":
                    return f"{n:,.0f} {unit}"
                n /= 1000
        ap.error(f"--population: {population:,} members would need about {size(need)} of memory for their seeds "
                 f"and rewards alone (this machine has {size(ram)}); the paper uses 30")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m esnb.finetune``: see ``--help``. Bad arguments end with one line (exit status 2)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    out, settings, resuming = cli_settings(ap, args)
    saved_run = read_run_config(out).get("finetune", {"seeds": None}) if resuming else {}
    if resuming and "seeds" not in saved_run:
        # made before seed schedules, paper mode's seed 33 and the paper-script reward: it keeps esnb's
        settings.setdefault("seeds", "esnb")
        settings.setdefault("seed", saved_run.get("seed", 0))
        settings["legacy_reward"] = True
    try:
        config = config_from_settings(settings)
    except ValueError as e:
        ap.error(str(e))
    _check_population_fits(ap, config.es.population_size)
    if config.device is not None:
        from .models import check_device

        try:
            check_device(config.device)
        except ValueError as e:
            ap.error(f"--{e}")
    lock = RunLock(out)
    try:  # one writer per run folder, from before the model is loaded to the end
        lock.acquire()
    except (RunLocked, OSError) as e:
        ap.exit(2, f"{ap.prog}: error: --{'resume' if resuming else 'output'}: {e}\n")
    if lock.reclaimed:
        print(f"note: {out}: took over the lock left by a run that ended without releasing it ({lock.reclaimed})",
              file=sys.stderr)
    try:
        return _main_locked(ap, out, settings, resuming, config, overwrite=bool(args.overwrite))
    except KeyboardInterrupt:
        ap.exit(130, f"{ap.prog}: interrupted; continue with --resume {out}\n")
    finally:
        lock.release()


def _main_locked(ap: argparse.ArgumentParser, out: Path, settings: dict, resuming: bool, config: FinetuneConfig,
                 overwrite: bool) -> int:
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])

    from .models import ModelNotAvailable, load_model

    task, train_items, test_items = cli_task_and_items(ap, settings, config.fidelity == "paper", config.train_size)
    try:
        model, tokenizer = load_model(settings["model"], device=config.device, dtype=config.dtype)
    except (ModelNotAvailable, OSError, ValueError) as e:
        ap.error(f"--model: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    quiet = bool(settings.get("no_progress"))
    seen = {"log": 0, "eval": 0}

    def say(msg: str) -> None:
        if quiet:
            print(msg, flush=True)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def report(result: FinetuneResult) -> None:
        if result.resumed_from is not None and not seen.get("resumed"):
            seen["resumed"] = 1
            say(f"resumed from the checkpoint at iteration {result.resumed_from}")
        if quiet and len(result.log_rows) > seen["log"]:
            r = result.log_rows[-1]
            say(f"iteration {r['iteration']}: reward {r['reward_mean']:.4f} (min {r['reward_min']:.4f}, "
                f"max {r['reward_max']:.4f}), accuracy {r['accuracy']:.3f}, {r['iter_seconds']:.2f} s")
        if len(result.eval_rows) > seen["eval"]:
            e = result.eval_rows[-1]
            say(f"held-out after {e['iteration']} iterations: accuracy {e['test_accuracy']:.3f}, "
                f"reward {e['test_reward']:.4f} ({len(test_items if config.test_size is None else test_items[:config.test_size])} items)")
        seen["log"], seen["eval"] = len(result.log_rows), len(result.eval_rows)

    try:
        result = finetune(model, tokenizer, task, train_items, test_items, config, output_dir=out, callback=report,
                          resume=resuming, overwrite=overwrite, progress=not quiet, metadata={"cli": settings})
    except (ValueError, FileExistsError, RunLocked) as e:  # refused settings or folder: one line, no traceback
        ap.exit(2, f"{ap.prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    print(f"done: {config.iterations} iterations, held-out accuracy {result.accuracy_before:.3f} -> "
          f"{result.accuracy_after:.3f}, {result.seconds_per_iteration:.2f} s/iteration; run in {out}"
          + (f", final model in {out / FINAL}" if config.save_final else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
