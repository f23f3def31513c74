"""``curves.png``: accuracy and loss per epoch, train and test, one colour per optimizer.

Renders with matplotlib's Agg backend through the object-oriented ``Figure`` API (no display
needed, pyplot's global state and backend untouched) at a fixed size: :data:`FIGSIZE` inches at
:data:`DPI`, i.e. :data:`PIXELS` = (width, height) pixels.  Written atomically.

When a run has a stability guard (its records carry guard diagnostics, see
:class:`~adamkit.app.loop.EpochRecord`), a third panel shows the gradient norm per epoch (mean
solid, maximum dotted, log scale) with a red cross on epochs that skipped steps and a black
triangle on epochs that rolled back, each labelled with its count.  The picture keeps its size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from adamkit.app.files import atomic_write
from adamkit.app.loop import EpochRecord

__all__ = ["DPI", "FIGSIZE", "PIXELS", "has_guard", "plot_curves"]

FIGSIZE = (10.0, 4.0)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def has_guard(records: Sequence[EpochRecord]) -> bool:
    """Whether any record carries guard diagnostics (the run's optimizer had a guard)."""
    return any(r.skipped_nonfinite is not None for r in records)


def plot_curves(
    histories: Mapping[str, Sequence[EpochRecord]],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """Draw accuracy (left) and loss (right) per epoch for each run in ``histories``, and the
    guard panel (see the module docstring) when any run has a guard.

    ``histories`` maps a label (the optimizer's name) to its epoch records.  Test curves are
    solid, train curves dashed, in the same colour.  The PNG is :data:`PIXELS` in size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    guarded = any(has_guard(records) for records in histories.values())
    axes = figure.subplots(1, 3 if guarded else 2)
    acc_ax, loss_ax = axes[0], axes[1]
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
        if guarded and has_guard(records):
            _guard_panel(axes[2], label, records, color)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    if guarded:
        axes[2].set(
            xlabel="epoch", ylabel="L2 norm (mean; max dotted)", title="guard: gradient norm"
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=DPI)


def _guard_panel(ax: Any, label: str, records: Sequence[EpochRecord], color: str) -> None:
    measured = [r for r in records if r.grad_norm is not None and r.grad_norm > 0.0]
    if measured:
        ax.set_yscale("log")
        epochs = [r.epoch for r in measured]
        ax.plot(epochs, [r.grad_norm for r in measured], "-o", ms=3, color=color, label=label)
        ax.plot(epochs, [r.grad_norm_max for r in measured], ":", color=color)
    events = (
        ("x", "red", "skipped", lambda r: (r.skipped_nonfinite or 0) + (r.skipped_loss_spike or 0)),
        ("v", "black", "rolled back", lambda r: r.rollbacks or 0),
    )
    for marker, mark_color, what, count in events:
        hits = [r for r in records if count(r) > 0]
        if not hits:
            continue
        # Epochs whose every step was skipped have no norm: mark them at the panel's bottom.
        floor = min((r.grad_norm for r in measured), default=1.0)
        ys = [r.grad_norm if r.grad_norm else floor for r in hits]
        ax.scatter(
            [r.epoch for r in hits],
            ys,
            marker=marker,
            color=mark_color,
            zorder=3,
            label=f"{label} {what}",
        )
        for r, y in zip(hits, ys, strict=True):
            ax.annotate(
                str(count(r)),
                (r.epoch, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
                color=mark_color,
            )
