"""Solutions to the exercises of notebooks/03_memory_tricks.ipynb.

Each ``exercise_K`` runs the solution at a small size and checks its own answer (tests/test_solutions.py
runs them all). Run them by hand with ``python solutions/03_memory_tricks.py``.
"""
from __future__ import annotations

import math

import torch

from esnb.noise import stream_seed

GB = 1e9


def memory_budget(params: float, population: int, master: str | None = "device") -> dict:
    """Bytes on the accelerator and on the host for ES on a bf16 model of ``params`` parameters.

    ``master``: ``"device"`` (esnb's default: the float32 master beside the weights), ``"host"``
    (``master_device="cpu"``) or ``None`` (the paper's code: no master, restore by subtraction).
    The noise of one tensor is alive at a time (float32, the largest tensor taken as 1/50 of the
    model); ``population`` does not enter: that is the point of regenerating noise from seeds.
    """
    if master not in ("device", "host", None):
        raise ValueError(f"master must be 'device', 'host' or None, got {master!r}")
    weights = 2 * params                       # bf16
    master_bytes = 4 * params                  # float32
    one_noise_tensor = 4 * params / 50
    device = weights + one_noise_tensor + (master_bytes if master == "device" else 0)
    host = master_bytes if master == "host" else 0
    return {"device": device, "host": host}


def exercise_1() -> None:
    """A memory budget for Qwen2.5-14B with the master on the device, on the host, and without one."""
    p = 14.7e9
    with_master = memory_budget(p, 30, "device")
    on_host = memory_budget(p, 30, "host")
    paper = memory_budget(p, 30, None)
    stored_noise = 2 * p + 30 * 4 * p          # the weights plus N float32 noise copies
    print(f"Qwen2.5-14B: device {with_master['device'] / GB:.1f} GB with the master on the device, "
          f"{on_host['device'] / GB:.1f} GB (+ {on_host['host'] / GB:.1f} GB host) with it on the host, "
          f"{paper['device'] / GB:.1f} GB without one; storing 30 noise copies: {stored_noise / GB:.0f} GB")
    # the weights themselves: 3x with the master on the device
    assert math.isclose((with_master["device"] - 4 * p / 50) / (paper["device"] - 4 * p / 50), 3.0)
    # with the master on the device (89.4 GB) it fits on neither; with it on the host, or without one (30.6 GB),
    # it fits on a 40 GB accelerator (and so on an 80 GB one)
    assert with_master["device"] > 80 * GB and paper["device"] < 40 * GB
    assert on_host["device"] == paper["device"] and on_host["host"] == 4 * p
    assert memory_budget(p, 1, "device") == memory_budget(p, 1000, "device")  # N does not matter
    assert stored_noise > 1700 * GB            # about 1.8 TB


class SharedNoiseTable:
    """The notebook's ten-line noise table: one Gaussian table, a (seed, tensor) pair picks an offset."""

    def __init__(self, size: int, seed: int = 0):
        self.table = torch.randn(size, generator=torch.Generator().manual_seed(seed))

    def offset(self, seed: int, index: int, numel: int) -> int:
        return stream_seed(seed, index) % (self.table.numel() - numel + 1)

    def noise_like(self, tensor: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        start = self.offset(seed, index, tensor.numel())
        return self.table[start:start + tensor.numel()].view(tensor.shape)


@torch.no_grad()
def table_update_(master: list, table: SharedNoiseTable, seeds: list, weights: list, alpha: float) -> None:
    """theta += alpha * mean_n w_n eps_n in place, tensor by tensor, eps from the shared table."""
    n = len(seeds)
    for i, m in enumerate(master):
        acc = torch.zeros_like(m)
        for s, w in zip(seeds, weights):
            acc.add_(table.noise_like(m, s, i), alpha=w / n)   # a view into the table: nothing drawn
        m.add_(acc, alpha=alpha)


def exercise_2() -> None:
    """The ES update with noise from a shared table equals the explicit sum."""
    table = SharedNoiseTable(10_000, seed=0)
    master = [torch.zeros(3, 4), torch.zeros(7), torch.zeros(2, 2, 5)]
    start = [m.clone() for m in master]
    seeds, weights, alpha = [11, 12, 13, 14], [1.2, -0.4, 0.3, -1.1], 0.05
    table_update_(master, table, seeds, weights, alpha)
    for i, (m, m0) in enumerate(zip(master, start)):
        explicit = m0 + alpha * sum(w * table.noise_like(m0, s, i) for s, w in zip(seeds, weights)) / len(seeds)
        assert torch.allclose(m, explicit, atol=1e-7), i
    # the same (seed, tensor) always reads the same slice
    assert torch.equal(table.noise_like(master[0], 11, 0), table.noise_like(master[0], 11, 0))


def exercise_3() -> None:
    """Subtract-restore in float64: not exact either, only (much) smaller drift."""
    gen = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(20_000, generator=gen, dtype=torch.float64)
    w[:100] = 1.0                                   # a few norm gains at 1.0, like a real model's
    original = w.clone()
    sigma = 1e-3
    for cycle in range(100):
        eps = torch.randn(w.shape, generator=torch.Generator().manual_seed(cycle), dtype=torch.float64)
        w.add_(sigma * eps)
        w.sub_(sigma * eps)
    drift = (w - original).abs()
    changed = float((drift > 0).double().mean())
    print(f"float64, 100 cycles: {100 * changed:.1f}% of the weights changed, largest drift {float(drift.max()):.1e}")
    assert changed > 0.01                             # not exact: each add and subtract still rounds
    assert float(drift.max()) < 1e-14                 # but about 1e-16 of a weight per cycle


def mean_step_norm_sq(d: int, n: int, draws: int, alpha: float = 1.0, seed: int = 0) -> float:
    """E||alpha/N sum_n z_n eps_n||^2 for a linear reward, z-scored rewards (population std)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    total = 0.0
    for _ in range(draws):
        eps = torch.randn(n, d, generator=gen, dtype=torch.float64)
        r = eps @ g
        z = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
        total += float((alpha / n * (z[:, None] * eps).sum(0)).pow(2).sum())
    return total / draws


def exercise_4() -> None:
    """N 30 -> 120 at d=1000: the step norm follows alpha*sqrt(1+(d-2)/N)."""
    for n in (30, 120):
        measured = math.sqrt(mean_step_norm_sq(1000, n, 300))
        predicted = math.sqrt(1 + (1000 - 2) / n)
        print(f"d=1000, N={n}: measured {measured:.3f} alpha, formula {predicted:.3f} alpha")
        assert abs(measured / predicted - 1) < 0.03


if __name__ == "__main__":
    for name in ("exercise_1", "exercise_2", "exercise_3", "exercise_4"):
        print(f"--- {name}")
        globals()[name]()
