"""adamkit.numpy.Adam / AdamW behaviour: follows the reference step, groups, dtypes, schedules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _numpy_helpers import grouped, make_grads, make_params

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import adam_step, init_state
from adamkit.kernels import numba_available
from adamkit.numpy import Adam, AdamW
from adamkit.testing import assert_trees_equal, rel_diff, seeded_rng


def _group_hp(group):
    beta1, beta2 = group["betas"]
    keys = ("lr", "eps", "weight_decay", "amsgrad", "maximize", "bias_correction")
    return AdamHyperParams(
        beta1=beta1,
        beta2=beta2,
        decoupled_weight_decay=group["decoupled_weight_decay"],
        **{k: group[k] for k in keys},
    )


# impl="reference" is the spec itself, so the bookkeeping must reproduce it bit for bit; a fused
# kernel (impl="auto" uses numba when installed) rounds differently: relative tolerance per dtype.
IMPL_TOL = {"reference": (0.0, 0.0), "auto": (1e-12, 1e-5)}


@pytest.mark.parametrize("impl", list(IMPL_TOL))
def test_each_parameter_follows_the_reference_step(impl):
    # per-group hyper-parameters, per-parameter step counts, in-place views, 0-d and empty arrays
    rng = seeded_rng("follows-reference", impl)
    big = rng.standard_normal((6, 5))
    params = [*make_params(rng), big[::2, 1:].T, big[1::2, 0]]  # two non-contiguous views
    groups = [*grouped(params[:6]), {"params": params[6:], "name": "views", "lr": 0.05}]
    opt = Adam(groups, impl=impl)
    hps = [_group_hp(g) for g in opt.param_groups for _ in g["params"]]
    ref = [p.copy() for p in params]
    states = [init_state(p, amsgrad=hp.amsgrad) for p, hp in zip(params, hps, strict=True)]
    for t in range(1, 16):
        grads = make_grads(rng, params)
        grads[1 + t % 3] = None
        opt.step(grads)
        for i, g in enumerate(grads):
            if g is not None:
                ref[i], states[i] = adam_step(ref[i], g, states[i], hps[i])
    for i, (p, r, s) in enumerate(zip(params, ref, states, strict=True)):
        tol = IMPL_TOL[impl][p.dtype == np.float32]
        assert p.dtype == r.dtype and opt.state[i]["step"] == s.step, i
        assert rel_diff(p, r) <= tol, i
        assert rel_diff(opt.state[i]["exp_avg"], s.exp_avg) <= tol, i
        assert rel_diff(opt.state[i]["exp_avg_sq"], s.exp_avg_sq) <= tol, i
        if s.max_exp_avg_sq is not None:
            assert rel_diff(opt.state[i]["max_exp_avg_sq"], s.max_exp_avg_sq) <= tol, i
    assert np.array_equal(big[::2, 1:].T, params[6])  # the updates landed in the base array


def test_hyperparameter_changes_between_steps_take_effect():
    rng = seeded_rng("schedule")
    w = rng.standard_normal(4)
    ref = w.copy()
    opt = Adam([w], lr=0.1)
    state = init_state(ref)
    hp = AdamHyperParams(lr=0.1)
    changes = {3: {"lr": 0.01}, 5: {"betas": (0.5, 0.75)}, 7: {"weight_decay": 0.3}}
    for t in range(1, 10):
        if t in changes:
            opt.param_groups[0].update(changes[t])
            new = dict(changes[t])
            if "betas" in new:
                new["beta1"], new["beta2"] = new.pop("betas")
            hp = dataclasses.replace(hp, **new)
        g = rng.standard_normal(4)
        opt.step([g])
        ref, state = adam_step(ref, g, state, hp)
        assert np.array_equal(w, ref), t


def test_step_returns_none_and_never_writes_gradients():
    rng = seeded_rng("grads-untouched")
    params = make_params(rng)
    opt = Adam(grouped(params))
    grads = make_grads(rng, params)
    grads[0] = np.asfortranarray(grads[0])
    copies = [g.copy() for g in grads]
    assert opt.step(grads) is None
    assert opt.step(tuple(grads)) is None
    for g, c in zip(grads, copies, strict=True):
        assert np.array_equal(g, c)


def test_gradients_are_rounded_to_the_parameter_dtype():
    rng = seeded_rng("casting")
    w32 = rng.standard_normal(5).astype(np.float32)
    w64 = rng.standard_normal(5)
    pairs = [(w32.copy(), w64.copy()), (w32.copy(), w64.copy()), (w32.copy(), w64.copy())]
    g64 = rng.standard_normal(5)
    cast = Adam(list(pairs[0]))
    cast.step([g64, g64.astype(np.float16)])
    exact = Adam(list(pairs[1]))
    exact.step([g64.astype(np.float32), g64.astype(np.float16).astype(np.float64)])
    for a, b in zip(pairs[0], pairs[1], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert cast.state[0]["exp_avg"].dtype == np.float32


def test_a_gradient_that_is_its_parameter_acts_like_a_copy():
    w = np.linspace(-1.0, 1.0, 5)
    v = w.copy()
    Adam([w], lr=0.1).step([w])
    Adam([v], lr=0.1).step([v.copy()])
    assert np.array_equal(w, v)


def test_non_finite_gradients_are_not_an_input_error():
    w = np.zeros(3)
    opt = Adam([w])
    with np.errstate(invalid="ignore"):
        opt.step([np.array([np.nan, np.inf, 1.0])])
    assert np.isnan(w[0]) and np.isnan(w[1]) and w[2] == pytest.approx(-1e-3)


def test_gradients_by_group_name_equal_gradients_in_order():
    rng = seeded_rng("by-name")
    a, b = make_params(rng), None
    b = [p.copy() for p in a]
    by_list, by_name = Adam(grouped(a)), Adam(grouped(b))
    for _ in range(3):
        grads = make_grads(rng, a)
        grads[3] = None
        by_list.step(grads)
        by_name.step({"head": grads[2:4], "extra": tuple(grads[4:]), "encoder": grads[:2]})
    assert_trees_equal(by_name.state_dict(), by_list.state_dict())
    for p, q in zip(a, b, strict=True):
        assert np.array_equal(p, q)


def test_adamw_is_adam_with_decoupled_decay_and_torch_defaults():
    rng = seeded_rng("adamw")
    a = rng.standard_normal(6)
    b = a.copy()
    w, v = AdamW([a], lr=0.05), Adam([b], lr=0.05, weight_decay=1e-2, decoupled_weight_decay=True)
    for _ in range(5):
        g = rng.standard_normal(6)
        w.step([g])
        v.step([g])
    assert np.array_equal(a, b)
    assert isinstance(w, Adam)
    assert w.defaults == {**v.defaults}
    assert w.defaults["weight_decay"] == 1e-2 and w.defaults["decoupled_weight_decay"] is True
    assert repr(w).startswith("AdamW (")


def test_groups_are_normalised_and_default_from_the_constructor():
    w, b = np.zeros(2), np.zeros(3, dtype=np.float32)
    opt = Adam(
        [{"params": w, "lr": np.float32(0.5), "betas": [0, 0.5]}, {"params": (x for x in [b])}],
        eps=1e-6,
    )
    first, second = opt.param_groups
    assert first["params"][0] is w and second["params"][0] is b
    assert first["lr"] == 0.5 and type(first["lr"]) is float and first["betas"] == (0.0, 0.5)
    assert first["eps"] == second["eps"] == 1e-6 and second["lr"] == 1e-3
    assert first["name"] is None and second["amsgrad"] is False


def test_state_is_created_lazily_per_parameter_and_add_param_group_continues_indices():
    rng = seeded_rng("lazy")
    w, b, extra = rng.standard_normal(3), rng.standard_normal(2), rng.standard_normal(4)
    opt = Adam([w, b])
    assert len(opt.state) == 0
    opt.step([rng.standard_normal(3), None])
    assert list(opt.state) == [0] and opt.state[0]["step"] == 1
    opt.add_param_group({"params": [extra], "name": "late", "amsgrad": True})
    opt.step([None, rng.standard_normal(2), rng.standard_normal(4)])
    assert {i: s["step"] for i, s in opt.state.items()} == {0: 1, 1: 1, 2: 1}
    assert "max_exp_avg_sq" in opt.state[2] and "max_exp_avg_sq" not in opt.state[0]
    with pytest.raises(TypeError):
        opt.state[0] = {}  # the mapping is a read-only view


def test_repr_lists_groups_like_torch():
    opt = Adam([{"params": [np.zeros((2, 3))], "name": "enc"}, {"params": [np.zeros(())]}])
    text = repr(opt)
    assert text.splitlines()[:2] == ["Adam (", "Parameter Group 0"]
    assert "    name: enc" in text and "    lr: 0.001" in text and "Parameter Group 1" in text
    assert "    params: 1 arrays, 6 elements" in text and text.endswith(")")


@pytest.mark.skipif(not numba_available(), reason="impl='numba' needs numba: pip install numba")
def test_impl_numba_takes_only_c_contiguous_parameters():
    big = np.zeros((4, 4))
    w = np.zeros(3)
    with pytest.raises(
        TypeError, match=r"param_groups\[0\]\['params'\]\[1\] must be a C-contiguous"
    ):
        Adam([w, big.T], impl="numba")
    opt = Adam([w, np.zeros((2, 2), order="C")], impl="numba", lr=0.1)
    opt.step([np.ones(3), np.asfortranarray(np.ones((2, 2)))])  # gradients are made contiguous
    assert np.allclose(w, -0.1)
