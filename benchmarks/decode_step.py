"""The lean decoder's step, old vs new, side by side in one run (interleaved, same threads).

    python benchmarks/decode_step.py                 # tiny model, 16 rows
    python benchmarks/decode_step.py --rows 64 --threads 2

* **step**: one call of the decoder's ``step`` on ``--rows`` rows (no row ever finishes: the
  tokens are fed back for ``--steps`` steps), milliseconds per call;
* **loop**: one token of ``generate`` (a whole greedy decode of the same prompts, EOS and stop
  strings as usual, divided by the tokens generated), old ``generate`` vs new.

"old" is esnb/generation.py as of commit b69e441 (before the leaner decode step), read from this
repository's git history (``git show b69e441:esnb/generation.py``) into a temporary module; where
git or that commit is not available (an exported copy, a shallow clone), the script says so and
times the new decoder alone. Both must produce the same completions; the script checks that.
Times are wall-clock on whatever the machine is doing: compare the two columns, not the numbers
with another run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import esnb.generation as new
from esnb.models import load_model
from esnb.tasks import countdown as cd

OLD_COMMIT = "b69e441"
OLD_PATH = "esnb/generation.py"


def load_old() -> types.ModuleType | None:
    """esnb/generation.py at :data:`OLD_COMMIT` as a module (it imports nothing from esnb), or
    ``None`` with a message when git or the commit is not there."""
    root = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(["git", "-C", str(root), "show", f"{OLD_COMMIT}:{OLD_PATH}"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        why = getattr(e, "stderr", None) or e
        print(f"old decoder not available (git show {OLD_COMMIT}:{OLD_PATH}: {str(why).strip()}); "
              "timing the new decoder only")
        return None
    mod = types.ModuleType(f"esnb_generation_{OLD_COMMIT}")
    exec(compile(src, f"{OLD_COMMIT}:{OLD_PATH}", "exec"), mod.__dict__)
    return mod


def time_steps(make_decoder, model, ids, mask, steps: int) -> float:
    with torch.inference_mode():
        dec = make_decoder(model)
        logits = dec.prefill(ids, mask, steps + 1)
        nxt = logits.argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = dec.step(nxt).argmax(-1).reshape(-1)
        return (time.perf_counter() - t0) / steps


def abba(time_old, time_new) -> tuple[float, float]:
    """Old, new, new, old: a drift in the machine's speed during a repetition cancels in the
    ratio (on a shared VM, the same code timed twice in a row differs by up to 10%)."""
    a, b = time_old(), time_new()
    b, a = b + time_new(), a + time_old()
    return a / 2, b / 2


def ratio(a: list[float], b: list[float]) -> str:
    rs = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
    return f"{statistics.median(rs):.2f}x (median of {len(rs)} repetitions; quartiles {q[0]:.2f}-{q[2]:.2f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    _, test = cd.load_split()
    prompts = [cd.compact_prompt(p["numbers"], p["target"]) for p in test[:args.rows]]
    if args.model != "tiny":
        prompts = [f"Use {p['numbers']} to make {p['target']}." for p in test[:args.rows]]
    ids, mask = new.encode_prompts(tok, prompts, "cpu")
    old = load_old()
    print(f"model {args.model}, {args.rows} rows, {args.steps} steps, {args.threads} thread(s), "
          f"{args.repeats} repetitions{' (old, new, new, old)' if old else ''}, {os.cpu_count()} CPU cores "
          f"(shared: times are inflated, the ratio is what counts)")

    kw = dict(max_new_tokens=64, stop_strings=["</answer>"], batch_size=len(prompts), threads=args.threads)
    out_new = new.generate(model, tok, prompts, **kw)
    out_hf = new.generate(model, tok, prompts, fast=False, **kw)
    print(f"completions: new == Hugging Face forward on {sum(a == b for a, b in zip(out_hf, out_new))}/{len(prompts)}")
    if old is not None:
        same = sum(a == b for a, b in zip(old.generate(model, tok, prompts, **kw), out_new))
        print(f"completions: new == old on {same}/{len(prompts)}")
        if same != len(prompts):
            print("ERROR: the new decoder's completions differ from the old one's")
            return 1
    n_tokens = sum(len(tok.encode(o, add_special_tokens=False)) for o in out_new)

    def time_loop(mod):
        t0 = time.perf_counter()
        mod.generate(model, tok, prompts, **kw)
        return (time.perf_counter() - t0) / n_tokens * len(prompts)

    step_new = lambda: time_steps(new.lean_decoder, model, ids, mask, args.steps)  # noqa: E731
    times: dict[str, list[float]] = {"step_old": [], "step_new": [], "loop_old": [], "loop_new": []}
    for _ in range(args.repeats):
        if old is None:
            times["step_new"].append(step_new())
            times["loop_new"].append(time_loop(new))
            continue
        a, b = abba(lambda: time_steps(old._LeanLlama, model, ids, mask, args.steps), step_new)
        times["step_old"].append(a)
        times["step_new"].append(b)
        a, b = abba(lambda: time_loop(old), lambda: time_loop(new))
        times["loop_old"].append(a)
        times["loop_new"].append(b)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    what = {"step": f"decoder step ({args.rows} rows)",
            "loop": f"generate, per decoded position ({n_tokens} tokens over {len(prompts)} prompts)"}
    for kind, label in what.items():
        if old is None:
            print(f"{label}: new {ms(times[f'{kind}_new']):.2f} ms")
        else:
            print(f"{label}: old {ms(times[f'{kind}_old']):.2f} ms, new {ms(times[f'{kind}_new']):.2f} ms, "
                  f"speed-up {ratio(times[f'{kind}_old'], times[f'{kind}_new'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
