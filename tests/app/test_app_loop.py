"""The training loop's events and resumable state, the progress display, atomic writes."""

from __future__ import annotations

import io

import pytest
import torch

from adamkit.app.files import atomic_write
from adamkit.app.loop import EVENTS, Trainer, TrainingInterrupted
from adamkit.app.model import build_mlp
from adamkit.app.report import PlainProgress, TqdmProgress, make_progress


def _trainer(epochs=2, seed=0, n=10, batch_size=4):
    data_gen = torch.Generator().manual_seed(1234)  # the same data whatever the seed
    x = torch.rand(n, 3, 2, generator=data_gen)
    y = torch.randint(0, 10, (n,), generator=data_gen)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_mlp((3, 2), hidden=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Trainer(
        model, optimizer, x, y, x[:4], y[:4], epochs=epochs, batch_size=batch_size, generator=gen
    )


def test_events_in_order():
    trainer = _trainer(epochs=2)
    seen = []
    for event in EVENTS:
        trainer.add_callback(event, lambda t, e=event: seen.append((e, t.epoch, t.batch)))
    history = trainer.run()
    batches = [("batch_end", 0, 1), ("batch_end", 0, 2), ("batch_end", 0, 3)]
    assert seen == [
        ("train_start", 0, 0),
        ("epoch_start", 0, 0),
        *batches,
        ("epoch_end", 1, 0),
        ("epoch_start", 1, 0),
        *[(e, 1, b) for e, _, b in batches],
        ("epoch_end", 2, 0),
        ("train_end", 2, 0),
    ]
    assert [r.epoch for r in history] == [1, 2] and history[-1].step == 6
    with pytest.raises(ValueError, match="event must be one of"):
        trainer.add_callback("on_step", print)


def test_stop_mid_epoch_then_resume_matches_uninterrupted():
    reference = _trainer(epochs=3)
    reference.run()

    first = _trainer(epochs=3)
    interrupts = []
    first.add_callback("batch_end", lambda t: t.step == 5 and t.request_stop())
    first.add_callback("interrupt", lambda t: interrupts.append((t.epoch, t.batch)))
    with pytest.raises(TrainingInterrupted, match="in epoch 2 of 3, after batch 2/3"):
        first.run()
    assert interrupts == [(1, 2)]
    saved_model = {k: v.clone() for k, v in first.model.state_dict().items()}
    saved_optimizer = first.optimizer.state_dict()
    saved_loop = first.state_dict()

    # A fresh trainer (different seed, so nothing is shared by accident) restored from the state.
    second = _trainer(epochs=3, seed=99)
    second.model.load_state_dict(saved_model)
    second.optimizer.load_state_dict(saved_optimizer)
    second.load_state_dict(saved_loop)
    second.run()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert reference.history == [
        r.__class__(**{**r.as_dict(), "seconds": ref.seconds})
        for r, ref in zip(second.history, reference.history, strict=True)
    ]


def test_load_state_dict_rejects_a_foreign_position():
    trainer = _trainer(epochs=2)
    state = trainer.state_dict()
    with pytest.raises(ValueError, match="does not fit 3 batches per epoch"):
        trainer.load_state_dict({**state, "batch": 7})
    with pytest.raises(ValueError, match="lacks history"):
        trainer.load_state_dict({k: v for k, v in state.items() if k != "history"})


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_lines_otherwise():
    assert isinstance(make_progress(io.StringIO()), PlainProgress)
    terminal = _Terminal()
    progress = make_progress(terminal)
    assert isinstance(progress, TqdmProgress)
    trainer = _trainer(epochs=2)
    progress.attach(trainer)
    trainer.run()
    text = terminal.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "loss=" in text and "acc=" in text and "test_acc=" in text

    plain = io.StringIO()
    trainer = _trainer(epochs=2)
    PlainProgress(plain).attach(trainer)
    trainer.run()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2") and "test_acc" in lines[1]


def test_atomic_write_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, binary=False) as handle:
        handle.write("new, half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with atomic_write(target, binary=False) as handle:
        handle.write("new")
    assert target.read_text() == "new"
