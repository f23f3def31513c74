"""What the distributed tests share between the test process and the rank processes.

Both sides rebuild the model and the data from one seed, so nothing but the seed and the case
ids crosses the process boundary on the way in.  Each rank takes an equal slice of every global
batch.  The single-process reference trains the same model on the same global batches with
gradient accumulation over those slices (loss / world size per slice), the standard equivalent
of data parallelism: with 2 ranks it adds the same float32 numbers as DDP's and FSDP2's
averaging (halving is exact, and a two-term sum does not depend on order), so the parameters can
be compared tightly.  A reference on the whole batch at once would not do: its gradients differ
in the last bits, and Adam's ``m / (sqrt(v) + eps)`` turns a rounding difference in a gradient
near zero into a different step (measured: up to 5e-4 relative after 4 steps, over 300 seeds).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

import adamkit.torch as at

SCENARIOS = ("ddp", "zero", "fsdp2", "dcp-fsdp2", "dcp-ddp")

# Global batch per step; every world size used here divides it.
BATCH = 8
IN_FEATURES = 16
OUT_FEATURES = 3


@dataclass(frozen=True)
class DistCase:
    """One optimizer configuration run under every scenario of :data:`SCENARIOS`.

    ``xfail`` maps a scenario to the reason it cannot pass yet (the tests mark it
    ``xfail(strict=True)``, so it turns into a failure once fixed and the entry must go).
    State formats and the stability guard join as more cases (their keyword arguments in
    ``kwargs``) once adamkit.torch accepts them.
    """

    id: str
    optimizer: str  # "Adam" or "AdamW", a class of adamkit.torch
    kwargs: dict[str, Any] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return getattr(at, self.optimizer)

    def make(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        return self.optimizer_class(params, **self.kwargs)


CASES: list[DistCase] = [
    DistCase("adam", "Adam", {"lr": 1e-2}),
    DistCase("adamw", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    DistCase(
        "adam-amsgrad-l2",
        "Adam",
        {"lr": 5e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True},
    ),
    DistCase(
        "adamw-independent",
        "AdamW",
        {"lr": 1e-2, "weight_decay": 1e-2, "decay_mode": "independent"},
    ),
    DistCase(
        "adam-impl-reference",
        "Adam",
        {"lr": 1e-2, "impl": "reference"},
    ),
]
CASE_BY_ID = {case.id: case for case in CASES}


def case_params(scenario: str, engine_xfail: str | None = None) -> list[Any]:
    """``pytest.param`` per case id for ``scenario``, with the table's expected failures
    (``engine_xfail``: a reason that applies to every case)."""
    import pytest  # here: the rank processes import this module too and need no pytest

    params = []
    for case in CASES:
        reason = case.xfail.get(scenario, engine_xfail)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case.id, id=case.id, marks=marks))
    return params


def fresh_seed() -> int:
    """A new seed per test run; tests print it in their failure messages."""
    return secrets.randbits(31)


def make_model(seed: int) -> nn.Module:
    """The same small MLP for a given seed in every process (global RNG left untouched).

    Sizes are chosen so that ZeRO's greedy partition is roughly balanced on 2 ranks and that
    FSDP2 shards the last layer unevenly (3 rows on 2 ranks).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(IN_FEATURES, 32),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Linear(32, OUT_FEATURES),
        )


def make_batches(seed: int, steps: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches ``start .. start + steps - 1`` of the run with ``seed``."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for index in range(start + steps):
        x = torch.randn(BATCH, IN_FEATURES, generator=gen)
        y = torch.randn(BATCH, OUT_FEATURES, generator=gen)
        if index >= start:
            out.append((x, y))
    return out


def rank_slice(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[Any, ...]:
    """This rank's equal share of a global batch."""
    size = BATCH // world_size
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any], micro: int = 1
) -> None:
    """One step per batch; with ``micro > 1`` the gradient is accumulated over ``micro`` equal
    slices of the batch, each loss divided by ``micro`` (what ``micro`` ranks compute)."""
    for batch in batches:
        optimizer.zero_grad()
        for index in range(micro):
            x, y = rank_slice(batch, index, micro) if micro > 1 else batch
            loss = loss_fn(model, x, y)
            (loss / micro if micro > 1 else loss).backward()
        optimizer.step()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from all ranks for a DTensor), detached, on the CPU."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def param_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p) for name, p in model.named_parameters()}


