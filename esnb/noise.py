"""Noise from integer seeds, and in-place perturb/restore of a parameter set.

The paper's first memory trick: a population member is *an integer*. Its noise is regenerated
from that seed whenever it is needed (to perturb, and again to build the update), so N members
never cost N copies of the model. Every parameter tensor gets its own random stream, derived from
(seed, tensor index), so that the noise of one layer is independent of the next one's.

The second trick: perturb in place, one tensor at a time, and restore *by copy* from a master
copy of the weights rather than by subtracting the noise again. Subtraction does not undo the
rounding of ``w + sigma*eps`` in bf16 (see :func:`add_noise_`, kept only to show that drift).

Memory (P = number of parameters, b = bytes per working element, 2 for bf16, 4 for fp32):

* the model itself: ``P*b``;
* the master copy: ``4*P`` (float32; ``8*P`` for a float64 model), on the model's device or, with
  ``master_device="cpu"``, in host memory (then every perturb/restore moves each tensor over the
  bus once);
* the noise of *one* tensor (``4 * largest tensor``), whatever the population size (a buffer
  that :class:`ParameterSet` keeps and reuses).

A bf16 model of P parameters therefore needs ``2P + 4P`` bytes plus one layer, against
``2P + N*4P`` if N noise vectors were stored.

Trading memory back for time (:meth:`ParameterSet.cache_noise`): on a CPU, drawing a member's
noise costs about as much as decoding with it (SmolLM2-135M: ~0.35 s a member on one core), and
the update draws it a second time. Where memory allows, esnb keeps each member's noise from its
perturbation to the update (``ES(noise_cache="auto")``: models of 20M parameters or more, up to a
quarter of the available memory) and draws a member's tensors on all of torch's threads. Both
leave every number unchanged; ``noise_cache=0`` gives back the memory figures above.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, index: int) -> int:
    """Mix a member seed and a tensor index into one 63-bit generator seed (splitmix64).

    Seeding tensor ``i`` with ``seed + i`` would make member 5's layer 0 equal to member 4's
    layer 1; a hash keeps the streams of all (seed, tensor) pairs apart.
    """
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xD1B54A32D192ED2D + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


# Where a member's noise comes from (``ESConfig.noise``):
# * "independent" (esnb's default): every tensor its own stream, ``stream_seed(seed, index)``;
# * "paper": every tensor of a member seeded with the member's seed itself, as the paper's
#   released code does (``gen.manual_seed(seed)`` before each tensor): two tensors of the same
#   shape then get the *same* noise (every layer's q_proj moves together with every other layer's),
#   and in ``precision="paper"`` the noise is drawn in the model's dtype, as there.
# * "table": slices of one shared table of Gaussian noise (:class:`NoiseTable`, Salimans et al.
#   2017), the slice of tensor ``index`` of member ``seed`` starting at an offset picked by
#   ``stream_seed(seed, index)``: a copy instead of a draw (much faster on a CPU), at the cost of
#   the table's memory and of noise vectors that are overlapping windows of one finite table.
NOISE_SOURCES = ("independent", "paper", "table")
# How weights are perturbed, restored and updated (``ESConfig.precision``):
# * "master" (esnb's default): a float32 master copy; perturb = master + sigma*eps written into the
#   working tensors, restore by copy (exact), update the master in float32;
# * "paper": no master copy; perturb, restore by subtracting the same noise, and update all in the
#   model's dtype (bf16 in the paper), as the paper's code does. Restoring by subtraction drifts
#   in bf16 (notebook 03), and the run's weights depend on that drift.
PRECISIONS = ("master", "paper")


def noise_seed(seed: int, index: int, source: str = "independent") -> int:
    """The generator seed of tensor ``index`` of member ``seed`` under a noise ``source`` (for
    ``"table"``: the seed that picks the offset into the table)."""
    if source == "paper":
        return int(seed)
    if source in ("independent", "table"):
        return stream_seed(seed, index)
    raise ValueError(f"noise: expected one of {NOISE_SOURCES}, got {source!r}")


TABLE_SIZE = 1 << 25   # floats in the shared table: 128 MiB in float32
TABLE_SEED = 0x7AB1E   # the table's own seed: every run, process and device sees the same table


class NoiseTable:
    """One large table of standard Gaussian noise; a member's noise is a window into it.

    The trick of Salimans et al. 2017 (ES at scale): draw ``size`` normals once, then the noise
    of tensor ``index`` of member ``seed`` is the ``numel`` consecutive entries starting at
    ``stream_seed(seed, index) % (size - numel + 1)``. Perturbing, restoring and the update then
    *copy* noise instead of drawing it (a member's SmolLM2-135M noise: a ~0.04 s slice instead of
    a ~0.46 s draw on a CPU), and a seed log still describes a run: replay rebuilds the same table
    from ``seed`` and reads the same windows.

    Memory: ``4 * size`` bytes per device that uses it (the default 2**25 floats: 128 MiB), once
    per process, whatever the population or model size.

    Caveat (statistics): the noise is no longer independent. Every member, tensor and iteration
    reads from the same finite table, so two windows overlap whenever their offsets are closer
    than their length: the overlapping part is the same numbers at shifted positions (and exactly
    the same noise when two offsets coincide, with probability about ``1/size`` per pair). For a
    tensor of ``n`` elements two members' windows overlap with probability about ``2n/size``. A
    tensor larger than the table wraps around it, so its own entries repeat every ``size``
    elements. Keep the table much larger than the largest tensor; use ``noise="independent"``
    when independence matters more than speed.
    """

    def __init__(self, size: int = TABLE_SIZE, seed: int = TABLE_SEED, device: str | torch.device = "cpu"):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size, self.seed = size, int(seed)
        # drawn on the CPU, so that every device holds the same numbers
        table = torch.randn(size, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float32)
        self.table = table.to(device)

    @property
    def nbytes(self) -> int:
        """Bytes the table holds."""
        return self.table.numel() * self.table.element_size()

    def offset(self, seed: int, index: int, numel: int) -> int:
        """Where the window of tensor ``index`` of member ``seed`` starts."""
        return stream_seed(seed, index) % max(1, self.size - numel + 1)

    def noise_into(self, out: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """Copy the window of (seed, index) into ``out`` (any shape, dtype and device)."""
        flat = out.view(-1)
        n = flat.numel()
        start = self.offset(seed, index, n)
        done = 0
        while done < n:  # more than one pass only for a tensor larger than the table
            take = min(n - done, self.size - start)
            flat[done:done + take].copy_(self.table[start:start + take])
            done, start = done + take, 0
        return out

    def noise_like(self, tensor: torch.Tensor, seed: int, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The noise of (seed, index) shaped like ``tensor`` (a new tensor)."""
        out = torch.empty(tensor.shape, dtype=dtype or _master_dtype(tensor.dtype), device=tensor.device)
        return self.noise_into(out, seed, index)


