"""Weight-shift statistics and a tensor-memory meter.

* :func:`weight_shifts` / :func:`shift_table` — how far training moved each tensor (for the
  histograms of notebooks 02 and 09); :func:`token_embedding_shifts` — which tokens' embeddings
  moved most (notebook 09).
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


# ---------------------------------------------------------------- where the weights moved (notebook 09)

LAYER_TYPES = ("embeddings", "attention", "mlp", "norms", "other")


def layer_type(name: str) -> str:
    """The kind of a parameter from its name (Llama-style naming): ``embeddings`` (token embeddings,
    LM head), ``attention`` (q/k/v/o projections), ``mlp`` (gate/up/down), ``norms`` (RMSNorm
    weights) or ``other``."""
    n = name.lower()
    if "embed" in n or "lm_head" in n or n.endswith("wte.weight") or "wpe" in n:
        return "embeddings"
    if "norm" in n or n.endswith("ln_f.weight") or ".ln_" in n:
        return "norms"
    if "attn" in n or "attention" in n or any(f"{p}_proj" in n for p in "qkvo"):
        return "attention"
    if "mlp" in n or any(p in n for p in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")):
        return "mlp"
    return "other"


def group_shifts(shifts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate per-tensor shifts (from :func:`weight_shifts`) into ``"all"`` and one entry per
    layer type present."""
    groups: dict[str, list[torch.Tensor]] = {}
    for k, d in shifts.items():
        groups.setdefault(layer_type(k), []).append(d.reshape(-1))
    out = {"all": torch.cat([d.reshape(-1) for d in shifts.values()])}
    out.update({t: torch.cat(groups[t]) for t in LAYER_TYPES if t in groups})
    return out


def matched_random_walk(shifts: dict[str, torch.Tensor], steps: int, step_rms: float | None = None,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """A random walk over the same tensors: ``steps`` steps of i.i.d. Gaussian noise with RMS
    ``step_rms`` per element. ``step_rms=None`` matches the size of the walk to the observed
    change: ``rms(all shifts) / sqrt(steps)``, so that walk and run have the same overall RMS and
    differ only in *shape* (how the change is spread over weights). The sum of ``steps`` Gaussian
    steps is itself Gaussian with variance ``steps * step_rms**2``, so it is drawn in one go."""
    if steps < 1:
        raise ValueError("steps: must be >= 1")
    if step_rms is None:
        flat = torch.cat([d.reshape(-1).double() for d in shifts.values()])
        step_rms = float(flat.pow(2).mean().sqrt()) / steps ** 0.5
    gen = torch.Generator().manual_seed(seed)
    scale = step_rms * steps ** 0.5
    return {k: torch.randn(d.shape, generator=gen, dtype=d.dtype if d.is_floating_point() else torch.float64) * scale
            for k, d in shifts.items()}


def displacement_ratio(shifts: dict[str, torch.Tensor], step_rms: Iterable[float]) -> float:
    """Observed RMS change / the RMS a random walk with these per-step sizes would reach
    (``sqrt(sum step_rms**2)``). About 1: the steps were as good as independent (random-walk-like);
    up to ``sqrt(steps)``: they kept pointing the same way (drift)."""
    s = torch.tensor([float(x) for x in step_rms], dtype=torch.float64)
    flat = torch.cat([d.reshape(-1).double() for d in shifts.values()])
    return float(flat.pow(2).mean().sqrt() / s.pow(2).sum().sqrt().clamp_min(1e-300))


def shift_stats(groups: dict[str, torch.Tensor]) -> "object":
    """One row per group: count, RMS, mean |delta|, excess kurtosis (0 for a Gaussian, i.e. a
    random walk; large = a few weights moved a lot, many barely), and the fraction of weights
    whose change is below a tenth of the RMS."""
    import pandas as pd

    rows = []
    for k, d in groups.items():
        d = d.double().reshape(-1)
        rms = float(d.pow(2).mean().sqrt())
        m = d - d.mean()
        var = float(m.pow(2).mean())
        kurt = float(m.pow(4).mean() / var ** 2 - 3) if var > 0 else float("nan")
        rows.append({"group": k, "numel": d.numel(), "rms": rms, "mean_abs": float(d.abs().mean()),
                     "excess_kurtosis": kurt, "small_fraction": float((d.abs() < 0.1 * rms).double().mean())})
    return pd.DataFrame(rows).set_index("group")


def token_embedding_shifts(before: nn.Module, after: nn.Module, tokenizer, top: int = 8) -> "object":
    """Which tokens' input embeddings moved most: a DataFrame of the ``top`` tokens by the norm of
    their embedding row's change, as a multiple of the median row's change.

    A run that singles out a few tokens (a gradient aimed at the answer format, say) shows rows
    many times the median; isotropic noise moves every row about equally (ratios near 1).
    """
    import pandas as pd

    rows = (after.get_input_embeddings().weight.detach().double()
            - before.get_input_embeddings().weight.detach().double().to(
                after.get_input_embeddings().weight.device)).norm(dim=1).cpu()
    median = float(rows.median())
    order = rows.argsort(descending=True)[:top]
    return pd.DataFrame({"token": [tokenizer.convert_ids_to_tokens(int(i)) for i in order],
                         "change / median row": [float(rows[i]) / median if median > 0 else float("inf")
                                                 for i in order]})
