"""adamkit.numpy.Adam / AdamW against torch.optim.Adam / AdamW with equivalent parameter groups.

Three groups with different hyper-parameters (one with AMSGrad and coupled decay, one maximizing
with other betas, one float32 group with another eps and the optimizer defaults), a named group,
parameters whose gradient is None on some steps (so per-parameter step counts differ), a 0-d and
an empty parameter, and lr / betas changed between steps in both optimizers.  Parameters and every
state entry are compared every 25 steps; tolerances (max|a-b|/max|b|): 1e-10 float64, 1e-5 float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from _numpy_helpers import grouped, make_grads, make_params

import adamkit.numpy as anp
from adamkit.kernels import numba_available
from adamkit.testing import assert_rel_close, seeded_rng

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install adamkit[torch]")

STEPS = 100
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


def _grad_or_none(t: int, index: int, grad: np.ndarray) -> np.ndarray | None:
    # parameter 1 starts late; the 0-d parameter 3 only gets a gradient on even steps
    if (index == 1 and t <= 20) or (index == 3 and t % 2):
        return None
    return grad


NEEDS_NUMBA = pytest.mark.skipif(not numba_available(), reason="needs numba: pip install numba")
IMPLS = ["auto", "reference", pytest.param("numba", marks=NEEDS_NUMBA)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_optimizer_follows_torch_with_groups(name, impl):
    rng = seeded_rng("numpy-vs-torch", name, impl)
    params = make_params(rng)
    tensors = [torch.tensor(p) for p in params]
    ours = getattr(anp, name)(grouped(params), lr=2e-3, impl=impl)
    theirs = getattr(torch.optim, name)(grouped(tensors, names=False), lr=2e-3)

    for t in range(1, STEPS + 1):
        if t == 40:  # a schedule: lr of two groups, betas of another
            for group in (*ours.param_groups, *theirs.param_groups):
                group["lr"] *= 0.5
        if t == 70:
            ours.param_groups[1]["betas"] = theirs.param_groups[1]["betas"] = (0.95, 0.9)
        grads = [_grad_or_none(t, i, g) for i, g in enumerate(make_grads(rng, params))]
        ours.step(grads)
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = None if g is None else torch.tensor(g)
        theirs.step()

        if t % 25:
            continue
        for index, (p, tensor) in enumerate(zip(params, tensors, strict=True)):
            where = f"{name}, step {t}, parameter {index} {p.shape}"
            tol = TOL[p.dtype]
            assert_rel_close(p, tensor, tol, where)
            state, reference = ours.state[index], theirs.state[tensor]
            assert set(state) == set(reference), where
            assert state["step"] == int(reference["step"]), where
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    assert state[key].dtype == p.dtype, where
                    assert_rel_close(state[key], reference[key], tol, f"{key}, {where}")

    # the schedule of parameter 1 and 3 really differed from the others
    assert ours.state[0]["step"] == STEPS
    assert ours.state[1]["step"] == STEPS - 20
    assert ours.state[3]["step"] == STEPS // 2
