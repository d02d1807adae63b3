"""Solutions to the exercises of notebooks/10_scaling_out.ipynb (each checks its own answer)."""
from __future__ import annotations

import itertools

import torch

from esnb.distributed import bytes_per_iteration, member_share, ring_allreduce_bytes, weight_bytes


def exercise_1() -> None:
    # ring all-reduce: each rank sends 2 (W - 1) / W of the buffer; N=64 gives a 16 x 64 = 1,024-byte
    # buffer, on 32 ranks 2 x 31/32 x 1,024 = 1,984 bytes, plus the 8-byte seed check -> 1,992 bytes.
    # A bf16 7B vector (15.2 GB) through the same ring: 2 x 31/32 x 15,231,233,024 bytes, about
    # 14.8 million times more (fewer times than N=30 on 16 ranks: the seed buffer grew with N).
    got = bytes_per_iteration(64, 32)
    assert got == 2 * 31 * 16 * 64 // 32 + 8 == 1992
    big = ring_allreduce_bytes(weight_bytes(7_615_616_512, 2), 32)
    assert big == 29_510_513_984
    ratio = big / got
    assert 1.47e7 < ratio < 1.49e7
    print(f"exercise 1: {got} bytes per rank per iteration; a bf16 7B all-reduce is {ratio:,.0f}x more")


def block_shares(n: int, w: int) -> list[list[int]]:
    """Consecutive blocks: the first n % w ranks get one member more."""
    base, extra = divmod(n, w)
    out, start = [], 0
    for r in range(w):
        size = base + (r < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def exercise_2() -> None:
    for n, w in ((30, 16), (30, 4), (15, 2), (3, 8)):
        blocks = block_shares(n, w)
        assert sorted(itertools.chain(*blocks)) == list(range(n))  # every member once
        assert sorted(len(b) for b in blocks) == sorted(len(member_share(n, r, w)) for r in range(w))
    assert [len(b) for b in block_shares(30, 16)] == [2] * 14 + [1] * 2
    # the results cannot depend on the split: a member's reward depends only on its seed and the
    # weights (the same on every rank), and its slot in the all-reduced vector is fixed by its index
    print("exercise 2: block shares of 30 on 16 ranks:", [len(b) for b in block_shares(30, 16)])


def exercise_3() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    sums = {c: float(torch.stack([p.sum() for p in x.chunk(c)]).sum()) for c in (1, 2, 3, 8)}
    assert len(set(sums.values())) > 1  # float32: the split changes the last bits
    # esnb.distributed's all-reduce: each slot has one writer, zeros elsewhere, float64 -> exact in any order
    rewards = torch.randn(15, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bufs = []
    for r in range(4):
        b = torch.zeros(15, dtype=torch.float64)
        idx = member_share(15, r, 4)
        b[idx] = rewards[idx]
        bufs.append(b)
    for order in itertools.permutations(range(4)):
        total = torch.zeros(15, dtype=torch.float64)
        for r in order:
            total += bufs[r]
        assert torch.equal(total, rewards)
    print("exercise 3: float32 sums by chunks:", {k: f"{v:.10f}" for k, v in sums.items()})


if __name__ == "__main__":
    for fn in (exercise_1, exercise_2, exercise_3):
        fn()
