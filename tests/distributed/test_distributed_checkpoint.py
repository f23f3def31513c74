"""Distributed checkpoints (``torch.distributed.checkpoint`` with ``get_state_dict`` /
``set_state_dict``) of a model and its adamkit optimizer, resumed on another number of ranks.

2 -> 1: two gloo ranks (FSDP2, or DDP with the optimizer named through the wrapper) train
``STEPS`` steps and save; this process (no process group, a plain model) loads and trains
``MORE_STEPS`` more.  1 -> 2: this process trains and saves; two ranks load into a model built
from another seed (so everything must come from the checkpoint) and continue.  Both must end
where an uninterrupted single-process run ends (see _dist_cases for why that run accumulates
over the two halves of each batch), and the state right after loading must equal the saved
one.  The first direction saves the nested optimizer state dict, the second the flattened one
(``flatten_optimizer_state_dict=True``), except for stored state formats, whose string entry
``state_format`` torch's flattening refuses (see test_dcp_flattened_stored_state): those save
the nested one both ways.
"""

from __future__ import annotations

import pytest
from _dist_cases import (
    CASE_BY_ID,
    assert_close_dicts,
    assert_moved,
    assert_replicas_equal,
    assert_state_matches,
    case_ids,
    case_params,
    fresh_seed,
    load_checkpoint,
    make_batches,
    param_snapshot,
    rank_results,
    reference_run,
    save_checkpoint,
    state_snapshot,
    train,
)
from _dist_launch import run_ranks

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
FLATTEN_STORED_STATE = (
    "get_state_dict(flatten_optimizer_state_dict=True) accepts only tensor, int, float and dict "
    "state values; a stored format's per-parameter 'state_format' is a str"
)
# Every case that runs on some engine (the worker skips a case on an engine it does not run on).
CASE_IDS = case_ids(*(f"dcp-{engine}" for engine in ENGINES))


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
        flatten = CASE_BY_ID[case_id].flattens
        save_checkpoint(model, optimizer, checkpoints / case_id, flatten=flatten)
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
    saved_model, saved_optimizer = reference_run(case, seed, STEPS, WORLD_SIZE)
    what = f"{engine} {case_id}, seed {seed}"
    assert_close_dicts(results[0]["params"], param_snapshot(saved_model), TOL, what)

    model = case.model(seed + 12345)
    optimizer = case.make(model.named_parameters())
    load_checkpoint(model, optimizer, checkpoints / engine / case_id, flatten=False)
    assert_close_dicts(param_snapshot(model), param_snapshot(saved_model), TOL, f"{what}: loaded")
    assert_state_matches(
        state_snapshot(model, optimizer),
        state_snapshot(saved_model, saved_optimizer),
        TOL,
        f"{what}: loaded",
    )
    assert optimizer.param_groups[0]["lr"] == case.kwargs["lr"]

    train(model, optimizer, make_batches(seed, MORE_STEPS, start=STEPS), micro=WORLD_SIZE)
    want_model, want_optimizer = reference_run(case, seed, STEPS + MORE_STEPS, WORLD_SIZE)
    want = param_snapshot(want_model)
    assert_moved(seed, want, TOL, case.hidden)
    assert_close_dicts(param_snapshot(model), want, TOL, f"{what}: resumed")
    assert_state_matches(
        state_snapshot(model, optimizer),
        state_snapshot(want_model, want_optimizer),
        TOL,
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
    what = f"{engine} {case_id}, seed {seed}"
    saved_model, saved_optimizer = reference_run(case, seed, STEPS, WORLD_SIZE)
    assert_close_dicts(
        results[0]["loaded_params"], param_snapshot(saved_model), TOL, f"{what}: loaded"
    )
    assert_state_matches(
        results[0]["loaded_state"],
        state_snapshot(saved_model, saved_optimizer),
        TOL,
        f"{what}: loaded",
    )
    want_model, want_optimizer = reference_run(case, seed, STEPS + MORE_STEPS, WORLD_SIZE)
    want = param_snapshot(want_model)
    assert_moved(seed, want, TOL, case.hidden)
    assert_close_dicts(results[0]["params"], want, TOL, f"{what}: resumed")
    assert_state_matches(
        results[0]["state"], state_snapshot(want_model, want_optimizer), TOL, f"{what}: resumed"
    )


@pytest.mark.xfail(strict=True, raises=NotImplementedError, reason=FLATTEN_STORED_STATE)
def test_dcp_flattened_stored_state(tmp_path):
    case = CASE_BY_ID["adamw-int8-state"]
    model, optimizer = reference_run(case, fresh_seed(), 1, WORLD_SIZE)
    save_checkpoint(model, optimizer, tmp_path / "flat", flatten=True)
