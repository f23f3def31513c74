"""The stability guard on adamkit.torch.Adam/AdamW and around foreign optimizers.

Expected outcomes come from outside the guard: hand-derived formulas (StableAdamW's RMS,
Adam-atan2's first step, weighted statistics from np.average), plain optimizers fed the
gradients / learning rates the guard should have used, and the NumPy reference
(adamkit.guard.reference.guarded_adam_step).  Tolerances: bit-identical where the same float
operations run; 1e-12 relative (max|a-b| / max|b|) in float64 where only the order differs.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from _torch_helpers import fresh_seed, rel_diff
from torch import nn

import adamkit.torch as at
from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import init_state
from adamkit.guard import Guard, GuardConfig, GuardWarning, guarded_adam_step
from adamkit.kernels import numba_available
from adamkit.torch.guarded import TorchSnapshot, global_norm

F64_TOL = 1e-12


def same_tree(a, b, where="tree"):
    """Tensors bit-identical with equal dtypes, everything else ==, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {set(a) ^ set(b)}"
        for key in a:
            same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_params(gen, dtype=torch.float64, shapes=((3, 4), (4,), (2, 3), ())):
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def set_grads(params, gen, scale=1.0):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


def snapshot_all(opt, params):
    """Deep copies of everything a step may change: parameters, gradients, state dict."""
    return (
        [p.detach().clone() for p in params],
        [p.grad.clone() for p in params],
        copy.deepcopy(opt.state_dict()),
    )


# -- non-finite skip --------------------------------------------------------------------------


def two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]


NONFINITE_OPTIMIZERS = {
    "adam-default": lambda ps: at.Adam(two_groups(ps), lr=1e-2),
    "adamw-amsgrad-reference": lambda ps: at.AdamW(
        two_groups(ps), lr=1e-2, amsgrad=True, impl="reference"
    ),
    "adam-all": lambda ps: at.Adam(two_groups(ps), lr=1e-2, weight_decay=0.1, guard="all"),
    "adam-atan2": lambda ps: at.Adam(two_groups(ps), lr=1e-2, guard={"update_clip": "atan2"}),
    "wrapped-sgd": lambda ps: at.GuardedOptimizer(
        torch.optim.SGD(two_groups(ps), lr=1e-2, momentum=0.9)
    ),
    "wrapped-torch-adamw": lambda ps: at.GuardedOptimizer(torch.optim.AdamW(two_groups(ps))),
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("when", ["first", "later"])
@pytest.mark.parametrize("name", list(NONFINITE_OPTIMIZERS))
def test_nonfinite_gradient_anywhere_changes_nothing(name, when, value):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen)
    opt = NONFINITE_OPTIMIZERS[name](params)  # two groups: the bad tensor may be in either
    for _ in range(0 if when == "first" else 3):
        set_grads(params, gen)
        opt.step(loss=1.0)
    set_grads(params, gen)
    victim = int(torch.randint(len(params), (1,), generator=gen))
    flat = params[victim].grad.view(-1)
    flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = value
    before_params, before_grads, before_state = snapshot_all(opt, params)
    skipped = opt.guard_diagnostics["n_skipped_nonfinite"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = opt.step(loss=1.0)
    assert result is None and opt.last_step_applied is False
    for p, q in zip(params, before_params, strict=True):
        assert torch.equal(p, q), f"seed={seed}"
    for p, g in zip(params, before_grads, strict=True):
        assert _same_nan(p.grad, g)  # the caller's gradients are never written
    after_state = opt.state_dict()
    same_tree(after_state["state"], before_state["state"], f"state seed={seed}")
    if when == "first":
        assert after_state["state"] == {}
    diag = opt.guard_diagnostics
    assert diag["n_skipped_nonfinite"] == skipped + 1 and diag["action"] == "skip_nonfinite"
    assert not math.isfinite(diag["grad_norm"])
    assert [type(w.message) for w in caught] == [GuardWarning]
    assert caught[0].filename == __file__  # points at the caller's step()

    # the next bad step is only counted; a good one then applies normally
    flat[0] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss=1.0)
    assert opt.guard_diagnostics["n_skipped_nonfinite"] == skipped + 2
    set_grads(params, gen)
    opt.step(loss=1.0)
    assert opt.last_step_applied and not torch.equal(params[0], before_params[0])


