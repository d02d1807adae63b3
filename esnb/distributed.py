"""Population evaluation across processes with ``torch.distributed``: seeds out, rewards back.

ES parallelizes almost for free because a population member is an integer. With ``W`` processes
(ranks) every rank holds the whole model and, every iteration,

1. draws the same N member seeds itself (they are a pure function of (run seed, iteration),
   :func:`esnb.es.iteration_seeds`), so nothing has to be sent to start an iteration;
2. evaluates its share of the members, ``members[rank::W]`` (perturb in place, generate, score,
   restore), and writes their rewards into a zero-filled N-vector;
3. sums these vectors over all ranks (one ``all_reduce`` of N rewards and N accuracies, a 16 N
   byte buffer: each slot is written by exactly one rank, so the sum is exact);
4. applies the same update from the same rewards and regenerated noise: every rank ends the
   iteration with the same weights, bit for bit, and no weight ever travels.

The result is bit-identical to the single-process run with the same seed (the same seed log and
the same final weights), because each member is scored by the same code on the same weights
whichever rank does it, and the update sees the same numbers in the same order. That holds under
conditions: every rank on the same kind of hardware with the same software and the same number of
threads as the single-process run (a matrix product may sum in another order with other threads or
another CPU/GPU model), and on GPUs deterministic kernels
(``torch.use_deterministic_algorithms(True)``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). The
all-reduce itself adds exact zeros, so it never breaks it.

N need not be a multiple of the number of processes W: the shares are round robin and differ by at
most one member (:func:`member_share`); an iteration then takes as long as ``ceil(N / W)`` member
evaluations (:func:`load_balance`), e.g. N=30 on 16 processes costs the time of 2 members per rank,
as N=32 would, with two ranks idle half the time.

Launch (one process per GPU, or several CPU processes)::

    # this machine, 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --standalone --nproc_per_node=2 -m esnb.distributed \\
        --model tiny --task countdown --iterations 50 --population 32 --output runs/es-dist

    # two hosts with 8 GPUs each: run on every host, with the first host's address
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 \\
        --rdzv-id=esnb-run -m esnb.distributed --model Qwen/Qwen2.5-0.5B-Instruct \\
        --task countdown --population 30 --output runs/es-qwen

Only rank 0 writes the run directory (the same files as ``python -m esnb.finetune``) and prints.
Held-out evaluations are computed by every rank (identical results; set ``--eval-every 0`` to
keep them to the start and the end). The command-line options are those of
``python -m esnb.finetune`` (``--resume`` excepted).

From Python, inside a process started by torchrun::

    rank, world = esnb.distributed.setup()
    result = finetune(model, tok, task, train, test, config,
                      output_dir=out if rank == 0 else None,
                      population_evaluator=esnb.distributed.population_evaluator())
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .finetune import score_members

__all__ = ["setup", "rank_and_world", "member_share", "load_balance", "population_evaluator",
           "ring_allreduce_bytes", "bytes_per_iteration", "weight_bytes", "main"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...), once; returns ``(rank, world size)``.

    ``backend``: ``None`` picks nccl when CUDA is available (and selects GPU ``LOCAL_RANK``),
    gloo otherwise. Without torchrun's variables this is a one-process world (no group).
    """
    if dist.is_initialized():
        return rank_and_world()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return rank_and_world()


