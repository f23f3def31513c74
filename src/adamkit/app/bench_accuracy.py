"""``adamkit bench accuracy``: what low-memory optimizer state costs in accuracy (issue 7).

Every run trains from seed ``s`` (initial weights, data order and the stochastic-rounding
generator all follow it), so the variants of one seed differ only in how the optimizer stores
its moments or rounds its parameters.  ``--seeds`` seeds (default 3) per model and variant.

Variants (``--variants``), all ``adamkit.torch`` optimizers without a guard:

==================  ===========  =================  ==================
variant             parameters   moments            ``param_rounding``
==================  ===========  =================  ==================
``fp32``            float32      ``state="fp32"``   --  (the reference)
``bf16``            float32      ``state="bf16"``   --
``int8``            float32      ``state="int8"``   --
``bf16p-nearest``   bfloat16     ``state="fp32"``   ``"nearest"``
``bf16p-stoch``     bfloat16     ``state="fp32"``   ``"stochastic"``
==================  ===========  =================  ==================

The ``bf16p-*`` variants (bfloat16 parameters, float32 moments) run only on ``--param-models``
(default ``mlp,gpt``).  Under ``int8`` the format's sensitive-tensor rule applies (tensors below
4096 elements or 2 dimensions and parameters named like embeddings or norms keep float32
moments; the parameters are passed by name): each run records how many parameters actually had
int8 moments and the optimizer's state bytes.

Models (``--models``):

``mlp``
    The app's 784-128-10 MLP (:func:`adamkit.app.bench_common.build_model`), Adam lr 1e-3,
    ``--epochs`` 5 of batch 256 on all 60,000 Fashion-MNIST training images; the metric is the
    final accuracy on the 10,000 test images.
``cnn``
    The stability benchmark's small CNN (conv 8 -> pool -> conv 16 -> pool -> linear), same
    settings and metric.
``gpt``
    A byte-level (for these ASCII files: character-level) transformer language model
    (:class:`CharTransformer`: ``--gpt-layers`` 2 pre-norm blocks, d_model 128, 4 heads, context
    128, learned positions, causal attention), AdamW (lr 2e-3, weight decay 0.01, 20 warm-up
    steps then cosine to a tenth) for ``--gpt-steps`` (200) steps of 32 random windows, on the
    sources of :data:`TEXT_FILES` of the local Python standard library (read, never downloaded).
    Each file's first 90% goes to training, its last 10% to validation; the metric is the mean
    cross-entropy (nats per byte) over every non-overlapping window of the validation text.

Criteria (issue 7): a variant passes when its mean over seeds is within ``--acc-tolerance``
(0.3) accuracy points of the ``fp32`` mean (classifiers), or within ``--loss-tolerance`` (1%)
of the ``fp32`` mean validation loss (``gpt``).  "Within" is two-sided, as the issue says it:
a variant that is better by more than the tolerance is reported as ``outside, better``.  The
paired differences (same seed) are reported beside the means as a measure of the noise.

Results in ``--out``: ``state-accuracy.json`` (settings, data, every run with its per-step
training loss and its evaluation curve, the summary) and ``state-accuracy.png`` (loss curves
per variant, one column per model).  ``--quick``: one seed, one epoch on 5,000 images, 40 LM
steps: a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# Shared with the stability benchmark (the underscored helpers too; see the report of issue 7).
from adamkit.app.bench_common import (
    SweepData,
    build_model,
    csv_choice,
    first_below_one,
    load_fashion,
    machine_info,
    set_threads,
    subset,
    torch_dtype,
)

__all__ = [
    "MODELS",
    "TEXT_FILES",
    "VARIANTS",
    "CharTransformer",
    "LMSettings",
    "RunRecord",
    "TextCorpus",
    "Variant",
    "configure_parser",
    "format_table",
    "load_text",
    "plot_curves",
    "run",
    "summarize",
    "train_classifier",
    "train_lm",
]

FORMAT = "adamkit.bench-accuracy"
MODELS: tuple[str, ...] = ("mlp", "cnn", "gpt")
CLASSIFIERS: tuple[str, ...] = ("mlp", "cnn")
REFERENCE = "fp32"


class Variant(NamedTuple):
    """How one run stores its parameters (``dtype``: ``"fp32"``/``"bf16"``) and moments
    (``state``, an ``adamkit.torch.Adam`` state name) and rounds bf16 parameters."""

    name: str
    dtype: str
    state: str
    param_rounding: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32", "fp32", "fp32", "nearest"),
        Variant("bf16", "fp32", "bf16", "nearest"),
        Variant("int8", "fp32", "int8", "nearest"),
        Variant("int8-companded", "fp32", "int8-companded", "nearest"),
        Variant("int8-companded-64", "fp32", "int8-companded-64", "nearest"),
        Variant("bf16p-nearest", "bf16", "fp32", "nearest"),
        Variant("bf16p-stoch", "bf16", "fp32", "stochastic"),
    )
}

#: What a default run compares (the issue's formats, and bf16 parameters both ways).
DEFAULT_VARIANTS: tuple[str, ...] = tuple(
    name for name in VARIANTS if not name.startswith("int8-companded")
)

#: Sources of the local Python's standard library that make the language model's text (1.65 MB
#: on CPython 3.11), in this order; the JSON records their sizes and SHA-256.
TEXT_FILES: tuple[str, ...] = (
    "argparse.py",
    "ast.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "pprint.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tarfile.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "zipfile.py",
)
VOCAB = 256  # bytes


@dataclass
class RunRecord:
    """One training run.  ``metric``: final test accuracy (fraction; classifiers) or validation
    loss (nats per byte; ``gpt``); ``eval_loss``: test/validation loss at ``eval_steps``;
    ``train_loss``: every step's batch loss; ``int8_params``/``int8_tensors``: parameters whose
    moments were stored as int8 codes; ``state_nbytes``: the optimizer's state bytes."""

    model: str
    variant: str
    seed: int
    metric: float
    final_loss: float
    final_acc: float | None
    steps: int
    seconds: float
    params: int
    tensors: int
    int8_params: int
    int8_tensors: int
    state_nbytes: int
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- optimizers


