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

import math
import weakref
from typing import Any, Iterable, Sequence

import numpy as np

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


def matched_random_walk(shifts: dict[str, torch.Tensor], steps: int, step_rms: float | Sequence[float] | None = None,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """A random walk over the same tensors: ``steps`` steps of i.i.d. Gaussian noise with RMS
    ``step_rms`` per element. ``step_rms=None`` matches the size of the walk to the observed
    change: ``rms(all shifts) / sqrt(steps)``, so that walk and run have the same overall RMS and
    differ only in *shape* (how the change is spread over weights); a sequence of ``steps`` sizes
    (a run's logged per-step RMS) matches the walk step by step instead. The sum of ``steps`` Gaussian
    steps is itself Gaussian with variance ``steps * step_rms**2``, so it is drawn in one go."""
    if steps < 1:
        raise ValueError("steps: must be >= 1")
    if step_rms is None:
        flat = torch.cat([d.reshape(-1).double() for d in shifts.values()])
        step_rms = float(flat.pow(2).mean().sqrt()) / steps ** 0.5
    if isinstance(step_rms, (int, float)):
        scale = float(step_rms) * steps ** 0.5
    else:  # one RMS per step (e.g. a run's logged update sizes): variances add
        sizes = [float(x) for x in step_rms]
        if len(sizes) != steps:
            raise ValueError(f"step_rms: expected {steps} step sizes, got {len(sizes)}")
        scale = math.sqrt(sum(x * x for x in sizes))
    gen = torch.Generator().manual_seed(seed)
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


# ---------------------------------------------------------------- learning or drift? (notebook 09)


def es_step_norm(alpha: float, n_params: int, population: int) -> float:
    """Expected norm of one z-scored ES step, ``alpha * sqrt(1 + (P - 2) / N)``.

    With N independent Gaussian directions in P dimensions and z-scored rewards (mean 0, population
    std 1, so ``sum z = 0`` and ``sum z**2 = N``), the step ``alpha/N sum z_n eps_n`` has
    ``E||step||^2 = alpha**2 (1 + (P - 2)/N)`` for a locally linear reward: the component along the
    gradient contributes N(N-1), each of the P-1 others N. For P >> N that is
    ``alpha * sqrt(P/N)``, whatever the rewards (unless they all tie)."""
    if population < 2 or n_params < 1:
        raise ValueError("population: need >= 2 members and n_params >= 1")
    return alpha * math.sqrt(1 + (n_params - 2) / population)


def _coefficients(entry: dict) -> dict[int, float]:
    """sum of sign * weight per distinct seed of one logged iteration (antithetic pairs share a seed)."""
    coef: dict[int, float] = {}
    for s, sg, w in zip(entry["seeds"], entry["signs"], entry["weights"]):
        coef[int(s)] = coef.get(int(s), 0.0) + sg * w
    return coef


def logged_step_norms(entries: Sequence[dict], alpha: float, n_params: int) -> np.ndarray:
    """The norm each logged ES step should have given its shaped weights alone:
    ``alpha/N * sqrt(P * sum_s c_s**2)`` with ``c_s`` the summed ``sign * weight`` of seed ``s``
    (distinct seeds' noise is independent, so cross terms vanish for P >> N). Without antithetic
    pairs ``sum c**2 = N``; with them it is ``sum (w+ - w-)**2``, which is 0 when both members of
    every pair scored the same."""
    out = []
    for e in entries:
        c = np.array(list(_coefficients(e).values()))
        out.append(alpha / len(e["seeds"]) * math.sqrt(n_params * float((c ** 2).sum())))
    return np.array(out)


def _paired(entry: dict) -> bool:
    """True when the members come in antithetic pairs: (seed, +1), (seed, -1), one pair after the other."""
    seeds, signs = entry["seeds"], entry["signs"]
    return len(seeds) % 2 == 0 and all(seeds[k] == seeds[k + 1] and signs[k] == -signs[k + 1]
                                       for k in range(0, len(seeds), 2))


def _shuffle(w: np.ndarray, paired: bool, gen: np.random.Generator) -> np.ndarray:
    """One null draw of an iteration's weights: a random permutation of the members, or, for
    antithetic pairs, a random permutation of the pairs with each pair's two weights swapped at
    random (so every step keeps its size, which depends on the within-pair differences)."""
    if not paired:
        return w[gen.permutation(len(w))]
    pairs = w.reshape(-1, 2)[gen.permutation(len(w) // 2)]
    swap = gen.random(len(pairs)) < 0.5
    pairs[swap] = pairs[swap][:, ::-1]
    return pairs.reshape(-1)


def shuffled_entries(entries: Sequence[dict], seed: int = 0) -> list[dict]:
    """The same seed log with each iteration's shaped weights randomly reassigned among its members.

    Replaying it gives the **shuffled-reward null**: the same noise directions, the same number of
    steps and the same weights in every step (z-scoring commutes with permuting the rewards), but
    rewards that no longer belong to the directions that earned them. With antithetic pairs the
    pairs are permuted as units and each pair's two weights swapped at random: the step norm
    depends on the within-pair differences (:func:`logged_step_norms`), so the null keeps every
    step's size exactly."""
    gen = np.random.default_rng(seed)
    return [{**e, "weights": _shuffle(np.asarray(e["weights"], dtype=float), _paired(e), gen).tolist()}
            for e in entries]


@torch.no_grad()
def noise_projections(es: Any, entries: Sequence[dict], directions: dict[str, Sequence[torch.Tensor]]) -> dict[str, np.ndarray]:
    """``<sign_n * eps_{t,n}, d>`` for every logged member ``n`` of every iteration ``t`` and each
    direction ``d`` (a list of tensors shaped like ``es.params.master``): arrays of shape (T, N).

    The run's displacement along ``d`` is then ``alpha/N sum_{t,n} w_{t,n} c_{t,n}``
    (:func:`projection_of`) for the logged weights and for any permutation of them, so thousands
    of shuffled-reward nulls cost one pass over the noise. Each seed's noise is regenerated once."""
    master = es.params.master
    for name, d in directions.items():
        if len(d) != len(master) or any(a.shape != b.shape for a, b in zip(d, master)):
            raise ValueError(f"directions[{name!r}]: expected tensors shaped like the model's parameters")
    dirs = {k: [t.to(device=m.device, dtype=m.dtype) for t, m in zip(d, master)] for k, d in directions.items()}
    out = {k: np.zeros((len(entries), len(entries[0]["seeds"]) if entries else 0)) for k in directions}
    for t, e in enumerate(entries):
        dots = {k: {} for k in directions}
        for s in dict.fromkeys(int(x) for x in e["seeds"]):
            acc = {k: 0.0 for k in directions}
            for i in range(len(master)):
                eps = es.params.noise(s, i).reshape(-1)
                for k, d in dirs.items():
                    acc[k] += float(torch.dot(eps, d[i].reshape(-1)))
            for k in directions:
                dots[k][s] = acc[k]
        for k in directions:
            out[k][t] = [sg * dots[k][int(s)] for s, sg in zip(e["seeds"], e["signs"])]
    return out


def projection_of(entries: Sequence[dict], projections: np.ndarray, alpha: float) -> float:
    """The run's displacement along a direction, ``alpha/N sum_{t,n} w_{t,n} <sign eps_{t,n}, d>``
    (plain SGD steps, as the paper's update), from :func:`noise_projections`."""
    w = np.array([e["weights"] for e in entries], dtype=float)
    return float(alpha / w.shape[1] * (w * projections).sum())


def null_projections(entries: Sequence[dict], projections: np.ndarray, alpha: float, draws: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """Displacements along the direction of ``draws`` shuffled-reward nulls (each iteration's
    weights reassigned independently, as :func:`shuffled_entries`): the spread a run that learned
    nothing would show."""
    if draws < 1:
        raise ValueError("draws: must be >= 1")
    gen = np.random.default_rng(seed)
    w = np.array([e["weights"] for e in entries], dtype=float)
    paired = [_paired(e) for e in entries]
    n = w.shape[1]
    out = np.empty(draws)
    for k in range(draws):
        shuffled = np.stack([_shuffle(w[t].copy(), paired[t], gen) for t in range(len(w))])
        out[k] = alpha / n * (shuffled * projections).sum()
    return out


def walk_spread(step_norms: Sequence[float], n_params: int, direction_norm: float = 1.0) -> float:
    """Standard deviation of a random walk's displacement along a fixed direction of norm
    ``direction_norm``, for steps of the given norms in uniformly random directions of P
    dimensions: ``|d| * sqrt(sum step**2 / P)`` (the walk matched step by step, not only at the end)."""
    s = np.asarray(step_norms, dtype=float)
    return float(direction_norm * math.sqrt(float((s ** 2).sum()) / n_params))


# ---------------------------------------------------------------- a weight change small enough to ship (notebooks 07 -> 09)

# The probabilities of plots.qq_normal's grid (200 points, tails to 1e-5), where the quantiles are kept.
QQ_PROBABILITIES = np.concatenate([np.logspace(-5, -1, 50), np.linspace(0.1, 0.9, 100), 1 - np.logspace(-1, -5, 50)])


def summarize_change(before: nn.Module | dict, after: nn.Module | dict, sample: int = 65536, seed: int = 0,
                     probabilities: Sequence[float] | None = None, noise: tuple[Any, Sequence[dict]] | None = None) -> dict:
    """What notebook 09 needs of a weight change whose weights are not shipped (a GRPO run cannot be
    rebuilt from a seed log): a dict of

    * ``numel``, ``norm`` (``||after - before||``) and ``rms`` of the whole change;
    * ``stats``: :func:`shift_stats` of :func:`group_shifts` (one record per layer type and
      ``"all"``), computed over every weight, and ``weights_rms``: the RMS of ``before`` per group
      (for the change relative to the weights);
    * ``probabilities`` / ``quantiles``: exact quantiles of ``change / rms`` over every weight (by
      default at :data:`QQ_PROBABILITIES`, the QQ plot's grid);
    * ``sample_seed`` / ``sample``: the change at ``sample`` coordinates of the flattened parameters
      (``named_parameters`` order) drawn uniformly without replacement with ``numpy``'s generator
      of ``seed`` (float32; for histograms and QQ plots);
    * ``projections`` (with ``noise=(es, entries)``, an ES object built on a model of the same
      shapes and that run's seed log): ``<sign eps_tn, change>`` for every logged member
      (:func:`noise_projections`), so the ES run's displacement along this change, hence the
      cosine between the two changes, is exact without either run's weights
      (:func:`projection_of` / (``||change_es|| * norm``)).

    Everything but ``sample`` and ``projections`` is a few KB; :func:`save_change_summary` writes it.
    """
    shifts = weight_shifts(before, after)
    groups = group_shifts(shifts)
    flat = groups["all"]
    rms = float(flat.pow(2).mean().sqrt())
    table = shift_stats(groups)
    before_groups = group_shifts({k: v.reshape(-1) for k, v in _named(before).items()})
    p = np.asarray(QQ_PROBABILITIES if probabilities is None else probabilities, dtype=float)
    values = (flat / rms).numpy() if rms > 0 else flat.numpy()
    quantiles = np.quantile(values, p)
    del values
    gen = np.random.default_rng(seed)
    idx = np.sort(gen.choice(flat.numel(), size=min(sample, flat.numel()), replace=False))
    out = {"numel": int(flat.numel()), "norm": float(flat.norm()), "rms": rms,
           "stats": [{"group": g, **{k: (int(v) if k == "numel" else float(v)) for k, v in r.items()}}
                     for g, r in table.iterrows()],
           "weights_rms": {g: float(v.double().pow(2).mean().sqrt()) for g, v in before_groups.items()},
           "probabilities": p.tolist(), "quantiles": quantiles.tolist(),
           "sample_seed": int(seed), "sample": flat[torch.from_numpy(idx)].float().numpy()}
    del flat, groups
    if noise is not None:
        es, entries = noise
        names = list(es.params.names)
        if sorted(names) != sorted(shifts):
            raise ValueError("noise: the ES object's parameters are not those of the change")
        direction = [shifts[n].reshape(m.shape) for n, m in zip(names, es.params.master)]
        out["projections"] = noise_projections(es, entries, {"change": direction})["change"].tolist()
    return out


def save_change_summary(summary: dict, directory: Any, name: str = "weight_change") -> list:
    """Write :func:`summarize_change`'s dict as ``NAME.json`` (everything but the sample) and
    ``NAME_sample.npy`` (the sampled coordinates, float32); returns the two paths."""
    from pathlib import Path

    from .files import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in summary.items() if k != "sample"}
    js, npy = directory / f"{name}.json", directory / f"{name}_sample.npy"
    write_json(js, meta, sort_keys=False)
    np.save(npy, np.asarray(summary["sample"], dtype=np.float32))
    return [js, npy]


def load_change_summary(directory: Any, name: str = "weight_change") -> dict:
    """Read what :func:`save_change_summary` wrote: the dict, with ``sample`` a float32 array,
    ``stats`` a DataFrame indexed by group and ``projections`` (if any) an array."""
    import json
    from pathlib import Path

    import pandas as pd

    directory = Path(directory)
    out = json.loads((directory / f"{name}.json").read_text())
    out["sample"] = np.load(directory / f"{name}_sample.npy")
    out["stats"] = pd.DataFrame(out["stats"]).set_index("group")
    if "projections" in out:
        out["projections"] = np.asarray(out["projections"], dtype=float)
    return out
