"""The collective stability guard under real process groups: what the ranks run, what the test
process compares it with.

Every sub-case of the ``guard`` scenario trains the model of _dist_cases on each rank's half of
the global batches for a few steps, with something that only one rank sees (a NaN written into
one rank's gradients after DDP's all-reduce, a NaN in one rank's FSDP2 shard, a NaN in a
parameter that ZeRO gives to the other rank, a loss spike on one rank), and records per step
whether the update was applied, the guard's diagnostics and how many collectives
``optimizer.step()`` issued (counted twice: calls of ``torch.distributed.all_reduce``, and every
gloo collective the profiler sees, including DTensor's own).  The references are single-process
runs on the same global batches (gradients accumulated over the two halves, see _dist_cases):
a skipped step is simply left out of the reference, which has no guard at all (``guard=False``),
so the comparison does not lean on the code under test.

Losses given to the guard are synthetic (:func:`rank_loss`) so that a spike can be placed on one
rank exactly; the single-process reference gives :func:`mean_loss`, the mean the guard must
judge.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from _dist_cases import (
    load_checkpoint,
    loss_fn,
    make_batches,
    make_model,
    param_snapshot,
    rank_slice,
    state_snapshot,
)
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import adamkit.torch as at
from adamkit.torch.distributed import guard_checkpoint_state, load_guard_checkpoint

WORLD_SIZE = 2
STEPS = 5
NAN_STEP = 2  # the step whose gradients hold a NaN somewhere (0-based)
LR = 1e-2

# Loss-spike handling judged from the 3rd loss on; a spike must be 50% above the running mean.
LOSS_GUARD = {
    "skip_nonfinite": True,
    "loss_spike": True,
    "loss_warmup": 2,
    "loss_alpha": 0.9,
    "loss_z": 0.5,
    "loss_margin": 0.5,
    "loss_patience": 10,
    "snapshot_interval": 0,
}
LOSS_STEPS = 7
BIG_STEP = 4  # rank 1 reports 40: the mean is a spike on every rank
MODERATE_STEP = 5  # rank 1 reports 1.9: a spike for rank 1 alone, not for the mean

# For checkpoints: every stateful part of the guard in use, a rollback after the resume.
DCP_GUARD = {
    "skip_nonfinite": True,
    "grad_spike": True,
    "grad_warmup": 2,
    "grad_z": 1.0,
    "loss_spike": True,
    "loss_warmup": 2,
    "loss_alpha": 0.9,
    "loss_z": 0.5,
    "loss_margin": 0.5,
    "loss_patience": 1,
    "snapshot_interval": 2,
    "lr_factor": 0.5,
    "lr_cooldown": 2,
}
DCP_STEPS = 4
DCP_MORE_STEPS = 3
DCP_SPIKE_STEP = 5  # after the resume: one spike, loss_patience 1 -> roll back to the snapshot


def rank_loss(rank: int, step: int, spikes: dict[int, float] | None = None) -> float:
    """The loss rank ``rank`` reports at ``step``: a slow drift, rank 1 a little higher, and for
    rank 1 the value in ``spikes`` at those steps."""
    if rank == 1 and spikes and step in spikes:
        return spikes[step]
    return 1.0 + 0.02 * step + 0.05 * rank


def mean_loss(step: int, spikes: dict[int, float] | None = None) -> float:
    """What the guard must judge: the ranks' losses added in rank order, over their count."""
    return sum(rank_loss(rank, step, spikes) for rank in range(WORLD_SIZE)) / WORLD_SIZE


LOSS_SPIKES = {BIG_STEP: 40.0, MODERATE_STEP: 1.9}
DCP_SPIKES = {DCP_SPIKE_STEP: 40.0}


# -- the single-process side --------------------------------------------------------------------


