"""``adamkit train --nproc N``: data-parallel training on N local processes.

The parent (the ``adamkit`` process) has checked the settings, read the data and printed the
header; :func:`train_parallel` spawns N workers (``torch.multiprocessing``, start method
``spawn``) and waits for them.  Each worker joins a ``torch.distributed`` process group over
127.0.0.1 and a free port (gloo on the CPU; NCCL with one GPU per rank when CUDA offers N GPUs
and no ``--state`` format is asked for, since those formats are CPU-only), builds the same model,
optimizer and data order as a single process would (``train.build_torch_trainer``, same seed)
and trains it wrapped in ``DistributedDataParallel``, one intra-op thread per rank.

Same results as one process, up to the order of floating-point sums: every rank draws the same
permutation and takes its contiguous part of each global batch (rank r of N gets elements
``B*r//N`` to ``B*(r+1)//N``; a rank gets none when the batch is smaller than N).  Its loss is
the sum of its cross-entropies times ``N / B``, so that DDP's mean of the ranks' gradients is the
gradient of the global batch's mean loss.  Per batch one ``all_reduce`` sums the loss, the
correct count and a stop flag; evaluation splits the test set the same way.  Every rank loads the
checkpoint being resumed (rank 0's, the only one written); rank 0 alone writes ``config.json``,
``metrics.csv``, ``curves.png`` and ``checkpoint.pt`` and prints the progress (to the file
descriptor of the parent's stdout).  adamkit's stability guard finds the process group itself
and decides on every rank together.

Ctrl-C: the workers ignore SIGINT.  The parent's first Ctrl-C sets a shared event; the ranks
agree on it in the next batch's ``all_reduce``, so all stop after the same batch, rank 0 writes
the checkpoint, and the parent exits 130 as one process would.  A second Ctrl-C, or workers that
have not stopped :data:`GRACE_SECONDS` after the first, are terminated at once.  A worker that
fails takes the others down: the parent terminates them and re-raises the first error (an
``AppError`` keeps its one-line message and exit status 2).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from adamkit.app import errors
from adamkit.app.loop import EpochRecord, Trainer

__all__ = ["GRACE_SECONDS", "DistributedTrainer", "shard_bounds", "train_parallel"]

#: Seconds the workers get, after the first Ctrl-C, to stop and write the checkpoint.
GRACE_SECONDS = 60.0
_POLL_SECONDS = 0.2


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous part of ``size`` items split ``world`` ways.

    Parts differ in size by at most one and cover ``range(size)`` in rank order.
    """
    return size * rank // world, size * (rank + 1) // world


