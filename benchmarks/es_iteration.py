"""One ES iteration, measured honestly: esnb's engine beside three reference points.

    python benchmarks/es_iteration.py --model tiny                 # N=32, 16 prompts, 64 tokens
    python benchmarks/es_iteration.py --model tiny --threads 2
    python benchmarks/es_iteration.py --model smollm2-135m         # bf16, N=8, 8 prompts, 32 tokens

Every timed item runs in this one process, with the same torch threads (``--threads``), in
interleaved repetitions (the order rotates every repetition), so machine load hits all of them;
the medians are printed, and the ratios are what count on a shared machine.

* **paper-style loop** (what the paper's public code does, written plainly here): per member, for
  every parameter tensor seed a generator, draw the noise in the model's dtype and add it in
  place; Hugging Face ``model.generate`` (KV cache, greedy, left padding, all prompts of a member
  in one batch); regenerate the noise and subtract it; update: for every tensor, regenerate every
  member's noise and add ``alpha/N * z_n * eps_n``.
* **engine**: ``esnb.finetune.score_members`` + ``ES.tell``: perturb from the float32 master,
  esnb's greedy decoder, restore by copy, update from regenerated noise. With the default
  ``population_batch="auto"`` a small model is decoded population-batched (esnb.population); the
  per-member engine is timed too.
* **engine, no noise cache, one noise thread**: the same engine as it was before noise drawing
  was spread over threads and cached (``noise_cache=0``, ``workers=1``), so that the gain is
  measured side by side; and **engine, table noise**: ``noise="table"`` (slices of one shared
  table instead of draws; other noise, so other numbers, see ``esnb.noise.NoiseTable``). Both are
  timed only for models of at least ``esnb.noise.PARALLEL_NOISE_MIN`` parameters, where they differ.
* **full-rank limit**: N separate batched generations of the same prompts with esnb's decoder,
  no ES work at all (no noise, no update): what any full-rank ES that decodes member by member
  pays at least.
* **shared-weights batch**: ONE batched generation of all N x prompts sequences with the same
  (unperturbed) weights: what a population decode would cost if the members shared weights (the
  bound that population batching and low-rank noise approach).

* **GRPO** (``--grpo-steps``, default 3): TRL's GRPO on a fresh float32 copy of the model, G = N
  sampled completions per prompt, every prompt once per step (a step scores as many completions as
  an ES iteration; 2 prompts a step for models of 20M parameters or more, whose float32 logits
  for all of them do not fit in 24 GiB); printed as seconds per scored completion beside the
  engine's.

Members must get distinct rewards (else the update skips its noise regeneration and flatters the
engine): the number of distinct member rewards is printed, and the script stops with an error
when they all tie in any timed iteration. Choose ``--sigma`` / prompts / tokens so that they differ.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import esnb.finetune as ft
import esnb.population as population
from esnb.es import ES, ESConfig, zscore
from esnb.generation import encode_prompts, generate
from esnb.models import load_model
from esnb.noise import PARALLEL_NOISE_MIN, stream_seed
from esnb.tasks import get_task

DEFAULTS = {  # model -> (N, prompts, max new tokens, dtype, repetitions, sigma, task)
    "tiny": (32, 16, 64, "fp32", 3, 1e-2, "countdown"),
    "smollm2-135m": (8, 8, 32, "bf16", 2, 3e-3, "arithmetic"),
}


def truncate_at_stops(text: str, stops) -> str:
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
        ids, mask = encode_prompts(tok, prompts, model.device)  # left padding, as esnb's decoder
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        scores = [task.score(truncate_at_stops(t, task.stop_strings), it) for t, it in zip(texts, items)]
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


def grpo_seconds_per_step(model_name, task, items, group, max_new, steps, threads) -> float:
    """Median seconds of a GRPO step (after one warm-up step) on a fresh copy of the model: every
    prompt once per step with ``group`` sampled completions each, so a step scores as many
    completions as one ES iteration. GRPO trains in float32 on a CPU whatever ``dtype`` says."""
    import tempfile

    from esnb.grpo import GRPORunConfig, train_grpo

    model, tok = load_model(model_name, device="cpu", dtype="fp32")
    cfg = GRPORunConfig(steps=steps + 1, num_generations=group, prompts_per_step=len(items), learning_rate=1e-5,
                        max_new_tokens=max_new, eval_every=0, threads=threads, progress=False)
    with tempfile.TemporaryDirectory() as out:
        result = train_grpo(model, tok, task, list(items), list(items[:1]), cfg, output_dir=out)
    return statistics.median([float(x) for x in result.log["iter_seconds"]][1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--population", type=int)
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for every item (default 1)")
    ap.add_argument("--sigma", type=float)
    ap.add_argument("--alpha", type=float, default=5e-4)
    ap.add_argument("--grpo-steps", type=int, default=3,
                    help="also time this many GRPO steps (TRL) on a copy of the model, same prompts, G=N (0: skip)")
    args = ap.parse_args(argv)
    key = args.model.strip().lower()
    n, n_prompts, max_new, dtype, reps, sigma, task_name = DEFAULTS.get(key, DEFAULTS["smollm2-135m"])
    n = args.population or n
    n_prompts = args.prompts or n_prompts
    max_new = args.max_new_tokens or max_new
    dtype = args.dtype or dtype
    reps = args.repeats or reps
    sigma = args.sigma or sigma
    threads = args.threads
    torch.set_num_threads(threads)
    # equal threads everywhere: esnb would otherwise pick one thread for small models (and on a
    # busy machine); here every item gets --threads
    population.machine_busy = lambda: False
    inner_generate = ft.generate
    ft.generate = lambda *a, **k: inner_generate(*a, **{**k, "threads": threads})

    model, tok = load_model(args.model, device="cpu", dtype=dtype)
    if task_name == "countdown":
        from esnb.tasks.countdown import load_split

        task = get_task("countdown", prompt_style="compact" if key == "tiny" else "plain", max_new_tokens=max_new)
        items = load_split()[0][:n_prompts]
    else:
        from esnb.tasks.arithmetic import make_items

        task = get_task("arithmetic")
        items = make_items("+", 1, seed=0)[:n_prompts]
    prompts = [task.prompt(it, tok) for it in items]
    n_params = sum(p.numel() for p in model.parameters())
    batched = population.use_population("auto", model, ES(model, ESConfig(population_size=2)))
    print(f"model {args.model} ({n_params / 1e6:.2f}M parameters, {dtype}), task {task_name}, N={n}, "
          f"{n_prompts} prompts, max {max_new} new tokens, sigma={sigma:g}, greedy, {threads} thread(s) for "
          f"every item, {reps} interleaved repetitions, {os.cpu_count()} CPU cores (shared with other jobs: "
          f"absolute times are inflated, compare the ratios)")

    es = ES(model, ESConfig(population_size=n, sigma=sigma, alpha=args.alpha, seed=0))
    large = n_params >= PARALLEL_NOISE_MIN
    if large:  # the engine as it was: noise drawn on the calling thread, twice per member
        es_before = ES(model, ESConfig(population_size=n, sigma=sigma, alpha=args.alpha, seed=0), noise_cache=0)
        es_before.params.workers = 1
        es_table = ES(model, ESConfig(population_size=n, sigma=sigma, alpha=args.alpha, seed=0, noise="table"))
    times: dict[str, list[float]] = {}
    distinct: list[int] = []

    def engine(choice, which=None):
        def run():
            e = which or es
            e.params.sync()  # each ES object holds its own master: start from its weights
            rewards, _ = ft.score_members(e, e.ask(), model, tok, task, prompts, items, max_new,
                                          batch_size=len(prompts), population_batch=choice)
            distinct.append(len(set(rewards)))
            e.tell(rewards)
            return rewards
        return run

    def reference():
        seeds = [m.seed for m in es.ask()]
        reference_iteration(model, tok, task, prompts, items, seeds, sigma, args.alpha, max_new)
        es.params.sync()  # the reference drifted the working weights (bf16); start the next item clean

    def limit():
        for _ in range(n):
            generate(model, tok, prompts, max_new, task.stop_strings, batch_size=len(prompts), threads=threads)

    def shared():
        generate(model, tok, prompts * n, max_new, task.stop_strings, batch_size=len(prompts) * n, threads=threads)

    items_to_time = {"paper-style loop": reference, "engine, per member": engine(False),
                     "full-rank limit": limit, "shared-weights batch": shared}
    if batched:
        items_to_time["engine, population-batched"] = engine(True)
    if large:
        items_to_time["engine, no noise cache, one noise thread"] = engine(False, es_before)
        items_to_time["engine, table noise"] = engine(False, es_table)
    names = list(items_to_time)
    # warm-up, not timed (allocations, lazy imports, the noise cache's first touch of its memory)
    engine(batched)()
    if large:
        engine(False, es_before)()
        engine(False, es_table)()
    reference_iteration(model, tok, task, prompts[:2], items[:2], [1], sigma, 0.0, 4)
    es.params.sync()
    distinct.clear()
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        line = []
        for name in order:
            t0 = time.perf_counter()
            items_to_time[name]()
            times.setdefault(name, []).append(time.perf_counter() - t0)
            line.append(f"{name} {times[name][-1]:.2f} s")
        print(f"  repetition {r + 1}: " + ", ".join(line), flush=True)
    print(f"distinct member rewards per engine iteration: {distinct} (of N={n})")
    if min(distinct) <= 1:  # one all-tie iteration is enough to flatter the engine's median
        print("ERROR: in at least one iteration every member got the same reward: that update skips its noise "
              "and the comparison flatters the engine; raise --sigma, or use more prompts or tokens")
        return 1
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in names:
        print(f"{name:28s} {med[name]:8.3f} s/iteration (median of {reps})")
    best = "engine, population-batched" if batched else "engine, per member"
    e = med[best]
    print(f"engine = {best}; its speed as a fraction of each reference (reference time / engine time):")
    for name in ("paper-style loop", "full-rank limit", "shared-weights batch"):
        print(f"  vs {name:22s} {med[name] / e:.2f}x")
    if batched:
        print(f"  (per-member engine vs paper-style loop: {med['paper-style loop'] / med['engine, per member']:.2f}x)")
    if large:
        for name in ("engine, no noise cache, one noise thread", "engine, table noise"):
            print(f"  {name}: {med['paper-style loop'] / med[name]:.2f}x the paper-style loop, "
                  f"{med['full-rank limit'] / med[name]:.2f}x the full-rank limit")
        print(f"  noise cache held {es.params.noise_cache_bytes / 2**20:.0f} MiB; noise drawn on "
              f"{es.params._workers()} thread(s)")
    if args.grpo_steps:
        # free the ES objects (their master copies and noise cache) before GRPO's training state
        del es, items_to_time
        if large:
            del es_before, es_table
        gc.collect()
        # a large model's GRPO step over all prompts at once needs more memory than a 24 GiB machine
        # has (its logits over the vocabulary, float32, for every completion): fewer prompts a step
        k = n_prompts if not large else min(n_prompts, 2)
        grpo_s = grpo_seconds_per_step(args.model, task, items[:k], n, max_new, args.grpo_steps, threads)
        per_es = e / (n * n_prompts)
        per_grpo = grpo_s / (n * k)
        print(f"GRPO (TRL, fp32 training on a CPU, G={n} completions of each of {k} prompts per step, "
              f"lr 1e-5): {grpo_s:.3f} s/step (median of {args.grpo_steps} after one warm-up step)")
        print(f"  per scored completion: ES engine {per_es * 1000:.1f} ms, GRPO {per_grpo * 1000:.1f} ms "
              f"(GRPO / ES {per_grpo / per_es:.2f}x)")
    print(f"RATIO engine vs paper-style loop {med['paper-style loop'] / e:.2f}x ({args.model}, N={n}, {n_prompts} prompts, "
          f"{max_new} tokens, {dtype}, {threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