def reference_train(
    seed: int,
    steps: int,
    *,
    skip: frozenset[int] = frozenset(),
    make: Callable[[Any], torch.optim.Optimizer] | None = None,
    losses: Callable[[int], float] | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer, list[dict[str, Any]]]:
    """One process, gradients accumulated over the ranks' halves of each global batch; steps in
    ``skip`` are left out.  Default optimizer: Adam without a guard.  Returns the model, the
    optimizer and per step the float64 norm of the accumulated gradient and, with a guard, its
    diagnostics."""
    if model is None:
        model = make_model(seed)
    if optimizer is None:
        optimizer = (make or (lambda p: at.Adam(p, lr=LR, guard=False)))(model.named_parameters())
    records = []
    for index, batch in enumerate(make_batches(seed, steps - start, start=start)):
        step = start + index
        if step in skip:
            continue
        optimizer.zero_grad()
        for rank in range(WORLD_SIZE):
            x, y = rank_slice(batch, rank, WORLD_SIZE)
            (loss_fn(model, x, y) / WORLD_SIZE).backward()
        norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()])
        kwargs = {} if losses is None else {"loss": losses(step)}
        optimizer.step(**kwargs)
        diagnostics = getattr(optimizer, "guard_diagnostics", None)
        records.append({"grad_norm": norm.sum().sqrt().item(), "diagnostics": diagnostics})
    return model, optimizer, records


# -- the rank side ------------------------------------------------------------------------------


class _Counter:
    """Counts calls of torch.distributed.all_reduce (the guard looks it up at call time)."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = torch.distributed.all_reduce

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.original(*args, **kwargs)


def _rank() -> int:
    return torch.distributed.get_rank()


def _rank_batches(seed: int, steps: int, start: int = 0) -> list[Any]:
    return [rank_slice(b, _rank(), WORLD_SIZE) for b in make_batches(seed, steps, start)]


def _counted_step(step: Callable[[], Any], counter: _Counter, profiled: bool) -> dict[str, Any]:
    # The profiler (about 40 ms a step) also sees collectives that bypass all_reduce (DTensor's).
    before = counter.calls
    if not profiled:
        step()
        return {"all_reduce_calls": counter.calls - before}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = [event.name for event in prof.events() if event.name.startswith("gloo:")]
    return {
        "all_reduce_calls": counter.calls - before,
        "gloo_all_reduce": names.count("gloo:all_reduce"),
        "gloo_other": sorted(name for name in names if name != "gloo:all_reduce"),
    }


def _train(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    guarded: Any,
    batches: list[Any],
    counter: _Counter,
    *,
    inject: Callable[[int], None] | None = None,
    losses: Callable[[int], Any] | None = None,
    start: int = 0,
    profiled: bool = False,
) -> list[dict[str, Any]]:
    """Train, recording per step what the guard of ``guarded`` (the optimizer holding it) did."""
    records = []
    for index, (x, y) in enumerate(batches):
        step = start + index
        optimizer.zero_grad()
        loss_fn(forward, x, y).backward()
        if inject is not None:
            inject(step)
        kwargs = {} if losses is None else {"loss": losses(step)}
        counts = _counted_step(lambda kw=kwargs: optimizer.step(**kw), counter, profiled)
        records.append(
            {
                "applied": guarded.last_step_applied,
                "diagnostics": guarded.guard_diagnostics,
                **counts,
            }
        )
    return records


def _nan_into(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")


def _ddp(seed: int) -> tuple[nn.Module, nn.Module]:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(seed)
    return DistributedDataParallel(model), model


def _fsdp2(seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _result(model: nn.Module, optimizer: torch.optim.Optimizer, records: list) -> dict[str, Any]:
    return {
        "params": param_snapshot(model),
        "state": state_snapshot(model, optimizer),
        "steps": records,
    }


def _ddp_case(
    seed: int, counter: _Counter, *, local_nan: bool, profiled: bool = False, **options: Any
) -> dict[str, Any]:
    """DDP with Adam; NaN either in rank 1's inputs (DDP spreads it) or written into rank 1's
    gradient after the all-reduce (only the guard can spread that)."""
    forward, model = _ddp(seed)
    optimizer = at.Adam(model.named_parameters(), lr=LR, **options)
    batches = _rank_batches(seed, STEPS)
    if not local_nan and _rank() == 1:
        x, y = batches[NAN_STEP]
        x = x.clone()
        x[0, 0] = float("inf")
        batches[NAN_STEP] = (x, y)

    def inject(step: int) -> None:
        if local_nan and step == NAN_STEP and _rank() == 1:
            _nan_into(model[2].weight.grad)

    records = _train(
        forward, optimizer, optimizer, batches, counter, inject=inject, profiled=profiled
    )
    return _result(model, optimizer, records)


def _sgd_case(seed: int, counter: _Counter) -> dict[str, Any]:
    """GuardedOptimizer around torch.optim.SGD under DDP, NaN in rank 1's gradient only."""
    forward, model = _ddp(seed)
    optimizer = at.GuardedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), guard=True
    )

    def inject(step: int) -> None:
        if step == NAN_STEP and _rank() == 1:
            _nan_into(model[0].bias.grad)

    records = _train(
        forward, optimizer, optimizer, _rank_batches(seed, STEPS), counter, inject=inject
    )
    return {"params": param_snapshot(model), "steps": records}