class DistributedTrainer(Trainer):
    """A :class:`~adamkit.app.loop.Trainer` for one rank of an initialized process group.

    Takes ``Trainer``'s arguments plus ``rank``, ``world`` (the group's size), ``stop_event``
    (an object with ``is_set()``, set by the parent on Ctrl-C) and ``device``.  The model is moved
    to ``device`` and trained through ``DistributedDataParallel``; ``self.model`` stays the plain
    module, so checkpoints hold the same keys as a single process's.  Batches and metrics are
    split and reduced as the module docstring says; every rank gets the same numbers.
    """

    def __init__(
        self,
        *args: Any,
        rank: int,
        world: int,
        stop_event: Any,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world, self.device = rank, world, device
        self._stop_event = stop_event
        self._local_stop = False
        self.model.to(device)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    def request_stop(self) -> None:
        """Ask every rank to stop; they agree on it at the next batch's ``all_reduce``."""
        self._local_stop = True

    def _sum(self, *values: float) -> list[float]:
        # One all_reduce of a few numbers (float64: counts stay exact); equal on every rank.
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        start, stop = shard_bounds(len(y), self.rank, self.world)
        xs, ys = x[start:stop].to(self.device), y[start:stop].to(self.device)
        logits = self.ddp(xs)
        loss_sum = F.cross_entropy(logits, ys, reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: N / B makes that the global batch's mean-loss gradient.
        (loss_sum * (self.world / len(y))).backward()
        correct = int((logits.detach().argmax(dim=1) == ys).sum().item())
        stopping = self._local_stop or self._stop_event.is_set()
        total_loss, total_correct, stops = self._sum(
            float(loss_sum.item()), float(correct), float(stopping)
        )
        self._stop_requested = stops > 0
        count = len(y)
        mean_loss = total_loss / count
        if self.guarded:
            self.optimizer.step(loss=torch.tensor(mean_loss, dtype=torch.float32))
            self._record_guard(self.optimizer.guard_diagnostics)
        else:
            self.optimizer.step()
        self.step += 1
        self.last_loss = mean_loss
        self.last_acc = total_correct / count
        self._sums["loss"] += total_loss
        self._sums["correct"] += int(total_correct)
        self._sums["seen"] += count

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on ``(x, y)``, each rank evaluating its part."""
        was_training = self.model.training
        self.model.eval()
        start, stop = shard_bounds(len(x), self.rank, self.world)
        loss_sum, correct = 0.0, 0
        for first in range(start, stop, self.eval_batch_size):
            last = min(first + self.eval_batch_size, stop)
            xb, yb = x[first:last].to(self.device), y[first:last].to(self.device)
            logits = self.model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum").item())
            correct += int((logits.argmax(dim=1) == yb).sum().item())
        self.model.train(was_training)
        total_loss, total_correct = self._sum(loss_sum, float(correct))
        return total_loss / len(x), total_correct / len(x)


class _StopSignal:
    """Set when the parent asks to stop (Ctrl-C) or is gone (killed: nobody would end the run)."""

    def __init__(self, event: Any) -> None:
        self.event = event
        self.parent = os.getppid()

    def is_set(self) -> bool:
        return bool(self.event.is_set()) or os.getppid() != self.parent


@dataclass(frozen=True)
class _Job:
    """What every worker receives (pickled by the spawn start method)."""

    session: Any  # train._Session without its stdout
    name: str
    run_dir: Path
    prefix: str
    nproc: int
    port: int


@dataclass
class _Finished:
    """What :func:`train_parallel` returns: the ``history`` rank 0 trained (as a Trainer has)."""

    history: list[EpochRecord]


def _backend_and_device(rank: int, nproc: int, state: str | None) -> tuple[str, torch.device]:
    if state is None and torch.cuda.is_available() and torch.cuda.device_count() >= nproc:
        return "nccl", torch.device("cuda", rank)
    return "gloo", torch.device("cpu")


def _worker(rank: int, job: _Job, stop_event: Any, results: Any) -> None:
    """One rank: join the group, train, report to ``results`` (rank 0 its outcome, any rank
    its failure as ``("error", rank, class name, message)`` or ``("crash", rank, traceback)``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; see the module docstring
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(job.port)
    config = job.session.config
    backend, device = _backend_and_device(rank, job.nproc, config.state)
    try:
        from adamkit.app import train
        from adamkit.app.loop import TrainingInterrupted

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=job.nproc)
        # The checkpoint arrives in shared memory, and torch's Optimizer.load_state_dict keeps
        # tensors that already have the right dtype: without a private copy every rank would
        # update the same moments in place.
        payload = copy.deepcopy(job.session.payload)
        session = dataclasses.replace(job.session, stdout=sys.stdout, payload=payload)
        make = functools.partial(
            DistributedTrainer,
            rank=rank,
            world=job.nproc,
            stop_event=_StopSignal(stop_event),
            device=device,
        )
        trainer = train.build_torch_trainer(
            session, job.name, job.run_dir, job.prefix, make_trainer=make, primary=rank == 0
        )
        try:
            trainer.run()
        except TrainingInterrupted as exc:
            if rank == 0:
                results.put(("interrupted", str(exc)))
        else:
            if rank == 0:
                results.put(("done", [record.as_dict() for record in trainer.history]))
    except errors.AppError as exc:
        results.put(("error", rank, type(exc).__name__, str(exc)))
    except BaseException:
        results.put(("crash", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Leave without the interpreter's teardown: a native thread still joinable then ended a
        # finished rank with SIGABRT ("terminate called without an active exception", seen once
        # in CI), and the parent took the abort for a crash before rank 0 had reported.  The
        # message queue is flushed first; what a rank has to say is in it.
        results.close()
        results.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _free_port() -> int:
    # The port is free now; the small window until rank 0 binds it again is accepted.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    # Spawned workers inherit an ignored SIGINT, so a Ctrl-C while they import torch is harmless.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _count_sigint(presses: list[float], stop_event: Any) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        presses.append(time.monotonic())
        stop_event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _terminate(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def _drain(results: Any, messages: list[tuple[Any, ...]]) -> None:
    while True:
        try:
            messages.append(results.get_nowait())
        except Exception:  # queue.Empty; the queue module is not worth importing for it
            return


def _supervise(processes: list[Any], results: Any, stop_event: Any) -> list[tuple[Any, ...]]:
    """Wait for the workers; return their messages.  Raises ``KeyboardInterrupt`` after
    terminating them on a second Ctrl-C or when they outlast :data:`GRACE_SECONDS`."""
    from multiprocessing.connection import wait

    messages: list[tuple[Any, ...]] = []
    presses: list[float] = []
    with _count_sigint(presses, stop_event):
        while True:
            _drain(results, messages)
            if any(message[0] in ("error", "crash") for message in messages):
                break  # the others may wait forever in a collective
            alive = [p for p in processes if p.is_alive()]
            if not alive:
                break
            if any(p.exitcode not in (None, 0) for p in processes):
                break
            if len(presses) > 1 or (presses and time.monotonic() - presses[0] > GRACE_SECONDS):
                _terminate(processes)
                raise KeyboardInterrupt
            wait([p.sentinel for p in alive], timeout=_POLL_SECONDS)
    _terminate(processes)
    _drain(results, messages)
    return messages


def _raise_failure(messages: list[tuple[Any, ...]], processes: list[Any]) -> None:
    failures = sorted(
        (m for m in messages if m[0] in ("error", "crash")), key=lambda m: (m[0] == "crash", m[1])
    )
    if failures:
        failure = failures[0]
        if failure[0] == "error":
            kind = getattr(errors, failure[2], errors.AppError)
            raise kind(failure[3])
        raise RuntimeError(f"adamkit train --nproc: rank {failure[1]} failed:\n{failure[2]}")
    codes = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode != 0}
    raise RuntimeError(f"adamkit train --nproc: worker(s) exited without a result: {codes}")


def train_parallel(session: Any, name: str, run_dir: Path, prefix: str) -> _Finished:
    """Train optimizer ``name`` on ``session.config.nproc`` processes into ``run_dir``.

    ``session`` is ``train.py``'s; returns an object with the ``history`` of the run.  Raises
    ``TrainingInterrupted`` (Ctrl-C, checkpoint written by rank 0), ``KeyboardInterrupt``
    (workers terminated), a worker's ``AppError``, or ``RuntimeError`` when a worker crashed.
    """
    from adamkit.app.loop import TrainingInterrupted

    nproc = session.config.nproc
    backend, _ = _backend_and_device(0, nproc, session.config.state)
    print(f"  data-parallel: {nproc} processes ({backend})", file=session.stdout, flush=True)
    context = torch.multiprocessing.get_context("spawn")
    stop_event = context.Event()
    results = context.Queue()
    job = _Job(
        dataclasses.replace(session, stdout=None), name, run_dir, prefix, nproc, _free_port()
    )
    processes = [
        context.Process(target=_worker, args=(rank, job, stop_event, results), daemon=True)
        for rank in range(nproc)
    ]
    try:
        with _sigint_ignored():
            for process in processes:
                process.start()
        messages = _supervise(processes, results, stop_event)
    finally:
        _terminate(processes)
    for message in messages:
        if message[0] == "done" and not any(m[0] in ("error", "crash") for m in messages):
            return _Finished([EpochRecord(**record) for record in message[1]])
        if message[0] == "interrupted":
            raise TrainingInterrupted(message[1])
    if stop_event.is_set() and not any(m[0] in ("error", "crash") for m in messages):
        raise KeyboardInterrupt
    _raise_failure(messages, processes)
    raise AssertionError("unreachable")  # pragma: no cover
