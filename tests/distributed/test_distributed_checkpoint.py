"""Distributed checkpoints (``torch.distributed.checkpoint`` with ``get_state_dict`` /
``set_state_dict``) of a model and its adamkit optimizer, resumed on another number of ranks.

2 -> 1: two gloo ranks (FSDP2, or DDP with the optimizer named through the wrapper) train
``STEPS`` steps and save; this process (no process group, a plain model) loads and trains
``MORE_STEPS`` more.  1 -> 2: this process trains and saves; two ranks load into a model built
from another seed (so everything must come from the checkpoint) and continue.  Both must end
where an uninterrupted single-process run ends (see _dist_cases for why that run accumulates
over the two halves of each batch), and the state right after loading must equal the saved
one.  The first direction saves the nested optimizer state dict, the second the flattened one
(``flatten_optimizer_state_dict=True``, which holds no strings: ``state_dict()`` writes
``state_format`` as a number).  Every checkpoint carries the guard and the rounding generator
beside the optimizer (``guard_checkpoint_state``), so bf16 runs resume their random stream.

Cases whose sharded run is not the single-process run bit for bit (``DistCase.tol``; none
now: unaligned int8 shards keep the whole-tensor blocks' scales, and bf16 shards round with the
single process's bits, so both are held to float32 tolerance like fp32) are compared decoded,
within their tolerance; the state loaded by one process from a 2-rank checkpoint is exactly
what the ranks saved (the checkpoint holds the single-process layout).
"""

from __future__ import annotations

import pytest
import torch
from _dist_cases import (
    CASE_BY_ID,
    approx_tolerances,
    assert_close_dicts,
    assert_moved,
    assert_replicas_equal,
    assert_state_matches,
    case_ids,
    case_params,
    decoded,
    fresh_seed,
    load_checkpoint,
    make_batches,
    param_snapshot,
    rank_results,
    reference_run,
    rel_diff,
    save_checkpoint,
    state_snapshot,
    train,
)
from _dist_launch import run_ranks

from adamkit.torch.formats import FORMAT_CODES, FORMAT_KEY

# DCP says so whenever it runs without a process group, which this process does on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning"
)

ENGINES = ("fsdp2", "ddp")
# Expected failures of every case on one engine (the table in _dist_cases has per-case ones).
ENGINE_XFAIL: dict[str, str] = {}
WORLD_SIZE = 2
STEPS = 3
MORE_STEPS = 2
# See test_distributed_ddp.py: the measured difference is 0.
TOL = 1e-6
# Every case that runs on some engine (the worker skips a case on an engine it does not run on).
CASE_IDS = case_ids(*(f"dcp-{engine}" for engine in ENGINES))


def _tolerances(case, engine: str, seed: int, steps: int) -> tuple[float, float, bool]:
    """(parameters, moments, compare decoded) for ``case`` on ``engine`` after ``steps``."""
    approx = approx_tolerances(case, f"dcp-{engine}", seed, steps, WORLD_SIZE)
    return (*approx, True) if approx else (TOL, TOL, False)


def _state_close(got, want, tol: float, decode: bool, what: str) -> None:
    if decode:
        got, want = decoded(got), decoded(want)
    assert_state_matches(got, want, tol, what)


def _engine_case_params() -> list[object]:
    return [
        pytest.param(engine, *param.values, id=f"{engine}-{param.id}", marks=param.marks)
        for engine in ENGINES
        for param in case_params(f"dcp-{engine}", ENGINE_XFAIL.get(engine))
    ]


@pytest.fixture(scope="module")
def two_to_one(tmp_path_factory):
    """Checkpoints written by two ranks, one directory per case."""
    seed = fresh_seed()
    workdir = tmp_path_factory.mktemp("dcp2to1")
    args = {
        "seed": seed,
        "steps": STEPS,
        "checkpoints": str(workdir / "checkpoints"),
        "flatten": False,
        "cases": CASE_IDS,
        "engines": list(ENGINES),
    }
    ranks = run_ranks("dcp_save", WORLD_SIZE, workdir, args)
    return seed, workdir / "checkpoints", ranks


