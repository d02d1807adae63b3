"""ipywidgets panels: sliders that re-run a small experiment and redraw its figures.

Each panel takes a plain function ``draw(**values)`` that makes its figures with matplotlib, so
every figure the panel shows can also be drawn without widgets (papermill and nbval see no
widgets). The panel, not the draw function, puts the figures on screen:

- it draws with matplotlib's interactive mode off and ``plt.show`` intercepted, then renders each
  new figure to a PNG, closes it, and sets the Output widget's ``outputs`` in one assignment. It
  never relies on the Output widget capturing messages or on the inline backend's post-execute
  flush: JupyterLab 4.6 handles widget messages on a kernel subshell, where another request's
  flush can draw and close a figure that a redraw still has open (the second figure then came out
  blank, issue 15);
- a draw function may raise :class:`PanelMessage` (or return a string) to show one line instead of
  figures, and a panel may pass ``check`` to turn runaway figures into such a line;
- ``panel`` also displays the figures of its initial settings as ordinary outputs above the
  controls: widget state is not saved in the notebooks, so this static copy is what a reader of a
  static render (GitHub, nbviewer, a notebook opened without a kernel) sees.
"""
from __future__ import annotations

import base64
import html
import inspect
import io
import math
from typing import Callable

# Lines whose values pass this (or are not finite) mean the run ran away: theta left the plotted
# window by orders of magnitude (notebook 01's landscapes stay below ~1e4 inside their windows).
RUNAWAY_ABOVE = 1e10


class PanelMessage(Exception):
    """Raised by a panel's draw function to show its message (one line) instead of figures."""


def log_slider(description: str, value: float, low_exp: float, high_exp: float, step: float = 0.25):
    """A base-10 log slider from ``10**low_exp`` to ``10**high_exp``, widened to contain ``value``."""
    import ipywidgets as w

    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{description} must be a positive number for a log slider, got {value!r}")
    e = math.log10(value)
    low_exp, high_exp = min(low_exp, math.floor(e)), max(high_exp, math.ceil(e))
    return w.FloatLogSlider(value=value, base=10, min=low_exp, max=high_exp, step=step, description=description,
                            continuous_update=False, readout_format=".1e")


def int_slider(description: str, value: int, low: int, high: int, step: int = 1):
    """An integer slider from ``low`` to ``high``, widened (in whole steps) to contain ``value``."""
    import ipywidgets as w

    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{description} must be an int, got {value!r}")
    low = min(low, value)
    if value > high:
        high = low + math.ceil((value - low) / step) * step
    return w.IntSlider(value=value, min=low, max=high, step=step, description=description, continuous_update=False)


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


