"""adamkit.torch.Adam/AdamW bookkeeping: validation, errors that change nothing, edge cases."""

from __future__ import annotations

import copy

import pytest
import torch
from _torch_helpers import fresh_seed
from torch import nn

import adamkit.torch as at

BAD_SETTINGS = [
    (
        {"lr": -1.0},
        ValueError,
        r"^Invalid learning rate: -1\.0 \(lr must be a finite number >= 0\)$",
    ),
    ({"lr": float("nan")}, ValueError, r"Invalid learning rate: nan"),
    (
        {"lr": torch.tensor([0.1, 0.2])},
        ValueError,
        "lr must be a single number, got an array/tensor of 2",
    ),
    ({"lr": "0.1"}, TypeError, "lr must be a real number, got str"),
    (
        {"betas": (1.0, 0.999)},
        ValueError,
        r"^Invalid beta parameter at index 0: 1\.0 \(beta1 must be in \[0, 1\)\)$",
    ),
    ({"betas": (0.9, -0.1)}, ValueError, r"Invalid beta parameter at index 1: -0\.1"),
    ({"betas": (0.9,)}, ValueError, r"betas must be a pair \(beta1, beta2\), got 1 values"),
    ({"eps": -1e-8}, ValueError, r"^Invalid epsilon value: -1e-08"),
    ({"weight_decay": -0.1}, ValueError, r"^Invalid weight_decay value: -0\.1"),
    ({"amsgrad": 1}, TypeError, "amsgrad must be True or False, got int 1"),
    ({"maximize": "no"}, TypeError, "maximize must be True or False"),
    (
        {"impl": "fast"},
        ValueError,
        r"impl must be one of 'auto', 'torch', 'reference', 'numba', got 'fast'",
    ),
    ({"decay_mode": "none"}, ValueError, r"decay_mode must be one of 'lr_scaled', 'independent'"),
    ({"decay_mode": "independent"}, ValueError, "needs decoupled_weight_decay=True"),
    ({"foreach": True}, TypeError, "unexpected keyword argument 'foreach'"),
    ({"momentum": 0.9}, TypeError, "unexpected keyword argument 'momentum'"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_SETTINGS)
def test_constructor_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        at.Adam([nn.Parameter(torch.zeros(2))], **kwargs)


def test_independent_decay_needs_positive_lr_and_reference_impl_needs_cpu_float():
    with pytest.raises(ValueError, match=r"lr must be > 0, got 0\.0"):
        at.AdamW([nn.Parameter(torch.zeros(2))], lr=0.0, decay_mode="independent")
    with pytest.raises(
        ValueError,
        match=r"impl='reference' needs CPU float32/float64 tensors, got a torch.bfloat16",
    ):
        at.Adam([nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], impl="reference")
    with pytest.raises(ValueError, match=r"impl='reference' needs CPU .* got a torch\.complex64"):
        at.Adam([nn.Parameter(torch.zeros(2, dtype=torch.complex64))], impl="reference")


def test_bad_param_group_is_refused_and_changes_nothing():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = at.Adam([a], lr=0.1)
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1\.5"):
        opt.add_param_group({"params": [b], "betas": (0.9, 1.5)})
    with pytest.raises(TypeError, match=r"unknown param group keys \['weight_dacay'\]"):
        opt.add_param_group({"params": [b], "weight_dacay": 0.1})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == before[0]["lr"]
    opt.add_param_group({"params": [b], "lr": 0.5, "name": "head"})
    assert opt.param_groups[1]["name"] == "head" and opt.param_groups[1]["lr"] == 0.5


def _stepped_setup():
    torch.manual_seed(fresh_seed())
    a, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))
    opt = at.Adam([{"params": [a]}, {"params": [b], "lr": 0.1}], lr=0.01, amsgrad=True)
    for _ in range(2):
        a.grad, b.grad = torch.randn(3, 2), torch.randn(4)
        opt.step()
    return opt, a, b


def _assert_step_refused(opt, params, error, match):
    params_before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.step()
    for p, q in zip(params, params_before, strict=True):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for key, entry in state_before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value)


def test_invalid_setting_found_at_step_changes_nothing():
    opt, a, b = _stepped_setup()
    opt.param_groups[1]["lr"] = -0.5  # e.g. a buggy schedule
    _assert_step_refused(opt, [a, b], ValueError, r"param group 1: Invalid learning rate: -0\.5")


def test_sparse_gradient_rejected_with_torchs_message_and_changes_nothing():
    opt, a, b = _stepped_setup()
    a.grad = torch.randn(3, 2)
    b.grad = torch.randn(4).to_sparse()
    _assert_step_refused(
        opt,
        [a, b],
        RuntimeError,
        "^Adam does not support sparse gradients, please consider SparseAdam instead$",
    )


GRAD_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"maximize": True, "weight_decay": 0.1, "amsgrad": True}, id="maximize-l2"),
    pytest.param({"weight_decay": 0.1, "decoupled_weight_decay": True}, id="decoupled"),
]


@pytest.mark.parametrize("impl", ["torch", "reference", "numba"])
@pytest.mark.parametrize("kwargs", GRAD_CASES)
def test_step_never_writes_into_grad(kwargs, impl):
    torch.manual_seed(fresh_seed())
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    grad = torch.randn(4, 3, dtype=torch.float64)
    p.grad = grad
    saved = grad.clone()
    opt = at.Adam([p], lr=0.1, impl=impl, **kwargs)
    for _ in range(3):
        opt.step()
        assert p.grad is grad and torch.equal(grad, saved)


