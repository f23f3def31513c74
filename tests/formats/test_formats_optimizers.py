"""The stored-state dispatcher (``adamkit.kernels.stored``): its plain path against an oracle
written here from the format objects and ``reference.adam_step``, the fused path against the plain
one, implementation forcing, the guard's clipped step through decoded moments, and the rule that
says which format each parameter gets.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from adamkit.core.reference import AdamState, adam_step
from adamkit.formats import Bf16Format, QuantizedFormat, Storage, get_format
from adamkit.guard import clipped_adam_step, clipped_adam_update_
from adamkit.kernels import numba_available
from adamkit.kernels import stored as ks
from adamkit.testing import cases_for, seeded_rng

ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
FORMATS = ["fp32", "bf16", "int8", "int8-companded"]
# 5000 elements: int8 codes with a partial last block; (7, 5): stored densely under int8
SHAPES = {"blocks": (50, 100), "small": (7, 5)}
CASES = cases_for("bf16")


def _clone(st: Storage | None) -> Storage | None:
    if st is None:
        return None
    twin = copy.copy(st)
    twin.arrays = {k: a.copy() for k, a in st.arrays.items()}
    return twin


def _storages(fmt, shape, dtype, amsgrad, rng):
    # A mid-run state: magnitudes spread over decades inside blocks, v_max >= v.
    scale = np.exp(rng.uniform(-6, 1, size=shape))
    m = 0.1 * scale * rng.standard_normal(shape)
    v = (scale * rng.random(shape)) ** 2
    out = []
    for role, values in zip(ROLES, (m, v, v * (1 + rng.random(shape))), strict=True):
        if role == "max_exp_avg_sq" and not amsgrad:
            out.append(None)
            continue
        st = fmt.zeros(shape, dtype, role=role)
        fmt.store(st, values, rng=np.random.default_rng(0))
        out.append(st)
    return out


def _assert_same(a, b, what):
    np.testing.assert_array_equal(a[0], b[0], err_msg=f"{what}: param")
    for role, x, y in zip(ROLES, a[1:], b[1:], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.encoding == y.encoding
            for key in y.arrays:
                np.testing.assert_array_equal(x.arrays[key], y.arrays[key], f"{what}: {role} {key}")


# -- the format a state option gives ---------------------------------------------------------


def test_check_state_normalises_and_refuses():
    assert ks.check_state(None) is None and ks.check_state("native") is None
    assert [ks.check_state(n) for n in FORMATS] == FORMATS
    with pytest.raises(ValueError, match=r"Unknown state format 'int4' \(state must be None or"):
        ks.check_state("int4")
    with pytest.raises(TypeError, match=r"state must be None or a format name .* got int 8"):
        ks.check_state(8)
    with pytest.raises(TypeError, match="got Bf16Format"):
        ks.check_state(Bf16Format())


@pytest.mark.parametrize(
    ("state", "shape", "name", "expected"),
    [
        ("int8", (64, 100), None, "int8"),
        ("int8", (10, 10), None, "int8"),  # the int8 format itself keeps it dense (< 4096)
        ("int8", (8192,), None, "fp32"),  # 1-d: bias or norm
        ("int8", (), None, "fp32"),
        ("int8", (64, 100), "encoder.embed_tokens.weight", "fp32"),
        ("int8", (64, 100), "transformer.wte.weight", "fp32"),
        ("int8", (64, 100), "bert.embeddings.word_embeddings.weight", "fp32"),
        ("int8", (64, 100), "blocks.0.LayerNorm.weight", "fp32"),
        ("int8", (64, 100), "blocks.0.mlp.weight", "int8"),
        ("int8", (64, 100), "sweater.weight", "int8"),  # "wte" is a whole segment, not a substring
        ("int8-companded", (8192,), None, "fp32"),
        ("bf16", (8192,), "embed.weight", "bf16"),  # bf16 applies to every tensor
        ("fp32", (3,), None, "fp32"),
        (None, (64, 100), None, "native"),
    ],
)
def test_param_format_rule(state, shape, name, expected):
    assert ks.param_format(state, shape, name).name == expected


def test_resolve_stored_impl():
    int8 = get_format("int8")
    stochastic = QuantizedFormat("int8-stochastic", rounding="stochastic")
    fused = "numba" if numba_available() else "reference"
    assert ks.resolve_stored_impl("reference", int8) == "reference"
    assert ks.resolve_stored_impl("auto", stochastic) == "reference"  # no fused kernel for it
    for name in ("int8", "int8-companded", "int8-blockwise", "bf16", "fp32"):
        assert ks.resolve_stored_impl("auto", get_format(name)) == fused
    with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'reference', 'numba'"):
        ks.resolve_stored_impl("torch", int8)
    if numba_available():
        with pytest.raises(TypeError, match="no fused kernel for state format 'int8-stochastic'"):
            ks.resolve_stored_impl("numba", stochastic)


# -- the plain path is load -> adam_step -> store ----------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_impl_is_load_step_store(case, name, shape):
    fmt, hp = get_format(name), case.hyperparams()
    rng = seeded_rng("plain", case.id, name, shape)
    dtype = np.float64 if rng.random() < 0.5 else np.float32
    param = rng.standard_normal(shape).astype(dtype)
    stored = _storages(fmt, shape, dtype, hp.amsgrad, rng)
    grad = rng.standard_normal(shape).astype(dtype)
    grad_before = grad.copy()

    # oracle, written out: decode, the specification's step, encode (same generator stream)
    sm, sv, sw = map(_clone, stored)
    w = None if sw is None else fmt.load(sw)
    new_p, new = adam_step(param, grad, AdamState(6, fmt.load(sm), fmt.load(sv), w), hp)
    oracle_rng = np.random.default_rng(7)
    for st, values in zip((sm, sv, sw), new[1:], strict=True):
        if st is not None:
            fmt.store(st, values, rng=oracle_rng)

    got = [param.copy(), *map(_clone, stored)]
    ks.adam_update_stored_(
        fmt,
        [got[0]],
        [grad],
        [got[1]],
        [got[2]],
        [got[3]],
        [7],
        hp,
        rng=np.random.default_rng(7),
        impl="reference",
    )
    _assert_same(got, [new_p, sm, sv, sw], f"{case.id} {name}")
    assert np.array_equal(grad, grad_before)


def _assert_near(fused, plain, before, what):
    """The fused kernels' contract with the plain path (tests/kernels states it in full): the
    parameter within 4 ulps plus 1e-5 of its update, 8-bit codes and bf16 bits within one step
    (at most 1% of them off), scales and dense moments within a few ulps."""
    p, q = fused[0].astype(np.float64), plain[0].astype(np.float64)
    tol = 4 * np.spacing(np.abs(plain[0])).astype(np.float64) + 1e-5 * np.abs(q - before)
    assert np.all(np.abs(p - q) <= tol), f"{what}: param"
    for role, x, y in zip(ROLES, fused[1:], plain[1:], strict=True):
        assert (x is None) == (y is None)
        if x is None:
            continue
        assert x.encoding == y.encoding
        for key in y.arrays:
            a, b = x.arrays[key], y.arrays[key]
            if key in ("codes", "bits"):
                off = np.abs(a.astype(np.int64) - b.astype(np.int64))
                assert off.max(initial=0) <= 1 and off.mean() <= 0.01, f"{what}: {role} {key}"
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=f"{what}: {role}")


@pytest.mark.skipif(not numba_available(), reason="the fused kernels need numba (adamkit[fast])")
@pytest.mark.parametrize("name", ["fp32", "int8", "int8-blockwise", "bf16-nearest"])
@pytest.mark.parametrize("case", cases_for("numba"), ids=lambda c: c.id)
def test_auto_follows_reference(case, name):
    # auto: fused where a parameter qualifies (within _assert_near of the plain path), the plain
    # path itself for the strided one (bit for bit)
    fmt = Bf16Format("bf16", "nearest") if name == "bf16-nearest" else get_format(name)
    hp = case.hyperparams()
    rng = seeded_rng("auto", case.id, name)
    base = rng.standard_normal((60, 100)).astype(np.float32)
    params = [base[:, :80], rng.standard_normal((50, 100)).astype(np.float32)]  # strided, plain
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    stored = [_storages(fmt, p.shape, p.dtype, hp.amsgrad, rng) for p in params]
    results = {}
    for impl in ("auto", "reference"):
        ps = [base.copy()[:, :80], params[1].copy()]  # the first stays strided
        sts = [[_clone(s) for s in row] for row in stored]
        ks.adam_update_stored_(
            fmt, ps, grads, *map(list, zip(*sts, strict=True)), [3, 3], hp, impl=impl
        )
        results[impl] = (ps, sts)
    auto, ref = results["auto"], results["reference"]
    assert not auto[0][0].flags.c_contiguous
    _assert_same([auto[0][0], *auto[1][0]], [ref[0][0], *ref[1][0]], f"{case.id} {name} strided")
    _assert_near(
        [auto[0][1], *auto[1][1]], [ref[0][1], *ref[1][1]], params[1], f"{case.id} {name} fused"
    )


@pytest.mark.skipif(not numba_available(), reason="the fused kernels need numba (adamkit[fast])")
def test_impl_numba_refuses_a_parameter_it_cannot_take():
    fmt, hp = get_format("int8"), cases_for("numba")[0].hyperparams()
    base = np.zeros((60, 100), dtype=np.float32)
    strided = base[:, :80]
    m, v, _ = _storages(fmt, strided.shape, np.float32, False, seeded_rng("strided"))
    with pytest.raises(TypeError, match="no fused kernel for parameter 0"):
        ks.adam_update_stored_(
            fmt, [strided], [np.ones_like(strided)], [m], [v], [None], [1], hp, impl="numba"
        )
    assert not base.any()


def test_argument_errors_change_nothing():
    hp = cases_for("bf16")[0].hyperparams()
    fmt = get_format("bf16")
    p = np.ones((4, 4), np.float32)
    m, v, _ = _storages(fmt, p.shape, p.dtype, False, seeded_rng("errors"))
    before = [_clone(m), _clone(v)]
    with pytest.raises(TypeError, match="'bf16' state rounds stochastically: the update needs rng"):
        ks.adam_update_stored_(fmt, [p], [p], [m], [v], [None], [1], hp)
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs\[0\] must be a storage exactly when"):
        ks.adam_update_stored_(fmt, [p], [p], [m], [v], [m], [1], hp, rng=np.random.default_rng())
    assert np.all(p == 1.0)
    for st, old in zip((m, v), before, strict=True):
        assert np.array_equal(st.arrays["bits"], old.arrays["bits"])


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_int8_non_finite_moment_is_refused(impl):
    fmt, hp = get_format("int8"), cases_for("bf16")[0].hyperparams()
    rng = seeded_rng("nan", impl)
    p = rng.standard_normal((64, 100)).astype(np.float32)
    m, v, _ = _storages(fmt, p.shape, p.dtype, False, rng)
    g = rng.standard_normal(p.shape).astype(np.float32)
    g[3, 7] = np.nan
    before = [p.copy(), _clone(m), _clone(v)]
    with pytest.raises(ValueError, match="non-finite"):
        ks.adam_update_stored_(fmt, [p], [g], [m], [v], [None], [1], hp, impl=impl)
    if impl == "reference":  # the plain path checks before it writes anything
        _assert_same([p, m, v, None], [*before, None], "after the refused step")


# -- the guard's clipped step on decoded moments -------------------------------------------------


@pytest.mark.parametrize("clip", ["rms", "atan2"])
@pytest.mark.parametrize("name", FORMATS)
def test_update_through_runs_any_numpy_step_on_decoded_moments(name, clip):
    fmt = get_format(name)
    hp = cases_for("bf16")[1].hyperparams(amsgrad=True)
    rng = seeded_rng("through", name, clip)
    p = rng.standard_normal((50, 100)).astype(np.float32)
    g = 30 * rng.standard_normal(p.shape).astype(np.float32)  # large: "rms" clips
    stored = _storages(fmt, p.shape, p.dtype, True, rng)

    expected = [_clone(s) for s in stored]
    loaded = [fmt.load(s) for s in expected]
    new_p, new, factor = clipped_adam_step(p, g, AdamState(4, *loaded), hp, update_clip=clip)
    oracle_rng = np.random.default_rng(3)
    for st, values in zip(expected, new[1:], strict=True):
        fmt.store(st, values, rng=oracle_rng)

    got = [p.copy(), *map(_clone, stored)]
    factors = ks.update_through_(
        fmt,
        clipped_adam_update_,
        [got[0]],
        [g],
        *([s] for s in got[1:]),
        [5],
        hp,
        rng=np.random.default_rng(3),
        update_clip=clip,
    )
    _assert_same(got, [new_p, *expected], f"{name} {clip}")
    assert factors == ([factor] if clip == "rms" else []) and (clip != "rms" or factor < 1)


def test_update_through_refuses_non_finite_int8_and_changes_nothing():
    fmt, hp = get_format("int8"), cases_for("bf16")[0].hyperparams()
    rng = seeded_rng("through-nan")
    p = rng.standard_normal((64, 100)).astype(np.float32)
    m, v, _ = _storages(fmt, p.shape, p.dtype, False, rng)
    g = np.full(p.shape, np.inf, dtype=np.float32)
    before = [p.copy(), _clone(m), _clone(v), None]
    with pytest.raises(ValueError, match="non-finite"), np.errstate(invalid="ignore"):
        ks.update_through_(
            fmt, clipped_adam_update_, [p], [g], [m], [v], [None], [1], hp, update_clip="rms"
        )
    _assert_same([p, m, v, None], before, "after the refused step")
