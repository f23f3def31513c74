"""``adamkit bench memory``: optimizer-state memory per parameter, from storage and from the OS.

For each state format, a fresh Python process builds a parameter layout of
:mod:`adamkit.app.bench` (float32 parameters with gradients), notes its resident set, creates the
optimizer, runs ``--steps`` steps and reports:

- ``state_bytes_per_param``: the optimizer's state measured from its tensors' storage
  (``state_nbytes()`` for adamkit, the tensors in ``optimizer.state`` for torch);
- ``rss_bytes_per_param``: (peak resident set of the process - resident set before the
  optimizer existed) / parameters, i.e. what the optimizer really cost the machine, state and
  any temporaries of its steps included (``VmHWM`` of ``/proc/self/status``; Linux only).  A small
  optimizer of the same kind steps first, so that loading libraries and compiled kernels is
  not counted;
- ``peak_rss_mb``: the process's peak resident set.

One process per format, so that no format inherits another's freed-but-kept memory.  Formats:
``torch`` (``torch.optim.Adam(fused=True)``), ``fp32``, ``bf16``, ``int8``, ``int8-companded``,
``int8-companded-64``
(``adamkit.torch.Adam(state=...)``, default guard).  Results go to stdout and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from adamkit.app.bench_common import csv_choice, machine_info

__all__ = ["STATES", "configure_parser", "measure", "run"]

STATES: tuple[str, ...] = ("torch", "fp32", "bf16", "int8", "int8-companded", "int8-companded-64")


def _rss_bytes() -> int:
    # The current resident set (statm's second field, in pages).
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # VmHWM: the peak resident set of this process image.  Not ru_maxrss, which Linux carries
    # over fork and exec, so a child of a large process would report its parent's size.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _child(state: str, layout: str, steps: int) -> dict[str, Any]:
    # Runs in the fresh process: one optimizer, `steps` steps, the numbers of the docstring.
    import torch

    from adamkit.app.bench import layout_shapes
    from adamkit.torch import Adam

    torch.manual_seed(0)
    params = []
    for shape in layout_shapes(layout):
        p = torch.randn(shape).requires_grad_(True)
        p.grad = torch.randn(shape).mul_(1e-3)  # in place: no transient copy to peak on
        params.append(p)
    n = sum(p.numel() for p in params)

    def make(tensors: list[Any]) -> Any:
        if state == "torch":
            return torch.optim.Adam(tensors, lr=1e-3, fused=True)
        return Adam(tensors, lr=1e-3, state=state)

    # Load the libraries and compile (or load) every kernel the real run will use first, on
    # small tensors of each kind (quantized with a partial last block, 2-d, below int8's size
    # threshold): compiling takes tens of MB for a moment, and none of it is optimizer state.
    warm = [torch.zeros(s, requires_grad=True) for s in ((1 << 16) + 77, (64, 1100), (300,))]
    for w in warm:
        w.grad = torch.ones_like(w)
    make(warm).step()
    before, peak_before = _rss_bytes(), _peak_rss_bytes()
    opt = make(params)
    for _ in range(steps):
        opt.step()
    if state == "torch":
        stored = sum(
            t.untyped_storage().nbytes()
            for entry in opt.state.values()
            for t in entry.values()
            if torch.is_tensor(t)
        )
    else:
        stored = opt.state_nbytes()
    peak = _peak_rss_bytes()
    return {
        "state": state,
        "params": n,
        "state_bytes_per_param": stored / n,
        "rss_bytes_per_param": (peak - before) / n,
        "peak_rss_mb": peak / 2**20,
        "rss_before_optimizer_mb": before / 2**20,
        # rss_bytes_per_param counts from rss_before_optimizer_mb: it is the optimizer's own
        # cost only if the process had not peaked higher before (this close to that).
        "peak_rss_before_optimizer_mb": peak_before / 2**20,
    }


def measure(state: str, layout: str = "100M", steps: int = 3) -> dict[str, Any]:
    """The numbers of the module docstring for one ``state`` (a name of :data:`STATES`), measured
    in a fresh process.  Raises ``ValueError`` for an unknown state, ``RuntimeError`` when the
    process fails (its stderr in the message)."""
    if state not in STATES:
        raise ValueError(f"Invalid state: {state!r} (state must be one of {', '.join(STATES)})")
    code = (
        "import json, sys; from adamkit.app.bench_memory import _child; "
        f"print(json.dumps(_child({state!r}, {layout!r}, {int(steps)})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run for state={state!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``adamkit bench memory`` options to ``parser``."""
    from adamkit.app.bench import LAYOUTS

    parser.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="100M", help="parameter layout (default 100M)"
    )
    parser.add_argument(
        "--states",
        type=csv_choice(STATES),
        default=STATES,
        help=f"comma-separated, from {','.join(STATES)} (default: all)",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per run (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    """Measure every asked state, print a table, write ``--json``; returns the exit status."""
    if args.steps < 1:
        raise SystemExit(f"adamkit bench memory: error: --steps must be >= 1, got {args.steps}")
    rows: list[dict[str, Any]] = []
    print(f"{'state':<16}{'state B/param':>14}{'RSS B/param':>13}{'peak RSS MB':>13}")
    for state in args.states:
        try:
            row = measure(state, args.layout, args.steps)
        except RuntimeError as error:  # the child's own traceback is in the message
            raise SystemExit(f"adamkit bench memory: error: {error}") from None
        rows.append(row)
        print(
            f"{state:<16}{row['state_bytes_per_param']:>14.3f}"
            f"{row['rss_bytes_per_param']:>13.3f}{row['peak_rss_mb']:>13.0f}",
            flush=True,
        )
    if args.json:
        from adamkit.app.report import atomic_write_text

        document = {"layout": args.layout, "steps": args.steps, "machine": machine_info()}
        atomic_write_text(args.json, json.dumps({**document, "runs": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0
