"""Solutions to the exercises of notebooks/01_es_in_two_dimensions.ipynb.

Each ``exercise_K`` runs the solution at a small size and checks its own answer (tests/test_solutions.py
runs them all). Run this file to see every answer: ``python solutions/01_es_in_two_dimensions.py``.
"""
from __future__ import annotations

import torch

import esnb
from esnb import ESConfig, get_landscape
from esnb.es import iteration_seeds
from esnb.landscapes import run_es
from esnb.noise import noise_like

SPHERE = get_landscape("sphere")
ROSEN = get_landscape("rosenbrock")


def es_from_scratch(reward, theta, sigma, alpha, n, iterations, draw_noise, shape=None):
    """The notebook's loop (section 2); ``shape`` replaces the z-scoring line when given."""
    path = [theta.clone()]
    for t in range(iterations):
        eps = draw_noise(t, n)
        r = reward(theta + sigma * eps)
        z = shape(r) if shape is not None else (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
        theta = theta + alpha * (z[:, None] * eps).mean(0)
        path.append(theta.clone())
    return torch.stack(path)


def esnb_noise(t: int, n: int, seed: int = 0) -> torch.Tensor:
    """The noise esnb.ES gives its n members at iteration t (notebook section 4)."""
    like = torch.zeros(2, dtype=torch.float64)
    return torch.stack([noise_like(like, s, 0) for s in iteration_seeds(seed, t, n)])


def exercise_1() -> None:
    """Other units: 1000 * R + 7 gives the same trajectory (z-scores do not see scale or offset);
    -R climbs the other way (ES maximizes whatever it is given)."""
    start = torch.tensor(SPHERE.start, dtype=torch.float64)
    path_a = es_from_scratch(SPHERE.reward, start, 0.1, 0.05, 20, 100, esnb_noise)
    path_b = es_from_scratch(lambda p: 1000 * SPHERE.reward(p) + 7, start, 0.1, 0.05, 20, 100, esnb_noise)
    gap = float((path_a - path_b).abs().max())
    # Not bit-identical only because of the 1e-8 guard in the z-score's denominator.
    assert gap < 1e-5, gap
    path_neg = es_from_scratch(lambda p: -SPHERE.reward(p), start, 0.1, 0.05, 20, 100, esnb_noise)
    f = SPHERE.value
    assert f(path_a[-1]) < 0.01 < f(start) < f(path_neg[-1]), (f(path_a[-1]), f(path_neg[-1]))
    print(f"exercise 1: x1000 + 7 -> max |difference| {gap:.1e}; x(-1) -> f went from {float(f(start)):.2f} "
          f"up to {float(f(path_neg[-1])):.2f}")


def my_centered_ranks(r: torch.Tensor) -> torch.Tensor:
    """Ranks of r (0 for the lowest) mapped linearly onto [-0.5, 0.5]; assumes no ties."""
    n = r.numel()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[torch.argsort(r)] = torch.arange(n, dtype=torch.float64)
    return ranks / (n - 1) - 0.5


def exercise_2() -> None:
    """Centered ranks, written out, match esnb's and drive the from-scratch loop down the sphere."""
    r = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(my_centered_ranks(r), esnb.centered_ranks(r))
    start = torch.tensor(SPHERE.start, dtype=torch.float64)
    # ranks have a std of about 0.29, not 1: alpha x 3.5 for a comparable step (notebook section 8)
    path = es_from_scratch(SPHERE.reward, start, 0.1, 0.05 * 3.5, 20, 150, esnb_noise, shape=my_centered_ranks)
    final = float(SPHERE.value(path[-1]))
    assert final < 0.01, final
    print(f"exercise 2: my_centered_ranks == esnb.centered_ranks; ES with ranks: f {float(SPHERE.value(start)):.2f} -> {final:.2g}")


def exercise_3() -> None:
    """Antithetic pairs cancel the common offset R(theta) of raw rewards: at N = 8 the raw estimate
    points along the true gradient, where independent noise gives a poor direction."""
    gen = torch.Generator().manual_seed(0)

    def independent_noise(t: int, n: int) -> torch.Tensor:
        return torch.randn(n, 2, generator=gen, dtype=torch.float64)

    def antithetic_noise(t: int, n: int) -> torch.Tensor:
        half = torch.randn(n // 2, 2, generator=gen, dtype=torch.float64)
        return torch.cat([half, -half])

    point = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    true_grad = ROSEN.reward_gradient(point)
    sigma, n = 0.01, 8
    mean_cos = {}
    for name, draw in [("independent", independent_noise), ("antithetic", antithetic_noise)]:
        cos = []
        for t in range(300):
            eps = draw(t, n)
            estimate = (ROSEN.reward(point + sigma * eps)[:, None] * eps).mean(0) / sigma  # raw rewards
            cos.append(float(torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0)))
        mean_cos[name] = sum(cos) / len(cos)
    assert mean_cos["antithetic"] > 0.8 and mean_cos["independent"] < 0.3, mean_cos
    print(f"exercise 3: mean cosine with the true gradient at N={n}, raw rewards: "
          + ", ".join(f"{k} {v:.3f}" for k, v in mean_cos.items()))


def gradient_descent(land, lr: float, steps: int) -> torch.Tensor:
    """theta <- theta - lr * grad f(theta) from land.start; the path, shape (steps + 1, 2)."""
    theta = torch.tensor(land.start, dtype=torch.float64)
    path = [theta.clone()]
    for _ in range(steps):
        theta = theta - lr * land.gradient(theta)
        if not torch.isfinite(theta).all():
            break  # diverged: keep the path up to here
        path.append(theta.clone())
    return torch.stack(path)


def exercise_4() -> None:
    """Plain gradient descent on Rosenbrock with the true gradient: lr = 2e-3 gets to (1, 1) in 5,000
    steps, lr = 3e-3 blows up within a few steps (too large for the steep valley walls), and
    lr = 1e-4, safe across the walls, creeps along the flat floor and is still far away."""
    minimum = torch.tensor(ROSEN.minimum, dtype=torch.float64)
    results = {}
    for lr in (1e-4, 1e-3, 2e-3, 3e-3):
        path = gradient_descent(ROSEN, lr, 5000)
        diverged = len(path) < 5001 or float(ROSEN.value(path[-1])) > 1e3
        results[lr] = (diverged, float((path[-1] - minimum).norm()))
    assert results[3e-3][0], "lr = 3e-3 should diverge"
    assert not any(results[lr][0] for lr in (1e-4, 1e-3, 2e-3)), results
    # the largest safe step gets there; a 20x smaller one is still far up the valley
    assert results[2e-3][1] < 0.01 < 1.0 < results[1e-4][1], results
    print("exercise 4: " + "; ".join(f"lr={lr:g}: " + ("diverged" if d else f"distance to (1, 1) after 5000 steps {dist:.3g}")
                                      for lr, (d, dist) in results.items()))


def exercise_5() -> None:
    """sigma = 0.05 on Rosenbrock: ES climbs the blurred landscape, whose best point is not (1, 1).
    Blurring 100 (y - x^2)^2 adds 400 sigma^2 x^2 (= x^2 at sigma = 0.05), so the blurred minimum
    sits near x = 0.5; at sigma = 0.01 the extra term is 0.04 x^2 and ES gets to (1, 1)."""
    minimum = torch.tensor(ROSEN.minimum, dtype=torch.float64)
    closest = {}
    for sigma in (0.01, 0.05):
        run = run_es(ROSEN, ESConfig(population_size=20, sigma=sigma, alpha=0.05, optimizer="adam", seed=0), 600)
        closest[sigma] = float((run["path"] - minimum).norm(dim=1).min())
        if sigma == 0.05:
            final_x = float(run["path"][-1, 0])
    assert closest[0.01] < 0.05 and closest[0.05] > 0.3 and final_x < 0.8, (closest, final_x)
    print(f"exercise 5: closest distance to (1, 1) in 600 iterations: sigma=0.01 {closest[0.01]:.3g}, "
          f"sigma=0.05 {closest[0.05]:.3g} (final x {final_x:.2f})")


if __name__ == "__main__":
    for k in range(1, 6):
        globals()[f"exercise_{k}"]()