def _png_output(fig) -> dict:
    """A display_data output (as the Output widget stores it) holding ``fig`` as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}}


def _message_output(text: str) -> dict:
    """A display_data output holding one line of text (bold in HTML)."""
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/plain": text, "text/html": f"<p><b>{html.escape(text)}</b></p>"}}


def render(draw: Callable[..., object], values: dict, check: Callable[[list], str | None] | None = None) -> list[dict]:
    """Call ``draw(**values)`` and return the outputs to show: one PNG per figure it made, in order,
    or a single line of text when the draw raised (:class:`PanelMessage` or any error), returned a
    string, or ``check(figures)`` returned one. Every figure made is closed."""
    import matplotlib.pyplot as plt
    from matplotlib._pylab_helpers import Gcf

    before = set(plt.get_fignums())
    shown: list = []

    def collect(*_, **__) -> None:
        # plt.show() inside draw: keep the figures made so far (in order) instead of letting the
        # inline backend display them outside the panel and close them
        for manager in sorted(Gcf.get_all_fig_managers(), key=lambda m: m.num):
            fig = manager.canvas.figure
            if manager.num not in before and fig not in shown:
                shown.append(fig)

    message, result, real_show = None, None, plt.show
    plt.show = collect
    try:
        with plt.ioff():  # no draw-if-interactive: nothing else may flush (and close) our figures
            result = draw(**values)
    except PanelMessage as e:
        message = str(e)
    except Exception as e:  # a person moving a slider gets one line, not a traceback
        message = f"this setting failed: {type(e).__name__}: {e}".splitlines()[0]
    finally:
        plt.show = real_show
        collect()
    figures = [f for f in shown if plt.fignum_exists(f.number)]
    if message is None and isinstance(result, str):
        message = result
    if message is None and check is not None:
        message = check(figures)
    try:
        return [_message_output(message)] if message is not None else [_png_output(f) for f in figures]
    finally:
        for f in shown:
            plt.close(f)


def runaway_check(figures: list, above: float = RUNAWAY_ABOVE) -> str | None:
    """A ``check`` for :func:`panel`: a line when any plotted line holds a non-finite value or one
    beyond ``above`` in size (the run diverged), else None."""
    import numpy as np

    worst = 0.0
    for fig in figures:
        for ax in fig.axes:
            for line in ax.get_lines():
                y = np.asarray(line.get_ydata(), dtype=float)
                if y.size and not np.isfinite(y).all():
                    return "diverged: the run reached inf/NaN (try a smaller alpha or sigma, or zscore shaping)"
                if y.size:
                    worst = max(worst, float(np.abs(y).max()))
    if worst > above:
        return f"diverged: a plotted value reached {worst:.1e} (try a smaller alpha or sigma, or zscore shaping)"
    return None


def panel(draw: Callable[..., object], controls: dict, title: str = "", live: bool = True,
          check: Callable[[list], str | None] | None = None, static: bool = True) -> "object":
    """A box of controls above an output area; changing a control calls ``draw(**values)`` and shows
    its figures (see :func:`render`).

    Drawing only happens on release (``continuous_update=False``), so a slider drag never queues
    dozens of re-runs. With ``live=False`` (slow experiments) nothing runs until Run is clicked.
    With ``static`` (and ``live``), the figures of the initial settings are also displayed as
    ordinary outputs above the panel, so a static render of the notebook shows them; a panel that
    is not live displays one line naming its controls instead.
    """
    import ipywidgets as w
    from IPython.display import HTML, display

    out = w.Output()
    status = w.HTML("")
    button = w.Button(description="Run", button_style="primary", icon="play")
    names = list(controls)

    def redraw(*_) -> list[dict]:
        button.disabled = True
        status.value = "<i>running...</i>" if live else "<i>running (this takes a while; figures appear when done)...</i>"
        try:
            outputs = render(draw, {name: controls[name].value for name in names}, check)
            out.outputs = tuple(outputs)  # one assignment: the old figures are replaced, never cleared first
        finally:
            status.value = ""
            button.disabled = False
        return outputs

    button.on_click(redraw)
    if live:
        for c in controls.values():
            c.observe(redraw, names="value")
    header = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
    row1, row2 = list(controls.values())[:3], list(controls.values())[3:]
    box = w.VBox(header + [w.HBox(row1), w.HBox(row2 + [button, status]), out])
    settings = ", ".join(f"{n}={_fmt(c.value)}" for n, c in controls.items())
    if live:
        first = redraw()
        if static:
            display(HTML(f"<p><i>{html.escape(title or 'Panel')} at its initial settings ({html.escape(settings)}); "
                         "the live panel below redraws when you move a control (needs a running kernel).</i></p>"))
            for o in first:
                display(o["data"], raw=True)
    elif static:
        display(HTML(f"<p><i>{html.escape(title or 'Panel')}: controls {html.escape(settings)}; "
                     "click Run in the live panel below (needs a running kernel).</i></p>"))
    # The widget's own text form replaces "VBox(children=...)" where no widget can be shown.
    bundle = box._repr_mimebundle_()
    bundle["text/plain"] = f"[interactive panel: {title or 'controls'}; run the notebook to use it]"
    display(bundle, raw=True)
    return box


def _fmt(v) -> str:
    return f"{v:.2g}" if isinstance(v, float) else str(v)


def _pairs_control(population: "object", antithetic: bool) -> "object":
    """A checkbox for antithetic (mirrored) pairs that keeps the N slider even while it is ticked."""
    import ipywidgets as w

    box = w.Checkbox(value=antithetic, description="antithetic pairs (N even)", indent=False)

    def sync(*_) -> None:
        population.step = 2 if box.value else 1
        if box.value and population.value % 2:
            up = population.value + 1
            population.value = up if up <= population.max else population.value - 1
    sync()
    box.observe(sync, names="value")
    return box


def _population_controls(draw: Callable, population_size: int, high: int, antithetic: bool | None,
                         argument: str) -> dict:
    """The N slider, plus the antithetic checkbox when ``draw`` takes ``antithetic``."""
    if antithetic is not None and not isinstance(antithetic, bool):
        raise TypeError(f"antithetic must be True, False or None, got {antithetic!r}")
    takes = _accepts(draw, "antithetic")
    if antithetic is not None and not takes:
        raise TypeError(f"{argument} must accept an `antithetic` keyword to honour antithetic={antithetic}")
    if not takes:
        # the draw function decides the pairing itself: keep the slider's old even-only steps and say so
        return {"population_size": int_slider("N (even)", population_size, 2, high, 2)}
    n = int_slider("N", population_size, 2, high, 1)
    return {"population_size": n, "antithetic": _pairs_control(n, bool(antithetic))}


def es2d_panel(draw: Callable[..., object], landscapes: list[str], sigma: float = 0.3, alpha: float = 0.1,
               population_size: int = 20, iterations: int = 60, antithetic: bool | None = None) -> "object":
    """Sliders for sigma, alpha, N, iterations and dropdowns for landscape and shaping (notebook 01).

    When ``draw`` takes an ``antithetic`` keyword the panel adds a checkbox for it (ticked when
    ``antithetic=True``) and N moves in steps of 1, or 2 while the box is ticked. A run whose
    curve runs away (beyond :data:`RUNAWAY_ABOVE`, e.g. raw shaping on Rosenbrock at large sigma)
    shows one line instead of its figures. Slider ranges widen to contain the values given.
    """
    import ipywidgets as w

    controls = {
        "sigma": log_slider("sigma", sigma, -3, 0),
        "alpha": log_slider("alpha", alpha, -3, 0),
        **_population_controls(draw, population_size, 200, antithetic, "draw"),
        "iterations": int_slider("iterations", iterations, 5, 300, 5),
        "landscape": w.Dropdown(options=landscapes, value=landscapes[0], description="landscape"),
        "shaping": w.Dropdown(options=["zscore", "centered_rank", "raw"], value="zscore", description="shaping"),
    }
    return panel(draw, controls, title="ES on a 2-D landscape", check=runaway_check)


def mlp_panel(draw: Callable[..., object], datasets: list[str], sigma: float = 0.05, alpha: float = 0.03,
              population_size: int = 50, iterations: int = 150, hidden: int = 32) -> "object":
    """Sliders for sigma, alpha, N, iterations, hidden width and a data set dropdown (notebook 02).
    Slider ranges widen to contain the values given."""
    import ipywidgets as w

    controls = {
        "sigma": log_slider("sigma", sigma, -3, 0),
        "alpha": log_slider("alpha", alpha, -3, 0),
        "population_size": int_slider("N", population_size, 2, 200, 2),
        "iterations": int_slider("iterations", iterations, 10, 600, 10),
        "hidden": int_slider("hidden", hidden, 4, 128, 4),
        "dataset": w.Dropdown(options=datasets, value=datasets[0], description="data"),
    }
    return panel(draw, controls, title="ES trains an MLP")


def finetune_panel(run: Callable[..., object], sigma: float = 3e-3, alpha: float = 6e-3, population_size: int = 16,
                   iterations: int = 10, antithetic: bool | None = None) -> "object":
    """Sliders for sigma, alpha, N and iterations of an ES fine-tuning run (notebook 05).

    A run takes minutes, so nothing happens until the Run button is clicked; then
    ``run(sigma=..., alpha=..., population_size=..., iterations=...)`` draws its figures into the
    output area. Pass the notebook's ``antithetic`` setting: ``run`` must then take an
    ``antithetic`` keyword, which the panel's checkbox sets (ticked as given), so the panel runs the
    same algorithm as the notebook. Slider ranges widen to contain the values given.
    """
    controls = {
        "sigma": log_slider("sigma", sigma, -4, -1),
        "alpha": log_slider("alpha", alpha, -4, -1),
        **_population_controls(run, population_size, 64, antithetic, "run"),
        "iterations": int_slider("iterations", iterations, 1, 100, 1),
    }
    return panel(run, controls, title="ES fine-tuning: pick the knobs, then Run", live=False)
