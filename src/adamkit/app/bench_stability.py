"""``adamkit bench stability``: what the stability guard buys, on real training runs.

Three parts (``--parts``), each printed as it finishes and written to ``--out``:

``sweep``
    Learning rates ``--lrs`` (default 9 values, 1e-4 to 1, half a decade apart) x ``--seeds``
    seeds x models (``mlp``: the app's 784-128-10 MLP; ``cnn``: conv 8 -> pool -> conv 16 -> pool
    -> linear, 14k parameters) x parameter dtypes (``fp32``, ``bf16``) x optimizers
    (``torch-adam``: ``torch.optim.Adam``; ``adamkit-all``: ``adamkit.torch.Adam(guard="all")``),
    ``--epochs`` epochs of batch ``--batch-size`` on Fashion-MNIST through the app's
    :class:`~adamkit.app.loop.Trainer`.  The MLP trains on all 60,000 images; the CNN, 25x more
    expensive per image on a CPU, on the first ``--cnn-train`` (10,000) images of a fixed shuffle
    (seed 0, the same for every run).  Both are tested on the full 10,000 test images.

    Per run: the test loss of the initial weights, the final test loss and accuracy.  A run is
    **NaN** when its final loss or any parameter is not finite, **diverged** when it is NaN or its
    final test loss is above its initial one.  Per setting (model, dtype, optimizer) and lr the
    accuracy is the mean over seeds; the **usable band** is the contiguous range of lrs around the
    best one whose mean accuracy is at least 95% of the best (``--band``), and its **width** the
    ratio of its ends (``3e-4..3e-2`` is 100x).  At lr 1e-3 the guard's mean accuracy is
    compared with torch's, with each setting's seed standard deviation and the per-seed
    differences (a seed fixes the initial weights and the batch order, so they are paired).
    ``--baseline FILE`` reuses the ``torch-adam`` runs of an earlier ``stability.json`` (same
    grid, epochs, batch size and CNN subset) instead of training them again: they do not depend
    on adamkit and repeat exactly (as do the fault-injection runs of ``torch-adam`` and the
    default guard, also reused).  ``--merge A.json B.json ...`` combines the files of runs
    split by ``--models``/``--parts`` (and ``--tag``) into one, summarized and plotted again.
    Drawn as a heatmap (``stability_sweep.png``:
    lr x setting, colour = mean final accuracy, band outlined, cells with a diverged run crossed).

``faults``
    The MLP at lr 1e-3 (fp32 and bf16 parameters, every seed) with faults injected by
    :class:`FaultyModel`: NaN gradients at steps 50 and 150, Inf gradients at 250, inputs x1000
    at steps 100 and 300, labels shuffled within the batch at steps 200 and 201.  Compared: the
    clean run and the faulted run of ``torch.optim.Adam``, adamkit's default guard (non-finite
    skip only) and ``guard="all"``.

``overhead``
    Step time with nothing wrong at 10M parameters (ten 1000x1000 matrices and their biases),
    ``adamkit.torch.Adam`` with ``guard=False``, the default guard and ``guard="all"``, and
    ``torch.optim.Adam`` (default and fused): interleaved rounds, medians; and the whole
    training step (forward, backward, step) of a 10M-parameter MLP at batch 256 without and
    with the default guard.

Results: ``--out`` (default ``bench-results``) gets ``stability.json`` (every run, every timing,
the summaries) and ``stability_sweep.png``.  ``--quick``: one seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamkit.app.bench_common import (
    IMAGE_MODELS,
    SweepData,
    build_model,
    csv_choice,
    first_below_one,
    interleaved_times,
    load_fashion,
    machine_info,
    set_threads,
    subset,
    torch_dtype,
)

__all__ = [
    "DEFAULT_LRS",
    "FaultyModel",
    "RunResult",
    "SweepData",
    "build_model",
    "configure_parser",
    "fault_injection",
    "guard_overhead",
    "load_baseline_faults",
    "load_baseline_runs",
    "load_fashion",
    "lr_sweep",
    "merge_documents",
    "plot_sweep",
    "run",
    "summarize_sweep",
    "train_run",
]

#: 1e-4 to 1, half a decade apart (rounded to 1-3 steps, as lr grids usually are).
DEFAULT_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
MODELS: tuple[str, ...] = IMAGE_MODELS
DTYPES: tuple[str, ...] = ("fp32", "bf16")
OPTIMIZERS: tuple[str, ...] = ("torch-adam", "adamkit-default", "adamkit-all")
SWEEP_OPTIMIZERS: tuple[str, ...] = ("torch-adam", "adamkit-all")
PARTS: tuple[str, ...] = ("sweep", "faults", "overhead")
REFERENCE_LR = 1e-3
FORMAT = "adamkit.bench-stability"


@dataclass
class RunResult:
    """One training run.  ``acc``/``loss``: final test accuracy and loss; ``initial_loss``: test
    loss of the initial weights; ``nan``/``diverged`` as in the module docstring; ``guard``: the
    guard's cumulative counters (empty without a guard)."""

    model: str
    dtype: str
    optimizer: str
    lr: float
    seed: int
    initial_loss: float
    loss: float
    acc: float
    nan: bool
    diverged: bool
    seconds: float
    steps: int
    faults: str = ""
    guard: dict[str, int] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        """``"model dtype optimizer"``."""
        return f"{self.model} {self.dtype} {self.optimizer}"


