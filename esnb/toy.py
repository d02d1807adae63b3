"""Small-network tasks for ES: seeded data sets, an MLP, batched population evaluation, a backprop baseline.

For a network of a few thousand weights a population of N perturbed copies fits in memory many
times over, so the whole population is evaluated in *one* batched call: the N perturbed weight
sets are stacked along a leading axis and ``torch.func.vmap`` maps ``functional_call`` over it.
The perturbed weights are built from the same seeds and in the same arithmetic as the in-place
``ES.perturbed`` path, so the two evaluate bit-identical weights (the forward sums may still
round differently in the last bit, since a batched matmul is a different kernel).

Big models take the other road (perturb in place, one member at a time); see ``esnb.noise``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vmap

from .es import ES
from .noise import noise_into

# ---------------------------------------------------------------- data sets


@dataclass
class Dataset:
    """Inputs ``x`` (n, d) float32 and targets ``y``: class indices (long) or values (n, 1) float32."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    task: str  # "classification" or "regression"

    @property
    def num_outputs(self) -> int:
        return int(self.y.max()) + 1 if self.task == "classification" else self.y.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def two_moons(n: int = 400, noise: float = 0.1, seed: int = 0) -> Dataset:
    """Two interleaving half circles, classes 0 and 1, standardized to mean 0 / std about 1."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    g = _generator(seed)
    n0 = n // 2
    n1 = n - n0
    t0 = torch.rand(n0, generator=g) * math.pi
    t1 = torch.rand(n1, generator=g) * math.pi
    upper = torch.stack([torch.cos(t0), torch.sin(t0)], 1)
    lower = torch.stack([1 - torch.cos(t1), 0.5 - torch.sin(t1)], 1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=g)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    x = (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.85, 0.5])
    perm = torch.randperm(n, generator=g)
    return Dataset("moons", x[perm].float(), y[perm], "classification")


def spirals(n: int = 400, classes: int = 2, turns: float = 1.5, noise: float = 0.05, seed: int = 0) -> Dataset:
    """``classes`` interleaved spiral arms in the unit disc (harder than moons: needs a curved boundary)."""
    if n < classes:
        raise ValueError(f"n must be >= classes ({classes}), got {n}")
    g = _generator(seed)
    xs, ys = [], []
    for c in range(classes):
        m = n // classes + (1 if c < n % classes else 0)
        r = torch.rand(m, generator=g) * 0.9 + 0.1
        angle = 2 * math.pi * (turns * r + c / classes)
        pts = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
        xs.append(pts + noise * torch.randn(m, 2, generator=g))
        ys.append(torch.full((m,), c, dtype=torch.long))
    x, y = torch.cat(xs) * 1.6, torch.cat(ys)
    perm = torch.randperm(n, generator=g)
    return Dataset("spirals", x[perm].float(), y[perm], "classification")


def sine_regression(n: int = 200, noise: float = 0.05, seed: int = 0) -> Dataset:
    """y = sin(2x) + noise on x in [-pi, pi] (x scaled to [-1, 1] as input)."""
    g = _generator(seed)
    x = (torch.rand(n, 1, generator=g) * 2 - 1) * math.pi
    y = torch.sin(2 * x) + noise * torch.randn(n, 1, generator=g)
    return Dataset("sine", (x / math.pi).float(), y.float(), "regression")


DATASETS = {"moons": two_moons, "spirals": spirals, "sine": sine_regression}


def make_dataset(name: str, n: int = 400, seed: int = 0) -> Dataset:
    """One of ``DATASETS`` by name."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](n=n, seed=seed)


def split(data: Dataset, test_fraction: float = 0.25) -> tuple[Dataset, Dataset]:
    """Train/test split (the data sets are already shuffled)."""
    k = int(round(len(data) * (1 - test_fraction)))
    return (Dataset(data.name, data.x[:k], data.y[:k], data.task),
            Dataset(data.name, data.x[k:], data.y[k:], data.task))


# ---------------------------------------------------------------- the network


class MLP(nn.Sequential):
    """``in -> hidden x depth -> out`` with tanh between layers (smooth, so ES and backprop both do well)."""

    def __init__(self, inputs: int = 2, hidden: int = 32, outputs: int = 2, depth: int = 2, seed: int | None = 0):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = inputs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, outputs))
        super().__init__(*layers)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- scores (higher is better)


