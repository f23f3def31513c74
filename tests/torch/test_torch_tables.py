"""adamkit.torch's address-table fast path (``impl="auto"``/``"numba"`` on CPU float tensors).

Once a parameter's state exists, the optimizer updates it through raw addresses
(:mod:`adamkit.torch._addresses`) instead of NumPy views.  Both paths run the same element code,
so the results must be bit-identical to the view path (forced here by making the table builder
reject everything), for mixed groups too: parameters the tables cannot take (non-contiguous,
bfloat16, without gradient) go the other way in the same step.  The guard's gradient norm
comes from the same tables: a NaN in any one tensor must still skip the step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _torch_helpers import fresh_seed

import adamkit.torch as at
from adamkit.torch import _addresses, optim

pytest.importorskip("numba", reason="the table path needs numba (adamkit[fast])")


def _params(gen: torch.Generator) -> list[torch.nn.Parameter]:
    shapes = [(3,), (17, 5), (2, 3, 4), (1,), (40_000,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(6, 4, generator=gen).t()))  # non-contiguous
    params.append(torch.nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64)))
    params.append(torch.nn.Parameter(torch.randn(5, generator=gen)))  # never gets a gradient
    return params


def _set_grads(params, gen, step):
    for i, p in enumerate(params[:-1]):
        if (i + step) % 4 == 3:  # some parameters skip some steps
            p.grad = None
            continue
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _run(params, gen_seed, steps, reject, monkeypatch, **options):
    gen = torch.Generator().manual_seed(gen_seed)
    if reject:
        monkeypatch.setattr(optim, "param_tables", lambda rows: ({}, list(range(len(rows)))))
        monkeypatch.setattr(
            at.functional, "param_tables", lambda rows: ({}, list(range(len(rows))))
        )
    opt = at.Adam(params, **options)
    for step in range(steps):
        _set_grads(params, gen, step)
        opt.step()
    monkeypatch.undo()
    return opt


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"amsgrad": True, "weight_decay": 0.1},
        {"maximize": True, "decoupled_weight_decay": True, "weight_decay": 0.05},
        {"guard": False, "impl": "numba"},
    ],
    ids=["default", "amsgrad-l2", "maximize-adamw", "noguard-numba"],
)
def test_tables_match_the_view_path_bit_for_bit(monkeypatch, options):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = _params(gen)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    calls = []
    original = optim.update_tables_
    monkeypatch.setattr(
        optim, "update_tables_", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    fast = _run(params, seed, 6, False, monkeypatch, **options)
    assert len(calls) >= 5  # every step after the first went through the tables
    slow = _run(twins, seed, 6, True, monkeypatch, **options)
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q), f"seed {seed}"
    fast_state, slow_state = fast.state_dict()["state"], slow.state_dict()["state"]
    for a, b in zip(fast_state.values(), slow_state.values(), strict=True):
        for key in b:
            assert torch.equal(a[key], b[key]), f"seed {seed}: {key}"


@pytest.mark.filterwarnings("ignore::adamkit.guard.GuardWarning")
def test_a_non_finite_gradient_in_one_tiny_tensor_skips_the_step():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(300)]
    opt = at.Adam(params)
    for bad_step in (2, 4):
        for p in params:
            p.grad = torch.randn(4, generator=gen)
        opt.step()
        for p in params:
            p.grad = torch.randn(4, generator=gen)
        params[157].grad[bad_step % 4] = math.nan if bad_step == 2 else -math.inf
        before = copy.deepcopy(opt.state_dict())
        values = [p.detach().clone() for p in params]
        opt.step()
        assert not opt.last_step_applied, f"seed {seed}"
        assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
        after = opt.state_dict()["state"]
        for index, entry in before["state"].items():
            for key, value in entry.items():
                assert torch.equal(after[index][key], value), f"seed {seed}: {index} {key}"
    assert opt.guard_diagnostics["n_skipped_nonfinite"] == 2


def test_the_guard_norm_from_tables_is_the_gradient_norm():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = _params(gen)
    opt = at.Adam(params)
    for step in range(3):
        _set_grads(params, gen, step)
        opt.step()
        grads = [p.grad for p in params if p.grad is not None]
        expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        # float32 tensors outside the tables are summed in float32 by torch (rel ~1e-7).
        assert opt.guard_diagnostics["grad_norm"] == pytest.approx(expected, rel=1e-6)


def test_replaced_state_is_picked_up():
    # A parameter whose state is reset (opt.state[p] = {} or a new tensor) restarts from zero
    # moments, as with torch.optim.Adam, rather than updating stale tensors.
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(33, generator=gen)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = at.Adam(params, guard=False), torch.optim.Adam(twins)
    for step in range(5):
        grads = [torch.randn(33, generator=gen) for _ in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:
            for opt, ps in ((ours, params), (theirs, twins)):
                opt.state[ps[0]] = {}
                opt.state[ps[1]]["exp_avg"] = torch.zeros(33)
        ours.step()
        theirs.step()
    for p, q in zip(params, twins, strict=True):
        assert (p - q).abs().max().item() <= 1e-6 * q.abs().max().item(), f"seed {seed}"


def test_tables_only_take_what_the_kernel_can_read():
    t = torch.randn(4, 3)
    step = torch.tensor(1.0)
    good = (t, t.clone(), t.clone(), t.clone(), None, step)
    rejected_rows = [
        (t.t(), t.t().clone(), t.t().clone(), t.t().clone(), None, step),  # non-contiguous
        (t.bfloat16(), t.bfloat16(), t.bfloat16(), t.bfloat16(), None, step),
        (t, t.clone(), t.double(), t.clone(), None, step),  # moment of another dtype
        (t, t.clone(), t.clone(), t.clone(), None, torch.tensor(1.0, dtype=torch.float64)),
        (t, torch._neg_view(t), t.clone(), t.clone(), None, step),
    ]
    tables, rejected = _addresses.param_tables([good, *rejected_rows])
    assert list(tables) == [torch.float32] and len(tables[torch.float32][0]) == 1
    assert rejected == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"amsgrad": True},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    ids=["plain", "amsgrad", "l2", "adamw-maximize"],
)
@pytest.mark.parametrize("clip", ["rms", "atan2"])
def test_update_clipping_on_numba_matches_the_reference(monkeypatch, dtype, options, clip):
    # update_clip="rms" through the table kernel (factors from one read-only pass, then the
    # fused step with each tensor's clipped lr) and "atan2" through numba_clipped, against the
    # NumPy reference of the guard.
    # Gradients jump x30 at step 4 so that some tensors are clipped.  Tolerance: float64 1e-12
    # (the RMS sums in another order), float32 1e-5 over 6 steps (the kernel's FMA, see
    # test_numba_kernel.py).
    from adamkit.torch import guarded

    seed = fresh_seed()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    results = []
    for use_kernel in (True, False):
        gen = torch.Generator().manual_seed(seed)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))
            for s in [(7,), (40, 30), (3, 1000), (50_000,)]
        ]
        monkeypatch.setattr(guarded, "numba_available", lambda use=use_kernel: use)
        if not use_kernel:  # nor the step's prepared tables: the reference, every step
            monkeypatch.setattr(optim, "param_tables", lambda rows: ({}, list(range(len(rows)))))
        opt = at.Adam(params, lr=1e-2, guard={"update_clip": clip}, **options)
        factors = []
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                if step == 4 and p.numel() != 7:
                    p.grad *= 30.0
            opt.step()
            factors.append(opt.guard_diagnostics["n_update_clipped"])
        results.append((params, opt.state_dict()["state"], factors))
    (fast, fast_state, fast_clipped), (slow, slow_state, slow_clipped) = results
    assert fast_clipped == slow_clipped, f"seed {seed}"
    assert (fast_clipped[-1] > 0) == (clip == "rms"), f"seed {seed}"  # atan2 has no factors
    for p, q in zip(fast, slow, strict=True):
        diff = (p - q).abs().max().item() / q.abs().max().item()
        assert diff <= tol, f"seed {seed}: {diff}"
    for a, b in zip(fast_state.values(), slow_state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            diff = (a[key] - b[key]).abs().max().item() / b[key].abs().max().item()
            assert diff <= tol, f"seed {seed}: {key} {diff}"


@pytest.mark.parametrize(
    "guard",
    [{"track_update_norm": True}, {"track_update_norm": True, "update_clip": "rms"}],
    ids=["plain", "rms"],
)
def test_update_norms_measured_by_the_kernel_match_a_copy(guard):
    # With the tables the kernel sums the change while writing it (no copy of the model); the
    # parameters it does not take (non-contiguous, float64) are measured by a copy.  Expected
    # values from copies taken here; float64 sums on both sides (rel 1e-6: torch's float32
    # norms of the other tensors).
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = _params(gen)
    opt = at.Adam(params, lr=1e-2, guard=guard)
    for step in range(4):
        _set_grads(params, gen, step)
        if step == 3:
            for p in params:
                if p.grad is not None:
                    p.grad *= 50.0  # something for the rms rule to clip
        before = [p.detach().clone() for p in params]
        opt.step()
        moved = [(p.detach().double() - b.double()) for p, b in zip(params, before, strict=True)]
        expected_change = math.sqrt(sum(float(d.square().sum()) for d in moved))
        touched = [b for p, b in zip(params, before, strict=True) if p.grad is not None]
        expected_norm = math.sqrt(sum(float(b.double().square().sum()) for b in touched))
        diag = opt.guard_diagnostics
        assert diag["update_norm"] == pytest.approx(expected_change, rel=1e-6), f"seed {seed}"
        assert diag["param_norm"] == pytest.approx(expected_norm, rel=1e-6), f"seed {seed}"


# -- what a review of the raw-address path found (each used to crash, race or go stale) -------


def test_rows_of_mismatched_size_device_or_negation_are_not_tabled():
    t = torch.randn(8)
    step = torch.tensor(2.0)
    rows = [
        (t, torch.randn(8), torch.zeros(8), torch.zeros(8), None, step),  # fine
        (t, torch.randn(4), torch.zeros(8), torch.zeros(8), None, step),  # short gradient
        (t, torch.randn(8), torch.zeros(9), torch.zeros(8), None, step),  # long moment
        (t, torch.randn(8), torch.zeros(8, device="meta"), torch.zeros(8), None, step),
        (t, torch.randn(8), torch.zeros(8), torch.zeros(8), torch.zeros(3), step),
        (t, torch.randn(8), torch.zeros(8), torch.zeros(8), None, torch.zeros(0)),  # no count
        (t, torch.randn(8), torch._neg_view(torch.zeros(8)), torch.zeros(8), None, step),
    ]
    tables, rejected = _addresses.param_tables(rows)
    assert len(tables[torch.float32][0]) == 1
    assert rejected == [1, 2, 3, 4, 5, 6]


def test_resized_parameter_data_is_refused_like_the_reference():
    p = torch.nn.Parameter(torch.randn(16))
    opt = at.Adam([p], guard=False)
    p.grad = torch.randn(16)
    opt.step()
    p.data = torch.randn(64)  # model surgery after the state exists
    p.grad = torch.randn(64)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        opt.step()


def test_global_norm_keeps_temporaries_alive():
    from adamkit.torch.guarded import global_norm

    norm = global_norm(torch.full((1 << 16,), 2.0) for _ in range(3))
    assert norm == pytest.approx(2.0 * math.sqrt(3 * (1 << 16)))


def test_a_parameter_listed_twice_gives_the_same_result_on_any_thread_count():
    import numba

    seed = fresh_seed()
    results = []
    threads_before = torch.get_num_threads()
    for threads in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(100_000, generator=gen))
        q = torch.nn.Parameter(torch.randn(50_000, generator=gen))
        with pytest.warns(UserWarning, match="duplicate"):
            opt = at.Adam([p, q, p], guard=False)
        torch.set_num_threads(threads)
        try:
            for _ in range(3):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = torch.randn(q.shape, generator=gen)
                opt.step()
                assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
        finally:
            torch.set_num_threads(threads_before)
        results.append((p.detach().clone(), q.detach().clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True)), f"seed {seed}"


def test_group_settings_changed_in_place_are_checked_again():
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(torch.randn(5))
    opt = at.Adam([{"params": [p]}, {"params": [q]}])
    opt.param_groups[1]["betas"] = [0.9, 0.999]  # a list put into the group, kept as it is
    for t in (p, q):
        t.grad = torch.randn(5)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone(), q.detach().clone()]
    opt.param_groups[1]["betas"][1] = 2.0  # a list changed in place
    with pytest.raises(ValueError, match="param group 1"):
        opt.step()
    assert torch.equal(p, values[0]) and torch.equal(q, values[1])
    assert str(opt.state_dict()["state"]) == str(before["state"])
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["amsgrad"] = 1  # == True, but not a bool
    with pytest.raises(TypeError, match="param group 0"):
        opt.step()


def test_a_weight_decay_tensor_changed_in_place_takes_effect():
    p = torch.nn.Parameter(torch.ones(3))
    wd = torch.tensor(0.5)
    opt = at.AdamW([p], lr=0.1, guard=False)
    opt.param_groups[0]["weight_decay"] = wd  # a tensor put into the group, kept as it is
    p.grad = torch.zeros(3)
    opt.step()  # p *= 1 - 0.1 * 0.5
    wd.fill_(0.0)
    opt.step()  # no decay any more, zero gradient: p unchanged
    assert torch.allclose(p, torch.full((3,), 0.95))


def test_the_settings_cache_holds_one_entry_per_group():
    p = torch.nn.Parameter(torch.randn(4))
    opt = at.Adam([p])
    p.grad = torch.randn(4)
    for _ in range(5):
        opt.step()
        opt.load_state_dict(opt.state_dict())
    assert len(opt._checked) <= len(opt.param_groups)


def test_hyper_params_validates_the_callers_values():
    from adamkit.torch.functional import hyper_params

    with pytest.raises(TypeError):
        hyper_params(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, "no")
    assert hyper_params(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, True).maximize is True