def test_params_without_grad_and_empty_groups_are_skipped():
    p, frozen = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = at.Adam([{"params": [p, frozen]}, {"params": []}], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(2))
    assert opt.state[p]["step"].item() == 1 and not torch.equal(p, torch.ones(2))


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_zero_dim_and_non_contiguous_params_match_torch(impl):
    torch.manual_seed(fresh_seed())
    scalar = torch.randn((), dtype=torch.float64)
    matrix = torch.randn(5, 3, dtype=torch.float64).t()  # non-contiguous leaf
    assert not matrix.is_contiguous()
    ours = [nn.Parameter(scalar.clone()), nn.Parameter(matrix.clone().t().contiguous().t())]
    theirs = [nn.Parameter(scalar.clone()), nn.Parameter(matrix.clone().t().contiguous().t())]
    assert not ours[1].is_contiguous()
    opt = at.Adam(ours, lr=0.1, amsgrad=True, impl=impl)
    ref = torch.optim.Adam(theirs, lr=0.1, amsgrad=True)
    for _ in range(5):
        grads = [torch.randn(()), torch.randn(3, 5)]
        for params in (ours, theirs):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.double()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        assert p.shape == q.shape
        if impl == "torch":
            assert torch.equal(p, q)
        else:  # NumPy vs torch kernels: an ulp or so; absolute, as the 0-d one may be near 0
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert opt.state[ours[1]]["exp_avg"].stride() == ours[1].stride()


def test_complex_params_follow_torch():
    torch.manual_seed(fresh_seed())
    init = torch.randn(3, 2, dtype=torch.complex64)
    ours, theirs = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt = at.Adam([ours], lr=0.05, amsgrad=True, weight_decay=0.1)
    ref = torch.optim.Adam([theirs], lr=0.05, amsgrad=True, weight_decay=0.1)
    for _ in range(10):
        grad = torch.randn(3, 2, dtype=torch.complex64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours, theirs)
    assert opt.state[ours]["max_exp_avg_sq"].dtype == torch.complex64


@pytest.mark.parametrize("mode", ["lr_scaled", "independent"])
def test_decay_modes_follow_their_formulas(mode):
    # zero gradients: m = v = 0, so Adam's update is 0 and only the decay acts
    lr0, wd = 0.1, 0.01
    p = nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = at.AdamW([p], lr=lr0, weight_decay=wd, decay_mode=mode)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    expected = 2.0
    for t in range(4):
        lr = lr0 * 0.5**t
        factor = lr / lr0 if mode == "independent" else lr
        expected *= 1 - factor * wd
        p.grad = torch.zeros(3, dtype=torch.float64)
        opt.step()
        scheduler.step()
    assert torch.allclose(p, torch.full((3,), expected, dtype=torch.float64), rtol=1e-15, atol=0)
    assert opt.param_groups[0]["initial_lr"] == lr0


def test_adamw_is_adam_with_other_defaults():
    p = nn.Parameter(torch.zeros(2))
    assert issubclass(at.AdamW, at.Adam)
    group = at.AdamW([p]).param_groups[0]
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 1e-2
    group = at.Adam([p]).param_groups[0]
    assert group["decoupled_weight_decay"] is False and group["weight_decay"] == 0.0


def test_named_parameters_are_recorded():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    opt = at.Adam(model.named_parameters())
    assert opt.state_dict()["param_groups"][0]["param_names"] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]
    assert opt.param_groups[0]["params"][0] is model[0].weight


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight  # tied: stays undecayed
        self.proj = nn.Linear(4, 4, bias=False)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_with_decay_rule():
    groups = at.param_groups_with_decay(_Net(), weight_decay=0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert groups[0]["param_names"] == ["conv.weight", "proj.weight"]
    assert groups[1]["param_names"] == [
        "scale",
        "embed.weight",
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "bn.weight",
        "bn.bias",
        "rms.weight",
        "head.bias",
    ]
    opt = at.AdamW(groups, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    # an empty group keeps the layout (and torch's names-everywhere rule) intact
    only_norm = at.param_groups_with_decay(nn.LayerNorm(3))
    assert only_norm[0]["params"] == [] and len(at.Adam(only_norm).param_groups) == 2
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        at.param_groups_with_decay([nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=r"no_decay must be a tuple of nn\.Module subclasses"):
        at.param_groups_with_decay(nn.Linear(2, 2), no_decay=nn.LayerNorm)


def test_groups_may_repeat_but_not_change_optimizer_wide_settings():
    # ZeroRedundancyOptimizer passes every keyword as a group default, guard= included.
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = at.Adam([{"params": [p], "guard": "all", "process_group": None}], guard="all")
    assert "guard" not in opt.param_groups[0] and "process_group" not in opt.param_groups[0]
    before = len(opt.param_groups)
    with pytest.raises(TypeError, match=r"guard is an optimizer-wide setting"):
        opt.add_param_group({"params": [q], "guard": False})
    assert len(opt.param_groups) == before


def test_numba_step_keeps_torch_thread_count():
    # Starting numba's OpenMP pool used to reset torch's thread count (1 -> 2).
    pytest.importorskip("numba")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = nn.Parameter(torch.randn(100_000))
        p.grad = torch.randn(100_000)
        opt = at.Adam([p], impl="numba")
        for _ in range(2):
            opt.step()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
