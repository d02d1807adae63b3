"""Weight-shift statistics and a tensor-memory meter.

* :func:`weight_shifts` / :func:`shift_table` — how far training moved each tensor (for the
  histograms of notebooks 02 and 09).
* :class:`TensorMemory` — counts the bytes of tensors created inside a ``with`` block and their
  peak, on any device, by watching every ATen operation (a ``TorchDispatchMode``). Unlike the
  process RSS it is deterministic and sees only tensor storage, which is what the memory tricks
  change. On a GPU ``torch.cuda.max_memory_allocated`` gives the same picture for CUDA tensors.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _named(x: nn.Module | dict | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(x, nn.Module):
        return {k: v.detach() for k, v in x.named_parameters()}
    if isinstance(x, dict):
        return {k: v.detach() for k, v in x.items()}
    return {f"param{i}": t.detach() for i, t in enumerate(x)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float32 copy of every parameter, by name (the "before" of a weight-shift comparison)."""
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


def weight_shifts(before: nn.Module | dict | Iterable[torch.Tensor], after: nn.Module | dict | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``after - before`` per tensor, flattened, in float64."""
    b, a = _named(before), _named(after)
    if list(b) != list(a):
        raise ValueError("before and after have different parameter names")
    return {k: (a[k].double() - b[k].double().to(a[k].device)).reshape(-1).cpu() for k in b}


def shift_table(before, after):
    """One row per tensor: size, mean |delta|, max |delta|, ||delta|| / ||before||, fraction changed."""
    import pandas as pd

    b = _named(before)
    rows = []
    for k, d in weight_shifts(before, after).items():
        w = b[k].double().reshape(-1).cpu()
        rows.append({"tensor": k, "numel": d.numel(), "mean_abs": float(d.abs().mean()), "max_abs": float(d.abs().max()),
                     "relative": float(d.norm() / w.norm().clamp_min(1e-30)), "changed": float((d != 0).double().mean())})
    return pd.DataFrame(rows)


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storage created inside the block: ``live``, ``peak``, and a ``timeline``.

    Tensors that existed before the block (the model, its master copy) are not counted, so
    ``peak`` is the *extra* memory a computation needs. A storage is counted once however many
    views of it are made, and is released when the last tensor created for it in the block dies.
    """

    def __init__(self, timeline: bool = False):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocated = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self.timeline: list[int] | None = [] if timeline else None

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._sizes.pop(key)
            del self._refs[key]
            if self.timeline is not None:
                self.timeline.append(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:  # empty tensors own no memory
                continue
            if key not in self._sizes:
                if key in inputs:
                    continue  # a view of, or in-place op on, a tensor from outside the block
                self._sizes[key] = storage.nbytes()
                self._refs[key] = 0
                self.live += storage.nbytes()
                self.allocated += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        if self.timeline is not None:
            self.timeline.append(self.live)
        return out


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