def _zero_case(seed: int, counter: _Counter) -> dict[str, Any]:
    """ZeRO-1: NaN (on every rank, as DDP leaves it) in a parameter that rank 1 updates."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    forward, model = _ddp(seed)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=at.Adam, lr=LR)
    owned = {id(p) for group in optimizer.optim.param_groups for p in group["params"]}
    names = [name for name, p in model.named_parameters() if id(p) in owned]
    everyone: list[Any] = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(everyone, names)
    target = everyone[1][0]
    params = dict(model.named_parameters())

    def inject(step: int) -> None:
        if step == NAN_STEP:
            _nan_into(params[target].grad)

    batches = _rank_batches(seed, STEPS)
    records = _train(
        forward, optimizer, optimizer.optim, batches, counter, inject=inject, profiled=True
    )
    return {
        "params": param_snapshot(model),
        "steps": records,
        "nan_param": target,
        "owned": names,
    }


def _fsdp2_case(seed: int, counter: _Counter, **options: Any) -> dict[str, Any]:
    # Profiled: FSDP2 is where DTensor could add reductions of its own.
    """FSDP2: NaN in rank 1's shard of one gradient only."""
    model = _fsdp2(seed)
    optimizer = at.Adam(model.named_parameters(), lr=LR, **options)

    def inject(step: int) -> None:
        if step == NAN_STEP and _rank() == 1:
            _nan_into(model[4].weight.grad.to_local())

    batches = _rank_batches(seed, STEPS)
    records = _train(model, optimizer, optimizer, batches, counter, inject=inject, profiled=True)
    return _result(model, optimizer, records)


def _plain_fsdp2_case(seed: int, counter: _Counter, **options: Any) -> dict[str, Any]:
    model = _fsdp2(seed)
    optimizer = at.Adam(model.named_parameters(), lr=LR, **options)
    batches = _rank_batches(seed, STEPS)
    records = _train(model, optimizer, optimizer, batches, counter, profiled=True)
    return _result(model, optimizer, records)


def _loss_case(seed: int, counter: _Counter, engine: str) -> dict[str, Any]:
    """Loss spikes reported by rank 1 only (rank 0 gives its loss as a 0-d tensor)."""
    if engine == "ddp":
        forward, model = _ddp(seed)
    else:
        forward = model = _fsdp2(seed)
    optimizer = at.Adam(model.named_parameters(), lr=LR, guard=LOSS_GUARD)
    rank = _rank()

    def losses(step: int) -> Any:
        value = rank_loss(rank, step, LOSS_SPIKES)
        return torch.tensor(value, dtype=torch.float64) if rank == 0 else value

    batches = _rank_batches(seed, LOSS_STEPS)
    records = _train(
        forward, optimizer, optimizer, batches, counter, losses=losses, profiled=engine == "fsdp2"
    )
    return _result(model, optimizer, records)


