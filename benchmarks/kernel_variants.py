"""Why the float32 kernel rounds as it does, and why numba: one tensor, every way to step it.

``python benchmarks/kernel_variants.py [--size 10000000] [--repeats 21] [--threads N]``

Times, interleaved round-robin (median ms per step), one float32 Adam step on a single tensor:

- ``floor``: :mod:`adamkit.kernels.streaming` (same bytes, trivial arithmetic);
- ``shipped``: :mod:`adamkit.kernels.numba_cpu` (hardware FMA, reciprocal of sqrt(bc2));
- ``exact``: the same loop performing every rounding of the reference (FMA emulated in float64,
  two divisions); checked bit-identical to ``adamkit.core.reference.adam_step`` before timing;
- ``numpy.inplace``: the best NumPy ufunc chain (``out=``, one scratch array);
- ``torch.fused`` / ``torch.foreach``: ``torch.optim.Adam`` on the same memory.

``--int8`` times instead the companded 8-bit kernel of :mod:`adamkit.kernels.numba_formats`
compiled for blocks of 32 and 64 with LLVM's default vector width (256 bits on AVX-512 CPUs)
and with ``vector_bits=512``, all in one process and interleaved, beside ``torch.fused`` and the
shipped ``"int8"`` (dynamic map) and ``"int8-companded-64"`` paths.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
from numba import prange

from adamkit.app.bench_common import interleaved_times
from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.kernels import adam_update_
from adamkit.kernels.numba_cpu import coefficients
from adamkit.kernels.streaming import stream_update_


@numba.njit(parallel=True, error_model="numpy", cache=True)
def _exact(p, g, m, v, c):
    """The reference's roundings in float32 (default options only: no decay, no AMSGrad)."""
    w1, w1_small, w2, beta2, neg_ss, bc2s, eps = c[4], c[5] != 0, c[6], c[7], c[8], c[9], c[11]
    for i in prange(p.size):
        gi = g[i]
        mi = m[i]
        base = mi if w1_small else gi
        m[i] = np.float64(gi - mi) * np.float64(w1) + np.float64(base)  # rounded on store
        v[i] = np.float64(w2 * gi) * np.float64(gi) + np.float64(v[i] * beta2)
        mi = m[i]
        p[i] = p[i] + (neg_ss * mi) / (np.sqrt(v[i]) / bc2s + eps)


def _check_exact(hp: AdamHyperParams) -> None:
    rng = np.random.default_rng(0)
    p, g, m = (rng.standard_normal(100_003).astype(np.float32) for _ in range(3))
    v = rng.random(100_003).astype(np.float32)
    new_p, new = adam_step(p, g, AdamState(6, m, v, None), hp)
    p, m, v = p.copy(), m.copy(), v.copy()
    _exact(p, g, m, v, coefficients(hp, 7, np.dtype(np.float32)))
    for a, b in ((p, new_p), (m, new.exp_avg), (v, new.exp_avg_sq)):
        np.testing.assert_array_equal(a, b)