# ---------------------------------------------------------------- data, models, optimizers


def make_optimizer(name: str, params: Iterable[Any], lr: float, guard_all: Any = "all") -> Any:
    """``torch-adam``, ``adamkit-default`` (non-finite skip) or ``adamkit-all`` (``guard_all``,
    default the ``"all"`` preset).  ``ValueError`` for another name."""
    from adamkit.torch import Adam

    if name == "torch-adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamkit-default":
        return Adam(params, lr=lr, guard=True)
    if name == "adamkit-all":
        return Adam(params, lr=lr, guard=guard_all)
    raise ValueError(f"Invalid optimizer: {name!r} (one of {', '.join(OPTIMIZERS)})")


# ---------------------------------------------------------------- fault injection


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``value`` (NaN or Inf)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: float) -> torch.Tensor:
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.value, None


class FaultyModel(nn.Module):
    """``inner`` wrapped so that chosen training steps go wrong (steps count training-mode
    forward passes from 0: the loop does one per optimizer step; evaluation is untouched).

    ``nan_steps``/``inf_steps``: every parameter gradient becomes NaN/Inf (the loss stays
    finite).  ``loud_steps``: the batch's inputs are multiplied by ``loud_factor``.
    ``shuffle_steps``: the batch's labels are shuffled (the logits' rows are permuted, which is
    the same loss and gradient).  :attr:`injected` counts the faults injected so far.
    """

    def __init__(
        self,
        inner: nn.Module,
        *,
        nan_steps: Iterable[int] = (),
        inf_steps: Iterable[int] = (),
        loud_steps: Iterable[int] = (),
        shuffle_steps: Iterable[int] = (),
        loud_factor: float = 1000.0,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.injected = 0
        self.nan_steps = frozenset(nan_steps)
        self.inf_steps = frozenset(inf_steps)
        self.loud_steps = frozenset(loud_steps)
        self.shuffle_steps = frozenset(shuffle_steps)
        self.loud_factor = float(loud_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner model's logits, with this step's faults."""
        if not self.training:
            return self.inner(x)
        step = self.calls
        self.calls += 1
        if step in self.loud_steps:
            x = x * self.loud_factor
            self.injected += 1
        out = self.inner(x)
        if step in self.shuffle_steps:
            order = torch.randperm(len(out), generator=torch.Generator().manual_seed(step))
            out = out[order]
            self.injected += 1
        if step in self.nan_steps or step in self.inf_steps:
            value = math.nan if step in self.nan_steps else math.inf
            out = _PoisonGrad.apply(out, value)
            self.injected += 1
        return out


# ---------------------------------------------------------------- one run


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_run(
    data: SweepData,
    *,
    model: str,
    dtype: str,
    optimizer: str,
    lr: float,
    seed: int,
    epochs: int = 2,
    batch_size: int = 256,
    faults: dict[str, Iterable[int]] | None = None,
    guard_all: Any = "all",
) -> RunResult:
    """Train one model from seed ``seed`` (weights and data order) with the app's loop.

    ``faults``: keyword arguments of :func:`FaultyModel` (``None``: a clean run).  Returns a
    :class:`RunResult`; training problems (NaN, divergence) are results, not errors.
    """
    import warnings

    from adamkit.app.loop import Trainer

    tdtype = torch_dtype(dtype)
    x_train, x_test = data.x_train.to(tdtype), data.x_test.to(tdtype)
    torch.manual_seed(seed)
    net = build_model(model, tuple(data.x_train.shape[1:])).to(tdtype)
    wrapped = FaultyModel(net, **faults) if faults else net
    opt = make_optimizer(optimizer, net.parameters(), lr, guard_all)
    trainer = Trainer(
        wrapped,
        opt,
        x_train,
        data.y_train,
        x_test,
        data.y_test,
        epochs=epochs,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    initial_loss, _ = trainer.evaluate(x_test, data.y_test)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the guard's one-time non-finite warning
        trainer.run()
    seconds = time.perf_counter() - started
    final = trainer.history[-1]
    nan = not (math.isfinite(final.test_loss) and _finite_params(net))
    guard = getattr(opt, "guard", None)
    return RunResult(
        model=model,
        dtype=dtype,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        initial_loss=initial_loss,
        loss=final.test_loss,
        acc=final.test_acc,
        nan=nan,
        diverged=nan or final.test_loss > initial_loss,
        seconds=seconds,
        steps=trainer.step,
        faults=",".join(sorted(faults)) if faults else "",
        guard=dict(guard.counters) if guard is not None else {},
    )


# ---------------------------------------------------------------- sweep


def lr_sweep(
    datasets: dict[str, SweepData],
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    seeds: Sequence[int] = (0, 1, 2),
    dtypes: Sequence[str] = DTYPES,
    optimizers: Sequence[str] = SWEEP_OPTIMIZERS,
    epochs: int = 2,
    batch_size: int = 256,
    guard_all: Any = "all",
    progress: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Every (model in ``datasets``, dtype, optimizer, lr, seed) run; ``progress`` gets one line
    per (setting, lr)."""
    results = []
    for model, data in datasets.items():
        for dtype in dtypes:
            for name in optimizers:
                for lr in lrs:
                    batch = [
                        train_run(
                            data,
                            model=model,
                            dtype=dtype,
                            optimizer=name,
                            lr=lr,
                            seed=seed,
                            epochs=epochs,
                            batch_size=batch_size,
                            guard_all=guard_all,
                        )
                        for seed in seeds
                    ]
                    results += batch
                    if progress is not None:
                        accs = " ".join(f"{r.acc:.3f}" for r in batch)
                        bad = sum(r.diverged for r in batch)
                        nans = sum(r.nan for r in batch)
                        secs = sum(r.seconds for r in batch)
                        progress(
                            f"  {batch[0].setting:<26} lr {lr:<7g} acc {accs}  diverged {bad} "
                            f"nan {nans}  ({secs:.1f}s)"
                        )
    return results


def load_baseline_runs(
    path: str | os.PathLike[str],
    *,
    models: Sequence[str],
    dtypes: Sequence[str],
    lrs: Sequence[float],
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    cnn_train: int,
    optimizer: str = "torch-adam",
) -> list[RunResult]:
    """The ``optimizer`` sweep runs of an earlier ``stability.json``, one per (model, dtype, lr,
    seed) asked for.  ``torch.optim.Adam`` does not depend on adamkit, so with the same data,
    seeds and loop its runs repeat exactly (one thread) and need not be trained again.

    Raises ``ValueError`` when the file's epochs, batch size or CNN subset differ from the
    arguments, or a run is missing; ``OSError``/``json.JSONDecodeError`` for an unreadable file.
    """
    document = json.loads(Path(path).read_text())
    stored = document.get("settings", {})
    for key, want in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("cnn_train_images", cnn_train),
    ):
        if stored.get(key) != want:
            raise ValueError(
                f"baseline {path}: {key} is {stored.get(key)!r}, this run uses {want!r}"
            )
    known = {f.name for f in fields(RunResult)}
    runs = {}
    for raw in document.get("sweep", {}).get("runs", []):
        r = RunResult(**{k: v for k, v in raw.items() if k in known})
        if r.optimizer == optimizer and not r.faults:
            runs[(r.model, r.dtype, float(r.lr), int(r.seed))] = r
    wanted = [
        (m, d, float(lr), int(k)) for m in models for d in dtypes for lr in lrs for k in seeds
    ]
    missing = [w for w in wanted if w not in runs]
    if missing:
        raise ValueError(
            f"baseline {path} lacks {len(missing)} {optimizer} run(s), e.g. {missing[0]}"
        )
    return [runs[w] for w in wanted]


#: Fault-injection optimizers whose runs ``--baseline`` reuses (they do not use "all").
BASELINE_FAULTS: tuple[str, ...] = ("torch-adam", "adamkit-default")


def load_baseline_faults(
    path: str | os.PathLike[str],
    *,
    dtypes: Sequence[str],
    seeds: Sequence[int],
    optimizers: Sequence[str] = BASELINE_FAULTS,
) -> dict[str, Any]:
    """``{"runs", "summary"}`` of an earlier ``stability.json``'s fault injection, restricted to
    ``optimizers`` and ``dtypes``.  ``ValueError`` when the file lacks one of them or ran other
    seeds."""
    document = json.loads(Path(path).read_text())
    stored = document.get("faults") or {}
    if sorted(document.get("settings", {}).get("seeds", [])) != sorted(seeds):
        raise ValueError(f"baseline {path}: fault runs used other seeds than {list(seeds)}")
    summary: dict[str, Any] = {}
    for dtype in dtypes:
        entries = stored.get("summary", {}).get(dtype, {})
        missing = [o for o in optimizers if o not in entries]
        if missing:
            raise ValueError(f"baseline {path} lacks fault runs of {missing} in {dtype}")
        summary[dtype] = {o: entries[o] for o in optimizers}
    runs = [
        r for r in stored.get("runs", []) if r["optimizer"] in optimizers and r["dtype"] in dtypes
    ]
    return {"runs": runs, "summary": summary}


def _band(lrs: Sequence[float], accs: Sequence[float], fraction: float) -> dict[str, Any]:
    # The contiguous run of lrs around the best mean accuracy that stays within `fraction` of it.
    finite = [a if math.isfinite(a) else -math.inf for a in accs]
    best = max(range(len(lrs)), key=lambda i: finite[i])
    floor = fraction * finite[best]
    lo = hi = best
    while lo > 0 and finite[lo - 1] >= floor:
        lo -= 1
    while hi < len(lrs) - 1 and finite[hi + 1] >= floor:
        hi += 1
    return {
        "best_lr": lrs[best],
        "best_acc": finite[best],
        "threshold": floor,
        "lo": lrs[lo],
        "hi": lrs[hi],
        "width": lrs[hi] / lrs[lo],
    }


def summarize_sweep(
    results: Sequence[RunResult],
    *,
    band: float = 0.95,
    reference_lr: float = REFERENCE_LR,
    baseline: str = "torch-adam",
    guarded: str = "adamkit-all",
) -> dict[str, Any]:
    """Per setting: mean accuracy per lr, NaN and diverged counts, the usable band; per (model,
    dtype): the guarded optimizer against the baseline (band widening, accuracy at
    ``reference_lr`` in points); and the totals over every setting.  Pure (no training)."""
    by_setting: dict[str, list[RunResult]] = {}
    for r in results:
        by_setting.setdefault(r.setting, []).append(r)
    settings: dict[str, Any] = {}
    for name, runs in by_setting.items():
        lrs = sorted({r.lr for r in runs})
        per_lr = {lr: [r for r in runs if r.lr == lr] for lr in lrs}
        mean_acc = [statistics.fmean(r.acc for r in per_lr[lr]) for lr in lrs]
        settings[name] = {
            "model": runs[0].model,
            "dtype": runs[0].dtype,
            "optimizer": runs[0].optimizer,
            "lrs": lrs,
            "mean_acc": mean_acc,
            "runs": len(runs),
            "nan": sum(r.nan for r in runs),
            "diverged": sum(r.diverged for r in runs),
            "diverged_per_lr": [sum(r.diverged for r in per_lr[lr]) for lr in lrs],
            "nan_per_lr": [sum(r.nan for r in per_lr[lr]) for lr in lrs],
            "band": _band(lrs, mean_acc, band),
        }
    pairs: dict[str, Any] = {}
    for s in settings.values():
        if s["optimizer"] != guarded:
            continue
        key = f"{s['model']} {s['dtype']}"
        base = settings.get(f"{key} {baseline}")
        if base is None:
            continue
        ref, seeds_at_ref, sd_points = {}, {}, {}
        for label, entry in (("guarded", s), ("baseline", base)):
            if reference_lr in entry["lrs"]:
                ref[label] = entry["mean_acc"][entry["lrs"].index(reference_lr)]
                runs = by_setting[f"{entry['model']} {entry['dtype']} {entry['optimizer']}"]
                seeds_at_ref[label] = {r.seed: r.acc for r in runs if r.lr == reference_lr}
                accs = list(seeds_at_ref[label].values())
                sd_points[label] = 100.0 * statistics.stdev(accs) if len(accs) > 1 else None
        # Same seed = same initial weights and batch order, so per-seed differences are paired.
        common = sorted(
            set(seeds_at_ref.get("guarded", {})) & set(seeds_at_ref.get("baseline", {}))
        )
        paired = [
            100.0 * (seeds_at_ref["guarded"][k] - seeds_at_ref["baseline"][k]) for k in common
        ]
        pairs[key] = {
            "band_widening": s["band"]["width"] / base["band"]["width"],
            "guarded_band": [s["band"]["lo"], s["band"]["hi"]],
            "baseline_band": [base["band"]["lo"], base["band"]["hi"]],
            "acc_at_reference_lr": ref,
            "acc_diff_points": (
                100.0 * (ref["guarded"] - ref["baseline"]) if len(ref) == 2 else None
            ),
            "acc_seed_sd_points": sd_points,
            "acc_diff_points_per_seed": paired,
            "nan": {"guarded": s["nan"], "baseline": base["nan"]},
            "diverged": {"guarded": s["diverged"], "baseline": base["diverged"]},
        }

    def total(optimizer: str, key: str) -> int:
        return sum(s[key] for s in settings.values() if s["optimizer"] == optimizer)

    totals = {
        name: {"nan": total(name, "nan"), "diverged": total(name, "diverged")}
        for name in dict.fromkeys(s["optimizer"] for s in settings.values())
    }
    for p in pairs.values():
        diff = p["acc_diff_points"]
        p["targets"] = {
            # Issue 8: no NaN run, and at lr 1e-3 no more than 0.2 points below plain Adam ...
            "no_nan": p["nan"]["guarded"] == 0,
            "acc_not_below_by_0.2_points": diff is not None and diff >= -0.2,
            # ... and a usable band at least 10x as wide.
            "band_10x_wider": p["band_widening"] >= 10.0,
        }
    guard_totals, base_totals = totals.get(guarded), totals.get(baseline)
    overall = {}
    if guard_totals and base_totals:
        overall = {
            "guard_nan_runs_zero": guard_totals["nan"] == 0,
            "guard_diverged_strictly_fewer": guard_totals["diverged"] < base_totals["diverged"],
        }
    return {
        "band_fraction": band,
        "reference_lr": reference_lr,
        "settings": settings,
        "pairs": pairs,
        "totals": totals,
        "targets": overall,
    }


def plot_sweep(summary: dict[str, Any], path: str | os.PathLike[str], title: str = "") -> None:
    """Heatmap of :func:`summarize_sweep`'s ``settings``: one row per setting, one column per lr,
    colour = mean final accuracy; the usable band outlined; an ``x`` on cells with a diverged
    run and ``NaN`` where a run ended in NaN (with counts)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from adamkit.app.files import atomic_write

    rows = list(summary["settings"].values())
    lrs = sorted({lr for s in rows for lr in s["lrs"]})
    grid = np.full((len(rows), len(lrs)), np.nan)
    for i, s in enumerate(rows):
        for lr, acc in zip(s["lrs"], s["mean_acc"], strict=True):
            grid[i, lrs.index(lr)] = acc
    figure = Figure(figsize=(1.1 * len(lrs) + 3.5, 0.5 * len(rows) + 1.8), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    figure.colorbar(image, ax=ax, label="mean final test accuracy")
    for i, s in enumerate(rows):
        for lr, acc, bad, nans in zip(
            s["lrs"], s["mean_acc"], s["diverged_per_lr"], s["nan_per_lr"], strict=True
        ):
            j = lrs.index(lr)
            text = f"{100 * acc:.0f}" if math.isfinite(acc) else "-"
            color = "black" if acc > 0.6 else "white"
            if bad:
                ax.plot(j, i, marker="x", color="red", ms=22, mew=1.5, alpha=0.7)
                text += f"\nd{bad}" + (f" NaN{nans}" if nans else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
        lo, hi = lrs.index(s["band"]["lo"]), lrs.index(s["band"]["hi"])
        ax.add_patch(
            Rectangle((lo - 0.5, i - 0.45), hi - lo + 1, 0.9, fill=False, ec="white", lw=2)
        )
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(rows)), [f"{s['model']} {s['dtype']} {s['optimizer']}" for s in rows])
    ax.set_xlabel("learning rate")
    ax.set_title(
        (title or "final test accuracy (%), mean over seeds")
        + "\nwhite box: usable band; x: a run diverged (dN: how many, NaNN: how many NaN)",
        fontsize="medium",
    )
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png")


# ---------------------------------------------------------------- faults


#: The faults of the ``faults`` part (0-based optimizer steps of a 470-step run).
DEFAULT_FAULTS: dict[str, tuple[int, ...]] = {
    "nan_steps": (50, 150),
    "inf_steps": (250,),
    "loud_steps": (100, 300),
    "shuffle_steps": (200, 201),
}


def fault_injection(
    data: SweepData,
    *,
    dtypes: Sequence[str] = DTYPES,
    seeds: Sequence[int] = (0,),
    optimizers: Sequence[str] = OPTIMIZERS,
    faults: dict[str, Iterable[int]] | None = None,
    lr: float = REFERENCE_LR,
    epochs: int = 2,
    batch_size: int = 256,
    model: str = "mlp",
    guard_all: Any = "all",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Clean and faulted runs of each optimizer; returns ``{"faults", "runs", "summary"}`` where
    ``summary[dtype][optimizer]`` holds the mean accuracies, their difference in points, and how
    many faulted runs ended NaN."""
    faults = {k: tuple(v) for k, v in (faults or DEFAULT_FAULTS).items()}
    runs: list[RunResult] = []
    summary: dict[str, Any] = {}
    for dtype in dtypes:
        summary[dtype] = {}
        for name in optimizers:
            pair = {}
            for label, injected in (("clean", None), ("faulted", faults)):
                pair[label] = [
                    train_run(
                        data,
                        model=model,
                        dtype=dtype,
                        optimizer=name,
                        lr=lr,
                        seed=seed,
                        epochs=epochs,
                        batch_size=batch_size,
                        faults=injected,
                        guard_all=guard_all,
                    )
                    for seed in seeds
                ]
                runs += pair[label]
            clean = statistics.fmean(r.acc for r in pair["clean"])
            faulted = statistics.fmean(r.acc for r in pair["faulted"])
            counters = pair["faulted"][0].guard
            entry = {
                "clean_acc": clean,
                "faulted_acc": faulted,
                "diff_points": 100.0 * (faulted - clean),
                "faulted_nan": sum(r.nan for r in pair["faulted"]),
                "faulted_diverged": sum(r.diverged for r in pair["faulted"]),
                "guard_first_seed": counters,
            }
            summary[dtype][name] = entry
            if progress is not None:
                what = (
                    "NaN"
                    if entry["faulted_nan"]
                    else f"{100 * faulted:.2f}% ({entry['diff_points']:+.2f} points)"
                )
                skipped = {k: v for k, v in counters.items() if k != "n_steps" and v}
                progress(
                    f"  {model} {dtype:<4} {name:<16} clean {100 * clean:.2f}%  faulted {what}  "
                    f"{skipped if counters else ''}"
                )
    return {"faults": faults, "runs": [asdict(r) for r in runs], "summary": summary}


# ---------------------------------------------------------------- overhead


def guard_overhead(
    *,
    n_matrices: int = 10,
    width: int = 1000,
    rounds: int = 30,
    warmup: int = 3,
    seed: int = 0,
    train_rounds: int = 10,
    train_sizes: Sequence[int] = (784, 2048, 2048, 2048, 10),
) -> dict[str, Any]:
    """Median step time (ms) of ``adamkit.torch.Adam`` without a guard, with the default guard and
    with ``"all"``, and of ``torch.optim.Adam`` (default and ``fused=True``), on ``n_matrices``
    ``width x width`` float32 matrices plus biases (10M parameters by default), with nothing
    wrong; and the time of a whole training step (forward, backward, step) of an MLP with layer
    widths ``train_sizes`` (10.0M parameters by default) at batch 256, without a guard and with
    the default guard (its gradient check in backward, and in the step).

    Each round times one step of every candidate in a rotating order (noise hits all alike).
    ``median_ms``: the gradients are fixed random tensors shared by all candidates, set without
    a backward pass, so the default guard's check runs in ``step()``.
    ``after_backward_step_ms`` / ``after_backward_backward_ms``: each round first runs a
    backward pass that produces the same gradients (``sum(p * g)``), timed apart, then the
    step; there the default guard's check (``check_in_backward``) runs at the end of backward.
    ``overhead_pct`` is relative to ``adamkit (no guard)``, ``after_backward_overhead_pct``
    (step) likewise, ``train_overhead_pct`` likewise for the training step.
    """
    from adamkit.torch import Adam

    gen = torch.Generator().manual_seed(seed)
    shapes = [(width, width)] * n_matrices + [(width,)] * n_matrices
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    def params() -> list[torch.nn.Parameter]:
        out = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g
            out.append(p)
        return out

    candidates = {
        "adamkit (no guard)": Adam(params(), lr=1e-3, guard=False),
        "adamkit (default guard)": Adam(params(), lr=1e-3),
        "adamkit (guard all)": Adam(params(), lr=1e-3, guard="all"),
        "torch.optim.Adam": torch.optim.Adam(params(), lr=1e-3),
        "torch.optim.Adam fused": torch.optim.Adam(params(), lr=1e-3, fused=True),
    }
    loss = torch.tensor(1.0)

    def optimizer_step(name: str) -> Callable[[], Any]:
        opt = candidates[name]
        if name.startswith("adamkit"):
            return lambda: opt.step(loss=loss)
        return opt.step

    medians, minima = _interleaved({n: optimizer_step(n) for n in candidates}, rounds, warmup)
    base = medians["adamkit (no guard)"]
    after = _after_backward(
        {
            "adamkit (no guard)": lambda ps: Adam(ps, lr=1e-3, guard=False),
            "adamkit (default guard)": lambda ps: Adam(ps, lr=1e-3),
            "adamkit (default guard, check in step)": lambda ps: Adam(
                ps, lr=1e-3, guard={"check_in_backward": False}
            ),
            "torch.optim.Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        },
        grads,
        rounds,
        warmup,
    )
    after_base = after["step"]["adamkit (no guard)"]

    sizes = tuple(train_sizes)
    data = torch.randn(256, sizes[0], generator=gen)
    labels = torch.randint(0, sizes[-1], (256,), generator=gen)

    def train_step(guard: Any) -> Callable[[], Any]:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        opt = Adam(model.parameters(), lr=1e-4, guard=guard)

        def step() -> None:
            opt.zero_grad()
            batch_loss = nn.functional.cross_entropy(model(data), labels)
            batch_loss.backward()
            opt.step(loss=batch_loss.detach())

        return step

    train = {
        "adamkit (no guard)": train_step(False),
        "adamkit (default guard)": train_step(True),
        "adamkit (default guard, check in step)": train_step({"check_in_backward": False}),
    }
    train_medians, _ = _interleaved(train, train_rounds, warmup)
    train_base = train_medians["adamkit (no guard)"]
    return {
        "params": sum(math.prod(s) for s in shapes),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "median_ms": medians,
        "min_ms": minima,
        "overhead_pct": {n: 100.0 * (m / base - 1.0) for n, m in medians.items()},
        "after_backward_step_ms": after["step"],
        "after_backward_backward_ms": after["backward"],
        "after_backward_overhead_pct": {
            n: 100.0 * (m / after_base - 1.0) for n, m in after["step"].items()
        },
        "train_params": sum(a * b + b for a, b in itertools.pairwise(sizes)),
        "train_rounds": train_rounds,
        "train_median_ms": train_medians,
        "train_overhead_pct": {n: 100.0 * (m / train_base - 1.0) for n, m in train_medians.items()},
    }


def _after_backward(
    makers: dict[str, Callable[[list[torch.nn.Parameter]], Any]],
    grads: Sequence[torch.Tensor],
    rounds: int,
    warmup: int,
) -> dict[str, dict[str, float]]:
    # {"step": median ms, "backward": median ms} per optimizer; every round each optimizer's
    # parameters get ``grads`` from a backward pass of sum(p * g) (fresh gradient tensors, as
    # zero_grad() leaves them), timed apart from the step that follows.
    names = list(makers)
    opts = {}
    for name in names:
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        opts[name] = (makers[name](params), params)
    times: dict[str, dict[str, list[float]]] = {"step": {}, "backward": {}}
    for i in range(warmup + rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            opt, params = opts[name]
            opt.zero_grad()
            started = time.perf_counter()
            terms = [(p * g).sum() for p, g in zip(params, grads, strict=True)]
            torch.stack(terms).sum().backward()
            middle = time.perf_counter()
            opt.step()
            ended = time.perf_counter()
            if i >= warmup:
                times["backward"].setdefault(name, []).append(middle - started)
                times["step"].setdefault(name, []).append(ended - middle)
    return {
        part: {n: 1e3 * statistics.median(t) for n, t in by_name.items()}
        for part, by_name in times.items()
    }


def _interleaved(
    steps: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    # (median ms, min ms) per name.
    times = interleaved_times(steps, rounds, warmup)
    medians = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    return medians, {n: 1e3 * min(t) for n, t in times.items()}


# ---------------------------------------------------------------- CLI


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return tuple(sorted(set(values)))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``adamkit bench stability`` options to ``parser``."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument(
        "--parts", type=csv_choice(PARTS), default=PARTS, help="default: sweep,faults,overhead"
    )
    parser.add_argument("--lrs", type=_csv_floats, default=DEFAULT_LRS, help="learning rates")
    parser.add_argument("--seeds", type=int, help="seeds per lr (default 3, 1 with --quick)")
    parser.add_argument("--models", type=csv_choice(MODELS), default=MODELS)
    parser.add_argument("--dtypes", type=csv_choice(DTYPES), default=DTYPES)
    parser.add_argument(
        "--optimizers",
        type=csv_choice(OPTIMIZERS),
        default=SWEEP_OPTIMIZERS,
        help="optimizers of the sweep (default: torch-adam,adamkit-all)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--cnn-train", type=int, default=10_000, help="training images for the CNN (default 10000)"
    )
    parser.add_argument(
        "--guard-options",
        type=json.loads,
        default=None,
        help='JSON for adamkit-all\'s guard= (default "all"), e.g. '
        '\'{"preset": "all", "loss_warmup": 20, "lr_cooldown": 100}\'',
    )
    parser.add_argument(
        "--baseline",
        help="an earlier stability.json whose torch-adam sweep runs are reused instead of re-run "
        "(same lrs, seeds, epochs, batch size and CNN subset required)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: merge these stability.json files (e.g. one per --models) into one "
        "in --out, summarize and plot the sweep again",
    )
    parser.add_argument("--band", type=float, default=0.95, help="usable: >= this x best acc")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: the app's search)")
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: argparse.Namespace) -> int:
    """Run the parts of the benchmark that ``args`` asks for; print and write the results.

    Returns 0; 2 when Fashion-MNIST cannot be found (message on stderr).
    """
    from adamkit.app.errors import AppError

    if getattr(args, "merge", None):
        return _run_merge(args)
    bad = first_below_one(
        (
            ("--seeds", 1 if args.seeds is None else args.seeds),
            ("--epochs", args.epochs),
            ("--batch-size", args.batch_size),
            ("--cnn-train", args.cnn_train),
            ("--threads", args.threads),
        )
    )
    if bad:
        print(f"adamkit bench stability: {bad}", file=sys.stderr)
        return 2
    set_threads(args.threads)
    seeds = tuple(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    guard_all = args.guard_options if args.guard_options is not None else "all"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    json_path, png_path = out / f"stability{tag}.json", out / f"stability_sweep{tag}.png"
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "command": " ".join(sys.argv),
        "settings": {
            "lrs": list(args.lrs),
            "seeds": list(seeds),
            "models": list(args.models),
            "dtypes": list(args.dtypes),
            "optimizers": list(args.optimizers),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "cnn_train_images": args.cnn_train,
            "guard_all": guard_all,
            "band_fraction": args.band,
        },
        "machine": machine_info(),
    }

    def say(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
        json_path.write_text(json.dumps(document, indent=1) + "\n")

    started = time.perf_counter()
    data = None
    if {"sweep", "faults"} & set(args.parts):
        try:
            data = load_fashion(args.data_dir)
        except AppError as exc:
            print(f"adamkit bench stability: {exc}", file=sys.stderr)
            return 2
        document["data"] = {"source": data.source, "train": len(data.y_train)}
    if "sweep" in args.parts:
        datasets = {}
        for model in args.models:
            datasets[model] = subset(data, args.cnn_train) if model == "cnn" else data
        say(
            f"lr sweep: {len(args.lrs)} lrs x {len(seeds)} seeds, {args.epochs} epochs of batch "
            f"{args.batch_size}; "
            + ", ".join(f"{m} on {len(d.y_train)} images" for m, d in datasets.items())
        )
        reused: list[RunResult] = []
        optimizers = list(args.optimizers)
        if getattr(args, "baseline", None) and "torch-adam" in optimizers:
            reused = load_baseline_runs(
                args.baseline,
                models=args.models,
                dtypes=args.dtypes,
                lrs=args.lrs,
                seeds=seeds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                cnn_train=args.cnn_train,
            )
            optimizers.remove("torch-adam")
            document["settings"]["baseline"] = str(args.baseline)
            say(f"torch-adam: {len(reused)} runs reused from {args.baseline}")
        results = reused + lr_sweep(
            datasets,
            lrs=args.lrs,
            seeds=seeds,
            dtypes=args.dtypes,
            optimizers=optimizers,
            epochs=args.epochs,
            batch_size=args.batch_size,
            guard_all=guard_all,
            progress=say,
        )
        summary = summarize_sweep(results, band=args.band)
        document["sweep"] = {"runs": [asdict(r) for r in results], "summary": summary}
        save()
        plot_sweep(summary, png_path)
        _print_sweep(summary, say)
    if "faults" in args.parts:
        say(
            "fault injection: MLP, lr 1e-3, "
            + ", ".join(f"{k} {list(v)}" for k, v in DEFAULT_FAULTS.items())
        )
        fault_optimizers = list(OPTIMIZERS)
        reused_faults: dict[str, Any] = {}
        if getattr(args, "baseline", None):
            # torch-adam and the default guard do not depend on the "all" preset.
            reused_faults = load_baseline_faults(
                args.baseline, dtypes=args.dtypes, seeds=seeds, optimizers=BASELINE_FAULTS
            )
            fault_optimizers = [o for o in fault_optimizers if o not in BASELINE_FAULTS]
            for dtype, entries in reused_faults["summary"].items():
                for name, entry in entries.items():
                    say(
                        f"  mlp {dtype:<4} {name:<16} clean {100 * entry['clean_acc']:.2f}%  "
                        f"faulted {100 * entry['faulted_acc']:.2f}% "
                        f"({entry['diff_points']:+.2f} points; NaN runs {entry['faulted_nan']})"
                        f"  [reused from {args.baseline}]"
                    )
        faults = fault_injection(
            data,
            dtypes=args.dtypes,
            seeds=seeds,
            optimizers=fault_optimizers,
            epochs=args.epochs,
            batch_size=args.batch_size,
            guard_all=guard_all,
            progress=say,
        )
        if reused_faults:
            faults["runs"] = reused_faults["runs"] + faults["runs"]
            for dtype, entries in reused_faults["summary"].items():
                faults["summary"][dtype] = {**entries, **faults["summary"][dtype]}
        document["faults"] = faults
        save()
    if "overhead" in args.parts:
        set_threads(args.threads)
        result = guard_overhead()
        document["overhead"] = result
        say(
            f"overhead, nothing wrong, {result['params'] / 1e6:.0f}M parameters, "
            f"{result['rounds']} interleaved rounds, {result['threads']} thread(s):"
        )
        for name, ms in result["median_ms"].items():
            say(f"  {name:<24} median {ms:8.2f} ms  ({result['overhead_pct'][name]:+.1f}%)")
        say("step after a backward pass (the backward's own time apart):")
        for name, ms in result["after_backward_step_ms"].items():
            pct = result["after_backward_overhead_pct"][name]
            back = result["after_backward_backward_ms"][name]
            say(f"  {name:<38} step {ms:8.2f} ms ({pct:+.1f}%)  backward {back:8.2f} ms")
        say(
            f"training step (forward, backward, step), {result['train_params'] / 1e6:.1f}M "
            f"parameters, batch 256, {result['train_rounds']} interleaved rounds:"
        )
        for name, ms in result["train_median_ms"].items():
            pct = result["train_overhead_pct"][name]
            say(f"  {name:<24} median {ms:8.2f} ms  ({pct:+.1f}%)")
    document["seconds"] = time.perf_counter() - started
    document["machine"]["loadavg_end"] = machine_info()["loadavg"]
    save()
    say(f"results in {json_path}" + (f" and {png_path}" if "sweep" in args.parts else ""))
    return 0


def merge_documents(documents: Sequence[dict[str, Any]], *, band: float = 0.95) -> dict[str, Any]:
    """One ``stability.json`` document from several runs of parts of the benchmark (e.g. one
    process per model): sweep runs concatenated and summarized again, the fault injection of the
    (single) document that has one.  ``ValueError`` when two documents swept the same (setting,
    lr, seed) or more than one has a fault injection."""
    runs: list[RunResult] = []
    seen: set[tuple[str, float, int]] = set()
    faults = [d["faults"] for d in documents if d.get("faults")]
    if len(faults) > 1:
        raise ValueError(f"{len(faults)} documents have a fault injection; merge at most one")
    known = {f.name for f in fields(RunResult)}
    for document in documents:
        for raw in (document.get("sweep") or {}).get("runs", []):
            r = RunResult(**{k: v for k, v in raw.items() if k in known})
            key = (r.setting, float(r.lr), int(r.seed))
            if key in seen:
                raise ValueError(f"run {key} appears in more than one document")
            seen.add(key)
            runs.append(r)
    merged: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "merged_from": [
            {k: d.get(k) for k in ("command", "settings", "machine", "seconds")} for d in documents
        ],
    }
    if runs:
        summary = summarize_sweep(runs, band=band)
        merged["sweep"] = {"runs": [asdict(r) for r in runs], "summary": summary}
    if faults:
        merged["faults"] = faults[0]
    return merged


def _run_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    documents = [json.loads(Path(path).read_text()) for path in args.merge]
    merged = merge_documents(documents, band=args.band)
    merged["command"] = " ".join(sys.argv)
    json_path = out / f"stability{tag}.json"
    json_path.write_text(json.dumps(merged, indent=1) + "\n")
    if "sweep" in merged:
        plot_sweep(merged["sweep"]["summary"], out / f"stability_sweep{tag}.png")
        _print_sweep(merged["sweep"]["summary"], lambda line: print(line, flush=True))
    print(f"merged {len(documents)} documents into {json_path}")
    return 0


def _print_sweep(summary: dict[str, Any], say: Callable[[str], None]) -> None:
    say(f"usable band (mean accuracy >= {summary['band_fraction']:g} x the setting's best):")
    for name, s in summary["settings"].items():
        b = s["band"]
        say(
            f"  {name:<26} best {100 * b['best_acc']:.2f}% at lr {b['best_lr']:g}; band "
            f"{b['lo']:g}..{b['hi']:g} ({b['width']:g}x); runs NaN {s['nan']}, diverged "
            f"{s['diverged']} of {s['runs']}"
        )
    for key, p in summary["pairs"].items():
        diff = p["acc_diff_points"]
        spread = ""
        if diff is not None:
            sd = p.get("acc_seed_sd_points", {})
            per_seed = " ".join(f"{d:+.2f}" for d in p.get("acc_diff_points_per_seed", []))
            if sd.get("guarded") is not None and sd.get("baseline") is not None:
                spread = (
                    f" (seed sd: guard {sd['guarded']:.2f}, torch {sd['baseline']:.2f}; "
                    f"per seed {per_seed})"
                )
        say(
            f"  {key}: guard band {p['band_widening']:g}x as wide; at lr "
            f"{summary['reference_lr']:g} guard - torch = "
            + (f"{diff:+.2f} points{spread}" if diff is not None else "n/a")
        )
    for name, t in summary["totals"].items():
        say(f"  total {name}: NaN {t['nan']}, diverged {t['diverged']}")
    for key, p in summary["pairs"].items():
        say(f"  targets {key}: " + ", ".join(f"{k} {v}" for k, v in p["targets"].items()))
    say("  targets overall: " + ", ".join(f"{k} {v}" for k, v in summary["targets"].items()))
