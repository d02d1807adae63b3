"""Two-dimensional test functions with their true gradients, for watching ES move.

ES *maximizes* a reward, so each landscape offers ``reward = -value``. Every function takes
points of shape (..., 2) and returns shape (...), so a whole population is scored in one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Landscape:
    """A function to minimize, its gradient, a plotting window and a start point."""

    name: str
    value: Callable[[torch.Tensor], torch.Tensor]
    gradient: Callable[[torch.Tensor], torch.Tensor]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    start: tuple[float, float]

    def reward(self, points: torch.Tensor) -> torch.Tensor:
        return -self.value(points)

    def reward_gradient(self, points: torch.Tensor) -> torch.Tensor:
        return -self.gradient(points)


def _xy(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if p.shape[-1] != 2:
        raise ValueError(f"landscapes are 2-D: expected points of shape (..., 2), got {tuple(p.shape)}")
    return p[..., 0], p[..., 1]


def sphere(p: torch.Tensor) -> torch.Tensor:
    x, y = _xy(p)
    return x**2 + y**2


def sphere_grad(p: torch.Tensor) -> torch.Tensor:
    return 2 * p


def rosenbrock(p: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    x, y = _xy(p)
    return (a - x) ** 2 + b * (y - x**2) ** 2


def rosenbrock_grad(p: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    x, y = _xy(p)
    dx = -2 * (a - x) - 4 * b * x * (y - x**2)
    dy = 2 * b * (y - x**2)
    return torch.stack([dx, dy], dim=-1)


def rastrigin(p: torch.Tensor, a: float = 10.0) -> torch.Tensor:
    x, y = _xy(p)
    return 2 * a + x**2 - a * torch.cos(2 * math.pi * x) + y**2 - a * torch.cos(2 * math.pi * y)


def rastrigin_grad(p: torch.Tensor, a: float = 10.0) -> torch.Tensor:
    return 2 * p + 2 * math.pi * a * torch.sin(2 * math.pi * p)


LANDSCAPES: dict[str, Landscape] = {
    "sphere": Landscape("sphere", sphere, sphere_grad, (0.0, 0.0), (-3, 3), (-3, 3), (2.5, 2.0)),
    "rosenbrock": Landscape("rosenbrock", rosenbrock, rosenbrock_grad, (1.0, 1.0), (-2, 2), (-1, 3), (-1.5, 2.5)),
    "rastrigin": Landscape("rastrigin", rastrigin, rastrigin_grad, (0.0, 0.0), (-4, 4), (-4, 4), (3.2, 2.8)),
}


def get_landscape(name: str) -> Landscape:
    try:
        return LANDSCAPES[name]
    except KeyError:
        raise ValueError(f"unknown landscape {name!r}; choose one of {sorted(LANDSCAPES)}") from None


def run_es(land: Landscape, config, iterations: int, start: tuple[float, float] | None = None,
           snapshot_at: tuple[int, ...] = ()) -> dict:
    """Run ES on a landscape; returns the path of theta, the value per iteration and snapshots.

    ``snapshot_at`` lists iterations at which to keep the population (for cloud plots).
    """
    from .es import ES

    theta = torch.tensor(start or land.start, dtype=torch.float64)
    es = ES(theta, config)
    path, values, snapshots = [es.theta.clone()], [float(land.value(es.theta))], []
    for it in range(iterations):
        pop = es.population()
        if it in snapshot_at:
            snapshots.append({"iteration": it, "theta": es.theta.clone(), "population": pop.clone(),
                              "path": torch.stack(path).clone()})
        es.tell(land.reward(pop))
        path.append(es.theta.clone())
        values.append(float(land.value(es.theta)))
    return {"path": torch.stack(path), "values": values, "snapshots": snapshots, "es": es}
