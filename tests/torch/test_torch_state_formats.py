"""``adamkit.torch.Adam(..., state=...)``: compressed optimizer state in the torch front end.

Each format follows the NumPy plain path (``adamkit.kernels.stored``, tested against the reference
in tests/formats); here: ``state="fp32"`` against ``torch.optim.Adam`` for every option of the
shared table, training with each format against ``state=None`` over 200 steps (relative parameter
difference within ``TRACK_TOL``, largest measured over 10 seeds: fp32 5.2e-7, bf16 0.0061, int8
0.069; difference of the mean loss over the last 20 steps within ``LOSS_TOL``, largest measured:
fp32 1e-7, bf16 0.00044, int8 0.0058), state
dicts (compact, converted in every direction, torch.optim.Adam's in and out, refusals), the
sensitive-tensor rule, bf16 parameters (stochastic rounding of the update, int8 state surviving
torch's cast on load), the guard, copies and pickles, and bytes of state per parameter.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from _torch_helpers import fresh_seed, rel_diff
from torch import nn

import adamkit.torch as at
from adamkit.formats.int8_blockwise import max_half_gap
from adamkit.testing import cases_for
from adamkit.torch import formats as tf
from adamkit.torch.guarded import TorchSnapshot

STATES = [None, "fp32", "bf16", "int8"]
TRACK_TOL = {"fp32": 5e-6, "bf16": 0.03, "int8": 0.15}
LOSS_TOL = {"fp32": 1e-5, "bf16": 0.005, "int8": 0.03}


def _model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    # 64 x 96 = 6144 weights: int8 codes; the second layer (288) and the biases stay float32
    return nn.Sequential(nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 3)).to(dtype)


def _data(seed: int, steps: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 3, generator=gen)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 96, generator=gen)
        out.append((x.to(dtype), torch.tanh(x @ w / 10).to(dtype)))
    return out


def _train(model, opt, data, closure=False):
    losses = []
    for x, y in data:

        def loss_fn(x=x, y=y):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        if closure:
            losses.append(opt.step(loss_fn).item())
        else:
            losses.append(loss_fn().item())
            opt.step()
    return losses


def _decoded(opt, p, role):
    """A moment of ``p`` as float64, decoded from whatever format holds it."""
    entry = opt.state[p]
    parsed = tf.parse_entry(entry, tuple(p.shape), None, role == "max_exp_avg_sq", "test")
    source = parsed.moments[role]
    if isinstance(source, torch.Tensor):
        return source.double()
    return torch.from_numpy(np.asarray(tf._values(parsed, role), dtype=np.float64))


# -- against torch.optim.Adam and full-precision state ------------------------------------------


@pytest.mark.parametrize("case", cases_for("torch"), ids=lambda c: c.id)
def test_fp32_state_follows_torch_adam(case):
    seed = fresh_seed()
    name, kwargs = case.torch_optimizer()
    theirs_model, ours_model = _model(seed), _model(seed)
    theirs = getattr(torch.optim, name)(theirs_model.parameters(), **kwargs)
    ours = getattr(at, name)(ours_model.parameters(), **kwargs, state="fp32")
    data = _data(seed, 30)
    _train(theirs_model, theirs, data)
    _train(ours_model, ours, data)
    # float32 ulps over 30 steps; training amplifies them chaotically on some seeds, so the
    # yardstick is also torch's own fused-vs-default spread on this run (x10).
    fused_model = _model(seed)
    _train(
        fused_model,
        getattr(torch.optim, name)(fused_model.parameters(), **kwargs, fused=True),
        data,
    )
    spread = max(
        rel_diff(a, b)
        for a, b in zip(fused_model.parameters(), theirs_model.parameters(), strict=True)
    )
    tol = max(1e-5, 10 * spread)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        assert rel_diff(a, b) <= tol, f"seed={seed}: {rel_diff(a, b):.3g} > {tol:.3g}"
        assert ours.state[a]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("state", ["fp32", "bf16", "int8"])
def test_training_tracks_full_precision_state(state):
    seed = fresh_seed()
    data = _data(seed, 200)
    base_model, model = _model(seed), _model(seed)
    base = _train(base_model, at.AdamW(base_model.parameters(), lr=3e-3), data)
    losses = _train(model, at.AdamW(model.parameters(), lr=3e-3, state=state), data)
    diff = max(
        rel_diff(a, b) for a, b in zip(model.parameters(), base_model.parameters(), strict=True)
    )
    loss_diff = abs(np.mean(losses[-20:]) - np.mean(base[-20:])) / np.mean(base[-20:])
    assert diff <= TRACK_TOL[state], f"seed={seed}: parameter difference {diff:.3g}"
    assert loss_diff <= LOSS_TOL[state], f"seed={seed}: loss difference {loss_diff:.3g}"
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), f"seed={seed}: did not train"


@pytest.mark.parametrize(("state", "tol"), [("fp32", 1e-5), ("int8", 1e-2)])
def test_impl_reference_is_the_plain_path_and_fused_ones_match_it(state, tol):
    # nearest-rounding formats: the fused kernel (auto, numba) follows the plain path within the
    # kernels' float32 rounding (FMA; an int8 code may land on its neighbour at a rounding
    # boundary: adamkit.kernels.numba_formats), here over 5 AMSGrad steps.
    pytest.importorskip("numba", reason="the fused kernels need numba (adamkit[fast])")
    seed = fresh_seed()
    data = _data(seed, 5)
    models = {impl: _model(seed) for impl in ("auto", "numba", "reference")}
    for impl, model in models.items():
        _train(
            model, at.Adam(model.parameters(), lr=1e-2, amsgrad=True, state=state, impl=impl), data
        )
    for impl in ("auto", "numba"):
        for a, b in zip(models[impl].parameters(), models["reference"].parameters(), strict=True):
            assert rel_diff(a, b) <= tol, f"seed={seed} {impl}: {rel_diff(a, b):.3g}"


def test_options_schedulers_and_closures_with_int8():
    # AMSGrad, maximize (of the negated loss), decoupled decay, a scheduler and closures together
    seed = fresh_seed()
    data = _data(seed, 60)
    runs = {}
    for state in ("fp32", "int8"):
        model = _model(seed)
        opt = at.AdamW(model.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.1, state=state)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        losses = []
        for x, y in data:

            def closure(model=model, x=x, y=y, opt=opt):
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                return loss

            losses.append(opt.step(closure).item())
            sched.step()
        runs[state] = (model, opt, losses)
    (m32, _, l32), (m8, opt8, l8) = runs["fp32"], runs["int8"]
    weight = m8[0].weight
    assert opt8.state[weight]["max_exp_avg_sq"].dtype == torch.uint8
    assert opt8.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    # largest measured over 10 seeds: 0.059 and 0.014
    diff = max(rel_diff(a, b) for a, b in zip(m8.parameters(), m32.parameters(), strict=True))
    assert diff <= 0.15, f"seed={seed}"
    assert abs(l8[-1] - l32[-1]) <= 0.1 * l32[-1], f"seed={seed}"
    # maximize=True on the negated loss is the same optimization
    model = _model(seed)
    opt = at.Adam(model.parameters(), lr=1e-2, maximize=True, state="int8")
    for x, y in data[:10]:
        opt.zero_grad()
        (-((model(x) - y) ** 2).mean()).backward()
        opt.step()
    ref = _model(seed)
    opt_ref = at.Adam(ref.parameters(), lr=1e-2, state="int8")
    _train(ref, opt_ref, data[:10])
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


# -- state dicts ---------------------------------------------------------------------------------


def _trained(state, seed, steps=5, amsgrad=True, dtype=torch.float32, **kwargs):
    model = _model(seed, dtype)
    opt = at.Adam(model.named_parameters(), lr=1e-2, amsgrad=amsgrad, state=state, **kwargs)
    _train(model, opt, _data(seed, steps, dtype))
    return model, opt


def _bound(target, values, role):
    """Largest error of storing ``values`` in ``target`` (per tensor, as max|x| multiples)."""
    scale = values.abs().max().item()
    if target in (None, "fp32"):
        return 1e-7 * scale
    if target == "bf16":
        return 2**-7 * scale
    if role == "exp_avg":
        return (max_half_gap(True) + 2**-22) * scale
    root = scale**0.5  # second moments are stored as sqrt(v)
    return ((root * (1 + max_half_gap(False) + 2**-22)) ** 2 - scale) * 1.01


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("target", STATES, ids=str)
@pytest.mark.parametrize("source", STATES, ids=str)
def test_state_dict_converts_between_formats(source, target):
    seed = fresh_seed()
    model, opt = _trained(source, seed)
    saved = roundtrip(opt.state_dict())
    other_model = copy.deepcopy(model)
    other = at.Adam(other_model.named_parameters(), lr=1e-2, amsgrad=True, state=target)
    other.load_state_dict(saved)
    weight, other_weight = model[0].weight, other_model[0].weight
    for role in tf.ROLES:
        before, after = _decoded(opt, weight, role), _decoded(other, other_weight, role)
        err = (after - before).abs().max().item()
        assert err <= _bound(target, before, role), f"seed={seed} {role}: {err:.3g}"
        if target == source:
            assert torch.equal(after, before)
    assert other.state[other_weight].get(tf.FORMAT_KEY) == target
    assert other.param_groups[0]["state"] == target  # the optimizer's, not the checkpoint's
    _train(other_model, other, _data(seed + 1, 2))  # and it keeps training


def test_torch_adam_state_dict_into_int8_and_back():
    seed = fresh_seed()
    model = _model(seed)
    theirs = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, theirs, _data(seed, 5))
    ours = at.Adam(model.parameters(), lr=1e-2, state="int8")
    ours.load_state_dict(theirs.state_dict())
    weight = model[0].weight
    assert ours.state[weight]["exp_avg"].dtype == torch.uint8
    for role in ("exp_avg", "exp_avg_sq"):
        expected = theirs.state[weight][role].double()
        err = (_decoded(ours, weight, role) - expected).abs().max().item()
        assert err <= _bound("int8", expected, role)
    _train(model, ours, _data(seed + 1, 3))
    back = torch.optim.Adam(model.parameters(), lr=1e-2)
    back.load_state_dict(tf.dense_state_dict(ours.state_dict()))
    for role in ("exp_avg", "exp_avg_sq"):
        assert back.state[weight][role].dtype == torch.float32
        assert torch.equal(back.state[weight][role].double(), _decoded(ours, weight, role))
    assert back.state[weight]["step"].item() == 8
    _train(model, back, _data(seed + 2, 1))


def test_bf16_params_with_int8_state_survive_torchs_cast_on_load():
    # torch.optim.Optimizer.load_state_dict casts every floating state tensor to the parameter's
    # dtype (float32 scales to bfloat16!); the optimizer re-applies the format after loading.
    seed = fresh_seed()
    model, opt = _trained("int8", seed, dtype=torch.bfloat16)
    straight = copy.deepcopy(model)
    straight_opt = at.Adam(straight.named_parameters(), lr=1e-2, amsgrad=True, state="int8")
    straight_opt.load_state_dict(opt.state_dict())
    saved = roundtrip(opt.state_dict())
    resumed = copy.deepcopy(model)
    resumed_opt = at.Adam(resumed.named_parameters(), lr=1e-2, amsgrad=True, state="int8")
    resumed_opt.load_state_dict(saved)
    weight = resumed[0].weight
    assert resumed_opt.state[weight]["exp_avg_scale"].dtype == torch.float32
    assert torch.equal(
        resumed_opt.state[weight]["exp_avg_scale"], saved["state"][0]["exp_avg_scale"]
    )
    data = _data(seed + 1, 3, torch.bfloat16)
    _train(straight, straight_opt, data)
    _train(resumed, resumed_opt, data)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b), f"seed={seed}"


@pytest.mark.parametrize("state", ["fp32", "bf16", "int8"])
def test_resume_is_exact_through_save_deepcopy_and_pickle(state):
    seed = fresh_seed()
    model, opt = _trained(state, seed, param_rounding="stochastic")
    data = _data(seed + 1, 3)
    copies = {
        "load": None,
        "deepcopy": copy.deepcopy((model, opt)),
        "pickle": pickle.loads(pickle.dumps((model, opt))),
    }
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    loaded_model = _model(seed)
    loaded_model.load_state_dict(saved["model"])
    loaded_opt = at.Adam(
        loaded_model.named_parameters(),
        lr=1e-2,
        amsgrad=True,
        state=state,
        param_rounding="stochastic",
    )
    loaded_opt.load_state_dict(saved["opt"])
    copies["load"] = (loaded_model, loaded_opt)
    _train(model, opt, data)
    for how, (m, o) in copies.items():
        _train(m, o, data)
        for a, b in zip(m.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b), f"seed={seed} {how}"


def _refuses(opt, state_dict, error, match):
    before = roundtrip(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert (
                torch.equal(after["state"][key][name], value)
                if torch.is_tensor(value)
                else (after["state"][key][name] == value)
            )
    assert after["state_rng"] == before["state_rng"]


def _set(index, key, value):
    def edit(sd):
        sd["state"][index][key] = value(sd["state"][index][key]) if callable(value) else value

    return edit


BAD = [
    (
        "codes shape",
        _set(0, "exp_avg", lambda t: t.reshape(96, 64)),
        ValueError,
        r"parameter 0 \('0.weight'\): exp_avg has shape \(96, 64\), the parameter has \(64, 96\)",
    ),
    (
        "code length",
        _set(0, "exp_avg_scale", lambda t: t[:-1]),
        ValueError,
        r"exp_avg: .*'scales' has 23 entries, expected 24",
    ),
    (
        "codes as floats",
        _set(0, "exp_avg_sq", lambda t: t.float()),
        ValueError,
        r"'codes' must be integers, got dtype float32",
    ),
    (
        "unknown format",
        _set(0, "state_format", "int4"),
        ValueError,
        r"unknown state format 'int4' \(known: 'fp32', 'bf16', 'int8'",
    ),
    (
        "extra entry",
        _set(0, "momentum_buffer", torch.zeros(1)),
        ValueError,
        r"unexpected entries \['momentum_buffer'\] in 'int8' state",
    ),
    (
        "missing scale",
        lambda sd: sd["state"][0].pop("exp_avg_scale"),
        ValueError,
        r"encoding 'dense', expected 'int8' for shape \(64, 96\)",
    ),
    (
        "negative scale",
        _set(0, "exp_avg_scale", lambda t: -t),
        ValueError,
        r"'scales' must be finite and >= 0",
    ),
    (
        "group state",
        lambda sd: sd["param_groups"][0].update(state="int4"),
        ValueError,
        r"param group 0 in the state dict: Unknown state format 'int4'",
    ),
    (
        "rng",
        lambda sd: sd.update(state_rng={"bit_generator": "PCG64", "state": 3}),
        ValueError,
        r"state_rng'\] is not a valid PCG64 state",
    ),
]


@pytest.mark.parametrize(("edit", "error", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_state_dicts_are_refused_and_change_nothing(edit, error, match):
    _, opt = _trained("int8", fresh_seed())
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    _refuses(opt, sd, error, match)


def test_non_finite_values_cannot_enter_int8():
    seed = fresh_seed()
    model, theirs = _trained(None, seed)
    sd = copy.deepcopy(theirs.state_dict())
    sd["state"][0]["exp_avg"][2, 3] = float("nan")
    _, opt = _trained("int8", seed)
    _refuses(opt, sd, ValueError, r"parameter 0: cannot convert exp_avg to 'int8' state: .*non-fin")
    # without the guard a NaN gradient is refused before anything changes
    model, opt = _trained("int8", seed, guard=False)
    before = roundtrip(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = _data(seed, 1)[0]
    ((model(x) - y) ** 2).mean().backward()
    model[2].bias.grad[0] = float("inf")
    with pytest.raises(ValueError, match="a gradient holds NaN or inf, which state='int8' cannot"):
        opt.step()
    for a, b in zip(model.parameters(), weights, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


# -- which parameters get which format ---------------------------------------------------------


class _Lm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.norm = nn.LayerNorm(64)
        self.proj = nn.Linear(64, 128)


def test_sensitive_parameters_keep_fp32_state_under_int8():
    model = _Lm()
    named = at.Adam(model.named_parameters(), state="int8")
    unnamed = at.Adam(model.parameters(), state="int8")
    marked = at.Adam(
        [
            {"params": model.embed.parameters(), "state": "fp32"},  # a group the user marks
            {"params": [*model.norm.parameters(), *model.proj.parameters()]},
        ],
        state="int8",
    )
    for opt in (named, unnamed, marked):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()

    def formats(opt):
        return {n: opt.state[p][tf.FORMAT_KEY] for n, p in model.named_parameters()}

    # named: the embedding by its name; norm scales and biases by being 1-d
    expected = {
        "embed.weight": "fp32",
        "norm.weight": "fp32",
        "norm.bias": "fp32",
        "proj.weight": "int8",
        "proj.bias": "fp32",
    }
    assert formats(named) == expected
    assert formats(marked) == expected
    assert formats(unnamed) == {**expected, "embed.weight": "int8"}  # no name: mark the group
    assert named.state[model.embed.weight]["exp_avg"].dtype == torch.float32


def test_group_state_changed_mid_run_is_re_encoded():
    seed = fresh_seed()
    model, opt = _trained("int8", seed, amsgrad=False)
    weight = model[0].weight
    before = _decoded(opt, weight, "exp_avg")
    opt.param_groups[0]["state"] = None
    _train(model, opt, _data(seed + 1, 1))
    assert tf.FORMAT_KEY not in opt.state[weight] and opt.state[weight]["exp_avg"].dtype == (
        torch.float32
    )
    opt.param_groups[0]["state"] = "bf16"
    _train(model, opt, _data(seed + 2, 1))
    assert opt.state[weight]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[weight]["step"].item() == 7 and before.shape == weight.shape


# -- bf16 parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [None, "fp32", "int8"])
def test_stochastic_rounding_keeps_updates_below_bf16_spacing(state):
    # Adam's first step moves every weight by lr = 1e-4 (then ~lr): far below half the bf16
    # spacing at 1.0 (2**-8 = 0.0039), so nearest rounding never moves the weights; stochastic
    # rounding moves them by the true amount on average.
    torch.manual_seed(fresh_seed())
    results = {}
    for rounding in ("nearest", "stochastic"):
        p = nn.Parameter(torch.ones(64, 128, dtype=torch.bfloat16))
        opt = at.Adam([p], lr=1e-4, state=state, param_rounding=rounding)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        results[rounding] = p.detach().double()
    assert torch.all(results["nearest"] == 1.0)
    mean = results["stochastic"].mean().item()
    # Each rounding adds an unbiased error of variance <= (spacing / 2)**2, spacing 2**-8 below
    # 1: after 100 steps a weight is 1 - 0.01 with a standard deviation <= 10 * 2**-9, and the
    # mean of 8192 weights within 5 of its standard deviations.
    sigma = 10 * 2**-9 / (64 * 128) ** 0.5
    assert abs(mean - (1.0 - 100 * 1e-4)) <= 5 * sigma


def test_bf16_params_with_fp32_state_are_independent_of_the_param_dtype():
    p = nn.Parameter(torch.ones(64, 128, dtype=torch.bfloat16))
    opt = at.Adam([p], state="fp32")
    p.grad = torch.full_like(p, 3.0)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.all(opt.state[p]["exp_avg"] == 0.1 * 3.0)  # float32 value of (1 - 0.9) * 3


# -- the guard, errors, gradients, memory ------------------------------------------------------


def test_guard_all_with_int8_skips_non_finite_and_snapshots_restore():
    seed = fresh_seed()
    model = _model(seed)
    opt = at.Adam(model.parameters(), lr=1e-2, state="int8", guard="all")  # update_clip="rms"
    data = _data(seed, 6)
    _train(model, opt, data[:3])
    snap = TorchSnapshot.take(opt)
    kept = roundtrip(opt.state_dict())
    x, y = data[3]
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[1, 1] = float("nan")
    with pytest.warns(Warning, match="non-finite"):
        opt.step()
    assert not opt.last_step_applied
    _train(model, opt, data[4:])
    assert opt.state[model[0].weight]["step"].item() == 5
    snap.restore(opt)
    restored = opt.state_dict()
    for key, entry in kept["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(restored["state"][key][name], value), name


def test_errors_for_devices_dtypes_and_impl():
    meta = nn.Parameter(torch.zeros(4, device="meta"))
    with pytest.raises(NotImplementedError, match="state='int8' needs CPU tensors for now"):
        at.Adam([meta], state="int8")
    with pytest.raises(ValueError, match="impl='torch' has no step for state='bf16'"):
        at.Adam([nn.Parameter(torch.zeros(4))], state="bf16", impl="torch")
    with pytest.raises(ValueError, match=r"Unknown state format 'int4' \(state must be None"):
        at.AdamW([nn.Parameter(torch.zeros(4))], state="int4")
    with pytest.raises(ValueError, match="param_rounding must be one of 'nearest', 'stochastic'"):
        at.Adam([nn.Parameter(torch.zeros(4))], param_rounding="up")
    with pytest.raises(NotImplementedError, match="float16 is not supported"):
        at.Adam([nn.Parameter(torch.zeros(4, dtype=torch.float16))], param_rounding="stochastic")
    with pytest.raises(TypeError, match="needs real floating parameters"):
        at.Adam([torch.zeros(4, dtype=torch.complex64, requires_grad=True)], state="fp32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("state", ["fp32", "bf16", "int8"])
def test_gradients_are_never_written(state, dtype):
    seed = fresh_seed()
    model = _model(seed, dtype)
    opt = at.Adam(model.parameters(), state=state, weight_decay=0.1, maximize=True, amsgrad=True)
    x, y = _data(seed, 1, dtype)[0]
    ((model(x) - y) ** 2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.step()
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


def test_state_bytes_per_parameter():
    # a large layout: a 1024 x 1024 weight, measured from the tensors' storages after a step
    per_param = {}
    for state in STATES:
        p = nn.Parameter(torch.zeros(1024, 1024))
        opt = at.Adam([p], state=state)
        p.grad = torch.ones_like(p)
        opt.step()
        per_param[state] = opt.state_nbytes() / p.numel()
    assert per_param[None] == pytest.approx(8.0, abs=1e-5)  # + the 4-byte step
    assert per_param["fp32"] == pytest.approx(8.0, abs=1e-5)
    assert per_param["bf16"] <= 4.05
    assert per_param["int8"] <= 2.15
    assert per_param["int8"] == pytest.approx(2 + 2 * 4 / 256, abs=1e-5)
