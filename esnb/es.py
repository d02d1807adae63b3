"""The ES core: config, fitness shaping, optimizers, and an ask/tell optimizer.

The paper's update (Qiu et al. 2025, Alg. 1)::

    theta <- theta + alpha * (1/N) * sum_n z_n * eps_n,    z = z-scored rewards of theta + sigma*eps_n

The textbook ES gradient carries a 1/sigma, ``g = (1/(N sigma)) sum_n z_n eps_n``; the paper folds
it into alpha ("learning-rate digestion"), and so do we: ``alpha`` here multiplies
``mean(z * eps)`` directly.

Shape of use (flat tensor)::

    es = ES(torch.zeros(2), ESConfig(population_size=20, sigma=0.1, alpha=0.05))
    for _ in range(100):
        pop = es.population()                # (N, D) candidates, one per member
        es.tell(fitness(pop))                # higher is better

and on a module, members are perturbed in place one at a time::

    for member in es.ask():
        with es.perturbed(member):
            rewards.append(evaluate(model))
    es.tell(rewards)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .cli import cli_field, nonneg_float, nonneg_int, positive_float, positive_int
from .noise import NOISE_SOURCES, PRECISIONS, ParameterSet, noise_like

# the argument group of the paper's engine choices on the command line
PAPER_GROUP = "the paper's choices (Qiu et al. 2025, released code), one switch or piece by piece"

SHAPINGS = ("zscore", "centered_rank", "raw")
OPTIMIZERS = ("sgd", "adam")


def check_real(name: str, value, *, positive: bool = False, nonnegative: bool = False, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper}, got {value!r}")
    return value


@dataclass
class ESConfig:
    """Hyperparameters of one ES run; the defaults are the paper's.

    Every field is checked on construction: a bad value raises ``ValueError`` naming the field.
    """

    population_size: int = cli_field(30, "population size N", flag="--population", metavar="N", type=positive_int)
    sigma: float = cli_field(1e-3, "noise scale", type=positive_float)
    alpha: float = cli_field(5e-4, "learning rate", type=nonneg_float)
    antithetic: bool = cli_field(False, "mirrored +/- noise pairs (the paper: off)", action="store_const", const=True,
                                 show_default=False)
    shaping: str = cli_field("zscore", "fitness shaping", choices=list(SHAPINGS))
    optimizer: str = cli_field("sgd", "how the ES gradient becomes a step", choices=list(OPTIMIZERS))
    momentum: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = cli_field(0, "run seed (default 0; the paper's 33 with --paper-faithful)", show_default=False,
                          type=nonneg_int)
    # where the noise comes from and in which precision perturb/restore/update run
    # (esnb.noise.NOISE_SOURCES, esnb.noise.PRECISIONS; "paper" = as the paper's released code)
    noise: str = cli_field("independent", "'paper': every tensor of a member seeded with the member's seed; "
                           "'table': windows of one shared Gaussian table (esnb.noise.NoiseTable); 'independent': "
                           "a stream per tensor", group=PAPER_GROUP, choices=list(NOISE_SOURCES))
    precision: str = cli_field("master", "'paper': perturb, restore by subtraction and update in the model's dtype, "
                               "no float32 master", group=PAPER_GROUP, choices=list(PRECISIONS))

    def __post_init__(self) -> None:
        n = self.population_size
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise ValueError(f"population_size must be an integer, got {n!r}")
        if n <= 0:
            raise ValueError(f"population_size must be > 0, got {n}")
        self.population_size = int(n)
        self.sigma = check_real("sigma", self.sigma, positive=True)
        self.alpha = check_real("alpha", self.alpha, nonnegative=True)
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"antithetic must be True or False, got {self.antithetic!r}")
        if self.antithetic and self.population_size % 2:
            raise ValueError(f"population_size must be even with antithetic=True (members come in +/- pairs), got {n}")
        if self.shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}, got {self.shaping!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        self.momentum = check_real("momentum", self.momentum, nonnegative=True, upper=1.0)
        betas = tuple(self.adam_betas) if isinstance(self.adam_betas, (tuple, list)) else None
        if betas is None or len(betas) != 2:
            raise ValueError(f"adam_betas must be a pair of numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = (
            check_real("adam_betas[0]", betas[0], nonnegative=True, upper=1.0),
            check_real("adam_betas[1]", betas[1], nonnegative=True, upper=1.0),
        )
        self.adam_eps = check_real("adam_eps", self.adam_eps, positive=True)
        self.weight_decay = check_real("weight_decay", self.weight_decay, nonnegative=True)
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, Integral) or s < 0:
            raise ValueError(f"seed must be a non-negative integer, got {s!r}")
        self.seed = int(s)
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {self.noise!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "paper" and (self.optimizer != "sgd" or self.momentum or self.weight_decay):
            raise ValueError("precision='paper' updates the weights in their own dtype with the paper's plain step: "
                             "it needs optimizer='sgd', momentum=0 and weight_decay=0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ESConfig":
        """The config of a saved :meth:`to_dict` (a JSON list of ``adam_betas`` back to a pair)."""
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    @classmethod
    def paper(cls, **overrides: Any) -> "ESConfig":
        """The engine of the paper's released code: one seed for every tensor of a member
        (``noise="paper"``), perturb / restore by subtraction / update in the model's dtype
        (``precision="paper"``), run seed 33; ``overrides`` change any field."""
        return cls(**{"noise": "paper", "precision": "paper", "seed": PAPER_SEED, **overrides})


# ---------------------------------------------------------------- fitness shaping

def zscore(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / std, population std as in the paper; all-equal rewards give all zeros."""
    r = rewards.double()
    std = r.std(unbiased=False)
    return (r - r.mean()) / (std + eps)


