"""The numba Adam-atan2 step against the guard's NumPy reference (adamkit.guard.reference)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.guard.reference import clipped_adam_update_ as reference_update_

numba_clipped = pytest.importorskip(
    "adamkit.kernels.numba_clipped", reason="needs numba (pip install adamkit[fast])"
)

# Shapes: 0-d, empty, small, and one above PARALLEL_MIN_SIZE (the threaded loop).
SHAPES = [(), (0,), (7, 3), (40_000,)]


def _rel(a, b):
    # max|a - b| / max|b| per tensor (0 for empty tensors)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b.size == 0:
        return 0.0
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


def _copy(arrays):
    return [None if a is None else a.copy() for a in arrays]


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"weight_decay": 0.1}, id="coupled-l2"),
    pytest.param({"weight_decay": 0.1, "decoupled_weight_decay": True}, id="adamw"),
    pytest.param({"weight_decay": 0.1, "maximize": True}, id="maximize-l2"),
    pytest.param({"amsgrad": True}, id="amsgrad"),
    pytest.param({"bias_correction": False, "beta1": 0.5, "beta2": 0.75}, id="no-bias-corr"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", CASES)
def test_matches_the_reference_over_several_steps(dtype, options):
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype)} {options}".encode()))
    hp = AdamHyperParams(lr=0.01, **options)
    params = [np.asarray(rng.normal(size=s), dtype) for s in SHAPES]
    ms = [np.asarray(0.1 * rng.normal(size=s), dtype) for s in SHAPES]
    # v = 0 on some elements: atan2(m, 0) = +-pi/2, the bounded update that needs no eps.
    vs = [np.asarray(rng.random(size=s) * (rng.random(size=s) < 0.8), dtype) for s in SHAPES]
    vmaxs = [np.asarray(1.5 * v, dtype) if hp.amsgrad else None for v in vs]
    mine = [_copy(params), _copy(ms), _copy(vs), _copy(vmaxs)]
    ref = [_copy(params), _copy(ms), _copy(vs), _copy(vmaxs)]
    for step in range(4, 9):
        grads = [np.asarray(rng.normal(size=s), dtype) for s in SHAPES]
        before = _copy(grads)
        kwargs = {
            "grad_scale": 0.5 if step == 5 else 1.0,
            "lr_scale": 0.25 if step == 6 else 1.0,
            "atan2_a": 1.27,
            "atan2_b": 2.0,
        }
        got = numba_clipped.atan2_update_(mine[0], grads, *mine[1:], [step] * 4, hp, **kwargs)
        want = reference_update_(
            ref[0], grads, *ref[1:], [step] * 4, hp, update_clip="atan2", **kwargs
        )
        assert got is None and want == []
        assert all(np.array_equal(g, b) for g, b in zip(grads, before, strict=True))
    tol = 1e-15 if dtype == np.float64 else 2e-6
    for got_list, want_list in zip(mine, ref, strict=True):
        for a, b in zip(got_list, want_list, strict=True):
            if b is None:
                assert a is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape
            assert _rel(a, b) <= tol


def test_rejects_bad_arguments_before_modifying_anything():
    p = np.ones(4, np.float32)
    g, m, v = p.copy(), np.zeros(4, np.float32), np.zeros(4, np.float32)
    hp = AdamHyperParams()
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs\[0\]"):
        numba_clipped.atan2_update_([p], [g], [m], [v], [v.copy()], [1], hp)
    strided = np.ones(8, np.float32)[::2]
    with pytest.raises(TypeError, match="parameter 1 does not qualify"):
        numba_clipped.atan2_update_(
            [p, strided], [g, g], [m, m.copy()], [v, v.copy()], [None, None], [1, 1], hp
        )
    assert np.array_equal(p, np.ones(4)) and not m.any() and not v.any()
