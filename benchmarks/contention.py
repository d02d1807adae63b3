"""Idle cores vs one core busy with another process: how much slower esnb's work gets.

    python benchmarks/contention.py                 # ES iteration and GRPO step, tiny-base
    python benchmarks/contention.py --repeats 3 --iterations 6

A student's machine is rarely idle (a browser, JupyterLab, a second notebook). With all of
PyTorch's threads in use, one thread descheduled by another process makes the others wait at
every parallel region, and the slowdown is far larger than the share of CPU lost. This script
measures it side by side: each workload runs in a fresh process (so esnb chooses its threads as it
would for a user), first on idle cores, then while one busy-looping process (started here,
bounded by a deadline and stopped by this script) holds a core; the two alternate ``--repeats``
times, and the medians and their ratio are printed. Esnb's target: at most 1.6x on 2 cores.

Workloads (tiny-base, CPU, fp32):
* ``es``: ES iterations as ``python -m esnb.finetune --population 32 --antithetic --batch-size 16``
  (the median seconds per iteration, the first, warm-up, iteration left out);
* ``grpo``: GRPO steps (TRL) on the same puzzles (median seconds per step, the first left out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def worker(kind: str, iterations: int) -> dict:
    """Run one workload in this process and return its per-iteration (or per-step) seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import esnb.finetune as ft
    from esnb.models import load_model
    from esnb.tasks import get_task

    model, tok = load_model("tiny-base", device="cpu")
    task = get_task("countdown", prompt_style="compact")
    train, test = ft.default_items(task)
    if kind == "es":
        cfg = ft.FinetuneConfig.of(iterations=iterations, population_size=32, antithetic=True, sigma=1e-2,
                                alpha=5e-3, train_size=64, batch_size=16, test_size=8, eval_every=10**6)
        result = ft.finetune(model, tok, task, train, test, cfg, progress=False)
        secs = [float(x) for x in result.log["iter_seconds"]]
    else:
        from esnb.grpo import GRPORunConfig, train_grpo

        cfg = GRPORunConfig(steps=iterations, prompts_per_step=2, num_generations=8, learning_rate=1e-5,
                            eval_every=0, progress=False)
        result = train_grpo(model, tok, task, train[:64], test[:8], cfg)
        secs = [float(x) for x in result.log["iter_seconds"]]
    return {"seconds": secs[1:] if len(secs) > 1 else secs}


def run_worker(kind: str, iterations: int) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--iterations", str(iterations)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE), timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return statistics.median(json.loads(line[len("RESULT "):])["seconds"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="es,grpo", help="comma-separated: es, grpo")
    ap.add_argument("--repeats", type=int, default=2, help="idle/busy pairs per workload (default 2)")
    ap.add_argument("--iterations", type=int, default=5, help="ES iterations or GRPO steps per run (default 5)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.iterations)), flush=True)
        return 0
    cores = os.cpu_count() or 1
    print(f"{cores} CPU cores; each run in a fresh process with esnb's own thread choice; busy = one other "
          f"process spinning on one core; {args.repeats} idle/busy pairs, medians")
    ratios = {}
    for kind in [k.strip() for k in args.workloads.split(",") if k.strip()]:
        idle, busy = [], []
        for r in range(args.repeats):
            idle.append(run_worker(kind, args.iterations))
            spinner = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=900)])
            try:
                time.sleep(1.0)  # let the spinner take its core (and the load average notice it)
                busy.append(run_worker(kind, args.iterations))
            finally:
                spinner.kill()
                spinner.wait()
            print(f"  {kind} pair {r + 1}: idle {idle[-1]:.3f} s, busy {busy[-1]:.3f} s", flush=True)
        i, b = statistics.median(idle), statistics.median(busy)
        ratios[kind] = b / i
        unit = "iteration" if kind == "es" else "step"
        print(f"{kind:5s} idle {i:.3f} s/{unit}, one core busy {b:.3f} s/{unit}: {b / i:.2f}x")
    print("RATIO " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + " (one core busy vs idle; target <= 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
