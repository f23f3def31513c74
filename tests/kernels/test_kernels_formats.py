"""Fused compressed-state kernels (``adamkit.kernels.numba_formats``) against the plain path.

The oracle is what an optimizer does without them: ``fmt.load`` -> ``reference.adam_step`` ->
``fmt.store``.  The kernels compute in float32 with the hardware FMA (the reference rounds its
multiply-adds through float64), so they follow the oracle within stated tolerances, not bit for
bit.  One step from the same state (``_assert_near``), for float32 and float64 parameters, every
case of the shared table, several shapes:

- parameter: ``|p - p_oracle| <= 4 ulp(p_oracle) + 1e-5 max|p_oracle - p_before|``, the update
  taken per tensor (elementwise it is meaningless where an update is near 0; the update is formed
  in float32, and with float64 parameters the oracle rounds ``g - m`` to float32 first);
- 8-bit codes (``"int8"`` companded, ``"int8-blockwise"``) and bf16 bits (nearest rounding): at
  most one code / one bf16 ulp from the oracle's, at most 1% of them off (measured: none in these
  tests; a moment one float32 ulp away from the oracle's changes its code only at a tie);
- block scales and dense float32 moments: within ``1e-6`` of the tensor's largest value (a few
  float32 ulps; per tensor for the same reason as the parameter).

Stochastic bf16 rounding uses a Weyl sequence indexed by global element position with keys
drawn from the Generator, not the Generator's stream, so it is checked against its NumPy twin
(``adamkit.formats.bf16.encode_stochastic_at``) bit for bit where the kernel's moments are exact
(``beta1 = beta2 = 0``), and in distribution against the exact float32 moments of the same
arithmetic (the fused fp32 kernel): each value lands on one of its two bf16 neighbours, rounding
up with frequency (x - lo) / (hi - lo) within 5 standard deviations in each eighth of [0, 1],
m and v uncorrelated; the mean over 2048 keys is each value within 6 standard deviations
(unbiased; exactly so over the lattice of keys, checked on the twin); 1024 equal values in one
call round up within 4 of the expected count (the sequence's low discrepancy); two shards with
a ``ShardRng`` get the whole tensor's bits.  It is reproducible from the generator and
independent of the thread count, as are all kernels.
Against full-precision state, 300 steps on a quadratic stay within the relative parameter
differences in ``TRAJECTORY_TOL`` and reach the same loss within 2%; the fused and plain runs stay
within ``FUSED_VS_PLAIN`` of each other.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.formats import (
    Bf16Format,
    QuantizedFormat,
    Storage,
    bf16,
    get_format,
    int8_blockwise,
    int8_companded,
)
from adamkit.testing import cases_for, rel_diff, seeded_rng

numba = pytest.importorskip("numba", reason="the fused kernels need numba (adamkit[fast])")

from adamkit.kernels import numba_formats as nf  # noqa: E402
from adamkit.kernels.numba_cpu import PARALLEL_MIN_SIZE  # noqa: E402
from adamkit.kernels.stored import ShardRng  # noqa: E402
from adamkit.kernels.stored import adam_update_stored_ as stored_update_  # noqa: E402

CASES = cases_for("numba")
DTYPES = [np.float32, np.float64]
NEAREST = {
    "int8": get_format("int8"),
    "int8-blockwise": get_format("int8-blockwise"),
    "int8-companded": get_format("int8-companded"),
    "int8-companded-64": get_format("int8-companded-64"),
    "bf16-nearest": Bf16Format("bf16", "nearest"),
    "fp32": get_format("fp32"),
}
# int8: a partial last block for both codecs; a 2-d parameter of whole blocks; a small (dense) one
SHAPES = {"partial-block": (5000,), "matrix": (32, 200), "small": (7, 5)}
ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
TRAJECTORY_TOL = {
    "int8": 0.15,
    "int8-blockwise": 0.15,
    "int8-companded": 0.15,
    "int8-companded-64": 0.15,
    "bf16-nearest": 0.02,
    "bf16": 0.005,
}
FUSED_VS_PLAIN = {
    "int8": 0.02,
    "int8-blockwise": 0.02,
    "int8-companded": 0.02,
    "int8-companded-64": 0.02,
    "bf16-nearest": 0.005,
}
LOSS_TOL = 0.02
PARAM_ULPS, UPDATE_REL = 4, 1e-5
CODE_OFF_FRACTION, SCALE_RTOL = 0.01, 1e-6


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


def _assert_near(fused, plain, before, what=""):
    """The tolerances of the module docstring; ``before`` is the parameter before the step."""
    (p1, *s1), (p2, *s2) = fused, plain
    with np.errstate(invalid="ignore"):
        update = np.nanmax(np.abs(p2.astype(np.float64) - before), initial=0.0)
        tol = PARAM_ULPS * np.spacing(np.abs(p2)).astype(np.float64) + UPDATE_REL * update
        off = np.abs(p1.astype(np.float64) - p2.astype(np.float64))
    same_nan = np.isnan(p1) == np.isnan(p2)
    assert same_nan.all(), f"{what} param: NaN in different places"
    ok = (off <= tol) | np.isnan(p2) | (p1 == p2)
    assert ok.all(), f"{what} param: {np.sum(~ok)} elements off, worst {np.nanmax(off / tol):.3g}x"
    for role, a, b in zip(ROLES, s1, s2, strict=True):
        assert (a is None) == (b is None), role
        if a is None:
            continue
        assert a.encoding == b.encoding, role
        for key in b.arrays:
            x, y = a.arrays[key], b.arrays[key]
            if key in ("codes", "bits"):
                codes_off = np.abs(x.astype(np.int64) - y.astype(np.int64))
                assert codes_off.max(initial=0) <= 1, f"{what} {role} {key}"
                assert codes_off.mean() <= CODE_OFF_FRACTION, f"{what} {role} {key}"
            else:
                _assert_rel_close(x, y, f"{what} {role} {key}")


def _assert_rel_close(x, y, what):
    """Floats within ``SCALE_RTOL`` of the tensor's largest finite magnitude (the house's
    relative difference); NaN and inf exactly where the oracle has them."""
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=what)
    np.testing.assert_array_equal(x[np.isinf(y)], y[np.isinf(y)], err_msg=what)
    finite = np.isfinite(y)
    scale = np.max(np.abs(y[finite]), initial=0.0)
    diff = np.abs(x[finite].astype(np.float64) - y[finite])
    assert np.all(diff <= SCALE_RTOL * scale), f"{what}: {diff.max() / scale:.3g} of max"


def _assert_same(a, b, what=""):
    (p1, *s1), (p2, *s2) = a, b
    np.testing.assert_array_equal(p1, p2, err_msg=f"{what} param")
    for role, x, y in zip(ROLES, s1, s2, strict=True):
        assert (x is None) == (y is None), role
        if x is not None:
            for key in y.arrays:
                np.testing.assert_array_equal(x.arrays[key], y.arrays[key], f"{what} {role} {key}")


def _grad(rng, shape, dtype):
    # Heavy-tailed, so that steps move block maxima and hit rounding boundaries.
    return np.asarray(rng.standard_normal(shape) * rng.random(shape) ** 3, dtype=dtype)


# -- one step, against the oracle ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("fmt_id", NEAREST)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_step_follows_load_step_store(case, dtype, fmt_id, shape):
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
        _assert_near(fused, plain, param, f"step {step}")
        np.testing.assert_array_equal(grad, grad_before)  # gradients are only read
        param, stored = plain[0], plain[1:]  # the next step starts from the oracle's state


@pytest.mark.parametrize("fmt_id", NEAREST)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_parallel_path_follows_the_oracle_and_ignores_the_thread_count(fmt_id, amsgrad):
    fmt = NEAREST[fmt_id]
    hp = AdamHyperParams(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=True)
    shape = (PARALLEL_MIN_SIZE + 300,)  # threads, and a partial last block
    rng = seeded_rng("fused-parallel", fmt_id, amsgrad)
    param = rng.standard_normal(shape).astype(np.float32)
    stored = _state(fmt, shape, np.float32, amsgrad, rng)
    grad = _grad(rng, shape, np.float32)
    plain = [param.copy(), *map(_clone, stored)]
    _plain_step_(fmt, plain[0], grad, *plain[1:], 2, hp)
    runs = []
    previous = numba.get_num_threads()
    for threads in sorted({1, previous}):
        numba.set_num_threads(threads)
        try:
            fused = [param.copy(), *map(_clone, stored)]
            _fused_step_(fmt, fused[0], grad, *fused[1:], 2, hp)
        finally:
            numba.set_num_threads(previous)
        _assert_near(fused, plain, param, f"{threads} thread(s)")
        runs.append(fused)
    _assert_same(runs[0], runs[-1], "1 thread against all")


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


@pytest.mark.parametrize(
    "fmt_id", ["int8", "int8-blockwise", "int8-companded", "int8-companded-64", "bf16-nearest"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_300_steps_track_the_plain_path_and_full_precision(fmt_id, dtype):
    """The fused and plain paths stay within FUSED_VS_PLAIN of each other over 300 steps, and
    within TRAJECTORY_TOL and LOSS_TOL of the same run with full-precision state."""
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
        runs[name] = param
    assert rel_diff(runs["fused"], runs["plain"]) <= FUSED_VS_PLAIN[fmt_id]
    ref = _full_precision_run(start, curvature, target, hp, 300)
    assert rel_diff(runs["fused"], ref) <= TRAJECTORY_TOL[fmt_id]
    assert abs(loss(runs["fused"]) / loss(ref) - 1) <= LOSS_TOL


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
@pytest.mark.parametrize("fmt_id", ["int8", "int8-companded", "int8-companded-64", "bf16-nearest"])
def test_sizes_and_shapes(fmt_id, shape):
    fmt, hp = NEAREST[fmt_id], AdamHyperParams(lr=1e-2, amsgrad=True)
    rng = seeded_rng("fused-sizes", fmt_id, shape)
    param = np.asarray(rng.standard_normal(shape), dtype=np.float32)
    before = param.copy()
    stored = _state(fmt, shape, np.float32, True, rng)
    plain = [param.copy(), *map(_clone, stored)]
    grad = _grad(rng, shape, np.float32)
    _plain_step_(fmt, plain[0], grad, *plain[1:], 1, hp)
    _fused_step_(fmt, param, grad, *stored, 1, hp)
    assert param.shape == shape
    _assert_near([param, *stored], plain, before)


def test_empty_parameters_are_skipped_and_several_parameters_update_together():
    fmt, hp = NEAREST["int8"], AdamHyperParams(lr=1e-2)
    rng = seeded_rng("fused-multi")
    shapes = [(0,), (5000,), (3, 0), (10,), (PARALLEL_MIN_SIZE,)]
    steps = [4, 1, 2, 7, 3]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    before = [p.copy() for p in params]
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
    for p, st, row, old in zip(params, states, plain, before, strict=True):
        _assert_near([p, *st], row, old)


def test_the_tolerance_check_fails_for_a_wrong_step():
    """The comparison above is not vacuous: a step with beta2 off by 1e-3 fails it."""
    fmt = NEAREST["int8"]
    rng = seeded_rng("fused-wrong")
    param = rng.standard_normal(5000).astype(np.float32)
    stored = _state(fmt, (5000,), np.float32, False, rng)
    grad = _grad(rng, (5000,), np.float32)
    plain = [param.copy(), *map(_clone, stored)]
    fused = [param.copy(), *map(_clone, stored)]
    _plain_step_(fmt, plain[0], grad, *plain[1:], 3, AdamHyperParams(lr=1e-2))
    _fused_step_(fmt, fused[0], grad, *fused[1:], 3, AdamHyperParams(lr=1e-2, beta2=0.998))
    with pytest.raises(AssertionError):
        _assert_near(fused, plain, param)


# -- the companded codes of the kernel against the codec ------------------------------------------


@numba.njit
def _companded_codes(x, s):
    m = np.empty(x.size, np.int8)
    r = np.empty(x.size, np.uint8)
    for i in range(x.size):
        m[i] = nf._cmp_code_m(x[i], s)
        r[i] = nf._cmp_code_root(abs(x[i]) * (np.float32(255.0) / s))
    return m, r


def test_companded_codes_and_decode_table_match_the_codec():
    """The kernel's one-division signed code and its multiply-by-255/s unsigned code against
    ``int8_companded.encode`` on values spread over the block range (and the ends): equal except
    at a tie, where the neighbour is allowed; the decode table is the codec's decode."""
    rng = seeded_rng("fused-companded-codes")
    block = int8_companded.DEFAULT_BLOCK
    n = block * 4096
    x = np.clip(rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n), -1.9, 1.9)
    x = x.astype(np.float32)
    x[::block] = np.where(x[::block] < 0, -2.0, 2.0)  # each block's maximum
    x[1::block] = 0.0
    x[2::block] = 1e-30  # below the first level: kept non-zero as a second moment
    m_codes, _ = int8_companded.encode(x, block, True)
    r_codes, _ = int8_companded.encode(np.abs(x), block, False, keep_nonzero=True)
    got_m, got_r = _companded_codes(x, np.float32(2.0))
    for got, want in ((got_m, m_codes), (got_r, r_codes)):
        off = np.abs(got.astype(np.int64) - want.astype(np.int64))
        assert off.max() <= 1 and off.mean() <= 1e-3
    assert np.all(got_r[x != 0] > 0)
    codes = np.arange(-127, 128).astype(np.int8)
    want = int8_companded.decode(codes, np.ones(1, np.float32), block=codes.size)
    table = nf._CMP_DECODE[codes.view(np.uint8)]
    np.testing.assert_allclose(table, want, rtol=2.0**-22, atol=0)


