"""adamkit.torch.Adam/AdamW under DistributedDataParallel, against a single-process run.

Two gloo ranks each take half of every global batch; DDP averages the gradients, so each replica
must end where one process ends that accumulates the gradient over the same two halves (see
_dist_cases), bit-identical to the other replica, with the same state.  Stored state formats
(fp32, bf16, int8) included: their step is deterministic given the gradient and, for bf16's
stochastic rounding, the optimizer's generator, which every process seeds alike here.
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
    is_quantized,
    param_snapshot,
    rank_results,
    reference_run,
    state_snapshot,
)
from _dist_launch import run_ranks

from adamkit.torch.distributed import state_nbytes
from adamkit.torch.formats import FORMAT_KEY, format_name

WORLD_SIZE = 2
STEPS = 4
# Relative difference (max|a-b| / max|b| per tensor) allowed between the distributed and the
# single-process run (float32).  With 2 ranks both add the same numbers (see _dist_cases), and
# the measured difference is 0; the margin is for reduction orders on other builds.
TOL = 1e-6


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    seed = fresh_seed()
    args = {"seed": seed, "steps": STEPS, "cases": case_ids("ddp", "ddp-replicas")}
    return seed, run_ranks("ddp", WORLD_SIZE, tmp_path_factory.mktemp("ddp"), args)


@pytest.mark.parametrize("case_id", case_params("ddp"))
def test_ddp_matches_single_process(ddp_run, case_id):
    seed, ranks = ddp_run
    results = rank_results(ranks, case_id)
    assert_replicas_equal(results)
    case = CASE_BY_ID[case_id]
    model, optimizer = reference_run(case, seed, STEPS, WORLD_SIZE)
    want = param_snapshot(model)
    assert_moved(seed, want, TOL, case.hidden)
    what = f"{case_id}, seed {seed}"
    assert_close_dicts(results[0]["params"], want, TOL, f"{what}: parameters")
    assert_state_matches(results[0]["state"], state_snapshot(model, optimizer), TOL, what)
    # DDP replicates the optimizer: every rank holds what one process holds.
    assert results[0]["state_nbytes"] == state_nbytes(optimizer)


def test_ddp_bf16_replicas_agree_without_a_common_seed(ddp_run):
    # torch gives each process a random initial seed; the optimizer takes rank 0's seed for its
    # stochastic rounding (adamkit.torch.formats.new_rng), so the replicas still draw alike.
    _, ranks = ddp_run
    results = rank_results(ranks, "adam-bf16-unseeded")
    assert_replicas_equal(results, "state")
    assert_replicas_equal(results)


def test_ddp_compressed_state_is_compressed(ddp_run):
    # Guards the int8 rows against testing float32 moments only (the small-tensor rule).
    _, ranks = ddp_run
    state = rank_results(ranks, "adamw-int8-state")[0]["state"]
    quantized = [name for name, entry in state.items() if is_quantized(entry)]
    assert quantized == ["2.weight", "4.weight"], sorted(state)
    # state_dict() writes the format as its number (adamkit.torch.formats.FORMAT_CODES).
    assert all(
        format_name(entry[FORMAT_KEY]) == "int8"
        for entry in state.values()
        if entry["exp_avg"].dim() == 2
    )
