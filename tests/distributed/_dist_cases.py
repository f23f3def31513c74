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
from dataclasses import dataclass, field, replace
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
from adamkit.torch.distributed import guard_checkpoint_state, load_guard_checkpoint
from adamkit.torch.formats import dense_state_dict

SCENARIOS = ("ddp", "zero", "fsdp2", "dcp-fsdp2", "dcp-ddp")


# Global batch per step; every world size used here divides it.
BATCH = 8
IN_FEATURES = 16
OUT_FEATURES = 3
HIDDEN = 32
# Cases with a quantized state format use a wider model: int8 keeps float32 moments for tensors
# under 4096 elements (adamkit.formats.MIN_QUANTIZED_SIZE), so at HIDDEN = 32 nothing would be
# quantized.  At 64 the two 64 x 64 weights hold 8-bit codes and block scales; FSDP2 on 2 ranks
# gives each rank 32 rows = 2048 elements, a whole number of blocks (of 32 or 256: block-aligned
# shards, so the sharded run is the single-process run bit for bit).
QUANTIZED_HIDDEN = 64
# 70 x 70 weights: 35 rows = 2450 elements per rank, a multiple of neither 32 nor 256, so one
# block straddles the two shards (both ranks keep its scale; adamkit.torch.sharded_blocks).
UNALIGNED_HIDDEN = 70
# See DistCase.tol (no case needs it now: unaligned int8 shards match one process at float32
# tolerance since the span layout; before it they measured at most 1.8 over 14 seeds, 4 steps).
APPROX_FACTOR = 5.0
# torch.manual_seed under which every process builds the optimizer, so the single-process
# reference rounds bf16 state with the same bits (under a process group the optimizer takes
# rank 0's seed anyway: see the "adam-bf16-unseeded" case).
OPTIMIZER_TORCH_SEED = 20240613