def _same_nan(a, b):
    return (
        a.dtype == b.dtype
        and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        and (torch.equal(a.isnan(), b.isnan()))
    )


def test_default_check_is_one_reduction_per_step(monkeypatch):
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen, torch.float32)
    opt = at.Adam(params)
    calls = []
    original = torch._foreach_norm

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return original(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    if numba_available():
        # CPU float tensors are summed by the address-table kernel instead: one call per dtype.
        from adamkit.kernels import numba_tables

        summed = numba_tables.squares_parts

        def counting_kernel(addresses, sizes, dtype, parallel=None):
            calls.append(len(addresses))
            return summed(addresses, sizes, dtype, parallel)

        monkeypatch.setattr(numba_tables, "squares_parts", counting_kernel)
    for _ in range(3):
        set_grads(params, gen)
        opt.step()
    assert calls == [len(params)] * 3
    assert opt.guard_diagnostics["grad_norm"] == pytest.approx(
        math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params)), rel=1e-6
    )


def test_global_norm_matches_float64_and_flags_nonfinite():
    gen = torch.Generator().manual_seed(fresh_seed())
    tensors = [
        torch.randn(5, generator=gen),
        torch.randn(3, 2, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen).to(torch.bfloat16),
        torch.randn(2, generator=gen, dtype=torch.complex64),
        torch.zeros(0),
    ]
    expected = math.sqrt(sum(float(t.to(torch.complex128).abs().square().sum()) for t in tensors))
    assert global_norm(tensors) == pytest.approx(expected, rel=1e-6)
    assert global_norm([]) == 0.0
    assert math.isnan(global_norm([*tensors, torch.tensor([1.0, math.nan])]))
    assert global_norm([*tensors, torch.tensor([-math.inf])]) == math.inf


# -- all options off / inactive == plain adamkit Adam -------------------------------------------

OFF = GuardConfig(skip_nonfinite=False)


@pytest.mark.parametrize(
    "guard",
    [
        pytest.param(OFF, id="every-option-off"),
        pytest.param(True, id="default"),
        # spikes are judged only after the warm-ups, so 10 steps of "all" change nothing either
        pytest.param({"preset": "all", "update_clip": None, "loss_warmup": 20}, id="all-in-warmup"),
    ],
)
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_guard_without_anything_to_do_equals_plain_adam(guard, impl):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "impl": impl}
    guarded = at.AdamW(params, guard=guard, **kwargs)
    plain = at.AdamW(twins, guard=False, **kwargs)
    for _ in range(10):
        set_grads(params, gen)
        for p, q in zip(params, twins, strict=True):
            q.grad = p.grad.clone()
        loss = float(torch.rand((), generator=gen))
        guarded.step(loss=loss)
        plain.step(loss=loss)  # accepted and ignored without a guard
        assert guarded.last_step_applied and plain.last_step_applied
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q), f"seed={seed}"
    sd = guarded.state_dict()
    same_tree(sd["state"], plain.state_dict()["state"])
    assert (
        plain.guard is None
        and plain.guard_diagnostics is None
        and "guard" not in (plain.state_dict())
    )


def test_wrapper_with_every_option_off_equals_the_wrapped_optimizer():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    wrapped = at.GuardedOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), guard=OFF)
    plain = torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    for _ in range(5):
        set_grads(params, gen)
        for p, q in zip(params, twins, strict=True):
            q.grad = p.grad.clone()
        wrapped.step()
        plain.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q), f"seed={seed}"


# -- update clipping ---------------------------------------------------------------------------


