"""ES against GRPO at an equal sample budget, run by run (notebook 06).

A :class:`Comparison` fixes what both methods share: the starting model, the task, the training
puzzles and the budget (ES: iterations x members x prompts; GRPO: steps x prompts x completions).
It trains runs into a folder and reads them back, keeping what each method needs to be checked:

* an ES run as its **seed log** (config.json, log.jsonl, eval.jsonl): a few kB from which
  ``esnb.finetune.rebuild`` replays the weights exactly;
* a GRPO run, whose sampled completions no seed log can replay, as its step log and evaluations;
* for both, one line per held-out evaluation in ``outcomes.jsonl``: a digit per puzzle
  (:func:`outcome_codes`) and a hash of the completions, so tests can be paired puzzle by puzzle
  and a rebuilt run can be checked against the shipped one.

A run plan is ``{name: (method, settings)}`` with method ``"ES"`` or ``"GRPO"``; the settings are
the keyword arguments of :meth:`Comparison.ship_es` / :meth:`Comparison.ship_grpo`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .files import read_jsonl, write_jsonl
from .tasks import countdown as cd

CODE_BITS = {"accuracy": 1, "answers in tags": 2, "accuracy ignoring format": 4}

__all__ = ["CODE_BITS", "Comparison", "Outcomes", "completions_hash", "decode", "final_outcomes",
           "outcome_codes", "pick", "plan_testing", "plan_tuning", "tuning_grids", "tuning_table"]


def outcome_codes(completions: Sequence[Any], items: Sequence[dict]) -> str:
    """One digit per puzzle, the sum of 1 (right, in tags: the reward's accuracy), 2 (an answer in
    tags) and 4 (right if an untagged ``Answer: ...`` line counted too): the bits of
    ``esnb.tasks.countdown.format_outcomes`` by :data:`CODE_BITS`."""
    outcomes = cd.format_outcomes(completions, items)
    return "".join(str(sum(bit * outcomes[name][i] for name, bit in CODE_BITS.items())) for i in range(len(items)))


def decode(codes: str) -> dict[str, np.ndarray]:
    """The three 0/1 outcome arrays of a code string, by the names of :data:`CODE_BITS`."""
    v = np.frombuffer(codes.encode(), dtype=np.uint8) - ord("0")
    return {name: (v & bit) > 0 for name, bit in CODE_BITS.items()}


def completions_hash(completions: Sequence[Any]) -> str:
    """A fingerprint of an evaluation's completions: equal hashes, equal texts."""
    texts = [c if isinstance(c, str) else "" for c in completions]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


class Outcomes:
    """A training callback that keeps each held-out evaluation's per-puzzle outcomes."""

    def __init__(self, items: Sequence[dict], split: str):
        self.items, self.split, self.rows = list(items), split, []

    def __call__(self, result: Any) -> None:
        if len(result.eval_rows) > len(self.rows):   # a new evaluation (the callback also runs after each step)
            e, done = result.eval_rows[-1], result.samples_after["completion"]
            self.rows.append({"iteration": int(e["iteration"]), "samples": int(e["samples"]), "split": self.split,
                              "codes": outcome_codes(done, self.items), "sha256": completions_hash(done)})


def final_outcomes(results: dict) -> dict[str, np.ndarray]:
    """metric -> (runs, puzzles) 0/1 outcomes of each run's last evaluation."""
    per = [decode(r.outcomes[-1]["codes"]) for r in results.values()]
    return {m: np.array([p[m] for p in per]) for m in CODE_BITS}


def pick(grid: Any) -> Any:
    """The index of a tuning grid's best row (a DataFrame with "accuracy" and "mean reward"
    columns): highest accuracy; ties: higher mean reward, then the smaller setting. Scores are
    rounded first: two runs with the same answers can differ in the last bits of a mean reward
    summed in another order, and that must not decide."""
    ranked = grid.assign(acc_r=grid["accuracy"].round(9), reward_r=grid["mean reward"].round(9)).sort_index()
    return ranked.sort_values(["acc_r", "reward_r"], ascending=False, kind="stable").index[0]


