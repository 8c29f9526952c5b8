"""An ipywidgets panel bound to a notebook's parameters, for tweaking and re-running a step.

The panel is built from the same names and defaults as the ``parameters`` cell, so what a
learner changes by hand is what papermill changes with ``-p``. Building and displaying it
never blocks: the step runs only when the button is pressed, so papermill runs pass straight
through.

Example:
    >>> panel = parameter_panel({"lora_r": 8, "learning_rate": 2e-4, "use_qlora": True},
    ...                         run=lambda values: print(values),
    ...                         choices={"lora_r": [4, 8, 16, 32]})
    >>> [w.description for w in panel.children[0].children]
    ['lora_r', 'learning_rate', 'use_qlora']
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from contextlib import contextmanager

import ipywidgets as w
from IPython.display import display

_panel_running: list = []   # non-empty while a panel's button runs its step (see ``live_figure``)


def _widget_for(name: str, value, choices: dict, ranges: dict):
    kw = dict(value=value, description=name, style={"description_width": "initial"})
    wide = dict(kw, layout=w.Layout(width="420px"))
    if name in choices:
        return w.Dropdown(options=list(choices[name]), **wide)
    if isinstance(value, bool):
        return w.Checkbox(**kw)
    if isinstance(value, int):
        lo, hi, step = ranges.get(name, (0 if value == 0 else 1, max(4 * value, 10), 1))
        return w.IntSlider(min=lo, max=hi, step=step, **wide)
    if isinstance(value, float):
        if name in ranges:
            lo, hi, step = ranges[name]
            return w.FloatSlider(min=lo, max=hi, step=step, readout_format=".3g", **wide)
        if 0 < value < 0.01:  # learning rates and the like: a log scale
            exp = math.floor(math.log10(value))
            return w.FloatLogSlider(base=10, min=exp - 2, max=exp + 2, step=0.1, readout_format=".1e", **wide)
        return w.FloatSlider(min=0.0, max=max(1.0, 4 * value), step=0.01, **wide)
    return w.Text(**dict(wide, value=str(value)))


def parameter_panel(params: dict, run: Callable[[dict], object], *, choices: dict | None = None,
                    ranges: dict | None = None, button: str = "Run"):
    """A VBox of one control per parameter, a button that calls ``run(values)``, and its output area.

    ``choices`` maps a name to the options of a dropdown; ``ranges`` maps a number to
    ``(min, max, step)``. Returns the panel; ``panel.values()`` reads the current values.
    """
    choices, ranges = choices or {}, ranges or {}
    controls = {name: _widget_for(name, value, choices, ranges) for name, value in params.items()}
    go = w.Button(description=button, button_style="primary", icon="play")
    out = w.Output()

    def values() -> dict:
        return {name: type(params[name])(c.value) if params[name] is not None else c.value
                for name, c in controls.items()}

    def on_click(_):
        out.clear_output()
        with out, _running():
            run(values())

    go.on_click(on_click)
    panel = w.VBox([w.VBox(list(controls.values())), go, out])
    panel.values = values
    panel.click = lambda: on_click(None)
    return panel


@contextmanager
def _running():
    _panel_running.append(True)
    try:
        yield
    finally:
        _panel_running.pop()


class LiveFigure:
    """A matplotlib figure shown once and redrawn in place: ``LiveFigure().show(fig)`` on every update.

    In a cell (and under papermill) it is a display with an id, updated in place, so the saved
    notebook holds the last figure. Under a panel's button the run's output goes to an ipywidgets
    ``Output``, which ignores display updates: there the figure is an ``Image`` widget whose value
    is replaced, so the learner sees it redraw.
    """

    def __init__(self):
        self._handle, self._image = None, None

    def show(self, fig) -> None:
        if self._image is None and self._handle is None and _panel_running:
            self._image = w.Image(format="png")
            display(self._image)
        if self._image is not None:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=fig.dpi)
            self._image.value = buffer.getvalue()
        elif self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