def _two_constant_steps(opt, param, a, k):
    param.grad = torch.full_like(param, a)
    opt.step()
    param.grad = torch.full_like(param, k * a)
    opt.step()


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("threshold", [1.0, 1.1])
def test_stable_adamw_rms_clip_on_a_worked_case(impl, threshold):
    # Gradients a, then k*a in every element: by hand, v_hat_2 = (1-b2)(b2 + k^2) a^2 / (1-b2^2),
    # so RMS^2 = (k a)^2 / v_hat_2 = k^2 (1 + b2) / (b2 + k^2), the same for every element.
    b1, b2, lr, a, k, n = 0.9, 0.5, 0.1, 0.3, 3.0, 5
    param = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = at.Adam(
        [param],
        lr=lr,
        betas=(b1, b2),
        eps=0.0,
        impl=impl,
        guard={"update_clip": "rms", "rms_threshold": threshold},
    )
    param.grad = torch.full_like(param, a)
    opt.step()
    # step 1: v_hat = g^2, RMS = 1, no clipping: plain Adam moves by lr * sign(g)
    assert opt.guard_diagnostics["update_scale_min"] == 1.0
    assert not opt.guard_diagnostics["update_clipped"]
    assert torch.allclose(param, torch.full_like(param, -lr), rtol=1e-15, atol=0)
    param.grad = torch.full_like(param, k * a)
    opt.step()

    rms = math.sqrt(k * k * (1 + b2) / (b2 + k * k))
    factor = 1.0 / max(1.0, rms / threshold)
    m_hat = (b1 * (1 - b1) * a + (1 - b1) * k * a) / (1 - b1**2)
    v_hat = ((1 - b2) * b2 * a * a + (1 - b2) * k * k * a * a) / (1 - b2**2)
    expected = -lr - lr * factor * m_hat / math.sqrt(v_hat)
    diag = opt.guard_diagnostics
    assert diag["update_scale_min"] == pytest.approx(factor, rel=1e-12)
    assert diag["update_clipped"] is (factor < 1.0) and diag["n_update_clipped"] == 1
    assert rel_diff(param, torch.full_like(param, expected)) <= F64_TOL


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_atan2_first_step_moves_by_a_pi_over_4(impl):
    # Step 1: m_hat = g and v_hat = g^2, so atan2(m_hat, b sqrt(v_hat)) = atan2(g, b|g|); with
    # b = 1 that is +-pi/4 (0 where g = 0): theta <- theta (1 - lr wd) - lr a (pi/4) sign(g).
    gen = torch.Generator().manual_seed(fresh_seed())
    lr, wd, a = 0.01, 0.1, 1.27
    theta0 = torch.randn(6, generator=gen, dtype=torch.float64)
    grad = torch.randn(6, generator=gen, dtype=torch.float64)
    grad[2] = 0.0
    param = nn.Parameter(theta0.clone())
    # eps=1 would change Adam's step a lot: atan2 has no eps
    opt = at.AdamW(
        [param], lr=lr, weight_decay=wd, eps=1.0, impl=impl, guard={"update_clip": "atan2"}
    )
    param.grad = grad
    opt.step()
    expected = theta0 * (1 - lr * wd) - lr * a * (math.pi / 4) * torch.sign(grad)
    assert rel_diff(param, expected) <= F64_TOL