@dataclass
class Comparison:
    """The settings both methods share in one equal-samples comparison, and its run folder.

    ``model_name``: a name :func:`esnb.models.load_model` knows (every run starts from it, loaded
    anew). ``runs_dir``: one sub-folder per run. ``save_runs``: where GRPO test runs also keep
    their final weights (notebook 09 loads them); None: nowhere.
    """

    model_name: str
    runs_dir: Path
    task: Any
    train: Sequence[dict]
    es_population: int = 32
    es_antithetic: bool = True
    es_batch: int = 16
    es_iterations: int = 8
    grpo_generations: int = 8
    grpo_prompts: int = 16
    grpo_steps: int = 32
    grpo_beta: float = 0.0
    save_runs: Path | None = None

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir)
        es = self.es_iterations * self.es_population * self.es_batch
        grpo = self.grpo_steps * self.grpo_prompts * self.grpo_generations
        if es != grpo:
            raise ValueError(f"unequal budgets: ES {self.es_iterations} x {self.es_population} x {self.es_batch} "
                             f"= {es} samples, GRPO {self.grpo_steps} x {self.grpo_prompts} x "
                             f"{self.grpo_generations} = {grpo}")

    def fresh(self) -> tuple[Any, Any]:
        """The starting model, loaded anew."""
        from .models import load_model

        return load_model(self.model_name, device="cpu")

    def es_config(self, sigma: float, alpha: float, run_seed: int, eval_every: int) -> Any:
        from .finetune import FinetuneConfig

        return FinetuneConfig.of(population_size=self.es_population, antithetic=self.es_antithetic, sigma=sigma,
                                 alpha=alpha, batch_size=self.es_batch, iterations=self.es_iterations,
                                 train_size=len(self.train), eval_every=eval_every, checkpoint_every=0,
                                 seed=run_seed, save_final=False)

    def grpo_config(self, lr: float, run_seed: int, eval_every: int, steps: int | None = None) -> Any:
        from .grpo import GRPORunConfig

        return GRPORunConfig(steps=steps or self.grpo_steps, num_generations=self.grpo_generations,
                             prompts_per_step=self.grpo_prompts, learning_rate=lr, beta=self.grpo_beta,
                             eval_every=eval_every, seed=run_seed, track_updates=True, progress=False)

    def ship_es(self, name: str, sigma: float, alpha: float, run_seed: int, items: Sequence[dict], split: str,
                eval_every: int) -> None:
        """Train one ES run; keep its config, seed log, evaluations and per-puzzle outcomes (no weights)."""
        from .finetune import finetune

        model, tok = self.fresh()
        rec = Outcomes(items, split)
        out = self.runs_dir / name
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            finetune(model, tok, self.task, self.train, items, self.es_config(sigma, alpha, run_seed, eval_every),
                     output_dir=tmp, overwrite=True, progress=False, callback=rec,
                     metadata={"model_name": self.model_name, "split": split})
            for f in ("config.json", "log.jsonl", "eval.jsonl"):
                shutil.copy(Path(tmp) / f, out / f)
        write_jsonl(out / "outcomes.jsonl", rec.rows)

    def ship_grpo(self, name: str, lr: float, run_seed: int, items: Sequence[dict], split: str,
                  eval_every: int) -> None:
        """Train one GRPO run; keep its config, step log, evaluations and per-puzzle outcomes."""
        import torch

        from .finetune import save_final
        from .grpo import train_grpo

        model, tok = self.fresh()
        rec = Outcomes(items, split)
        r = train_grpo(model, tok, self.task, self.train, items, self.grpo_config(lr, run_seed, eval_every),
                       callback=rec)
        out = self.runs_dir / name
        out.mkdir(parents=True, exist_ok=True)
        meta = {"grpo": r.config.to_dict(), "model_name": self.model_name, "split": split,
                "threads": torch.get_num_threads(), "peak_rss": r.peak_rss, "cuda_peak": r.cuda_peak,
                "state_bytes": r.state_bytes}
        (out / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
        write_jsonl(out / "log.jsonl", r.log_rows)
        write_jsonl(out / "eval.jsonl", r.eval_rows)
        write_jsonl(out / "outcomes.jsonl", rec.rows)
        if self.save_runs and split == "test":
            save_final(model, tok, Path(self.save_runs) / name / "final")

    def make_runs(self, plan: dict, verbose: bool = True) -> None:
        """Train and write every run of a plan ``{name: (method, settings)}``."""
        for name, (method, kw) in plan.items():
            t0 = time.perf_counter()
            (self.ship_es if method == "ES" else self.ship_grpo)(name, **kw)
            if verbose:
                print(f"trained {name} ({time.perf_counter() - t0:.0f} s)")

    def load_run(self, name: str, method: str, kw: dict) -> Any:
        """A shipped run: the engine's result object (logs, evaluations) with ``outcomes`` (its
        outcomes.jsonl rows) and ``run_dir`` added. Refuses a run made with other settings."""
        from .finetune import FinetuneConfig
        from .finetune import load_result as load_es_result
        from .grpo import load_result as load_grpo_result

        d = self.runs_dir / name
        if not (d / "outcomes.jsonl").is_file():
            raise FileNotFoundError(f"{d.name} is missing from {self.runs_dir.name}/: retrain it (regenerate = True)")
        meta = json.loads((d / "config.json").read_text())
        if method == "ES":
            r = load_es_result(d)
            # flat settings, so a refusal names the field (alpha, not es); fields added since: default as they were
            want = self.es_config(kw["sigma"], kw["alpha"], kw["run_seed"], kw["eval_every"]).flat()
            got = FinetuneConfig.from_dict(meta["finetune"]).flat()
        else:
            r = load_grpo_result(d)
            want = self.grpo_config(kw["lr"], kw["run_seed"], kw["eval_every"]).to_dict()
            got = r.config.to_dict()
        diff = sorted(k for k in want if got.get(k) != want[k])
        if diff or meta.get("model_name") != self.model_name or meta.get("split") != kw["split"]:
            raise ValueError(f"{self.runs_dir.name}/{name} was made with other settings "
                             f"({', '.join(diff) or 'model or split'}); regenerate = True retrains it")
        r.outcomes = read_jsonl(d / "outcomes.jsonl")
        r.run_dir = d
        return r

    def load_plan(self, plan: dict) -> dict:
        """``{name: run}`` for every run of a plan (see :meth:`load_run`)."""
        return {name: self.load_run(name, method, kw) for name, (method, kw) in plan.items()}


def tuning_table(runs: dict, plan: dict) -> Any:
    """One row per tuning run (a DataFrame): method, its settings, seed, and the final
    validation evaluation's accuracy, answers in tags, accuracy ignoring format and mean reward."""
    import pandas as pd

    rows = []
    for name, (method, kw) in plan.items():
        r = runs[name]
        final = decode(r.outcomes[-1]["codes"])
        rows.append({"method": method, "sigma": kw.get("sigma", np.nan), "alpha": kw.get("alpha", np.nan),
                     "lr": kw.get("lr", np.nan), "seed": kw["run_seed"], **{k: float(v.mean()) for k, v in final.items()},
                     "mean reward": float(r.eval_rows[-1]["test_reward"])})
    return pd.DataFrame(rows)


GRID_METRICS = ["accuracy", "accuracy ignoring format", "answers in tags", "mean reward"]


def tuning_grids(table: Any) -> tuple[Any, Any]:
    """``(es_grid, grpo_grid)``: the mean over seeds of each setting's scores, indexed by
    (sigma, alpha) and by learning rate; :func:`pick` chooses from each."""
    es = table[table.method == "ES"].groupby(["sigma", "alpha"])[GRID_METRICS].mean()
    grpo = table[table.method == "GRPO"].groupby("lr")[GRID_METRICS].mean()
    return es, grpo


def plan_tuning(sigmas: Sequence[float], alphas: Sequence[float], lrs: Sequence[float], seeds: Sequence[int],
                val: Sequence[dict]) -> dict:
    """Every (sigma, alpha) of ES and every learning rate of GRPO, once per seed, scored on ``val``
    at the end only. Names as notebook 06 ships them."""
    plan = {}
    for t in seeds:
        for s in sigmas:
            for a in alphas:
                plan[f"tune-es-sigma{s:g}-alpha{a:g}-seed{t}"] = (
                    "ES", dict(sigma=s, alpha=a, run_seed=t, items=val, split="val", eval_every=0))
        for lr in lrs:
            plan[f"tune-grpo-lr{lr:g}-seed{t}"] = ("GRPO", dict(lr=lr, run_seed=t, items=val, split="val", eval_every=0))
    return plan


def plan_testing(sigma: float, alpha: float, lr: float, seeds: Sequence[int], test: Sequence[dict],
              es_every: int, grpo_every: int) -> dict:
    """One ES and one GRPO run per seed at the chosen settings, evaluated on ``test`` every
    ``es_every`` iterations / ``grpo_every`` steps."""
    plan = {f"es-seed{s}": ("ES", dict(sigma=sigma, alpha=alpha, run_seed=s, items=test, split="test",
                                       eval_every=es_every)) for s in seeds}
    plan.update({f"grpo-seed{s}": ("GRPO", dict(lr=lr, run_seed=s, items=test, split="test", eval_every=grpo_every))
                 for s in seeds})
    return plan