_TABLES: dict[torch.device, NoiseTable] = {}


def shared_table(device: str | torch.device = "cpu") -> NoiseTable:
    """The process's :class:`NoiseTable` on ``device`` (default size and seed), built on first use."""
    device = torch.device(device)
    table = _TABLES.get(device)
    if table is None:
        table = _TABLES[device] = NoiseTable(device=device)
    return table


_LOCAL = threading.local()


def thread_generator(device: torch.device) -> torch.Generator:
    """This thread's reusable ``torch.Generator`` for ``device``; seed it before every draw."""
    # One generator per device and thread, re-seeded per tensor: creating a Generator costs more
    # than seeding one, and this is called N x (number of tensors) times per iteration; one per
    # thread so that tensors can be drawn in parallel (each draw is seeded, so the numbers are the
    # same whichever thread draws them).
    gens = getattr(_LOCAL, "generators", None)
    if gens is None:
        gens = _LOCAL.generators = {}
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    return gen


# Below this many parameters, per-tensor work runs on the calling thread: the tensors are too small
# for a second thread to pay for itself. Above it, drawing noise dominates an ES iteration on a CPU
# (PyTorch's CPU generator draws on one core), so tensors are drawn on all of torch's threads.
PARALLEL_NOISE_MIN = 20_000_000
# The noise cache (see ParameterSet.cache_noise) may use at most this share of the memory the
# operating system reports as available when "auto" picks its size.
CACHE_SHARE_OF_AVAILABLE = 0.25