@pytest.mark.parametrize("update_clip", ["rms", "atan2"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_clipped_steps_follow_the_numpy_reference(update_clip, impl):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen)
    hp = AdamHyperParams(
        lr=1e-2, beta2=0.9, weight_decay=0.05, decoupled_weight_decay=True, amsgrad=True
    )
    config = {"update_clip": update_clip, "rms_threshold": 0.9}
    opt = at.Adam(
        params,
        lr=hp.lr,
        betas=(hp.beta1, hp.beta2),
        weight_decay=hp.weight_decay,
        decoupled_weight_decay=True,
        amsgrad=True,
        impl=impl,
        guard=config,
    )
    ref_params = [p.detach().numpy().copy() for p in params]
    ref_states = [init_state(p, amsgrad=True) for p in ref_params]
    ref_guard = Guard(config)
    for step in range(8):
        # growing gradients make RMS > threshold, so clipping really happens
        set_grads(params, gen, scale=1.0 + step)
        out = guarded_adam_step(
            ref_params, [p.grad.numpy() for p in params], ref_states, hp, ref_guard
        )
        ref_params, ref_states = out.params, out.states
        opt.step()
        diag = opt.guard_diagnostics
        for key in ("action", "update_clipped", "n_update_clipped"):
            assert diag[key] == out.diagnostics[key], (key, step, f"seed={seed}")
        if update_clip == "rms":
            assert diag["update_scale_min"] == pytest.approx(
                out.diagnostics["update_scale_min"], rel=1e-12
            )
    if update_clip == "rms":
        assert opt.guard_diagnostics["n_update_clipped"] > 0  # the case exercised the clip
    for p, ref, state in zip(params, ref_params, ref_states, strict=True):
        assert rel_diff(p, torch.from_numpy(ref)) <= F64_TOL, f"seed={seed}"
        torch_state = opt.state[p]
        assert torch_state["step"].item() == state.step
        for key, value in (("exp_avg", state.exp_avg), ("max_exp_avg_sq", state.max_exp_avg_sq)):
            assert rel_diff(torch_state[key], torch.from_numpy(value)) <= F64_TOL, key


# -- gradient-spike clipping -------------------------------------------------------------------


def _grads_with_norms(gen, params, norm):
    raw = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    total = math.sqrt(sum(float((g * g).sum()) for g in raw))
    return [g * (norm / total) for g in raw]


@pytest.mark.parametrize("mode", ["threshold", "adaptive"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["adamkit", "wrapped-sgd"])
def test_gradient_spike_is_clipped_to_the_worked_threshold(mode, wrapped):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    alpha, z_max, norms, spike = 0.5, 2.0, [1.0, 2.0, 3.0], 10.0
    # ZClip's statistics, computed as weighted moments: weights alpha^(n - i)
    weights = alpha ** np.arange(len(norms) - 1, -1, -1)
    mean = np.average(norms, weights=weights)
    std = math.sqrt(np.average((np.array(norms) - mean) ** 2, weights=weights))
    z = (spike - mean) / (std + 1e-6)
    threshold = mean + (z_max if mode == "threshold" else z_max * z_max / z) * std
    scale = threshold / spike

    config = {
        "grad_spike": True,
        "grad_alpha": alpha,
        "grad_z": z_max,
        "grad_warmup": 3,
        "grad_mode": mode,
    }
    params = make_params(gen)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    if wrapped:
        opt = at.GuardedOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.5), guard=config)
        plain = torch.optim.SGD(twins, lr=0.1, momentum=0.5)
    else:
        opt = at.Adam(params, lr=0.1, guard=config)
        plain = at.Adam(twins, lr=0.1, guard=False)
    for step, norm in enumerate([*norms, spike]):
        grads = _grads_with_norms(gen, params, norm)
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad = g.clone()
            q.grad = g * scale if step == len(norms) else g.clone()
        opt.step()
        plain.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g)  # the caller's gradients are never written
    diag = opt.guard_diagnostics
    assert diag["grad_clipped"] and diag["n_grad_clipped"] == 1
    assert diag["grad_norm"] == pytest.approx(spike, rel=1e-12)
    assert diag["grad_z"] == pytest.approx(z, rel=1e-9)
    assert diag["grad_scale"] == pytest.approx(scale, rel=1e-12)
    for p, q in zip(params, twins, strict=True):
        assert rel_diff(p, q) <= F64_TOL, f"seed={seed}"


# -- loss spikes, snapshots, rollback, lr cool-down --------------------------------------------

SPIKE_CONFIG = {
    "loss_spike": True,
    "loss_alpha": 0.5,
    "loss_z": 3.0,
    "loss_warmup": 2,
    "loss_patience": 2,
    "snapshot_interval": 2,
    "lr_factor": 0.5,
    "lr_cooldown": 2,
}
# step:       1    2    3    4      5      6    7    8    9
LOSSES = [1.0, 1.0, 1.0, 100.0, 100.0, 1.0, 1.0, 1.0, 1.0]
# Worked by hand from the config: 1 snapshot before update 1; 2 applied; 3 snapshot (2 updates
# since) and applied; 4 spike (skip); 5 second spike in a row: roll back to the snapshot taken at
# 3 (so update 3 is undone) and halve the lr for 2 updates; 6, 7 at lr/2; 8 snapshot again (2
# updates since the rollback), 8 and 9 at lr.
ACTIONS = [
    "apply",
    "apply",
    "apply",
    "skip_loss_spike",
    "rollback",
    "apply",
    "apply",
    "apply",
    "apply",
]
PLAIN_UPDATES = {0: 1.0, 1: 1.0, 5: 0.5, 6: 0.5, 7: 1.0, 8: 1.0}  # step index -> lr factor


