"""FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters) with adamkit.torch.Adam/AdamW.

Two gloo ranks shard every linear layer (the last one unevenly: 3 rows on 2 ranks) and the step
runs on the local shards.  Compared with one process accumulating the gradient over the same two
halves of every batch (see _dist_cases): the gathered parameters and state, the state layout
(moments as DTensors placed like their parameters, int8 block scales of the whole-tensor blocks
that overlap the local shard, so each rank holds only its shard's state), the state bytes per
rank (about half of one process's) and ``state_dict()`` -> ``load_state_dict()``.

Which runs equal the single-process run bit for bit (tolerance ``TOL``, measured 0): torch's
layout, ``fp32`` state, ``bf16`` state and bfloat16 parameters with
``param_rounding="stochastic"`` ("adam-bf16-params": each shard rounds with the bits one process
uses for those elements: the same key per parameter on every rank, noise indexed by global
element position; see ``adamkit.torch.formats.shard_rng``), and ``int8`` state, with
block-aligned shards (the 64 x 64 weights of "adamw-int8-state") or not ("adamw-int8-unaligned",
70 x 70: one block straddles the two shards; both ranks keep its whole-block scale and agree on
it by one all_reduce(MAX) per step, see ``adamkit.torch.sharded_blocks``), also with AMSGrad,
blocks of 32 and the plain path ("adam-amsgrad-int8-companded-unaligned").
"adam-bf16-unseeded" builds the optimizer without a common torch seed (each rank's differs):
the ranks take rank 0's, so the run equals one process built under rank 0's seed.
"""

from __future__ import annotations

import pytest
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
    is_quantized,
    make_batches,
    param_snapshot,
    rank_results,
    reference_run,
    state_snapshot,
    state_switches,
    train,
)
from _dist_launch import run_ranks

from adamkit.formats import get_format
from adamkit.torch.distributed import state_nbytes

WORLD_SIZE = 2
STEPS = 4
# See test_distributed_ddp.py: the measured difference is 0.
TOL = 1e-6
# Every parameter is split by rows; only the uneven last layer and the per-parameter `step`
# counters (kept on every rank) move a rank away from exactly half.
HALF_RANGE = (0.45, 0.55)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    seed = fresh_seed()
    args = {"seed": seed, "steps": STEPS, "cases": case_ids("fsdp2")}
    return seed, run_ranks("fsdp2", WORLD_SIZE, tmp_path_factory.mktemp("fsdp2"), args)


@pytest.mark.parametrize("case_id", case_params("fsdp2"))
def test_fsdp2_matches_single_process(fsdp2_run, case_id):
    seed, ranks = fsdp2_run
    results = rank_results(ranks, case_id)
    # Gathered with full_tensor(), so every rank sees the same whole tensors.
    assert_replicas_equal(results)
    assert_replicas_equal(results, "state")
    case = CASE_BY_ID[case_id]
    torch_seed = None
    if not case.seeded:
        # Each rank had a seed of its own; the optimizer took rank 0's on every rank.
        torch_seed = results[0]["torch_seed"]
        assert len({result["torch_seed"] for result in results}) == WORLD_SIZE, "seeds agree"
    model, optimizer = reference_run(case, seed, STEPS, WORLD_SIZE, torch_seed)
    want = param_snapshot(model)
    approx = approx_tolerances(case, "fsdp2", seed, STEPS, WORLD_SIZE)
    param_tol, state_tol = approx or (TOL, TOL)
    assert_moved(seed, want, TOL, case.hidden)
    what = f"{case_id}, seed {seed}"
    assert_close_dicts(results[0]["params"], want, param_tol, f"{what}: parameters")
    got_state, want_state = results[0]["state"], state_snapshot(model, optimizer)
    if approx:
        got_state, want_state = decoded(got_state), decoded(want_state)
    assert_state_matches(got_state, want_state, state_tol, what)


@pytest.mark.parametrize("case_id", case_params("fsdp2"))
def test_fsdp2_state_is_sharded(fsdp2_run, case_id):
    seed, ranks = fsdp2_run
    results = rank_results(ranks, case_id)
    for rank, result in enumerate(results):
        assert result["layout_problems"] == [], f"rank {rank}: {result['layout_problems']}"
    _, optimizer = reference_run(CASE_BY_ID[case_id], seed, STEPS, WORLD_SIZE)
    single = state_nbytes(optimizer)
    per_rank = [result["state_nbytes"] for result in results]
    low, high = HALF_RANGE
    assert all(low * single <= n <= high * single for n in per_rank), (per_rank, single)


