"""The reference step (core/reference.py) against torch.optim.Adam / AdamW, step by step.

Every case of adamkit.testing.CASES that torch can express runs 200 steps on fresh random
parameters of several shapes (0-d to 3-d, and an empty one) with fresh random gradients; the lr is
changed in both at step 100.  Parameters and every state entry are compared every 50 steps.
Tolerances (relative, max|a-b|/max|b| per tensor): 1e-10 in float64 (both sides round differently
only in the last bits), 1e-5 in float32 (torch's CPU sqrt is not correctly rounded, so float32
results drift apart by a few ulps per step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from adamkit.core.reference import adam_step, init_state
from adamkit.testing import assert_rel_close, cases_for, seeded_rng

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install adamkit[torch]")

SHAPES = [(), (7,), (3, 5), (2, 3, 4), (0, 3)]
STEPS = 200
LR_CHANGE_AT = 100
LR_FACTOR = 0.3
TOL = {np.float64: 1e-10, np.float32: 1e-5}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", cases_for("torch"), ids=lambda c: c.id)
def test_reference_follows_torch(case, dtype):
    rng = seeded_rng("reference-vs-torch", case.id, np.dtype(dtype).name)
    hp = case.hyperparams()
    name, kwargs = case.torch_optimizer()
    params = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
    states = [init_state(p, amsgrad=hp.amsgrad) for p in params]
    tensors = [torch.tensor(p, dtype=TORCH_DTYPE[dtype]) for p in params]
    opt = getattr(torch.optim, name)(tensors, **kwargs)
    tol = TOL[dtype]

    for t in range(1, STEPS + 1):
        if t == LR_CHANGE_AT:
            hp = dataclasses.replace(hp, lr=hp.lr * LR_FACTOR)
            for group in opt.param_groups:
                group["lr"] = hp.lr
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            params[i], states[i] = adam_step(p, g, states[i], hp)
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(g)
        opt.step()

        if t % 50 == 0:
            for p, s, tensor, shape in zip(params, states, tensors, SHAPES, strict=True):
                torch_state = opt.state[tensor]
                where = f"step {t}, shape {shape}"
                assert p.dtype == dtype and p.shape == shape, where
                assert s.step == int(torch_state["step"]) == t, where
                assert_rel_close(p, tensor, tol, f"param, {where}")
                assert_rel_close(s.exp_avg, torch_state["exp_avg"], tol, f"exp_avg, {where}")
                assert_rel_close(
                    s.exp_avg_sq, torch_state["exp_avg_sq"], tol, f"exp_avg_sq, {where}"
                )
                if hp.amsgrad:
                    assert_rel_close(
                        s.max_exp_avg_sq, torch_state["max_exp_avg_sq"], tol, f"max, {where}"
                    )
                else:
                    assert s.max_exp_avg_sq is None


def test_torch_adamw_is_what_the_decoupled_cases_use():
    # The table maps decoupled decay to torch.optim.AdamW, so both torch classes are covered.
    names = {case.torch_optimizer()[0] for case in cases_for("torch")}
    assert names == {"Adam", "AdamW"}