def _spike_run(gen, make_opt, params, *, until=None, start=0, opt=None):
    opt = opt or make_opt(params)
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in LOSSES]
    actions = []
    for i in range(start, until or len(LOSSES)):
        for p, g in zip(params, grads[i], strict=True):
            p.grad = g.clone()
        opt.step(loss=torch.tensor(LOSSES[i]))
        actions.append(opt.guard_diagnostics["action"])
    return opt, grads, actions


SPIKE_OPTIMIZERS = {
    "adam": (
        lambda ps: at.Adam(ps, lr=0.1, amsgrad=True, guard=SPIKE_CONFIG),
        lambda ps: at.Adam(ps, lr=0.1, amsgrad=True, guard=False),
    ),
    "wrapped-sgd": (
        lambda ps: at.GuardedOptimizer(torch.optim.SGD(ps, lr=0.1, momentum=0.9), SPIKE_CONFIG),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ),
}


@pytest.mark.parametrize("name", list(SPIKE_OPTIMIZERS))
def test_loss_spikes_roll_back_to_the_snapshot_and_cool_down(name):
    seed = fresh_seed()
    make_guarded, make_plain = SPIKE_OPTIMIZERS[name]
    params = make_params(torch.Generator().manual_seed(seed))
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt, grads, actions = _spike_run(torch.Generator().manual_seed(seed + 1), make_guarded, params)
    assert actions == ACTIONS
    assert opt.param_groups[0]["lr"] == 0.1  # the cool-down never touches param_groups
    diag = opt.guard_diagnostics
    assert (diag["n_loss_spikes"], diag["n_rollbacks"], diag["n_snapshots"]) == (2, 1, 3)
    # Independent expectation: a plain optimizer that only sees the updates that survive.
    plain = make_plain(twins)
    for i, factor in PLAIN_UPDATES.items():
        for q, g in zip(twins, grads[i], strict=True):
            q.grad = g.clone()
        plain.param_groups[0]["lr"] = 0.1 * factor
        plain.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q), f"seed={seed}"
    same_tree(opt.state_dict()["state"], plain.state_dict()["state"], f"seed={seed}")


