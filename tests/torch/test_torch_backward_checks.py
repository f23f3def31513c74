"""The guard's gradient check folded into backward (GuardConfig.check_in_backward).

The oracle is the same optimizer with ``check_in_backward=False`` (the step reads every gradient
itself): with the hooks the gradient norm, every decision and every tensor must be bit-identical.
Whether a record was used is observed by counting the elements the step's kernel reads.
"""

from __future__ import annotations

import copy
import gc
import math
import pickle

import pytest
import torch
from _torch_helpers import fresh_seed

import adamkit.torch as at
from adamkit.kernels import numba_available
from adamkit.torch.backward_checks import HOOK_MIN_SIZE, BackwardSquares

pytestmark = pytest.mark.skipif(not numba_available(), reason="the hooks use the numba kernel")

BIG = (HOOK_MIN_SIZE // 64 + 3, 64)  # just above the hook threshold, not a multiple of a chunk
SMALL = (5, 7)


def model_params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [BIG, (BIG[1],), SMALL, BIG]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def backward(params, seed: int, poison: float | None = None) -> None:
    # Gradients from autograd: sum(p * w) with random w (and a NaN/inf in one of them).
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(p.shape, generator=gen) for p in params]
    if poison is not None:
        weights[-1].view(-1)[7] = poison
    torch.stack([(p * w).sum() for p, w in zip(params, weights, strict=True)]).sum().backward()


@pytest.fixture
def kernel_reads(monkeypatch):
    """Elements read by the sum-of-squares kernel, per call."""
    from adamkit.kernels import numba_tables

    calls: list[int] = []
    original = numba_tables.squares_parts

    def counting(addresses, sizes, dtype, parallel=None):
        calls.append(int(sizes.sum()))
        return original(addresses, sizes, dtype, parallel)

    monkeypatch.setattr(numba_tables, "squares_parts", counting)
    return calls


def pair(seed, **options):
    hooked = model_params(seed)
    plain = model_params(seed)
    return (
        hooked,
        at.Adam(hooked, lr=1e-2, **options),
        plain,
        at.Adam(plain, lr=1e-2, **{**options, "guard": _no_hooks(options.get("guard", True))}),
    )


def _no_hooks(guard):
    if guard is True:
        return {"check_in_backward": False}
    if guard == "all":
        return {"preset": "all", "check_in_backward": False}
    return {**guard, "check_in_backward": False}


@pytest.mark.parametrize("guard", [True, "all", {"grad_spike": True, "grad_warmup": 2}])
def test_same_norms_decisions_and_tensors_as_the_check_in_step(guard):
    seed = fresh_seed()
    hooked, opt, plain, ref = pair(seed, guard=guard)
    for step in range(6):
        poison = math.nan if step == 2 else (math.inf if step == 4 else None)
        for params, o in ((hooked, opt), (plain, ref)):
            o.zero_grad()
            backward(params, seed + step, poison)
            o.step(loss=torch.tensor(1.0 + 0.1 * step))
        a, b = opt.guard_diagnostics, ref.guard_diagnostics
        assert a["action"] == b["action"] and a["applied"] == b["applied"]
        assert (a["grad_norm"] == b["grad_norm"]) or (
            math.isnan(a["grad_norm"]) and math.isnan(b["grad_norm"])
        )
        for p, q in zip(hooked, plain, strict=True):
            assert torch.equal(p, q)
    assert opt.guard.counters["n_skipped_nonfinite"] == 2
    assert opt.guard.state_dict()["counters"] == ref.guard.state_dict()["counters"]


def test_recorded_gradients_are_not_read_again_by_the_step(kernel_reads):
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()  # first step: hooks attach now, the step reads everything
    small = sum(p.numel() for p in params if p.numel() < HOOK_MIN_SIZE)
    assert sum(kernel_reads) == sum(p.numel() for p in params)
    kernel_reads.clear()
    opt.zero_grad()
    backward(params, 2)
    in_backward = list(kernel_reads)
    kernel_reads.clear()
    opt.step()
    # The backward's one call read both big gradients; the step only the small ones.
    assert in_backward == [2 * BIG[0] * BIG[1]]
    assert sum(kernel_reads) == small


