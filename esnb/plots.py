"""Figures shared by the notebooks (matplotlib only; every function draws onto an axes it is given or makes)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .landscapes import Landscape


def landscape_contours(ax: plt.Axes, land: Landscape, resolution: int = 200, levels: int = 30) -> None:
    """Filled log-scale contours of a 2-D landscape with its minimum marked."""
    xs = torch.linspace(*land.xlim, resolution, dtype=torch.float64)
    ys = torch.linspace(*land.ylim, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    z = land.value(grid).numpy()
    ax.contourf(xs.numpy(), ys.numpy(), np.log1p(z - z.min()), levels=levels, cmap="viridis", alpha=0.85)
    ax.plot(*land.minimum, marker="*", color="white", markersize=14, markeredgecolor="black", label="minimum")
    ax.set_xlim(*land.xlim)
    ax.set_ylim(*land.ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$\\theta_1$")
    ax.set_ylabel("$\\theta_2$")


def population_snapshots(land: Landscape, snapshots: Sequence[dict], title: str = "") -> plt.Figure:
    """One panel per snapshot: contours, the population cloud, and the path of theta so far.

    Each snapshot is ``{"iteration", "theta", "population", "path"}`` (tensors / arrays).
    """
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3.6 * len(snapshots), 3.6), squeeze=False)
    for ax, snap in zip(axes[0], snapshots):
        landscape_contours(ax, land)
        pop = np.asarray(snap["population"])
        path = np.asarray(snap["path"])
        ax.scatter(pop[:, 0], pop[:, 1], s=10, color="tab:orange", edgecolor="black", linewidth=0.3, label="population")
        ax.plot(path[:, 0], path[:, 1], color="white", linewidth=1.2, label="path of $\\theta$")
        ax.plot(*np.asarray(snap["theta"]), marker="o", color="red", markersize=6, label="$\\theta$")
        ax.set_title(f"iteration {snap['iteration']}")
    axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(curves: dict[str, Sequence[float]], xlabel: str = "iteration", ylabel: str = "reward",
                    title: str = "", ax: plt.Axes | None = None, logy: bool = False) -> plt.Axes:
    """Several named curves on one axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        # a one-value curve is a point: give it a marker, or nothing shows
        ax.plot(np.arange(len(ys)), np.asarray(ys, dtype=float), label=name, marker="o" if len(ys) == 1 else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def mean_band(ax: plt.Axes, x: Sequence[float], runs: np.ndarray, label: str, color: str | None = None) -> None:
    """Mean over runs (rows) with a band of +/- one standard deviation."""
    runs = np.asarray(runs, dtype=float)
    mean, std = runs.mean(0), runs.std(0)
    line, = ax.plot(x, mean, label=label, color=color)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


# ---------------------------------------------------------------- notebooks 02-03 (small networks, memory tricks)


def decision_boundary(ax: plt.Axes, model: torch.nn.Module, data, title: str = "", resolution: int = 150) -> plt.Axes:
    """Class-1 probability (or argmax class) of ``model`` over the plane, with the points of ``data`` on top."""
    from .toy import decision_grid

    xx, yy, z = decision_grid(model, data, resolution)
    two = int(data.y.max()) == 1
    ax.contourf(xx, yy, z, levels=20 if two else int(data.y.max()) + 1, cmap="RdBu_r" if two else "viridis", alpha=0.6)
    x, y = data.x.numpy(), data.y.numpy()
    for c in np.unique(y):
        ax.scatter(x[y == c, 0], x[y == c, 1], s=8, edgecolor="black", linewidth=0.3, label=f"class {c}")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return ax


def curves_vs(ax: plt.Axes, frames, x: str = "seconds", y: str = "test", title: str = "", xlabel: str | None = None,
              ylabel: str | None = None, logx: bool = False) -> plt.Axes:
    """One line per run from ``TrainLog.frame()`` tables: metric ``y`` against ``x`` (seconds, forwards, step)."""
    for f in frames:
        ax.plot(f[x], f[y], marker=".", markersize=3, label=str(f["method"].iloc[0]))
    if logx:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def shift_histograms(ax: plt.Axes, shifts: dict[str, torch.Tensor | np.ndarray], bins: int = 60, title: str = "",
                     absolute: bool = True, log_y: bool = False) -> plt.Axes:
    """Histograms of weight changes (|delta| on a log axis when ``absolute``), one per label, overlaid.
    ``log_y`` puts the fractions on a log axis too, where the tails show."""
    data = {k: np.asarray(torch.as_tensor(v).double().reshape(-1)) for k, v in shifts.items()}
    if absolute:
        data = {k: np.abs(v)[np.abs(v) > 0] for k, v in data.items()}
        lo = min(v.min() for v in data.values() if v.size)
        hi = max(v.max() for v in data.values() if v.size)
        edges = np.logspace(np.log10(lo), np.log10(hi), bins)
        ax.set_xscale("log")
    else:
        lim = max(np.abs(v).max() for v in data.values())
        edges = np.linspace(-lim, lim, bins)
    for k, v in data.items():
        # fractions, not densities: on log-spaced bins a density would inflate the narrow low bins
        ax.hist(v, bins=edges, histtype="step", linewidth=1.5, weights=np.full(v.size, 1 / max(v.size, 1)), label=k)
    ax.set_xlabel("|change of a weight|" if absolute else "change of a weight")
    ax.set_ylabel("fraction of weights")
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def qq_normal(ax: plt.Axes, shifts: dict[str, torch.Tensor | np.ndarray], title: str = "", points: int = 200) -> plt.Axes:
    """Quantiles of each standardized sample (``delta / rms``) against a standard normal's, on
    quantiles spread to the far tails: a Gaussian change lies on the diagonal, heavy tails bend
    away from it at the ends, a change bounded like Adam's (at most about lr per step) flattens."""
    from statistics import NormalDist

    p = np.concatenate([np.logspace(-5, -1, points // 4), np.linspace(0.1, 0.9, points // 2),
                        1 - np.logspace(-1, -5, points // 4)])
    z = np.array([NormalDist().inv_cdf(float(q)) for q in p])
    for k, v in shifts.items():
        v = np.asarray(torch.as_tensor(v).double().reshape(-1))
        rms = float(np.sqrt(np.mean(v ** 2)))
        if v.size == 0 or rms == 0:
            continue
        ax.plot(z, np.quantile(v / rms, p), lw=1.5, label=k)
    ax.plot(z, z, color="gray", ls="--", lw=1, label="Gaussian")
    ax.set_xlabel("standard normal quantile")
    ax.set_ylabel("quantile of change / RMS")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# ---------------------------------------------------------------- notebooks 06-09 (ES vs GRPO)


def interpolate_runs(frames, x: str, y: str, grid: Sequence[float]) -> np.ndarray:
    """``y`` of each run (a DataFrame with columns ``x``, ``y``) linearly interpolated onto
    ``grid``; NaN outside the range a run covered (never extrapolated). Shape (runs, len(grid))."""
    grid = np.asarray(grid, dtype=float)
    out = np.full((len(frames), grid.size), np.nan)
    for i, f in enumerate(frames):
        xs, ys = np.asarray(f[x], dtype=float), np.asarray(f[y], dtype=float)
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], ys[order]
        inside = (grid >= xs[0]) & (grid <= xs[-1])
        out[i, inside] = np.interp(grid[inside], xs, ys)
    return out


def seed_band(ax: plt.Axes, frames, x: str, y: str, label: str, color: str | None = None,
              points: int = 100, show_runs: bool = True) -> np.ndarray:
    """Mean over seeds (line) with a band from the lowest to the highest seed, and each seed as a
    thin line: how one method's runs spread. Runs are interpolated onto a common ``x`` grid up to
    the shortest run. Returns the (runs, points) interpolated values."""
    end = min(float(np.max(f[x])) for f in frames)
    start = max(float(np.min(f[x])) for f in frames)
    grid = np.linspace(start, end, points)
    vals = interpolate_runs(frames, x, y, grid)
    line, = ax.plot(grid, vals.mean(0), label=f"{label} (mean of {len(frames)})", color=color, linewidth=2)
    ax.fill_between(grid, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    if show_runs:
        for f in frames:
            ax.plot(f[x], f[y], color=line.get_color(), linewidth=0.7, alpha=0.5)
    return vals


# ---------------------------------------------------------------- notebooks 05, 08 (ES fine-tuning of LMs)


def finetune_curves(results, axes=None, label: str = "ES", color: str | None = None):
    """Training reward (population mean, min-max band) and held-out accuracy of one
    :class:`esnb.finetune.FinetuneResult` (or anything with ``.log``/``.evals`` frames).
    Returns the two axes."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    log, evals = results.log, results.evals
    ax = axes[0]
    if len(log):
        # one iteration is one point: give it a marker, or nothing shows
        line, = ax.plot(log["iteration"] + 1, log["reward_mean"], label=f"{label}: population mean", color=color,
                        marker="o" if len(log) == 1 else None)
        ax.fill_between(log["iteration"] + 1, log["reward_min"], log["reward_max"], color=line.get_color(), alpha=0.15,
                        label=f"{label}: min to max member")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training reward")
    ax.grid(alpha=0.3)
    if len(log):
        ax.legend(fontsize=8)
    ax = axes[1]
    if len(evals):
        ax.plot(evals["iteration"], 100 * evals["test_accuracy"], marker="o", label=label, color=color)
        ax.legend(fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    return axes


class LiveCurves:
    """A ``callback`` for :func:`esnb.finetune.finetune` that redraws :func:`finetune_curves` in place
    every ``every`` iterations (one figure output that updates, instead of one per iteration)."""

    def __init__(self, every: int = 1, label: str = "ES", title: str = ""):
        self.every, self.label, self.title = max(1, int(every)), label, title
        self._handle = None
        self._seen = (0, 0)

    def __call__(self, result) -> None:
        n, e = len(result.log_rows), len(result.eval_rows)
        if (n, e) == self._seen or (n % self.every and e == self._seen[1]):
            return
        self._seen = (n, e)
        from IPython.display import display

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        finetune_curves(result, axes, label=self.label)
        if self.title:
            fig.suptitle(self.title)
        fig.tight_layout()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)


def population_animation(land: Landscape, snapshots: Sequence[dict], sigma: float, zoom: float = 6.0,
                         interval: int = 300, dpi: int = 55, jpeg: bool = True) -> str:
    """An ES run on a 2-D landscape as a self-contained HTML animation (``anim.to_jshtml``).

    One frame per snapshot (``{"iteration", "theta", "population", "path"}``, as ``run_es(...,
    snapshot_at=...)`` keeps them). Left: theta (red dot) and its path on the whole map. Right: the
    window theta +- ``zoom`` * sigma, each member coloured by its z-scored reward (red: better than
    the population's mean, blue: worse), and the ES direction (1/N) sum_n z_n eps_n as an arrow
    drawn at a fixed length. Small frames (``dpi``) and JPEG keep a notebook that embeds it small.
    """
    from matplotlib import animation

    from .es import zscore

    half = zoom * sigma
    fig, (ax_map, ax_zoom) = plt.subplots(1, 2, figsize=(7.6, 3.6), dpi=dpi)
    landscape_contours(ax_map, land)
    trail, = ax_map.plot([], [], color="white", lw=1)
    here, = ax_map.plot([], [], "o", color="red", ms=7, mec="white")
    ax_map.set_title("the whole map")

    def draw_frame(k: int) -> list:
        snap = snapshots[k]
        theta_k, pop = np.asarray(snap["theta"]), torch.as_tensor(snap["population"])
        z = zscore(land.reward(pop))                                                     # shaped fitness of each member
        direction = (z[:, None] * (pop - torch.as_tensor(snap["theta"])) / sigma).mean(0).numpy()  # (1/N) sum z_n eps_n
        path = np.asarray(snap["path"])
        trail.set_data(path[:, 0], path[:, 1])
        here.set_data([theta_k[0]], [theta_k[1]])
        ax_zoom.clear()
        xs = np.linspace(theta_k[0] - half, theta_k[0] + half, 50)
        ys = np.linspace(theta_k[1] - half, theta_k[1] + half, 50)
        grid = torch.tensor(np.stack(np.meshgrid(xs, ys), -1))
        ax_zoom.contourf(xs, ys, np.log1p(land.value(grid).numpy()), levels=12, cmap="Greys_r", alpha=0.6)
        ax_zoom.scatter(pop[:, 0], pop[:, 1], c=z.numpy(), cmap="coolwarm", vmin=-2, vmax=2, s=60,
                        edgecolor="black", lw=0.5)
        ax_zoom.plot(*theta_k, "o", color="black", ms=6)
        shown = direction / max(np.linalg.norm(direction), 1e-12) * half * 0.7
        ax_zoom.annotate("", xy=theta_k + shown, xytext=theta_k, arrowprops=dict(color="black", width=1.5, headwidth=7))
        ax_zoom.set_xlim(xs[0], xs[-1])
        ax_zoom.set_ylim(ys[0], ys[-1])
        ax_zoom.set_aspect("equal")
        ax_zoom.set_xticks([])
        ax_zoom.set_yticks([])
        width = land.xlim[1] - land.xlim[0]
        ax_zoom.set_title(f"zoom x{width / (2 * half):.0f}, iteration {snap['iteration']}: "
                          f"f = {float(land.value(torch.as_tensor(snap['theta']))):.3g}", fontsize=9)
        return [trail, here]

    fig.tight_layout()
    anim = animation.FuncAnimation(fig, draw_frame, frames=len(snapshots), interval=interval, blit=False)
    with plt.rc_context({"animation.frame_format": "jpeg" if jpeg else "png"}):  # JPEG: about half the size of PNG
        html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return html
