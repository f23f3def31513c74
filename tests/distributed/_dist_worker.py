"""One rank of a distributed test: ``python _dist_worker.py '<json>'`` under torchrun's environment.

Joins the gloo process group (rendezvous through the store the test process hosts), runs one
scenario for every case it is given and saves what the test compares to
``<workdir>/<scenario>-rank<RANK>.pt``.  A case that raises is recorded with its traceback and
the next case runs (every scenario here raises in the same place on all ranks, so no rank is left
waiting in a collective); anything else that goes wrong ends the process with a non-zero code.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _dist_cases import (
    CASE_BY_ID,
    DistCase,
    load_checkpoint,
    loss_fn,
    make_batches,
    make_model,
    param_snapshot,
    rank_slice,
    save_checkpoint,
    state_snapshot,
    state_switches,
    train,
)
from _dist_guard import GUARD_SCENARIOS
from torch import nn
from torch.distributed.tensor import DTensor

import adamkit.torch as at
from adamkit.formats import get_format
from adamkit.torch.distributed import (
    any_rank,
    guard_checkpoint_state,
    load_guard_checkpoint,
    load_zero_state_dict,
    state_nbytes,
)
from adamkit.torch.formats import FORMAT_KEY


def _rank_batches(seed: int, steps: int, start: int = 0) -> list[Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    return [rank_slice(batch, rank, world) for batch in make_batches(seed, steps, start)]


def _fsdp2_model(seed: int, hidden: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed, hidden, dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _layout_problems(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    # FSDP2: each moment must be a DTensor laid out like its parameter, so that the rank holds
    # only its shard's state; int8 block scales are plain tensors, one per whole-tensor block
    # that overlaps the shard (the span layout of adamkit.torch.sharded_blocks).
    from torch.distributed.tensor import DTensor

    from adamkit.torch.formats import shard_split

    problems = []
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if key in ("step", FORMAT_KEY):
                continue
            if key.endswith("_scale"):
                split = shard_split(p, get_format(optimizer.param_groups[0]["state"]))
                blocks = split.j1 - split.j0
                if isinstance(value, DTensor) or value.shape != (blocks,):
                    problems.append(f"{name}.{key}: {type(value).__name__} {tuple(value.shape)}")
                continue
            if not isinstance(value, DTensor):
                problems.append(f"{name}.{key} is a {type(value).__name__}, not a DTensor")
            elif value.placements != p.placements or value.to_local().shape != p.to_local().shape:
                problems.append(
                    f"{name}.{key}: {value.placements} local {tuple(value.to_local().shape)}, "
                    f"parameter {p.placements} local {tuple(p.to_local().shape)}"
                )
    return problems


# -- scenarios: each returns a dict of tensors / numbers / strings for one case --------------------


def run_ddp(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    seed, steps = args["seed"], args["steps"]
    model = case.model(seed)
    ddp = DistributedDataParallel(model)
    optimizer = case.make(model.named_parameters())
    train(ddp, optimizer, _rank_batches(seed, steps))
    return {
        "params": param_snapshot(model),
        "state": state_snapshot(model, optimizer),
        "state_nbytes": state_nbytes(optimizer),
    }


def run_zero(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    seed, steps, more = args["seed"], args["steps"], args["more_steps"]

    def zero(params: Any, **options: Any) -> ZeroRedundancyOptimizer:
        with case.seeding():
            return ZeroRedundancyOptimizer(
                params, optimizer_class=case.optimizer_class, **options, **case.kwargs
            )

    model = case.model(seed)
    ddp = DistributedDataParallel(model)
    optimizer = zero(model.parameters())
    train(ddp, optimizer, _rank_batches(seed, steps))
    out: dict[str, Any] = {
        "params": param_snapshot(model),
        "local_state": state_snapshot(model, optimizer.optim),
        "state_nbytes": state_nbytes(optimizer),
    }

    optimizer.consolidate_state_dict(to=0)
    consolidated = [optimizer.state_dict() if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        # A copy: on the CPU the state dict holds the live state tensors (as any optimizer's
        # does), and the optimizer loading it below keeps and updates them in place.
        out["consolidated"] = copy.deepcopy(consolidated[0])
    # Resume: a new model and ZeroRedundancyOptimizer load the consolidated state on every rank.
    dist.broadcast_object_list(consolidated, src=0)
    resumed = case.model(seed)
    resumed.load_state_dict(model.state_dict())
    resumed_ddp = DistributedDataParallel(resumed)
    # torch's own load_state_dict leaves a float32 copy of this rank's state in the wrapper:
    # measured here, then load_zero_state_dict, which drops it.
    plain = zero(case.model(seed).parameters())
    plain.load_state_dict(copy.deepcopy(consolidated[0]))
    out["state_nbytes_after_plain_load"] = state_nbytes(plain)
    out["wrapper_nbytes_after_plain_load"] = state_nbytes(plain) - state_nbytes(plain.optim)
    resumed_optimizer = zero(resumed.parameters())
    out["dropped_nbytes"] = load_zero_state_dict(resumed_optimizer, consolidated[0])
    out["state_nbytes_after_load"] = state_nbytes(resumed_optimizer)
    train(resumed_ddp, resumed_optimizer, _rank_batches(seed, more, start=steps))
    out["resumed_params"] = param_snapshot(resumed)

    # add_param_group mid-run: ZeRO repartitions and hands this rank's new share to the
    # local adamkit optimizer.
    grown = case.model(seed)
    grown_ddp = DistributedDataParallel(grown)
    layers = [m for m in grown if isinstance(m, nn.Linear)]
    grown_optimizer = zero([p for m in layers[:2] for p in m.parameters()])
    train(grown_ddp, grown_optimizer, _rank_batches(seed, steps))
    grown_optimizer.add_param_group(
        {"params": [p for m in layers[2:] for p in m.parameters()], "lr": args["added_lr"]}
    )
    train(grown_ddp, grown_optimizer, _rank_batches(seed, more, start=steps))
    out["grown_params"] = param_snapshot(grown)

    # Parameters living as views into one flat buffer per rank and device.
    bucketed = case.model(seed)
    bucketed_ddp = DistributedDataParallel(bucketed)
    bucketed_optimizer = zero(bucketed.parameters(), parameters_as_bucket_view=True)
    train(bucketed_ddp, bucketed_optimizer, _rank_batches(seed, steps))
    out["bucket_view_params"] = param_snapshot(bucketed)
    return out


def run_fsdp2(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    seed, steps = args["seed"], args["steps"]
    model = _fsdp2_model(seed, case.hidden, case.dtype)
    optimizer = case.make(model.named_parameters())
    train(model, optimizer, _rank_batches(seed, steps))
    out = {
        "params": param_snapshot(model),
        "state": state_snapshot(model, optimizer),
        "layout_problems": _layout_problems(model, optimizer),
        "state_nbytes": state_nbytes(optimizer),
        "param_nbytes": sum(p.to_local().nbytes for p in model.parameters()),
        # This process's own seed: an unseeded optimizer takes rank 0's instead.
        "torch_seed": torch.initial_seed(),
    }
    # state_dict() -> load_state_dict() into a fresh FSDP2 optimizer: which live local tensors
    # (codes, this rank's block scales, ...) came back bit for bit.
    fresh_model = _fsdp2_model(seed + 1, case.hidden, case.dtype)
    fresh = case.make(fresh_model.named_parameters())
    fresh.load_state_dict(optimizer.state_dict())
    changed = []
    for (name, p), q in zip(model.named_parameters(), fresh_model.parameters(), strict=True):
        mine, theirs = optimizer.state[p], fresh.state[q]
        for key, value in mine.items():
            a, b = value, theirs.get(key)
            a = a.to_local() if isinstance(a, DTensor) else a
            b = b.to_local() if isinstance(b, DTensor) else b
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            if not same:
                changed.append(f"{name}.{key}")
    out["reload_changed"] = changed
    return out


def run_fsdp2_convert(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    """``steps`` steps, then one step after each switch of every group's ``state``
    (:func:`state_switches`): the gathered parameters and state after each, by format name."""
    seed, steps = args["seed"], args["steps"]
    model = _fsdp2_model(seed, case.hidden)
    optimizer = case.make(model.named_parameters())
    train(model, optimizer, _rank_batches(seed, steps))
    out = {}
    for index, state in enumerate(state_switches(case)):
        for group in optimizer.param_groups:
            group["state"] = state
        train(model, optimizer, _rank_batches(seed, 1, start=steps + index))
        out[state] = {"params": param_snapshot(model), "state": state_snapshot(model, optimizer)}
    return out


def run_fsdp2_snapshot(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    """The guard's rollback snapshot through DCP (guard_checkpoint_state / load_guard_checkpoint)
    under FSDP2: which live local snapshot tensors come back bit for bit on this rank."""
    import torch.distributed.checkpoint as dcp

    seed, steps = args["seed"], args["steps"]
    guard = {"loss_spike": True, "loss_warmup": 1, "snapshot_interval": 1}
    model = _fsdp2_model(seed, case.hidden)
    with case.seeding():
        optimizer = case.optimizer_class(model.named_parameters(), **case.kwargs, guard=guard)
    for x, y in _rank_batches(seed, steps):
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step(loss=loss.detach())
    path = str(Path(args["checkpoints"]) / case.id)
    dcp.save({"guard": guard_checkpoint_state(optimizer)}, checkpoint_id=path)
    fresh_model = _fsdp2_model(seed + 1, case.hidden)
    with case.seeding():
        fresh = case.optimizer_class(fresh_model.named_parameters(), **case.kwargs, guard=guard)
    load_guard_checkpoint(fresh, checkpoint_id=path)
    mine, theirs = optimizer._guard.snapshot, fresh._guard.snapshot
    changed = []
    for index, (a, b) in enumerate(zip(mine.states, theirs.states, strict=True)):
        for key, value in (a or {}).items():
            other = (b or {}).get(key)
            x = value.to_local() if isinstance(value, DTensor) else value
            y = other.to_local() if isinstance(other, DTensor) else other
            if isinstance(x, torch.Tensor):
                same = isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
            else:
                same = x == y
            if not same or isinstance(value, DTensor) != isinstance(other, DTensor):
                changed.append(f"{index}.{key}")
    return {"has_snapshot": mine is not None, "changed": changed}


def _dcp_setup(
    case: DistCase, engine: str, seed: int
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(module to train and checkpoint, the bare model, optimizer) for a DCP run."""
    if engine == "fsdp2":
        model = _fsdp2_model(seed, case.hidden)
        return model, model, case.make(model.named_parameters())
    from torch.nn.parallel import DistributedDataParallel

    model = case.model(seed)
    ddp = DistributedDataParallel(model)
    # Named through the wrapper ("module.0.weight"), as a DDP training script would do.
    return ddp, model, case.make(ddp.named_parameters())