def test_a_gradient_changed_after_backward_is_read_again(kernel_reads):
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()
    opt.zero_grad()
    backward(params, 2)
    before = [p.detach().clone() for p in params]
    params[0].grad.view(-1)[3] = math.nan  # an in-place write: the version counter moves
    kernel_reads.clear()
    opt.step()
    assert params[0].numel() <= sum(kernel_reads)  # read again by the step
    assert opt.last_step_applied is False
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


def test_a_new_gradient_tensor_is_read_again():
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()
    opt.zero_grad()
    backward(params, 2)
    params[-1].grad = torch.full_like(params[-1], math.inf)  # no backward saw this one
    opt.step()
    assert opt.last_step_applied is False


def test_a_record_serves_one_step_only(kernel_reads):
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()
    opt.zero_grad()
    backward(params, 2)
    opt.step()
    kernel_reads.clear()
    opt.step()  # the same gradients, no backward in between: read again
    assert sum(kernel_reads) == sum(p.numel() for p in params)


def test_gradient_accumulation_checks_the_accumulated_gradient():
    seed = fresh_seed()
    hooked, opt, plain, ref = pair(seed)
    for params, o in ((hooked, opt), (plain, ref)):
        backward(params, seed)
        o.step()
        o.zero_grad(set_to_none=False)  # in place: the version counters move
        backward(params, seed + 1)
        backward(params, seed + 2, poison=math.inf)
        backward(params, seed + 3, poison=-math.inf)  # inf + (-inf): NaN in the sum
        o.step()
    assert opt.guard_diagnostics["grad_norm"] != opt.guard_diagnostics["grad_norm"]  # NaN
    assert not opt.last_step_applied and not ref.last_step_applied
    for p, q in zip(hooked, plain, strict=True):
        assert torch.equal(p, q)


def test_only_large_leaf_parameters_are_hooked():
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()
    hooked = [bool(p._post_accumulate_grad_hooks) for p in params]
    assert hooked == [p.numel() >= HOOK_MIN_SIZE for p in params]
    opt.step()  # attaching happens once per parameter
    assert [len(p._post_accumulate_grad_hooks or {}) for p in params] == [1, 0, 0, 1]


@pytest.mark.parametrize("guard", [False, {"check_in_backward": False}, {"skip_nonfinite": False}])
def test_no_hooks_when_not_needed(guard):
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3, guard=guard)
    backward(params, 1)
    opt.step()
    assert not any(p._post_accumulate_grad_hooks for p in params)


def test_hooks_leave_with_their_optimizer():
    params = model_params(fresh_seed())
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()
    assert params[0]._post_accumulate_grad_hooks
    del opt
    gc.collect()
    assert not params[0]._post_accumulate_grad_hooks
    backward(params, 2)  # no hook left to fire


def test_copies_hook_their_own_parameters():
    seed = fresh_seed()
    params = model_params(seed)
    opt = at.Adam(params, lr=1e-3)
    backward(params, 1)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._checks is None
        cloned = clone.param_groups[0]["params"]
        backward(cloned, 2)
        clone.step()
        assert cloned[0]._post_accumulate_grad_hooks
    assert len(params[0]._post_accumulate_grad_hooks) == 1


def test_records_need_the_same_tensor_alive():
    checks = BackwardSquares()
    p = torch.nn.Parameter(torch.ones(HOOK_MIN_SIZE))
    checks.attach([p])
    (p * 2.0).sum().backward()
    address = p.grad.data_ptr()
    parts = checks.lookup(address, p.numel())
    assert parts is not None and math.fsum(parts) == 4.0 * HOOK_MIN_SIZE
    assert checks.lookup(address, p.numel()) is None  # used once
    (p * 2.0).sum().backward()
    assert checks.lookup(address, p.numel() + 1) is None  # another size
    (p * 2.0).sum().backward()
    p.grad = None
    gc.collect()
    assert checks.lookup(address, p.numel()) is None  # the tensor is gone
    checks.detach()
    assert not p._post_accumulate_grad_hooks
