"""The RL baseline: GRPO on the same model, task, reward and held-out evaluation as the ES engine.

GRPO (Group Relative Policy Optimization, Shao et al. 2024) samples a *group* of ``G``
completions per prompt, scores each with the task's reward, turns the rewards into advantages by
z-scoring inside the group, and takes a clipped policy-gradient step with AdamW; an optional KL
penalty ``beta`` keeps the policy near the starting (reference) model. We use TRL's
``GRPOTrainer`` (the implementation RL users know) and only wrap it so that

* the reward is the task's ``score()`` (the very function ES optimizes),
* one *sample* = one completion scored, counted the same way as the ES engine counts them,
* held-out accuracy is measured with ``esnb.generation.evaluate`` (greedy), the same call the ES
  engine uses, on the same test items, at step 0 and every ``eval_every`` steps,
* the clock counts training only (held-out evaluation is paused out of ``seconds``),
* the log is a pandas DataFrame with the ES engine's columns (``iteration``, ``samples``,
  ``reward``, ``test_accuracy``, ``test_reward``, ``seconds``) plus GRPO's own (``loss``,
  ``kl``, ``grad_norm``, ...), and peak memory is measured while training.

Nothing here needed a hand-written GRPO: TRL 1.16 runs on CPU (``use_cpu=True``, no bf16), takes
our character tokenizer as ``processing_class``, and accepts any Python reward function.

Two details worth knowing:

* Stop strings. ES generation stops right after ``</answer>``; TRL's sampler stops only at EOS
  ids. A stop string that is a single token (the tiny model's ``</answer>``) is therefore added to
  the model's EOS ids for the duration of training (TRL then also masks the tokens after it); a
  longer stop string cannot be, so the reward cuts the completion after it before scoring
  (the policy gradient still sees the tokens after it, which is TRL's behaviour).
* TRL defaults differ from the paper-era GRPO: we set ``loss_type="grpo"`` (sequence-mean loss
  of the DeepSeekMath paper; TRL's default is ``"dapo"``), activation (gradient) checkpointing off
  (CPU, tiny models) and a constant learning rate; every other TRL option can be passed through
  ``GRPORunConfig.trl_args``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .memory import PeakRSS, training_state_bytes
from .cli import cli_field, nonneg_float, nonneg_int, positive_float, positive_int
from .files import match_umask, read_jsonl, write_json, write_jsonl
from .runlog import ResultTables

__all__ = ["GRPORunConfig", "GRPOResult", "train_grpo", "save_result", "load_result"]

FINAL = "final"

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPORunConfig:
    """One GRPO run. Validated on construction (a bad value raises ``ValueError`` naming the field).

    One optimizer step uses ``prompts_per_step`` training prompts with ``num_generations``
    sampled completions each, so ``samples_per_step = prompts_per_step * num_generations``
    completions are scored per step (the paper's "GRPO(8)" / "GRPO(30)" is the group size).
    """

    steps: int = cli_field(100, "optimizer steps", type=positive_int)
    num_generations: int = cli_field(8, "group size G: completions per prompt, >= 2", metavar="G", type=positive_int)
    prompts_per_step: int = cli_field(1, "distinct prompts per step", type=positive_int)
    # AdamW; 3e-4 at batch 8 damaged the tiny model, 1e-4 did not
    learning_rate: float = cli_field(1e-4, "AdamW learning rate", flag="--lr", type=positive_float)
    beta: float = cli_field(0.0, "KL penalty to the starting model (0: none, no reference model)", type=nonneg_float)
    temperature: float = cli_field(1.0, "sampling temperature of the training completions", type=positive_float)
    max_new_tokens: int | None = cli_field(None, "generation cap (default: the task's)", type=positive_int,
                                           show_default=False)
    epsilon: float = cli_field(0.2, "PPO-style clipping of the probability ratio", type=nonneg_float)
    num_iterations: int = cli_field(1, "gradient steps per generated batch (mu)", type=positive_int)
    loss_type: str = cli_field("grpo", "TRL's loss", choices=list(LOSS_TYPES))
    scale_rewards: str = cli_field("group", "divide advantages by the group's std ('none': Dr. GRPO)",
                                   choices=list(SCALE_REWARDS))
    max_grad_norm: float = cli_field(1.0, "gradient clipping", type=positive_float)
    weight_decay: float = cli_field(0.0, "AdamW weight decay", type=nonneg_float)
    eval_every: int = cli_field(10, "held-out evaluation every K steps (0: only at start and end)", type=nonneg_int)
    eval_batch_size: int = 64
    checkpoint_every: int = cli_field(0, "with --output: a resumable checkpoint every K steps (0: none)",
                                      type=nonneg_int)
    seed: int = cli_field(0, "run seed", type=nonneg_int)
    threads: int | None = cli_field(None, "torch CPU threads for the run (default: as they are)", type=positive_int,
                                    show_default=False)
    bf16: bool = cli_field(False, "bf16 training (only on a GPU that supports it)", action="store_const", const=True,
                           show_default=False)
    track_updates: bool = False      # log the RMS of each step's weight change (costs a weight copy)
    progress: bool = cli_field(True, "one printed line per evaluation instead of a bar", flag="--no-progress",
                               action="store_const", const=False, show_default=False)
    trl_args: dict = field(default_factory=dict)  # any other trl.GRPOConfig field

    def __post_init__(self) -> None:
        def positive_int(name: str, zero_ok: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
                raise ValueError(f"{name}: expected an integer {'>= 0' if zero_ok else '>= 1'}, got {v!r}")

        for name in ("steps", "num_generations", "prompts_per_step", "num_iterations", "eval_batch_size"):
            positive_int(name)
        positive_int("eval_every", zero_ok=True)
        positive_int("checkpoint_every", zero_ok=True)
        if self.num_generations < 2:
            raise ValueError("num_generations: GRPO needs at least 2 completions per prompt "
                             "(advantages are rewards relative to the group)")
        if self.max_new_tokens is not None:
            positive_int("max_new_tokens")
        if self.threads is not None:
            positive_int("threads")
        for name in ("learning_rate", "temperature", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        for name in ("beta", "weight_decay", "epsilon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards: expected one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if not isinstance(self.trl_args, dict):
            raise ValueError("trl_args: expected a dict of trl.GRPOConfig fields")
        reserved = {"max_steps", "num_generations", "per_device_train_batch_size", "learning_rate",
                    "beta", "seed", "output_dir", "temperature", "max_completion_length"}
        clash = sorted(reserved & set(self.trl_args))
        if clash:
            raise ValueError(f"trl_args: set {clash} through the GRPORunConfig fields instead")

    @property
    def samples_per_step(self) -> int:
        """Completions scored per optimizer step (the unit shared with ES)."""
        return self.prompts_per_step * self.num_generations

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ memory


# ------------------------------------------------------------------------------------ results


@dataclass
class GRPOResult(ResultTables):
    """What :func:`train_grpo` returns; laid out like ``esnb.finetune.FinetuneResult``.

    * ``log``: DataFrame, one row per optimizer step: ``iteration`` (0-based step), ``reward_mean``,
      ``reward_std``, ``reward_min``, ``reward_max`` (over the step's sampled completions),
      ``accuracy`` (fraction of them correct), ``iter_seconds``, ``seconds`` (cumulative training
      time, held-out evaluation excluded), ``samples`` (completions scored so far), then TRL's
      ``loss``, ``kl`` (when ``beta > 0``), ``grad_norm``, ``entropy``, ``mean_length`` and, with
      ``track_updates``, ``update_rms``.
    * ``evals``: DataFrame of greedy held-out evaluations: ``iteration`` (steps done; 0 = the
      starting model), ``test_accuracy``, ``test_reward``, ``samples``, ``seconds``, ``eval_seconds``.
    * ``samples_before`` / ``samples_after``: the held-out completions of the first and last evaluation.
    * ``peak_rss``: bytes the process grew by while training (:class:`PeakRSS`); ``cuda_peak`` on
      CUDA; ``state_bytes``: exact bytes of weights, gradients, optimizer state and reference model.
    """

    config: GRPORunConfig
    log_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    samples_before: Any = None
    samples_after: Any = None
    model: Any = None
    tokenizer: Any = None
    peak_rss: int = 0
    cuda_peak: int | None = None
    state_bytes: dict = field(default_factory=dict)
    output_dir: Path | None = None
    metadata: dict = field(default_factory=dict)  # written into config.json beside the settings (e.g. "cli")



    def summary(self) -> dict:
        """The headline numbers as a flat, JSON-friendly dict."""
        return {"method": "GRPO", "seed": self.config.seed, "steps": len(self.log_rows),
                "samples": self.samples, "seconds": round(self.seconds, 3),
                "seconds_per_iteration": self.seconds_per_iteration,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "reward_before": float(self.eval_rows[0]["test_reward"]) if self.eval_rows else float("nan"),
                "reward_after": float(self.eval_rows[-1]["test_reward"]) if self.eval_rows else float("nan"),
                "peak_rss": self.peak_rss, "cuda_peak": self.cuda_peak,
                **{f"{k}_bytes": v for k, v in self.state_bytes.items()}}

    def __repr__(self) -> str:
        return (f"GRPOResult({len(self.log_rows)} steps, {self.samples} samples, held-out accuracy "
                f"{self.accuracy_before:.3f} -> {self.accuracy_after:.3f}, "
                f"{self.seconds_per_iteration:.2f} s/step)")


# ------------------------------------------------------------------------------------ training


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


_TRL_LOGS = {"loss": "loss", "kl": "kl", "grad_norm": "grad_norm", "entropy": "entropy",
             "completions/mean_length": "mean_length", "clip_ratio/region_mean": "clip_ratio"}


def train_grpo(model: Any, tokenizer: Any, task: Any, train_items: Sequence[Any] | None = None,
               test_items: Sequence[Any] | None = None, config: GRPORunConfig | None = None,
               output_dir: str | os.PathLike | None = None,
               callback: Callable[[GRPOResult], None] | None = None, overwrite: bool = False,
               resume: bool = False, metadata: dict | None = None) -> GRPOResult:
    """Train ``model`` with GRPO on ``task`` (in place) and evaluate it on ``test_items``.

    ``output_dir`` must be new or empty (a run, a model or anything else there is never written
    over) unless ``overwrite=True``; it is locked while the run lasts (:class:`esnb.runlog.RunLock`:
    a second run on the same folder raises :class:`esnb.runlog.RunLocked`), and every file is
    written atomically, so a killed run leaves whole files or none.

    ``train_items`` are the prompts GRPO samples from (cycled, shuffled with ``config.seed``);
    ``test_items`` are only ever evaluated greedily, before training, every ``eval_every`` steps
    and at the end (``None`` for either: the task's own items, or the shipped Countdown split).
    ``callback(result)`` is called after every step and every evaluation (live curves). With
    ``output_dir`` the run is written there: ``config.json``, ``log.jsonl``, ``eval.jsonl``,
    ``samples_before.jsonl``, ``samples_after.jsonl``, ``summary.json`` and ``final/`` (model and
    tokenizer in Hugging Face format, ``from_pretrained(DIR / "final")``).

    With ``config.checkpoint_every = K`` and an ``output_dir``, TRL's full training state (weights,
    optimizer, random states) is saved every K steps under ``DIR/checkpoints`` with the log so far;
    ``resume=True`` continues a killed run from its last checkpoint (the settings must be the
    run's, ``steps``, ``eval_every``, ``checkpoint_every``, ``threads`` and ``progress`` excepted).
    """
    if output_dir is None:
        if resume:
            raise ValueError("resume=True needs the output_dir of the run to continue")
        return _train_grpo(model, tokenizer, task, train_items, test_items, config, None, callback, metadata=metadata)
    from .runlog import LOCK, RunLock

    out = Path(output_dir)
    lock = RunLock(out)
    lock.acquire()  # before looking inside: two runs on one folder cannot both pass the check
    try:
        if resume:
            state = _resume_state(out, config or GRPORunConfig())
            return _train_grpo(model, tokenizer, task, train_items, test_items, config, out, callback, state, metadata)
        foreign = [p.name for p in sorted(out.iterdir()) if p.name != LOCK]
        if foreign and not overwrite:
            raise FileExistsError(f"{out} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                                  "a GRPO run never writes over a run, a model or other files; choose a new or empty "
                                  "folder, or pass overwrite=True (or resume=True to continue a run)")
        if overwrite and (out / CHECKPOINTS).exists():
            shutil.rmtree(out / CHECKPOINTS)  # an old run's training state must not be resumed into this one
        return _train_grpo(model, tokenizer, task, train_items, test_items, config, out, callback, metadata=metadata)
    finally:
        lock.release()


CHECKPOINTS = "checkpoints"  # TRL's resumable training state, inside a run folder
# settings a resume may change (the others must be the run's)
_RESUMABLE = {"steps", "eval_every", "checkpoint_every", "threads", "progress", "eval_batch_size"}


def _resume_state(out: Path, config: GRPORunConfig) -> dict:
    """What a resume of the run in ``out`` starts from: its last checkpoint and the rows logged up
    to it. Refuses, in one line, a folder without a run or checkpoint, or other settings."""
    try:
        saved = load_result(out)
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{out}: cannot resume: no GRPO run here ({str(e).splitlines()[0]})") from None
    run, now = saved.config.to_dict(), config.to_dict()
    diffs = [f"{k}: {run[k]!r} in the run, {now[k]!r} now" for k in now if k not in _RESUMABLE and run[k] != now[k]]
    if diffs:
        raise ValueError(f"{out}: cannot resume with other settings ({'; '.join(diffs)})")
    checkpoints = sorted((p for p in (out / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1])) if (out / CHECKPOINTS).is_dir() else []
    if not checkpoints:
        raise ValueError(f"{out}: cannot resume: no checkpoint (the run had checkpoint_every=0, or was killed "
                         f"before its first)")
    step = int(checkpoints[-1].name.split("-")[-1])
    log = [r for r in saved.log_rows if r["iteration"] < step]
    if len(log) != step:
        raise ValueError(f"{out}: cannot resume: log.jsonl has {len(log)} of the {step} steps its checkpoint holds")
    return {"checkpoint": checkpoints[-1], "log": log, "evals": [r for r in saved.eval_rows if r["iteration"] <= step],
            "samples_before": saved.samples_before, "metadata": saved.metadata}


class _GRPORun:
    """What the reward function, the step callback and :func:`_train_grpo` share in one run: the
    result tables, the sample counter and a clock that counts training only."""

    def __init__(self, model: Any, tokenizer: Any, task: Any, train_items: list, test_items: list,
                 config: GRPORunConfig, output_dir: Path | None, callback: Callable[[GRPOResult], None] | None,
                 resume_state: dict | None):
        from .generation import split_stops

        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.train_items, self.test_items, self.output_dir, self.callback = train_items, test_items, output_dir, callback
        self.max_new = config.max_new_tokens or task.max_new_tokens
        token_stops, self.text_stops = split_stops(tokenizer, getattr(task, "stop_strings", ()))
        self.token_stops = sorted(token_stops)
        self.result = GRPOResult(config=config, model=model, tokenizer=tokenizer, output_dir=output_dir)
        self.clock = {"t0": 0.0, "paused": 0.0, "last": 0.0, "offset": 0.0}
        self.samples, self.rewards, self.correct = 0, [], []
        self.bar = None
        self.prev: dict[str, torch.Tensor] = {}
        if resume_state is not None:  # the rows up to the checkpoint; training time goes on from there
            result = self.result
            result.log_rows, result.eval_rows = resume_state["log"], resume_state["evals"]
            result.samples_before = resume_state["samples_before"]
            if result.log_rows:
                self.samples = int(result.log_rows[-1]["samples"])
                self.clock["offset"] = float(result.log_rows[-1]["seconds"])

    def paused(self, t0: float) -> None:
        """Time since ``t0`` was not training (evaluation, callbacks, saving)."""
        self.clock["paused"] += time.perf_counter() - t0

    def held_out(self, step: int) -> None:
        from .generation import evaluate

        t = time.perf_counter()
        ev = evaluate(self.model, self.tokenizer, self.task, self.test_items, batch_size=self.config.eval_batch_size,
                      max_new_tokens=self.max_new, progress=False)
        took = time.perf_counter() - t
        result = self.result
        result.eval_rows.append({"iteration": step, "test_accuracy": ev["accuracy"], "test_reward": ev["mean_reward"],
                                 "samples": self.samples, "seconds": result.seconds, "eval_seconds": took})
        result.samples_after = ev["samples"]
        if result.samples_before is None:
            result.samples_before = ev["samples"]
        if self.callback is not None:
            self.callback(result)
        self.paused(t)

    def reward(self, prompts: Sequence[str], completions: Sequence[str], item_index: Sequence[int],
               **_: Any) -> list[float]:
        """The task's own score, on the completion cut where ES generation would stop."""
        from .generation import truncate_at_stops

        out = []
        for text, idx in zip(completions, item_index):
            cut = truncate_at_stops(text, self.text_stops) if self.text_stops else text
            s = self.task.score(cut, self.train_items[int(idx)])
            out.append(float(s["reward"]))
            self.correct.append(bool(s.get("correct", False)))
        self.samples += len(completions)
        self.rewards.extend(out)
        return out

    def start(self) -> None:
        if self.config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.config.steps, desc="GRPO", unit="step", dynamic_ncols=True)
        if self.config.track_updates:
            self.prev.update({k: p.detach().float().clone() for k, p in self.model.named_parameters()})
        self.clock["t0"] = self.clock["last"] = time.perf_counter()

    def end_step(self, step: int) -> None:
        """Log step ``step`` (1-based, as TRL counts), then evaluate when one is due."""
        t, clock, config = time.perf_counter(), self.clock, self.config
        r, c = self.rewards, self.correct
        n = max(len(r), 1)
        mean = sum(r) / n
        row = {"iteration": step - 1, "reward_mean": mean, "reward_std": (sum((x - mean) ** 2 for x in r) / n) ** 0.5,
               "reward_min": min(r, default=float("nan")), "reward_max": max(r, default=float("nan")),
               "accuracy": sum(c) / n, "iter_seconds": t - clock["last"],
               "seconds": t - clock["t0"] - clock["paused"] + clock["offset"], "samples": self.samples}
        self.rewards, self.correct = [], []
        if config.track_updates:
            row["update_rms"] = self._update_rms()
        self.result.log_rows.append(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{mean:.3g}", acc=f"{row['accuracy']:.3f}",
                                 test=f"{self.result.eval_rows[-1]['test_accuracy']:.3f}")
        if self.callback is not None:
            t_cb = time.perf_counter()
            self.callback(self.result)
            self.paused(t_cb)
        if (config.eval_every and step % config.eval_every == 0) or step >= config.steps:
            self.held_out(step)
        clock["last"] = time.perf_counter()

    def _update_rms(self) -> float:
        sq, count = 0.0, 0
        for k, p in self.model.named_parameters():
            d = p.detach().float() - self.prev[k]
            sq += float(d.pow(2).sum())
            count += d.numel()
            self.prev[k].copy_(p.detach())
        return (sq / max(count, 1)) ** 0.5

    def attach_trl_logs(self, step: int, logs: dict | None) -> None:
        # TRL logs after on_step_end: its numbers join the step's row
        rows = self.result.log_rows
        if logs and rows and rows[-1]["iteration"] == step - 1:
            for k, name in _TRL_LOGS.items():
                if k in logs:
                    rows[-1][name] = float(logs[k])

    def saved_checkpoint(self) -> None:
        # TRL has just written its checkpoint: the rows up to it go beside it
        t = time.perf_counter()
        match_umask(self.output_dir / CHECKPOINTS)  # torch and safetensors write some files 0600
        save_progress(self.result, self.output_dir)
        self.paused(t)


def _step_callback(run: _GRPORun, base_threads: int) -> Any:
    """A TRL/transformers callback that hands every step to ``run``."""
    from transformers import TrainerCallback

    from ._cpu import threads_now

    class StepLog(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            # fewer threads while another process holds a core (esnb._cpu): a step otherwise waits
            # for the thread that shares that core at every parallel region
            n = threads_now(base_threads)
            if n != torch.get_num_threads():
                torch.set_num_threads(n)

        def on_train_begin(self, args, state, control, **kw):
            run.start()

        def on_step_end(self, args, state, control, **kw):
            run.end_step(int(state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            run.attach_trl_logs(int(state.global_step), logs)

        def on_save(self, args, state, control, **kw):
            run.saved_checkpoint()

        def on_train_end(self, args, state, control, **kw):
            torch.set_num_threads(base_threads)
            if run.bar is not None:
                run.bar.close()

    return StepLog()


def _trl_args(config: GRPORunConfig, max_new: int, output_dir: Path | None, scratch: str, use_cpu: bool) -> dict:
    """The ``GRPOConfig`` arguments of a run (``scratch``: TRL's output folder when we keep no checkpoints)."""
    checkpointing = output_dir is not None and config.checkpoint_every > 0
    save = (dict(save_strategy="steps", save_steps=config.checkpoint_every, save_total_limit=1)
            if checkpointing else dict(save_strategy="no"))
    args = dict(
        output_dir=str(output_dir / CHECKPOINTS) if checkpointing else scratch, max_steps=config.steps,
        per_device_train_batch_size=config.samples_per_step, gradient_accumulation_steps=1,
        num_generations=config.num_generations, learning_rate=config.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=config.weight_decay,
        # beta is set on the trainer after construction (see _install_reference), so that TRL
        # does not load a reference model from disk
        max_grad_norm=config.max_grad_norm, beta=0.0, temperature=config.temperature,
        max_completion_length=max_new, epsilon=config.epsilon,
        num_iterations=config.num_iterations, loss_type=config.loss_type,
        scale_rewards=config.scale_rewards, seed=config.seed, data_seed=config.seed,
        bf16=bool(config.bf16 and not use_cpu), fp16=False, use_cpu=use_cpu,
        activation_checkpointing=False, logging_steps=1, report_to="none", **save,
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    args.update(config.trl_args)
    return args


def _train_grpo(model: Any, tokenizer: Any, task: Any, train_items: Sequence[Any] | None,
                test_items: Sequence[Any] | None, config: GRPORunConfig | None, output_dir: Path | None,
                callback: Callable[[GRPOResult], None] | None, resume_state: dict | None = None,
                metadata: dict | None = None) -> GRPOResult:
    """:func:`train_grpo` once its output folder, if any, is checked and locked."""
    from datasets import Dataset

    from .models import check_context
    from .tasks import task_items

    config = config or GRPORunConfig()
    train_items, test_items = task_items(task, train_items, test_items)
    if len(train_items) < config.prompts_per_step:
        raise ValueError(f"train_items: need at least prompts_per_step={config.prompts_per_step} items")
    if not test_items:
        raise ValueError("test_items: held-out evaluation needs at least one item")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    max_new = config.max_new_tokens or task.max_new_tokens
    check_context(model, tokenizer, [task.prompt(it, tokenizer) for it in train_items], max_new, "training")
    check_context(model, tokenizer, [task.prompt(it, tokenizer) for it in test_items], max_new, "held-out")
    run = _GRPORun(model, tokenizer, task, train_items, test_items, config, output_dir, callback, resume_state)
    run.result.metadata = dict(metadata if metadata is not None else (resume_state or {}).get("metadata", {}))
    if resume_state is None:
        run.held_out(0)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_progress(run.result, output_dir)  # config.json at once: a killed run can be told and resumed
    dataset = Dataset.from_dict({"prompt": [task.prompt(it, tokenizer) for it in train_items],
                                 "item_index": list(range(len(train_items)))})
    _run_trainer(run, dataset, resume_state)
    if output_dir is not None:
        save_result(run.result, output_dir)
    return run.result


def _run_trainer(run: _GRPORun, dataset: Any, resume_state: dict | None) -> None:
    """Build TRL's trainer around ``run`` and train; the model's generation config, the thread
    count and the logging level are put back whatever happens."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    model, config, result = run.model, run.config, run.result
    base_threads = torch.get_num_threads()  # the ceiling; fewer while other processes hold cores
    tmp = tempfile.TemporaryDirectory(prefix="esnb-grpo-")  # TRL wants an output_dir; we save ourselves
    args = _trl_args(config, run.max_new, run.output_dir, tmp.name, next(model.parameters()).device.type == "cpu")
    # one-token stop strings end a completion like EOS does (TRL then masks what follows)
    gen_cfg = model.generation_config
    saved_eos = copy.deepcopy(gen_cfg.eos_token_id)
    eos = _as_list(saved_eos) or _as_list(run.tokenizer.eos_token_id)
    gen_cfg.eos_token_id = eos + [t for t in run.token_stops if t not in eos]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    had_forward = "forward" in vars(model)

    def reward(prompts, completions, item_index, **kw: Any) -> list[float]:
        return run.reward(prompts, completions, item_index, **kw)

    reward.__name__ = f"{getattr(run.task, 'name', 'task')}_reward"  # TRL names its reward column after it
    try:
        with warnings.catch_warnings(), PeakRSS() as mem:
            # transformers 5 renamed gradient -> activation checkpointing; TRL 1.16 still asks
            warnings.filterwarnings("ignore", message=".*checkpointing.*", category=FutureWarning)
            trl_config = GRPOConfig(**args)
            # TRL would build the reference model from the config's path; the policy passed here
            # may not be what that path holds (changed in memory, or no path), so copy it
            ref_copy = copy.deepcopy(model).eval() if config.beta > 0 else None
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_config, train_dataset=dataset,
                                  processing_class=run.tokenizer, callbacks=[_step_callback(run, base_threads)])
            # our own progress bar instead of the Trainer's (which also prints every log dict)
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            if ref_copy is not None:
                _install_reference(trainer, ref_copy, config.beta)
            trainer.train(resume_from_checkpoint=str(resume_state["checkpoint"]) if resume_state else None)
        result.peak_rss, result.cuda_peak = mem.peak, mem.cuda_peak
        result.state_bytes = training_state_bytes(model, trainer.optimizer, getattr(trainer, "ref_model", None))
    finally:
        torch.set_num_threads(base_threads)  # also when training stopped with an error
        gen_cfg.eos_token_id = saved_eos
        hf_logging.set_verbosity(verbosity)
        if not had_forward and "forward" in vars(model):
            del model.forward  # TRL patched a fused LM head onto the instance; drop it
        model.eval()
        tmp.cleanup()



def _install_reference(trainer: Any, ref_copy: Any, beta: float) -> None:
    """Give the trainer a KL penalty ``beta`` to an exact in-memory copy of the starting policy
    (what TRL does for ``beta > 0``, minus loading the reference from the config's path)."""
    from trl.trainer.utils import add_fused_lm_head

    for p in ref_copy.parameters():
        p.requires_grad_(False)
    add_fused_lm_head(ref_copy, temperature=trainer.temperature,
                      cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
    trainer.ref_model = trainer.accelerator.prepare_model(ref_copy, evaluation_mode=True)
    trainer.beta = float(beta)
    trainer.args.beta = float(beta)


def save_progress(result: GRPOResult, output_dir: str | os.PathLike, **meta: Any) -> None:
    """The run so far (config and ``meta``, log, evaluations, samples), each file atomically: what
    a resume reads, and at the end all of the run but the model and summary."""
    out = Path(output_dir)
    write_jsonl(out / "log.jsonl", result.log_rows)
    write_jsonl(out / "eval.jsonl", result.eval_rows)
    for name, frame in (("samples_before.jsonl", result.samples_before),
                        ("samples_after.jsonl", result.samples_after)):
        if frame is not None:
            write_jsonl(out / name, frame.to_dict("records"))
    from .models import model_name

    model_id = model_name(result.model) if result.model is not None else result.metadata.get("model")
    write_json(out / "config.json", {"grpo": result.config.to_dict(), "model": model_id, **result.metadata, **meta},
               sort_keys=False)


def save_result(result: GRPOResult, output_dir: str | os.PathLike) -> Path:
    """Write a run as :func:`train_grpo` does (see there); returns the folder."""
    from transformers.utils import logging as hf_logging

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if result.model is not None:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in notebooks
        try:
            result.model.save_pretrained(out / FINAL)
            if result.tokenizer is not None:
                result.tokenizer.save_pretrained(out / FINAL)
            match_umask(out / FINAL)  # safetensors writes model.safetensors 0600
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    save_progress(result, out, peak_rss=result.peak_rss, cuda_peak=result.cuda_peak, state_bytes=result.state_bytes)
    write_json(out / "summary.json", result.summary(), sort_keys=False)
    return out


# what config.json holds besides a run's metadata
_RESULT_KEYS = ("grpo", "peak_rss", "cuda_peak", "state_bytes")


def load_result(output_dir: str | os.PathLike) -> GRPOResult:
    """Read a saved run back (no model: load ``DIR/final`` with ``from_pretrained`` or
    ``esnb.models.load_model(str(DIR / "final"))``)."""
    import pandas as pd

    out = Path(output_dir)
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out}: no config.json (not a GRPO run directory)")
    meta = json.loads((out / "config.json").read_text())
    result = GRPOResult(config=GRPORunConfig(**meta["grpo"]), output_dir=out,
                        peak_rss=int(meta.get("peak_rss") or 0), cuda_peak=meta.get("cuda_peak"),
                        state_bytes=dict(meta.get("state_bytes") or {}),
                        metadata={k: v for k, v in meta.items() if k not in _RESULT_KEYS})

    def rows(name: str) -> list[dict]:
        return read_jsonl(out / name, missing_ok=True)

    result.log_rows, result.eval_rows = rows("log.jsonl"), rows("eval.jsonl")
    for name in ("samples_before", "samples_after"):
        data = rows(f"{name}.jsonl")
        setattr(result, name, pd.DataFrame(data) if data else None)
    return result


# ---------------------------------------------------------------- command line


def build_parser() -> Any:
    """``python -m esnb.grpo``: the run's own flags (model, task, folders) as ``python -m
    esnb.finetune`` has them, and one flag per command-line field of :class:`GRPORunConfig`."""
    from ._env import OneLineParser
    from .cli import add_config_arguments, add_data_argument, add_run_arguments

    ap = OneLineParser(prog="python -m esnb.grpo", allow_abbrev=False,
                       description="GRPO (TRL) on a task: the RL baseline of the ES engine, with the same rewards, "
                                   "held-out evaluation and sample counting. Writes the step log, held-out "
                                   "evaluations, checkpoints and the final model to --output.")
    add_run_arguments(ap, "run")
    add_data_argument(ap)
    ap.add_argument("--test-size", type=positive_int, help="held-out items per evaluation (default: all)")
    ap.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                    help="precision the model is loaded in (default: fp32 on a CPU)")
    add_config_arguments(ap, GRPORunConfig)
    return ap


# command-line settings that say where and how to run, not what the run is
_CLI_RESUMABLE = _RESUMABLE | {"test_size", "device"}


def _cli_settings(ap: Any, args: Any) -> tuple[Path, dict, bool]:
    """(run folder, settings, resuming): the flags given, on top of a resumed run's own."""
    from .cli import flag_of, new_run_folder, parse_task_options

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "output", "overwrite")}
    if "task_option" in given:
        given["task_options"] = parse_task_options(ap, given.pop("task_option"))
    if args.resume:
        out = Path(args.resume)
        if args.output and Path(args.output) != out:
            ap.error("--output and --resume name different directories; give one of them")
        try:
            saved = load_result(out).metadata.get("cli")
        except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
            ap.error(f"--resume: {out} holds no GRPO run ({str(e).splitlines()[0][:200]})")
        if not isinstance(saved, dict):
            ap.error(f"--resume: {out} was not started from the command line (config.json has no 'cli' settings)")
        clash = sorted(k for k, v in given.items() if k not in _CLI_RESUMABLE and saved.get(k) != v)
        if clash:
            ap.error(f"--resume: {', '.join(flag_of(k, GRPORunConfig) for k in clash)} differ from the run in {out}")
        return out, {**saved, **given}, True
    out = new_run_folder(ap, args)
    given.setdefault("task_options", {})
    if given.get("data"):
        given["data"] = str(Path(given["data"]).resolve())
    return out, given, False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m esnb.grpo``: see ``--help``. Bad arguments end with one line (exit status 2)."""
    import sys

    from .cli import cli_task_and_items, config_settings
    from .models import ModelNotAvailable, load_model
    from .runlog import RunLocked

    ap = build_parser()
    args = ap.parse_args(argv)
    out, settings, resuming = _cli_settings(ap, args)
    try:
        config = GRPORunConfig(**config_settings(settings, GRPORunConfig))
    except ValueError as e:
        ap.error(str(e))
    task, train_items, test_items = cli_task_and_items(ap, settings, train_size=config.prompts_per_step)
    test_items = test_items[:settings["test_size"]] if settings.get("test_size") else test_items
    try:
        model, tokenizer = load_model(settings["model"], device=settings.get("device"), dtype=settings.get("dtype"))
    except (ModelNotAvailable, OSError, ValueError) as e:
        ap.error(f"--model: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    seen = {"eval": 0}

    def report(result: GRPOResult) -> None:
        if not config.progress and len(result.eval_rows) > seen["eval"]:
            e = result.eval_rows[-1]
            print(f"held-out after {e['iteration']} steps: accuracy {e['test_accuracy']:.3f}, "
                  f"reward {e['test_reward']:.4f} ({e['samples']} samples)", flush=True)
            seen["eval"] = len(result.eval_rows)

    try:
        result = train_grpo(model, tokenizer, task, train_items, test_items, config, output_dir=out, callback=report,
                            overwrite=bool(args.overwrite), resume=resuming,
                            metadata={"cli": settings})
    except (ValueError, FileExistsError, RunLocked) as e:  # refused settings or folder: one line, no traceback
        ap.exit(2, f"{ap.prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    except KeyboardInterrupt:
        ap.exit(130, f"{ap.prog}: interrupted; continue with --resume {out} (with --checkpoint-every K)\n")
    print(f"done: {config.steps} steps, held-out accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}, "
          f"{result.samples} samples, {result.seconds_per_iteration:.2f} s/step; run in {out}, final model in "
          f"{out / FINAL}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
