"""``adamkit train --guard``: the flag, the CSV columns, the summary line, config.json, resume, and
faults injected through the loop (skipped steps are counted and training survives)."""

from __future__ import annotations

import csv
import json
import math
import signal

import pytest
import torch
from matplotlib import image as mpimg

from adamkit.app import loop
from adamkit.app.config import TrainConfig
from adamkit.app.data import load_digits
from adamkit.app.loop import BASE_COLUMNS, GUARD_COLUMNS, Trainer
from adamkit.app.model import build_mlp
from adamkit.app.plots import PIXELS
from adamkit.app.report import guard_summary
from adamkit.guard import GuardConfig
from adamkit.torch import Adam

FIRST_RELEASE_COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "seconds",
)
COUNTS = ("skipped_nonfinite", "skipped_loss_spike", "rollbacks", "grad_clipped", "update_clipped")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _header(path):
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where="root"):
    """Exact equality of nested dicts/lists/tensors (a checkpoint's optimizer state)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_all_writes_guard_columns_summary_config_and_panel(isolated, run_cli):
    code, out, err = run_cli("train", "--guard", "all", "--epochs", "3", "--out", "g")
    assert code == 0, err
    header = _header(isolated / "g" / "metrics.csv")
    assert tuple(header[: len(FIRST_RELEASE_COLUMNS)]) == FIRST_RELEASE_COLUMNS
    assert tuple(header) == BASE_COLUMNS + GUARD_COLUMNS
    assert set(GUARD_COLUMNS) >= {"grad_norm", "update_norm", "update_ratio", *COUNTS}
    rows = _rows(isolated / "g" / "metrics.csv")
    for row in rows:
        assert 0.0 < float(row["grad_norm"]) <= float(row["grad_norm_max"])
        # Adam moves each weight by about lr per step; the 64x128 + 128x10 weights are O(0.1).
        assert 0.0 < float(row["update_ratio"]) < 0.1 and float(row["update_norm"]) > 0.0
        assert all(int(row[name]) >= 0 for name in COUNTS)
    totals = {name: sum(int(r[name]) for r in rows) for name in COUNTS}
    # "all" clips only a 4-fold underestimate of v_hat (rms_threshold=2), which healthy digits
    # training may never show; the summary must report the CSV's totals either way.
    n = totals["update_clipped"]
    (line,) = [x for x in out.splitlines() if x.startswith("guard (all): ")]
    assert (f"{n} update" in line) == (n > 0)
    assert line.endswith(f"in {3 * 45} steps")
    document = json.loads((isolated / "g" / "config.json").read_text())
    assert document["settings"]["guard"] == "all"
    assert document["guard"] == {
        "setting": "all",
        "active": True,
        "how": "built-in",
        "config": GuardConfig.all().to_dict(),
    }
    assert mpimg.imread(isolated / "g" / "curves.png").shape[:2] == (PIXELS[1], PIXELS[0])


def test_default_off_and_wrapped_torch_optimizers(isolated, run_cli):
    runs = {
        "default": ("--epochs", "1"),
        "off": ("--epochs", "1", "--guard", "off"),
        "torch": ("--epochs", "1", "--optimizer", "torch-adam"),
        "sgd-all": ("--epochs", "1", "--optimizer", "sgd", "--guard", "all"),
    }
    outputs = {}
    for name, argv in runs.items():
        code, out, err = run_cli("train", *argv, "--out", name)
        assert code == 0, err
        outputs[name] = out
        assert _header(isolated / name / "metrics.csv") == list(loop.COLUMNS)
    guards = {n: json.loads((isolated / n / "config.json").read_text())["guard"] for n in runs}
    # The default guard of adamkit: non-finite skip only, and it is not written to the settings
    # (files of runs that do not use --guard stay readable by the first release).
    assert guards["default"]["config"] == GuardConfig().to_dict()
    assert "guard" not in json.loads((isolated / "default" / "config.json").read_text())["settings"]
    assert (
        "guard (default): nothing skipped, clipped or rolled back in 45 steps" in outputs["default"]
    )
    row = _rows(isolated / "default" / "metrics.csv")[0]
    assert float(row["grad_norm"]) > 0.0 and row["update_norm"] == ""  # not measured by default
    for name in ("off", "torch"):
        assert guards[name] == {
            "setting": guards[name]["setting"],
            "active": False,
            "how": None,
            "config": None,
        }
        assert all(
            v == ""
            for k, v in _rows(isolated / name / "metrics.csv")[0].items()
            if k in GUARD_COLUMNS
        )
        assert "guard" not in outputs[name].replace("--guard", "")
    assert guards["sgd-all"]["how"] == "GuardedOptimizer"
    assert guards["sgd-all"]["config"] == GuardConfig.all(update_clip=None).to_dict()
    assert "guard (all): " in outputs["sgd-all"]
    # --guard off is plain Adam: torch.optim.Adam's run up to adamkit's rounding (its CPU kernel
    # is not bit-identical to torch's ops).
    off, plain = (
        _rows(isolated / "off" / "metrics.csv")[0],
        _rows(isolated / "torch" / "metrics.csv")[0],
    )
    for column in ("train_loss", "test_loss", "test_acc"):
        assert float(off[column]) == pytest.approx(float(plain[column]), rel=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--guard", "some"], "argument --guard: invalid choice: 'some'"),
        (["--framework", "keras", "--guard", "all"], "--guard all is not available with"),
    ],
)
def test_bad_guard_settings(isolated, run_cli, argv, message):
    code, _out, err = run_cli("train", *argv, "--out", "o")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (isolated / "o").exists()


def test_config_round_trip_and_resume_cannot_change_the_guard(isolated, run_cli):
    assert "guard" not in TrainConfig().to_dict()
    stored = TrainConfig(guard="all").to_dict()
    assert stored["guard"] == "all" and TrainConfig.from_dict(stored).guard == "all"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).guard == "default"
    assert run_cli("train", "--epochs", "1", "--hidden", "8", "--out", "r")[0] == 0
    code, _out, err = run_cli(
        "train", "--resume", "r/checkpoint.pt", "--guard", "all", "--epochs", 2
    )
    assert code == 2 and "--guard all differs from the checkpoint's default" in err


@pytest.mark.parametrize("optimizer", ["adamkit", "torch-adam"])
def test_mid_epoch_resume_with_guard_all_is_bit_identical(
    isolated, run_cli, monkeypatch, optimizer
):
    # 4 epochs of 45 steps: the loss and gradient statistics are warm and a snapshot (taken
    # every 100 updates) exists when the run is cut at step 120, mid-epoch.
    argv = ("--guard", "all", "--optimizer", optimizer, "--epochs", "4", "--hidden", "32")
    assert run_cli("train", *argv, "--out", "full")[0] == 0
    original = loop.Trainer._train_batch

    def press_ctrl_c_at_step_120(self, x, y):
        original(self, x, y)
        if self.step == 120:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop.Trainer, "_train_batch", press_ctrl_c_at_step_120)
    assert run_cli("train", *argv, "--out", "cut")[0] == 130
    saved = _load(isolated / "cut" / "checkpoint.pt")
    assert saved["trainer"]["batch"] == 30 and saved["optimizer"]["guard"]["snapshot"] is not None
    monkeypatch.setattr(loop.Trainer, "_train_batch", original)
    code, _out, err = run_cli("train", "--resume", "cut/checkpoint.pt")
    assert code == 0, err
    full, cut = (
        _load(isolated / "full" / "checkpoint.pt"),
        _load(isolated / "cut" / "checkpoint.pt"),
    )
    _assert_same(full["model"], cut["model"])
    _assert_same(full["optimizer"], cut["optimizer"])  # moments, guard statistics, snapshot
    full_rows = _without_seconds(_rows(isolated / "full" / "metrics.csv"))
    assert full_rows == _without_seconds(_rows(isolated / "cut" / "metrics.csv"))
    assert full_rows[-1]["grad_norm"] != ""


# --------------------------------------------------------------------------- faults in the loop


def _digits_trainer(guard, *, epochs=3, seed=0):
    data = load_digits()
    tensors = [torch.from_numpy(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)]
    torch.manual_seed(seed)
    model = build_mlp(data.image_shape, 32)
    optimizer = Adam(model.parameters(), lr=3e-3, guard=guard)
    trainer = Trainer(
        model,
        optimizer,
        *tensors,
        epochs=epochs,
        batch_size=32,
        generator=torch.Generator().manual_seed(seed),
    )
    return trainer, model


def _inject(trainer, model, *, nan_steps=(), inf_steps=(), loud_steps=()):
    """NaN/Inf gradients on the first layer at ``nan_steps``/``inf_steps`` (0-based optimizer
    steps); inputs multiplied by 1000 and labels shifted at ``loud_steps``."""
    weight = model[1].weight

    def poison(grad):
        if trainer.step in nan_steps:
            return torch.full_like(grad, math.nan)
        if trainer.step in inf_steps:
            return grad * math.inf
        return grad

    weight.register_hook(poison)
    original = trainer._train_batch

    def batch(x, y):
        if trainer.step in loud_steps:
            # Confidently wrong: a loss far above the running mean whatever the weights are.
            x, y = x * 1000.0, (y + 1) % 10
        original(x, y)

    trainer._train_batch = batch


def test_injected_nonfinite_gradients_are_skipped_and_counted(isolated):
    clean, _ = _digits_trainer(True)
    clean.run()
    guarded, model = _digits_trainer(True)
    _inject(guarded, model, nan_steps={5, 50, 51}, inf_steps={100})
    with pytest.warns(UserWarning, match="non-finite gradients"):
        history = guarded.run()
    assert [r.skipped_nonfinite for r in history] == [1, 2, 1]  # 45 steps per epoch
    assert all(r.rollbacks == 0 and r.skipped_loss_spike == 0 for r in history)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(history[-1].test_acc - clean.history[-1].test_acc) <= 0.02
    assert guard_summary(history, "default").startswith("guard (default): 4 steps skipped (non-")
    unguarded, model = _digits_trainer(False)
    _inject(unguarded, model, nan_steps={5})
    history = unguarded.run()
    assert not torch.isfinite(model[1].weight).any()  # one NaN gradient poisons Adam for good
    assert history[-1].skipped_nonfinite is None and history[-1].test_acc < 0.2


def test_injected_loud_batches_are_loss_spikes_under_guard_all(isolated):
    clean, _ = _digits_trainer("all", epochs=6)
    clean.run()
    guarded, model = _digits_trainer("all", epochs=6)
    # Two loud batches are skipped, a third one later too; three in a row at steps 150-152 roll
    # back to the snapshot taken after 100 applied updates (about step 103).
    _inject(guarded, model, loud_steps={60, 61, 70, 150, 151, 152})
    history = guarded.run()
    skipped = [r.skipped_loss_spike for r in history]
    rolled = [r.rollbacks for r in history]
    assert skipped == [0, 3, 0, 2, 0, 0] and rolled == [0, 0, 0, 1, 0, 0]
    assert clean.history[-1].test_acc > 0.9
    assert abs(history[-1].test_acc - clean.history[-1].test_acc) <= 0.03
    line = guard_summary(history, "all")
    assert "guard (all): 5 steps skipped (loss spike), 1 rollback" in line
