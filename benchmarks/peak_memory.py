"""Peak memory of ES fine-tuning vs plain inference vs GRPO on the same model.

    python benchmarks/peak_memory.py --model tiny
    python benchmarks/peak_memory.py --model smollm2-135m --dtype bf16

Each measurement runs in a fresh Python process (so one cannot inherit another's allocations) and
reports its peak resident set size (``ru_maxrss``). ``loaded`` is the process after importing
every library (pandas, TRL) and loading the model, without doing any work: the columns ``over loaded`` are what
each method adds on top of that. Same model, prompts and token cap for all; ES evaluates N
members per iteration, GRPO samples ``G`` completions per prompt and takes AdamW steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("loaded", "inference", "es", "es+cache", "grpo")


def _peak_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def child(mode: str, model_name: str, dtype: str, prompts: int, max_new: int, population: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    # every mode imports the same libraries, so the differences are the methods' own memory
    import pandas  # noqa: F401
    import trl  # noqa: F401
    from esnb.finetune import FinetuneConfig, finetune
    from esnb.generation import generate
    from esnb.grpo import GRPORunConfig, train_grpo
    from esnb.models import load_model
    from esnb.tasks import get_task
    from esnb.tasks.countdown import load_split

    model, tok = load_model(model_name, device="cpu", dtype=dtype)
    key = model_name.strip().lower()
    task = get_task("countdown", prompt_style="compact" if key == "tiny" else "plain", max_new_tokens=max_new)
    train, test = load_split()
    train, test = train[:prompts], test[:4]
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "inference":
        generate(model, tok, [task.prompt(it, tok) for it in train], max_new_tokens=max_new,
                 stop_strings=task.stop_strings, batch_size=prompts)
    elif mode in ("es", "es+cache"):
        # "es": the memory trick as taught (one model + master copy + one tensor of noise);
        # "es+cache": esnb's default, which keeps members' noise when memory allows (a speed trade)
        cfg = FinetuneConfig.of(population_size=population, iterations=2, train_size=prompts, test_size=4,
                             eval_every=0, checkpoint_every=0, max_new_tokens=max_new, gen_batch_size=prompts,
                             save_final=False)
        finetune(model, tok, task, train, test, cfg, progress=False, noise_cache=0 if mode == "es" else "auto")
    elif mode == "grpo":
        cfg = GRPORunConfig(steps=2, num_generations=population, prompts_per_step=max(1, prompts // population),
                            max_new_tokens=max_new, eval_every=0, threads=threads, progress=False)
        train_grpo(model, tok, task, train, test, cfg)
    return {"mode": mode, "peak_mib": _peak_mib(), "params": n_params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="fp32", help="fp32 or bf16 (GRPO trains in fp32 on CPU whatever this says)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--population", type=int, default=4, help="ES members per iteration = GRPO group size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.dtype, args.prompts, args.max_new_tokens,
                               args.population, args.threads)))
        return 0
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--dtype", args.dtype,
               "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--population", str(args.population), "--threads", str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{mode}: failed\n{p.stderr[-2000:]}")
            return 1
        rows[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    n = rows["loaded"]["params"]
    bytes_el = 2 if args.dtype in ("bf16", "bfloat16", "fp16", "float16") else 4
    print(f"model {args.model} ({n / 1e6:.2f}M parameters, {args.dtype}: {n * bytes_el / 2**20:.1f} MiB of weights), "
          f"{args.prompts} prompts, {args.max_new_tokens} tokens, N = G = {args.population}")
    base = rows["loaded"]["peak_mib"]
    print(f"{'mode':<10} {'peak MiB':>9} {'over loaded':>12}")
    for mode in MODES:
        peak = rows[mode]["peak_mib"]
        print(f"{mode:<10} {peak:9.1f} {peak - base:12.1f}")
    print(f"ES theory: + float32 master copy {4 * n / 2**20:.1f} MiB + one tensor of noise; "
          f"GRPO (AdamW, fp32): + gradients + 2 moments = {12 * n / 2**20:.1f} MiB + activations for backprop")
    inf = rows["inference"]["peak_mib"]
    print(f"RATIO peak memory ES/inference {rows['es']['peak_mib'] / inf:.2f}x, "
          f"GRPO/inference {rows['grpo']['peak_mib'] / inf:.2f}x, GRPO/ES {rows['grpo']['peak_mib'] / rows['es']['peak_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