def run_dcp_save(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    seed, steps, engine = args["seed"], args["steps"], args["engine"]
    wrapped, model, optimizer = _dcp_setup(case, engine, seed)
    train(wrapped, optimizer, _rank_batches(seed, steps))
    path = Path(args["checkpoints"]) / engine / case.id
    save_checkpoint(wrapped, optimizer, path, args["flatten"])
    return {"params": param_snapshot(model), "state": state_snapshot(model, optimizer)}


def run_dcp_resume(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    seed, steps, more, engine = args["seed"], args["steps"], args["more_steps"], args["engine"]
    # Another seed: everything the run continues from must come out of the checkpoint.
    wrapped, model, optimizer = _dcp_setup(case, engine, seed + 12345)
    flatten = args["flatten"]
    load_checkpoint(wrapped, optimizer, Path(args["checkpoints"]) / case.id, flatten)
    out: dict[str, Any] = {
        "loaded_params": param_snapshot(model),
        "loaded_state": state_snapshot(model, optimizer),
        "layout_problems": _layout_problems(model, optimizer) if engine == "fsdp2" else [],
    }
    train(wrapped, optimizer, _rank_batches(seed, more, start=steps))
    out["params"] = param_snapshot(model)
    out["state"] = state_snapshot(model, optimizer)
    return out


def _reference_on_mismatched_dtensor() -> dict[str, Any]:
    # impl="reference" must refuse a DTensor parameter whose gradient is laid out differently
    # (here replicated instead of sharded), with ValueError and before changing anything.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    param = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    param.grad = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    optimizer = at.Adam([param], lr=0.1, impl="reference")
    before = param.to_local().clone()
    try:
        optimizer.step()
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    state = optimizer.state.get(param, {})
    return {
        "outcome": outcome,
        "param_unchanged": torch.equal(before, param.to_local()),
        "step": float(state["step"]) if "step" in state else 0.0,
    }


def run_checks(args: dict[str, Any]) -> dict[str, Any]:
    rank = dist.get_rank()
    return {
        "any_rank": {
            "only_rank0": any_rank(rank == 0),
            "none": any_rank(False),
            "all": any_rank(True),
            "tensor_last_rank": any_rank(torch.tensor(rank == dist.get_world_size() - 1)),
        },
        "reference_on_mismatched_dtensor": _reference_on_mismatched_dtensor(),
    }


def run_fsdp2_clip_refused(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    """One step with update clipping (``guard={"update_clip": "rms"}``) on shards whose 8-bit
    blocks straddle ranks: the exception's type, whether the parameters are untouched and how
    many state entries exist after it."""
    seed = args["seed"]
    model = _fsdp2_model(seed, case.hidden)
    with case.seeding():
        optimizer = case.optimizer_class(
            model.named_parameters(), **case.kwargs, guard={"update_clip": "rms"}
        )
    before = param_snapshot(model)
    ((x, y),) = _rank_batches(seed, 1)
    loss_fn(model, x, y).backward()
    try:
        optimizer.step()
        outcome = "ok"
    except NotImplementedError:
        outcome = "NotImplementedError"
    after = param_snapshot(model)
    unchanged = all(torch.equal(before[k], v) for k, v in after.items())
    return {"outcome": outcome, "unchanged": unchanged, "states": len(optimizer.state)}


CASE_SCENARIOS: dict[str, Callable[[DistCase, dict[str, Any]], dict[str, Any]]] = {
    "ddp": run_ddp,
    "zero": run_zero,
    "fsdp2": run_fsdp2,
    "fsdp2_snapshot": run_fsdp2_snapshot,
    "fsdp2_convert": run_fsdp2_convert,
    "fsdp2_clip_refused": run_fsdp2_clip_refused,
    "dcp_save": run_dcp_save,
    "dcp_resume": run_dcp_resume,
}


def main(payload: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    timeout = timedelta(seconds=float(os.environ["ADAMKIT_DIST_TIMEOUT"]))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        scenario, args = payload["scenario"], payload["args"]
        results: dict[str, Any] = {}
        if scenario == "checks":
            results = run_checks(args)
        elif scenario in GUARD_SCENARIOS:
            results = GUARD_SCENARIOS[scenario](args)
        else:
            # Results by case id, or by "<engine>/<case id>" for scenarios run on several.
            for engine in args.get("engines", [None]):
                for case_id in args["cases"]:
                    if engine is not None and not CASE_BY_ID[case_id].runs_in(f"dcp-{engine}"):
                        continue
                    key = case_id if engine is None else f"{engine}/{case_id}"
                    try:
                        results[key] = CASE_SCENARIOS[scenario](
                            CASE_BY_ID[case_id], {**args, "engine": engine}
                        )
                    except Exception:
                        results[key] = {"error": traceback.format_exc()}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    path = Path(payload["workdir"]) / f"{scenario}-rank{os.environ['RANK']}.pt"
    torch.save(results, path)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
