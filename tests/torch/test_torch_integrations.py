"""adamkit.torch with the rest of torch: lr schedulers, GradScaler, torch.compile, hooks, closures.

Each test runs the same loop with torch.optim.Adam/AdamW and asserts the same numbers.
"""

from __future__ import annotations

import pytest
import torch
from _torch_helpers import MODELS, batches, fresh_seed, loss_fn, max_rel_diff, twin
from torch.optim import lr_scheduler

import adamkit.torch as at

SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=15),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
}


def _run_with_scheduler(model, optimizer, scheduler, data):
    """Returns the (lr, beta1) each step used."""
    used = []
    for x, y in data:
        group = optimizer.param_groups[0]
        used.append((float(group["lr"]), group["betas"][0]))
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(loss.item() + 1.0)  # never improving much: lr keeps dropping
        else:
            scheduler.step()
    return used


# impl="torch" is bit-identical to torch.optim; the default (numba on CPU float32) agrees to
# rounding, see test_torch_parity.py.
IMPL_TOL = {"torch": 0.0, "auto": 1e-6}


@pytest.mark.parametrize("impl", list(IMPL_TOL))
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize(
    ("torch_cls", "ours"),
    [(torch.optim.Adam, at.Adam), (torch.optim.AdamW, at.AdamW)],
    ids=["Adam", "AdamW"],
)
def test_scheduler_sequence_and_params_match_torch(name, torch_cls, ours, impl):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, shape = MODELS["mlp"]
    theirs_model = make(gen)
    ours_model = twin(theirs_model)
    data = batches(gen, shape, torch.float32, 40)
    theirs = torch_cls(theirs_model.parameters(), lr=0.01)
    mine = ours(ours_model.parameters(), lr=0.01, impl=impl)
    expected = _run_with_scheduler(theirs_model, theirs, SCHEDULERS[name](theirs), data)
    used = _run_with_scheduler(ours_model, mine, SCHEDULERS[name](mine), data)
    if impl == "torch" or name != "ReduceLROnPlateau":
        assert used == expected  # ReduceLROnPlateau under "auto" reads a loss rounded differently
    assert len({lr for lr, _ in used}) > 2  # the schedule really changed lr
    if name == "OneCycleLR":
        assert len({beta1 for _, beta1 in used}) > 2  # and cycled beta1 (via group["betas"])
    assert max_rel_diff(ours_model, theirs_model) <= IMPL_TOL[impl], f"seed={seed}"


def test_tensor_lr_with_scheduler_matches_torch():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, shape = MODELS["mlp"]
    theirs_model = make(gen)
    ours_model = twin(theirs_model)
    data = batches(gen, shape, torch.float32, 12)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=torch.tensor(0.01))
    mine = at.Adam(ours_model.parameters(), lr=torch.tensor(0.01), impl="torch")
    expected = _run_with_scheduler(theirs_model, theirs, SCHEDULERS["StepLR"](theirs), data)
    used = _run_with_scheduler(ours_model, mine, SCHEDULERS["StepLR"](mine), data)
    assert used == expected
    assert isinstance(mine.param_groups[0]["lr"], torch.Tensor)
    assert max_rel_diff(ours_model, theirs_model) == 0.0, f"seed={seed}"


def _scaled_training(model, optimizer, data, inf_at):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scales = []
    for i, (x, y) in enumerate(data):
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        if i == inf_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_grad_scaler_unscales_and_skips_like_torch():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, shape = MODELS["mlp"]
    theirs_model = make(gen)
    ours_model = twin(theirs_model)
    data = batches(gen, shape, torch.float32, 12)
    mine = at.Adam(ours_model.parameters(), lr=1e-2, impl="torch")
    assert not getattr(mine, "_step_supports_amp_scaling", False)  # the scaler must unscale
    expected = _scaled_training(
        theirs_model, torch.optim.Adam(theirs_model.parameters(), lr=1e-2), data, 4
    )
    scales = _scaled_training(ours_model, mine, data, 4)
    assert scales == expected and scales[4] == scales[3] / 2  # the inf step halved the scale
    assert max_rel_diff(ours_model, theirs_model) == 0.0, f"seed={seed}"
    # the skipped step left no trace: 11 updates
    assert mine.state[next(ours_model.parameters())]["step"].item() == 11


def _compiled_vs_eager(backend, steps):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    make, shape = MODELS["mlp"]
    eager_model = make(gen)
    compiled_model = twin(eager_model)
    data = batches(gen, shape, torch.float32, steps)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}
    eager = torch.optim.AdamW(eager_model.parameters(), **kwargs)
    mine = at.AdamW(compiled_model.parameters(), **kwargs)
    torch._dynamo.reset()
    # fullgraph=True: any graph break inside the optimizer step is an error
    compiled_step = torch.compile(mine.step, fullgraph=True, backend=backend)
    for x, y in data:
        for model, opt, step in (
            (eager_model, eager, eager.step),
            (compiled_model, mine, compiled_step),
        ):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            step()
    torch._dynamo.reset()
    # traced, the bias corrections come from float64 tensor arithmetic instead of Python floats
    assert max_rel_diff(compiled_model, eager_model) <= 1e-6, f"seed={seed}"
    assert mine.state[next(compiled_model.parameters())]["step"].item() == steps


def test_compiled_step_has_no_graph_break_and_matches_eager():
    _compiled_vs_eager("eager", steps=10)


@pytest.mark.slow
def test_compiled_step_with_inductor_matches_eager():
    # generating C++ kernels takes ~10-25 s on a 2-core machine
    _compiled_vs_eager("inductor", steps=3)


def test_step_hooks_and_closure():
    model = torch.nn.Linear(3, 1)
    opt = at.Adam(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    x = torch.randn(5, 3)
    before = model.weight.detach().clone()

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():  # the closure still gets gradients
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert calls == [("pre", True), ("post", True)]
    assert not torch.equal(model.weight, before)
    assert torch.is_grad_enabled()
