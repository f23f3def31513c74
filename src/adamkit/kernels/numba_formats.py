r"""Fused, in-place Adam steps on compressed state (bf16 and block-wise int8), compiled with numba.

"Compute in fp32, store compressed" in one pass over memory: for each element (each block of 256
for int8) the kernel decodes ``m``, ``v`` (and ``v_max`` with AMSGrad), performs the step of
:func:`adamkit.core.reference.adam_step`, writes the parameter and re-encodes the moments into
the same storage.  Each byte of the parameter, gradient and storage is read once and written
once; no float32 copy of a moment ever exists in memory.  The plain path it replaces, and the
oracle of its tests, is::

    m, v = fmt.load(sm), fmt.load(sv)
    p, state = adam_step(p, g, AdamState(t - 1, m, v), hp)
    fmt.store(sm, state.exp_avg, rng); fmt.store(sv, state.exp_avg_sq, rng)

Storage encodings handled (``Storage.encoding``):

- ``"dense"``: float32 moments (the int8 format's small tensors, fewer than 4096 elements, and the
  ``fp32`` format).
- ``"bf16"``: ``uint16`` bfloat16 bits; nearest-even or stochastic rounding, as the format says.
  NaN and inf are kept, as :mod:`adamkit.formats.bf16` keeps them.
- ``"int8"``: ``uint8`` dynamic-map codes with a float32 absmax per block, second moments as
  ``sqrt(v)``, nearest rounding (:mod:`adamkit.formats.int8_blockwise`, the registered ``"int8"``
  format).  A block's new absmax must be known before any of it is encoded, so the block's new
  values go to small per-thread buffers (``block`` floats each), then the block is encoded.

Arithmetic.  The step is performed in the parameter's dtype with the reference's operations in
the reference's order, *including its roundings* with float32 moments: every multiply-add is
``reference.fused_multiply_add`` (formed in float64, rounded to the dtype of its addend), the
denominator is ``sqrt(v) / sqrt(bc2) + eps`` with true divisions.  With a float64 parameter the
loaded moments are float32 arrays, so the reference computes ``v`` in float32 and, when
``beta1 > 0.5`` (its lerp weight below 0.5), ``m`` and the update quotient too, and only
``p + update`` in float64; that mixture is mirrored here.
Codes come from the codec's own bucket table and thresholds (same tie rule, same ``keep_nonzero``
rule for second moments).  So with nearest rounding the parameter, the codes, the scales and the
bf16 bits are **bit-identical** to the plain path, for float32 and float64 parameters.

Stochastic bf16 rounding draws its 16 random bits per value from a counter-based hash
(Wellons' "lowbias32" of ``(i * golden) ^ key`` for element ``i``; m and v take the two halves of
one hash, ``v_max`` a second one), with one 64-bit ``key`` per parameter taken from the caller's
``numpy.random.Generator`` on each call.  It is deterministic for a given generator state and
independent of the thread count, but it is **not** the Generator's stream that
``Bf16Format.store`` uses, so against the plain path the rounding agrees in distribution (each
value goes to one of its two bf16 neighbours, up with probability (x - lo)/(hi - lo)), not bit for
bit.  The counter is taken modulo 2**32.  The parameter does not depend on how the moments are
rounded and stays bit-identical.

Non-finite values.  ``int8`` codes cannot hold NaN/inf (``store`` raises).  A block whose new
moments are non-finite is left entirely unchanged (parameter, codes and scale) and, after the
parameter's pass, :func:`adam_update_stored_` raises ``ValueError``.  Unlike ``store``, the other
blocks of that parameter (and earlier parameters) have then been updated: a single pass cannot
know in advance.  Skip non-finite steps before the update (the guard's non-finite check does).

Speed.  The exact arithmetic and the codecs make these passes compute-bound on a CPU (about 2.5
cycles per element for bf16, 6 for int8, whose table lookups are gathers), not memory-bound, so
moving 20 (bf16) or 16 (int8) bytes per parameter instead of 28 does not make them faster than
fp32 state.  Measured on the 2-core development VM, one thread, 10M float32 parameters, median
of 11 interleaved steps (ms): ``numba_cpu`` fp32 10.4, this module bf16 nearest 13.6, bf16
stochastic 16.2, int8 22.3, ``torch.optim.Adam(fused=True)`` 12.8.  What they buy is memory:
2 + 2 or 1 + 1 bytes of state per parameter instead of 4 + 4.

Threading, caching and error model follow :mod:`adamkit.kernels.numba_cpu`: tensors of at least
``PARALLEL_MIN_SIZE`` elements run over numba's thread pool in chunks of
:data:`CHUNK_ELEMENTS` (whole blocks for int8), no ``fastmath``, compiled code cached on disk.

How a dispatcher uses it: ``supports(fmt)`` says whether a format has a fused kernel here;
``qualifies(fmt, param, grad, sm, sv, sw)`` whether one parameter can take it; then
``adam_update_stored_(fmt, params, grads, sms, svs, sws, steps, hp, rng=rng, fallback=...)``
(``fallback`` gets ``(fmt, param, grad, sm, sv, sw, step, hp, rng)`` for parameters that do not
qualify, e.g. the plain load/step/store path).
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
from adamkit.formats import int8_blockwise
from adamkit.formats.base import Storage
from adamkit.formats.containers import Bf16Format, DenseFormat, QuantizedFormat
from adamkit.kernels.numba_cpu import PARALLEL_MIN_SIZE, SUPPORTED_DTYPES, _jit, _max_nan

__all__ = [
    "CHUNK_ELEMENTS",
    "adam_update_stored_",
    "qualifies",
    "supports",
]

#: The parallel loops hand out chunks of about this many elements (whole blocks for int8): small
#: enough to balance the threads, large enough to amortise the per-chunk setup and buffers.
CHUNK_ELEMENTS = 1 << 14

# Coefficient slots.  Three arrays, because the reference rounds each scalar to the dtype of the
# array it meets: ``cp`` in the parameter's dtype, ``c32`` in float32 (the moments), ``c64`` kept
# in double for ``_mad``, which rounds its multiplier itself as reference.fused_multiply_add does.
_GSIGN, _WD, _COUPLED, _PSCALE, _W2, _NEG_SS = range(6)
_BETA2, _BC2S, _EPS, _NEG_SS32 = range(4)
_W1, _W1_SMALL = range(2)

_F32 = np.dtype(np.float32)
_MAX_FINITE_BITS = np.int32(0x7F7FFFFF)  # bit pattern of the largest finite float32


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


def _mad(a, b, c):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_mad, inline="always")
def _mad_overload(a, b, c):
    """``reference.fused_multiply_add(a, b, c)``: below float64, ``a`` and ``b`` are rounded to
    ``c``'s dtype, the product (exact) and the sum formed in float64, rounded once at the end."""
    if c == types.float32:

        def mad32(a, b, c):
            wide = np.float64(np.float32(a)) * np.float64(np.float32(b)) + np.float64(c)
            return np.float32(wide)

        return mad32
    if c == types.float64:
        return lambda a, b, c: np.float64(a) * np.float64(b) + c
    return None


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
def _hash32(typingctx, key, i):
    """32 random bits for counter ``i`` of the stream ``key``: Wellons' "lowbias32" integer hash
    of ``(i * golden) ^ key``, in 32-bit integer arithmetic (so vectors stay 8 lanes wide)."""
    if not (isinstance(key, types.Integer) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def c(v):
            return ir.Constant(i32, v)

        def low32(value):
            return builder.trunc(value, i32) if value.type.width > 32 else value

        x = builder.xor(builder.mul(low32(args[1]), c(0x9E3779B9)), low32(args[0]))
        x = builder.xor(x, builder.lshr(x, c(16)))
        x = builder.mul(x, c(0x7FEB352D))
        x = builder.xor(x, builder.lshr(x, c(15)))
        x = builder.mul(x, c(0x846CA68B))
        return builder.xor(x, builder.lshr(x, c(16)))

    return types.uint32(key, i), codegen


@_jit(inline="always")
def _unpack(cp, c32, c64):
    # Scalars out of the arrays before the loops: values cannot alias the arrays being written,
    # so the compiler keeps them in registers and vectorises (as numba_cpu._unpack).
    return (
        cp[_GSIGN],
        cp[_WD],
        cp[_COUPLED] != 0,
        cp[_PSCALE],
        cp[_W2],
        cp[_NEG_SS],
        c32[_BETA2],
        c32[_BC2S],
        c32[_EPS],
        c32[_NEG_SS32],
        c64[_W1],
        c64[_W1_SMALL] != 0,
    )


@_jit(inline="always")
def _step(p, g, m, v, w, amsgrad, k):
    """One element of ``reference.adam_step``: ``p``, ``g`` in the parameter's dtype, the decoded
    moments ``m``, ``v``, ``w`` (``v_max``, ignored without AMSGrad) in float32; ``k`` is
    ``_unpack``'s tuple.

    Returns ``(p, m, v, v_max, root)``: the new parameter, the new moments as the float32 values
    the plain path stores, and ``root = sqrt(v)`` of the ``v`` in the denominator (``v_max`` with
    AMSGrad), which the int8 codec reuses.
    """
    gsign, wd, coupled, pscale, w2, neg_ss, beta2, bc2s, eps, neg_ss32, w1, small = k
    g = g * gsign
    if coupled:
        g = g + wd * p
    p = p * pscale
    diff = g - m
    # reference.ema: for weight < 0.5 the lerp rounds to m's dtype (float32), otherwise to g's
    # (the parameter's), and the update quotient is then formed in that dtype too.
    m_wide = _mad(diff, w1, m) if small else _mad(diff, w1, g)
    v = _mad(w2 * g, g, v * beta2)
    if amsgrad:
        w = _max_nan(w, v)
        root = np.sqrt(w)
    else:
        root = np.sqrt(v)
    denom = root / bc2s + eps
    update = (neg_ss32 * np.float32(m_wide)) / denom if small else (neg_ss * m_wide) / denom
    p = p + update
    return p, np.float32(m_wide), v, w, root


# -- dense float32 moments ---------------------------------------------------------------------
#
# Each "span" function updates whole arrays indexed from 0: the parallel kernels hand it slices.
# (Indexing from a variable offset would make numba's negative-index wrap-around checks
# unprovable and stop LLVM from vectorising the loop, about 8x slower.)


@_jit(inline="always")
def _dense_loop(p, g, m, v, w, amsgrad, k):
    for i in range(p.size):
        wi = w[i] if amsgrad else np.float32(0.0)
        pi, mi, vi, wi, _ = _step(p[i], g[i], m[i], v[i], wi, amsgrad, k)
        p[i] = pi
        m[i] = mi
        v[i] = vi
        if amsgrad:
            w[i] = wi


@_jit()
def _dense_span(p, g, m, v, w, amsgrad, k):
    # The flag is a constant at each call below, so each loop compiles without its branches
    # (LLVM does not unswitch them, and would not vectorise the loop with them).
    if amsgrad:
        _dense_loop(p, g, m, v, w, True, k)
    else:
        _dense_loop(p, g, m, v, w, False, k)


@_jit()
def _dense_serial(p, g, m, v, w, amsgrad, cp, c32, c64):
    _dense_span(p, g, m, v, w, amsgrad, _unpack(cp, c32, c64))


@_jit(parallel=True)
def _dense_parallel(p, g, m, v, w, amsgrad, cp, c32, c64):
    k = _unpack(cp, c32, c64)
    n = p.size
    for c in prange((n + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS):
        lo = c * CHUNK_ELEMENTS
        hi = min(lo + CHUNK_ELEMENTS, n)
        wc = w[lo:hi] if amsgrad else w
        _dense_span(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], wc, amsgrad, k)


# -- bf16 bits ---------------------------------------------------------------------------------


@_jit(inline="always")
def _bf16_loop(p, g, m, v, w, amsgrad, stochastic, k, key, offset):
    nearest = np.int32(-1)
    for i in range(p.size):
        wi = _bf16_decode(w[i]) if amsgrad else np.float32(0.0)
        pi, mi, vi, wi, _ = _step(
            p[i], g[i], _bf16_decode(m[i]), _bf16_decode(v[i]), wi, amsgrad, k
        )
        p[i] = pi
        if stochastic:
            h = _hash32(key, offset + i)  # 16 bits for each of m and v
            m[i] = _bf16_round(mi, np.int32(h & np.uint32(0xFFFF)))
            v[i] = _bf16_round(vi, np.int32(h >> np.uint32(16)))
            if amsgrad:
                w[i] = _bf16_round(
                    wi, np.int32(_hash32(key >> np.uint64(32), offset + i) >> np.uint32(16))
                )
        else:
            m[i] = _bf16_round(mi, nearest)
            v[i] = _bf16_round(vi, nearest)
            if amsgrad:
                w[i] = _bf16_round(wi, nearest)


@_jit()
def _bf16_span(p, g, m, v, w, amsgrad, stochastic, k, key, offset):
    if amsgrad:
        if stochastic:
            _bf16_loop(p, g, m, v, w, True, True, k, key, offset)
        else:
            _bf16_loop(p, g, m, v, w, True, False, k, key, offset)
    elif stochastic:
        _bf16_loop(p, g, m, v, w, False, True, k, key, offset)
    else:
        _bf16_loop(p, g, m, v, w, False, False, k, key, offset)


@_jit()
def _bf16_serial(p, g, m, v, w, amsgrad, cp, c32, c64, stochastic, key):
    _bf16_span(p, g, m, v, w, amsgrad, stochastic, _unpack(cp, c32, c64), key, np.uint64(0))


@_jit(parallel=True)
def _bf16_parallel(p, g, m, v, w, amsgrad, cp, c32, c64, stochastic, key):
    k = _unpack(cp, c32, c64)
    n = p.size
    for c in prange((n + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS):
        lo = c * CHUNK_ELEMENTS
        hi = min(lo + CHUNK_ELEMENTS, n)
        wc = w[lo:hi] if amsgrad else w
        _bf16_span(
            p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], wc, amsgrad, stochastic, k, key, np.uint64(lo)
        )


# -- block-wise int8 codes ---------------------------------------------------------------------
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
    if c == _ZERO_UNSIGNED and y != np.float32(0.0):
        c = _ZERO_UNSIGNED + 1  # a positive second moment never flushes to 0
    return c


@_jit(inline="always")
def _scale(amax):
    """The block scale from its absmax bits, and the divisor (``_blocks.safe_divide``: a block
    of zeros divides by 1 and stays zeros)."""
    s = _bits_f32(np.uint32(amax))
    return s, (s if s > np.float32(0.0) else np.float32(1.0))


@_jit(inline="always")
def _int8_loop(block, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k):
    """Whole blocks of flat arrays (``p.size`` elements, ``ms.size`` blocks); returns how many
    blocks were left unchanged for non-finite moments.  Second moments are stored as sqrt."""
    n = p.size
    pbuf = np.empty(block, p.dtype)
    mbuf = np.empty(block, np.float32)
    vbuf = np.empty(block, np.float32)
    wbuf = np.empty(block, np.float32)
    bad = 0
    for b in range(ms.size):
        lo = b * block
        hi = min(lo + block, n)
        count = hi - lo
        pb, gb, mcb, vcb = p[lo:hi], g[lo:hi], mc[lo:hi], vc[lo:hi]
        wcb = wc[lo:hi] if amsgrad else wc
        sm, sv = ms[b], vs[b]
        sw = ws[b] if amsgrad else np.float32(0.0)
        am = av = aw = np.int32(0)
        for j in range(count):
            vi = _Q_UNSIGNED[vcb[j]] * sv
            wi = _Q_UNSIGNED[wcb[j]] * sw if amsgrad else np.float32(0.0)
            pi, mi, vi, wi, root = _step(
                pb[j], gb[j], _Q_SIGNED[mcb[j]] * sm, vi * vi, wi * wi, amsgrad, k
            )
            # what the codec stores for v: sqrt(v), the step's root unless that is sqrt(v_max)
            ri = np.sqrt(vi) if amsgrad else root
            pbuf[j] = pi
            mbuf[j] = mi
            vbuf[j] = ri
            am = max(am, _abs_bits(mi))
            av = max(av, _abs_bits(ri))
            if amsgrad:
                wbuf[j] = root
                aw = max(aw, _abs_bits(root))
        if max(am, max(av, aw)) > _MAX_FINITE_BITS:
            bad += 1  # int8 cannot hold NaN/inf: leave the whole block as it was
            continue
        sm, dm = _scale(am)
        sv, dv = _scale(av)
        for j in range(count):
            pb[j] = pbuf[j]
            mcb[j] = _code_signed(mbuf[j] / dm)
            vcb[j] = _code_unsigned(vbuf[j] / dv)
        ms[b] = sm
        vs[b] = sv
        if amsgrad:
            s, d = _scale(aw)
            for j in range(count):
                wcb[j] = _code_unsigned(wbuf[j] / d)
            ws[b] = s
    return bad


@_jit()
def _int8_span(block, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k):
    # A constant flag at each call: each loop compiles without its branches.
    if amsgrad:
        return _int8_loop(block, p, g, mc, ms, vc, vs, wc, ws, True, k)
    return _int8_loop(block, p, g, mc, ms, vc, vs, wc, ws, False, k)


@_jit()
def _int8_serial(block, p, g, mc, ms, vc, vs, wc, ws, amsgrad, cp, c32, c64):
    k = _unpack(cp, c32, c64)
    return _int8_span(block, p, g, mc, ms, vc, vs, wc, ws, amsgrad, k)


@_jit(parallel=True)
def _int8_parallel(block, p, g, mc, ms, vc, vs, wc, ws, amsgrad, cp, c32, c64):
    k = _unpack(cp, c32, c64)
    n = p.size
    nblocks = ms.size
    per_chunk = max(1, CHUNK_ELEMENTS // block)
    chunks = (nblocks + per_chunk - 1) // per_chunk
    bad = np.zeros(chunks, np.int64)  # per chunk: a scalar reduction trips numba's parfors
    for c in prange(chunks):
        first = c * per_chunk
        last = min(first + per_chunk, nblocks)
        lo = first * block
        hi = min(last * block, n)
        wcc = wc[lo:hi] if amsgrad else wc
        wsc = ws[first:last] if amsgrad else ws
        bad[c] = _int8_span(
            block,
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
    return bad.sum()


# -- Python side -------------------------------------------------------------------------------


def _coefficients(hp: AdamHyperParams, step: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """``(cp, c32, c64)`` for update number ``step``: each scalar formed in double as the reference
    forms it, then rounded to the dtype of the array it meets there."""
    bc1, bc2_sqrt = bias_corrections(step, hp.beta1, hp.beta2, hp.bias_correction)
    decay = hp.weight_decay != 0.0
    coupled = decay and not hp.decoupled_weight_decay
    w1 = 1.0 - hp.beta1
    small = w1 < 0.5
    neg_ss = -(hp.lr / bc1)
    cp = np.empty(6, dtype=dtype)
    cp[_GSIGN] = -1.0 if hp.maximize else 1.0
    cp[_WD] = hp.weight_decay if coupled else 0.0
    cp[_COUPLED] = 1.0 if coupled else 0.0
    cp[_PSCALE] = 1.0 - hp.lr * hp.weight_decay if decay and not coupled else 1.0
    cp[_W2] = 1.0 - hp.beta2
    cp[_NEG_SS] = neg_ss
    c32 = np.array([hp.beta2, bc2_sqrt, hp.eps, neg_ss], dtype=np.float32)
    c64 = np.array([w1 if small else -(1.0 - w1), 1.0 if small else 0.0])
    return cp, c32, c64


def supports(fmt: Any) -> bool:
    """True when ``fmt`` has a fused kernel here: ``bf16`` (either rounding), block-wise
    ``int8`` with nearest rounding, and dense ``fp32`` moments.  (``"native"`` state is the plain
    kernel's, :mod:`adamkit.kernels.numba_cpu`.)"""
    if isinstance(fmt, Bf16Format):
        return True
    if isinstance(fmt, QuantizedFormat):
        return fmt.codec is int8_blockwise and fmt.rounding == "nearest" and fmt.sqrt_second_moment
    return isinstance(fmt, DenseFormat) and fmt.dtype == _F32


_ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _flat(a: Any, dtype: np.dtype, size: int) -> np.ndarray | None:
    """``a`` as a 1-d writeable view of ``size`` elements of ``dtype``, or None."""
    if type(a) is not np.ndarray or a.dtype != dtype or a.size != size:
        return None
    if not (a.flags.c_contiguous and a.flags.writeable):
        return None
    return a.reshape(-1)


def _views(fmt: Any, param: Any, grad: Any, *stored: Storage | None) -> tuple[Any, ...] | None:
    """``(encoding, p, g, m arrays, v arrays, v_max arrays or None)`` as flat views, or None."""
    if not supports(fmt) or type(param) is not np.ndarray or type(grad) is not np.ndarray:
        return None
    dtype = param.dtype
    if dtype not in SUPPORTED_DTYPES or grad.dtype != dtype or grad.shape != param.shape:
        return None
    if not grad.flags.c_contiguous:
        return None
    p = _flat(param, dtype, param.size)
    if p is None:
        return None
    encoding = None
    out: list[Any] = []
    for role, st in zip(_ROLES, stored, strict=True):
        if st is None:
            out.append(None)
            continue
        if not isinstance(st, Storage) or st.format != fmt.name or st.role != role:
            return None
        if st.shape != param.shape or (encoding is not None and st.encoding != encoding):
            return None
        encoding = st.encoding
        arrays = _storage_views(fmt, st, param.size)
        if arrays is None:
            return None
        out.append(arrays)
    if out[0] is None or out[1] is None:
        return None
    return (encoding, p, grad.reshape(-1), *out)


def _storage_views(fmt: Any, st: Storage, size: int) -> tuple[np.ndarray, ...] | None:
    arrays = st.arrays
    if st.encoding == "dense":
        values = _flat(arrays.get("values"), _F32, size)
        return None if values is None else (values,)
    if st.encoding == "bf16" and isinstance(fmt, Bf16Format):
        bits = _flat(arrays.get("bits"), np.dtype(np.uint16), size)
        return None if bits is None else (bits,)
    if isinstance(fmt, QuantizedFormat) and st.encoding == fmt.name and st.block == fmt.block:
        codes = _flat(arrays.get("codes"), np.dtype(np.uint8), size)
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
) -> None:
    """One Adam step per parameter, in place, with moments kept in ``fmt``'s storages.

    The contract of :func:`adamkit.kernels.adam_update_` with :class:`Storage` moments:
    ``steps[i]`` is the 1-based update index, ``max_exp_avg_sqs[i]`` a storage exactly when
    ``hp.amsgrad`` (``ValueError`` otherwise), ``grads`` are only read.  ``rng`` is required
    when ``fmt.needs_rng`` (``TypeError`` otherwise); one 64-bit key per parameter is drawn from
    it per call (see the module docstring).  Parameters for which :func:`qualifies` is false go
    to ``fallback(fmt, param, grad, m, v, v_max, step, hp, rng)``; without one, ``TypeError``
    naming the first of them.  These errors are raised before anything is modified.
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
    stochastic = bool(getattr(fmt, "needs_rng", False))
    if stochastic and not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{getattr(fmt, 'name', fmt)!r} state rounds stochastically: the update needs "
            f"rng=numpy.random.Generator, got {type(rng).__name__}"
        )
    views = [_views(fmt, *row[:5]) for row in rows]
    if fallback is None:
        for index, view in enumerate(views):
            if view is None:
                raise TypeError(
                    f"no fused kernel for parameter {index} with state format "
                    f"{getattr(fmt, 'name', fmt)!r} (needs C-contiguous float32/float64 arrays "
                    "of one shape and dtype and storages made by this format for that shape)"
                )
    keys = (
        rng.integers(0, 1 << 64, size=len(rows), dtype=np.uint64)
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
            key = np.uint64(0) if keys is None else keys[index]
            kernel = _bf16_parallel if parallel else _bf16_serial
            kernel(p, g, m[0], v[0], wv, amsgrad, *coef, stochastic, key)
        else:
            wc, ws = w if amsgrad else (m[0][:0], m[1][:0])
            kernel = _int8_parallel if parallel else _int8_serial
            bad = kernel(fmt.block, p, g, *m, *v, wc, ws, amsgrad, *coef)
            if bad:
                raise ValueError(
                    f"parameter {index}: {bad} block(s) of {fmt.block} got non-finite moments, "
                    f"which {fmt.name} state cannot hold; those blocks (parameter and state) were "
                    "left unchanged, the rest of the parameter was updated (skip non-finite "
                    "steps before the update: the guard's non-finite check)"
                )