def make_optimizer(
    net: nn.Module, variant: Variant, *, lr: float, weight_decay: float | None = None
) -> Any:
    """``adamkit.torch.Adam`` (``weight_decay=None``) or ``AdamW`` over
    ``net.named_parameters()`` with ``variant``'s state and rounding, no guard."""
    from adamkit.torch import Adam, AdamW

    kwargs: dict[str, Any] = {
        "lr": lr,
        "state": variant.state,
        "param_rounding": variant.param_rounding,
        "guard": False,
    }
    if weight_decay is None:
        return Adam(net.named_parameters(), **kwargs)
    return AdamW(net.named_parameters(), weight_decay=weight_decay, **kwargs)


def _state_census(opt: Any) -> dict[str, int]:
    """Parameter and tensor counts, how many of them hold 8-bit moments (one-byte codes, whatever
    the int8 format's signedness), and the optimizer's state bytes."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def eight_bit(p: torch.Tensor) -> bool:
        entry = opt.state.get(p, {})
        return any(
            isinstance(entry.get(role), torch.Tensor) and entry[role].element_size() == 1
            for role in ("exp_avg", "exp_avg_sq")
        )

    int8 = [p for p in params if eight_bit(p)]
    return {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "int8_params": sum(p.numel() for p in int8),
        "int8_tensors": len(int8),
        "state_nbytes": int(opt.state_nbytes()),
    }


def _finite(values: Sequence[float]) -> list[float]:
    return [round(v, 5) if math.isfinite(v) else math.nan for v in values]


# ---------------------------------------------------------------- classifiers


def train_classifier(
    data: SweepData,
    *,
    model: str,
    variant: Variant,
    seed: int,
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 1e-3,
) -> RunRecord:
    """Train ``model`` (``"mlp"``/``"cnn"``) on ``data`` with the app's loop; the test set is
    evaluated after every epoch.  Returns a :class:`RunRecord` (NaN is a result, not an error)."""
    from adamkit.app.loop import Trainer

    tdtype = torch_dtype(variant.dtype)
    torch.manual_seed(seed)
    net = build_model(model, tuple(data.x_train.shape[1:])).to(tdtype)
    opt = make_optimizer(net, variant, lr=lr)
    trainer = Trainer(
        net,
        opt,
        data.x_train.to(tdtype),
        data.y_train,
        data.x_test.to(tdtype),
        data.y_test,
        epochs=epochs,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    losses: list[float] = []
    trainer.add_callback("batch_end", lambda t: losses.append(t.last_loss))
    started = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - started
    final = trainer.history[-1]
    return RunRecord(
        model=model,
        variant=variant.name,
        seed=seed,
        metric=final.test_acc,
        final_loss=final.test_loss,
        final_acc=final.test_acc,
        steps=trainer.step,
        seconds=seconds,
        **_state_census(opt),
        train_loss=_finite(losses),
        eval_steps=[r.step for r in trainer.history],
        eval_loss=_finite([r.test_loss for r in trainer.history]),
    )


# ---------------------------------------------------------------- language model


class TextCorpus(NamedTuple):
    """Byte tokens (int64 tensors) of the training and validation text, and where they came
    from (``info``: root, files with sizes, SHA-256 of the whole text, the split)."""

    train: torch.Tensor
    val: torch.Tensor
    info: dict[str, Any]


def load_text(
    files: Sequence[str] = TEXT_FILES,
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
) -> TextCorpus:
    """Read ``files`` under ``root`` (default: the running Python's standard library) as bytes;
    each file's first ``1 - val_fraction`` goes to training and the rest to validation, both
    concatenated in the given order.  Raises ``DataError`` for a missing or unreadable file or
    a text too short for either split, ``ValueError`` for ``val_fraction`` outside (0, 1)."""
    from adamkit.app.errors import DataError

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256()
    train, val, sizes = bytearray(), bytearray(), {}
    for name in files:
        path = base / name
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise DataError(f"text file {path}: {exc.strerror or exc}") from None
        digest.update(blob)
        cut = int(len(blob) * (1.0 - val_fraction))
        train += blob[:cut]
        val += blob[cut:]
        sizes[name] = len(blob)
    if len(train) < 2 or len(val) < 2:
        raise DataError(f"text under {base} is too short ({len(train)} + {len(val)} bytes)")
    info = {
        "root": str(base),
        "python": sys.version.split()[0],
        "files": sizes,
        "bytes": len(train) + len(val),
        "sha256": digest.hexdigest(),
        "split": f"first {1 - val_fraction:.0%} of each file -> train, last {val_fraction:.0%}"
        " -> validation",
        "train_bytes": len(train),
        "val_bytes": len(val),
        "tokens": "bytes (vocabulary 256)",
    }

    def tokens(raw: bytearray) -> torch.Tensor:
        return torch.tensor(memoryview(raw).tolist(), dtype=torch.int64)

    return TextCorpus(tokens(train), tokens(val), info)


class _Block(nn.Module):
    # Pre-norm transformer block: causal self-attention and a 4x GELU MLP, each residual.
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class CharTransformer(nn.Module):
    """A small GPT: token and position embeddings (``tok_embed``, ``pos_embed``), ``layers``
    pre-norm blocks with causal attention, a final ``norm`` and an untied ``head``.

    Input: int64 tokens ``(B, T)`` with ``T <= context``; output: logits ``(B, T, vocab)``.
    Weights ~ N(0, 0.02), biases zero, from torch's global generator.  ``ValueError`` when
    ``d_model`` is not a multiple of ``heads`` or a size is below 1."""

    def __init__(
        self,
        vocab: int = VOCAB,
        d_model: int = 128,
        layers: int = 2,
        heads: int = 4,
        context: int = 128,
    ) -> None:
        super().__init__()
        if min(vocab, d_model, layers, heads, context) < 1 or d_model % heads:
            raise ValueError(
                f"CharTransformer sizes must be >= 1 with d_model a multiple of heads, got "
                f"vocab={vocab} d_model={d_model} layers={layers} heads={heads} context={context}"
            )
        self.context = context
        self.tok_embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next token at every position."""
        x = self.tok_embed(tokens) + self.pos_embed.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass(frozen=True)
class LMSettings:
    """The language model's size and training schedule (see the module docstring)."""

    steps: int = 200
    batch_size: int = 32
    context: int = 128
    layers: int = 2
    d_model: int = 128
    heads: int = 4
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    eval_every: int = 20
    eval_windows: int = 64


def _windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    # Every non-overlapping (context + 1)-token window: inputs and their next-token targets.
    starts = torch.arange(0, len(tokens) - context, context)
    return tokens[starts[:, None] + torch.arange(context + 1)]


@torch.no_grad()
def _lm_loss(net: nn.Module, windows: torch.Tensor, batch_size: int = 64) -> float:
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        logits = net(chunk[:, :-1]).float()
        total += float(
            F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1), reduction="sum")
        )
    return total / windows[:, 1:].numel()