def _zero_loss_case(seed: int, counter: _Counter) -> dict[str, Any]:
    """ZeRO-1 with loss-spike handling: the guard's options reach the inner optimizer through
    ``optimizer_class=functools.partial(Adam, guard=...)`` (see _zero_guard_keyword_case), and
    ``step(loss=...)`` passes the loss on."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    forward, model = _ddp(seed)
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=functools.partial(at.Adam, guard=LOSS_GUARD), lr=LR
    )
    rank = _rank()
    batches = _rank_batches(seed, LOSS_STEPS)
    records = _train(
        forward,
        optimizer,
        optimizer.optim,
        batches,
        counter,
        losses=lambda step: rank_loss(rank, step, LOSS_SPIKES),
    )
    return {"params": param_snapshot(model), "steps": records}


def _zero_guard_keyword_case(seed: int) -> dict[str, Any]:
    """``ZeroRedundancyOptimizer(..., optimizer_class=Adam, guard=...)``: ZeRO copies every
    keyword into each param group it hands to the inner optimizer."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model(seed)
    try:
        ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=at.Adam, lr=LR, guard=LOSS_GUARD
        )
    except Exception as error:
        return {"outcome": f"{type(error).__name__}: {error}"}
    return {"outcome": "ok"}


def _bad_loss_case(seed: int) -> dict[str, Any]:
    """Rank 1 gives a loss that is not a number: every rank raises, nothing changes."""
    forward, model = _ddp(seed)
    optimizer = at.Adam(model.named_parameters(), lr=LR, guard=LOSS_GUARD)
    x, y = _rank_batches(seed, 1)[0]
    loss_fn(forward, x, y).backward()
    before = param_snapshot(model)
    loss = torch.ones(2) if _rank() == 1 else 1.0
    try:
        optimizer.step(loss=loss)
        outcome = "no error"
    except (TypeError, ValueError) as error:
        outcome = f"{type(error).__name__}: {error}"
    unchanged = all(torch.equal(before[k], v) for k, v in param_snapshot(model).items())
    state_after_error = len(optimizer.state)
    # The guard and the process group still work: a good step follows.
    optimizer.step(loss=1.0)
    # Without loss-spike handling the loss is a diagnostic: rank 1's is left out of the mean.
    diagnostic = at.Adam(model.named_parameters(), lr=LR)
    diagnostic.step(loss=loss if _rank() == 1 else 3.0)
    return {
        "outcome": outcome,
        "unchanged": unchanged,
        "state_after_error": state_after_error,
        "n_steps": optimizer.guard.counters["n_steps"],
        "applied_after": optimizer.last_step_applied,
        "diagnostic_loss": diagnostic.guard_diagnostics["loss"],
        "diagnostic_applied": diagnostic.last_step_applied,
    }


def run_guard(args: dict[str, Any]) -> dict[str, Any]:
    """Every sub-case; each one's result, or its traceback under "error"."""
    seed = args["seed"]
    counter = _Counter()
    torch.distributed.all_reduce = counter
    group = torch.distributed.new_group(list(range(WORLD_SIZE)))
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "ddp-nan-input": functools.partial(_ddp_case, seed, counter, local_nan=False),
        "ddp-nan-local": functools.partial(_ddp_case, seed, counter, local_nan=True, profiled=True),
        "ddp-nan-local-group": functools.partial(
            _ddp_case, seed, counter, local_nan=True, process_group=group
        ),
        "ddp-nan-local-off": functools.partial(
            _ddp_case, seed, counter, local_nan=True, process_group=False
        ),
        "ddp-track": functools.partial(
            _ddp_case, seed, counter, local_nan=True, guard={"track_update_norm": True}
        ),
        "sgd-nan-local": functools.partial(_sgd_case, seed, counter),
        "zero-nan-other": functools.partial(_zero_case, seed, counter),
        "fsdp2-nan-shard": functools.partial(_fsdp2_case, seed, counter),
        "fsdp2-track": functools.partial(
            _fsdp2_case, seed, counter, guard={"track_update_norm": True}
        ),
        "fsdp2-rms": functools.partial(
            _plain_fsdp2_case, seed, counter, guard={"update_clip": "rms", "rms_threshold": 0.3}
        ),
        "fsdp2-rms-reference": functools.partial(
            _plain_fsdp2_case,
            seed,
            counter,
            impl="reference",
            guard={"update_clip": "rms", "rms_threshold": 0.3},
        ),
        "ddp-loss": functools.partial(_loss_case, seed, counter, "ddp"),
        "fsdp2-loss": functools.partial(_loss_case, seed, counter, "fsdp2"),
        "zero-loss": functools.partial(_zero_loss_case, seed, counter),
        "zero-guard-keyword": functools.partial(_zero_guard_keyword_case, seed),
        "bad-loss": functools.partial(_bad_loss_case, seed),
        # Distributed checkpoints: 2 ranks save for the test process to resume (2 -> 1), and
        # resume what the test process saved (1 -> 2).
        "dcp-save": functools.partial(run_guard_dcp_save, args),
        "dcp-resume": functools.partial(run_guard_dcp_resume, args),
    }
    results = {}
    try:
        for name, case in cases.items():
            try:
                results[name] = case()
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    finally:
        torch.distributed.all_reduce = counter.original
    return results