def centered_ranks(rewards: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly onto [-0.5, 0.5] (Salimans et al. 2017); ties share their mean rank.

    Only the order of the rewards matters, so one huge outlier cannot dominate the update.
    """
    r = rewards.double()
    n = r.numel()
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    order = torch.argsort(r, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    # Average the ranks of tied rewards, so equal rewards get equal weight.
    uniq, inverse = torch.unique(r, return_inverse=True)
    if uniq.numel() < n:
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones(n, dtype=torch.float64))
        ranks = (sums / counts)[inverse]
    return ranks / (n - 1) - 0.5


def shape_fitness(rewards: torch.Tensor, method: str) -> torch.Tensor:
    """Turn raw rewards into the weights of the update (``zscore``, ``centered_rank`` or ``raw``)."""
    if method == "zscore":
        return zscore(rewards)
    if method == "centered_rank":
        return centered_ranks(rewards)
    if method == "raw":
        return rewards.double().clone()
    raise ValueError(f"shaping must be one of {SHAPINGS}, got {method!r}")


# ---------------------------------------------------------------- optimizers

class SGD:
    """theta += alpha * g (the paper), with optional momentum; ``g`` is the ascent direction."""

    def __init__(self, alpha: float, momentum: float = 0.0):
        self.alpha, self.momentum = alpha, momentum
        self.velocity: dict[int, torch.Tensor] = {}

    def step(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        if self.momentum:
            v = self.velocity.get(index)
            v = grad.clone() if v is None else v.mul_(self.momentum).add_(grad)
            self.velocity[index] = v
            grad = v
        return grad * self.alpha

    def state_dict(self) -> dict:
        # Clones: the live tensors are updated in place, a saved state must not change with them.
        return {"velocity": {k: v.clone() for k, v in self.velocity.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = {int(k): v.clone() for k, v in state.get("velocity", {}).items()}


class Adam:
    """Adam on the ES direction (ascent). Costs two extra float32 copies of the parameters."""

    def __init__(self, alpha: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.alpha, self.betas, self.eps = alpha, betas, eps
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.t = 0

    def begin(self) -> None:
        """Called once per ES iteration, before the per-tensor steps."""
        self.t += 1

    def step(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        m = self.m.get(index)
        v = self.v.get(index)
        m = (1 - b1) * grad if m is None else m.mul_(b1).add_(grad, alpha=1 - b1)
        v = (1 - b2) * grad * grad if v is None else v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.m[index], self.v[index] = m, v
        m_hat = m / (1 - b1**self.t)
        v_hat = v / (1 - b2**self.t)
        return self.alpha * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        return {"m": {k: t.clone() for k, t in self.m.items()}, "v": {k: t.clone() for k, t in self.v.items()}, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m = {int(k): t.clone() for k, t in state["m"].items()}
        self.v = {int(k): t.clone() for k, t in state["v"].items()}
        self.t = int(state["t"])


def make_optimizer(config: ESConfig) -> SGD | Adam:
    if config.optimizer == "adam":
        return Adam(config.alpha, config.adam_betas, config.adam_eps)
    return SGD(config.alpha, config.momentum)


# ---------------------------------------------------------------- the optimizer

class _NormSum:
    """Sum of squares of the update's tensors, added on one thread in tensor order (a float32 dot
    per tensor: plenty for a logged norm, no copy), so the logged norm does not depend on threads."""

    def __init__(self) -> None:
        self.sq = 0.0

    def add(self, index: int, step: torch.Tensor) -> None:
        flat = step.reshape(-1)
        self.sq += float(torch.dot(flat, flat))


@dataclass(frozen=True)
class Member:
    """One population member: its noise is ``sign * eps(seed)``."""

    index: int
    seed: int
    sign: int = 1


def iteration_seeds(seed: int, iteration: int, count: int) -> list[int]:
    """The member seeds of one iteration: a pure function of (run seed, iteration).

    Drawing them this way (rather than from a running RNG) makes a resumed run, a replay and a
    distributed run draw the same seeds without sharing any RNG state.
    """
    state = np.random.SeedSequence([seed, iteration]).generate_state(count, dtype=np.uint32)
    return [int(s) for s in state]


class ES:
    """Evolution strategies on a flat tensor, a list of tensors, or an ``nn.Module``.

    The tensors are updated in place. A float32 master copy holds the exact weights; the working
    tensors (possibly bf16) are perturbed from it and restored by copy.
    """

    def __init__(self, params: nn.Module | torch.Tensor | Iterable[torch.Tensor], config: ESConfig | None = None,
                 master_device: str | torch.device | None = None, noise_cache: int | str | None = "auto"):
        """``noise_cache``: keep each member's noise from its perturbation to the update instead of
        drawing it again (bytes, ``"auto"`` or ``0``; see :meth:`esnb.noise.ParameterSet.cache_noise`:
        the same numbers either way, only time and memory change)."""
        self.config = config or ESConfig()
        self.params = ParameterSet(params, master_device=master_device, noise=self.config.noise,
                                   precision=self.config.precision)
        self.params.cache_noise(noise_cache)
        self.optimizer = make_optimizer(self.config)
        self.iteration = 0
        self.history: list[dict] = []
        self._members: list[Member] | None = None

    # -- ask -----------------------------------------------------------------
    def ask(self) -> list[Member]:
        """The members of the current iteration (same answer until ``tell``)."""
        if self._members is None:
            self.params.clear_noise_cache()  # a new iteration: the last one's noise is not needed again
            cfg = self.config
            if cfg.antithetic:
                seeds = self._draw_seeds(cfg.population_size // 2)
                self._members = [Member(2 * k + j, s, 1 - 2 * j) for k, s in enumerate(seeds) for j in (0, 1)]
            else:
                seeds = self._draw_seeds(cfg.population_size)
                self._members = [Member(k, s, 1) for k, s in enumerate(seeds)]
        return self._members

    def _draw_seeds(self, count: int) -> list[int]:
        """The ``count`` member seeds of the current iteration (one per +/- pair when antithetic)."""
        return iteration_seeds(self.config.seed, self.iteration, count)

    @contextmanager
    def perturbed(self, member: Member) -> Iterator[None]:
        """Parameters become theta + sigma * sign * eps(seed) inside the block, exactly theta after."""
        with self.params.perturbed(member.seed, member.sign * self.config.sigma):
            yield

    def noise(self, member: Member) -> torch.Tensor:
        """The flat noise vector ``sign * eps`` of a member (for teaching and small problems)."""
        return torch.cat([member.sign * noise_like(m, member.seed, i, source=self.config.noise).reshape(-1)
                          for i, m in enumerate(self.params.master)])

    def population(self) -> torch.Tensor:
        """All candidates ``theta + sigma * eps_n`` as rows of one (N, D) tensor (small problems only)."""
        theta = self.theta
        return torch.stack([theta + self.config.sigma * self.noise(m) for m in self.ask()])

    @property
    def theta(self) -> torch.Tensor:
        """The current (unperturbed) parameters, flattened, in master precision."""
        return self.params.flat_master()

    # -- tell ----------------------------------------------------------------
    def tell(self, rewards: Sequence[float] | torch.Tensor | np.ndarray) -> dict:
        """Score the members of ``ask()`` (higher is better), update theta, return the log entry."""
        members = self.ask()
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float64)).reshape(-1)
        if r.numel() != len(members):
            raise ValueError(f"rewards has {r.numel()} values but the population has {len(members)} members")
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"rewards must be finite; members {bad} got {[float(r[i]) for i in bad]}")
        if self.config.precision == "paper" and self.config.shaping == "zscore":
            # the paper's z-score, in numpy float32: (r - mean) / (std + 1e-8), population std
            r32 = r.numpy().astype(np.float32)
            weights = torch.from_numpy(((r32 - r32.mean()) / (r32.std() + np.float32(1e-8))).astype(np.float64))
        else:
            weights = shape_fitness(r, self.config.shaping)
        update_norm = self.apply_update([m.seed for m in members], [m.sign for m in members], weights.tolist())
        entry = {
            "iteration": self.iteration,
            "reward_mean": float(r.mean()),
            "reward_max": float(r.max()),
            "reward_min": float(r.min()),
            "reward_std": float(r.std(unbiased=False)),
            "update_norm": update_norm,
            "seeds": [m.seed for m in members],
            "signs": [m.sign for m in members],
            "weights": weights.tolist(),
        }
        self.history.append(entry)
        self.iteration += 1
        self._members = None
        return entry

    @torch.no_grad()
    def apply_update(self, seeds: Sequence[int], signs: Sequence[int], weights: Sequence[float]) -> float:
        """theta += step(mean_n w_n * sign_n * eps_n), regenerating the noise tensor by tensor.

        Only one noise tensor (and one update tensor) exists at a time, whatever N is. This is
        also what a replay of a seed log calls, so a replay follows the same arithmetic.
        """
        n = len(seeds)
        if self.config.precision == "paper":
            return self._apply_update_paper(seeds, signs, weights)
        # Members sharing a seed (antithetic pairs) need their noise generated only once.
        coef: dict[int, float] = {}
        for s, sg, w in zip(seeds, signs, weights):
            coef[s] = coef.get(s, 0.0) + sg * w
        if isinstance(self.optimizer, Adam):
            self.optimizer.begin()
        ps, cfg = self.params, self.config

        def update(i: int) -> torch.Tensor:
            master = ps.master[i]
            grad = torch.zeros_like(master)
            for s, c in coef.items():
                if c != 0.0:
                    grad.add_(ps.eps(s, i), alpha=c / n)
            step = self.optimizer.step(i, grad)
            if cfg.weight_decay:
                step = step - cfg.alpha * cfg.weight_decay * master
            master.add_(step)
            return step

        norm = _NormSum()
        ps.for_each_tensor(update, norm.add)
        ps.clear_noise_cache()
        ps.sync()
        return math.sqrt(norm.sq)

    @torch.no_grad()
    def _apply_update_paper(self, seeds: Sequence[int], signs: Sequence[int], weights: Sequence[float]) -> float:
        """The paper's update, in the weights' own dtype, member by member in order::

            update = 0;  for n: update += eps_n * z_n;  update /= N;  theta += alpha * update

        (every product and sum rounded to the model's dtype, as its code does)."""
        n = len(seeds)
        ps = self.params

        def update(i: int) -> torch.Tensor:
            p = ps.master[i]  # with precision="paper" these are the model's tensors
            acc = torch.zeros_like(p)
            for s, sg, w in zip(seeds, signs, weights):
                acc.add_(ps.scaled_noise(s, i, float(sg * w)))
            acc.div_(n)
            step = self.optimizer.step(i, acc)  # SGD: alpha * update, rounded to the dtype
            p.add_(step)
            return step.float()

        norm = _NormSum()
        ps.for_each_tensor(update, norm.add)
        ps.clear_noise_cache()
        return math.sqrt(norm.sq)

    def step(self, fitness: Callable) -> dict:
        """One iteration. ``fitness`` takes an (N, D) population for a tensor, or nothing for a module
        (it is called once per member with the module perturbed in place)."""
        members = self.ask()
        if len(self.params) == 1 and self.params.names == ["theta"]:
            rewards = fitness(self.population())
        else:
            rewards = []
            for m in members:
                with self.perturbed(m):
                    rewards.append(float(fitness()))
        return self.tell(torch.as_tensor(rewards))

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the run: master weights, optimizer state, iteration."""
        return {
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "master": [m.clone() for m in self.params.master],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["master"]) != len(self.params.master):
            raise ValueError("checkpoint has a different number of parameter tensors than this model")
        with torch.no_grad():
            for m, saved in zip(self.params.master, state["master"]):
                if m.shape != saved.shape:
                    raise ValueError(f"checkpoint tensor shape {tuple(saved.shape)} != model's {tuple(m.shape)}")
                m.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self._members = None
        self.params.sync()


SEED_SCHEDULES = ("esnb", "paper")
PAPER_SEED = 33          # the paper's ``initial_seed``
PAPER_SEED_HIGH = 2**30  # its seeds are ``np.random.randint(0, 2**30, ...)``


def paper_iteration_seeds(seed: int, iteration: int, count: int) -> list[int]:
    """The member seeds of one iteration as the paper's script draws them: numpy seeded once
    (``np.random.seed(seed)``, 33 in the paper), then ``np.random.randint(0, 2**30, size=count,
    dtype=np.int64)`` once per iteration, iterations 0, 1, ... in turn. Computed here from a
    private ``RandomState`` (the global numpy state is not touched) by drawing the earlier
    iterations' seeds again, so it is still a pure function of (seed, iteration, count) and a
    resumed run draws what an uninterrupted one did."""
    for name, value in (("seed", seed), ("iteration", iteration), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    rng = _paper_rng_at(seed, iteration, count)
    return [int(s) for s in rng.randint(0, PAPER_SEED_HIGH, size=int(count), dtype=np.int64)]


def _paper_rng_at(seed: int, iteration: int, count: int) -> np.random.RandomState:
    """The paper's numpy state seeded with ``seed`` after the draws of iterations 0 .. iteration-1."""
    rng = np.random.RandomState(int(seed))
    for _ in range(int(iteration)):
        rng.randint(0, PAPER_SEED_HIGH, size=int(count), dtype=np.int64)
    return rng


class PaperSeedsES(ES):
    """:class:`ES` whose members take the paper's seed schedule (:func:`paper_iteration_seeds`
    of ``config.seed``) instead of :func:`iteration_seeds`; everything else is the same. With
    ``antithetic=True`` (not the paper's) each draw gives ``N/2`` seeds, one per +/- pair.

    A seed log records the seeds themselves, so :func:`esnb.runlog.replay` needs no schedule;
    :class:`esnb.finetune.FinetuneConfig` (``seeds="paper"``) records which one made them."""

    def _draw_seeds(self, count: int) -> list[int]:
        cache = getattr(self, "_paper_rng", None)  # (next iteration, its RandomState): one draw per iteration
        if cache is not None and cache[0] == self.iteration:
            rng = cache[1]
        else:  # a fresh start, a resume or a loaded state: draw the schedule up to here
            rng = _paper_rng_at(self.config.seed, self.iteration, count)
        self._paper_rng = (self.iteration + 1, rng)
        return [int(s) for s in rng.randint(0, PAPER_SEED_HIGH, size=count, dtype=np.int64)]


def es_gradient(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, sigma: float, population_size: int,
                generator: torch.Generator | None = None, antithetic: bool = False, shaping: str = "zscore") -> torch.Tensor:
    """The ES estimate of grad E[f(theta + sigma eps)] = (1/(N sigma)) sum_n w_n eps_n, for a flat theta.

    With ``shaping="raw"`` this is an unbiased estimate of the gradient of the Gaussian-smoothed
    objective; z-scoring subtracts a baseline and rescales, which cuts the variance and changes the
    length (but not, on average, the direction).
    """
    d = theta.numel()
    if antithetic:
        half = torch.randn(population_size // 2, d, generator=generator, dtype=theta.dtype)
        eps = torch.cat([half, -half])
    else:
        eps = torch.randn(population_size, d, generator=generator, dtype=theta.dtype)
    rewards = f(theta + sigma * eps)
    w = shape_fitness(rewards, shaping).to(theta.dtype)
    return (w[:, None] * eps).sum(0) / (population_size * sigma)
