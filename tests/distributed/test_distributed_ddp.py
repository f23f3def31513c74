"""adamkit.torch.Adam/AdamW under DistributedDataParallel, against a single-process run.

Two gloo ranks each take half of every global batch; DDP averages the gradients, so each replica
must end where one process ends that accumulates the gradient over the same two halves (see
_dist_cases), bit-identical to the other replica, with the same state.
"""

from __future__ import annotations

import pytest
from _dist_cases import (
    CASE_BY_ID,
    CASES,
    assert_close_dicts,
    assert_moved,
    assert_replicas_equal,
    assert_state_matches,
    case_params,
    fresh_seed,
    param_snapshot,
    rank_results,
    reference_run,
    state_snapshot,
)
from _dist_launch import run_ranks

from adamkit.torch.distributed import state_nbytes

WORLD_SIZE = 2
STEPS = 4
# Relative difference (max|a-b| / max|b| per tensor) allowed between the distributed and the
# single-process run (float32).  With 2 ranks both add the same numbers (see _dist_cases), and
# the measured difference is 0; the margin is for reduction orders on other builds.
TOL = 1e-6


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    seed = fresh_seed()
    args = {"seed": seed, "steps": STEPS, "cases": [case.id for case in CASES]}
    return seed, run_ranks("ddp", WORLD_SIZE, tmp_path_factory.mktemp("ddp"), args)


@pytest.mark.parametrize("case_id", case_params("ddp"))
def test_ddp_matches_single_process(ddp_run, case_id):
    seed, ranks = ddp_run
    results = rank_results(ranks, case_id)
    assert_replicas_equal(results)
    model, optimizer = reference_run(CASE_BY_ID[case_id], seed, STEPS, WORLD_SIZE)
    want = param_snapshot(model)
    assert_moved(seed, want, TOL)
    what = f"{case_id}, seed {seed}"
    assert_close_dicts(results[0]["params"], want, TOL, f"{what}: parameters")
    assert_state_matches(results[0]["state"], state_snapshot(model, optimizer), TOL, what)
    # DDP replicates the optimizer: every rank holds what one process holds.
    assert results[0]["state_nbytes"] == state_nbytes(optimizer)