@pytest.fixture(scope="module")
def one_to_two(tmp_path_factory):
    """Checkpoints written here by one process, and what two ranks made of them."""
    seed = fresh_seed()
    workdir = tmp_path_factory.mktemp("dcp1to2")
    checkpoints = workdir / "checkpoints"
    for case_id in CASE_IDS:
        model, optimizer = reference_run(CASE_BY_ID[case_id], seed, STEPS, WORLD_SIZE)
        save_checkpoint(model, optimizer, checkpoints / case_id, flatten=True)
    args = {
        "seed": seed,
        "steps": STEPS,
        "more_steps": MORE_STEPS,
        "checkpoints": str(checkpoints),
        "flatten": True,
        "cases": CASE_IDS,
        "engines": list(ENGINES),
    }
    return seed, run_ranks("dcp_resume", WORLD_SIZE, workdir, args)


@pytest.mark.parametrize(("engine", "case_id"), _engine_case_params())
def test_dcp_two_ranks_to_one(two_to_one, engine, case_id):
    seed, checkpoints, ranks = two_to_one
    results = rank_results(ranks, f"{engine}/{case_id}")
    case = CASE_BY_ID[case_id]
    param_tol, _, _ = _tolerances(case, engine, seed, STEPS)
    saved_model, _ = reference_run(case, seed, STEPS, WORLD_SIZE)
    what = f"{engine} {case_id}, seed {seed}"
    assert_close_dicts(results[0]["params"], param_snapshot(saved_model), param_tol, what)

    model = case.model(seed + 12345)
    optimizer = case.make(model.named_parameters())
    load_checkpoint(model, optimizer, checkpoints / engine / case_id, flatten=False)
    # Exactly what the ranks saved, whatever the engine.
    assert_close_dicts(param_snapshot(model), results[0]["params"], TOL, f"{what}: loaded")
    assert_state_matches(
        state_snapshot(model, optimizer), results[0]["state"], TOL, f"{what}: loaded"
    )
    assert optimizer.param_groups[0]["lr"] == case.kwargs["lr"]

    train(model, optimizer, make_batches(seed, MORE_STEPS, start=STEPS), micro=WORLD_SIZE)
    param_tol, state_tol, decode = _tolerances(case, engine, seed, STEPS + MORE_STEPS)
    want_model, want_optimizer = reference_run(case, seed, STEPS + MORE_STEPS, WORLD_SIZE)
    want = param_snapshot(want_model)
    assert_moved(seed, want, TOL, case.hidden)
    assert_close_dicts(param_snapshot(model), want, param_tol, f"{what}: resumed")
    _state_close(
        state_snapshot(model, optimizer),
        state_snapshot(want_model, want_optimizer),
        state_tol,
        decode,
        f"{what}: resumed",
    )


@pytest.mark.parametrize(("engine", "case_id"), _engine_case_params())
def test_dcp_one_rank_to_two(one_to_two, engine, case_id):
    seed, ranks = one_to_two
    results = rank_results(ranks, f"{engine}/{case_id}")
    for rank, result in enumerate(results):
        assert result["layout_problems"] == [], f"rank {rank}: {result['layout_problems']}"
    for key in ("loaded_params", "loaded_state", "params", "state"):
        assert_replicas_equal(results, key)
    case = CASE_BY_ID[case_id]
    _, state_tol, decode = _tolerances(case, engine, seed, STEPS)
    what = f"{engine} {case_id}, seed {seed}"
    saved_model, saved_optimizer = reference_run(case, seed, STEPS, WORLD_SIZE)
    assert_close_dicts(
        results[0]["loaded_params"], param_snapshot(saved_model), TOL, f"{what}: loaded"
    )
    _state_close(
        results[0]["loaded_state"],
        state_snapshot(saved_model, saved_optimizer),
        state_tol,
        decode,
        f"{what}: loaded",
    )
    param_tol, state_tol, decode = _tolerances(case, engine, seed, STEPS + MORE_STEPS)
    want_model, want_optimizer = reference_run(case, seed, STEPS + MORE_STEPS, WORLD_SIZE)
    want = param_snapshot(want_model)
    assert_moved(seed, want, TOL, case.hidden)
    assert_close_dicts(results[0]["params"], want, param_tol, f"{what}: resumed")
    _state_close(
        results[0]["state"],
        state_snapshot(want_model, want_optimizer),
        state_tol,
        decode,
        f"{what}: resumed",
    )