def _companded_driver(block: int, bits: int | None):
    """A parallel driver (as ``numba_formats._q_parallel``, whole blocks only) around the
    companded kernel compiled for ``block`` and ``bits``."""
    from adamkit.kernels import numba_formats as nf

    blocks = nf._companded_kernel(block, bits)
    per_chunk = max(1, nf.CHUNK_ELEMENTS // block)

    @numba.njit(parallel=True, error_model="numpy")
    def run(p, g, mc, ms, vc, vs, cp, c32):
        k = nf._unpack(cp, c32)
        full = p.size // block
        chunks = (full + per_chunk - 1) // per_chunk
        bad = np.zeros(chunks, np.int64)
        for c in prange(chunks):
            first = c * per_chunk
            last = min(first + per_chunk, full)
            lo, hi = first * block, last * block
            bad[c] = blocks(
                p[lo:hi],
                g[lo:hi],
                mc[lo:hi],
                ms[first:last],
                vc[lo:hi],
                vs[first:last],
                vc[:0],
                vs[:0],
                False,
                k,
            )
        return bad.sum()

    return run


def _int8_steps(p: np.ndarray, g: np.ndarray, hp: AdamHyperParams) -> dict:
    from adamkit.formats import get_format
    from adamkit.kernels.numba_formats import _coefficients
    from adamkit.kernels.stored import adam_update_stored_

    n = p.size
    steps = {}
    for block in (32, 64):
        for bits in (None, 512):
            run = _companded_driver(block, bits)
            whole = n // block * block
            arrays = (
                np.zeros(whole, np.int8),
                np.zeros(whole // block, np.float32),
                np.zeros(whole, np.uint8),
                np.zeros(whole // block, np.float32),
            )
            counter = [0]

            def step(run=run, arrays=arrays, counter=counter, whole=whole) -> None:
                counter[0] += 1
                cp, c32 = _coefficients(hp, counter[0], p.dtype)
                run(p[:whole], g[:whole], *arrays, cp, c32)

            steps[f"companded {block}, {bits or 'default'} bits"] = step
    for name in ("int8", "int8-companded-64"):
        fmt = get_format(name)
        sm, sv = fmt.zeros((n,), role="exp_avg"), fmt.zeros((n,), role="exp_avg_sq")
        counter = [0]

        def shipped(fmt=fmt, sm=sm, sv=sv, counter=counter) -> None:
            counter[0] += 1
            adam_update_stored_(fmt, [p], [g], [sm], [sv], [None], [counter[0]], hp, impl="numba")

        steps[f"shipped {name}"] = shipped
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, help="torch and numba threads (default: theirs)")
    parser.add_argument("--int8", action="store_true", help="8-bit kernel variants instead")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    hp = AdamHyperParams()
    _check_exact(hp)
    n = args.size
    rng = np.random.default_rng(1)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32)

    def state() -> list[np.ndarray]:
        return [np.zeros(n, np.float32) for _ in range(3)]

    steps = {}
    m1, v1, _ = state()
    steps["floor"] = lambda: stream_update_([p], [g], [m1], [v1])
    if args.int8:
        steps.update(_int8_steps(p, g, hp))
        return _run(steps, p, g, hp, args)
    m2, v2, _ = state()
    count = [0]

    def shipped() -> None:
        count[0] += 1
        adam_update_([p], [g], [m2], [v2], [None], [count[0]], hp, impl="numba")

    steps["shipped"] = shipped
    m3, v3, _ = state()
    coef = coefficients(hp, 10, np.dtype(np.float32))
    steps["exact"] = lambda: _exact(p, g, m3, v3, coef)
    m4, v4, s4 = state()

    def inplace() -> None:  # bias correction omitted: this chain is a lower bound for NumPy
        np.multiply(g, 1 - hp.beta1, out=s4)
        np.multiply(m4, hp.beta1, out=m4)
        np.add(m4, s4, out=m4)
        np.multiply(g, g, out=s4)
        np.multiply(s4, 1 - hp.beta2, out=s4)
        np.multiply(v4, hp.beta2, out=v4)
        np.add(v4, s4, out=v4)
        np.sqrt(v4, out=s4)
        np.add(s4, hp.eps, out=s4)
        np.divide(m4, s4, out=s4)
        np.multiply(s4, -hp.lr, out=s4)
        np.add(p, s4, out=p)

    steps["numpy.inplace"] = inplace
    return _run(steps, p, g, hp, args, foreach=True)


def _run(steps: dict, p: np.ndarray, g: np.ndarray, hp, args, foreach: bool = False) -> int:
    """Add the torch steps, time everything interleaved and print the table."""
    import torch

    n = p.size
    tp = torch.from_numpy(p).requires_grad_(True)
    tp.grad = torch.from_numpy(g)
    torch_flags = [("torch.fused", {"fused": True}), ("torch.foreach", {"foreach": True})]
    for name, flags in torch_flags[: 2 if foreach else 1]:
        steps[name] = torch.optim.Adam([tp], lr=hp.lr, **flags).step
    times = interleaved_times(steps, args.repeats, warmup=2)
    floor = float(np.median(times["floor"]))
    fused = float(np.median(times["torch.fused"]))
    print(
        f"float32, one tensor of {n:,}; numba threads {numba.get_num_threads()}, "
        f"torch threads {torch.get_num_threads()}; median of {args.repeats}"
    )
    width = max(map(len, times))
    print(f"{'variant':<{width}} {'ms/step':>9} {'ns/elem':>8} {'% floor':>8} {'x fused':>8}")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(
            f"{name:<{width}} {med * 1e3:>9.3f} {med / n * 1e9:>8.3f} {100 * floor / med:>8.1f} "
            f"{fused / med:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