@pytest.mark.parametrize("name", list(SPIKE_OPTIMIZERS))
@pytest.mark.parametrize("split", [3, 5, 7], ids=["before-rollback", "after-rollback", "cooling"])
def test_resume_across_a_rollback_is_exact(name, split):
    seed = fresh_seed()
    make_guarded, _ = SPIKE_OPTIMIZERS[name]
    straight = make_params(torch.Generator().manual_seed(seed))
    opt, _, _ = _spike_run(torch.Generator().manual_seed(seed + 1), make_guarded, straight)

    params = make_params(torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    first, _, _ = _spike_run(gen, make_guarded, params, until=split)
    checkpoint = roundtrip({"params": [p.detach() for p in params], "opt": first.state_dict()})
    assert checkpoint["opt"]["guard"]["snapshot"] is not None  # the snapshot travels with it

    resumed = [nn.Parameter(t.clone()) for t in checkpoint["params"]]
    second = make_guarded(resumed)
    second.load_state_dict(checkpoint["opt"])
    # same gradient stream: re-draw it from the same seed, then continue from `split`
    _spike_run(
        torch.Generator().manual_seed(seed + 1), make_guarded, resumed, start=split, opt=second
    )
    for p, q in zip(resumed, straight, strict=True):
        assert torch.equal(p, q), f"seed={seed}"
    same_tree(second.state_dict(), opt.state_dict(), f"seed={seed}")


def test_nonfinite_loss_is_a_spike_and_a_bad_loss_changes_nothing():
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    opt = at.Adam(params, guard={"loss_spike": True, "loss_patience": 5})
    set_grads(params, gen)
    before = snapshot_all(opt, params)
    opt.step(loss=math.nan)
    assert opt.guard_diagnostics["action"] == "skip_loss_spike" and not opt.last_step_applied
    counters = opt.state_dict()["guard"]["guard"]["counters"]
    with pytest.raises(TypeError, match="loss must be a real number"):
        opt.step(loss="high")
    with pytest.raises(ValueError, match="not both"):
        opt.step(lambda: 1.0, loss=1.0)
    assert opt.state_dict()["guard"]["guard"]["counters"] == counters
    for p, q in zip(params, before[0], strict=True):
        assert torch.equal(p, q)


# -- state dicts, copies, schedulers -----------------------------------------------------------


def test_guard_state_round_trips_and_loads_into_torch_and_back():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen, torch.float32)
    config = {"preset": "all", "grad_warmup": 2, "loss_warmup": 2, "snapshot_interval": 3}
    opt = at.AdamW(params, lr=1e-2, guard=config)
    for i in range(6):
        set_grads(params, gen, scale=1.0 + 3 * (i == 4))
        opt.step(loss=1.0 + 0.1 * i)
    saved = opt.state_dict()
    assert saved["guard"]["guard"]["counters"]["n_steps"] == 6
    # p, m and v in float32, plus each float32 step count
    assert opt.guard_snapshot_nbytes == sum(3 * p.numel() * 4 + 4 for p in params)

    copy_params = [nn.Parameter(p.detach().clone()) for p in params]
    other = at.AdamW(copy_params, lr=1e-2, guard=config)
    other.load_state_dict(roundtrip(saved))
    same_tree(other.state_dict(), saved)
    for _ in range(3):  # both continue identically
        set_grads(params, gen)
        for p, q in zip(params, copy_params, strict=True):
            q.grad = p.grad.clone()
        opt.step(loss=1.2)
        other.step(loss=1.2)
    same_tree(other.state_dict(), opt.state_dict(), f"seed={seed}")

    theirs = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    theirs.load_state_dict(opt.state_dict())  # the "guard" entry is ignored by torch
    fresh = at.AdamW([nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, guard=config)
    fresh.load_state_dict(theirs.state_dict())  # no "guard": starts afresh
    assert fresh.guard_diagnostics["n_steps"] == 0 and fresh.guard_snapshot_nbytes == 0
    same_tree(fresh.state_dict()["state"], opt.state_dict()["state"])


def test_bad_guard_entry_is_refused_and_changes_nothing():
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    opt = at.Adam(params, guard={"loss_spike": True, "snapshot_interval": 1})
    for _ in range(2):
        set_grads(params, gen)
        opt.step(loss=1.0)
    good = opt.state_dict()
    before = copy.deepcopy(good)
    bad_version = copy.deepcopy(good)
    bad_version["guard"]["version"] = 99
    bad_shape = copy.deepcopy(good)
    bad_shape["guard"]["snapshot"]["params"][0] = torch.zeros(2, 2, dtype=torch.float64)
    bad_counter = copy.deepcopy(good)
    bad_counter["guard"]["guard"]["counters"]["n_steps"] = -1
    for bad, error, match in [
        (bad_version, ValueError, "version 99"),
        (bad_shape, ValueError, r"parameter 0 is torch.float64 \(2, 2\)"),
        (bad_counter, ValueError, "counters.n_steps"),
    ]:
        with pytest.raises(error, match=match):
            opt.load_state_dict(bad)
        same_tree(opt.state_dict(), before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_guard(how):
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    opt = at.Adam(params, guard={"loss_spike": True, "snapshot_interval": 2})
    wrapped = at.GuardedOptimizer(torch.optim.SGD(make_params(gen), lr=0.1))
    for _ in range(3):
        set_grads(params, gen)
        opt.step(loss=1.0)
    for original in (opt, wrapped):
        copied = (
            copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
        )
        assert type(copied) is type(original)
        same_tree(copied.state_dict()["guard"], original.state_dict()["guard"])
        assert copied.guard.config == original.guard.config


@pytest.mark.parametrize("wrap", ["adamkit", "wrapper", "wrapped-inner"])
def test_scheduler_after_a_skipped_step_neither_warns_nor_drifts(wrap):
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    if wrap == "adamkit":
        opt = at.Adam(params, lr=0.1)
        sched_target = opt
    else:
        inner = torch.optim.SGD(params, lr=0.1)
        opt = at.GuardedOptimizer(inner, guard=True)
        sched_target = opt if wrap == "wrapper" else inner
    sched = torch.optim.lr_scheduler.StepLR(sched_target, step_size=1, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any scheduler warning fails the test
        for i in range(4):
            set_grads(params, gen)
            if i in (0, 2):
                params[1].grad[0] = math.inf
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=GuardWarning)
                opt.step()
            assert opt.last_step_applied is (i not in (0, 2))
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1 * 0.5**k for k in range(1, 5)]


def test_update_norm_diagnostics_match_the_parameter_change():
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    opt = at.Adam(params, lr=0.05, guard={"track_update_norm": True})
    set_grads(params, gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, gen)
    opt.step()
    params = [p.detach() for p in params]
    update = math.sqrt(
        sum(float(((p - q) ** 2).sum()) for p, q in zip(params, before, strict=True))
    )
    weight = math.sqrt(sum(float((q**2).sum()) for q in before))
    diag = opt.guard_diagnostics
    assert diag["update_norm"] == pytest.approx(update, rel=1e-12)
    assert diag["update_ratio"] == pytest.approx(update / weight, rel=1e-12)


def test_snapshot_restores_state_that_did_not_exist_yet():
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    opt = at.Adam(params, guard=False)
    empty = TorchSnapshot.take(opt)
    set_grads(params, gen)
    before = [p.detach().clone() for p in params]
    opt.step()
    kept = opt.state[params[0]]["exp_avg"]
    snap = TorchSnapshot.take(opt)
    set_grads(params, gen)
    opt.step()
    snap.restore(opt)
    assert opt.state[params[0]]["exp_avg"] is kept  # restored in place
    assert opt.state[params[0]]["step"].item() == 1
    empty.restore(opt)
    assert len(opt.state) == 0
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)