# -- checkpoints --------------------------------------------------------------------------------


def make_dcp_optimizer(params: Any) -> torch.optim.Optimizer:
    return at.Adam(params, lr=LR, guard=DCP_GUARD)


def guard_summary(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The guard's numbers and snapshot, comparable across runs (snapshot tensors gathered)."""
    from _dist_cases import full

    guard = optimizer._guard
    snapshot = guard.snapshot
    return {
        "counters": dict(guard.guard.counters),
        "has_snapshot": guard.guard.has_snapshot,
        "numbers": guard.guard.state_dict(),
        "snapshot_params": None if snapshot is None else [full(t) for t in snapshot.params],
    }


def run_guard_dcp_save(args: dict[str, Any]) -> dict[str, Any]:
    """FSDP2, guard on: train, save model + optimizer + guard with DCP."""
    seed, path = args["seed"], Path(args["save_to"])
    model = _fsdp2(seed)
    optimizer = make_dcp_optimizer(model.named_parameters())
    rank = _rank()
    for step, (x, y) in enumerate(_rank_batches(seed, DCP_STEPS)):
        optimizer.zero_grad()
        loss_fn(model, x, y).backward()
        optimizer.step(loss=rank_loss(rank, step, DCP_SPIKES))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_sd, "optim": optim_sd, "guard": guard_checkpoint_state(optimizer)},
        checkpoint_id=str(path),
    )
    return {
        "params": param_snapshot(model),
        "guard": guard_summary(optimizer),
        "optim_keys": sorted(optim_sd),
    }


def run_guard_dcp_resume(args: dict[str, Any]) -> dict[str, Any]:
    """DDP, guard on: load a checkpoint written by one process, continue with rank losses."""
    seed, path = args["seed"], Path(args["resume_from"])
    forward, model = _ddp(seed + 12345)
    optimizer = make_dcp_optimizer(forward.named_parameters())
    load_checkpoint(forward, optimizer, path, flatten=True, guard=False)
    load_guard_checkpoint(optimizer, checkpoint_id=str(path))
    loaded = guard_summary(optimizer)
    rank = _rank()
    records = []
    for index, (x, y) in enumerate(_rank_batches(seed, DCP_MORE_STEPS, start=DCP_STEPS)):
        step = DCP_STEPS + index
        optimizer.zero_grad()
        loss_fn(forward, x, y).backward()
        optimizer.step(loss=rank_loss(rank, step, DCP_SPIKES))
        records.append(optimizer.guard_diagnostics)
    return {
        "loaded": loaded,
        "params": param_snapshot(model),
        "state": state_snapshot(model, optimizer),
        "guard": guard_summary(optimizer),
        "steps": records,
    }


def save_single_process(seed: int, path: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The 1 -> 2 direction's first half, in the test process (flattened optimizer state)."""
    model, optimizer, _ = reference_train(
        seed,
        DCP_STEPS,
        make=make_dcp_optimizer,
        losses=lambda step: mean_loss(step, DCP_SPIKES),
    )
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save(
        {"model": model_sd, "optim": optim_sd, "guard": guard_checkpoint_state(optimizer)},
        checkpoint_id=str(path),
    )
    return model, optimizer


GUARD_SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"guard": run_guard}
