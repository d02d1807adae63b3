"""The slider panels without a browser (tests/test_browser.py drives them in JupyterLab)."""
import base64
import io
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("ipywidgets")
from esnb import plots, widgets  # noqa: E402


def _images(outputs) -> list[np.ndarray]:
    return [plt.imread(io.BytesIO(base64.b64decode(o["data"]["image/png"])), format="png")
            for o in outputs if "image/png" in o.get("data", {})]


def _two_figures(sigma, alpha, population_size, iterations, landscape, shaping, antithetic=False):
    # like notebook 01's draw: plt.show() between the two figures
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, sigma])
    plt.show()
    plots.learning_curves({"f": np.linspace(1, 0.1, iterations)}, logy=True)


def _controls(box) -> dict:
    found = {}

    def walk(wd):
        for c in getattr(wd, "children", ()):
            walk(c)
        if hasattr(wd, "description") and hasattr(wd, "value"):
            found[wd.description] = wd
    walk(box)
    return found


def _output(box):
    import ipywidgets as w
    return next(c for c in box.children if isinstance(c, w.Output))


@pytest.fixture(autouse=True)
def _quiet_display():
    with mock.patch("IPython.display.display") as d:
        yield d
    plt.close("all")


def test_every_figure_reaches_the_panel_and_none_is_left_open():
    box = widgets.es2d_panel(_two_figures, ["sphere"], population_size=20, iterations=40, antithetic=False)
    imgs = _images(_output(box).outputs)
    assert len(imgs) == 2
    assert all(np.ptp(im[..., :3]) > 0 for im in imgs)  # not a single colour
    assert plt.get_fignums() == []
    before = _output(box).outputs
    _controls(box)["sigma"].value = 0.5  # a redraw replaces both figures
    after = _output(box).outputs
    assert len(_images(after)) == 2 and after[0]["data"]["image/png"] != before[0]["data"]["image/png"]


def test_slider_ranges_contain_the_values_given():
    box = widgets.es2d_panel(_two_figures, ["sphere"], sigma=3.0, alpha=1e-4, iterations=400, antithetic=False)
    c = _controls(box)
    assert c["iterations"].value == 400 and c["iterations"].max >= 400
    assert c["sigma"].value == pytest.approx(3.0) and c["alpha"].value == pytest.approx(1e-4)
    panel = widgets.finetune_panel(lambda **kw: None, population_size=96, iterations=150)
    c = _controls(panel)
    assert c["N"].value == 96 and c["iterations"].value == 150


def test_antithetic_is_a_visible_choice_with_odd_n_allowed_without_it():
    box = widgets.es2d_panel(_two_figures, ["sphere"], population_size=21, iterations=10, antithetic=False)
    c = _controls(box)
    assert c["N"].value == 21 and c["N"].step == 1
    tick = c["antithetic pairs (N even)"]
    tick.value = True
    assert c["N"].value % 2 == 0 and c["N"].step == 2


def test_antithetic_is_passed_to_the_run_and_refused_when_the_run_ignores_it():
    seen = {}

    def run(sigma, alpha, population_size, iterations, antithetic):
        seen.update(antithetic=antithetic, population_size=population_size)
        plots.finetune_curves(mock.Mock(log=_one_row(), evals=_no_rows()))

    box = widgets.finetune_panel(run, population_size=32, iterations=1, antithetic=True)
    assert seen == {}  # not live: nothing runs until Run
    next(c for c in box.children[-2].children if getattr(c, "description", "") == "Run").click()
    assert seen == {"antithetic": True, "population_size": 32}
    with pytest.raises(TypeError, match="antithetic"):
        widgets.finetune_panel(lambda sigma, alpha, population_size, iterations: None, antithetic=True)


def _one_row():
    import pandas as pd
    return pd.DataFrame({"iteration": [0], "reward_mean": [0.5], "reward_min": [0.1], "reward_max": [0.9]})


def _no_rows():
    import pandas as pd
    return pd.DataFrame({"iteration": [], "test_accuracy": []})


def test_a_one_iteration_curve_draws_a_visible_point():
    axes = plots.finetune_curves(mock.Mock(log=_one_row(), evals=_no_rows()))
    assert axes[0].get_lines()[0].get_marker() not in (None, "", "None")
    ax = plots.learning_curves({"f": [3.0]})
    assert ax.get_lines()[0].get_marker() not in (None, "", "None")


def test_a_runaway_setting_shows_one_line_instead_of_figures():
    from esnb.es import ESConfig
    from esnb.landscapes import get_landscape, run_es

    def draw(sigma, alpha, population_size, iterations, landscape, shaping, antithetic):
        r = run_es(get_landscape(landscape), ESConfig(population_size=population_size, sigma=sigma, alpha=alpha,
                                                      shaping=shaping, antithetic=antithetic, seed=0), iterations)
        plots.learning_curves({"f": r["values"]}, logy=True)

    box = widgets.es2d_panel(draw, ["rosenbrock"], sigma=0.3, alpha=0.2, iterations=5, antithetic=False)
    assert len(_images(_output(box).outputs)) == 1
    _controls(box)["shaping"].value = "raw"
    (out,) = _output(box).outputs
    assert "image/png" not in out["data"] and out["data"]["text/plain"].startswith("diverged")
    assert "\n" not in out["data"]["text/plain"]


def test_a_failing_draw_shows_one_line_and_the_static_copy_comes_first(_quiet_display):
    def draw(sigma, alpha, population_size, iterations, hidden, dataset):
        if dataset == "bad":
            raise ValueError("no such data\nsecond line")
        plt.subplots()

    box = widgets.mlp_panel(draw, ["ok", "bad"])
    shown = [call.args[0] for call in _quiet_display.call_args_list]
    assert any(isinstance(s, dict) and "image/png" in s for s in shown[:-1])  # the static figure
    assert "application/vnd.jupyter.widget-view+json" in shown[-1]  # then the widget
    assert "VBox" not in shown[-1]["text/plain"]
    _controls(box)["data"].value = "bad"
    (out,) = _output(box).outputs
    assert out["data"]["text/plain"] == "this setting failed: ValueError: no such data"
