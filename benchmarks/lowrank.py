"""Low-rank (EGGROLL) ES vs full-rank ES vs plain inference: one population evaluation.

    python benchmarks/lowrank.py --model tiny                 # N=16, 32 prompts, ranks 1 and 4
    python benchmarks/lowrank.py --model tiny --population 32 --ranks 1 2 4

Times, side by side in one process (alternating, several repetitions, median):

* full-rank ES: ``esnb.finetune.score_members`` (N perturbed forwards, one member at a time);
* low-rank ES: ``esnb.lowrank.score_population`` (all N members in one batched forward);
* N x inference: N greedy generations of the prompts with the unperturbed model;
* batched inference: one greedy generation of all N x prompts rows with the unperturbed model
  (the throughput EGGROLL measures itself against).

Ends with a ``RATIO`` line: low-rank speed-up over full rank and its share of batched-inference
throughput.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from esnb.es import ES, ESConfig
from esnb.finetune import score_members
from esnb.generation import generate
from esnb.lowrank import LowRankES, score_population
from esnb.models import load_model
from esnb.tasks import get_task
from esnb.tasks.countdown import load_split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sigma", type=float, default=0.003)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype=args.dtype)
    key = args.model.strip().lower()
    task = get_task("countdown", prompt_style="compact" if key == "tiny" else "plain", max_new_tokens=args.max_new_tokens)
    items = load_split()[0][:args.prompts]
    prompts = [task.prompt(it, tok) for it in items]
    n, mx = args.population, args.max_new_tokens
    cfg = ESConfig(population_size=n, sigma=args.sigma)
    full = ES(model, cfg)
    low = {r: LowRankES(model, cfg, rank=r) for r in args.ranks}
    ways = {"full-rank ES": lambda: score_members(full, full.ask(), model, tok, task, prompts, items, mx,
                                                   batch_size=len(prompts)),
            **{f"low-rank ES, r={r}": (lambda r=r: score_population(low[r], low[r].ask(), model, tok, task,
                                                                      prompts, items, mx)) for r in args.ranks},
            "N x inference": lambda: [generate(model, tok, prompts, mx, task.stop_strings, batch_size=len(prompts))
                                      for _ in range(n)],
            "batched inference": lambda: generate(model, tok, prompts * n, mx, task.stop_strings,
                                                  batch_size=len(prompts) * n)}
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.dtype}), "
          f"N={n}, {len(prompts)} prompts, max {mx} new tokens, {args.threads} thread(s), {args.repeats} repetitions")
    times = {k: [] for k in ways}
    for k, fn in ways.items():  # warm-up
        fn()
    for rep in range(args.repeats):
        for k, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<22} {v:7.3f} s per population evaluation, {n * len(prompts) / v:7.1f} completions/s, "
              f"{med['full-rank ES'] / v:5.2f}x vs full rank")
    best = min(args.ranks, key=lambda r: med[f"low-rank ES, r={r}"])
    lr = med[f"low-rank ES, r={best}"]
    print(f"RATIO low-rank (r={best}) speed-up over full rank {med['full-rank ES'] / lr:.2f}x, "
          f"{100 * med['batched inference'] / lr:.0f}% of batched-inference throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
