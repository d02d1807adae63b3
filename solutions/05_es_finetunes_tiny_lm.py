"""Solutions to the exercises of notebooks/05_es_finetunes_tiny_lm.ipynb.

Each ``exercise_K`` runs the solution at a small size (N=4, 4 puzzles per member, one iteration)
and checks its own answer (tests/test_solutions.py runs them all). Run them by hand with
``python solutions/05_es_finetunes_tiny_lm.py``.
"""
from __future__ import annotations

import numpy as np
import torch

from esnb.es import centered_ranks, iteration_seeds
from esnb.finetune import FinetuneConfig, batch_indices, finetune
from esnb.generation import generate
from esnb.models import load_model
from esnb.noise import ParameterSet, noise_like
from esnb.runlog import bit_equal
from esnb.tasks import countdown as cd
from esnb.tasks import get_task

TASK = get_task("countdown", prompt_style="compact")
SIGMA, ALPHA, N, BATCH, SEED = 0.002, 0.002, 4, 4, 0


def _data():
    train, test = cd.load_split()
    return train[:16], test[:4]


def my_centered_ranks(rewards: torch.Tensor) -> torch.Tensor:
    """Ranks of ``rewards`` mapped linearly onto [-0.5, 0.5]; tied rewards share their mean rank."""
    r = rewards.double()
    n = r.numel()
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    ranks = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        below = float((r < r[i]).sum())          # rewards strictly smaller
        ties = float((r == r[i]).sum())          # itself included
        ranks[i] = below + (ties - 1) / 2        # the mean of the ranks the ties occupy
    return ranks / (n - 1) - 0.5


def paper_loop(model, tok, train, iterations: int, shape, antithetic: bool = True, sigma: float = SIGMA):
    """Notebook 05's written-out loop, with the shaping function ``shape(rewards) -> weights``."""
    ps = ParameterSet(model)
    prompts = [TASK.prompt(x, tok) for x in train]
    noise_draws = 0
    for it in range(iterations):
        if antithetic:
            members = [(s, sign) for s in iteration_seeds(SEED, it, N // 2) for sign in (+1, -1)]
        else:
            members = [(s, +1) for s in iteration_seeds(SEED, it, N)]
        idx = batch_indices(SEED, it, len(train), BATCH)
        rewards = []
        for s, sign in members:
            with torch.no_grad():
                for i, (p, m) in enumerate(zip(ps.params, ps.master)):
                    p.copy_(m + sign * sigma * noise_like(m, s, i))
            completions = generate(model, tok, [prompts[j] for j in idx], max_new_tokens=TASK.max_new_tokens,
                                   stop_strings=TASK.stop_strings, batch_size=256)
            rewards.append(float(np.mean([TASK.score(c, train[j])["reward"] for c, j in zip(completions, idx)])))
            with torch.no_grad():
                for p, m in zip(ps.params, ps.master):
                    p.copy_(m)
        z = shape(torch.tensor(rewards, dtype=torch.float64))
        coef = {}
        for (s, sign), zn in zip(members, z.tolist()):
            coef[s] = coef.get(s, 0.0) + sign * zn
        with torch.no_grad():
            for i, m in enumerate(ps.master):
                g = torch.zeros_like(m)
                for s, cn in coef.items():
                    g.add_(noise_like(m, s, i), alpha=cn / len(members))
                    noise_draws += 1
                m.add_(g * ALPHA)
            for p, m in zip(ps.params, ps.master):
                p.copy_(m)
    return ps, noise_draws


def _engine(train, test, **overrides):
    model, tok = load_model("tiny-base", device="cpu")
    settings = dict(population_size=N, antithetic=True, sigma=SIGMA, alpha=ALPHA, batch_size=BATCH, iterations=1,
                    train_size=len(train), eval_every=0, seed=SEED, save_final=False)
    settings.update(overrides)
    return model, finetune(model, tok, TASK, train, test, FinetuneConfig(**settings), progress=False)


def exercise_1() -> None:
    """Centered ranks written by hand equal esnb's, and the loop with them matches finetune bit for bit."""
    r = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.0, 0.1])
    assert torch.equal(my_centered_ranks(r), centered_ranks(r)), (my_centered_ranks(r), centered_ranks(r))
    train, test = _data()
    model, tok = load_model("tiny-base", device="cpu")
    paper_loop(model, tok, train, 1, my_centered_ranks)
    engine_model, _ = _engine(train, test, shaping="centered_rank")
    print("centered ranks: written loop and finetune bit-identical:", bit_equal(model, engine_model))
    assert bit_equal(model, engine_model)


def exercise_2() -> None:
    """Without mirrored pairs the loop still matches finetune bit for bit, and draws N (not N/2)
    noise tensors per parameter tensor in the update."""
    train, test = _data()
    model, tok = load_model("tiny-base", device="cpu")
    zscore = lambda r: (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
    _, draws = paper_loop(model, tok, train, 1, zscore, antithetic=False)
    engine_model, _ = _engine(train, test, antithetic=False)
    n_tensors = len(list(model.parameters()))
    print(f"antithetic=False: bit-identical {bit_equal(model, engine_model)}; "
          f"{draws // n_tensors} noise tensors per parameter tensor in the update (N={N})")
    assert bit_equal(model, engine_model)
    assert draws == N * n_tensors


def exercise_3() -> None:
    """sigma = 1e-6 flips no greedy token: every member ties, all z-scores are 0, the update is 0."""
    train, test = _data()
    before, _ = load_model("tiny-base", device="cpu")
    model, result = _engine(train, test, sigma=1e-6, antithetic=False)
    entry = result.es.history[0]
    print(f"rewards: mean {entry['reward_mean']:.4f}, min {entry['reward_min']:.4f}, max {entry['reward_max']:.4f}; "
          f"z-scores {entry['weights']}; update norm {float(result.log['update_norm'].iloc[0])}")
    assert entry["reward_min"] == entry["reward_max"]
    assert all(w == 0.0 for w in entry["weights"])
    assert float(result.log["update_norm"].iloc[0]) == 0.0
    assert bit_equal(model, before)


if __name__ == "__main__":
    for name in ("exercise_1", "exercise_2", "exercise_3"):
        print(f"--- {name}")
        globals()[name]()