def test_fsdp2_int8_state_is_compressed(fsdp2_run):
    # Guards the int8 rows against testing float32 moments only: the format is chosen on the
    # whole shape (64 x 64 = 4096 elements: quantized), not the shard's (2048: would be dense).
    _, ranks = fsdp2_run
    block = get_format("int8").block
    for case_id, width in (("adamw-int8-state", 64), ("adamw-int8-unaligned", 70)):
        state = rank_results(ranks, case_id)[0]["state"]
        quantized = sorted(n for n, entry in state.items() if is_quantized(entry))
        assert quantized == ["2.weight", "4.weight"], (case_id, sorted(state))
        # The whole tensor's block scales, as one process has them.
        assert state["2.weight"]["exp_avg_scale"].shape == (-(-width * width // block),)


@pytest.mark.parametrize("case_id", case_params("fsdp2"))
def test_fsdp2_state_dict_round_trip(fsdp2_run, case_id):
    # Exact, block-aligned shards or not: the live scales are those of the whole tensor's blocks
    # that overlap the shard, a slice of the state dict's.
    _, ranks = fsdp2_run
    for rank, result in enumerate(rank_results(ranks, case_id)):
        changed = result["reload_changed"]
        assert changed == [], f"rank {rank}: {changed}"


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp2_snapshot")
    cases = ["adamw-int8-state", "adamw-int8-unaligned"]
    args = {"seed": fresh_seed(), "steps": 2, "cases": cases, "checkpoints": str(workdir)}
    return run_ranks("fsdp2_snapshot", WORLD_SIZE, workdir, args)


@pytest.mark.parametrize("case_id", ["adamw-int8-state", "adamw-int8-unaligned"])
def test_fsdp2_guard_snapshot_through_dcp(snapshot_run, case_id):
    # The guard's rollback snapshot holds int8 state too: guard_checkpoint_state saves its block
    # scales in the whole-tensor layout (a rank's own scales would be saved from one rank only)
    # and load_guard_checkpoint puts them back over the shard: exact, aligned or not.
    for rank, result in enumerate(rank_results(snapshot_run, case_id)):
        assert result["has_snapshot"], rank
        assert result["changed"] == [], (rank, result["changed"])


_UNALIGNED = ["adamw-int8-unaligned", "adam-amsgrad-int8-companded-unaligned"]


@pytest.fixture(scope="module")
def convert_run(tmp_path_factory):
    seed = fresh_seed()
    args = {"seed": seed, "steps": 2, "cases": _UNALIGNED}
    return seed, run_ranks("fsdp2_convert", WORLD_SIZE, tmp_path_factory.mktemp("convert"), args)


def test_fsdp2_update_clipping_on_straddling_blocks_is_refused_before_any_change(tmp_path):
    # Not implemented (see adamkit.torch.sharded_blocks): every rank refuses in the step's
    # checks, before any state exists or any parameter moves.
    case_id = "adamw-int8-unaligned"
    args = {"seed": fresh_seed(), "cases": [case_id]}
    ranks = run_ranks("fsdp2_clip_refused", WORLD_SIZE, tmp_path, args)
    for result in rank_results(ranks, case_id):
        assert result == {"outcome": "NotImplementedError", "unchanged": True, "states": 0}


@pytest.mark.parametrize("case_id", _UNALIGNED)
def test_fsdp2_state_switch_on_unaligned_shards(convert_run, case_id):
    # Switching the group's state mid-run converts the live state: int8 shards to fp32 (decoded
    # with the whole blocks' scales) and back (encoded with the whole blocks' maxima, one small
    # all_reduce per moment), each time as one process converts the whole tensor.
    seed, ranks = convert_run
    results = rank_results(ranks, case_id)
    assert_replicas_equal(results, "fp32")
    case = CASE_BY_ID[case_id]
    model, optimizer = reference_run(case, seed, 2, WORLD_SIZE)
    for index, state in enumerate(state_switches(case)):
        for group in optimizer.param_groups:
            group["state"] = state
        train(model, optimizer, make_batches(seed, 1, start=2 + index), micro=WORLD_SIZE)
        what = f"{case_id}, seed {seed}, after the switch to {state!r}"
        got = results[0][state]
        assert_close_dicts(got["params"], param_snapshot(model), TOL, what)
        assert_state_matches(got["state"], state_snapshot(model, optimizer), TOL, what)
    assert is_quantized(results[0][case.kwargs["state"]]["state"]["2.weight"])