@pytest.mark.parametrize("case_id", ["adamw-int8-state", "adam-bf16-state", "adam-fp32-state"])
def test_dcp_flattened_stored_state_round_trip(tmp_path, case_id):
    # One process: flatten_optimizer_state_dict=True takes every state format now (state_format
    # is a number in state_dict()), and loading gives back the state bit for bit.
    case = CASE_BY_ID[case_id]
    seed = fresh_seed()
    model, optimizer = reference_run(case, seed, 2, WORLD_SIZE)
    save_checkpoint(model, optimizer, tmp_path / "flat", flatten=True)
    fresh_model = case.model(seed + 1)
    fresh = case.make(fresh_model.named_parameters())
    load_checkpoint(fresh_model, fresh, tmp_path / "flat", flatten=True)
    assert_state_matches(
        state_snapshot(fresh_model, fresh), state_snapshot(model, optimizer), 0.0, case_id
    )
    formats = [
        (optimizer.state[p][FORMAT_KEY], fresh.state[q][FORMAT_KEY])
        for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True)
    ]
    assert all(a == b for a, b in formats), formats
    assert case.kwargs["state"] in {a for a, _ in formats}


def test_bf16_resume_continues_the_random_stream(tmp_path):
    # get_state_dict drops state_rng; guard_checkpoint_state carries it.  Without it the resumed
    # run rounds with other bits (the check below that it then differs keeps this test honest).
    case = CASE_BY_ID["adam-bf16-state"]
    seed = fresh_seed()
    model, optimizer = reference_run(case, seed, STEPS, WORLD_SIZE)
    save_checkpoint(model, optimizer, tmp_path / "bf16", flatten=True)
    want = param_snapshot(reference_run(case, seed, STEPS + MORE_STEPS, WORLD_SIZE)[0])
    more = make_batches(seed, MORE_STEPS, start=STEPS)
    resumed = {}
    for guard in (True, False):
        fresh_model = case.model(seed + 1)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 2)  # another rounding seed than the saved run's
            fresh = case.optimizer_class(fresh_model.named_parameters(), **case.kwargs)
        load_checkpoint(fresh_model, fresh, tmp_path / "bf16", flatten=True, guard=guard)
        train(fresh_model, fresh, more, micro=WORLD_SIZE)
        resumed[guard] = param_snapshot(fresh_model)
    assert_close_dicts(resumed[True], want, 0.0, f"seed {seed}: resumed with the generator")
    worst = max(rel_diff(resumed[False][k], want[k]) for k in want)
    assert worst > 0, f"seed {seed}: resuming without the generator cannot be told apart"


def test_old_checkpoints_with_format_names_load(tmp_path):
    # Checkpoints written before state_format became a number hold the format's name.
    case = CASE_BY_ID["adamw-int8-state"]
    seed = fresh_seed()
    model, optimizer = reference_run(case, seed, 2, WORLD_SIZE)
    saved = optimizer.state_dict()
    codes = {entry[FORMAT_KEY] for entry in saved["state"].values()}
    assert codes == {FORMAT_CODES["int8"], FORMAT_CODES["fp32"]}  # biases stay fp32
    names = {FORMAT_CODES[name]: name for name in ("int8", "fp32")}
    old = {
        **saved,
        "state": {i: {**e, FORMAT_KEY: names[e[FORMAT_KEY]]} for i, e in saved["state"].items()},
    }
    torch.save(old, tmp_path / "old.pt")
    fresh_model = case.model(seed)
    fresh = case.make(fresh_model.named_parameters())
    fresh.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert_state_matches(
        state_snapshot(fresh_model, fresh), state_snapshot(model, optimizer), 0.0, "old names"
    )
