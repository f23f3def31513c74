"""Properties of adamkit.numpy.Adam over generated inputs (hypothesis)."""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adamkit.numpy import Adam
from adamkit.testing import CASES, assert_trees_equal

# With eps = 0 a zero gradient on the first step is 0/0 by definition, so that case is left out.
FINITE_CASES = [case for case in CASES if case.hyperparams().eps > 0]
# Gradient bounds that keep (1 - beta2) * g**2 representable in each dtype.
BOUND = {np.float32: 2.0**50, np.float64: 2.0**300}
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(shapes)
    bound = BOUND[dtype]
    width = np.dtype(dtype).itemsize * 8
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
    param = draw(hnp.arrays(dtype, shape, elements=st.floats(-10, 10, width=width)))
    grads = draw(st.lists(hnp.arrays(dtype, shape, elements=elements), min_size=1, max_size=4))
    return draw(st.sampled_from(FINITE_CASES)), param, grads


@settings(max_examples=60, deadline=None)
@given(problems())
def test_finite_gradients_keep_parameters_and_state_finite(problem):
    case, param, grads = problem
    opt = Adam([param], **case.kwargs)
    for grad in grads:
        opt.step([grad])
    assert np.isfinite(param).all()
    state = opt.state[0]
    assert state["step"] == len(grads)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            assert np.isfinite(state[key]).all(), key
            assert state[key].dtype == param.dtype and state[key].shape == param.shape


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 3))
def test_a_step_with_every_gradient_none_changes_nothing(problem, warmup):
    case, param, grads = problem
    other = np.ones(3)
    opt = Adam([{"params": [param], **case.kwargs}, {"params": [other], "name": "b"}])
    for grad in grads[:warmup]:
        opt.step([grad, None])
    before = (param.copy(), other.copy(), copy.deepcopy(opt.state_dict()))
    opt.step([None, None])
    assert_trees_equal((param, other, opt.state_dict()), before)
