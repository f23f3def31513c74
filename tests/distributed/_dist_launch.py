"""Start real process groups for the distributed tests: one OS process per rank, like torchrun.

The test process hosts the rendezvous store (a ``TCPStore`` on 127.0.0.1 and a port the OS picks,
so two test runs cannot race for a port) and starts ``_dist_worker.py`` once per rank with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``TORCHELASTIC_USE_AGENT_STORE``), gloo on CPU, one thread per rank.  Everything is bounded: the
process group times out its collectives and the launcher kills every rank at its deadline, so a
hang fails one test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("_dist_worker.py")

# Seconds for one launch (all ranks, start-up included) and for one collective inside it.
LAUNCH_TIMEOUT = 60.0
COLLECTIVE_TIMEOUT = 30.0


def _loopback_interface() -> str | None:
    # gloo binds to the interface of the host name unless told; keep the traffic on loopback.
    if not sys.platform.startswith("linux"):
        return None
    names = {name for _, name in socket.if_nameindex()}
    return "lo" if "lo" in names else None


def _env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        TORCHELASTIC_USE_AGENT_STORE="True",
        ADAMKIT_DIST_TIMEOUT=str(COLLECTIVE_TIMEOUT),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    interface = _loopback_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return text[-chars:]


def run_ranks(
    scenario: str,
    world_size: int,
    workdir: Path,
    args: dict[str, Any],
    timeout: float = LAUNCH_TIMEOUT,
) -> list[dict[str, Any]]:
    """Run ``scenario`` of ``_dist_worker.py`` on ``world_size`` ranks; return each rank's result.

    ``args`` (JSON-serialisable) reaches the scenario as is.  Raises ``AssertionError`` with
    every rank's output when a rank fails or the deadline passes (all ranks are killed then).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    payload = json.dumps({"scenario": scenario, "workdir": str(workdir), "args": args})
    logs = [workdir / f"{scenario}-rank{rank}.log" for rank in range(world_size)]
    procs = []
    try:
        for rank in range(world_size):
            with logs[rank].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), payload],
                        env=_env(rank, world_size, store.port),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout
        timed_out = False
        # Poll rather than wait in order: once one rank has failed, the others would only sit
        # in a collective until it times out.
        while any(proc.poll() is None for proc in procs):
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store
    codes = [proc.returncode for proc in procs]  # killed ranks show a negative code
    if timed_out or any(codes):
        report = "\n".join(
            f"--- rank {rank} (exit {code}) ---\n{_tail(log)}"
            for rank, (code, log) in enumerate(zip(codes, logs, strict=True))
        )
        reason = f"timed out after {timeout:g} s" if timed_out else "a rank failed"
        raise AssertionError(f"{scenario} on {world_size} ranks: {reason}\n{report}")
    return [
        torch.load(workdir / f"{scenario}-rank{rank}.pt", weights_only=True)
        for rank in range(world_size)
    ]