def score(output: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Fitness of outputs (..., n, k): minus cross-entropy (classification) or minus MSE (regression).

    Works on a leading population axis, returning one number per member.
    """
    if task == "classification":
        logp = torch.log_softmax(output, -1)
        return logp.gather(-1, y.expand(*output.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)
    return -((output - y) ** 2).mean((-1, -2))


def metric(output: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """What a person reads: accuracy (classification) or MSE (regression), per member."""
    if task == "classification":
        return (output.argmax(-1) == y).float().mean(-1)
    return ((output - y) ** 2).mean((-1, -2))


# ---------------------------------------------------------------- batched population


@torch.no_grad()
def population_params(es: ES, members=None) -> dict[str, torch.Tensor]:
    """The perturbed weights of all members, stacked: name -> (N, *shape).

    Same arithmetic as ``ParameterSet.perturb`` (``eps * (sign*sigma) + master``), then cast to the
    working dtype, so member n's slice is bit-identical to the model inside ``es.perturbed(member)``.
    Materializes N copies: fine for small networks only.
    """
    members = es.ask() if members is None else members
    sigma = es.config.sigma
    out = {}
    scale = torch.tensor([mb.sign * sigma for mb in members], dtype=es.params.master[0].dtype)
    for i, (name, p, m) in enumerate(zip(es.params.names, es.params.params, es.params.master)):
        stack = torch.empty((len(members), *m.shape), dtype=m.dtype, device=m.device)
        for n, mb in enumerate(members):
            noise_into(stack[n], mb.seed, i)
        # one broadcast multiply-add for all members: elementwise the same two roundings as perturb()
        stack.mul_(scale.to(m.device).view(-1, *[1] * m.dim())).add_(m)
        out[name] = stack.to(device=p.device, dtype=p.dtype)
    return out


def batched_forward(model: nn.Module, stacked: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outputs of every weight set in ``stacked`` on the same inputs: (N, n, out), one vmapped call."""
    buffers = dict(model.named_buffers())

    def one(params):
        return functional_call(model, (params, buffers), (x,))

    return vmap(one)(stacked)


@torch.no_grad()
def population_scores(es: ES, model: nn.Module, data: Dataset, batched: bool = True) -> torch.Tensor:
    """Fitness of every member of ``es.ask()`` on ``data``: one vmapped call, or a loop of in-place perturbations."""
    if batched:
        return score(batched_forward(model, population_params(es), data.x), data.y, data.task)
    out = []
    for member in es.ask():
        with es.perturbed(member):
            out.append(score(model(data.x), data.y, data.task))
    return torch.stack(out)


# ---------------------------------------------------------------- training loops with a common log


@dataclass
class TrainLog:
    """One row per evaluation point: step, wall seconds, forward passes over the data so far, metrics."""

    method: str
    rows: list[dict] = field(default_factory=list)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows).assign(method=self.method)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> float:
    return float(metric(model(data.x), data.y, data.task))


def train_es(model: nn.Module, train: Dataset, test: Dataset, es: ES, iterations: int, batched: bool = True,
             eval_every: int = 10, label: str = "ES", progress: bool = False) -> TrainLog:
    """Run ``iterations`` ES steps on the full training set; log test metric vs time and forward passes.

    A forward pass = one member evaluated on the whole training set; one ES iteration costs N.
    Evaluation time is not counted in the wall time.
    """
    log = TrainLog(label)
    forwards, elapsed = 0, 0.0
    log.rows.append({"step": 0, "seconds": 0.0, "forwards": 0, "test": evaluate(model, test), "train": evaluate(model, train)})
    steps = range(1, iterations + 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=label, leave=False)
    for it in steps:
        t0 = time.perf_counter()
        es.tell(population_scores(es, model, train, batched=batched))
        elapsed += time.perf_counter() - t0
        forwards += es.config.population_size
        if it % eval_every == 0 or it == iterations:
            log.rows.append({"step": it, "seconds": elapsed, "forwards": forwards,
                             "test": evaluate(model, test), "train": evaluate(model, train)})
    return log


def train_backprop(model: nn.Module, train: Dataset, test: Dataset, optimizer: str = "adam", lr: float = 1e-2,
                   steps: int = 500, eval_every: int = 10, label: str | None = None) -> TrainLog:
    """Full-batch gradient descent (``sgd`` or ``adam``) on the same loss ES maximizes (minus it).

    Counts one forward pass per step (the backward pass costs about two more, not counted).
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    log = TrainLog(label or f"backprop ({optimizer})")
    elapsed = 0.0
    log.rows.append({"step": 0, "seconds": 0.0, "forwards": 0, "test": evaluate(model, test), "train": evaluate(model, train)})
    for it in range(1, steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = -score(model(train.x), train.y, train.task)
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - t0
        if it % eval_every == 0 or it == steps:
            log.rows.append({"step": it, "seconds": elapsed, "forwards": it,
                             "test": evaluate(model, test), "train": evaluate(model, train)})
    return log


def time_population(es: ES, model: nn.Module, data: Dataset, repeats: int = 5) -> dict[str, float]:
    """Seconds per population evaluation, looped vs batched (best of ``repeats``), and the speed-up."""
    best = {}
    for batched in (False, True):
        population_scores(es, model, data, batched=batched)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            population_scores(es, model, data, batched=batched)
            times.append(time.perf_counter() - t0)
        best["batched" if batched else "loop"] = min(times)
    best["speedup"] = best["loop"] / best["batched"]
    return best


def decision_grid(model: nn.Module, data: Dataset, resolution: int = 150, margin: float = 0.5):
    """Class probabilities on a grid covering the data: (xx, yy, probs of class 1 or argmax)."""
    lo = data.x.min(0).values - margin
    hi = data.x.max(0).values + margin
    xs = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    ys = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    xx, yy = torch.meshgrid(xs, ys, indexing="xy")
    with torch.no_grad():
        out = model(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
    p = torch.softmax(out, -1)
    z = p[:, 1] if p.shape[1] == 2 else p.argmax(-1).float()
    return xx.numpy(), yy.numpy(), z.reshape(resolution, resolution).numpy()
