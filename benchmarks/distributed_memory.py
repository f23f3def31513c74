"""Optimizer state bytes per rank for adamkit.torch.Adam: one process, DDP, ZeRO-1 and FSDP2.

``python benchmarks/distributed_memory.py --world-size 2 --width 1024 --depth 4 [--state int8]
[--json out.json]``

Starts ``--world-size`` gloo ranks on this machine (CPU, loopback), builds the same MLP on each,
takes one optimizer step per setup (DDP: the whole optimizer on every rank; ZeRO-1:
``ZeroRedundancyOptimizer(optimizer_class=adamkit.torch.Adam)``; FSDP2: ``fully_shard`` on every
linear layer) and reports the state bytes each rank holds
(:func:`adamkit.torch.distributed.state_nbytes`), beside one process's, with ``state=`` as given
(default: torch's layout).  Two more rows for ZeRO-1 after resuming from its consolidated state
dict: through torch's ``load_state_dict`` (which leaves a copy in the wrapper, cast to the
parameters' dtype) and through :func:`adamkit.torch.distributed.load_zero_state_dict`.  Prints a
table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adamkit.torch as at
from adamkit.torch.distributed import load_zero_state_dict, state_nbytes


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _one_step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    loss = model(torch.randn(4, width)).square().mean()
    loss.backward()
    optimizer.step()


def _rank(
    rank: int, world_size: int, port: int, width: int, depth: int, state: Any, queue: Any
) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        out = {}
        model = _model(width, depth)
        ddp = DistributedDataParallel(model)
        optimizer = at.Adam(model.parameters(), state=state)
        _one_step(ddp, optimizer, width)
        out["ddp"] = state_nbytes(optimizer)

        model = _model(width, depth)
        ddp = DistributedDataParallel(model)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=at.Adam, state=state)
        _one_step(ddp, zero, width)
        out["zero1"] = state_nbytes(zero)
        zero.consolidate_state_dict(to=0)
        box = [zero.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        for setup, load in (
            ("zero1_torch_load", lambda z, sd: z.load_state_dict(sd)),
            ("zero1_adamkit_load", load_zero_state_dict),
        ):
            resumed = ZeroRedundancyOptimizer(
                _model(width, depth).parameters(), optimizer_class=at.Adam, state=state
            )
            load(resumed, copy.deepcopy(box[0]))
            out[setup] = state_nbytes(resumed)

        model = _model(width, depth)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        optimizer = at.Adam(model.parameters(), state=state)
        _one_step(model, optimizer, width)
        out["fsdp2"] = state_nbytes(optimizer)
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SETUPS = ("ddp", "zero1", "zero1_torch_load", "zero1_adamkit_load", "fsdp2")


def measure(world_size: int, width: int, depth: int, state: Any = None) -> dict[str, Any]:
    """State bytes of one process and of each rank per setup (``{"single": n, setup: [...]}``)."""
    model = _model(width, depth)
    optimizer = at.Adam(model.parameters(), state=state)
    _one_step(model, optimizer, width)
    result: dict[str, Any] = {
        "world_size": world_size,
        "state": state,
        "parameters": sum(p.numel() for p in model.parameters()),
        "single": state_nbytes(optimizer),
    }
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _rank,
        args=(world_size, _free_port(), width, depth, state, queue),
        nprocs=world_size,
        start_method="spawn",
    )
    per_rank = dict(queue.get() for _ in range(world_size))
    for setup in SETUPS:
        result[setup] = [per_rank[rank][setup] for rank in range(world_size)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distributed_memory.py", description=__doc__)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument(
        "--state", default=None, help="state format (fp32, bf16, int8); default torch's layout"
    )
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if not (dist.is_available() and dist.is_gloo_available()):
        print("needs torch.distributed with the gloo backend", file=sys.stderr)
        return 1
    result = measure(args.world_size, args.width, args.depth, args.state)
    single = result["single"]
    print(f"{result['parameters']:,} parameters; one process holds {single:,} state bytes")
    for setup in SETUPS:
        cells = ", ".join(f"{n:,} ({n / single:.3f})" for n in result[setup])
        print(f"{setup:>18}: per rank {cells}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