def available_memory() -> int | None:
    """Bytes the operating system reports as available (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def noise_like(tensor: torch.Tensor, seed: int, index: int, dtype: torch.dtype | None = None,
               source: str = "independent") -> torch.Tensor:
    """Standard Gaussian noise shaped like ``tensor``, a pure function of (seed, index, device)
    (of (seed, device) alone with ``source="paper"``)."""
    dtype = dtype or _master_dtype(tensor.dtype)
    if source == "table":
        return shared_table(tensor.device).noise_like(tensor, seed, index, dtype)
    gen = thread_generator(tensor.device)
    gen.manual_seed(noise_seed(seed, index, source))
    return torch.randn(tensor.shape, generator=gen, device=tensor.device, dtype=dtype)


def noise_into(out: torch.Tensor, seed: int, index: int, source: str = "independent") -> torch.Tensor:
    """Write the noise of (seed, index) into ``out`` (same numbers as :func:`noise_like` of its shape,
    dtype and device), so that a population can be drawn into one preallocated buffer."""
    if source == "table":
        return shared_table(out.device).noise_into(out, seed, index)
    gen = thread_generator(out.device)
    gen.manual_seed(noise_seed(seed, index, source))
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype, out=out)


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (toy problems); everything narrower is kept in float32 so that
    # updates of alpha * 1e-1 ~ 1e-4 are not rounded away as they would be in bf16.
    return torch.float64 if dtype == torch.float64 else torch.float32


def named_parameters_of(params: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The tensors ES optimizes, with names, in a fixed order (the order fixes the noise streams)."""
    if isinstance(params, nn.Module):
        return [(name, p) for name, p in params.named_parameters()]
    if isinstance(params, torch.Tensor):
        return [("theta", params)]
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected tensors to optimize, got {type(p).__name__} at position {i}")
        out.append((f"param{i}", p))
    if not out:
        raise ValueError("no parameters to optimize")
    return out


