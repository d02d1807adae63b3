"""ipywidgets panels: sliders that re-run a small experiment and redraw its figure.

Each panel takes a plain function ``draw(**values)`` that makes its figure, so every figure
the panel shows can also be drawn without widgets (papermill and nbval see no widgets).
"""
from __future__ import annotations

from typing import Callable


def log_slider(description: str, value: float, low_exp: int, high_exp: int, step: float = 0.25):
    import ipywidgets as w

    return w.FloatLogSlider(value=value, base=10, min=low_exp, max=high_exp, step=step, description=description,
                            continuous_update=False, readout_format=".1e")


def panel(draw: Callable[..., None], controls: dict, title: str = "", live: bool = True) -> "object":
    """A box of controls above an output area; changing a control calls ``draw(**values)``.

    Drawing only happens on release (``continuous_update=False``), so a slider drag never queues
    dozens of re-runs. With ``live=False`` (slow experiments) nothing runs until Run is clicked.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    out = w.Output()
    button = w.Button(description="Run", button_style="primary", icon="play")

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            draw(**{name: c.value for name, c in controls.items()})
            plt.show()

    button.on_click(redraw)
    if live:
        for c in controls.values():
            c.observe(redraw, names="value")
    header = [w.HTML(f"<b>{title}</b>")] if title else []
    box = w.VBox(header + [w.HBox(list(controls.values())[:3]), w.HBox(list(controls.values())[3:] + [button]), out])
    if live:
        redraw()
    display(box)
    return box


def es2d_panel(draw: Callable[..., None], landscapes: list[str], sigma: float = 0.3, alpha: float = 0.1,
               population_size: int = 20, iterations: int = 60) -> "object":
    """Sliders for sigma, alpha, N, iterations and dropdowns for landscape and shaping (notebook 01)."""
    import ipywidgets as w

    controls = {
        "sigma": log_slider("sigma", sigma, -3, 0),
        "alpha": log_slider("alpha", alpha, -3, 0),
        "population_size": w.IntSlider(value=population_size, min=2, max=200, step=2, description="N", continuous_update=False),
        "iterations": w.IntSlider(value=iterations, min=5, max=300, step=5, description="iterations", continuous_update=False),
        "landscape": w.Dropdown(options=landscapes, value=landscapes[0], description="landscape"),
        "shaping": w.Dropdown(options=["zscore", "centered_rank", "raw"], value="zscore", description="shaping"),
    }
    return panel(draw, controls, title="ES on a 2-D landscape")


def mlp_panel(draw: Callable[..., None], datasets: list[str], sigma: float = 0.05, alpha: float = 0.03,
              population_size: int = 50, iterations: int = 150, hidden: int = 32) -> "object":
    """Sliders for sigma, alpha, N, iterations, hidden width and a data set dropdown (notebook 02)."""
    import ipywidgets as w

    controls = {
        "sigma": log_slider("sigma", sigma, -3, 0),
        "alpha": log_slider("alpha", alpha, -3, 0),
        "population_size": w.IntSlider(value=population_size, min=2, max=200, step=2, description="N", continuous_update=False),
        "iterations": w.IntSlider(value=iterations, min=10, max=600, step=10, description="iterations", continuous_update=False),
        "hidden": w.IntSlider(value=hidden, min=4, max=128, step=4, description="hidden", continuous_update=False),
        "dataset": w.Dropdown(options=datasets, value=datasets[0], description="data"),
    }
    return panel(draw, controls, title="ES trains an MLP")


def finetune_panel(run: Callable[..., None], sigma: float = 3e-3, alpha: float = 6e-3, population_size: int = 16,
                   iterations: int = 10) -> "object":
    """Sliders for sigma, alpha, N and iterations of an ES fine-tuning run (notebook 05).

    A run takes minutes, so nothing happens until the Run button is clicked; then
    ``run(sigma=..., alpha=..., population_size=..., iterations=...)`` draws into the output area.
    """
    import ipywidgets as w

    controls = {
        "sigma": log_slider("sigma", sigma, -4, -1),
        "alpha": log_slider("alpha", alpha, -4, -1),
        "population_size": w.IntSlider(value=population_size, min=2, max=64, step=2, description="N", continuous_update=False),
        "iterations": w.IntSlider(value=iterations, min=1, max=100, step=1, description="iterations", continuous_update=False),
    }
    return panel(run, controls, title="ES fine-tuning: pick the knobs, then Run", live=False)
