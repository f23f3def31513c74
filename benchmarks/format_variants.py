"""How fast the compressed-state kernels are: one tensor, every state format, interleaved.

``python benchmarks/format_variants.py [--size 10000000] [--repeats 11] [--threads N]``
``python benchmarks/format_variants.py --baseline OLD.py`` (``git show REV:src/adamkit/kernels/``
``numba_formats.py > OLD.py``): the bf16 kernels of that revision timed in the same run too
``python benchmarks/format_variants.py --quality [--seeds 10]``

Times one float32 Adam step (median ms, interleaved round-robin) on a single tensor with the
moments kept in each format, through :func:`adamkit.kernels.stored.adam_update_stored_` (the
fused kernels of :mod:`adamkit.kernels.numba_formats`), against:

- ``floor``: :mod:`adamkit.kernels.streaming`, 28 bytes per parameter with trivial arithmetic;
- ``fp32-state (numba_cpu)``: :func:`adamkit.kernels.adam_update_`, the plain fused kernel;
- ``torch.fused``: ``torch.optim.Adam(fused=True)`` on the same memory.

Also prints the bytes each step moves per parameter (parameter read and written, gradient read,
state read and written) and the ns per element, which tells compute-bound from memory-bound.
With ``--quality`` it measures instead how far each 8-bit codec (and bf16) takes training from
fp32 state, through the plain path (so the codec, not the kernel): the MLP of
``tests/torch/test_torch_state_formats.py`` (96-64-3, AdamW lr 3e-3, 200 steps; largest relative
parameter difference and loss difference over the last 20 steps, per seed) and the quadratic of
``tests/kernels/test_kernels_formats.py`` (curvatures over four decades, 300 steps).

The numbers in the docstring of :mod:`adamkit.kernels.numba_formats` come from this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numba
import numpy as np

from adamkit.app.bench_common import interleaved_times
from adamkit.core.config import AdamHyperParams
from adamkit.formats import Bf16Format, get_format
from adamkit.kernels import adam_update_
from adamkit.kernels.stored import adam_update_stored_
from adamkit.kernels.streaming import stream_update_

FORMATS = {
    "bf16 (stochastic)": get_format("bf16"),
    "bf16 (nearest)": Bf16Format("bf16", "nearest"),
    "int8 (dynamic map, 256)": get_format("int8"),
    "int8-companded (32)": get_format("int8-companded"),
    "int8-companded-64": get_format("int8-companded-64"),
}


def _bytes_per_param(fmt) -> float:
    n = 1 << 20
    state = sum(fmt.nbytes(fmt.zeros((n,), role=r)) for r in ("exp_avg", "exp_avg_sq")) / n
    return 12 + 2 * state  # p read + written, g read; the state read and written


def quality(seeds: int) -> None:
    """Print the training distance of each state format from fp32 state (see the docstring)."""
    import torch

    from adamkit.kernels.stored import adam_update_stored_
    from adamkit.torch import AdamW

    names = ("bf16", "int8", "int8-companded", "int8-companded-64")

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))

    def train(net: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> list[float]:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(96, 3, generator=gen)
        losses = []
        for _ in range(200):
            x = torch.randn(16, 96, generator=gen)
            opt.zero_grad()
            loss = ((net(x) - torch.tanh(x @ w / 10)) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
            opt.step()
        return losses

    mlp: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for seed in range(seeds):
        base_net = model(seed)
        base = train(base_net, AdamW(base_net.parameters(), lr=3e-3, impl="reference"), seed)
        for name in names:
            net = model(seed)
            opt = AdamW(net.parameters(), lr=3e-3, state=name, impl="reference")
            losses = train(net, opt, seed)
            diff = max(
                float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())
                for a, b in zip(net.parameters(), base_net.parameters(), strict=True)
            )
            last, ref = np.mean(losses[-20:]), np.mean(base[-20:])
            mlp[name].append((diff, abs(last - ref) / ref))
    hp = AdamHyperParams(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)
    quad: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        n = 16 * 256 + 100
        curvature = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), n))
        target = rng.standard_normal(n)
        start = rng.standard_normal(n).astype(np.float32)

        def loss(x: np.ndarray, curvature: np.ndarray = curvature, target=target) -> float:
            return 0.5 * float(np.sum(curvature * (x - target) ** 2))

        runs = {}
        for name in ("fp32", *names):
            fmt = get_format(name)
            x = start.copy()
            m, v = fmt.zeros((n,), role="exp_avg"), fmt.zeros((n,), role="exp_avg_sq")
            draw = np.random.default_rng(0)
            for t in range(1, 301):
                g = (curvature * (x - target)).astype(np.float32)
                adam_update_stored_(fmt, [x], [g], [m], [v], [None], [t], hp, rng=draw)
            runs[name] = x
        ref = runs["fp32"]
        for name in names:
            diff = float(np.abs(runs[name] - ref).max() / np.abs(ref).max())
            quad[name].append((diff, abs(loss(runs[name]) / loss(ref) - 1)))
    print(f"distance from fp32 state over {seeds} seeds: max (median)")
    print(f"{'state':<16} {'MLP param':>16} {'MLP loss':>16} {'quad param':>16} {'quad loss':>16}")
    for name in names:
        cells = []
        for rows in (mlp[name], quad[name]):
            arr = np.array(rows)
            cells += [f"{arr[:, k].max():.4f} ({np.median(arr[:, k]):.4f})" for k in (0, 1)]
        print(f"{name:<16} " + " ".join(f"{c:>16}" for c in cells))


def _add_baseline(path: str, steps: dict, moved: dict, p: np.ndarray, g: np.ndarray, hp) -> None:
    """The bf16 rows of ``FORMATS`` again, through the fused kernels of the module at ``path``
    (its ``adam_update_stored_``; same tensors, so the rows compare within one run)."""
    spec = importlib.util.spec_from_file_location("numba_formats_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's disk cache re-imports a module by its name
    spec.loader.exec_module(module)
    n = p.size
    for name, fmt in FORMATS.items():
        if not isinstance(fmt, Bf16Format):
            continue
        sm, sv = fmt.zeros((n,), role="exp_avg"), fmt.zeros((n,), role="exp_avg_sq")
        draw, counter = np.random.default_rng(2), [0]

        def stored(fmt=fmt, sm=sm, sv=sv, draw=draw, counter=counter) -> None:
            counter[0] += 1
            module.adam_update_stored_(
                fmt, [p], [g], [sm], [sv], [None], [counter[0]], hp, rng=draw
            )

        steps[f"{name} base"] = stored
        moved[f"{name} base"] = _bytes_per_param(fmt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, help="torch and numba threads (default: theirs)")
    parser.add_argument("--quality", action="store_true", help="training distance from fp32")
    parser.add_argument("--seeds", type=int, default=10, help="seeds for --quality")
    parser.add_argument(
        "--baseline", metavar="PATH", help="numba_formats.py of another revision: its bf16 rows too"
    )
    args = parser.parse_args()
    if args.quality:
        quality(args.seeds)
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    hp = AdamHyperParams()
    n = args.size
    rng = np.random.default_rng(1)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32)
    steps, moved = {}, {}
    m0, v0 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    steps["floor"] = lambda: stream_update_([p], [g], [m0], [v0])
    moved["floor"] = 28.0
    m1, v1, count = np.zeros(n, np.float32), np.zeros(n, np.float32), [0]

    def fp32() -> None:
        count[0] += 1
        adam_update_([p], [g], [m1], [v1], [None], [count[0]], hp, impl="numba")

    steps["fp32-state (numba_cpu)"] = fp32
    moved["fp32-state (numba_cpu)"] = 28.0
    for name, fmt in FORMATS.items():
        sm, sv = fmt.zeros((n,), role="exp_avg"), fmt.zeros((n,), role="exp_avg_sq")
        draw, counter = np.random.default_rng(2), [0]

        def stored(fmt=fmt, sm=sm, sv=sv, draw=draw, counter=counter) -> None:
            counter[0] += 1
            adam_update_stored_(
                fmt, [p], [g], [sm], [sv], [None], [counter[0]], hp, rng=draw, impl="numba"
            )

        steps[name] = stored
        moved[name] = _bytes_per_param(fmt)
    if args.baseline:
        _add_baseline(args.baseline, steps, moved, p, g, hp)
    tp = torch.from_numpy(p).requires_grad_(True)
    tp.grad = torch.from_numpy(g)
    steps["torch.fused"] = torch.optim.Adam([tp], lr=hp.lr, fused=True).step
    moved["torch.fused"] = 28.0
    times = interleaved_times(steps, args.repeats, warmup=2)
    base = float(np.median(times["torch.fused"]))
    floor = float(np.median(times["floor"]))
    print(
        f"float32, one tensor of {n:,}; numba threads {numba.get_num_threads()}, "
        f"torch threads {torch.get_num_threads()}; median of {args.repeats}"
    )
    head = f"{'variant':<24} {'ms/step':>9} {'ns/elem':>8} {'B/param':>8} {'x fused':>8}"
    print(head + f" {'% floor@B':>10}")
    for name, ts in times.items():
        med = float(np.median(ts))
        # the floor scaled to this variant's bytes: 100% is the bandwidth limit for its traffic
        at_floor = floor * moved[name] / 28.0
        print(
            f"{name:<24} {med * 1e3:>9.3f} {med / n * 1e9:>8.3f} {moved[name]:>8.2f} "
            f"{base / med:>8.2f} {100 * at_floor / med:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