def train_lm(
    corpus: TextCorpus, *, variant: Variant, seed: int, settings: LMSettings = LMSettings()
) -> RunRecord:
    """Train a :class:`CharTransformer` on ``corpus.train`` for ``settings.steps`` AdamW steps
    (windows drawn at random offsets from a generator seeded with ``seed``); the loss on
    ``settings.eval_windows`` evenly spaced validation windows every ``eval_every`` steps makes
    the curve, the loss on every validation window the metric.  ``ValueError`` when the
    validation text holds no full window."""
    s = settings
    val = _windows(corpus.val, s.context)
    if len(val) == 0 or len(corpus.train) <= s.context + 1:
        raise ValueError(
            f"the text is too short for context {s.context}: {len(corpus.train)} training and "
            f"{len(corpus.val)} validation bytes"
        )
    probe = val[torch.linspace(0, len(val) - 1, min(s.eval_windows, len(val))).long()]
    torch.manual_seed(seed)
    net = CharTransformer(VOCAB, s.d_model, s.layers, s.heads, s.context)
    net = net.to(torch_dtype(variant.dtype))
    opt = make_optimizer(net, variant, lr=s.lr, weight_decay=s.weight_decay)

    def schedule(step: int) -> float:
        # Linear warm-up, then cosine from 1 to 0.1 over the remaining steps.
        if step < s.warmup:
            return (step + 1) / s.warmup
        frac = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(s.context + 1)
    losses: list[float] = []
    eval_steps: list[int] = []
    eval_loss: list[float] = []
    census: dict[str, int] = {}
    started = time.perf_counter()
    net.train()
    for step in range(1, s.steps + 1):
        starts = torch.randint(0, len(corpus.train) - s.context, (s.batch_size,), generator=gen)
        batch = corpus.train[starts[:, None] + offsets]
        logits = net(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step == 1:
            census = _state_census(opt)
        if step % s.eval_every == 0 or step == s.steps:
            net.eval()
            eval_steps.append(step)
            eval_loss.append(_lm_loss(net, probe))
            net.train()
    net.eval()
    final = _lm_loss(net, val)
    seconds = time.perf_counter() - started
    census["state_nbytes"] = int(opt.state_nbytes())
    return RunRecord(
        model="gpt",
        variant=variant.name,
        seed=seed,
        metric=final,
        final_loss=final,
        final_acc=None,
        steps=s.steps,
        seconds=seconds,
        **census,
        train_loss=_finite(losses),
        eval_steps=eval_steps,
        eval_loss=_finite(eval_loss),
    )


# ---------------------------------------------------------------- summary


def _spread(values: Sequence[float]) -> dict[str, float]:
    if not all(math.isfinite(v) for v in values):  # a diverged run: no meaningful spread
        return dict.fromkeys(("mean", "sd", "min", "max"), math.nan)
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(
    runs: Sequence[RunRecord],
    *,
    acc_tolerance: float = 0.3,
    loss_tolerance: float = 1.0,
    reference: str = REFERENCE,
) -> dict[str, Any]:
    """Per model and variant: the metric's mean, sample standard deviation, min and max over
    seeds (accuracy in percent, validation loss in nats), the difference of the means to
    ``reference`` (accuracy points; validation loss in percent of the reference's) with the
    paired per-seed differences, and the verdict: ``"pass"`` when ``|difference| <=``
    ``acc_tolerance`` points / ``loss_tolerance`` percent, ``"outside, better"`` beyond it on
    the good side, ``"FAIL"`` beyond it on the bad side or for a non-finite metric, ``"ref"``
    for the reference itself, ``None`` without a reference run.  Pure (no training)."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.model, r.variant), []).append(r)
    rows: dict[str, Any] = {}
    for (model, variant), members in groups.items():
        lm = model not in CLASSIFIERS
        values = [r.metric if lm else 100.0 * r.metric for r in members]
        by_seed = dict(zip((r.seed for r in members), values, strict=True))
        row: dict[str, Any] = {
            "model": model,
            "variant": variant,
            "metric": "val_loss" if lm else "test_acc_pct",
            "seeds": sorted(by_seed),
            "values": values,
            **_spread(values),
            "seconds": statistics.fmean(r.seconds for r in members),
            "params": members[0].params,
            "int8_params": members[0].int8_params,
            "int8_tensors": members[0].int8_tensors,
            "tensors": members[0].tensors,
            "state_nbytes": members[0].state_nbytes,
            "diff": None,
            "diff_unit": "percent" if lm else "points",
            "tolerance": loss_tolerance if lm else acc_tolerance,
            "paired": None,
            "verdict": None,
        }
        ref = groups.get((model, reference))
        if variant == reference:
            row["verdict"] = "ref"
        elif ref is not None:
            ref_values = [r.metric if lm else 100.0 * r.metric for r in ref]
            ref_mean = statistics.fmean(ref_values)
            ref_by_seed = dict(zip((r.seed for r in ref), ref_values, strict=True))
            if lm:
                diff = 100.0 * (row["mean"] / ref_mean - 1.0)
                paired = [
                    100.0 * (by_seed[s] / ref_by_seed[s] - 1.0) for s in by_seed if s in ref_by_seed
                ]
                better = diff < 0
            else:
                diff = row["mean"] - ref_mean
                paired = [by_seed[s] - ref_by_seed[s] for s in by_seed if s in ref_by_seed]
                better = diff > 0
            row["diff"] = diff
            row["paired"] = _spread(paired) if paired else None
            if not math.isfinite(diff):
                row["verdict"] = "FAIL"
            elif abs(diff) <= row["tolerance"]:
                row["verdict"] = "pass"
            else:
                row["verdict"] = "outside, better" if better else "FAIL"
        rows[f"{model} {variant}"] = row
    return {
        "reference": reference,
        "acc_tolerance_points": acc_tolerance,
        "loss_tolerance_percent": loss_tolerance,
        "rows": rows,
    }


def format_table(summary: dict[str, Any]) -> list[str]:
    """The summary as aligned text lines (one per model and variant)."""
    lines = [
        f"{'model':<5} {'variant':<14} {'n':>2} {'metric':<11} {'mean +- sd':>17} "
        f"{'vs ' + summary['reference']:>11} {'paired +- sd':>17} {'tol':>6}  {'verdict':<16}"
        f"{'int8 params':>18} {'state KiB':>10}"
    ]
    for row in summary["rows"].values():
        lm = row["metric"] == "val_loss"
        digits, unit = (4, "%") if lm else (2, "pt")
        spread = f"{row['mean']:.{digits}f} +- {row['sd']:.{digits}f}"
        diff = "--" if row["diff"] is None else f"{row['diff']:+.2f} {unit}"
        paired = (
            "--"
            if row["paired"] is None
            else f"{row['paired']['mean']:+.2f} +- {row['paired']['sd']:.2f}"
        )
        int8 = f"{row['int8_params']}/{row['params']}"
        lines.append(
            f"{row['model']:<5} {row['variant']:<14} {len(row['values']):>2} "
            f"{'val loss' if lm else 'test acc %':<11} {spread:>17} {diff:>11} {paired:>17} "
            f"{row['tolerance']:>4g}{unit:<2}  {row['verdict'] or '--':<16}{int8:>18} "
            f"{row['state_nbytes'] / 1024:>10.1f}"
        )
    return lines


# ---------------------------------------------------------------- plot


def _smooth(values: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    window = max(1, min(window, len(arr)))
    kernel = np.ones(window) / window
    smooth = np.convolve(arr, kernel, mode="valid")
    steps = np.arange(len(smooth)) + (window + 1) / 2
    return steps.tolist(), smooth.tolist()


def plot_curves(runs: Sequence[RunRecord], path: str | os.PathLike[str]) -> None:
    """Loss curves per variant, one column per model: top, the training loss (moving average,
    mean over seeds) with the test/validation loss as dots; bottom, the same two minus the
    ``fp32`` run's of the same seed, mean over seeds."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from adamkit.app.files import atomic_write

    models = list(dict.fromkeys(r.model for r in runs))
    figure = Figure(figsize=(5.2 * max(1, len(models)), 7.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, max(1, len(models)), squeeze=False)
    colors = dict(
        zip(
            VARIANTS,
            ("black", "tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:orange", "tab:green"),
            strict=True,
        )
    )
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        mine = [r for r in runs if r.model == model]
        ref = {r.seed: r for r in mine if r.variant == REFERENCE}
        window = 1
        for variant in dict.fromkeys(r.variant for r in mine):
            group = [r for r in mine if r.variant == variant]
            color = colors.get(variant)
            n = min(len(r.train_loss) for r in group)
            window = max(1, n // 40)
            mean_train = np.nanmean([r.train_loss[:n] for r in group], axis=0)
            xs, ys = _smooth(mean_train, window)
            top.plot(xs, ys, color=color, lw=1.2, label=f"{variant} (n={len(group)})")
            k = min(len(r.eval_loss) for r in group)
            steps = group[0].eval_steps[:k]
            top.plot(
                steps, np.nanmean([r.eval_loss[:k] for r in group], axis=0), "o", color=color, ms=4
            )
            paired = [(r, ref[r.seed]) for r in group if r.seed in ref]
            if not paired:
                continue
            m = min(n, *(len(b.train_loss) for _, b in paired))
            train_diff = np.mean(
                [np.asarray(r.train_loss[:m]) - np.asarray(b.train_loss[:m]) for r, b in paired],
                axis=0,
            )
            xs, ys = _smooth(train_diff, window)
            bottom.plot(xs, ys, color=color, lw=0.8, alpha=0.6)
            k = min(k, *(len(b.eval_loss) for _, b in paired))
            eval_diff = np.mean(
                [np.asarray(r.eval_loss[:k]) - np.asarray(b.eval_loss[:k]) for r, b in paired],
                axis=0,
            )
            bottom.plot(steps[:k], eval_diff, "o-", color=color, ms=4, lw=1.5, label=variant)
        what = "validation" if model not in CLASSIFIERS else "test"
        top.set_title(f"{model}: training loss (line), {what} loss (dots)", fontsize="medium")
        top.set_xlabel("step")
        top.set_ylabel("cross-entropy (nats)")
        top.legend(fontsize="small")
        bottom.axhline(0.0, color="grey", lw=0.8)
        bottom.set_title(
            f"{model}: minus {REFERENCE}'s (same seed, mean over seeds)\n{what} loss (dots), "
            f"training loss ({window}-step average, thin line)",
            fontsize="medium",
        )
        bottom.set_xlabel("step")
        bottom.set_ylabel("difference (nats)")
        bottom.legend(fontsize="small")
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png")


# ---------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``adamkit bench accuracy`` options to ``parser``."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    lm = LMSettings()
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 1 epoch on 5000 images, 40 LM steps",
    )
    parser.add_argument(
        "--models", type=csv_choice(MODELS), default=MODELS, help="default: mlp,cnn,gpt"
    )
    parser.add_argument(
        "--variants",
        type=csv_choice(tuple(VARIANTS)),
        default=DEFAULT_VARIANTS,
        help=f"default: {','.join(DEFAULT_VARIANTS)} (also: int8-companded, int8-companded-64)",
    )
    parser.add_argument(
        "--param-models",
        type=csv_choice(MODELS),
        default=("mlp", "gpt"),
        help="models that run the bf16p-* variants (default: mlp,gpt)",
    )
    parser.add_argument(
        "--seeds", type=int, help="seeds per model and variant (default 3, 1 with --quick)"
    )
    parser.add_argument("--epochs", type=int, help="classifier epochs (default 5, 1 with --quick)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="classifier batch (default 256)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="classifier Adam lr (default 1e-3)")
    parser.add_argument(
        "--train-images",
        type=int,
        help="classifier training images (default all, 5000 with --quick)",
    )
    parser.add_argument(
        "--gpt-steps", type=int, help=f"LM steps (default {lm.steps}, 40 with --quick)"
    )
    parser.add_argument(
        "--gpt-batch",
        type=int,
        default=lm.batch_size,
        help=f"LM windows per step (default {lm.batch_size:g})",
    )
    parser.add_argument(
        "--gpt-context",
        type=int,
        default=lm.context,
        help=f"LM context (bytes) (default {lm.context:g})",
    )
    parser.add_argument(
        "--gpt-layers", type=int, default=lm.layers, help=f"LM blocks (default {lm.layers:g})"
    )
    parser.add_argument(
        "--gpt-d-model", type=int, default=lm.d_model, help=f"LM width (default {lm.d_model:g})"
    )
    parser.add_argument(
        "--gpt-heads", type=int, default=lm.heads, help=f"LM attention heads (default {lm.heads:g})"
    )
    parser.add_argument(
        "--gpt-lr", type=float, default=lm.lr, help=f"LM AdamW peak lr (default {lm.lr:g})"
    )
    parser.add_argument(
        "--gpt-warmup",
        type=int,
        default=lm.warmup,
        help=f"LM warm-up steps (default {lm.warmup:g})",
    )
    parser.add_argument(
        "--gpt-weight-decay",
        type=float,
        default=lm.weight_decay,
        help=f"LM AdamW weight decay (default {lm.weight_decay:g})",
    )
    parser.add_argument(
        "--gpt-eval-every",
        type=int,
        default=lm.eval_every,
        help=f"LM steps between curve evaluations (default {lm.eval_every:g})",
    )
    parser.add_argument(
        "--gpt-eval-windows",
        type=int,
        default=lm.eval_windows,
        help=f"validation windows per curve evaluation (default {lm.eval_windows:g})",
    )
    parser.add_argument(
        "--text-root", help="folder of --text-files (default: this Python's stdlib)"
    )
    parser.add_argument(
        "--text-files",
        type=lambda text: tuple(v.strip() for v in text.split(",") if v.strip()),
        default=TEXT_FILES,
        help="comma-separated files under --text-root (default: 29 stdlib modules)",
    )
    parser.add_argument("--acc-tolerance", type=float, default=0.3, help="accuracy points (0.3)")
    parser.add_argument("--loss-tolerance", type=float, default=1.0, help="val loss percent (1)")
    parser.add_argument(
        "--data-dir", help="Fashion-MNIST folder or .npz (default: the app's search)"
    )
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def _source_state() -> dict[str, Any]:
    # Which code ran: the formats change between commits, so the numbers belong to one.
    import subprocess

    from adamkit import __version__

    here = Path(__file__).resolve().parent
    state: dict[str, Any] = {"adamkit": __version__}
    try:
        for key, cmd in (("commit", ["rev-parse", "HEAD"]), ("dirty", ["status", "--short"])):
            done = subprocess.run(
                ["git", *cmd], cwd=here, capture_output=True, text=True, timeout=10, check=True
            )
            state[key] = done.stdout.strip() if key == "commit" else bool(done.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout: the version is all there is
    return state


def _plan(args: argparse.Namespace) -> list[tuple[str, Variant]]:
    plan = []
    for model in args.models:
        for name in args.variants:
            variant = VARIANTS[name]
            if variant.dtype == "bf16" and model not in args.param_models:
                continue
            plan.append((model, variant))
    return plan


def run(args: argparse.Namespace) -> int:
    """Run the benchmark that ``args`` asks for; print the table and write JSON and PNG.

    Returns 0; 2 when Fashion-MNIST or the text cannot be read, or for a bad setting (message
    on stderr)."""
    from adamkit.app.errors import AppError

    quick = args.quick

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    n_seeds = given(args.seeds, 1 if quick else 3)
    seeds = tuple(range(max(0, n_seeds)))
    epochs = given(args.epochs, 1 if quick else 5)
    train_images = given(args.train_images, 5000 if quick else None)
    lm = LMSettings(
        steps=given(args.gpt_steps, 40 if quick else LMSettings.steps),
        batch_size=args.gpt_batch,
        context=args.gpt_context,
        layers=args.gpt_layers,
        d_model=args.gpt_d_model,
        heads=args.gpt_heads,
        lr=args.gpt_lr,
        warmup=args.gpt_warmup,
        weight_decay=args.gpt_weight_decay,
        eval_every=args.gpt_eval_every,
        eval_windows=args.gpt_eval_windows,
    )
    bad = first_below_one(
        (
            ("--seeds", n_seeds),
            ("--epochs", epochs),
            ("--batch-size", args.batch_size),
            ("--gpt-steps", lm.steps),
            ("--gpt-batch", lm.batch_size),
            ("--gpt-eval-every", lm.eval_every),
            ("--gpt-eval-windows", lm.eval_windows),
            ("--threads", args.threads),
            ("--train-images", 1 if train_images is None else train_images),
        )
    )
    if bad:
        print(f"adamkit bench accuracy: {bad}", file=sys.stderr)
        return 2
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    json_path, png_path = out / f"state-accuracy{tag}.json", out / f"state-accuracy{tag}.png"
    plan = _plan(args)
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "command": " ".join(sys.argv),
        "settings": {
            "models": list(args.models),
            "variants": {name: VARIANTS[name]._asdict() for name in args.variants},
            "param_models": list(args.param_models),
            "seeds": list(seeds),
            "classifier": {
                "optimizer": "adamkit.torch.Adam, guard=False",
                "lr": args.lr,
                "epochs": epochs,
                "batch_size": args.batch_size,
                "train_images": train_images,
            },
            "gpt": {"optimizer": "adamkit.torch.AdamW, guard=False", **asdict(lm)},
            "acc_tolerance_points": args.acc_tolerance,
            "loss_tolerance_percent": args.loss_tolerance,
            "quick": quick,
        },
        "machine": machine_info(),
        "source": _source_state(),
        "data": {},
    }

    def say(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
        json_path.write_text(json.dumps(document, indent=1) + "\n")

    models = list(dict.fromkeys(model for model, _ in plan))
    try:
        fashion = None
        if set(models) & set(CLASSIFIERS):
            fashion = load_fashion(args.data_dir)
            if train_images:
                fashion = subset(fashion, train_images)
            document["data"]["fashion-mnist"] = {
                "source": fashion.source,
                "train": len(fashion.y_train),
                "test": len(fashion.y_test),
            }
        corpus = None
        if "gpt" in models:
            corpus = load_text(args.text_files, args.text_root)
            document["data"]["text"] = corpus.info
            say(
                f"text: {len(corpus.info['files'])} files under {corpus.info['root']}, "
                f"{corpus.info['bytes']} bytes ({corpus.info['train_bytes']} train, "
                f"{corpus.info['val_bytes']} validation), sha256 {corpus.info['sha256'][:16]}"
            )
    except AppError as exc:
        print(f"adamkit bench accuracy: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    runs: list[RunRecord] = []

    def report(final: bool) -> None:
        # After each model: the summary so far, JSON and PNG, so a cut-short run still reports.
        summary = summarize(
            runs, acc_tolerance=args.acc_tolerance, loss_tolerance=args.loss_tolerance
        )
        document["runs"] = [asdict(r) for r in runs]
        document["summary"] = summary
        document["seconds"] = time.perf_counter() - started
        document["complete"] = final
        document["machine"]["loadavg_end"] = machine_info()["loadavg"]
        save()
        plot_curves(runs, png_path)
        if final:
            say(
                f"final metric per model and variant over seeds {list(seeds)} (criteria: within "
                f"{args.acc_tolerance:g} points / {args.loss_tolerance:g}% of {REFERENCE}):"
            )
        for line in format_table(summary):
            say("  " + line)

    for index, (model, variant) in enumerate(plan):
        for seed in seeds:
            if model == "gpt" and corpus is not None:
                try:
                    record = train_lm(corpus, variant=variant, seed=seed, settings=lm)
                except ValueError as exc:
                    print(f"adamkit bench accuracy: {exc}", file=sys.stderr)
                    return 2
            elif fashion is not None:
                record = train_classifier(
                    fashion,
                    model=model,
                    variant=variant,
                    seed=seed,
                    epochs=epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                )
            else:  # pragma: no cover - the data of every planned model was loaded above
                raise RuntimeError(f"no data loaded for {model}")
            runs.append(record)
            what = (
                f"val loss {record.metric:.4f}"
                if model == "gpt"
                else f"test acc {100 * record.metric:.2f}%"
            )
            say(
                f"  {model:<4} {variant.name:<14} seed {seed}: {what}  ({record.steps} steps, "
                f"{record.seconds:.1f}s; int8 {record.int8_params}/{record.params} params)"
            )
            document["runs"] = [asdict(r) for r in runs]
            save()
        last = index == len(plan) - 1
        if not last and plan[index + 1][0] != model:
            report(final=False)
    report(final=True)
    say(f"results in {json_path} and {png_path} ({document['seconds']:.0f}s)")
    return 0
