"""Pieces for the experiments the paper's reviewers asked for (notebook 11).

* :func:`mezo_finetune_config`: zeroth-order SGD (MeZO / SPSA) as a :class:`~esnb.finetune.FinetuneConfig`
  (one antithetic pair, raw fitness, ``alpha = lr / sigma``; see :func:`esnb.zeroth_order.mezo_config`);
* :func:`iterations_for_budget`: how many iterations a run of ``N`` members x ``B`` prompts gets
  out of a fixed number of scored completions;
* :class:`FreshPuzzles`: a ``population_evaluator`` for :func:`esnb.finetune.finetune` that scores
  iteration ``t`` on its own, never reused, puzzles;
* :func:`outcomes`: held-out accuracy, accuracy ignoring format and the per-item outcomes a paired
  test needs;
* :func:`weight_drift`: how far the weights moved and the share that never changed;
* :func:`fresh_run`: ``finetune`` on fresh puzzles, recording the format breakdown at every
  held-out evaluation (``format.jsonl`` beside the seed log);
* :func:`pair_differences` and :func:`pair_snr`: the reward difference of a mirrored member pair
  against its spread over prompts, i.e. the signal to noise of one ES pair as a function of the
  prompts per member.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .es import ES, ESConfig
from .zeroth_order import mezo_config

__all__ = ["mezo_finetune_config", "iterations_for_budget", "fresh_puzzles", "FreshPuzzles", "outcomes",
           "weight_drift", "pair_differences", "pair_snr", "fresh_run"]


def mezo_finetune_config(lr: float, sigma: float, pairs: int = 1, **kwargs: Any):
    """A :class:`esnb.finetune.FinetuneConfig` that runs MeZO: ``pairs`` antithetic pairs, raw
    fitness, ``alpha = lr / sigma`` (:func:`esnb.zeroth_order.mezo_config`); ``kwargs``: the other fields
    (``iterations``, ``batch_size``, ``seed``, ...)."""
    from .finetune import FinetuneConfig

    es_fields = {f.name for f in fields(ESConfig)}
    es = mezo_config(lr, sigma, pairs, **{k: v for k, v in kwargs.items() if k in es_fields})
    return FinetuneConfig(es=es, **{k: v for k, v in kwargs.items() if k not in es_fields})


def iterations_for_budget(budget: int, population_size: int, batch_size: int) -> int:
    """Iterations of ``population_size`` members x ``batch_size`` prompts that fit in ``budget``
    scored completions (rounded down); at least one must fit."""
    for name, v in (("budget", budget), ("population_size", population_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    per = int(population_size) * int(batch_size)
    if per > budget:
        raise ValueError(f"budget: {budget} completions do not pay for one iteration of {population_size} x {batch_size}")
    return int(budget) // per


def fresh_puzzles(n: int, seed: int, exclude: Sequence[dict] = ()) -> list[dict]:
    """``n`` new Countdown puzzles, none sharing (numbers, target) with ``exclude`` (e.g. the test set)."""
    from .tasks import countdown as cd

    return cd.generate_puzzles(n, seed=seed, exclude={cd.puzzle_key(p) for p in exclude}, prefix="fresh")


class FreshPuzzles:
    """Score iteration ``t`` of :func:`esnb.finetune.finetune` on ``puzzles[t*B:(t+1)*B]``.

    Pass an instance as ``population_evaluator`` with ``FinetuneConfig(batch_size=B)``: every member
    of iteration ``t`` sees the same ``B`` puzzles, and no puzzle is seen in two iterations (the
    training batch ``finetune`` drew is ignored; its size still counts the samples). The seed log
    is an ordinary one: :func:`esnb.finetune.rebuild` replays it.
    """

    def __init__(self, puzzles: Sequence[dict], batch_size: int, population_batch: bool | str = "auto"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.puzzles, self.batch_size, self.population_batch = list(puzzles), batch_size, population_batch

    def batch(self, iteration: int) -> list[dict]:
        """The puzzles of ``iteration``."""
        lo = iteration * self.batch_size
        chunk = self.puzzles[lo:lo + self.batch_size]
        if len(chunk) < self.batch_size:
            raise ValueError(f"puzzles: {len(self.puzzles)} fresh puzzles run out at iteration {iteration} "
                             f"({self.batch_size} per iteration)")
        return chunk

    def __call__(self, es: ES, members, model, tokenizer, task, prompts, items, max_new_tokens: int,
                 batch_size: int = 256):
        from .finetune import score_members

        chunk = self.batch(es.iteration)
        if len(chunk) != len(prompts):
            raise ValueError(f"FinetuneConfig.batch_size ({len(prompts)}) must equal FreshPuzzles' ({len(chunk)})")
        fresh = [task.prompt(x, tokenizer) for x in chunk]
        return score_members(es, members, model, tokenizer, task, fresh, chunk, max_new_tokens, batch_size,
                             population_batch=self.population_batch)


def outcomes(model, tokenizer, task, items: Sequence[dict], batch_size: int = 256) -> dict:
    """Greedy held-out evaluation with the per-item outcomes a paired test needs.

    Returns ``accuracy``, ``accuracy ignoring format`` (:func:`esnb.tasks.countdown.answer_ignoring_format`),
    ``answers in tags``, ``reward`` (means) and the 0/1 arrays ``correct`` and ``correct ignoring format``
    (one entry per item, in order), plus the ``samples`` frame.
    """
    from .generation import evaluate
    from .tasks import countdown as cd

    items = list(items)
    ev = evaluate(model, tokenizer, task, items, batch_size=batch_size, progress=False)
    s = ev["samples"]
    texts = [c if isinstance(c, str) else "" for c in s["completion"]]
    correct = s["correct"].astype(bool).to_numpy()
    ignoring = np.array([cd.answer_ignoring_format(c, x["numbers"], x["target"]) > 0 for c, x in zip(texts, items)])
    # the shares come from format_breakdown, so "answers in tags" means one thing everywhere
    # (a closed <answer>...</answer> block), here and in fresh_run's format rows
    return {**cd.format_breakdown(texts, items), "reward": float(ev["mean_reward"]),
            "correct": correct, "correct ignoring format": ignoring, "samples": s}


@torch.no_grad()
def weight_drift(before: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """How far ``model``'s tensors moved from ``before`` (name -> tensor, e.g. a ``state_dict`` clone).

    ``relative_drift``: ||after - before|| / ||before|| over all tensors (in float64);
    ``unchanged_share``: the share of entries exactly equal, compared in the model's own dtype
    (a bf16 weight whose updates all rounded away counts as unchanged).
    """
    diff2 = base2 = 0.0
    same = total = 0
    for name, p in model.named_parameters():
        b = before[name].to(p.device)
        same += int((p == b.to(p.dtype)).sum())
        total += p.numel()
        d = p.double() - b.double()
        diff2 += float((d * d).sum())
        base2 += float((b.double() ** 2).sum())
    return {"relative_drift": (diff2 / base2) ** 0.5 if base2 else float("nan"), "unchanged_share": same / total}


@torch.no_grad()
def pair_differences(model, tokenizer, task, items: Sequence[dict], sigma: float, pairs: int, seed: int = 0,
                     max_new_tokens: int | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-item reward differences ``r(theta + sigma eps_k) - r(theta - sigma eps_k)`` of ``pairs``
    random mirrored pairs (the members of one antithetic ES iteration with that seed), on every item.

    Returns arrays of shape ``(pairs, items)``: ``reward`` (the task's reward), ``format``
    (``0.1 * format_reward``) and ``answer`` (``answer_reward``), whose sum is ``reward`` for
    Countdown. ``model`` is restored exactly afterwards.
    """
    from .generation import generate

    items = list(items)
    es = ES(model, ESConfig(population_size=2 * pairs, antithetic=True, sigma=sigma, seed=seed))
    prompts = [task.prompt(x, tokenizer) for x in items]
    parts = {"reward": [], "format": [], "answer": []}
    for member in es.ask():
        with es.perturbed(member):
            completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens or task.max_new_tokens,
                                   stop_strings=task.stop_strings, batch_size=batch_size)
        scores = [task.score(c, x) for c, x in zip(completions, items)]
        parts["reward"].append([float(s["reward"]) for s in scores])
        parts["format"].append([0.1 * float(s.get("format_reward", 0.0)) for s in scores])
        parts["answer"].append([float(s.get("answer_reward", 0.0)) for s in scores])
    out = {}
    for k, rows in parts.items():
        r = np.asarray(rows)            # members in ES order: +eps_0, -eps_0, +eps_1, ...
        out[k] = r[0::2] - r[1::2]
    return out