# -- the wrapper's rules -----------------------------------------------------------------------


def test_wrapper_refuses_what_it_cannot_guard():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="LBFGS"):
        at.GuardedOptimizer(torch.optim.LBFGS([p]))
    with pytest.raises(ValueError, match="already guarded"):
        at.GuardedOptimizer(at.Adam([p]))
    with pytest.raises(ValueError, match="cannot clip the update"):
        at.GuardedOptimizer(torch.optim.SGD([p], lr=0.1), guard={"update_clip": "rms"})
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        at.GuardedOptimizer(object())
    with pytest.raises(TypeError, match="unknown guard option"):
        at.Adam([p], guard={"skip_nan": True})
    wrapped = at.GuardedOptimizer(torch.optim.SGD([p], lr=0.1))  # "all" minus update clipping
    assert wrapped.guard.config == GuardConfig.all(update_clip=None)
    assert at.GuardedOptimizer(at.Adam([p], guard=False), guard=False).guard is None


def test_wrapper_closure_and_lr_restored_object():
    p = nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.1)
    inner = torch.optim.SGD([p], lr=lr)
    opt = at.GuardedOptimizer(inner, guard={"loss_spike": True})
    seen = []

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        seen.append(torch.is_grad_enabled())
        return loss

    with torch.no_grad():
        result = opt.step(closure)
    assert seen == [True] and isinstance(result, torch.Tensor)
    assert opt.guard_diagnostics["loss"] == pytest.approx(3.0)
    assert inner.param_groups[0]["lr"] is lr
    assert torch.allclose(p, torch.full((3,), 0.8))


def test_snapshot_is_retaken_when_parameters_are_added():
    gen = torch.Generator().manual_seed(fresh_seed())
    params = make_params(gen)
    opt = at.Adam(params[:2], guard={"loss_spike": True, "snapshot_interval": 5})
    set_grads(params, gen)
    opt.step(loss=1.0)
    small = opt.guard_snapshot_nbytes
    opt.add_param_group({"params": params[2:]})
    opt.step(loss=1.0)  # the old snapshot cannot restore the new group: a new one is taken
    assert opt.guard_snapshot_nbytes > small
    assert opt.guard_diagnostics["n_snapshots"] == 2