def _check_counts(n_members: int, world: int) -> None:
    for name, v, low in (("n_members", n_members, 0), ("world", world, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")


def member_share(n_members: int, rank: int, world: int) -> list[int]:
    """The member indices a rank evaluates: ``rank, rank + W, rank + 2W, ...`` (round robin, so
    the shares differ by at most one member; any N works with any W)."""
    _check_counts(n_members, world)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an integer in [0, {world}), got {rank!r}")
    return list(range(rank, n_members, world))


def load_balance(n_members: int, world: int) -> dict:
    """How evenly N members spread over W ranks: ``{"slots", "busy"}``. ``slots = ceil(N / W)``
    member evaluations per iteration on the busiest rank (what an iteration costs in time);
    ``busy = N / (W * slots)``, the share of rank-time spent evaluating (1.0 when W divides N).
    Example: N=30, W=16 -> 2 slots, busy 0.94 (the same time as N=32)."""
    _check_counts(n_members, world)
    slots = -(-n_members // world)
    return {"slots": slots, "busy": n_members / (world * slots) if slots else 0.0}


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_seeds(members: Sequence[Any], device: torch.device) -> None:
    # Every rank draws its seeds itself; compare them once per iteration (8 bytes) so that ranks
    # started with different settings fail loudly instead of training on different populations.
    digest = 0
    for m in members:
        digest = (digest * 1_000_003 + int(m.seed) * 2 + (m.sign < 0)) % (1 << 61)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    first = mine.clone()
    dist.broadcast(first, src=0)
    if int(first.item()) != digest:
        raise RuntimeError(f"rank {dist.get_rank()} drew other member seeds than rank 0: the ranks were "
                           "started with different settings (seed, population, iteration)")


def population_evaluator(check_seeds: bool = True) -> Callable:
    """A drop-in for :func:`esnb.finetune.score_members` that spreads the members over the ranks
    of the running process group and gathers rewards and accuracies with one ``all_reduce``.

    Pass it as ``finetune(..., population_evaluator=population_evaluator())`` on every rank.
    In a one-process world it is ``score_members`` itself.
    """

    def evaluate(es, members, model, tokenizer, task, prompts, items, max_new_tokens, batch_size=256):
        rank, world = rank_and_world()
        if world == 1:
            return score_members(es, members, model, tokenizer, task, prompts, items, max_new_tokens, batch_size)
        device = _comm_device()
        if check_seeds:
            _check_same_seeds(members, device)
        mine = member_share(len(members), rank, world)
        rewards, accs = score_members(es, [members[i] for i in mine], model, tokenizer, task, prompts, items,
                                      max_new_tokens, batch_size)
        # float64 zeros + exactly one writer per slot: the sum is exact, bit for bit
        buf = torch.zeros(2, len(members), dtype=torch.float64)
        buf[0, mine] = torch.tensor(rewards, dtype=torch.float64)
        buf[1, mine] = torch.tensor(accs, dtype=torch.float64)
        buf = buf.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.cpu()
        return buf[0].tolist(), buf[1].tolist()

    return evaluate


def ring_allreduce_bytes(payload_bytes: int, world: int) -> int:
    """Bytes one rank sends (and as many it receives) in a ring all-reduce of a ``payload_bytes``
    buffer over ``world`` ranks: a reduce-scatter then an all-gather, ``W - 1`` steps each, one
    W-th of the buffer per step, so ``2 (W - 1) / W x payload`` (rounded up). All ranks together put
    ``2 (W - 1) x payload`` bytes on the wire. NCCL and gloo use rings for large buffers; for a
    buffer of a few hundred bytes they may pick a tree, and the cost is latency (``2 (W - 1)``
    message rounds for a ring), not bandwidth."""
    _check_counts(0, world)
    if isinstance(payload_bytes, bool) or not isinstance(payload_bytes, int) or payload_bytes < 0:
        raise ValueError(f"payload_bytes: expected an integer >= 0, got {payload_bytes!r}")
    return -(-2 * (world - 1) * payload_bytes // world)


def bytes_per_iteration(population_size: int, world: int, check_seeds: bool = True) -> int:
    """Bytes one rank sends per iteration: a ring all-reduce (:func:`ring_allreduce_bytes`) of the
    (2, N) float64 buffer of rewards and accuracies (``16 N`` bytes), plus the 8-byte seed check (a
    broadcast from rank 0: each rank forwards at most 8 bytes in a pipelined broadcast). Grows with
    N and tends to ``2 x 16 N`` as W grows; never with the number of parameters. 0 for one process."""
    _check_counts(population_size, world)
    if world <= 1:
        return 0
    return ring_allreduce_bytes(16 * population_size, world) + (8 if check_seeds else 0)


def weight_bytes(model: torch.nn.Module | int, bytes_per_element: int = 2) -> int:
    """What shipping the weights once would cost (``P x bytes_per_element``; bf16 = 2)."""
    n = model if isinstance(model, int) else sum(p.numel() for p in model.parameters())
    return int(n) * bytes_per_element


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun ... -m esnb.distributed``: the options of ``python -m esnb.finetune`` (see ``--help``)."""
    from . import finetune as ft

    ap = ft.build_parser()
    if os.environ.get("RANK", "0") != "0":
        # every rank parses and checks the same arguments: rank 0 says what is wrong, in one line,
        # and the others end with the same status, quietly
        ap.exit = lambda status=0, message=None: sys.exit(status)  # type: ignore[method-assign]
    ap.prog = "torchrun --standalone --nproc_per_node=W -m esnb.distributed"
    ap.description = ("ES fine-tuning with the population spread over torchrun's processes (seeds out, "
                      "rewards back); bit-identical to python -m esnb.finetune with the same settings.")
    args = ap.parse_args(argv)
    if args.resume:
        ap.error("--resume is not supported by esnb.distributed yet; resume with python -m esnb.finetune "
                 "--resume DIR (same results), or start a new run")
    out, settings, _ = ft.cli_settings(ap, args)
    try:
        config = ft.config_from_settings(settings)
    except ValueError as e:
        ap.error(str(e))

    rank, world = setup()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    elif torch.get_num_threads() * local_world > (os.cpu_count() or 1):
        # share the cores of this host between its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    device = config.device
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"

    from .models import ModelNotAvailable, load_model

    # the same task, options and puzzles as python -m esnb.finetune (--data and paper mode included)
    task, train_items, test_items = ft.cli_task_and_items(ap, settings, config.fidelity == "paper", config.train_size)
    try:
        model, tokenizer = load_model(settings["model"], device=device, dtype=config.dtype)
    except (ModelNotAvailable, OSError, ValueError) as e:
        ap.error(f"--model: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    lead = rank == 0
    seen = {"eval": 0}

    def report(result: ft.FinetuneResult) -> None:
        if len(result.eval_rows) > seen["eval"]:
            e = result.eval_rows[-1]
            print(f"held-out after {e['iteration']} iterations: accuracy {e['test_accuracy']:.3f}, "
                  f"reward {e['test_reward']:.4f}", flush=True)
            seen["eval"] = len(result.eval_rows)
        elif settings.get("no_progress") and result.log_rows:
            r = result.log_rows[-1]
            print(f"iteration {r['iteration']}: reward {r['reward_mean']:.4f}, accuracy {r['accuracy']:.3f}, "
                  f"{r['iter_seconds']:.2f} s", flush=True)

    if lead:
        print(f"esnb.distributed: {world} processes, backend {dist.get_backend() if dist.is_initialized() else 'none'}, "
              f"{config.es.population_size} members (up to {-(-config.es.population_size // world)} per process), "
              f"{bytes_per_iteration(config.es.population_size, world)} bytes per process per iteration", flush=True)
    try:
        try:
            result = ft.finetune(model, tokenizer, task, train_items, test_items, config,
                                 output_dir=out if lead else None, callback=report if lead else None,
                                 progress=lead and not settings.get("no_progress"), overwrite=bool(args.overwrite),
                                 metadata={"cli": settings, "world_size": world},
                                 population_evaluator=population_evaluator())
        except (ValueError, FileExistsError, ft.RunLocked) as e:  # refused settings: one line, from rank 0 (ap.exit)
            ap.exit(2, f"{ap.prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        if lead:
            print(f"done: {config.iterations} iterations on {world} processes, held-out accuracy "
                  f"{result.accuracy_before:.3f} -> {result.accuracy_after:.3f}, "
                  f"{result.seconds_per_iteration:.2f} s/iteration; run in {out}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