class ParameterSet:
    """The working parameters (what the model computes with) and their float32 master copy.

    Perturbation writes ``master + sigma * eps`` into the working tensors; restore copies the
    master back. Restoring by copy is exact in every dtype, whereas subtracting the noise again
    drifts in bf16 (the rounding of ``w + sigma*eps`` is not undone by ``- sigma*eps``).

    Memory: one float32 copy of the parameters beside the model (``master_device``; host memory
    works, at the cost of a transfer per tensor per member on a GPU).

    ``noise`` picks the noise source (:data:`NOISE_SOURCES`), ``precision`` the arithmetic
    (:data:`PRECISIONS`). With ``precision="paper"`` there is no master copy: ``master`` is the
    list of working tensors themselves, perturb adds ``sigma * eps`` in their dtype and restore
    subtracts it again (the paper's scheme, which does not give bf16 weights back exactly).
    """

    def __init__(self, params: nn.Module | torch.Tensor | Iterable[torch.Tensor], master_device: str | torch.device | None = None,
                 noise: str = "independent", precision: str = "master", workers: int | None = None):
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise: expected one of {NOISE_SOURCES}, got {noise!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        named = named_parameters_of(params)
        for name, p in named:
            if not p.is_floating_point():
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; ES needs floating-point tensors")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.noise_source, self.precision = noise, precision
        if precision == "paper":  # the working tensors are the only copy (updated in place, in their dtype)
            self.master = [p.data for p in self.params]
        else:
            self.master = [
                p.detach().to(device=master_device or p.device, dtype=_master_dtype(p.dtype), copy=True) for p in self.params
            ]
        self.perturbed_by: tuple[int, float] | None = None
        self._local = threading.local()  # per-thread scratch buffers
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._cache: dict[int, int] = {}  # member seed -> its slot in _slots
        self._slots: list[tuple[list[torch.Tensor], list[bool]]] = []  # (noise per tensor, drawn yet?)
        self._cache_budget = 0  # bytes; 0 = no cache
        self._cache_lock = threading.Lock()  # worker threads take slots

    # -- noise -----------------------------------------------------------------------------
    def _buffer(self, index: int, slot: str = "noise") -> torch.Tensor:
        """A per-thread reused buffer shaped like master tensor ``index`` (valid until this thread's
        next call for the same slot): drawing into memory that is already mapped is about a third
        faster on a CPU than allocating each noise tensor anew."""
        m = self.master[index]
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = {}
        key = (slot, m.dtype, m.device)
        buf = bufs.get(key)
        if buf is None:
            size = max(x.numel() for x in self.master if (x.dtype, x.device) == (m.dtype, m.device))
            buf = bufs[key] = torch.empty(size, dtype=m.dtype, device=m.device)
        return buf[:m.numel()].view(m.shape)

    def eps(self, seed: int, index: int, keep: bool = False) -> torch.Tensor:
        """The noise of (seed, tensor ``index``), read-only: the cached tensor when the member's
        noise is cached, else drawn into this thread's buffer (valid until its next call), and
        with ``keep`` cached where :meth:`cache_noise` leaves room. Do not modify it;
        :meth:`noise` gives a copy that may be."""
        slot = self._cache.get(seed)
        if slot is None and keep:
            slot = self._take_slot(seed)
        if slot is None:
            return noise_into(self._buffer(index), seed, index, self.noise_source)
        views, filled = self._slots[slot]
        if not filled[index]:
            noise_into(views[index], seed, index, self.noise_source)
            filled[index] = True
        return views[index]

    def _take_slot(self, seed: int) -> int | None:
        """A cache slot (one member's noise, in the master's shapes) for ``seed``, or ``None`` when
        the budget is used up. Slots are kept and reused from one iteration to the next: fresh
        memory costs a page fault per page on first use, a reused slot does not."""
        with self._cache_lock:
            if seed in self._cache:
                return self._cache[seed]
            used = set(self._cache.values())
            free = [k for k in range(len(self._slots)) if k not in used]
            if not free:
                if (len(self._slots) + 1) * self.master_bytes_total > self._cache_budget:
                    return None
                self._slots.append(([torch.empty_like(m) for m in self.master], []))
                free = [len(self._slots) - 1]
            k = free[0]
            self._slots[k] = (self._slots[k][0], [False] * len(self.master))
            self._cache[seed] = k
            return k

    def scaled_noise(self, seed: int, index: int, factor: float, keep: bool = False) -> torch.Tensor:
        """``factor * eps(seed, index)`` in a per-thread buffer the caller may modify (the noise's own
        buffer when it is not cached: one noise-sized buffer per thread, as without a cache)."""
        e = self.eps(seed, index, keep=keep)
        if seed in self._cache:
            return torch.mul(e, factor, out=self._buffer(index, "scaled"))
        return e.mul_(factor)

    def noise(self, seed: int, index: int) -> torch.Tensor:
        """The noise of (seed, tensor ``index``), as :func:`noise_like` of the master tensor, in a
        per-thread reused buffer (valid until the next call) that the caller may modify."""
        if seed in self._cache:
            return self._buffer(index).copy_(self.eps(seed, index))
        return noise_into(self._buffer(index), seed, index, self.noise_source)

    @property
    def master_bytes_total(self) -> int:
        """Bytes of one member's noise (the master's shapes and dtype)."""
        return sum(m.numel() * m.element_size() for m in self.master)

    def cache_noise(self, budget: int | str | None) -> int:
        """Keep each member's noise between perturb, restore and update, up to ``budget`` bytes
        (``"auto"``: up to a quarter of the available memory, shared by the processes of a
        ``torchrun``, for models of at least :data:`PARALLEL_NOISE_MIN` parameters and drawn noise;
        ``0``/``None``: off). The numbers are the same as
        without the cache (the seed stays the record); what it saves is drawing every member's
        noise a second time for the update (and a third time to restore, in
        ``precision="paper"``). The memory, once used, stays with the ParameterSet for reuse (a
        member's noise is ``4 * P`` bytes in float32). Returns the budget in bytes."""
        if budget == "auto":
            avail = available_memory()
            # a table window is a copy, not a draw: caching it saves little
            large = self.numel >= PARALLEL_NOISE_MIN and self.noise_source != "table"
            # torchrun starts one process per GPU or CPU share: they split the share between them
            share = CACHE_SHARE_OF_AVAILABLE / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            budget = int(avail * share) if avail and large else 0
        if budget is None:
            budget = 0
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"noise cache: expected 'auto' or a number of bytes >= 0, got {budget!r}")
        self._cache_budget = budget
        self._cache = {}
        self._slots = []
        return budget

    def clear_noise_cache(self) -> None:
        """Forget every cached member (its memory is kept for the next ones)."""
        self._cache = {}

    @property
    def noise_cache_bytes(self) -> int:
        """Bytes the noise cache holds."""
        return len(self._slots) * self.master_bytes_total

    # -- per-tensor work on several threads -------------------------------------------------
    def _workers(self) -> int:
        if self.workers is not None:
            return max(1, int(self.workers))
        if self.numel < PARALLEL_NOISE_MIN or len(self.master) < 2:
            return 1
        return max(1, min(torch.get_num_threads(), len(self.master), os.cpu_count() or 1))

    def for_each_tensor(self, fn: Callable[[int], object], consume: Callable[[int, object], None] | None = None) -> None:
        """``fn(i)`` for every tensor index, spread over worker threads when the model is large
        (each noise draw is seeded per tensor and each result is per tensor, so the numbers do not
        depend on which thread does what). ``consume(i, fn(i))`` then runs on the calling thread,
        in index order (for what must not depend on threads, like a reduction); at most a few
        results wait for it at a time. Each worker runs PyTorch on one thread, so that the workers
        share the cores instead of each spawning a full team."""
        n = self._workers()
        if n <= 1:
            for i in range(len(self.master)):
                out = fn(i)
                if consume is not None:
                    consume(i, out)
            return
        if self._pool is None or self._pool._max_workers != n:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="esnb-noise", initializer=torch.set_num_threads,
                                            initargs=(1,))
        grad_mode = torch.is_grad_enabled()  # thread-local in PyTorch: carry the caller's no_grad over

        def run(i: int) -> object:
            with torch.set_grad_enabled(grad_mode):
                return fn(i)

        window, pending, nxt = 2 * n, {}, 0
        for i in range(len(self.master)):
            while nxt < len(self.master) and nxt < i + window:
                pending[nxt] = self._pool.submit(run, nxt)
                nxt += 1
            out = pending.pop(i).result()
            if consume is not None:
                consume(i, out)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def perturb(self, seed: int, sigma: float) -> None:
        """Working params := master + sigma * eps(seed), tensor by tensor (sigma may be negative)."""
        if self.perturbed_by is not None:
            raise RuntimeError("parameters are already perturbed; restore() first")
        self.perturbed_by = (seed, sigma)
        if self.precision == "paper":
            def paper(i: int) -> None:
                # the paper: param.add_(SIGMA * noise), noise drawn in the param's dtype; two roundings
                self.params[i].add_(self.scaled_noise(seed, i, sigma, keep=True))
            self.for_each_tensor(paper)
            return

        def master(i: int) -> None:
            # master + sigma * eps, the same two roundings as eps.mul_(sigma).add_(master)
            self.params[i].copy_(self.scaled_noise(seed, i, sigma, keep=True).add_(self.master[i]))
        self.for_each_tensor(master)

    @torch.no_grad()
    def restore(self) -> None:
        """Working params := master, bit-exactly (``precision="paper"``: subtract the noise again,
        which leaves the rounding drift of bf16 behind)."""
        if self.precision == "paper":
            if self.perturbed_by is not None:
                seed, sigma = self.perturbed_by
                # the paper: param.add_(-SIGMA * noise)
                self.for_each_tensor(lambda i: self.params[i].add_(self.scaled_noise(seed, i, -sigma)))
            self.perturbed_by = None
            return
        for p, m in zip(self.params, self.master):
            p.copy_(m)
        self.perturbed_by = None

    @contextmanager
    def perturbed(self, seed: int, sigma: float) -> Iterator[None]:
        """Perturb on entry, restore on exit, also when the body raises."""
        self.perturb(seed, sigma)
        try:
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the master into the working tensors (after the master changed); nothing to do
        with ``precision="paper"``, where they are the same tensors."""
        if self.precision == "paper":
            return
        self.restore()

    def flat_master(self) -> torch.Tensor:
        return torch.cat([m.reshape(-1) for m in self.master])

    @property
    def master_bytes(self) -> int:
        """Bytes held by the master copy (what exact restore costs; 0 with ``precision="paper"``)."""
        if self.precision == "paper":
            return 0
        return sum(m.numel() * m.element_size() for m in self.master)

    @property
    def working_bytes(self) -> int:
        """Bytes of the working tensors (the model's own parameters)."""
        return sum(p.numel() * p.element_size() for p in self.params)


@contextmanager
def perturbed(model: nn.Module | torch.Tensor | Iterable[torch.Tensor] | ParameterSet, seed: int, sigma: float,
              master_device: str | torch.device | None = None) -> Iterator[ParameterSet]:
    """Inside the block every parameter is ``w + sigma * eps(seed)``; on exit it is ``w`` again, bit-exactly.

    Works in place, layer by layer (one noise tensor alive at a time), in any dtype, and restores
    also when the body raises. ``model`` may be a module, tensors, or a :class:`ParameterSet`; given a
    ParameterSet its master copy is reused, otherwise a master copy (float32, or float64 for a
    float64 model) is made on entry and dropped on exit: in a loop over a population build the
    ParameterSet once (as :class:`esnb.es.ES` does) instead of paying that copy per member.

    Yields the ParameterSet, whose ``master`` holds the unperturbed weights.
    """
    ps = model if isinstance(model, ParameterSet) else ParameterSet(model, master_device=master_device)
    with ps.perturbed(seed, sigma):
        yield ps


@torch.no_grad()
def add_noise_(model: nn.Module | torch.Tensor | Iterable[torch.Tensor], seed: int, scale: float) -> None:
    """``w += scale * eps(seed)`` in the working dtype, tensor by tensor: the *naive* perturbation.

    Calling it again with ``-scale`` is the "subtract to restore" scheme that does **not** give the
    weights back in bf16 (each add rounds); it is here so that notebooks and tests can measure that
    drift against :func:`perturbed`. Noise is the same stream as :func:`noise_like` uses.
    """
    for i, (_, p) in enumerate(named_parameters_of(model)):
        eps = noise_like(p, seed, i)
        p.add_(eps.mul_(scale).to(p.dtype))
        del eps


def noise_correlation(shape: Sequence[int], seed_a: int, index_a: int, seed_b: int, index_b: int) -> float:
    """Pearson correlation of the noise of (seed_a, tensor index_a) and (seed_b, index_b), same shape."""
    like = torch.empty(tuple(shape))
    a = noise_like(like, seed_a, index_a, dtype=torch.float64).reshape(-1)
    b = noise_like(like, seed_b, index_b, dtype=torch.float64).reshape(-1)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
