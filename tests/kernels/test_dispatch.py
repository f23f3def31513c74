"""How ``adamkit.kernels.adam_update_`` chooses an implementation (``impl=``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import adamkit.kernels as kernels
from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.testing import rel_diff, seeded_rng

HP = AdamHyperParams(lr=1e-2, weight_decay=0.1)


def _params(rng, shapes, dtype=np.float32):
    out = []
    for shape in shapes:
        p, g, m = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
        out.append([p, g, m, rng.random(shape).astype(dtype), None])
    return out


def _update(params, impl, steps=None):
    steps = steps or [3] * len(params)
    adam_update_args = [list(column) for column in zip(*params, strict=True)]
    kernels.adam_update_(*adam_update_args, steps, HP, impl=impl)


def _expected(params, step=3):
    return [adam_step(p, g, AdamState(step - 1, m, v, None), HP) for p, g, m, v, _ in params]


@pytest.fixture
def spy_reference(monkeypatch):
    """Record the parameters that go through the reference fallback."""
    seen = []
    real = kernels._reference_one_

    def spy(param, *args):
        seen.append(param)
        real(param, *args)

    monkeypatch.setattr(kernels, "_reference_one_", spy)
    return seen


@pytest.fixture
def without_numba(monkeypatch):
    """Make ``import numba`` fail, as on an installation without adamkit[fast]."""
    monkeypatch.setitem(sys.modules, "numba", None)
    for name in (
        "adamkit.kernels.numba_cpu",
        "adamkit.kernels.numba_tables",
        "adamkit.kernels.streaming",
    ):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(kernels, "_numba_module", kernels._NOT_LOADED)


def test_unknown_impl_is_rejected_naming_the_choices():
    params = _params(seeded_rng("unknown"), [(4,)])
    before = [a.copy() for a in params[0][:4]]
    for bad in ("fast", "Numba", None):
        with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'reference', 'numba'"):
            _update(params, bad)
    for a, b in zip(params[0][:4], before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_reference_impl_matches_adam_step():
    params = _params(seeded_rng("reference"), [(5,), (2, 3), ()])
    expected = _expected(params)
    _update(params, "reference")
    for (p, _, m, v, _), (new_p, state) in zip(params, expected, strict=True):
        np.testing.assert_array_equal(p, new_p)
        np.testing.assert_array_equal(m, state.exp_avg)
        np.testing.assert_array_equal(v, state.exp_avg_sq)


def test_auto_uses_numba_for_contiguous_and_reference_for_the_rest(spy_reference):
    pytest.importorskip("numba", reason="auto only picks numba when numba is installed")
    assert kernels.resolve_impl("auto") == "numba"
    rng = seeded_rng("auto")
    params = _params(rng, [(6,), (3, 4), (8,), (5,), (7,)])
    strided = rng.standard_normal(16).astype(np.float32)
    params[2][0] = strided[::2]  # a non-contiguous parameter view
    params[3][1] = params[3][1].astype(np.float64)  # a gradient of another dtype
    params[4][0] = params[4][0].astype(">f4")  # non-native byte order
    expected = _expected(params)
    _update(params, "auto")
    assert [id(p) for p in spy_reference] == [id(params[i][0]) for i in (2, 3, 4)]
    for (p, _, m, v, _), (new_p, state) in zip(params, expected, strict=True):
        assert rel_diff(p, new_p) <= 1e-6 and rel_diff(m, state.exp_avg) <= 1e-6
        assert rel_diff(v, state.exp_avg_sq) <= 1e-6
    np.testing.assert_array_equal(strided[::2], params[2][0])  # written through the view


def test_forced_numba_rejects_a_parameter_it_cannot_take_before_changing_anything():
    pytest.importorskip("numba", reason="impl='numba' needs numba")
    rng = seeded_rng("forced")
    params = _params(rng, [(6,), (8,)])
    params[1][0] = rng.standard_normal(16).astype(np.float32)[::2]
    before = [[a.copy() for a in row[:4]] for row in params]
    with pytest.raises(TypeError, match=r"impl='numba' needs C-contiguous.*parameter 1"):
        _update(params, "numba")
    for row, saved in zip(params, before, strict=True):
        for a, b in zip(row[:4], saved, strict=True):
            np.testing.assert_array_equal(a, b)


def test_forced_numba_rejects_read_only_state():
    pytest.importorskip("numba", reason="impl='numba' needs numba")
    params = _params(seeded_rng("readonly"), [(6,)])
    params[0][2].flags.writeable = False
    with pytest.raises(TypeError, match="parameter 0"):
        _update(params, "numba")


def test_without_numba_auto_falls_back_and_numba_says_what_to_install(without_numba):
    assert not kernels.numba_available()
    assert kernels.resolve_impl("auto") == "reference"
    params = _params(seeded_rng("missing"), [(5,), (2, 2)])
    expected = _expected(params)
    _update(params, "auto")
    for (p, *_), (new_p, _) in zip(params, expected, strict=True):
        np.testing.assert_array_equal(p, new_p)
    with pytest.raises(ImportError, match=r"pip install adamkit\[fast\]"):
        kernels.resolve_impl("numba")
    with pytest.raises(ImportError, match=r"pip install adamkit\[fast\]"):
        _update(params, "numba")


def test_importing_kernels_does_not_import_numba():
    code = textwrap.dedent(
        """
        import sys
        import adamkit.kernels
        assert "numba" not in sys.modules, "import adamkit.kernels imported numba"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_amsgrad_state_must_match_the_flag_before_anything_changes():
    pytest.importorskip("numba", reason="impl='numba' needs numba")
    params = _params(seeded_rng("amsgrad-mismatch"), [(4,), (3,)])
    before = [[a.copy() for a in row[:4]] for row in params]
    columns = [list(column) for column in zip(*params, strict=True)]
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs\[0\] must be an array"):
        kernels.adam_update_(*columns, [1, 1], AdamHyperParams(amsgrad=True), impl="numba")
    for row, saved in zip(params, before, strict=True):
        for a, b in zip(row[:4], saved, strict=True):
            np.testing.assert_array_equal(a, b)