def pair_snr(diffs: np.ndarray, batch_sizes: Sequence[int] = (1, 4, 16, 64, 256)) -> dict:
    """Signal to noise of one mirrored pair's reward difference, from per-item differences
    ``diffs`` of shape ``(pairs, items)`` (:func:`pair_differences`).

    For a random direction ``eps`` the pair's true difference (over the whole puzzle distribution)
    is a number ``D(eps)``; the ES update needs its sign and size. On a batch of ``B`` prompts the
    pair sees ``D(eps)`` plus batch noise of variance ``s^2 / B`` (``s^2``: the item-to-item variance of
    the differences). ``signal_var`` estimates ``Var_eps D`` (the variance across directions of the
    per-direction means, less the part the finite item sample explains; floored at 0);
    ``noise_var_per_item`` is the mean ``s^2``. ``snr[B] = sqrt(B * signal_var / noise_var_per_item)``;
    ``prompts_for_snr_1`` is ``noise_var_per_item / signal_var`` (inf when no signal is detected).
    Also ``zero_share``: the share of item differences that are exactly 0 (the perturbation did not
    change that completion's reward).
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"diffs: expected shape (pairs >= 2, items >= 2), got {d.shape}")
    m = d.shape[1]
    means = d.mean(axis=1)
    noise = float(d.var(axis=1, ddof=1).mean())
    signal = max(float(means.var(ddof=1)) - noise / m, 0.0)
    def ratio(b: int) -> float:
        if noise > 0:
            return float(np.sqrt(b * signal / noise))
        return float("inf") if signal > 0 else 0.0

    snr = {int(b): ratio(b) for b in batch_sizes}
    need = noise / signal if signal > 0 else float("inf")
    return {"signal_var": signal, "noise_var_per_item": noise, "snr": snr, "prompts_for_snr_1": need,
            "zero_share": float((d == 0).mean()), "mean_abs_pair_mean": float(np.abs(means).mean())}


def fresh_run(model, tokenizer, task, config, puzzles: Sequence[dict], test_items: Sequence[dict],
              output_dir=None, progress: bool = False, **kwargs: Any):
    """:func:`esnb.finetune.finetune` on fresh puzzles (:class:`FreshPuzzles`: iteration ``t`` sees
    ``puzzles[t*B:(t+1)*B]``, ``B = config.batch_size``), recording at every held-out evaluation the
    :func:`esnb.tasks.countdown.format_breakdown` of its completions: ``result.format_rows`` and, with
    ``output_dir``, ``format.jsonl`` there (so a shipped seed log carries the format-vs-skill curve).
    ``kwargs`` go to ``finetune`` (``overwrite``, ``resume``, ...)."""
    import dataclasses
    from pathlib import Path

    from .finetune import finetune
    from .tasks import countdown as cd

    if config.batch_size is None:
        raise ValueError("config.batch_size: fresh puzzles need a batch size (puzzles per iteration)")
    puzzles = list(puzzles)
    config = dataclasses.replace(config, train_size=len(puzzles))
    tests = list(test_items)[:config.test_size] if config.test_size else list(test_items)
    rows: list[dict] = []

    def on_update(result) -> None:
        if len(result.eval_rows) > len(rows):
            e = result.eval_rows[-1]
            rows.append({"iteration": e["iteration"], "samples": e["samples"],
                         **cd.format_breakdown(result.samples_after["completion"], tests)})

    result = finetune(model, tokenizer, task, puzzles, tests, config, output_dir=output_dir, callback=on_update,
                      progress=progress, population_evaluator=FreshPuzzles(puzzles, config.batch_size,
                                                                           config.population_batch), **kwargs)
    result.format_rows = rows
    if output_dir is not None:
        from .files import write_jsonl

        write_jsonl(Path(output_dir, "format.jsonl"), rows)
    return result