def state_snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state per parameter name (whole tensors), for parameters that have state."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if state:
            out[name] = {key: full(value) for key, value in state.items()}
    return out


def reference_run(
    case: DistCase, seed: int, steps: int, world_size: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The single-process run every distributed result is compared with (see the module
    docstring): ``steps`` steps, gradients accumulated over ``world_size`` slices per batch."""
    model = make_model(seed)
    optimizer = case.make(model.named_parameters())
    train(model, optimizer, make_batches(seed, steps), micro=world_size)
    return model, optimizer


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, flatten: bool
) -> None:
    """Model and optimizer state through ``get_state_dict`` into a DCP checkpoint at ``path``
    (collective when a process group is up; a plain single-process save otherwise)."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, flatten: bool
) -> None:
    """The counterpart of :func:`save_checkpoint`, resharding to however many ranks load it."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 (the absolute difference when ``b`` is all zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.shape != b64.shape:
        raise AssertionError(f"shapes differ: {tuple(a64.shape)} vs {tuple(b64.shape)}")
    if b64.numel() == 0:
        return 0.0
    scale = b64.abs().max().item()
    diff = (a64 - b64).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close_dicts(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float, what: str
) -> None:
    """Same keys, and every tensor within ``tol`` relative difference (see :func:`rel_diff`)."""
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
    worst = {key: rel_diff(got[key], want[key]) for key in want}
    bad = {key: value for key, value in worst.items() if value > tol}
    assert not bad, f"{what}: relative differences above {tol:g}: {bad}"


def assert_state_matches(
    got: dict[str, dict[str, torch.Tensor]],
    want: dict[str, dict[str, torch.Tensor]],
    tol: float,
    what: str,
) -> None:
    """Same parameters and keys; ``step`` equal, moments within ``tol``."""
    assert got.keys() == want.keys(), f"{what}: state for {sorted(got)}, expected {sorted(want)}"
    for name, state in want.items():
        assert got[name].keys() == state.keys(), f"{what} {name}: keys {sorted(got[name])}"
        assert float(got[name]["step"]) == float(state["step"]), f"{what} {name}: step"
        moments = {k: v for k, v in state.items() if k != "step"}
        assert_close_dicts(
            {k: got[name][k] for k in moments}, moments, tol, f"{what} state of {name}"
        )


def rank_results(ranks: list[dict[str, Any]], case_id: str) -> list[dict[str, Any]]:
    """Every rank's result for ``case_id``; fails with the traceback of a rank where it raised."""
    results = [rank[case_id] for rank in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"{case_id} raised on rank {rank}:\n{result['error']}"
    return results


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def assert_replicas_equal(results: list[dict[str, Any]], key: str = "params") -> None:
    """Tensors under ``results[rank][key]`` (nested dicts allowed) are bit-identical on every
    rank."""
    first = _flat(results[0][key])
    for rank, result in enumerate(results[1:], start=1):
        mine = _flat(result[key])
        assert mine.keys() == first.keys(), f"{key}: rank {rank} has {sorted(mine)}"
        for name, value in mine.items():
            assert torch.equal(value, first[name]), f"{key} {name}: rank {rank} differs"


def assert_moved(seed: int, params: dict[str, torch.Tensor], tol: float) -> None:
    """Guard against a comparison that cannot fail: training moved every tensor far beyond
    ``tol`` from its initial value."""
    initial = param_snapshot(make_model(seed))
    moved = min(rel_diff(params[name], value) for name, value in initial.items())
    assert moved > 100 * tol, f"seed {seed}: the run hardly moved the parameters ({moved:g})"