# -- stochastic bf16 --------------------------------------------------------------------------


def _trunc_bits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits of ``x`` truncated toward zero, and the dropped 16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits >> 16).astype(np.uint16), (bits & 0xFFFF).astype(np.int64)


def _exact_fp32_moments(fmt, param, grad, stored, step, hp):
    """The float32 moments the bf16 kernel rounds: the same arithmetic on float32 storages."""
    dense = get_format("fp32")
    copies = []
    for role, st in zip(ROLES, stored, strict=True):
        if st is None:
            copies.append(None)
            continue
        twin = dense.zeros(st.shape, role=role)
        dense.store(twin, fmt.load(st))
        copies.append(twin)
    p = param.copy()
    _fused_step_(dense, p, grad, *copies, step, hp)
    return p, [None if c is None else dense.load(c) for c in copies]


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
    new_param, exact = _exact_fp32_moments(fmt, param, grad, stored, 1, hp)
    _fused_step_(fmt, param, grad, *stored, 1, hp, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(param, new_param)  # the parameter does not depend on rounding
    ups = []
    for role, st, x in zip(ROLES, stored, exact, strict=True):
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
    # The moments round with independent keys: their rounding errors are uncorrelated.
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


_EXACT_MOMENTS_HP = {"lr": 1e-6, "beta1": 0.0, "beta2": 0.0}


def _exact_moment_inputs(rng, n):
    """A gradient whose new moments the kernel forms exactly under ``_EXACT_MOMENTS_HP``
    (``m = g``; ``v = g * g``, one float32 rounding, as NumPy's float32 product), with values
    whose dropped 16 bits are spread over [0, 2**16)."""
    g = (rng.standard_normal(n) * np.exp(rng.uniform(-6, 3, n))).astype(np.float32)
    return g, [g, g * g, g * g]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("n", [1000, PARALLEL_MIN_SIZE + 3], ids=["serial", "parallel"])
def test_stochastic_bf16_noise_is_the_indexed_weyl_sequence(amsgrad, n):
    # Bit for bit against the NumPy twin: m rounds with the low 32 bits of the parameter's first
    # key word, v with its high 32 bits, v_max with the second word (AMSGrad), element i of the
    # parameter taking noise index offset + i, in serial and parallel chunks alike.
    fmt = get_format("bf16")
    rng = seeded_rng("fused-weyl-twin", amsgrad, n)
    hp = AdamHyperParams(**_EXACT_MOMENTS_HP, amsgrad=amsgrad)
    param = rng.standard_normal(n).astype(np.float32)
    grad, exact = _exact_moment_inputs(rng, n)
    stored = [fmt.zeros((n,), role=r) if r != ROLES[2] or amsgrad else None for r in ROLES]
    offset = int(rng.integers(0, 2**40))
    draw = seeded_rng("fused-weyl-twin-draw", amsgrad, n)
    words = [int(w) for w in copy.deepcopy(draw).bit_generator.random_raw(2)]
    nf.adam_update_stored_(
        fmt, [param], [grad], *([st] for st in stored), [1], hp, rng=draw, offsets=[offset]
    )
    keys = [words[0], words[0] >> 32, words[1]]
    for role, st, x, key in zip(ROLES, stored, exact, keys, strict=True):
        if st is not None:
            want = bf16.encode_stochastic_at(x, key, offset)
            np.testing.assert_array_equal(st.arrays["bits"], want, err_msg=role)
    # The generator advanced by exactly the words the keys took.
    follow = seeded_rng("fused-weyl-twin-draw", amsgrad, n)
    follow.bit_generator.random_raw(2 if amsgrad else 1)
    assert draw.bit_generator.state == follow.bit_generator.state


def test_weyl_noise_is_uniform_over_the_keys_exactly():
    # For a fixed element, keys base + j * 2**16 (j < 2**16) give each of the 2**16 noise
    # values exactly once: over a uniform 32-bit key the noise is exactly uniform, so the
    # rounding's mean is exactly x (checked in integers: the mean of the rounded bits).
    rng = seeded_rng("weyl-lattice")
    n, offset, base = 48, int(rng.integers(0, 2**40)), int(rng.integers(0, 2**16))
    noise = np.stack([bf16.weyl_noise(base + (j << 16), offset, n) for j in range(1 << 16)])
    for column in noise.T:
        np.testing.assert_array_equal(np.bincount(column, minlength=1 << 16), 1)
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    bits = x.view(np.uint32).astype(np.int64)
    ups = ((bits & 0xFFFF)[None, :] + noise) >> 16  # 1 where the magnitude rounds up
    np.testing.assert_array_equal(ups.sum(0), bits & 0xFFFF)  # E[up] = dropped / 2**16 exactly


@pytest.mark.parametrize("amsgrad", [False, True])
def test_stochastic_bf16_rounding_is_unbiased(amsgrad):
    # Over K fresh keys (one kernel call each) the mean of each rounded moment is its exact value
    # within 6 standard deviations of a mean of K two-valued draws, ulp * sqrt(p (1 - p) / K),
    # plus 4 draws' worth (ulp * 4 / K: where K p is small the count is Poisson, not normal); a
    # false alarm among the 3 x 512 values has probability below 1e-5.  A biased rounding (noise
    # not uniform, e.g. missing its top bit) is off by up to half an ulp, over 40 sd.
    fmt, k, n = get_format("bf16"), 2048, 512
    rng = seeded_rng("fused-unbiased", amsgrad)
    hp = AdamHyperParams(**_EXACT_MOMENTS_HP, amsgrad=amsgrad)
    param = rng.standard_normal(n).astype(np.float32)
    grad, exact = _exact_moment_inputs(rng, n)
    stored = [fmt.zeros((n,), role=r) if r != ROLES[2] or amsgrad else None for r in ROLES]
    offset = int(rng.integers(0, 2**40))
    sums = [np.zeros(n) for _ in ROLES]
    draw = seeded_rng("fused-unbiased-draw", amsgrad)
    for _ in range(k):
        if amsgrad:
            stored[2].arrays["bits"][:] = 0  # v_max = max(0, v) = v: rounds v afresh
        nf.adam_update_stored_(
            fmt, [param], [grad], *([st] for st in stored), [1], hp, rng=draw, offsets=[offset]
        )
        for total, st in zip(sums, stored, strict=True):
            if st is not None:
                total += fmt.load(st)
    for role, st, total, x in zip(ROLES, stored, sums, exact, strict=True):
        if st is None:
            continue
        low, dropped = _trunc_bits(x)
        lo = bf16.decode(low).astype(np.float64)
        hi = bf16.decode(low + 1).astype(np.float64)
        p = dropped / 65536.0
        ulp = np.abs(hi - lo)
        tol = 6 * ulp * np.sqrt(p * (1 - p) / k) + 4 * ulp / k
        err = np.abs(total / k - x.astype(np.float64))
        assert np.all(err <= tol), f"{role}: worst {np.max(err / tol):.2f} x the bound"
        assert np.all(err[dropped == 0] == 0), role  # representable values are kept exactly


def test_stochastic_bf16_neighbours_are_not_rounded_alike():
    # One call, 1024 equal values: the golden-ratio Weyl sequence spreads the noise of
    # neighbouring elements evenly, so the count rounded up is within 4 of n * p (measured at
    # most 2.7 over 10,000 keys, offsets and p; independent noise has standard deviation
    # sqrt(n p (1 - p)), 16 at p = 1/2), and never all or none of them.
    fmt, n = get_format("bf16"), 1024
    rng = seeded_rng("fused-neighbours")
    hp = AdamHyperParams(**_EXACT_MOMENTS_HP)
    for dropped in (0x8000, 0x2000, int(rng.integers(1, 1 << 16))):
        value = np.uint32(0x3F800000 | dropped).view(np.float32)  # 1 + dropped * 2**-23
        grad = np.full(n, value, np.float32)
        param = np.zeros(n, np.float32)
        sm, sv = fmt.zeros((n,), role="exp_avg"), fmt.zeros((n,), role="exp_avg_sq")
        offsets = [int(rng.integers(0, 2**40))]
        nf.adam_update_stored_(
            fmt, [param], [grad], [sm], [sv], [None], [1], hp, rng=rng, offsets=offsets
        )
        ups = int(np.count_nonzero(sm.arrays["bits"] != 0x3F80))
        assert 0 < ups < n, (dropped, ups)
        assert abs(ups - n * dropped / 65536) <= 4, (dropped, ups)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_shards_with_a_shard_rng(amsgrad, impl):
    # Two "ranks" hold a generator in the same state and one half each of a parameter: with the
    # fused kernel the halves get exactly the whole tensor's update (keys drawn alike, noise
    # indexed by global position); with the plain path each shard rounds from a generator of
    # its own (another draw, the same distribution).  Either way each rank's generator advances
    # by the same words whatever its shard's size.
    fmt = get_format("bf16")
    rng = seeded_rng("fused-shards", amsgrad, impl)
    n, cut = 3001, 1234
    hp = AdamHyperParams(lr=1e-2, amsgrad=amsgrad)
    param = rng.standard_normal(n).astype(np.float32)
    stored = _state(fmt, (n,), np.float32, amsgrad, rng, store_rng=rng)
    grad = _grad(rng, (n,), np.float32)
    seed = int(rng.integers(0, 2**63))
    whole_p, whole = param.copy(), [_clone(st) for st in stored]
    one = np.random.default_rng(seed)
    stored_update_(fmt, [whole_p], [grad], *([st] for st in whole), [1], hp, rng=one, impl=impl)
    parts, ranks = [], []
    for lo, hi in ((0, cut), (cut, n)):
        shard = [None if st is None else _slice(fmt, st, lo, hi) for st in stored]
        p = param[lo:hi].copy()
        parent = np.random.default_rng(seed)
        rounding = ShardRng(parent, lo)
        stored_update_(
            fmt, [p], [grad[lo:hi]], *([st] for st in shard), [1], hp, rng=rounding, impl=impl
        )
        parts.append((p, shard))
        ranks.append(parent.bit_generator.state)
    assert ranks[0] == ranks[1]
    np.testing.assert_array_equal(np.concatenate([p for p, _ in parts]), whole_p)
    roles = range(3 if amsgrad else 2)
    bits = [np.concatenate([sh[i].arrays["bits"] for _, sh in parts]) for i in roles]
    if impl == "numba":
        assert ranks[0] == one.bit_generator.state
        for i, b in enumerate(bits):
            np.testing.assert_array_equal(b, whole[i].arrays["bits"], err_msg=ROLES[i])
    else:
        assert np.mean(bits[0] != whole[0].arrays["bits"]) > 0.01  # rounded anew
    two = [[st, _clone(st)] for st in stored]
    before = [_clone(st) for st in stored]
    with pytest.raises(ValueError, match="one parameter"):
        rounding = ShardRng(np.random.default_rng(0), 0)
        stored_update_(fmt, [param] * 2, [grad] * 2, *two, [1, 1], hp, rng=rounding, impl=impl)
    _assert_same((param, *stored), (param, *before), "unchanged")
    with pytest.raises(ValueError, match="offset must be >= 0, got -1"):
        ShardRng(np.random.default_rng(0), -1)
    with pytest.raises(TypeError, match="parent must be a numpy"):
        ShardRng(seed, 0)


def test_bad_offsets_are_refused_before_anything_is_modified():
    fmt, hp = get_format("bf16"), AdamHyperParams(lr=1e-2)
    rng = seeded_rng("fused-bad-offsets")
    param = rng.standard_normal(50).astype(np.float32)
    stored = _state(fmt, (50,), np.float32, False, rng, store_rng=rng)
    grad = _grad(rng, (50,), np.float32)
    before = (param.copy(), *(_clone(st) for st in stored))
    for offsets in ([], [0, 0], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="offsets must hold one int >= 0 per parameter"):
            nf.adam_update_stored_(
                fmt, [param], [grad], *([st] for st in stored), [1], hp, rng=rng, offsets=offsets
            )
    _assert_same((param, *stored), before, "after refused offsets")


def _slice(fmt, storage, lo, hi):
    """A bf16 storage holding elements ``lo .. hi - 1`` of a flat one (a copy)."""
    part = fmt.zeros((hi - lo,), role=storage.role)
    part.arrays["bits"][:] = storage.arrays["bits"][lo:hi]
    return part


# -- non-finite values ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt_id", ["int8", "int8-companded", "int8-companded-64"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_int8_block_with_non_finite_moments_is_left_unchanged(fmt_id, amsgrad):
    fmt, hp = NEAREST[fmt_id], AdamHyperParams(lr=1e-2, amsgrad=amsgrad)
    rng = seeded_rng("fused-nan", fmt_id, amsgrad)
    n, block = 5000, fmt.block
    param = rng.standard_normal(n).astype(np.float32)
    stored = _state(fmt, (n,), np.float32, amsgrad, rng)
    before = [param.copy(), *map(_clone, stored)]
    grad = _grad(rng, (n,), np.float32)
    grad[3 * block + 17] = np.nan
    grad[n - 1] = np.inf  # in the partial last block
    with pytest.raises(ValueError, match=r"parameter 0: 2 block\(s\) .* non-finite"):
        _fused_step_(fmt, param, grad, *stored, 1, hp)
    last = (n - 1) // block
    for b in (3, last):
        bad = slice(b * block, (b + 1) * block)
        np.testing.assert_array_equal(param[bad], before[0][bad])
        for st, old in zip(stored, before[1:], strict=True):
            if st is not None:
                np.testing.assert_array_equal(st.arrays["codes"][bad], old.arrays["codes"][bad])
                assert st.arrays["scales"][b] == old.arrays["scales"][b]
    assert np.mean(param[: 3 * block] != before[0][: 3 * block]) > 0.9  # the others moved


def test_bf16_keeps_nan_and_inf_like_the_codec():
    fmt, hp = NEAREST["bf16-nearest"], AdamHyperParams(lr=1e-2, amsgrad=True)
    rng = seeded_rng("fused-bf16-nan")
    param = rng.standard_normal(300).astype(np.float32)
    before = param.copy()
    stored = _state(fmt, (300,), np.float32, True, rng)
    grad = _grad(rng, (300,), np.float32)
    grad[[3, 50]] = [np.nan, -np.inf]
    grad[100] = 3e30  # g * g overflows float32
    plain = [param.copy(), *map(_clone, stored)]
    with np.errstate(over="ignore", invalid="ignore"):
        _plain_step_(fmt, plain[0], grad, *plain[1:], 2, hp)
    _fused_step_(fmt, param, grad, *stored, 2, hp)
    _assert_near([param, *stored], plain, before)
    assert np.isnan(param[[3, 50]]).all()
    assert stored[1].arrays["bits"][100] == 0x7F80  # v = +inf: the step is m / inf = 0
    assert param[100] == plain[0][100] and np.isfinite(param[100])
    for st, pl in zip(stored, plain[1:], strict=True):  # NaN and inf exactly where the oracle has
        a, b = fmt.load(st), fmt.load(pl)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(a[np.isinf(b)], b[np.isinf(b)])


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
    before = params[0].copy()
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
    _assert_near([params[0], *states[0]], expected, before)


def test_supports_and_qualifies():
    for name in ("int8", "int8-companded", "int8-companded-64", "int8-blockwise", "bf16", "fp32"):
        assert nf.supports(get_format(name)), name
    assert not nf.supports(get_format("native"))  # numba_cpu's
    assert not nf.supports(QuantizedFormat("int8", rounding="stochastic"))
    assert not nf.supports(QuantizedFormat("int8", int8_companded, 128))  # not a compiled block
    assert not nf.supports(QuantizedFormat("int8", sqrt_second_moment=False))
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


def test_all_finite():
    a = np.arange(100_000, dtype=np.float32)
    assert nf.all_finite([a, a.astype(np.float64), a[::3], np.zeros(0)])
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[-1] = bad
        assert not nf.all_finite([a, b])
        assert not nf.all_finite([b[::7][:-1], b[-1:]])  # strided: NumPy's check


# -- the kernel's dynamic-map code lookup ---------------------------------------


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


# -- vector width (numba_cpu._jit(vector_bits=...)) ------------------------------------------------


def _host_has_avx512() -> bool:
    import llvmlite.binding as ll

    return "+avx512f" in ll.get_host_cpu_features().flatten().split(",")


def test_vector_bits_marks_only_the_function_it_compiles():
    """``vector_bits=512`` puts ``"prefer-vector-width"="512"`` on the function it compiles and
    nowhere else: a plain numba function compiled after it keeps LLVM's choice; on an AVX-512
    host the marked loop uses 512-bit registers.  (Uncached copies, so that the assembly can be
    inspected.)"""
    from adamkit.kernels.numba_cpu import _vector_width_compiler

    def body(a, b):
        for i in range(a.size):
            a[i] = np.sqrt(a[i] * b[i] + np.float32(1.0)) / (b[i] + np.float32(2.0))

    wide = numba.njit(error_model="numpy", pipeline_class=_vector_width_compiler(512))(body)
    plain = numba.njit(error_model="numpy")(body)
    a, b = np.ones(100, np.float32), np.full(100, 3.0, np.float32)
    wide(a, b)
    np.testing.assert_allclose(a, np.sqrt(np.float32(4.0)) / np.float32(5.0), rtol=1e-6)
    plain(a, b)
    attribute = '"prefer-vector-width"="512"'
    assert attribute in wide.inspect_llvm(wide.signatures[0])
    assert attribute not in plain.inspect_llvm(plain.signatures[0])
    if _host_has_avx512():
        assert "%zmm" in wide.inspect_asm(wide.signatures[0])


def test_vector_bits_rejects_what_it_cannot_do():
    from adamkit.kernels.numba_cpu import _jit

    with pytest.raises(ValueError, match="vector_bits must be None, 128, 256 or 512, got 1024"):
        _jit(vector_bits=1024)
    with pytest.raises(ValueError, match="non-parallel"):
        _jit(vector_bits=512, parallel=True)


def test_companded_kernel_variants_have_their_own_cache_entries():
    """numba's disk cache knows a function by its qualified name and code; variants compiled for
    another block or vector width must not share (and overwrite) one entry."""
    names = {
        nf._companded_kernel(block, bits).py_func.__qualname__
        for block in (32, 64)
        for bits in (None, 512)
    }
    assert len(names) == 4
    assert nf._cmp_blocks.py_func.__qualname__.endswith(f"_32_{nf._CMP_VECTOR_BITS}")
    assert nf._cmp64_blocks.py_func.__qualname__.endswith("_64_None")
