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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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

# torch's ZeroRedundancyOptimizer.load_state_dict puts this rank's entries into the adamkit
# optimizer as they are, then also runs torch.optim.Optimizer.load_state_dict on the wrapper,
# which keeps in the wrapper's own ``.state`` a copy cast to the parameter's dtype: the uint8
# codes become float32 (4 bytes per element, more than the whole int8 state).
ZERO_LOAD_CASTS_CODES = (
    "torch ZeroRedundancyOptimizer.load_state_dict keeps a float32 cast of this rank's int8 "
    "codes in the wrapper's .state (unused by adamkit, but held): ~4x the compressed state"
)
FSDP2_STORED_STATE = (
    "adamkit.torch: a state format (state='int8' etc.) refuses DTensor parameters with "
    "NotImplementedError (formats.check_stored_params), so FSDP2 cannot use compressed state"
)

# Global batch per step; every world size used here divides it.
BATCH = 8
IN_FEATURES = 16
OUT_FEATURES = 3
HIDDEN = 32
# Cases with a quantized state format use a wider model: int8 keeps float32 moments for tensors
# under 4096 elements (adamkit.formats.MIN_QUANTIZED_SIZE), so at HIDDEN = 32 nothing would be
# quantized.  At 64 the two 64 x 64 weights hold uint8 codes and block scales.
QUANTIZED_HIDDEN = 64
# torch.manual_seed under which every process builds the optimizer, so the single-process
# reference rounds bf16 state with the same bits (under a process group the optimizer takes
# rank 0's seed anyway: see the "adam-bf16-unseeded" case).
OPTIMIZER_TORCH_SEED = 20240613


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
    # Scenarios the case runs in (None: all of SCENARIOS); names outside SCENARIOS select
    # dedicated tests (e.g. "ddp-replicas").
    scenarios: tuple[str, ...] | None = None
    hidden: int = HIDDEN
    # Build the optimizer under torch.manual_seed(OPTIMIZER_TORCH_SEED) in every process.
    seeded: bool = True

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return getattr(at, self.optimizer)

    @property
    def flattens(self) -> bool:
        """Whether DCP checkpoints of this case can use ``flatten_optimizer_state_dict=True``:
        not with a state format, whose ``state_format`` string torch's flattening refuses."""
        return self.kwargs.get("state") is None

    def runs_in(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios

    @contextmanager
    def seeding(self) -> Iterator[None]:
        """Where to build the optimizer (directly or through a wrapper such as ZeRO): the same
        torch seed in every process when ``seeded``; the global RNG is restored after."""
        if not self.seeded:
            yield
            return
        with torch.random.fork_rng():
            torch.manual_seed(OPTIMIZER_TORCH_SEED)
            yield

    def make(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        with self.seeding():
            return self.optimizer_class(params, **self.kwargs)

    def model(self, seed: int) -> nn.Module:
        return make_model(seed, self.hidden)


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
    # Stored state formats (adamkit.torch.formats).  FSDP2's parameters are DTensors, which the
    # stored-state step does not take (adamkit.torch.formats.check_stored_params).
    DistCase(
        "adam-fp32-state",
        "Adam",
        {"lr": 1e-2, "state": "fp32"},
        scenarios=("ddp", "dcp-ddp"),
    ),
    DistCase(
        "adam-bf16-state",
        "Adam",
        {"lr": 1e-2, "state": "bf16"},
        scenarios=("ddp",),
        hidden=QUANTIZED_HIDDEN,
    ),
    DistCase(
        "adamw-int8-state",
        "AdamW",
        {"lr": 1e-2, "weight_decay": 0.1, "state": "int8"},
        xfail={
            "fsdp2": FSDP2_STORED_STATE,
            "dcp-fsdp2": FSDP2_STORED_STATE,
            "zero-load-bytes": ZERO_LOAD_CASTS_CODES,
        },
        hidden=QUANTIZED_HIDDEN,
    ),
    # Like adam-bf16-state, but each process keeps torch's own (per-process random) seed.
    DistCase(
        "adam-bf16-unseeded",
        "Adam",
        {"lr": 1e-2, "state": "bf16"},
        scenarios=("ddp-replicas",),
        hidden=QUANTIZED_HIDDEN,
        seeded=False,
    ),
]
CASE_BY_ID = {case.id: case for case in CASES}


def case_ids(*scenarios: str) -> list[str]:
    """Ids of the cases that run in any of ``scenarios`` (what a launch is given)."""
    return [case.id for case in CASES if any(case.runs_in(s) for s in scenarios)]


def case_params(scenario: str, engine_xfail: str | None = None) -> list[Any]:
    """``pytest.param`` per case id that runs in ``scenario``, with the table's expected
    failures (``engine_xfail``: a reason that applies to every case)."""
    import pytest  # here: the rank processes import this module too and need no pytest

    params = []
    for case in CASES:
        if not case.runs_in(scenario):
            continue
        reason = case.xfail.get(scenario, engine_xfail)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case.id, id=case.id, marks=marks))
    return params


def fresh_seed() -> int:
    """A new seed per test run; tests print it in their failure messages."""
    return secrets.randbits(31)


def make_model(seed: int, hidden: int = HIDDEN) -> nn.Module:
    """The same small MLP for a given seed in every process (global RNG left untouched).

    Sizes are chosen so that ZeRO's greedy partition is roughly balanced on 2 ranks and that
    FSDP2 shards the last layer unevenly (3 rows on 2 ranks).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(IN_FEATURES, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, OUT_FEATURES),
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


def full(tensor: Any) -> Any:
    """The whole tensor (gathered from all ranks for a DTensor), detached, on the CPU; anything
    that is not a tensor (a stored format's ``state_format`` string) as it is."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
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
    model = case.model(seed)
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


def assert_close_dicts(got: dict[str, Any], want: dict[str, Any], tol: float, what: str) -> None:
    """Same keys, every tensor within ``tol`` relative difference (see :func:`rel_diff`) and
    every other value (a ``state_format`` string) equal.  Integer tensors (int8 codes) take
    the same measure: a code off by one is far above any float tolerance used here."""
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
    plain = {k for k, v in want.items() if not isinstance(v, torch.Tensor)}
    unequal = {k: (got[k], want[k]) for k in plain if got[k] != want[k]}
    assert not unequal, f"{what}: values differ (got, want): {unequal}"
    worst = {key: rel_diff(got[key], want[key]) for key in want if key not in plain}
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
        dtypes = {
            k: (got[name][k].dtype, v.dtype)
            for k, v in moments.items()
            if isinstance(v, torch.Tensor) and got[name][k].dtype != v.dtype
        }
        assert not dtypes, f"{what} {name}: dtypes differ (got, want): {dtypes}"
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
            if isinstance(value, torch.Tensor):
                same = isinstance(first[name], torch.Tensor) and torch.equal(value, first[name])
            else:
                same = value == first[name]
            assert same, f"{key} {name}: rank {rank} differs"


def assert_moved(
    seed: int, params: dict[str, torch.Tensor], tol: float, hidden: int = HIDDEN
) -> None:
    """Guard against a comparison that cannot fail: training moved every tensor far beyond
    ``tol`` from its initial value (``hidden``: the model's width, see :class:`DistCase`)."""
    initial = param_snapshot(make_model(seed, hidden))
    moved = min(rel_diff(params[name], value) for name, value in initial.items())
    assert moved > 100 * tol, f"seed {seed}: the run hardly moved the parameters ({moved:g})"
