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
    make_batches,
    make_model,
    param_snapshot,
    rank_slice,
    save_checkpoint,
    state_snapshot,
    train,
)
from _dist_guard import GUARD_SCENARIOS
from torch import nn

import adamkit.torch as at
from adamkit.torch.distributed import any_rank, state_nbytes


def _rank_batches(seed: int, steps: int, start: int = 0) -> list[Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    return [rank_slice(batch, rank, world) for batch in make_batches(seed, steps, start)]


def _fsdp2_model(seed: int, hidden: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed, hidden)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _layout_problems(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    # FSDP2: each state tensor must be a DTensor laid out like its parameter, so that the rank
    # holds only its shard's state.
    from torch.distributed.tensor import DTensor

    problems = []
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if key == "step":
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
    resumed_optimizer = zero(resumed.parameters())
    resumed_optimizer.load_state_dict(consolidated[0])
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
    model = _fsdp2_model(seed, case.hidden)
    optimizer = case.make(model.named_parameters())
    train(model, optimizer, _rank_batches(seed, steps))
    return {
        "params": param_snapshot(model),
        "state": state_snapshot(model, optimizer),
        "layout_problems": _layout_problems(model, optimizer),
        "state_nbytes": state_nbytes(optimizer),
        "param_nbytes": sum(p.to_local().nbytes for p in model.parameters()),
    }


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
    save_checkpoint(wrapped, optimizer, path, args["flatten"] and case.flattens)
    return {"params": param_snapshot(model)}


def run_dcp_resume(case: DistCase, args: dict[str, Any]) -> dict[str, Any]:
    seed, steps, more, engine = args["seed"], args["steps"], args["more_steps"], args["engine"]
    # Another seed: everything the run continues from must come out of the checkpoint.
    wrapped, model, optimizer = _dcp_setup(case, engine, seed + 12345)
    flatten = args["flatten"] and case.flattens
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


CASE_SCENARIOS: dict[str, Callable[[DistCase, dict[str, Any]], dict[str, Any]]] = {
    "ddp": run_ddp,
    "zero": run_zero,
    "fsdp2": run_fsdp2,
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
