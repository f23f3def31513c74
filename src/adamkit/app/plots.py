"""``curves.png``: accuracy and loss per epoch, train and test, one colour per optimizer.

Renders with matplotlib's Agg backend through the object-oriented ``Figure`` API (no display
needed, pyplot's global state and backend untouched) at a fixed size: :data:`FIGSIZE` inches at
:data:`DPI`, i.e. :data:`PIXELS` = (width, height) pixels.  Written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from adamkit.app.files import atomic_write
from adamkit.app.loop import EpochRecord

__all__ = ["DPI", "FIGSIZE", "PIXELS", "plot_curves"]

FIGSIZE = (10.0, 4.0)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def plot_curves(
    histories: Mapping[str, Sequence[EpochRecord]],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """Draw accuracy (left) and loss (right) per epoch for each run in ``histories``.

    ``histories`` maps a label (the optimizer's name) to its epoch records.  Test curves are
    solid, train curves dashed, in the same colour.  The PNG is :data:`PIXELS` in size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    acc_ax, loss_ax = figure.subplots(1, 2)
    for index, (label, records) in enumerate(histories.items()):
        color = f"C{index % 10}"
        epochs = [r.epoch for r in records]
        acc_ax.plot(
            epochs, [r.test_acc for r in records], "-o", ms=3, color=color, label=f"{label} test"
        )
        acc_ax.plot(
            epochs, [r.train_acc for r in records], "--", color=color, label=f"{label} train"
        )
        loss_ax.plot(
            epochs, [r.test_loss for r in records], "-o", ms=3, color=color, label=f"{label} test"
        )
        loss_ax.plot(
            epochs, [r.train_loss for r in records], "--", color=color, label=f"{label} train"
        )
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=DPI)
