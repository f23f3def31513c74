"""Fused compressed-state kernels (``adamkit.kernels.numba_formats``) against the plain path.

The oracle is what an optimizer does without them: ``fmt.load`` -> ``reference.adam_step`` ->
``fmt.store``.  With nearest rounding (int8, bf16 ``"nearest"``, dense fp32) the fused step is
bit-identical to it: parameter, codes, scales and bf16 bits, for float32 and float64 parameters,
every case of the shared table, one step and 300 steps.  Stochastic bf16 rounding uses a hash,
not the Generator's stream, so it is checked in distribution: each value lands on one of its two
bf16 neighbours, rounding up with frequency (x - lo) / (hi - lo) within 5 standard deviations in
each eighth of [0, 1], independently for m and v.
Against full-precision state, 300 steps on a quadratic stay within the relative parameter
differences in ``TRAJECTORY_TOL`` (measured 2.5-3.5x below them: int8 0.063, bf16 nearest 0.0057,
bf16 stochastic 0.0016) and reach the same loss within 2% (measured 0.5%).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.formats import Bf16Format, QuantizedFormat, Storage, get_format, int8_blockwise
from adamkit.testing import cases_for, rel_diff, seeded_rng

numba = pytest.importorskip("numba", reason="the fused kernels need numba (adamkit[fast])")

from adamkit.kernels import numba_formats as nf  # noqa: E402
from adamkit.kernels.numba_cpu import PARALLEL_MIN_SIZE  # noqa: E402

CASES = cases_for("numba")
DTYPES = [np.float32, np.float64]
NEAREST = {
    "int8": get_format("int8"),
    "bf16-nearest": Bf16Format("bf16", "nearest"),
    "fp32": get_format("fp32"),
}
# int8: 19 full blocks + a partial one; a 2-d parameter of whole blocks; a small (dense) tensor.
SHAPES = {"partial-block": (5000,), "matrix": (32, 200), "small": (7, 5)}
ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
TRAJECTORY_TOL = {"int8": 0.15, "bf16-nearest": 0.02, "bf16": 0.005}
LOSS_TOL = 0.02


# -- helpers ------------------------------------------------------------------------------------


def _clone(storage: Storage | None) -> Storage | None:
    if storage is None:
        return None
    twin = copy.copy(storage)
    twin.arrays = {key: arr.copy() for key, arr in storage.arrays.items()}
    return twin


def _state(fmt, shape, dtype, amsgrad, rng, store_rng=None):
    """Storages holding a mid-run state: block scales spread over decades, v_max >= v."""
    scale = np.exp(rng.uniform(-8, 2, size=shape))  # magnitudes varying within blocks
    m = np.asarray(0.1 * scale * rng.standard_normal(shape), dtype=np.float32)
    v = np.asarray((scale * rng.random(shape)) ** 2)
    stored = []
    for role, values in zip(ROLES, (m, v, v * (1 + rng.random(shape))), strict=True):
        if role == "max_exp_avg_sq" and not amsgrad:
            stored.append(None)
            continue
        st = fmt.zeros(shape, dtype, role=role)
        fmt.store(st, values, rng=store_rng)
        stored.append(st)
    return stored


def _plain_step_(fmt, param, grad, sm, sv, sw, step, hp, rng=None):
    """The oracle: load, reference step, store (``param`` overwritten)."""
    w = None if sw is None else fmt.load(sw)
    new_param, st = adam_step(param, grad, AdamState(step - 1, fmt.load(sm), fmt.load(sv), w), hp)
    fmt.store(sm, st.exp_avg, rng=rng)
    fmt.store(sv, st.exp_avg_sq, rng=rng)
    if sw is not None:
        fmt.store(sw, st.max_exp_avg_sq, rng=rng)
    np.copyto(param, new_param)


def _fused_step_(fmt, param, grad, sm, sv, sw, step, hp, rng=None):
    nf.adam_update_stored_(fmt, [param], [grad], [sm], [sv], [sw], [step], hp, rng=rng)


def _assert_same(fused, plain, what=""):
    (p1, *s1), (p2, *s2) = fused, plain
    np.testing.assert_array_equal(p1, p2, err_msg=f"{what} param")
    for role, a, b in zip(ROLES, s1, s2, strict=True):
        assert (a is None) == (b is None), role
        if a is not None:
            for key in b.arrays:
                np.testing.assert_array_equal(a.arrays[key], b.arrays[key], f"{what} {role} {key}")


def _grad(rng, shape, dtype):
    # Heavy-tailed, so that steps move block maxima and hit rounding boundaries.
    return np.asarray(rng.standard_normal(shape) * rng.random(shape) ** 3, dtype=dtype)


# -- one step, bit for bit ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("fmt_id", NEAREST)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_step_is_bit_identical_to_load_step_store(case, dtype, fmt_id, shape):
    fmt, hp = NEAREST[fmt_id], case.hyperparams()
    rng = seeded_rng("fused-step", case.id, dtype.__name__, fmt_id, shape)
    param = np.asarray(rng.standard_normal(shape), dtype=dtype)
    stored = _state(fmt, shape, dtype, hp.amsgrad, rng)
    for step in (1, 3, 10_000):  # first step, early, and beta2**t below float32 precision
        grad = _grad(rng, shape, dtype)
        grad_before = grad.copy()
        plain = [param.copy(), *map(_clone, stored)]
        fused = [param.copy(), *map(_clone, stored)]
        _plain_step_(fmt, plain[0], grad, *plain[1:], step, hp)
        _fused_step_(fmt, fused[0], grad, *fused[1:], step, hp)
        _assert_same(fused, plain, f"step {step}")
        np.testing.assert_array_equal(grad, grad_before)  # gradients are only read
        param, stored = fused[0], fused[1:]


@pytest.mark.parametrize("fmt_id", NEAREST)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_parallel_path_is_bit_identical(fmt_id, amsgrad):
    fmt = NEAREST[fmt_id]
    hp = AdamHyperParams(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=True)
    shape = (PARALLEL_MIN_SIZE + 300,)  # threads, and a partial last block
    rng = seeded_rng("fused-parallel", fmt_id, amsgrad)
    param = rng.standard_normal(shape).astype(np.float32)
    stored = _state(fmt, shape, np.float32, amsgrad, rng)
    plain = [param.copy(), *map(_clone, stored)]
    fused = [param, *stored]
    for step in (1, 2):
        grad = _grad(rng, shape, np.float32)
        _plain_step_(fmt, plain[0], grad, *plain[1:], step, hp)
        _fused_step_(fmt, fused[0], grad, *fused[1:], step, hp)
        _assert_same(fused, plain, f"step {step}")


def _quadratic(rng, n):
    """Curvatures over four decades (so blocks mix large and small moments), a target, a start."""
    curvature = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), n))
    target = rng.standard_normal(n)
    start = rng.standard_normal(n)

    def loss(x):
        return 0.5 * float(np.sum(curvature * (x - target) ** 2))

    return curvature, target, start, loss


def _full_precision_run(start, curvature, target, hp, steps):
    param, state = start.copy(), AdamState(0, np.zeros_like(start), np.zeros_like(start))
    for _ in range(steps):
        grad = np.asarray(curvature * (param - target), dtype=start.dtype)
        param, state = adam_step(param, grad, state, hp)
    return param


TRAJECTORY_HP = AdamHyperParams(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)


@pytest.mark.parametrize("fmt_id", ["int8", "bf16-nearest"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_300_steps_stay_bit_identical_and_track_full_precision(fmt_id, dtype):
    """The fused and plain paths agree bit for bit after 300 steps, and stay within
    TRAJECTORY_TOL and LOSS_TOL of the same run with full-precision state."""
    fmt, hp = NEAREST[fmt_id], TRAJECTORY_HP
    rng = seeded_rng("fused-trajectory", fmt_id, dtype.__name__)
    n = 16 * 256 + 100
    curvature, target, start, loss = _quadratic(rng, n)
    start = start.astype(dtype)
    runs = {}
    for name, path in (("fused", _fused_step_), ("plain", _plain_step_)):
        param = start.copy()
        stored = [fmt.zeros((n,), dtype, role=r) for r in ROLES[:2]]
        for step in range(1, 301):
            grad = np.asarray(curvature * (param - target), dtype=dtype)
            path(fmt, param, grad, *stored, None, step, hp)
        runs[name] = (param, *stored, None)
    _assert_same(runs["fused"], runs["plain"], "300 steps")
    ref = _full_precision_run(start, curvature, target, hp, 300)
    assert rel_diff(runs["fused"][0], ref) <= TRAJECTORY_TOL[fmt_id]
    assert abs(loss(runs["fused"][0]) / loss(ref) - 1) <= LOSS_TOL


# -- sizes and layouts ----------------------------------------------------------------------------

SIZES = {
    "0-d": (),
    "one": (1,),
    "below-min-size": (int8_blockwise.DEFAULT_BLOCK * 16 - 1,),  # dense for int8
    "min-size": (int8_blockwise.DEFAULT_BLOCK * 16,),  # quantized, whole blocks
    "one-past-a-block": (int8_blockwise.DEFAULT_BLOCK * 16 + 1,),  # last block of 1
    "3-d": (3, 1, 5),
}


@pytest.mark.parametrize("shape", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("fmt_id", ["int8", "bf16-nearest"])
def test_sizes_and_shapes(fmt_id, shape):
    fmt, hp = NEAREST[fmt_id], AdamHyperParams(lr=1e-2, amsgrad=True)
    rng = seeded_rng("fused-sizes", fmt_id, shape)
    param = np.asarray(rng.standard_normal(shape), dtype=np.float32)
    stored = _state(fmt, shape, np.float32, True, rng)
    plain = [param.copy(), *map(_clone, stored)]
    grad = _grad(rng, shape, np.float32)
    _plain_step_(fmt, plain[0], grad, *plain[1:], 1, hp)
    _fused_step_(fmt, param, grad, *stored, 1, hp)
    assert param.shape == shape
    _assert_same([param, *stored], plain)


def test_empty_parameters_are_skipped_and_several_parameters_update_together():
    fmt, hp = NEAREST["int8"], AdamHyperParams(lr=1e-2)
    rng = seeded_rng("fused-multi")
    shapes = [(0,), (5000,), (3, 0), (10,), (PARALLEL_MIN_SIZE,)]
    steps = [4, 1, 2, 7, 3]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    states = [_state(fmt, s, np.float32, False, rng) for s in shapes]
    grads = [_grad(rng, s, np.float32) for s in shapes]
    plain = [[p.copy(), *map(_clone, st)] for p, st in zip(params, states, strict=True)]
    for row, grad, step in zip(plain, grads, steps, strict=True):
        _plain_step_(fmt, row[0], grad, *row[1:], step, hp)
    nf.adam_update_stored_(
        fmt,
        params,
        grads,
        [st[0] for st in states],
        [st[1] for st in states],
        [None] * len(shapes),
        steps,
        hp,
    )
    for p, st, row in zip(params, states, plain, strict=True):
        _assert_same([p, *st], row)


# -- stochastic bf16 --------------------------------------------------------------------------


def _trunc_bits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits of ``x`` truncated toward zero, and the dropped 16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits >> 16).astype(np.uint16), (bits & 0xFFFF).astype(np.int64)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_stochastic_bf16_rounds_to_a_neighbour_at_the_right_rate(amsgrad):
    fmt = get_format("bf16")
    assert fmt.needs_rng
    hp = AdamHyperParams(lr=1e-2, amsgrad=amsgrad)
    n = PARALLEL_MIN_SIZE * 2
    rng = seeded_rng("fused-stochastic", amsgrad)
    param = rng.standard_normal(n).astype(np.float32)
    stored = _state(fmt, (n,), np.float32, amsgrad, rng, store_rng=rng)
    grad = _grad(rng, (n,), np.float32)
    # The exact float32 moments, from the plain path's arithmetic.
    loaded = [None if st is None else fmt.load(st) for st in stored]
    new_param, exact = adam_step(param, grad, AdamState(0, *loaded), hp)
    _fused_step_(fmt, param, grad, *stored, 1, hp, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(param, new_param)  # the parameter does not depend on rounding
    ups = []
    for role, st, x in zip(ROLES, stored, exact[1:], strict=True):
        if st is None:
            continue
        low, dropped = _trunc_bits(x)
        bits = st.arrays["bits"]
        up = bits.astype(np.int64) - low
        assert set(np.unique(up)) <= {0, 1}, role
        assert not np.any(up[dropped == 0]), role  # representable values are kept exactly
        p_up = dropped / 65536.0
        # Calibration: in each eighth of [0, 1] the frequency of rounding up matches p_up.
        bins = np.minimum((p_up * 8).astype(np.int64), 7)
        for b in range(8):
            sel = bins == b
            mean, sd = p_up[sel].sum(), np.sqrt((p_up[sel] * (1 - p_up[sel])).sum())
            assert sel.sum() > 1000, (role, b)
            assert abs(up[sel].sum() - mean) <= 5 * sd, f"{role}: {up[sel].sum()} ups, {mean:.0f}"
        ups.append(up - p_up)
    # The moments take different bits of one hash: their rounding errors are uncorrelated.
    corr = np.corrcoef(ups[0], ups[1])[0, 1]
    assert abs(corr) <= 5 / np.sqrt(n)


def test_stochastic_bf16_is_reproducible_from_the_generator():
    fmt, hp = get_format("bf16"), AdamHyperParams(lr=1e-2)
    rng = seeded_rng("fused-stochastic-seed")
    n = PARALLEL_MIN_SIZE + 7
    param = rng.standard_normal(n).astype(np.float32)
    stored = _state(fmt, (n,), np.float32, False, rng, store_rng=rng)
    grad = _grad(rng, (n,), np.float32)
    outcomes = []
    for seed, threads in ((1, numba.config.NUMBA_NUM_THREADS), (1, 1), (2, 1)):
        p, sts = param.copy(), [_clone(st) for st in stored]
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            _fused_step_(fmt, p, grad, *sts, 1, hp, rng=np.random.default_rng(seed))
        finally:
            numba.set_num_threads(previous)
        outcomes.append(np.concatenate([sts[0].arrays["bits"], sts[1].arrays["bits"]]))
    np.testing.assert_array_equal(outcomes[0], outcomes[1])  # independent of the thread count
    assert np.mean(outcomes[0] != outcomes[2]) > 0.01  # another generator state rounds anew


def test_stochastic_bf16_tracks_full_precision_state():
    fmt, hp = get_format("bf16"), TRAJECTORY_HP
    rng = seeded_rng("fused-stochastic-trajectory")
    n = 16 * 256 + 100
    curvature, target, start, loss = _quadratic(rng, n)
    start = start.astype(np.float32)
    param, stored = start.copy(), [fmt.zeros((n,), role=r) for r in ROLES[:2]]
    draw = np.random.default_rng(0)
    for step in range(1, 301):
        grad = (curvature * (param - target)).astype(np.float32)
        _fused_step_(fmt, param, grad, *stored, None, step, hp, rng=draw)
    ref = _full_precision_run(start, curvature, target, hp, 300)
    assert rel_diff(param, ref) <= TRAJECTORY_TOL["bf16"]
    assert abs(loss(param) / loss(ref) - 1) <= LOSS_TOL


# -- non-finite values ----------------------------------------------------------------------------


def test_int8_block_with_non_finite_moments_is_left_unchanged():
    fmt, hp = NEAREST["int8"], AdamHyperParams(lr=1e-2)
    rng = seeded_rng("fused-nan")
    n, block = 5000, fmt.block
    param = rng.standard_normal(n).astype(np.float32)
    stored = _state(fmt, (n,), np.float32, False, rng)
    before = [param.copy(), *map(_clone, stored)]
    grad = _grad(rng, (n,), np.float32)
    grad[3 * block + 17] = np.nan
    with pytest.raises(ValueError, match=r"parameter 0: 1 block\(s\) .* non-finite"):
        _fused_step_(fmt, param, grad, *stored, 1, hp)
    bad = slice(3 * block, 4 * block)
    np.testing.assert_array_equal(param[bad], before[0][bad])
    for st, old in zip(stored[:2], before[1:3], strict=True):
        np.testing.assert_array_equal(st.arrays["codes"][bad], old.arrays["codes"][bad])
        np.testing.assert_array_equal(st.arrays["scales"][3], old.arrays["scales"][3])
    assert np.all(param[: 3 * block] != before[0][: 3 * block])  # the other blocks moved


def test_bf16_keeps_nan_and_inf_like_the_codec():
    fmt, hp = NEAREST["bf16-nearest"], AdamHyperParams(lr=1e-2, amsgrad=True)
    rng = seeded_rng("fused-bf16-nan")
    param = rng.standard_normal(300).astype(np.float32)
    stored = _state(fmt, (300,), np.float32, True, rng)
    grad = _grad(rng, (300,), np.float32)
    grad[[3, 50]] = [np.nan, -np.inf]
    grad[100] = 3e30  # g * g overflows float32
    plain = [param.copy(), *map(_clone, stored)]
    with np.errstate(over="ignore", invalid="ignore"):
        _plain_step_(fmt, plain[0], grad, *plain[1:], 2, hp)
    _fused_step_(fmt, param, grad, *stored, 2, hp)
    _assert_same([param, *stored], plain)
    assert np.isnan(param[[3, 50]]).all()
    assert stored[1].arrays["bits"][100] == 0x7F80  # v = +inf: the step is m / inf = 0
    assert param[100] == plain[0][100] and np.isfinite(param[100])


# -- errors, qualification, fallback ----------------------------------------------------------


def test_errors_are_raised_before_anything_is_modified():
    fmt, hp = NEAREST["int8"], AdamHyperParams()
    rng = seeded_rng("fused-errors")
    params = [rng.standard_normal(5000).astype(np.float32) for _ in range(2)]
    states = [_state(fmt, (5000,), np.float32, False, rng) for _ in range(2)]
    grads = [_grad(rng, (5000,), np.float32) for _ in range(2)]
    before = [p.copy() for p in params]
    ms, vs = [st[0] for st in states], [st[1] for st in states]
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs\[0\].*amsgrad=True"):
        nf.adam_update_stored_(
            fmt, params, grads, ms, vs, [None, None], [1, 1], AdamHyperParams(amsgrad=True)
        )
    grads[1] = grads[1].astype(np.float64)  # does not qualify
    with pytest.raises(TypeError, match="parameter 1"):
        nf.adam_update_stored_(fmt, params, grads, ms, vs, [None, None], [1, 1], hp)
    with pytest.raises(TypeError, match=r"rng=numpy\.random\.Generator"):
        nf.adam_update_stored_(
            get_format("bf16"), params[:1], grads[:1], ms[:1], vs[:1], [None], [1], hp
        )
    for p, old in zip(params, before, strict=True):
        np.testing.assert_array_equal(p, old)


def test_fallback_gets_the_parameters_that_do_not_qualify():
    fmt, hp = NEAREST["int8"], AdamHyperParams(lr=1e-2)
    rng = seeded_rng("fused-fallback")
    params = [rng.standard_normal(5000).astype(np.float32) for _ in range(2)]
    params[1] = np.asfortranarray(rng.standard_normal((100, 50)).astype(np.float32))
    states = [_state(fmt, p.shape, np.float32, False, rng) for p in params]
    grads = [_grad(rng, p.shape, np.float32) for p in params]
    expected = [params[0].copy(), *map(_clone, states[0])]
    _plain_step_(fmt, expected[0], grads[0], *expected[1:], 3, hp)
    calls = []

    def fallback(*args):
        calls.append(args)
        _plain_step_(*args)

    ms, vs = [st[0] for st in states], [st[1] for st in states]
    nf.adam_update_stored_(fmt, params, grads, ms, vs, [None, None], [3, 3], hp, fallback=fallback)
    assert len(calls) == 1 and calls[0][0] is fmt and calls[0][1] is params[1]
    assert calls[0][6:] == (3, hp, None)
    _assert_same([params[0], *states[0]], expected)


def test_supports_and_qualifies():
    assert nf.supports(get_format("int8")) and nf.supports(get_format("bf16"))
    assert nf.supports(get_format("fp32"))
    assert not nf.supports(get_format("native"))  # numba_cpu's
    assert not nf.supports(get_format("int8-companded"))
    assert not nf.supports(QuantizedFormat("int8", rounding="stochastic"))
    fmt = NEAREST["int8"]
    p = np.zeros(5000, np.float32)
    m, v = (fmt.zeros(p.shape, role=r) for r in ROLES[:2])
    assert nf.qualifies(fmt, p, p.copy(), m, v)
    assert not nf.qualifies(fmt, p, p.astype(np.float64), m, v)  # grad dtype
    assert not nf.qualifies(fmt, p[::2], p[::2], m, v)  # non-contiguous, wrong shape
    assert not nf.qualifies(fmt, p, p.copy(), v, m)  # roles swapped
    assert not nf.qualifies(get_format("bf16"), p, p.copy(), m, v)  # another format's storage
    assert not nf.qualifies(fmt, p.astype(np.float16), p.astype(np.float16), m, v)
    frozen = p.copy()
    frozen.flags.writeable = False
    assert not nf.qualifies(fmt, frozen, p.copy(), m, v)


# -- the kernel's code lookup ------------------------------------------


@numba.njit
def _codes(y, signed):
    out = np.empty(y.size, np.int32)
    for i in range(y.size):
        out[i] = nf._code_signed(y[i]) if signed else nf._code_unsigned(y[i])
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_packed_bucket_table_gives_the_codec_codes(signed):
    """Both ends of every 17-bit bucket in [-1, 1], every threshold and its neighbours (and
    random values) get the codec's code.  Within a bucket both codings are monotone with at most
    one step, at the threshold, so this covers every float32 in [-1, 1]."""
    keys = np.arange(1 << 17, dtype=np.uint32) << 15
    ends = np.concatenate([keys, keys | np.uint32(0x7FFF)]).view(np.float32)
    ends = ends[(ends.view(np.uint32) & 0x7FFFFFFF) <= 0x3F800000]  # |y| <= 1, no NaN
    cuts = int8_blockwise.thresholds(signed)
    near = [cuts, np.nextafter(cuts, np.float32(2)), np.nextafter(cuts, np.float32(-2))]
    rng = seeded_rng("fused-buckets", signed)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 2.0**-23, 1.0, -1.0], np.float32)
    y = np.concatenate([ends, *near, rng.uniform(-1, 1, 10**5).astype(np.float32), specials])
    y = y[(y >= 0) | signed]
    expected = int8_blockwise.quantize(y, signed).astype(np.int32)
    if not signed:  # keep_nonzero: positive values never get the code of 0
        zero = int8_blockwise.zero_code(False)
        expected[(expected == zero) & (y != 0)] = zero + 1
    np.testing.assert_array_equal(_codes(y, signed), expected)
