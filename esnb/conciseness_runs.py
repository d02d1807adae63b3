"""The runs of notebook 07: ES and GRPO on the conciseness task, with the held-out reward and the KL
to the base model at every evaluation, written as small files that the notebook reads back.

One run = one folder named by :func:`run_name` (``es-seed0``, ``grpo-beta0.2-seed1``) holding

* ``trajectory.json``: the settings, and one row per held-out evaluation (the start included):
  ``iteration``, ``samples``, ``reward`` and ``accuracy`` (as ``evaluate`` scored them), the
  ``answers`` (one per held-out prompt), and per prompt the KL to the base model on that answer
  (:func:`esnb.tasks.conciseness.kl_to_base`, stop decision included): ``kl_exact`` /
  ``kl_estimate`` (per-token means, exact over the vocabulary and ``r - log r - 1``) and
  ``kl_exact_sum`` / ``kl_estimate_sum`` (sums over the answer's positions: a sequence-level KL),
  plus ``kl_pooled``, ``tokens`` and ``stops``;
* ES: ``config.json`` + ``log.jsonl``, the seed log (:func:`esnb.finetune.rebuild` rebuilds the
  weights of any iteration from it, given the base model), and ``eval.jsonl``;
* GRPO: ``config.json`` and ``log.jsonl`` (one line per step: the sampled completions' reward,
  TRL's loss, KL and gradient norm, the RMS of the step's weight change, seconds). A GRPO run
  cannot be rebuilt, so its weights are summarized where notebook 09 needs them
  (``weight_change.json`` + ``weight_change_sample.npy``, :func:`esnb.analysis.summarize_change`).

No weights are written. From the shell, one run per call (each takes minutes on a CPU)::

    python -m esnb.conciseness_runs --out data/runs/07_conciseness es-seed0
    python -m esnb.conciseness_runs --out data/runs/07_conciseness grpo-beta0-seed0 --summarize-against es-seed0

The defaults of :class:`Settings` are notebook 07's parameters.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .files import read_jsonl

__all__ = ["Settings", "run_name", "parse_run_name", "train_run", "load_run", "main"]

TRAJECTORY = "trajectory.json"
CHANGE = "weight_change"


@dataclass
class Settings:
    """What every run of the experiment shares (notebook 07's parameters)."""

    model: str = "smollm2-135m"
    max_new_tokens: int = 16
    heldout: int = 32             # held-out prompts (esnb.tasks.conciseness: 8 or 32)
    es_population: int = 8
    es_sigma: float = 0.001
    es_alpha: float = 0.002
    es_iterations: int = 10       # 10 x 8 members x 2 prompts = 160 samples
    es_eval_every: int = 1
    grpo_generations: int = 4
    grpo_lr: float = 2e-5
    grpo_steps: int = 20          # 20 x 2 prompts x 4 completions = 160 samples
    grpo_eval_every: int = 1
    threads: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def run_name(method: str, seed: int, beta: float | None = None) -> str:
    """``es-seed0`` or ``grpo-beta0.05-seed1``."""
    if method.upper() == "ES":
        return f"es-seed{int(seed)}"
    return f"grpo-beta{float(beta):g}-seed{int(seed)}"


def parse_run_name(name: str) -> tuple[str, float | None, int]:
    """``(method, beta, seed)`` of a :func:`run_name`; ``ValueError`` for anything else."""
    m = re.fullmatch(r"es-seed(\d+)", name)
    if m:
        return "ES", None, int(m.group(1))
    m = re.fullmatch(r"grpo-beta([0-9.e+-]+)-seed(\d+)", name)
    if m:
        try:
            return "GRPO", float(m.group(1)), int(m.group(2))
        except ValueError:
            pass
    raise ValueError(f"name: expected es-seedK or grpo-beta<B>-seedK, got {name!r}")


def _g(x: float) -> float:
    """7 significant digits: the files stay small, and nothing read from them needs more."""
    return float(f"{float(x):.7g}")


def _task(settings: Settings):
    from .tasks import get_task

    return get_task("conciseness", max_new_tokens=settings.max_new_tokens, heldout=settings.heldout)


def evaluation_row(model: Any, base: Any, tokenizer: Any, task: Any, items: Sequence[dict], max_new_tokens: int,
                   samples: Any = None) -> dict:
    """One trajectory row's measurements of ``model``: its greedy held-out answers (``samples``:
    an ``evaluate`` frame already made, else evaluated here), their reward and accuracy, and the
    KL to ``base`` on them, per prompt. The notebook calls this to check a rebuilt run."""
    from .generation import evaluate
    from .tasks import conciseness as cc

    if samples is None:
        samples = evaluate(model, tokenizer, task, items, progress=False, max_new_tokens=max_new_tokens)["samples"]
    answers = [str(a) for a in samples["completion"]]
    kl = cc.kl_to_base(model, base, tokenizer, [task.prompt(x, tokenizer) for x in items], answers,
                       max_new_tokens=max_new_tokens)
    return {"reward": _g(np.mean(samples["reward"])), "accuracy": _g(np.mean(samples["correct"])), "answers": answers,
            "kl_exact": [_g(x) for x in kl["per_prompt_exact"]], "kl_estimate": [_g(x) for x in kl["per_prompt"]],
            "kl_exact_sum": [_g(x) for x in kl["per_prompt_sum_exact"]],
            "kl_estimate_sum": [_g(x) for x in kl["per_prompt_sum"]],
            "kl_pooled": _g(kl["kl_pooled"]), "tokens": int(kl["tokens"]), "stops": int(kl["stops"])}


def _trajectory_callback(store: list, model: Any, base: Any, tokenizer: Any, task: Any, items: list, max_new: int):
    def cb(result) -> None:
        if len(result.eval_rows) == len(store):
            return  # a training step, not an evaluation
        row = result.eval_rows[-1]
        measured = evaluation_row(model, base, tokenizer, task, items, max_new, samples=result.samples_after)
        store.append({"iteration": int(row["iteration"]), "samples": int(row["samples"]), **measured})
    return cb


def train_run(settings: Settings, name: str, out: str | os.PathLike, base: Any = None, tokenizer: Any = None,
              summarize_against: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Train the run ``name`` (:func:`run_name`) with ``settings`` and write its files to ``out/name``
    (replacing what is there). ``base``/``tokenizer``: the starting model, fp32 on the CPU (loaded
    when not given; never changed). ``summarize_against`` (GRPO only): an ES run folder of the
    same experiment; the GRPO run's weight change is then summarized for notebook 09
    (:func:`esnb.analysis.summarize_change`, with its projections on that ES run's noise)."""
    from .analysis import save_change_summary, summarize_change
    from .es import ESConfig
    from .finetune import FinetuneConfig, finetune
    from .grpo import GRPORunConfig, train_grpo
    from .models import load_model

    method, beta, seed = parse_run_name(name)
    if summarize_against is not None and method != "GRPO":
        raise ValueError("summarize_against: only a GRPO run's change is summarized (an ES run is rebuilt)")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    staging: Path | None = None
    try:
        task = _task(settings)
        train, test = task.train_items, task.test_items
        if base is None:
            base, tokenizer = load_model(settings.model, device="cpu", dtype="fp32")
        model, _ = load_model(settings.model, device="cpu", dtype="fp32")
        target = Path(out) / name
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=Path(out)))  # the run appears whole, or not at all
        traj: list[dict] = []
        cb = _trajectory_callback(traj, model, base, tokenizer, task, test, settings.max_new_tokens)
        t0 = time.perf_counter()
        if method == "ES":
            es = ESConfig(population_size=settings.es_population, sigma=settings.es_sigma, alpha=settings.es_alpha, seed=seed)
            cfg = FinetuneConfig(es=es, iterations=settings.es_iterations, train_size=len(train),
                                 eval_every=settings.es_eval_every, checkpoint_every=0,
                                 max_new_tokens=settings.max_new_tokens, save_final=False, save_initial=False)
            with tempfile.TemporaryDirectory(prefix="esnb07-") as tmp:  # the checkpoint holds the weights: not kept
                res = finetune(model, tokenizer, task, train, test, cfg, output_dir=tmp, overwrite=True,
                               progress=progress, callback=cb)
                for f in ("config.json", "log.jsonl", "eval.jsonl"):
                    shutil.copy(Path(tmp) / f, staging / f)
        else:
            cfg = GRPORunConfig(steps=settings.grpo_steps, num_generations=settings.grpo_generations,
                                prompts_per_step=len(train), learning_rate=settings.grpo_lr, beta=beta,
                                max_new_tokens=settings.max_new_tokens, eval_every=settings.grpo_eval_every,
                                seed=seed, progress=progress, track_updates=True)
            res = train_grpo(model, tokenizer, task, train, test, cfg, callback=cb)
            from .models import model_name

            meta = {"grpo": cfg.to_dict(), "model": model_name(model),  # relative to the repository: no machine paths
                    "state_bytes": res.state_bytes}
            (staging / "config.json").write_text(json.dumps(meta, indent=1, default=float) + "\n")
            (staging / "log.jsonl").write_text("".join(json.dumps(r, default=float) + "\n" for r in res.log_rows))
            if summarize_against is not None:
                from .es import ES
                from .runlog import read_log

                ref = Path(summarize_against)
                es_cfg = FinetuneConfig.from_dict(json.loads((ref / "config.json").read_text())["finetune"])
                entries = read_log(ref / "log.jsonl")
                summary = summarize_change(base, model, noise=(ES(base, es_cfg.es), entries))
                summary["es_run"] = ref.name
                summary["es_log_sha256"] = _sha256(ref / "log.jsonl")
                summary["steps"] = len(res.log_rows)
                save_change_summary(summary, staging, CHANGE)
        record = {"name": name, "method": method, "beta": beta, "seed": seed, "settings": asdict(settings),
                  "task": repr(task), "seconds_per_iteration": res.seconds_per_iteration,
                  "training_seconds": time.perf_counter() - t0, "rows": traj}
        (staging / TRAJECTORY).write_text(json.dumps(record, separators=(",", ":")) + "\n")
        if target.exists():
            shutil.rmtree(target)
        from .files import match_umask

        staging.rename(target)
        match_umask(target)  # mkdtemp made it private
        staging = None
        return target
    finally:
        torch.set_num_threads(threads)
        if staging is not None and staging.exists():  # a run that failed leaves nothing behind
            shutil.rmtree(staging, ignore_errors=True)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_run(folder: str | os.PathLike) -> dict:
    """A run folder read back: ``name``, ``method``, ``beta``, ``seed``, ``settings`` (a dict),
    ``traj`` (a DataFrame, one row per evaluation, the per-prompt columns as lists), ``log`` (the
    ES seed log's or GRPO's step log as a DataFrame) and ``seconds_per_iteration`` (as measured
    when the run was made)."""
    import pandas as pd

    folder = Path(folder)
    rec = json.loads((folder / TRAJECTORY).read_text())
    log = read_jsonl(folder / "log.jsonl", missing_ok=True)
    keep = ("iteration", "reward_mean", "reward_std", "accuracy", "update_norm", "update_rms", "loss", "kl",
            "grad_norm", "mean_length", "iter_seconds", "seconds", "samples")
    return {**{k: rec[k] for k in ("name", "method", "beta", "seed", "settings", "task", "seconds_per_iteration")},
            "training_seconds": rec.get("training_seconds"),
            "traj": pd.DataFrame(rec["rows"]), "log": pd.DataFrame([{k: r[k] for k in keep if k in r} for r in log]),
            "folder": folder}


def main(argv: Sequence[str] | None = None) -> int:
    from ._env import OneLineParser

    ap = OneLineParser(prog="python -m esnb.conciseness_runs",
                       description="Train runs of notebook 07 (conciseness) and write their small files.")
    ap.add_argument("names", nargs="+", help="run names: es-seedK, grpo-beta<B>-seedK")
    ap.add_argument("--out", default="data/runs/07_conciseness", help="folder of the runs (default %(default)s)")
    ap.add_argument("--summarize-against", metavar="ES_RUN",
                    help="GRPO: also summarize the weight change, with projections on this ES run's noise "
                         "(a run name under --out, e.g. es-seed0)")
    for f in fields(Settings):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    for name in args.names:
        try:
            parse_run_name(name)
        except ValueError as e:
            ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .models import load_model

    base, tok = load_model(settings.model, device="cpu", dtype="fp32")
    for name in args.names:
        t = time.perf_counter()
        ref = out / args.summarize_against if args.summarize_against else None
        folder = train_run(settings, name, out, base=base, tokenizer=tok, summarize_against=ref)
        print(f"{name}: written to {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
