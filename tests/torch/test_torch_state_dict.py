"""Checkpoints: adamkit <-> torch.optim in both directions, strict checks on load, copies."""

from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
from _torch_helpers import MODELS, batches, fresh_seed, train, twin
from torch import nn

import adamkit.torch as at


def assert_same_tree(a, b, where="state_dict"):
    """Recursive equality of state dicts: tensors bit-identical (and same dtype), rest ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _setup(dtype=torch.float32, steps=30):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, shape = MODELS["mlp"]
    return seed, make(gen, dtype), batches(gen, shape, dtype, steps)


RESUME_CASES = [
    pytest.param(torch.optim.Adam, at.Adam, {"lr": 1e-2, "amsgrad": True}, False, id="adam-ams"),
    pytest.param(torch.optim.AdamW, at.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, False, id="adamw"),
    pytest.param(torch.optim.AdamW, at.AdamW, {"lr": 1e-2}, True, id="adamw-named-groups"),
]


def _params(model, grouped):
    return at.param_groups_with_decay(model, 0.1) if grouped else model.parameters()


@pytest.mark.parametrize("direction", ["adamkit->torch", "torch->adamkit", "adamkit->adamkit"])
@pytest.mark.parametrize(("torch_cls", "ours", "kwargs", "grouped"), RESUME_CASES)
def test_resumed_training_equals_uninterrupted(direction, torch_cls, ours, kwargs, grouped):
    seed, model, data = _setup()
    # impl="torch" (bit-identical to torch.optim) so that "identically" can mean bit for bit.
    ours = functools.partial(ours, impl="torch")
    first_cls, second_cls = {
        "adamkit->torch": (ours, torch_cls),
        "torch->adamkit": (torch_cls, ours),
        "adamkit->adamkit": (ours, ours),
    }[direction]

    straight = twin(model)
    train(straight, ours(_params(straight, grouped), **kwargs), data)

    first = first_cls(_params(model, grouped), **kwargs)
    train(model, first, data[:12])
    checkpoint = save_and_load({"model": model.state_dict(), "optim": first.state_dict()})

    resumed = twin(model)
    resumed.load_state_dict(checkpoint["model"])
    second = second_cls(_params(resumed, grouped), **kwargs)
    second.load_state_dict(checkpoint["optim"])
    train(resumed, second, data[12:])

    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), f"seed={seed}"
    assert second.state[next(resumed.parameters())]["step"].item() == len(data)
    if grouped:
        assert [g["param_names"] for g in second.state_dict()["param_groups"]] == [
            ["0.weight", "2.weight"],
            ["0.bias", "2.bias"],
        ]


def test_torch_checkpoint_keeps_adamkit_settings():
    _, model, data = _setup()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, theirs, data[:3])
    ours = at.AdamW(model.parameters(), lr=1e-2, impl="reference", decay_mode="independent")
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert (group["impl"], group["decay_mode"], group["construction_lr"]) == (
        "reference",
        "independent",
        1e-2,
    )
    train(model, ours, data[3:5])


def _trained_optimizer(model=None, **kwargs):
    _, default_model, data = _setup(steps=3)
    model = model if model is not None else default_model
    opt = at.Adam(model.named_parameters(), lr=1e-2, **kwargs)
    train(model, opt, data)
    return opt


def _refuses(opt, state_dict, error, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(state_dict)
    assert_same_tree(opt.state_dict(), before)


def test_load_refuses_different_group_count():
    opt = _trained_optimizer()
    sd = opt.state_dict()
    sd["param_groups"] = [*sd["param_groups"], dict(sd["param_groups"][0], params=[])]
    _refuses(opt, sd, ValueError, "has 2 parameter groups, this optimizer has 1")


def test_load_refuses_different_group_size():
    opt = _trained_optimizer()
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    _refuses(opt, sd, ValueError, "param group 0 has 3 parameters in the state dict, 4 in")


def test_load_refuses_checkpoint_of_another_model_naming_the_parameter():
    opt = _trained_optimizer()
    other = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Sequential(nn.Linear(12, 3)))
    other_opt = _trained_optimizer(other)
    _refuses(
        opt,
        other_opt.state_dict(),
        ValueError,
        r"param group 0, parameter 2: the state dict is for '2\.0\.weight', this optimizer has "
        r"'2\.weight'",
    )


def test_load_refuses_wrong_shapes():
    opt = _trained_optimizer()
    # same names and counts, different layer widths
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    other_opt = _trained_optimizer(other)
    _refuses(opt, other_opt.state_dict(), ValueError, r"exp_avg has shape \(5, 6\), the param")


def test_load_refuses_wrong_dtype_instead_of_casting():
    opt = _trained_optimizer()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_sq"] = sd["state"][1]["exp_avg_sq"].double()
    _refuses(opt, sd, ValueError, r"parameter 1 \('0\.bias'\): exp_avg_sq has dtype torch.float64")


def test_load_refuses_missing_state_and_bad_values():
    opt = _trained_optimizer(amsgrad=True)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["max_exp_avg_sq"]
    _refuses(opt, sd, ValueError, r"state lacks \['max_exp_avg_sq'\]")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["betas"] = (1.0, 0.999)
    _refuses(opt, sd, ValueError, r"param group 0 in the state dict: Invalid beta parameter at in")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][7] = sd["state"][0]
    _refuses(opt, sd, ValueError, "unknown parameter id 7")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(-1.0)
    _refuses(opt, sd, ValueError, "step must be a whole number >= 0, got -1.0")
    _refuses(opt, {"state": {}}, TypeError, "'state' and 'param_groups'")


def test_state_dict_hooks_run():
    opt = _trained_optimizer()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls == ["pre"]
    opt.load_state_dict(sd)
    assert calls == ["pre", "load-pre", "load-post"]


def test_user_pre_hook_can_repair_a_checkpoint_before_the_check():
    opt = _trained_optimizer()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"] = ["a", "b", "c", "d"]
    names = list(opt.param_groups[0]["param_names"])

    def rename(optimizer, state_dict):
        state_dict["param_groups"] = copy.deepcopy(state_dict["param_groups"])
        state_dict["param_groups"][0]["param_names"] = names
        return state_dict

    opt.register_load_state_dict_pre_hook(rename)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["param_names"] == names


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically(how):
    seed, model, data = _setup()
    opt = at.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    train(model, opt, data[:5])
    bundle = {"model": model, "opt": opt}
    copied = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    assert type(copied["opt"]) is at.AdamW
    train(model, opt, data[5:])
    train(copied["model"], copied["opt"], data[5:])
    for p, q in zip(copied["model"].parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), f"seed={seed}"