@dataclass(frozen=True)
class DistCase:
    """One optimizer configuration run under every scenario of :data:`SCENARIOS`.

    ``xfail`` maps a scenario to the reason it cannot pass yet (the tests mark it
    ``xfail(strict=True)``, so it turns into a failure once fixed and the entry must go).
    ``tol`` maps a scenario to a factor where the run is not the single-process one bit for bit
    (int8 blocks that straddle shards): it may differ from the single-process run by that factor
    times what the single-process run with this state format differs from one with ``fp32``
    state (:func:`approx_tolerances`), and moments are compared decoded to float32.
    """

    id: str
    optimizer: str  # "Adam" or "AdamW", a class of adamkit.torch
    kwargs: dict[str, Any] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)
    tol: dict[str, float] = field(default_factory=dict)
    # Scenarios the case runs in (None: all of SCENARIOS); names outside SCENARIOS select
    # dedicated tests (e.g. "ddp-replicas").
    scenarios: tuple[str, ...] | None = None
    hidden: int = HIDDEN
    # Build the optimizer under torch.manual_seed(OPTIMIZER_TORCH_SEED) in every process.
    seeded: bool = True
    # The model's parameters (and the data, cast in loss_fn).
    dtype: torch.dtype = torch.float32

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return getattr(at, self.optimizer)

    def runs_in(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios

    @contextmanager
    def seeding(self, torch_seed: int | None = None) -> Iterator[None]:
        """Where to build the optimizer (directly or through a wrapper such as ZeRO): the same
        torch seed in every process when ``seeded``, or ``torch_seed`` when given (the seed
        that rank 0 of an unseeded run had); the global RNG is restored after."""
        if torch_seed is None and not self.seeded:
            yield
            return
        with torch.random.fork_rng():
            torch.manual_seed(OPTIMIZER_TORCH_SEED if torch_seed is None else torch_seed)
            yield

    def make(self, params: Iterable[Any], torch_seed: int | None = None) -> torch.optim.Optimizer:
        with self.seeding(torch_seed):
            return self.optimizer_class(params, **self.kwargs)

    def model(self, seed: int) -> nn.Module:
        return make_model(seed, self.hidden, self.dtype)


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
    # Stored state formats (adamkit.torch.formats).  Under FSDP2 each rank keeps the state of its
    # shards; int8 keeps the codes of its elements and the scales of the whole tensor's blocks
    # that overlap them.
    DistCase(
        "adam-fp32-state",
        "Adam",
        {"lr": 1e-2, "state": "fp32"},
        scenarios=("ddp", "fsdp2", "dcp-ddp", "dcp-fsdp2"),
    ),
    # bf16 under FSDP2 rounds each shard with the single process's bits: every rank draws the
    # key of each parameter from the optimizer's generator as one process does, and the fused
    # kernel indexes its noise by global element position (adamkit.torch.formats.shard_rng), so
    # the run is compared at float32 tolerance like fp32 state (measured: 0).  Checkpoints carry
    # the generator (guard_checkpoint_state), so runs resume bit for bit.
    DistCase(
        "adam-bf16-state",
        "Adam",
        {"lr": 1e-2, "state": "bf16"},
        scenarios=("ddp", "fsdp2", "dcp-ddp", "dcp-fsdp2"),
        hidden=QUANTIZED_HIDDEN,
    ),
    DistCase(
        "adamw-int8-state",
        "AdamW",
        {"lr": 1e-2, "weight_decay": 0.1, "state": "int8"},
        hidden=QUANTIZED_HIDDEN,
    ),
    # Shards that are not block-aligned: rank 1's shard starts at element 2450, inside block 9,
    # which straddles the two shards.  Both ranks keep that block's (whole) scale and agree on it
    # by one all_reduce(MAX) per step (adamkit.torch.sharded_blocks), so the run is one
    # process's: compared at float32 tolerance like fp32 state (measured: 0, bit for bit).
    DistCase(
        "adamw-int8-unaligned",
        "AdamW",
        {"lr": 1e-2, "weight_decay": 0.1, "state": "int8"},
        scenarios=("fsdp2", "dcp-fsdp2"),
        hidden=UNALIGNED_HIDDEN,
    ),
    # The same with AMSGrad (a third quantized moment), blocks of 32 (int8-companded: 2450
    # elements per rank is no multiple of 32 either) and the plain decode/step/encode path on
    # both sides (the fused companded kernel decodes by a table, the codec by division, so a
    # fused one-process run would differ from the shards' dense step in the last bits).
    DistCase(
        "adam-amsgrad-int8-companded-unaligned",
        "Adam",
        {"lr": 1e-2, "amsgrad": True, "state": "int8-companded", "impl": "reference"},
        scenarios=("fsdp2", "dcp-fsdp2"),
        hidden=UNALIGNED_HIDDEN,
    ),
    # bfloat16 parameters rounded stochastically (param_rounding) with bf16 state: the shards of
    # a parameter take the single process's rounding bits too (adamkit.torch.formats.
    # round_to_bf16_ with a ShardRng), so the run is compared at float32 tolerance.
    DistCase(
        "adam-bf16-params",
        "Adam",
        {"lr": 1e-2, "state": "bf16", "param_rounding": "stochastic"},
        scenarios=("fsdp2",),
        hidden=QUANTIZED_HIDDEN,
        dtype=torch.bfloat16,
    ),
    # Like adam-bf16-state, but each process keeps torch's own (per-process random) seed: the
    # optimizer takes rank 0's (adamkit.torch.formats.new_rng), so DDP replicas round alike and
    # FSDP2 shards round with the bits of one process seeded like rank 0 (the fsdp2 test builds
    # its single-process run under rank 0's torch seed; without the common seed each shard
    # would draw other keys and the tight comparison would fail).
    DistCase(
        "adam-bf16-unseeded",
        "Adam",
        {"lr": 1e-2, "state": "bf16"},
        scenarios=("ddp-replicas", "fsdp2"),
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


def make_model(seed: int, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same small MLP for a given seed in every process (global RNG left untouched).

    Sizes are chosen so that ZeRO's greedy partition is roughly balanced on 2 ranks and that
    FSDP2 shards the last layer unevenly (3 rows on 2 ranks).  Initialised in float32, then
    cast to ``dtype``.
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
        ).to(dtype)


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
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()


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
    """Optimizer state per parameter name (whole tensors), for parameters that have state.

    adamkit optimizers: as ``state_dict()`` writes it (a collective under FSDP2 with int8
    state), whose layout does not depend on the number of ranks (the live int8 block scales of
    a shard are the rank's own); ``state_format`` is then a number."""
    if isinstance(optimizer, at.Adam):
        saved = optimizer.state_dict()["state"]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        states = {name: saved.get(index.get(id(p))) for name, p in model.named_parameters()}
    else:
        states = {name: optimizer.state.get(p) for name, p in model.named_parameters()}
    return {
        name: {key: full(value) for key, value in state.items()}
        for name, state in states.items()
        if state
    }


def is_quantized(entry: dict[str, Any]) -> bool:
    """Whether a state entry holds block-quantized moments (codes and block scales)."""
    return "exp_avg_scale" in entry


def decoded(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A :func:`state_snapshot` with compressed moments decoded to float32 (torch's layout)."""
    return dense_state_dict({"state": state})["state"]


def reference_run(
    case: DistCase, seed: int, steps: int, world_size: int, torch_seed: int | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The single-process run every distributed result is compared with (see the module
    docstring): ``steps`` steps, gradients accumulated over ``world_size`` slices per batch;
    the optimizer built under ``torch_seed`` when given (see :meth:`DistCase.seeding`)."""
    model = case.model(seed)
    optimizer = case.make(model.named_parameters(), torch_seed)
    train(model, optimizer, make_batches(seed, steps), micro=world_size)
    return model, optimizer


def state_switches(case: DistCase) -> list[str]:
    """The ``state`` that every group takes in turn mid-run, one step each (the
    ``fsdp2_convert`` scenario): ``fp32``, then the case's own again; each switch converts the
    live state (for int8 shards that straddle blocks: decoded, then re-encoded with the whole
    blocks' maxima)."""
    return ["fp32", case.kwargs["state"]]


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, flatten: bool
) -> None:
    """Model and optimizer state through ``get_state_dict`` into a DCP checkpoint at ``path``
    (collective when a process group is up; a plain single-process save otherwise), with the
    guard and the rounding generator beside them (``guard_checkpoint_state``)."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd, "guard": guard_checkpoint_state(optimizer)}
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    path: Path,
    flatten: bool,
    guard: bool = True,
) -> None:
    """The counterpart of :func:`save_checkpoint`, resharding to however many ranks load it;
    ``guard=False`` leaves the guard's entry (and the rounding generator) out."""
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
    if guard:
        load_guard_checkpoint(optimizer, checkpoint_id=str(path))


def approx_tolerances(
    case: DistCase, scenario: str, seed: int, steps: int, world_size: int
) -> tuple[float, float] | None:
    """``(parameters, decoded moments)`` tolerances of ``case`` in ``scenario`` after ``steps``
    steps (see :class:`DistCase`), or ``None`` where the run must match bit for bit."""
    if scenario not in case.tol:
        return None
    fp32 = replace(case, kwargs={**case.kwargs, "state": "fp32"}, tol={})
    model, optimizer = reference_run(case, seed, steps, world_size)
    fp32_model, fp32_optimizer = reference_run(fp32, seed, steps, world_size)
    a, b = param_snapshot(model), param_snapshot(fp32_model)
    params = max(rel_diff(a[name], b[name]) for name in a)
    sa, sb = (
        decoded(state_snapshot(model, optimizer)),
        decoded(state_snapshot(fp32_model, fp32_optimizer)),
    )
    moments = max(
        rel_diff(sa[name][key], sb[name][key]) for name in sa for key in sa[name] if key != "step"
    )
    return case.tol[scenario] * params, case.tol[scenario] * moments


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
