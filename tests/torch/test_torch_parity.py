"""adamkit.torch.Adam/AdamW against torch.optim.Adam/AdamW: 300 steps of an MLP and a small CNN.

The "torch" implementation mirrors torch's single-tensor step op for op, so the required
tolerances (float64: rounding, float32: 1e-6 relative, bfloat16: against torch in bfloat16) are
met with room to spare: the parameters are asserted bit-identical, which also pins every option.
"""

from __future__ import annotations

import pytest
import torch
from _torch_helpers import CASES, MODELS, batches, fresh_seed, rel_diff, train, twin

import adamkit.torch as at

STEPS = 300

GRID = [
    pytest.param(case, model, dtype, id=f"{case.id}-{model}-{str(dtype).removeprefix('torch.')}")
    for case in CASES
    for model in MODELS
    for dtype in case.dtypes
]


@pytest.mark.parametrize(("case", "model_name", "dtype"), GRID)
def test_matches_torch_optim_bit_for_bit(case, model_name, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, input_shape = MODELS[model_name]
    reference_model = make(gen, dtype)
    model = twin(reference_model)
    initial = next(model.parameters()).detach().clone()
    data = batches(gen, input_shape, dtype, STEPS)

    expected_losses = train(
        reference_model, case.torch_cls(reference_model.parameters(), **case.kwargs), data
    )
    optimizer = case.ours(model.parameters(), **case.kwargs)
    losses = train(model, optimizer, data)

    assert losses == expected_losses, f"seed={seed}"
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        assert p.dtype == dtype
        assert torch.equal(p, q), f"{name}: rel diff {rel_diff(p, q):.3g}, seed={seed}"
    assert not torch.equal(next(model.parameters()), initial), "training did not move"


def test_state_matches_torch_optim_entry_by_entry():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, input_shape = MODELS["mlp"]
    theirs_model = make(gen, torch.float64)
    ours_model = twin(theirs_model)
    data = batches(gen, input_shape, torch.float64, 20)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    theirs = torch.optim.AdamW(theirs_model.parameters(), **kwargs)
    ours = at.AdamW(ours_model.parameters(), **kwargs)
    train(theirs_model, theirs, data)
    train(ours_model, ours, data)
    for p, q in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        mine, other = ours.state[p], theirs.state[q]
        assert set(mine) == set(other) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert mine["step"].dtype == other["step"].dtype == torch.float32
        assert mine["step"].device == other["step"].device
        for key in other:
            assert torch.equal(mine[key], other[key]), f"{key}, seed={seed}"
