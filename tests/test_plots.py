"""esnb.plots helpers that return something to check (most of plots.py only draws)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from esnb import ESConfig, get_landscape  # noqa: E402
from esnb.landscapes import run_es  # noqa: E402
from esnb.plots import population_animation  # noqa: E402


def test_population_animation_is_html_with_one_frame_per_snapshot() -> None:
    land = get_landscape("rosenbrock")
    run = run_es(land, ESConfig(population_size=6, sigma=0.05, alpha=0.05, seed=0), 5, snapshot_at=(0, 2, 4))
    before = plt.get_fignums()
    html = population_animation(land, run["snapshots"], sigma=0.05, dpi=20)
    assert html.count("frames[") >= 3  # to_jshtml embeds one frame per snapshot
    assert "image/jpeg" in html
    assert plt.get_fignums() == before  # the figure is closed, nothing left to show twice
