r"""Fused, in-place Adam steps on compressed state (bf16 and 8-bit), compiled with numba.

"Compute in fp32, store compressed" in one pass over memory: for each element (each block for the
8-bit formats) the kernel decodes ``m``, ``v`` (and ``v_max`` with AMSGrad), performs the step of
:func:`adamkit.core.reference.adam_step` in float32, writes the parameter and re-encodes the
moments into the same storage.  Each byte of the parameter, gradient and storage is read once and
written once; no float32 copy of a moment ever exists in memory.  The plain path, which stays the
specification and the oracle of the tests, is::

    m, v = fmt.load(sm), fmt.load(sv)
    p, state = adam_step(p, g, AdamState(t - 1, m, v), hp)
    fmt.store(sm, state.exp_avg, rng); fmt.store(sv, state.exp_avg_sq, rng)

Storage encodings handled (``Storage.encoding``):

- ``"dense"``: float32 moments (the small tensors of the 8-bit formats, and the ``fp32`` format).
- ``"bf16"``: ``uint16`` bfloat16 bits; nearest-even or stochastic rounding, as the format says.
  NaN and inf are kept, as :mod:`adamkit.formats.bf16` keeps them.
- ``"int8-companded"`` and ``"int8-companded-64"`` (the format's name): the
  :mod:`adamkit.formats.int8_companded` codes in blocks of 32 and of 64, one kernel compiled for
  each block: ``m`` as ``rint(254 x / (s + |x|))`` in int8, ``sqrt(v)`` as ``rint(255 r / s)`` in
  uint8, one float32 absmax ``s`` per block.  Decoding ``m`` is a 256-entry float32 table
  (``c / (254 - |c|)``, 1 KiB, in L1); encoding is arithmetic.
- ``"int8"`` and ``"int8-blockwise"``: :mod:`adamkit.formats.int8_blockwise` (dynamic map,
  blocks of 256): decoding by 256-entry tables, encoding by the codec's bucket table.

A block's new absmax must be known before any of it is encoded, so each block is two short loops
of a compile-time length: the first decodes and forms the new moments (kept in three small
per-thread buffers), the second updates the parameter and encodes.  ``sqrt(v)`` is formed once
and serves both the denominator and the stored root; with AMSGrad the stored ``sqrt(v_max)`` is
``max(sqrt(v_max), sqrt(v))`` (the square root is monotone, so no second root is needed).

Arithmetic and how it differs from the oracle.  One hardware FMA per moment, in the parameter's
dtype and rounded to float32 once; the update in float32::

    g' = ±g (+ lambda p)               m = fma(g' - m, 1 - beta1, m)    (torch.lerp's two forms)
    v  = fma((1 - beta2) g', g', beta2 v)                               p = p (1 - lr lambda)
    p  = p + (-(lr / bc1) m) / (sqrt(v) * (1 / sqrt(bc2)) + eps)

The reference forms its float32 multiply-adds in float64 (two roundings), divides by
``sqrt(bc2)`` and, with float64 parameters, rounds ``g - m`` to float32 before its multiply-add.
So the moments may differ from the oracle's by an ulp or two before encoding, and then, at a
rounding boundary, encode to the neighbouring code (int8) or bf16 value; the parameter moves by
the oracle's update within a few float32 ulps of the update.  The tests hold each kernel to the
oracle with those tolerances (``tests/kernels/test_kernels_formats.py``).  The companded encode
uses one division (``254 x / (s + |x|)``) where the codec uses two; the blockwise one divides
exactly as the codec does and rounds by its table, so its codes match whenever the moment does.

No ``fastmath``: NaN and inf behave as in the reference (the non-finite guard and the bf16
format's NaN/inf handling rely on it).  The flags that keep them (``contract, arcp, afn, nsz``)
gave no measurable speed-up on these loops, and ``afn`` may turn ``sqrt(inf)`` into NaN.

Stochastic bf16 rounding adds 16 bits of noise ``u`` below the kept half and truncates (as
:func:`adamkit.formats.bf16.encode_stochastic`): with ``u`` uniform, ``x`` goes up to its upper
bf16 neighbour with probability ``(x - lo) / (hi - lo)``.  The noise of element ``j`` of the
*whole* parameter (``j = offset + i``, ``offsets`` of :func:`adam_update_stored_`) is the top 16
bits of a randomly shifted Weyl sequence, ``(j * G + k) mod 2**32`` with ``G = 0x9E3779B9``
(2**32 over the golden ratio, odd), one key ``k`` per moment and call: ``m`` takes the low and
``v`` the high 32 bits of one 64-bit word drawn raw from the caller's ``numpy.random.Generator``,
``v_max`` (AMSGrad) a second word; one word (two) per parameter per call, in parameter order.
Statistical properties:

- unbiased, exactly: for a fixed element ``j * G`` is a constant shift, so over a uniform 32-bit
  key ``u`` takes each of its 2**16 values equally often and ``E[rounded] = x`` for every float32
  ``x`` (``tests/kernels``: exactly over the lattice of keys, and as the mean over 2048 calls);
- independent where it matters: each call draws new keys, so an element's noise is independent
  from step to step, and ``m``, ``v`` and ``v_max`` take independent keys;
- within one call neighbours are *not* independent but low-discrepancy (golden-ratio steps
  around the circle, the three-distance theorem): of ``n`` equal values the number rounded up is
  within a few of ``n p`` (measured at most 2.7 for ``n`` up to 4096) where independent noise
  scatters by ``sqrt(n p (1 - p))``, so a tensor's errors cancel better.  The price is that the
  errors of different elements are correlated within a step (deterministic given the key); data
  whose low bits followed the lattice could see them aligned, yet every value stays unbiased;
- indexed by global position only: independent of the thread count and chunking, and a shard
  rounded with its ``offset`` and the same key gets the bits of the whole tensor, which makes
  FSDP2 runs equal one process (:class:`adamkit.kernels.stored.ShardRng`).
  :func:`adamkit.formats.bf16.encode_stochastic_at` is the NumPy twin (the same bits).

It is not the stream that ``Bf16Format.store`` uses, so against the plain path the rounding
agrees in distribution.  Cost: ``j * G`` is a loop induction, one vector add per moment and 8
elements, and the offset is folded into the key (``k + offset * G``) before the loop (an int64
``offset + i`` in it cost a third more).  The earlier counter-based hash (Wellons' "lowbias32" of
``(j * G) ^ k``: 3 multiplies per element) made the stochastic step 1.45x as slow as nearest; in
one run (``benchmarks/format_variants.py --baseline``, 10M, ns per element and x torch.fused,
``benchmarks/results/2026-11-25c/h1_*``)::

                                 2 threads      1 thread
    torch.fused                  0.76 (1.00)    1.25 (1.00)
    bf16, stochastic (Weyl)      0.52 (1.46)    0.90 (1.39)
    bf16, stochastic (hash)      0.70 (1.09)    1.18 (1.06)
    bf16, nearest                0.48 (1.57)    0.89 (1.41)

At 100M parameters (2 threads, another run): torch.fused 1.22, Weyl 0.92 (1.32), hash 1.16
(1.05), nearest 0.92 (1.32).  A later 10M run gave (x) Weyl 1.38 / 1.33, hash 1.19 / 1.07,
nearest 1.40 / 1.35 (2 threads / 1): the ratios move by up to 0.2 between runs on this shared
VM, the Weyl kernel stays within 0.05 of nearest.

Non-finite values.  8-bit codes cannot hold NaN/inf (``store`` raises).  A block whose new
moments are non-finite is left entirely unchanged (parameter, codes and scale) and, after the
parameter's pass, :func:`adam_update_stored_` raises ``ValueError``.  Unlike ``store``, the other
blocks of that parameter (and earlier parameters) have then been updated: a single pass cannot
know in advance.  Skip non-finite steps before the update (the guard's non-finite check does).

Speed.  ``benchmarks/format_variants.py``: one 10M float32 tensor, median of 15 interleaved steps,
ns per element and (x) speed relative to ``torch.optim.Adam(fused=True)`` in the same run, on the
2-core development VM (AVX-512), each run started when both cores had been at least 85% idle for
3 s, runs disturbed by other jobs (torch.fused above 0.8 / 1.3 ns) dropped, the median of the rest
(``benchmarks/results/2026-11-25c/h2_int8_*``; each column from its own runs, so compare the
ratios across columns, not the times).  "as shipped" (3 runs with 2 threads, 2 with 1): the
companded spans for blocks of 32 compiled with ``vector_bits=512`` (``numba_cpu._jit``), the
other kernels at LLVM's default for this CPU (256-bit vectors; the bf16 span has been compiled
at 512 bits since, as the "all 512" column suggested: through ``adamkit.torch`` on the 96-tensor
10M layout of ``adamkit bench`` its step went from 7.27 to 7.03 ms); "all 512" (3 and 2 earlier
runs): every kernel at 512 bits (``NUMBA_CPU_FEATURES`` with ``-prefer-256-bit``, for the
comparison only).  At 100M (2 threads, one run each): ``int8-companded-64`` 0.41 (1.55, 1.58),
``int8-companded`` 0.42 (1.51, 1.51), ``"int8"`` 0.86-0.88 (0.73-0.74)::

                              state B/param  2 threads                  1 thread
                                             as shipped   all 512       as shipped   all 512
    torch.fused                   8          0.60 (1.00)  0.62 (1.00)   1.22 (1.00)  1.08 (1.00)
    streaming floor (28 B)        --         0.43 (1.42)  0.40 (1.56)   0.86 (1.42)  0.80 (1.34)
    fp32 state (numba_cpu)        8          0.48 (1.26)  0.49 (1.27)   0.94 (1.30)  0.93 (1.17)
    bf16, stochastic (Weyl)       4          0.49 (1.26)  0.41 (1.51)   0.98 (1.25)  0.81 (1.33)
    bf16, nearest                 4          0.48 (1.32)  0.42 (1.48)   0.95 (1.28)  0.80 (1.34)
    int8 (dynamic map, 256)       2.03       0.86 (0.70)  0.84 (0.74)   1.71 (0.72)  1.60 (0.68)
    int8-companded (32)           2.25       0.40 (1.48)  0.40 (1.54)   0.82 (1.48)  0.79 (1.37)
    int8-companded-64             2.125      0.37 (1.64)  0.38 (1.61)   0.76 (1.61)  0.73 (1.48)

What made the 8-bit companded step fast (``benchmarks/kernel_variants.py --int8``, the kernel
for each block and vector width in one process; 10M, 2 threads / 1 thread, ns per element):

- software prefetch (:data:`_PREFETCH_AHEAD`): the hardware prefetcher alone left the step 40%
  slower on DRAM-sized tensors than on L2-resident ones; with it, blocks of 64 at 512 bits went
  from 0.44 to 0.37 (2 threads) and 0.97 to 0.72 (1 thread, 8M);
- 512-bit vectors for the spans of blocks of 32: 0.46 -> 0.40 / 0.87 -> 0.76; for blocks of 64
  they made no difference with 2 threads (0.36-0.37) and cost 2-3% with 1 (0.68-0.69 -> 0.70-0.71),
  so those keep LLVM's choice;
- blocks of 64 rather than 32: half the per-block work (two horizontal maxima, two scale
  divisions, the loop control), 0.40 -> 0.36-0.37 / 0.76 -> 0.68-0.69;
- the unsigned code as ``max(rint(y), y > 0)`` in integers (one conversion): 5% at L2.

Tried without gain (L2-resident, 1 thread, blocks of 64 at 512 bits, 0.73-0.77 ns): the two
divisions per element (update and signed code) merged into one reciprocal (0.74), a Newton
reciprocal for the code's division (0.75); an upper bound, dropping both divisions, would give
0.64-0.66, and dropping the decode table's gather 0.71-0.72: the step is bound by the number of
vector instructions (about 50 per 16 elements over the two ports that run 512-bit operations),
not by one unit.  The dynamic map (``"int8"``) stays compute-bound at 0.82-0.87 (its four table
lookups per element; neither 512-bit vectors nor prefetch moved it).

Quality (``benchmarks/format_variants.py --quality``, 10 seeds, largest (median) relative
distance from fp32 state; the MLP through the plain path, the quadratic through these kernels):
the MLP training check of ``tests/torch`` (96-64-3, AdamW, 200 steps), parameters / loss::

    int8 (dynamic map, 256)   0.0689 (0.0456) / 0.0058 (0.0037)
    int8-companded (32)       0.0125 (0.0090) / 0.0014 (0.0008)
    int8-companded-64         0.0280 (0.0141) / 0.0018 (0.0012)
    bf16 (stochastic)         0.0082 (0.0060) / 0.0007 (0.0002)

and the quadratic with curvatures over four decades (300 steps) 0.082 (0.064) / 0.0062 (0.0032)
for the dynamic map, 0.087 (0.082) / 0.0011 (0.0007) for blocks of 32, 0.087 (0.082) / 0.0014
(0.0011) for blocks of 64.  So blocks of 64 lose some of the companded code's accuracy (its scale
adapts less locally) and remain well ahead of the dynamic map, with 2.125 bytes of state per
parameter (two 1-byte codes and a float32 scale per 64, per moment: inside the 2.15 budget that
the 32-block code's 2.25 exceeds) and 1.55-1.65x torch.fused at 10M and 100M parameters.  The
companded code's weakness: ``sqrt(v)`` is linear in 255 steps of the block maximum, so within a
block an element whose root is below 1/255 of the largest is stored at the first level (never 0),
which shortens its early steps.  Which codec the name ``"int8"`` stands for is the registry's
choice (:mod:`adamkit.formats.registry`).

Two threads: with numba's ``omp`` layer, on a machine whose cores are busy with other work,
libgomp's spin-waiting made 2-thread runs of these kernels up to 2.4x slower than one thread
(``OMP_WAIT_POLICY=passive`` or ``NUMBA_THREADING_LAYER=workqueue`` removed that); on idle cores
the two threads split the blocks evenly (static chunks, whole blocks each).

Threading and caching follow :mod:`adamkit.kernels.numba_cpu`: tensors of at least
``PARALLEL_MIN_SIZE`` elements run over numba's thread pool in chunks of :data:`CHUNK_ELEMENTS`
(whole blocks for 8-bit codes), compiled code is cached on disk.

How a dispatcher uses it: ``supports(fmt)`` says whether a format has a fused kernel here;
``qualifies(fmt, param, grad, sm, sv, sw)`` whether one parameter can take it; then
``adam_update_stored_(fmt, params, grads, sms, svs, sws, steps, hp, rng=rng, fallback=...)``
(``fallback`` gets ``(fmt, param, grad, sm, sv, sw, step, hp, rng)`` for parameters that do not
qualify, e.g. the plain load/step/store path; ``offsets=`` places shards in their whole tensor).
Front ends that hold their tensors elsewhere (``adamkit.torch``) call
``adam_update_stored_table_(fmt, table, sizes, steps, dtype, hp, keys)`` instead: one call for
every parameter of a (format, dtype) bucket, from raw addresses, one parallel region per step
rather than one per large tensor and no NumPy view per tensor, bit-identical to the
per-parameter kernels (``table_layout(fmt)`` says which formats; see the section "address
tables" below).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import bias_corrections
from adamkit.formats import int8_blockwise, int8_companded
from adamkit.formats.base import Storage
from adamkit.formats.bf16 import WEYL_MULTIPLIER
from adamkit.formats.containers import Bf16Format, DenseFormat, QuantizedFormat
from adamkit.kernels.numba_cpu import (
    PARALLEL_MIN_SIZE,
    SUPPORTED_DTYPES,
    _fma,
    _jit,
    _max_nan,
)
from adamkit.kernels.numba_tables import _chunks as _table_chunks
from adamkit.kernels.numba_tables import _twins, _view, any_overlap

__all__ = [
    "CHUNK_ELEMENTS",
    "TABLE_COLUMNS",
    "adam_update_stored_",
    "adam_update_stored_table_",
    "all_finite",
    "qualifies",
    "supports",
    "table_code_dtypes",
    "table_layout",
]

#: The parallel loops hand out chunks of about this many elements (whole blocks for 8-bit codes):
#: small enough to balance the threads, large enough to amortise the per-chunk setup and buffers.
CHUNK_ELEMENTS = 1 << 14

# Coefficient slots: ``cp`` in the parameter's dtype (what touches the parameter before the
# moments), ``c32`` in float32 (the moments and the update).
_GSIGN, _WD, _COUPLED, _PSCALE = range(4)
_W1, _W1_SMALL, _W2, _BETA2, _NEG_SS, _INV_BC2S, _EPS = range(7)

_F32 = np.dtype(np.float32)
_MAX_FINITE_BITS = np.int32(0x7F7FFFFF)  # bit pattern of the largest finite float32
_CB = int8_companded.DEFAULT_BLOCK  # blocks of the companded kernels (compile-time constants)
_CB64 = int8_companded.BUDGET_BLOCK
_BB = int8_blockwise.DEFAULT_BLOCK  # block of the dynamic-map kernel

# -- scalar helpers ----------------------------------------------------------------------------


@intrinsic
def _f32_bits(typingctx, x):
    """The bit pattern of a float32 as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """The float32 whose bit pattern is the low 32 bits of the unsigned integer ``u``."""
    if not isinstance(u, types.Integer) or u.signed or u.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if u.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(u), codegen


