"""One ES iteration: our engine vs a straightforward paper-style loop, side by side.

    python benchmarks/es_iteration.py --model tiny
    python benchmarks/es_iteration.py --model smollm2-135m          # bf16, N=4, 8 prompts, 32 tokens

Both sides use the same model, population size N, prompts, token cap and greedy decoding, and
run alternately in this one process (several repetitions, median), so machine load hits both.

* **reference** (what the paper's public code does, written plainly here): per member, for every
  parameter tensor seed a generator, draw the noise in the model's dtype and add it in place;
  ``model.generate`` (Hugging Face, greedy, stops when every sequence has emitted EOS);
  regenerate the noise and subtract it; update: for every tensor, regenerate every member's noise
  and add ``alpha/N * z_n * eps_n``.
* **engine**: ``esnb.finetune.score_members`` + ``ES.tell``: perturb from the float32 master,
  esnb's greedy decoder (lean Llama path, stop at the first ``</answer>``/EOS), restore by copy,
  update from regenerated noise.

Prints seconds per iteration for both, the speed-up, and the share of the engine's iteration spent
outside generation (perturb, restore, scoring, update), then a final ``RATIO`` line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import esnb.finetune as ft
from esnb.es import ES, ESConfig, zscore
from esnb.models import load_model
from esnb.noise import stream_seed
from esnb.tasks import get_task
from esnb.tasks.countdown import load_split

DEFAULTS = {  # model -> (N, prompts, max new tokens, dtype, repetitions)
    "tiny": (16, 32, 64, "fp32", 5),
    "smollm2-135m": (4, 8, 32, "bf16", 3),
}


def _truncate(text: str, stops) -> str:
    for s in stops:
        k = text.find(s)
        if k >= 0:
            text = text[:k + len(s)]
    return text


@torch.no_grad()
def reference_iteration(model, tok, task, prompts, items, seeds, sigma, alpha, max_new):
    """The paper-style loop (no master copy, restore by subtraction, Hugging Face generate)."""
    params = list(model.parameters())
    rewards = []
    for s in seeds:
        for i, p in enumerate(params):
            gen = torch.Generator(device=p.device).manual_seed(stream_seed(s, i))
            p.add_(sigma * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
        enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = [task.score(_truncate(t, task.stop_strings), it) for t, it in zip(texts, items)]
        rewards.append(float(np.mean([float(x["reward"]) for x in scores])))
        for i, p in enumerate(params):
            gen = torch.Generator(device=p.device).manual_seed(stream_seed(s, i))
            p.sub_(sigma * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
    z = zscore(torch.tensor(rewards)).tolist()
    n = len(seeds)
    for i, p in enumerate(params):
        for s, zn in zip(seeds, z):
            gen = torch.Generator(device=p.device).manual_seed(stream_seed(s, i))
            p.add_((alpha / n * zn) * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
    return rewards


class _GenTimer:
    """Wraps esnb.finetune.generate to count the seconds spent generating."""

    def __init__(self):
        self.seconds = 0.0
        self.inner = ft.generate

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.inner(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0


def engine_iteration(es, model, tok, task, prompts, items, max_new, timer):
    timer.seconds = 0.0
    t0 = time.perf_counter()
    rewards, _ = ft.score_members(es, es.ask(), model, tok, task, prompts, items, max_new, batch_size=len(prompts))
    es.tell(rewards)
    return rewards, time.perf_counter() - t0, timer.seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--population", type=int)
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides (default 1)")
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=5e-4)
    args = ap.parse_args(argv)
    key = args.model.strip().lower()
    n, n_prompts, max_new, dtype, reps = DEFAULTS.get(key, DEFAULTS["smollm2-135m"])
    n = args.population or n
    n_prompts = args.prompts or n_prompts
    max_new = args.max_new_tokens or max_new
    dtype = args.dtype or dtype
    reps = args.repeats or reps
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, device="cpu", dtype=dtype)
    task = get_task("countdown", prompt_style="compact" if key == "tiny" else "plain", max_new_tokens=max_new)
    train, _ = load_split()
    items = train[:n_prompts]
    prompts = [task.prompt(it, tok) for it in items]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({n_params / 1e6:.2f}M parameters, {dtype}), N={n}, {n_prompts} prompts, "
          f"max {max_new} new tokens, greedy, {args.threads} thread(s), {reps} repetitions, "
          f"{os.cpu_count()} CPU cores")

    es = ES(model, ESConfig(population_size=n, sigma=args.sigma, alpha=args.alpha, seed=0))
    timer = _GenTimer()
    ft.generate = timer
    ref_t, eng_t, gen_share = [], [], []
    try:
        # warm-up, one of each (allocations, lazy imports); not counted
        engine_iteration(es, model, tok, task, prompts, items, max_new, timer)
        reference_iteration(model, tok, task, prompts[:2], items[:2], [1], args.sigma, 0.0, 4)
        es.params.sync()
        for r in range(reps):
            rewards_e, dt, gen = engine_iteration(es, model, tok, task, prompts, items, max_new, timer)
            eng_t.append(dt)
            gen_share.append(gen / dt)
            seeds = es.history[-1]["seeds"]
            t0 = time.perf_counter()
            rewards_r = reference_iteration(model, tok, task, prompts, items, seeds, args.sigma, args.alpha, max_new)
            ref_t.append(time.perf_counter() - t0)
            es.params.sync()  # the reference drifted the working weights (bf16); start the next pair clean
            same = sum(abs(a - b) < 1e-9 for a, b in zip(rewards_e, rewards_r))
            print(f"  repetition {r + 1}: reference {ref_t[-1]:.2f} s, engine {eng_t[-1]:.2f} s "
                  f"(generation {gen:.2f} s), member rewards equal on {same}/{n}", flush=True)
    finally:
        ft.generate = timer.inner
    ref, eng = statistics.median(ref_t), statistics.median(eng_t)
    outside = 1.0 - statistics.median(gen_share)
    print(f"reference (paper-style loop): {ref:.3f} s/iteration (median of {reps})")
    print(f"engine (esnb):                {eng:.3f} s/iteration (median of {reps})")
    print(f"engine share outside generation (perturb, restore, scoring, update): {100 * outside:.1f}%")
    pair = statistics.median(r / e for r, e in zip(ref_t, eng_t))
    print(f"speed-up per repetition pair (median): {pair:.2f}x")
    print(f"RATIO speed-up {ref / eng:.2f}x ({args.model}, N={n}, {n_prompts} prompts, {max_new} tokens, {dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
