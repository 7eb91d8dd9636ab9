"""The loss curve of a knowledge-module run (train and dev loss vs step) as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence


def loss_curve_png(losses: Sequence[float], dev_losses: Sequence[Sequence[float]], title: str = "") -> bytes:
    """Train loss per step and dev loss at its evaluation steps, drawn without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(range(1, len(losses) + 1), list(losses), label="train", linewidth=1)
    if dev_losses:
        axes.plot([p[0] for p in dev_losses], [p[1] for p in dev_losses], "o-", label="dev")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