@_jit(inline="always")
def _bf16_decode(bits):
    return _bits_f32(np.uint32(bits) << np.uint32(16))


@intrinsic
def _bf16_round(typingctx, x, noise):
    """bf16 bits (``uint16``) of float32 ``x``, as :mod:`adamkit.formats.bf16` rounds it.

    ``noise`` < 0: to nearest, ties to even (``encode_nearest``); else the low 16 bits of
    ``noise`` are added below the kept half, then truncated (``encode_stochastic``).  NaN becomes
    the quiet NaN of its sign.  Written in IR so that it stays 32-bit integer arithmetic (numba
    would widen to 64 bits, halving the vector width).
    """
    if x != types.float32 or not isinstance(noise, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value, rand = args
        if rand.type.width > 32:
            low = builder.trunc(rand, i32)
        else:
            low = builder.sext(rand, i32) if rand.type.width < 32 else rand
        bits = builder.bitcast(value, i32)
        high = builder.lshr(bits, ir.Constant(i32, 16))
        nearest_add = builder.add(ir.Constant(i32, 0x7FFF), builder.and_(high, ir.Constant(i32, 1)))
        random_add = builder.and_(low, ir.Constant(i32, 0xFFFF))
        is_nearest = builder.icmp_signed("<", low, ir.Constant(i32, 0))
        add = builder.select(is_nearest, nearest_add, random_add)
        rounded = builder.lshr(builder.add(bits, add), ir.Constant(i32, 16))
        quiet = builder.or_(ir.Constant(i32, 0x7FC0), builder.and_(high, ir.Constant(i32, 0x8000)))
        is_nan = builder.fcmp_unordered("uno", value, value)
        return builder.trunc(builder.select(is_nan, quiet, rounded), ir.IntType(16))

    return types.uint16(x, noise), codegen


@intrinsic
def _weyl16(typingctx, key, i):
    """Rounding noise for element ``i`` of the stream ``key``: the top 16 bits of
    ``(i * WEYL_MULTIPLIER + key) mod 2**32`` as int32 in [0, 2**16), as
    :func:`adamkit.formats.bf16.weyl_noise`.  In 32-bit integer lanes; in a loop over ``i``
    LLVM turns the product into one vector add."""
    if not (isinstance(key, types.Integer) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def low32(value):
            return builder.trunc(value, i32) if value.type.width > 32 else value

        step = builder.mul(low32(args[1]), ir.Constant(i32, WEYL_MULTIPLIER))
        u = builder.add(step, low32(args[0]))
        return builder.lshr(u, ir.Constant(i32, 16))

    return types.int32(key, i), codegen


@_jit(inline="always")
def _unpack(cp, c32):
    # Scalars out of the arrays before the loops: values cannot alias the arrays being written,
    # so the compiler keeps them in registers and vectorises (as numba_cpu._unpack).
    return (
        cp[_GSIGN],
        cp[_WD],
        cp[_COUPLED] != 0,
        cp[_PSCALE],
        c32[_W1],
        c32[_W1_SMALL] != 0,
        c32[_W2],
        c32[_BETA2],
        c32[_NEG_SS],
        c32[_INV_BC2S],
        c32[_EPS],
    )


def _like(x, ref):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_like, inline="always")
def _like_overload(x, ref):
    """``x`` in the float type of ``ref`` (float64 parameters keep their moment arithmetic wide)."""
    if isinstance(ref, types.Float) and ref.bitwidth == 64:
        return lambda x, ref: np.float64(x)
    return lambda x, ref: np.float32(x)


@_jit(inline="always")
def _grad(p, g, k):
    """The gradient the moments see, in the parameter's dtype: sign for ``maximize``, coupled
    decay added (as the reference adds it)."""
    g = g * k[0]
    if k[2]:
        g = g + k[1] * p
    return g


@_jit(inline="always")
def _moments(g, m, v, k):
    """New float32 ``(m, v)`` from ``g`` (the parameter's dtype) and decoded float32 ``m``, ``v``:
    one FMA each, in the parameter's dtype and rounded to float32 once (for float32 parameters
    that is the float32 FMA; float64 ones keep ``g - m`` exact, as the reference does).  For
    ``1 - beta1 < 0.5`` the lerp is ``m + w1 (g - m)``, else ``g - beta1 (g - m)`` (``_W1``
    holds ``-beta1`` then), as torch.lerp and reference.ema."""
    w1, small, w2, beta2 = k[4], k[5], k[6], k[7]
    mw = _like(m, g)
    base = mw if small else g
    m = np.float32(_fma(g - mw, _like(w1, g), base))
    v = np.float32(_fma(_like(w2, g) * g, g, _like(v * beta2, g)))
    return m, v


@_jit(inline="always")
def _apply(p, m, root, k):
    """``p * (1 - lr lambda) + update``; the update formed in float32 from the new ``m`` and
    ``root = sqrt(v)`` (``sqrt(v_max)`` with AMSGrad), added in the parameter's dtype."""
    neg_ss, inv_bc2s, eps = k[8], k[9], k[10]
    return p * k[3] + (neg_ss * m) / (root * inv_bc2s + eps)


# -- dense float32 moments ---------------------------------------------------------------------
#
# Each "span" updates whole flat arrays indexed from 0; the parallel kernels hand it slices.


@_jit(inline="always")
def _dense_loop(p, g, m, v, w, amsgrad, k):
    for i in range(p.size):
        pi = p[i]
        mi, vi = _moments(_grad(pi, g[i], k), m[i], v[i], k)
        m[i] = mi
        v[i] = vi
        if amsgrad:
            wi = _max_nan(w[i], vi)
            w[i] = wi
            p[i] = _apply(pi, mi, np.sqrt(wi), k)
        else:
            p[i] = _apply(pi, mi, np.sqrt(vi), k)


@_jit()
def _dense_span(p, g, m, v, w, amsgrad, k):
    # The flag is a constant at each call below, so each loop compiles without its branches
    # (LLVM does not unswitch them, and would not vectorise the loop with them).
    if amsgrad:
        _dense_loop(p, g, m, v, w, True, k)
    else:
        _dense_loop(p, g, m, v, w, False, k)


@_jit()
def _dense_serial(p, g, m, v, w, amsgrad, cp, c32):
    _dense_span(p, g, m, v, w, amsgrad, _unpack(cp, c32))


@_jit(parallel=True)
def _dense_parallel(p, g, m, v, w, amsgrad, cp, c32):
    k = _unpack(cp, c32)
    n = p.size
    for c in prange((n + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS):
        lo = c * CHUNK_ELEMENTS
        hi = min(lo + CHUNK_ELEMENTS, n)
        wc = w[lo:hi] if amsgrad else w
        _dense_span(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], wc, amsgrad, k)


# -- bf16 bits ---------------------------------------------------------------------------------


@_jit(inline="always")
def _weyl_keys(key, key2, offset):
    """The keys of m, v and v_max for a span whose element 0 is element ``offset`` of the whole
    parameter: ``i * G + (key + offset * G) == (offset + i) * G + key`` (mod 2**32), so the
    loop needs no offset (an int64 ``offset + i`` in it cost 0.4 ns per element, a third)."""
    shift = np.uint64(offset) * np.uint64(WEYL_MULTIPLIER)
    return key + shift, (key >> np.uint64(32)) + shift, key2 + shift


@_jit(inline="always")
def _bf16_loop(p, g, m, v, w, amsgrad, stochastic, k, keys):
    nearest = np.int32(-1)
    key_m, key_v, key_w = keys
    for i in range(p.size):
        pi = p[i]
        mi, vi = _moments(_grad(pi, g[i], k), _bf16_decode(m[i]), _bf16_decode(v[i]), k)
        if amsgrad:
            wi = _max_nan(_bf16_decode(w[i]), vi)
            p[i] = _apply(pi, mi, np.sqrt(wi), k)
        else:
            wi = vi
            p[i] = _apply(pi, mi, np.sqrt(vi), k)
        if stochastic:
            m[i] = _bf16_round(mi, _weyl16(key_m, i))
            v[i] = _bf16_round(vi, _weyl16(key_v, i))
            if amsgrad:
                w[i] = _bf16_round(wi, _weyl16(key_w, i))
        else:
            m[i] = _bf16_round(mi, nearest)
            v[i] = _bf16_round(vi, nearest)
            if amsgrad:
                w[i] = _bf16_round(wi, nearest)


@_jit(vector_bits=512)
def _bf16_span(p, g, m, v, w, amsgrad, stochastic, k, key, key2, offset):
    keys = _weyl_keys(key, key2, offset)
    if amsgrad:
        if stochastic:
            _bf16_loop(p, g, m, v, w, True, True, k, keys)
        else:
            _bf16_loop(p, g, m, v, w, True, False, k, keys)
    elif stochastic:
        _bf16_loop(p, g, m, v, w, False, True, k, keys)
    else:
        _bf16_loop(p, g, m, v, w, False, False, k, keys)


# The kernels take the keys of element 0 of ``p`` (a parameter's offset folded in by _shift_keys
# beforehand: an offset argument cost 0.1 us per call, a few percent for small tensors).


@_jit()
def _bf16_serial(p, g, m, v, w, amsgrad, cp, c32, stochastic, key, key2):
    _bf16_span(p, g, m, v, w, amsgrad, stochastic, _unpack(cp, c32), key, key2, 0)


@_jit(parallel=True)
def _bf16_parallel(p, g, m, v, w, amsgrad, cp, c32, stochastic, key, key2):
    k = _unpack(cp, c32)
    n = p.size
    for c in prange((n + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS):
        lo = c * CHUNK_ELEMENTS
        hi = min(lo + CHUNK_ELEMENTS, n)
        wc = w[lo:hi] if amsgrad else w
        pc, gc, mc, vc = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        _bf16_span(pc, gc, mc, vc, wc, amsgrad, stochastic, k, key, key2, lo)


# -- 8-bit codes, common structure ---------------------------------------------------------------
#
# Each "span" runs over whole blocks of flat arrays indexed from 0, its block loops written in its
# own body with the block length a compile-time constant: LLVM then vectorises them completely
# (with the loops in a numba-inlined helper, or indexing into the full arrays from a parallel
# loop, the same code ran 1.6x and 4x slower).  The AMSGrad variant is a second span for the same
# reason (a branch on a run-time flag would stay in the loop).  A partial last block is run
# through the same span on zero-padded copies (zeros encode to zeros and do not change a block's
# absmax, so the padding cannot change the real elements' codes).


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask the cache for the line holding element ``index`` of the 1-d array ``arr``: a hint
    (``prefetcht0``), which never faults, so ``index`` may lie past the end."""
    if not (isinstance(arr, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        address = builder.bitcast(builder.gep(data, [args[1]]), i8p)  # not inbounds: a hint
        # read, high temporal locality (all cache levels), data cache
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


#: How far ahead (elements) the 8-bit spans prefetch the parameter, gradient and codes.  The
#: hardware prefetcher alone left the companded step 40% slower on a 8M tensor (DRAM) than on
#: an L2-resident one, single-threaded; 1024 ahead removed most of that (0.97 -> 0.72 ns per
#: element; 256 to 4096 all within 4%), at no cost when the data is in cache.
_PREFETCH_AHEAD = 1024


@_jit(inline="always")
def _prefetch_block(p, g, mc, vc, lo, block):
    """Prefetch the block ``_PREFETCH_AHEAD`` elements after ``lo``: float32 lines of 16
    elements, code lines of 64."""
    ahead = lo + _PREFETCH_AHEAD
    for q in range(0, block, 16):
        _prefetch(p, ahead + q)
        _prefetch(g, ahead + q)
    for q in range(0, block, 64):
        _prefetch(mc, ahead + q)
        _prefetch(vc, ahead + q)


@_jit(inline="always")
def _scale(amax):
    """The block scale from its absmax bits, and a divisor that is never 0 (a block of zeros
    keeps scale 0 and encodes to zeros, as ``_blocks.safe_divide`` has it)."""
    s = _bits_f32(np.uint32(amax))
    return s, (s if s > np.float32(0.0) else np.float32(1.0))


# -- companded int8 codes ------------------------------------------------------------------------
#
# Decode table: signed code c (read through its uint8 bit pattern) -> c / (254 - |c|), the
# codec's z / (2 - |z|) with z = c / 127, formed in float64 and rounded once.  -128 is never
# produced (nor accepted from a state dict); its entry is the formula's value anyway.

_C_SIGNED = np.arange(256, dtype=np.int64)
_C_SIGNED = np.where(_C_SIGNED < 128, _C_SIGNED, _C_SIGNED - 256)
_CMP_DECODE = (_C_SIGNED / (254.0 - np.abs(_C_SIGNED))).astype(np.float32)
del _C_SIGNED


@_jit(inline="always")
def _cmp_new(p, g, mcode, vcode, sm, sv, k):
    """New float32 ``(m, sqrt(v))`` of one element from its codes (``sv`` = scale / 255)."""
    r = np.float32(vcode) * sv
    m, v = _moments(_grad(p, g, k), _CMP_DECODE[np.uint8(mcode)] * sm, r * r, k)
    return m, np.sqrt(v)


@_jit(inline="always")
def _cmp_code_m(m, divisor):
    """``rint(127 z)``, ``z = 2y / (1 + |y|)``, ``y = m / s``: one division (the codec: two)."""
    return np.int8(np.rint(np.float32(254.0) * m / (divisor + abs(m))))


@_jit(inline="always")
def _cmp_code_root(y):
    """The unsigned code of ``y = 255 r / s``, never 0 for ``y > 0`` (``keep_nonzero``: a
    positive second moment never flushes to 0)."""
    # rint then an integer max: one conversion (``cvtps2dq`` rounds to nearest even), no float
    # compare-and-add (5% of the step at 512 bits)
    return np.uint8(max(np.int32(np.rint(y)), np.int32(y > np.float32(0.0))))


#: Vector width of the companded spans for blocks of 32 (see ``numba_cpu._jit``): 512 bits made
#: them 13% faster; blocks of 64 keep LLVM's choice, which was as fast with 2 threads and 2-3%
#: faster with 1 (module docstring).
_CMP_VECTOR_BITS = 512


def _companded_kernel(block: int, vector_bits: int | None = _CMP_VECTOR_BITS) -> Callable[..., int]:
    """The companded step over whole blocks of ``block`` elements, compiled for that block
    (``vector_bits``: see ``numba_cpu._jit``; ``benchmarks/kernel_variants.py`` builds others).

    ``blocks(p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)`` with ``p.size == ms.size * block``
    returns how many blocks were left unchanged for non-finite moments.  The block length is a
    closure constant, so each block size gets its own fully vectorised loops.  Each variant's
    functions get their own qualified name, hence their own entries in numba's on-disk cache
    (which knows a function by its name and code, not by the compiler options).
    """
    tag = f"{block}_{vector_bits}"

    def jit(fn: Callable[..., Any], bits: int | None = vector_bits) -> Callable[..., Any]:
        fn.__qualname__ = f"_companded_kernel.{fn.__name__}_{tag}"
        return _jit(vector_bits=bits)(fn)

    @jit
    def span(p, g, mc, ms, vc, vs, k, mb, rb):
        bad = 0
        for b in range(ms.size):
            lo = b * block
            _prefetch_block(p, g, mc, vc, lo, block)
            sm = ms[b]
            sv = vs[b] * np.float32(1.0 / 255.0)
            am = av = np.int32(0)
            for j in range(block):
                mi, ri = _cmp_new(p[lo + j], g[lo + j], mc[lo + j], vc[lo + j], sm, sv, k)
                mb[j] = mi
                rb[j] = ri
                am = max(am, _abs_bits(mi))
                av = max(av, _abs_bits(ri))
            if max(am, av) > _MAX_FINITE_BITS:
                bad += 1  # int8 cannot hold NaN/inf: leave the whole block as it was
                continue
            sm, dm = _scale(am)
            sv, dv = _scale(av)
            inv_v = np.float32(255.0) / dv
            for j in range(block):
                p[lo + j] = _apply(p[lo + j], mb[j], rb[j], k)
                mc[lo + j] = _cmp_code_m(mb[j], dm)
                vc[lo + j] = _cmp_code_root(rb[j] * inv_v)
            ms[b] = sm
            vs[b] = sv
        return bad

    # AMSGrad: the stored ``sqrt(v_max)`` becomes ``max(sqrt(v_max), sqrt(v))`` (=
    # ``sqrt(max(v_max, v))``: the root is monotone).  A second span, not a run-time branch,
    # which would stay in the loop.
    @jit
    def span_ams(p, g, mc, ms, vc, vs, wc, ws, k, mb, rb, wb):
        bad = 0
        for b in range(ms.size):
            lo = b * block
            _prefetch_block(p, g, mc, vc, lo, block)
            _prefetch(wc, lo + _PREFETCH_AHEAD)  # the v_max codes: a line holds 64
            sm = ms[b]
            sv = vs[b] * np.float32(1.0 / 255.0)
            sw = ws[b] * np.float32(1.0 / 255.0)
            am = av = aw = np.int32(0)
            for j in range(block):
                mi, ri = _cmp_new(p[lo + j], g[lo + j], mc[lo + j], vc[lo + j], sm, sv, k)
                wi = _max_nan(np.float32(wc[lo + j]) * sw, ri)
                mb[j] = mi
                rb[j] = ri
                wb[j] = wi
                am = max(am, _abs_bits(mi))
                av = max(av, _abs_bits(ri))
                aw = max(aw, _abs_bits(wi))
            if max(am, max(av, aw)) > _MAX_FINITE_BITS:
                bad += 1
                continue
            sm, dm = _scale(am)
            sv, dv = _scale(av)
            sw, dw = _scale(aw)
            inv_v = np.float32(255.0) / dv
            inv_w = np.float32(255.0) / dw
            for j in range(block):
                p[lo + j] = _apply(p[lo + j], mb[j], wb[j], k)
                mc[lo + j] = _cmp_code_m(mb[j], dm)
                vc[lo + j] = _cmp_code_root(rb[j] * inv_v)
                wc[lo + j] = _cmp_code_root(wb[j] * inv_w)
            ms[b] = sm
            vs[b] = sv
            ws[b] = sw
        return bad

    def blocks(p, g, mc, ms, vc, vs, wc, ws, amsgrad, k):
        mb = np.empty(block, np.float32)  # buffers of this thread
        rb = np.empty(block, np.float32)
        if amsgrad:
            wb = np.empty(block, np.float32)
            return span_ams(p, g, mc, ms, vc, vs, wc, ws, k, mb, rb, wb)
        return span(p, g, mc, ms, vc, vs, k, mb, rb)

    return jit(blocks, None)


_cmp_blocks = _companded_kernel(_CB, _CMP_VECTOR_BITS)
_cmp64_blocks = _companded_kernel(_CB64, None)


# -- dynamic-map int8 codes (int8_blockwise) -------------------------------------------------
#
# The codec's tables are frozen into the compiled code as constants: LLVM then knows that the
# table lookups cannot alias the arrays being written, which lets it vectorise them as gathers.
# The dynamic map is part of the checkpoint format; were it ever changed, numba's on-disk cache
# of this module would have to be cleared with it (tests compare the kernel with the codec).


def _packed_bucket_table(signed: bool) -> np.ndarray:
    """``int8_blockwise``'s bucket table for ``|y| <= 1``, one int32 per bucket: the code at the
    bucket's low end in bits 0-7, and above them where the bucket's threshold sits.

    The codec's rule is ``code = table[bucket] + (y > thresholds[table[bucket]])`` with the bucket
    the top 17 bits of ``y`` (sign, exponent, 8 significand bits), holding at most one threshold.
    Here (one lookup instead of two dependent ones):

    - buckets below ``2**-24`` (:data:`_KEY_LOW`) all have the code of 0 and no threshold, so they
      are folded into the lowest kept bucket (checked below): 12290 entries instead of 131072;
    - a threshold inside the bucket shares ``y``'s top 17 bits, so ``y > threshold`` compares the
      low 15 bits, mirrored for negative buckets where a larger value has smaller low bits
      (:func:`_rank`); a bucket without one gets the largest rank, which ``y`` never exceeds.
    """
    table, upper = int8_blockwise._bucket_table(signed)
    keys = np.arange(1 << 17, dtype=np.int64)
    sign, key = keys >> 16, keys & 0xFFFF
    used = key <= _KEY_ONE  # |y| <= 1
    index = sign * _KEY_SPAN + np.maximum(key - _KEY_LOW, 0)
    codes = np.zeros(2 * _KEY_SPAN, dtype=np.int64)
    codes[index[used]] = table[keys[used]]
    if not np.array_equal(codes[index[used]], table[keys[used]]):  # pragma: no cover
        raise AssertionError("folding the smallest buckets would change the int8 codes")
    folded = np.arange(2) * _KEY_SPAN  # entries standing for every |y| < 2**-23
    if not np.all(upper[codes[folded]] > 2.0**-23):  # pragma: no cover
        raise AssertionError("a folded bucket would hold an int8 threshold")
    entry = np.arange(2 * _KEY_SPAN)
    entry_sign, entry_key = entry // _KEY_SPAN, entry % _KEY_SPAN + _KEY_LOW
    cut = upper[codes].astype(np.float32).view(np.uint32).astype(np.int64)
    inside = ((cut >> 15) == ((entry_sign << 16) | entry_key)) & (entry_key > _KEY_LOW)
    rank = np.where(entry_sign == 1, (cut & 0x7FFF) ^ 0x7FFF, cut & 0x7FFF)
    rank = np.where(inside, rank, 0x7FFF)
    return (codes | (rank << 8)).astype(np.int32)


_KEY_ONE = 0x7F00  # top 16 bits of |y| = 1.0
_KEY_LOW = 103 << 8  # top 16 bits of 2**-24
_KEY_SPAN = _KEY_ONE - _KEY_LOW + 1
_Q_SIGNED = np.array(int8_blockwise.dynamic_map(True))
_Q_UNSIGNED = np.array(int8_blockwise.dynamic_map(False))
_BUCKETS_SIGNED = _packed_bucket_table(True)
_BUCKETS_UNSIGNED = _packed_bucket_table(False)
_ZERO_SIGNED = int(int8_blockwise.zero_code(True))
_ZERO_UNSIGNED = int(int8_blockwise.zero_code(False))


@intrinsic
def _bucket(typingctx, y):
    """Index of float32 ``y`` (``|y| <= 1``) in the reduced bucket tables, as int32."""
    if y != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        key = builder.and_(builder.lshr(bits, ir.Constant(i32, 15)), ir.Constant(i32, 0xFFFF))
        rel = builder.sub(key, ir.Constant(i32, _KEY_LOW))
        zero = ir.Constant(i32, 0)
        rel = builder.select(builder.icmp_signed("<", rel, zero), zero, rel)
        sign = builder.lshr(bits, ir.Constant(i32, 31))
        return builder.add(builder.mul(sign, ir.Constant(i32, _KEY_SPAN)), rel)

    return types.int32(y), codegen


@intrinsic
def _abs_bits(typingctx, x):
    """The bits of ``|x|`` (float32) as int32: ordered like ``|x|``, NaN/inf above all finite."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))

    return types.int32(x), codegen


@intrinsic
def _rank(typingctx, y):
    """The low 15 bits of float32 ``y``, mirrored when ``y`` is negative: within a bucket, the
    order of ``y`` (see :func:`_packed_bucket_table`)."""
    if y != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        low = builder.and_(bits, ir.Constant(i32, 0x7FFF))
        negative = builder.ashr(bits, ir.Constant(i32, 31))  # all ones when negative
        return builder.xor(low, builder.and_(negative, ir.Constant(i32, 0x7FFF)))

    return types.int32(y), codegen


@_jit(inline="always")
def _code_signed(y):
    """``int8_blockwise.quantize(y, signed=True)`` for ``|y| <= 1``."""
    e = _BUCKETS_SIGNED[_bucket(y)]
    return (e & np.int32(0xFF)) + np.int32(_rank(y) > (e >> np.int32(8)))


@_jit(inline="always")
def _code_unsigned(y):
    """``quantize(y, signed=False)`` for ``0 <= y <= 1``, then the codec's ``keep_nonzero``."""
    e = _BUCKETS_UNSIGNED[_bucket(y)]
    c = (e & np.int32(0xFF)) + np.int32(_rank(y) > (e >> np.int32(8)))
    return c + np.int32((c == _ZERO_UNSIGNED) & (y != np.float32(0.0)))


@_jit(inline="always")
def _bw_new(p, g, mcode, vcode, sm, sv, k):
    """New float32 ``(m, sqrt(v))`` of one element from its dynamic-map codes."""
    r = _Q_UNSIGNED[vcode] * sv
    m, v = _moments(_grad(p, g, k), _Q_SIGNED[mcode] * sm, r * r, k)
    return m, np.sqrt(v)


@_jit()
def _bw_span(p, g, mc, ms, vc, vs, k, mb, rb):
    """As :func:`_cmp_span` for dynamic-map codes (``x / s`` divided exactly, as the codec)."""
    bad = 0
    for b in range(ms.size):
        lo = b * _BB
        _prefetch_block(p, g, mc, vc, lo, _BB)
        sm = ms[b]
        sv = vs[b]
        am = av = np.int32(0)
        for j in range(_BB):
            mi, ri = _bw_new(p[lo + j], g[lo + j], mc[lo + j], vc[lo + j], sm, sv, k)
            mb[j] = mi
            rb[j] = ri
            am = max(am, _abs_bits(mi))
            av = max(av, _abs_bits(ri))
        if max(am, av) > _MAX_FINITE_BITS:
            bad += 1
            continue
        sm, dm = _scale(am)
        sv, dv = _scale(av)
        for j in range(_BB):
            p[lo + j] = _apply(p[lo + j], mb[j], rb[j], k)
            mc[lo + j] = _code_signed(mb[j] / dm)
            vc[lo + j] = _code_unsigned(rb[j] / dv)
        ms[b] = sm
        vs[b] = sv
    return bad


@_jit()
def _bw_span_ams(p, g, mc, ms, vc, vs, wc, ws, k, mb, rb, wb):
    """:func:`_bw_span` with AMSGrad (see :func:`_cmp_span_ams`)."""
    bad = 0
    for b in range(ms.size):
        lo = b * _BB
        _prefetch_block(p, g, mc, vc, lo, _BB)
        for q in range(0, _BB, 64):  # the v_max codes
            _prefetch(wc, lo + _PREFETCH_AHEAD + q)
        sm = ms[b]
        sv = vs[b]
        sw = ws[b]
        am = av = aw = np.int32(0)
        for j in range(_BB):
            mi, ri = _bw_new(p[lo + j], g[lo + j], mc[lo + j], vc[lo + j], sm, sv, k)
            wi = _max_nan(_Q_UNSIGNED[wc[lo + j]] * sw, ri)
            mb[j] = mi
            rb[j] = ri
            wb[j] = wi
            am = max(am, _abs_bits(mi))
            av = max(av, _abs_bits(ri))
            aw = max(aw, _abs_bits(wi))
        if max(am, max(av, aw)) > _MAX_FINITE_BITS:
            bad += 1
            continue
        sm, dm = _scale(am)
        sv, dv = _scale(av)
        sw, dw = _scale(aw)
        for j in range(_BB):
            p[lo + j] = _apply(p[lo + j], mb[j], wb[j], k)
            mc[lo + j] = _code_signed(mb[j] / dm)
            vc[lo + j] = _code_unsigned(rb[j] / dv)
            wc[lo + j] = _code_unsigned(wb[j] / dw)
        ms[b] = sm
        vs[b] = sv
        ws[b] = sw
    return bad


@_jit()
def _bw_blocks(p, g, mc, ms, vc, vs, wc, ws, amsgrad, k):
    mb = np.empty(_BB, np.float32)
    rb = np.empty(_BB, np.float32)
    if amsgrad:
        wb = np.empty(_BB, np.float32)
        return _bw_span_ams(p, g, mc, ms, vc, vs, wc, ws, k, mb, rb, wb)
    return _bw_span(p, g, mc, ms, vc, vs, k, mb, rb)


# -- 8-bit codes: threads, partial blocks ----------------------------------------------------------

_COMPANDED, _BLOCKWISE, _COMPANDED64 = 0, 1, 2  # ``kind`` of the 8-bit kernels


@_jit(inline="always")
def _q_layout(kind):
    """``(block, code of 0 for m, code of 0 for sqrt(v))`` of a kind of 8-bit code."""
    if kind == _COMPANDED:
        return _CB, 0, 0
    if kind == _COMPANDED64:
        return _CB64, 0, 0
    return _BB, _ZERO_SIGNED, _ZERO_UNSIGNED


@_jit()
def _q_blocks(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k):
    if kind == _COMPANDED:
        return _cmp_blocks(p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)
    if kind == _COMPANDED64:
        return _cmp64_blocks(p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)
    return _bw_blocks(p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)


@_jit()
def _q_tail(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k):
    """The partial last block, if any, through the span on zero-padded copies."""
    block, zero_m, zero_v = _q_layout(kind)
    n = p.size
    lo = (n // block) * block
    if lo == n:
        return 0
    count = n - lo
    last = ms.size - 1
    pp = np.zeros(block, p.dtype)
    gg = np.zeros(block, g.dtype)
    mcc = np.full(block, zero_m, mc.dtype)
    vcc = np.full(block, zero_v, vc.dtype)
    wcc = np.full(block if amsgrad else 0, zero_v, vc.dtype)
    pp[:count] = p[lo:]
    gg[:count] = g[lo:]
    mcc[:count] = mc[lo:]
    vcc[:count] = vc[lo:]
    if amsgrad:
        wcc[:count] = wc[lo:]
    wsl = ws[last:] if amsgrad else ws
    bad = _q_blocks(kind, pp, gg, mcc, ms[last:], vcc, vs[last:], wcc, wsl, amsgrad, k)
    p[lo:] = pp[:count]
    mc[lo:] = mcc[:count]
    vc[lo:] = vcc[:count]
    if amsgrad:
        wc[lo:] = wcc[:count]
    return bad


@_jit()
def _q_serial(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, cp, c32):
    k = _unpack(cp, c32)
    block = _q_layout(kind)[0]
    full = p.size // block
    hi = full * block
    wcf = wc[:hi] if amsgrad else wc
    wsf = ws[:full] if amsgrad else ws
    bad = _q_blocks(
        kind, p[:hi], g[:hi], mc[:hi], ms[:full], vc[:hi], vs[:full], wcf, wsf, amsgrad, k
    )
    return bad + _q_tail(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)


@_jit(parallel=True)
def _q_parallel(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, cp, c32):
    k = _unpack(cp, c32)
    block = _q_layout(kind)[0]
    full = p.size // block
    per_chunk = max(1, CHUNK_ELEMENTS // block)
    chunks = (full + per_chunk - 1) // per_chunk
    bad = np.zeros(chunks, np.int64)  # per chunk: a scalar reduction trips numba's parfors
    for c in prange(chunks):
        first = c * per_chunk
        last = min(first + per_chunk, full)
        lo = first * block
        hi = last * block
        # slices: indexing the whole arrays from inside the parallel loop was 4x slower
        wcc = wc[lo:hi] if amsgrad else wc
        wsc = ws[first:last] if amsgrad else ws
        bad[c] = _q_blocks(
            kind,
            p[lo:hi],
            g[lo:hi],
            mc[lo:hi],
            ms[first:last],
            vc[lo:hi],
            vs[first:last],
            wcc,
            wsc,
            amsgrad,
            k,
        )
    tail = _q_tail(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)
    return bad.sum() + tail


# -- finiteness of gradients ------------------------------------------------------------------


@_jit()
def _all_finite(x):
    # Chunks of whole vectors, an early exit between them: one read pass, no temporary.
    n = x.size
    for lo in range(0, n, CHUNK_ELEMENTS):
        hi = min(lo + CHUNK_ELEMENTS, n)
        bad = False
        for i in range(lo, hi):
            bad |= not np.isfinite(x[i])
        if bad:
            return False
    return True


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    """Whether every element of every array is finite: one read pass per array, no temporary
    (``numpy.isfinite(a).all()`` writes a bool array first).  C-contiguous float32/float64 arrays
    go through the compiled loop, anything else through NumPy."""
    for a in arrays:
        if type(a) is np.ndarray and a.dtype in SUPPORTED_DTYPES and a.flags.c_contiguous:
            if a.size and not _all_finite(a.reshape(-1)):
                return False
        elif not np.isfinite(np.asarray(a)).all():
            return False
    return True


# -- Python side -------------------------------------------------------------------------------


def _coefficients(hp: AdamHyperParams, step: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """``(cp, c32)`` for update number ``step``: each scalar formed in double as the reference
    forms it, then rounded once to the dtype it is used in."""
    bc1, bc2_sqrt = bias_corrections(step, hp.beta1, hp.beta2, hp.bias_correction)
    decay = hp.weight_decay != 0.0
    coupled = decay and not hp.decoupled_weight_decay
    w1 = 1.0 - hp.beta1
    small = w1 < 0.5
    cp = np.empty(4, dtype=dtype)
    cp[_GSIGN] = -1.0 if hp.maximize else 1.0
    cp[_WD] = hp.weight_decay if coupled else 0.0
    cp[_COUPLED] = 1.0 if coupled else 0.0
    cp[_PSCALE] = 1.0 - hp.lr * hp.weight_decay if decay and not coupled else 1.0
    c32 = np.empty(7, dtype=np.float32)
    c32[_W1] = w1 if small else -(1.0 - w1)
    c32[_W1_SMALL] = 1.0 if small else 0.0
    c32[_W2] = 1.0 - hp.beta2
    c32[_BETA2] = hp.beta2
    c32[_NEG_SS] = -(hp.lr / bc1)
    c32[_INV_BC2S] = 1.0 / bc2_sqrt
    c32[_EPS] = hp.eps
    return cp, c32


# (codec, block) -> the kind of kernel compiled for it
_QUANTIZED = {
    (int8_companded, _CB): _COMPANDED,
    (int8_companded, _CB64): _COMPANDED64,
    (int8_blockwise, _BB): _BLOCKWISE,
}


def supports(fmt: Any) -> bool:
    """True when ``fmt`` has a fused kernel here: ``bf16`` (either rounding), dense ``fp32``
    moments, and the 8-bit formats with nearest rounding, ``sqrt(v)`` stored and their codec's
    block of a compiled kernel (companded 32: ``"int8-companded"``, companded 64:
    ``"int8-companded-64"``; dynamic map 256: ``"int8"``).
    (``"native"`` state is the plain kernel's, :mod:`adamkit.kernels.numba_cpu`.)"""
    if isinstance(fmt, Bf16Format):
        return True
    if isinstance(fmt, QuantizedFormat):
        return (
            (fmt.codec, fmt.block) in _QUANTIZED
            and fmt.rounding == "nearest"
            and fmt.sqrt_second_moment
        )
    return isinstance(fmt, DenseFormat) and fmt.dtype == _F32


_ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _flat(a: Any, dtype: np.dtype, size: int) -> np.ndarray | None:
    """``a`` as a 1-d writeable view of ``size`` elements of ``dtype``, or None."""
    # Plain attribute reads and identity first: this runs for every parameter of every step, and
    # with small tensors it costs more than the kernel (as numba_cpu._flat_views).
    if type(a) is not np.ndarray:
        return None
    d = a.dtype
    if (d is not dtype and d != dtype) or a.size != size:
        return None
    flags = a.flags
    if not (flags.c_contiguous and flags.writeable):
        return None
    return a if a.ndim == 1 else a.reshape(-1)


_U16 = np.dtype(np.uint16)
_NO_KEY = np.uint64(0)
_MASK32 = 0xFFFFFFFF


def _shift_keys(key: Any, key2: Any, offset: int) -> tuple[np.uint64, np.uint64]:
    """The kernel keys of a parameter whose element 0 is element ``offset`` of the whole tensor:
    each 32-bit key (``m``: low half of ``key``, ``v``: high half, ``v_max``: ``key2``) plus
    ``offset * G`` mod 2**32, as ``_weyl_keys`` folds a chunk's offset (in Python integers)."""
    shift = offset * WEYL_MULTIPLIER
    key = int(key)
    low = (key + shift) & _MASK32
    high = ((key >> 32) + shift) & _MASK32
    return np.uint64(low | high << 32), np.uint64((int(key2) + shift) & _MASK32)


_CODE_DTYPES = {
    (codec, signed): np.dtype(codec.code_dtype(signed))
    for codec in (int8_companded, int8_blockwise)
    for signed in (True, False)
}


def _views(fmt: Any, param: Any, grad: Any, *stored: Storage | None) -> tuple[Any, ...] | None:
    """``(encoding, p, g, m arrays, v arrays, v_max arrays or None)`` as flat views, or None;
    ``fmt`` must be :func:`supports`-ed."""
    if type(param) is not np.ndarray or type(grad) is not np.ndarray:
        return None
    dtype = param.dtype
    if dtype not in SUPPORTED_DTYPES or grad.dtype != dtype or grad.shape != param.shape:
        return None
    if not grad.flags.c_contiguous:
        return None
    size = param.size
    p = _flat(param, dtype, size)
    if p is None:
        return None
    encoding = None
    out: list[Any] = []
    name, shape = fmt.name, param.shape
    for role, st in zip(_ROLES, stored, strict=True):
        if st is None:
            out.append(None)
            continue
        if type(st) is not Storage or st.format != name or st.role != role:
            return None
        if st.shape != shape or (encoding is not None and st.encoding != encoding):
            return None
        encoding = st.encoding
        arrays = _storage_views(fmt, st, size)
        if arrays is None:
            return None
        out.append(arrays)
    if out[0] is None or out[1] is None:
        return None
    return (encoding, p, grad if grad.ndim == 1 else grad.reshape(-1), *out)


def _storage_views(fmt: Any, st: Storage, size: int) -> tuple[np.ndarray, ...] | None:
    arrays = st.arrays
    encoding = st.encoding
    if encoding == "dense":
        values = _flat(arrays.get("values"), _F32, size)
        return None if values is None else (values,)
    if encoding == "bf16":
        if not isinstance(fmt, Bf16Format):
            return None
        bits = _flat(arrays.get("bits"), _U16, size)
        return None if bits is None else (bits,)
    if isinstance(fmt, QuantizedFormat) and encoding == fmt.name and st.block == fmt.block:
        codes = _flat(arrays.get("codes"), _CODE_DTYPES[fmt.codec, st.signed], size)
        scales = _flat(arrays.get("scales"), _F32, -(-size // fmt.block))
        if codes is None or scales is None:
            return None
        return codes, scales
    return None


def qualifies(
    fmt: Any,
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: Storage,
    exp_avg_sq: Storage,
    max_exp_avg_sq: Storage | None = None,
) -> bool:
    """True when a fused kernel can update this parameter and its stored moments in place.

    ``fmt`` must be :func:`supports`-ed; ``param`` a writeable C-contiguous float32/float64
    ``numpy.ndarray``, ``grad`` a C-contiguous array of its shape and dtype; each storage made by
    ``fmt`` for this shape with the matching role (``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``), one encoding for all, arrays writeable and contiguous.
    """
    if not supports(fmt):
        return False
    return _views(fmt, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) is not None


def adam_update_stored_(
    fmt: Any,
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[Storage],
    exp_avg_sqs: Sequence[Storage],
    max_exp_avg_sqs: Sequence[Storage | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    rng: np.random.Generator | None = None,
    fallback: Callable[..., None] | None = None,
    offsets: Sequence[int] | None = None,
) -> None:
    """One Adam step per parameter, in place, with moments kept in ``fmt``'s storages.

    The contract of :func:`adamkit.kernels.adam_update_` with :class:`Storage` moments:
    ``steps[i]`` is the 1-based update index, ``max_exp_avg_sqs[i]`` a storage exactly when
    ``hp.amsgrad`` (``ValueError`` otherwise), ``grads`` are only read.  ``rng`` is required
    when ``fmt.needs_rng`` (``TypeError`` otherwise); when some parameter takes a fused kernel,
    one 64-bit key per parameter (two with AMSGrad) is drawn from it, in parameter order (see
    the module docstring).  ``offsets[i]`` (default 0, ``ValueError`` unless one int >= 0 per
    parameter): the flat index of ``params[i]``'s first element in the whole tensor of which it
    is a contiguous part (a shard); the rounding noise is indexed by that global position.
    Parameters for which :func:`qualifies` is false go to ``fallback(fmt, param, grad, m, v,
    v_max, step, hp, rng)``; without one, ``TypeError`` naming the first of them.  These errors
    are raised before anything is modified.
    ``ValueError`` after a parameter's pass when some of its int8 blocks got non-finite moments
    (those blocks unchanged, see the module docstring; later parameters are not updated).
    """
    amsgrad = hp.amsgrad
    rows = list(zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True))
    for index, row in enumerate(rows):
        if (row[4] is not None) != amsgrad:
            raise ValueError(
                f"max_exp_avg_sqs[{index}] must be a storage exactly when amsgrad=True "
                f"(amsgrad={amsgrad})"
            )
    if offsets is not None:
        offsets = list(offsets)
        if len(offsets) != len(rows) or not all(
            isinstance(o, int | np.integer) and not isinstance(o, bool) and o >= 0 for o in offsets
        ):
            raise ValueError(
                f"offsets must hold one int >= 0 per parameter ({len(rows)}), got {offsets!r}"
            )
    stochastic = bool(getattr(fmt, "needs_rng", False))
    if stochastic and not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{getattr(fmt, 'name', fmt)!r} state rounds stochastically: the update needs "
            f"rng=numpy.random.Generator, got {type(rng).__name__}"
        )
    views = [_views(fmt, *row[:5]) for row in rows] if supports(fmt) else [None] * len(rows)
    if fallback is None:
        for index, view in enumerate(views):
            if view is None:
                raise TypeError(
                    f"no fused kernel for parameter {index} with state format "
                    f"{getattr(fmt, 'name', fmt)!r} (needs C-contiguous float32/float64 arrays "
                    "of one shape and dtype and storages made by this format for that shape)"
                )
    # One 64-bit key per parameter (two with AMSGrad, interleaved), raw from the generator's bit
    # stream (``integers`` costs several microseconds a call, more than a small tensor's update).
    per = 2 if amsgrad else 1
    keys = (
        rng.bit_generator.random_raw(len(rows) * per)
        if stochastic and any(v is not None for v in views)
        else None
    )
    cache: dict[tuple[np.dtype, int], tuple[np.ndarray, ...]] = {}
    for index, (row, view) in enumerate(zip(rows, views, strict=True)):
        if view is None:
            fallback(fmt, *row, hp, rng)  # type: ignore[misc]
            continue
        encoding, p, g, m, v, w = view
        if p.size == 0:
            continue
        coef_key = (p.dtype, row[5])
        coef = cache.get(coef_key)
        if coef is None:
            coef = cache[coef_key] = _coefficients(hp, row[5], p.dtype)
        parallel = p.size >= PARALLEL_MIN_SIZE
        if encoding == "dense":
            wv = w[0] if amsgrad else m[0][:0]
            kernel = _dense_parallel if parallel else _dense_serial
            kernel(p, g, m[0], v[0], wv, amsgrad, *coef)
        elif encoding == "bf16":
            wv = w[0] if amsgrad else m[0][:0]
            key = key2 = _NO_KEY
            if keys is not None:
                key = keys[index * per]
                key2 = keys[index * per + 1] if amsgrad else key
                if offsets is not None and offsets[index]:
                    key, key2 = _shift_keys(key, key2, int(offsets[index]))
            kernel = _bf16_parallel if parallel else _bf16_serial
            kernel(p, g, m[0], v[0], wv, amsgrad, *coef, stochastic, key, key2)
        else:
            wc, ws = w if amsgrad else (v[0][:0], v[1][:0])
            kernel = _q_parallel if parallel else _q_serial
            bad = kernel(_QUANTIZED[fmt.codec, fmt.block], p, g, *m, *v, wc, ws, amsgrad, *coef)
            if bad:
                raise ValueError(
                    f"parameter {index}: {bad} block(s) of {fmt.block} got non-finite moments, "
                    f"which {fmt.name} state cannot hold; those blocks (parameter and state) were "
                    "left unchanged, the rest of the parameter was updated (skip non-finite "
                    "steps before the update: the guard's non-finite check)"
                )


# -- address tables: one call for many tensors -----------------------------------------------------
#
# The kernels above take one parameter per call: a serial call per small tensor, one parallel
# region (a thread wake-up) per large one, and the caller pays for a NumPy view of every array.
# The table kernels below take a step of every tensor of a (format, dtype) bucket in one call,
# from raw addresses (see :mod:`adamkit.kernels.numba_tables`, whose contract they share: the
# caller checks every tensor first and keeps it alive).  The work is cut into chunks that never
# cross a tensor (bf16: :data:`CHUNK_ELEMENTS` elements; 8-bit codes: whole blocks, plus the
# partial last block of a tensor as a chunk of its own) and each chunk runs the span functions
# above on carray views: the arithmetic of a block or element does not depend on the chunking,
# and bf16 noise is indexed by the element's position in its tensor, so the results are
# bit-identical to the per-parameter kernels (tested).

#: Columns of a stored-format address table: parameter, gradient, then for m, v and v_max the
#: codes (bf16: the bits) and the block scales (bf16: unused).  Without AMSGrad the v_max
#: columns repeat v's and are not read.
T_PARAM, T_GRAD, T_M, T_MS, T_V, T_VS, T_W, T_WS = range(8)
TABLE_COLUMNS = 8


@_jit()
def _bf16_chunk(table, sizes, rows, cps, c32s, keys, chunk, amsgrad, stochastic, pw, bw):
    # A function of its own, not inlined into the prange body (as numba_tables._update_chunk).
    i, start, stop = chunk[0], chunk[1], chunk[2]
    n = sizes[i]
    p = _view(table[i, T_PARAM], n, pw)[start:stop]
    g = _view(table[i, T_GRAD], n, pw)[start:stop]
    m = _view(table[i, T_M], n, bw)[start:stop]
    v = _view(table[i, T_V], n, bw)[start:stop]
    w = _view(table[i, T_W], n, bw)[start:stop] if amsgrad else m[:0]
    r = rows[i]
    k = _unpack(cps[r], c32s[r])
    _bf16_span(p, g, m, v, w, amsgrad, stochastic, k, keys[i, 0], keys[i, 1], start)


def _bf16_all(table, sizes, rows, cps, c32s, keys, chunks, amsgrad, stochastic, pw, bw):
    for c in prange(chunks.shape[0]):
        _bf16_chunk(table, sizes, rows, cps, c32s, keys, chunks[c], amsgrad, stochastic, pw, bw)


_bf16_table_serial, _bf16_table_parallel = _twins(_bf16_all)


@_jit()
def _dense_chunk(table, sizes, rows, cps, c32s, chunk, amsgrad, pw, fw):
    i, start, stop = chunk[0], chunk[1], chunk[2]
    n = sizes[i]
    p = _view(table[i, T_PARAM], n, pw)[start:stop]
    g = _view(table[i, T_GRAD], n, pw)[start:stop]
    m = _view(table[i, T_M], n, fw)[start:stop]
    v = _view(table[i, T_V], n, fw)[start:stop]
    w = _view(table[i, T_W], n, fw)[start:stop] if amsgrad else m[:0]
    r = rows[i]
    _dense_span(p, g, m, v, w, amsgrad, _unpack(cps[r], c32s[r]))


def _dense_all(table, sizes, rows, cps, c32s, chunks, amsgrad, pw, fw):
    for c in prange(chunks.shape[0]):
        _dense_chunk(table, sizes, rows, cps, c32s, chunks[c], amsgrad, pw, fw)


_dense_table_serial, _dense_table_parallel = _twins(_dense_all)


@_jit()
def _q_table_chunks(sizes, block):
    # (tensor, start, stop, tail) per chunk: runs of whole blocks of about CHUNK_ELEMENTS
    # elements, then the tensor's partial last block (tail = 1, start/stop its elements).
    per = max(1, CHUNK_ELEMENTS // block) * block
    count = 0
    for i in range(sizes.size):
        n = sizes[i]
        full = (n // block) * block
        count += (full + per - 1) // per + (1 if full < n else 0)
    out = np.empty((count, 4), dtype=np.int64)
    k = 0
    for i in range(sizes.size):
        n = sizes[i]
        full = (n // block) * block
        for start in range(0, full, per):
            out[k, 0] = i
            out[k, 1] = start
            out[k, 2] = min(start + per, full)
            out[k, 3] = 0
            k += 1
        if full < n:
            out[k, 0] = i
            out[k, 1] = full
            out[k, 2] = n
            out[k, 3] = 1
            k += 1
    return out


@_jit()
def _q_chunk(kind, table, sizes, rows, cps, c32s, chunk, amsgrad, pw, mw, vw, sw):
    i, start, stop = chunk[0], chunk[1], chunk[2]
    n = sizes[i]
    block = _q_layout(kind)[0]
    nb = (n + block - 1) // block
    p = _view(table[i, T_PARAM], n, pw)
    g = _view(table[i, T_GRAD], n, pw)
    mc = _view(table[i, T_M], n, mw)
    ms = _view(table[i, T_MS], nb, sw)
    vc = _view(table[i, T_V], n, vw)
    vs = _view(table[i, T_VS], nb, sw)
    wc = _view(table[i, T_W], n, vw) if amsgrad else vc[:0]
    ws = _view(table[i, T_WS], nb, sw) if amsgrad else vs[:0]
    r = rows[i]
    k = _unpack(cps[r], c32s[r])
    if chunk[3]:
        return _q_tail(kind, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)
    first = start // block
    last = stop // block
    # slices, as _q_parallel (indexing whole arrays from the parallel loop was 4x slower)
    wcc = wc[start:stop] if amsgrad else wc
    wsc = ws[first:last] if amsgrad else ws
    return _q_blocks(
        kind,
        p[start:stop],
        g[start:stop],
        mc[start:stop],
        ms[first:last],
        vc[start:stop],
        vs[first:last],
        wcc,
        wsc,
        amsgrad,
        k,
    )


def _q_all(kind, table, sizes, rows, cps, c32s, chunks, amsgrad, pw, mw, vw, sw):
    bad = np.zeros(chunks.shape[0], np.int64)  # per chunk: no reduction in the parallel loop
    for c in prange(chunks.shape[0]):
        bad[c] = _q_chunk(kind, table, sizes, rows, cps, c32s, chunks[c], amsgrad, pw, mw, vw, sw)
    return bad


_q_table_serial, _q_table_parallel = _twins(_q_all)


@_jit()
def _table_overlapping(table, nbytes, written):
    # True when a block that the call writes overlaps any other block of the table, or a
    # read-only one (the gradient) overlaps a written one: such tables run serially in table
    # order, as the per-parameter calls would (as numba_tables._overlapping, with a byte
    # length per cell: columns hold arrays of different item sizes).  Cells of 0 bytes are
    # ignored (unused columns and empty tensors).
    n, columns = table.shape
    starts = np.empty(n * columns, dtype=np.int64)
    ends = np.empty(n * columns, dtype=np.int64)
    wr = np.empty(n * columns, dtype=np.bool_)
    k = 0
    for i in range(n):
        for c in range(columns):
            if nbytes[i, c] == 0:
                continue
            starts[k] = table[i, c]
            ends[k] = table[i, c] + nbytes[i, c]
            wr[k] = written[c]
            k += 1
    return any_overlap(starts, ends, wr, k)


def table_layout(fmt: Any) -> tuple[str, int] | None:
    """``(encoding, block)`` of the moments a table kernel updates for ``fmt``, or ``None``:
    ``("bf16", 1)`` for :class:`Bf16Format` (either rounding), ``("dense", 1)`` for float32
    :class:`DenseFormat` (``"fp32"``), ``(fmt.name, fmt.block)`` for the 8-bit formats
    :func:`supports` (codes and block scales; their small tensors, stored densely, are rows of
    the ``"fp32"`` layout)."""
    if isinstance(fmt, Bf16Format):
        return "bf16", 1
    if isinstance(fmt, QuantizedFormat) and supports(fmt):
        return fmt.name, fmt.block
    if isinstance(fmt, DenseFormat) and supports(fmt):
        return "dense", 1
    return None


def table_code_dtypes(fmt: Any) -> tuple[np.dtype, np.dtype]:
    """The dtypes of the ``m`` and of the ``v`` (and ``v_max``) columns of ``fmt``'s table rows
    (``uint16`` bf16 bits, or the 8-bit codec's codes); ``fmt`` must have a :func:`table_layout`."""
    if isinstance(fmt, Bf16Format):
        return _U16, _U16
    if isinstance(fmt, DenseFormat):
        return _F32, _F32
    return _CODE_DTYPES[fmt.codec, True], _CODE_DTYPES[fmt.codec, False]


def _witness(dtype: np.dtype) -> np.ndarray:
    return np.empty(0, dtype=dtype)


def adam_update_stored_table_(
    fmt: Any,
    table: np.ndarray,
    sizes: np.ndarray,
    steps: np.ndarray,
    dtype: np.dtype,
    hp: AdamHyperParams,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """One Adam step of every row of ``table`` with moments in ``fmt`` (a :func:`table_layout`).

    ``table``: int64 ``(n, TABLE_COLUMNS)`` addresses (columns ``T_PARAM`` ... ``T_WS``) of
    C-contiguous blocks: parameter and gradient of ``sizes[i]`` elements of ``dtype`` (float32 or
    float64), codes of ``sizes[i]`` elements of :func:`table_code_dtypes`, float32 scales of
    ``ceil(sizes[i] / block)`` elements (8-bit formats; bf16 and float32 ``"dense"`` moments
    have none, those columns are not read); the v_max columns are read only when
    ``hp.amsgrad``.  ``steps``: int64 ``(n,)`` 1-based update numbers.  ``keys``: uint64
    ``(n, 2)``, the bf16 stochastic keys of each row (``m``/``v`` word, ``v_max`` word; the
    words :func:`adam_update_stored_` draws for the row, which the caller draws likewise), or
    ``None`` for nearest rounding and the 8-bit formats.  Nothing is checked here (see the
    section comment): the caller validates every tensor.

    Returns the number of blocks per row left unchanged for non-finite moments (int64 ``(n,)``,
    all 0 for bf16 and dense moments); unlike :func:`adam_update_stored_`, every other block of
    every row has then been updated.  Results equal the per-parameter kernels' bit for bit.
    """
    n = len(sizes)
    if not n:
        return np.zeros(0, dtype=np.int64)
    dtype = np.dtype(dtype)
    first = steps[0]
    if (steps == first).all():
        rows = np.zeros(n, dtype=np.int64)
        counts = [int(first)]
    else:
        unique, inverse = np.unique(steps, return_inverse=True)
        rows = inverse.astype(np.int64, copy=False)
        counts = [int(t) for t in unique]
    pairs = [_coefficients(hp, t, dtype) for t in counts]
    cps = np.stack([cp for cp, _ in pairs])
    c32s = np.stack([c32 for _, c32 in pairs])
    amsgrad = bool(hp.amsgrad)
    encoding, block = table_layout(fmt)  # type: ignore[misc]
    code_m, code_v = table_code_dtypes(fmt)
    parallel = int(sizes.sum()) >= PARALLEL_MIN_SIZE
    if parallel:
        nbytes = np.zeros((n, TABLE_COLUMNS), dtype=np.int64)
        blocks = -(-sizes // block)
        nbytes[:, T_PARAM] = nbytes[:, T_GRAD] = sizes * dtype.itemsize
        nbytes[:, T_M] = sizes * code_m.itemsize
        nbytes[:, T_V] = sizes * code_v.itemsize
        if encoding not in ("bf16", "dense"):
            nbytes[:, T_MS] = nbytes[:, T_VS] = blocks * 4
        if amsgrad:
            nbytes[:, T_W] = nbytes[:, T_V]
            nbytes[:, T_WS] = nbytes[:, T_VS]
        parallel = not _table_overlapping(table, nbytes, _WRITTEN)
    pw = _witness(dtype)
    if encoding == "bf16":
        stochastic = bool(fmt.needs_rng)
        if keys is None:
            if stochastic:
                raise TypeError("stochastic bf16 rounding needs keys (uint64, one pair per row)")
            keys = np.zeros((n, 2), dtype=np.uint64)
        chunks = _table_chunks(sizes)
        kernel = _bf16_table_parallel if parallel else _bf16_table_serial
        kernel(table, sizes, rows, cps, c32s, keys, chunks, amsgrad, stochastic, pw, _witness(_U16))
        return np.zeros(n, dtype=np.int64)
    if encoding == "dense":
        chunks = _table_chunks(sizes)
        kernel = _dense_table_parallel if parallel else _dense_table_serial
        kernel(table, sizes, rows, cps, c32s, chunks, amsgrad, pw, _witness(_F32))
        return np.zeros(n, dtype=np.int64)
    chunks = _q_table_chunks(sizes, block)
    kernel = _q_table_parallel if parallel else _q_table_serial
    bad = kernel(
        _QUANTIZED[fmt.codec, fmt.block],
        table,
        sizes,
        rows,
        cps,
        c32s,
        chunks,
        amsgrad,
        pw,
        _witness(code_m),
        _witness(code_v),
        _witness(_F32),
    )
    per_row = np.zeros(n, dtype=np.int64)
    np.add.at(per_row, chunks[:, 0], bad)
    return per_row


_WRITTEN = np.array([c != T_GRAD for c in range(TABLE_COLUMNS)], dtype=np.bool_)
