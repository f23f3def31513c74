"""The stability guard is collective: every rank takes the same decision, once per step.

Two gloo ranks (see _dist_guard for the scenarios and the references).  Something only one rank
sees must change what every rank does, exactly as a single process that sees everything would:
a NaN in one rank's gradients after DDP's all-reduce, in a parameter ZeRO-1 gives to the other
rank, or in one rank's FSDP2 shard skips the step on both ranks; a loss spike on one rank is
judged through the mean loss.  ``process_group=False`` shows what happens without the collective
(the replicas part), so the other tests can fail.  The guard issues one ``all_reduce`` per step
(two with ``track_update_norm``), counted by wrapping ``torch.distributed.all_reduce`` and, with
the profiler, every gloo collective inside ``step()``.  Its state survives distributed
checkpoints (``get_state_dict`` drops it; :func:`adamkit.torch.distributed.guard_checkpoint_state`
carries it) and a resumed run rolls back exactly like an uninterrupted one, 2 -> 1 and 1 -> 2
ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _dist_cases import (
    assert_close_dicts,
    assert_moved,
    assert_replicas_equal,
    assert_state_matches,
    fresh_seed,
    load_checkpoint,
    make_batches,
    make_model,
    param_snapshot,
    rank_results,
    rank_slice,
    rel_diff,
    state_snapshot,
)
from _dist_guard import (
    BIG_STEP,
    DCP_MORE_STEPS,
    DCP_SPIKE_STEP,
    DCP_SPIKES,
    DCP_STEPS,
    LOSS_GUARD,
    LOSS_SPIKES,
    LOSS_STEPS,
    MODERATE_STEP,
    NAN_STEP,
    STEPS,
    WORLD_SIZE,
    guard_summary,
    make_dcp_optimizer,
    mean_loss,
    rank_loss,
    reference_train,
    save_single_process,
)
from _dist_launch import run_ranks

import adamkit.torch as at
from adamkit.guard import Guard
from adamkit.torch.distributed import guard_checkpoint_state, load_guard_checkpoint

# DCP says so whenever it runs without a process group, which this process does on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning"
)

# Relative difference (max|a-b| / max|b| per tensor), as in the other distributed tests: with 2
# ranks the gradients add the same float32 numbers as the single-process accumulation.
TOL = 1e-6
# Norms: the guard takes float32 norms per tensor (per shard under FSDP2) and adds their squares
# in float64; the reference squares every element in float64.
NORM_RTOL = 1e-6
# Update clipping "rms" reads each tensor's mean through DTensor's reduction (another summation
# order than one process's); the factor enters the step, so the parameters differ by about that.
RMS_TOL = 1e-5
APPLIED = [step != NAN_STEP for step in range(STEPS)]


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory):
    """One launch for everything the ranks do (start-up dominates); first this process saves
    the checkpoint the ranks resume from."""
    seed = fresh_seed()
    workdir = tmp_path_factory.mktemp("guard")
    _, optimizer = save_single_process(seed, workdir / "single")
    args = {
        "seed": seed,
        "save_to": str(workdir / "ranks"),
        "resume_from": str(workdir / "single"),
    }
    ranks = run_ranks("guard", WORLD_SIZE, workdir, args)
    return seed, ranks, {"single": guard_summary(optimizer), "ranks": workdir / "ranks"}


def _applied(result):
    return [step["applied"] for step in result["steps"]]


def _assert_norms(results, want_norms, what):
    for rank, result in enumerate(results):
        got = [s["diagnostics"]["grad_norm"] for s in result["steps"] if s["applied"]]
        assert got == pytest.approx(want_norms, rel=NORM_RTOL), f"{what}, rank {rank}"


@pytest.mark.parametrize("name", ["ddp-nan-input", "ddp-nan-local", "ddp-nan-local-group"])
def test_ddp_nonfinite_on_one_rank_skips_on_all(guard_run, name):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, name)
    for rank, result in enumerate(results):
        assert _applied(result) == APPLIED, f"{name} rank {rank}: {_applied(result)}"
    assert_replicas_equal(results)
    assert_replicas_equal(results, "state")
    model, optimizer, records = reference_train(seed, STEPS, skip=frozenset({NAN_STEP}))
    want = param_snapshot(model)
    assert_moved(seed, want, TOL)
    what = f"{name}, seed {seed}"
    assert_close_dicts(results[0]["params"], want, TOL, what)
    assert_state_matches(results[0]["state"], state_snapshot(model, optimizer), TOL, what)
    # DDP's gradients are the same on both ranks: counted once, the norm is one process's.
    _assert_norms(results, [r["grad_norm"] for r in records], what)


def test_without_the_collective_ranks_decide_alone(guard_run):
    # process_group=False: the NaN written into rank 1's gradient skips rank 1 only, and the
    # replicas part (what every other test here would see without the collective).
    seed, ranks, _ = guard_run
    results = rank_results(ranks, "ddp-nan-local-off")
    assert _applied(results[0]) == [True] * STEPS
    assert _applied(results[1]) == APPLIED
    assert all(step["all_reduce_calls"] == 0 for r in results for step in r["steps"])
    assert any(
        not torch.equal(results[0]["params"][k], results[1]["params"][k])
        for k in results[0]["params"]
    ), f"seed {seed}: the replicas should differ"


def test_guarded_optimizer_is_collective(guard_run):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, "sgd-nan-local")
    for result in results:
        assert _applied(result) == APPLIED
    assert_replicas_equal(results)

    def sgd(named):
        return torch.optim.SGD([p for _, p in named], lr=0.05, momentum=0.9)

    model, _, _ = reference_train(seed, STEPS, skip=frozenset({NAN_STEP}), make=sgd)
    want = param_snapshot(model)
    assert_moved(seed, want, TOL)
    assert_close_dicts(results[0]["params"], want, TOL, f"seed {seed}")


def test_zero_nan_in_a_parameter_of_the_other_rank(guard_run):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, "zero-nan-other")
    target = results[0]["nan_param"]
    assert target in results[1]["owned"] and target not in results[0]["owned"]
    for result in results:
        assert _applied(result) == APPLIED
    assert_replicas_equal(results)
    model, _, records = reference_train(seed, STEPS, skip=frozenset({NAN_STEP}))
    want = param_snapshot(model)
    assert_moved(seed, want, TOL)
    what = f"seed {seed}"
    assert_close_dicts(results[0]["params"], want, TOL, what)
    # Each rank's inner optimizer holds different parameters: their squares add up.
    _assert_norms(results, [r["grad_norm"] for r in records], what)


def test_fsdp2_nan_in_one_shard_skips_on_all(guard_run):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, "fsdp2-nan-shard")
    for result in results:
        assert _applied(result) == APPLIED
    assert_replicas_equal(results)
    assert_replicas_equal(results, "state")
    model, optimizer, records = reference_train(seed, STEPS, skip=frozenset({NAN_STEP}))
    want = param_snapshot(model)
    what = f"seed {seed}"
    assert_close_dicts(results[0]["params"], want, TOL, what)
    assert_state_matches(results[0]["state"], state_snapshot(model, optimizer), TOL, what)
    _assert_norms(results, [r["grad_norm"] for r in records], what)


def test_loss_spike_premise():
    # Rank 1's moderate loss is a spike on its own, but not once averaged with rank 0's: the
    # decision tells the mean loss apart from any rank's own.
    alone, mean = Guard(LOSS_GUARD), Guard(LOSS_GUARD)
    for step in range(LOSS_STEPS):
        a = alone.plan_step(loss=rank_loss(1, step, LOSS_SPIKES), grad_norm=1.0)
        m = mean.plan_step(loss=mean_loss(step, LOSS_SPIKES), grad_norm=1.0)
        if step == MODERATE_STEP:
            assert a.action == "skip_loss_spike" and m.action == "apply"


@pytest.mark.parametrize("name", ["ddp-loss", "fsdp2-loss", "zero-loss"])
def test_loss_spike_decided_on_the_mean_loss(guard_run, name):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, name)
    _, _, records = reference_train(
        seed,
        LOSS_STEPS,
        make=lambda p: at.Adam(p, lr=1e-2, guard=LOSS_GUARD),
        losses=lambda step: mean_loss(step, LOSS_SPIKES),
    )
    want_actions = [r["diagnostics"]["action"] for r in records]
    assert want_actions[BIG_STEP] == "skip_loss_spike"
    assert want_actions[MODERATE_STEP] == "apply"
    for rank, result in enumerate(results):
        diagnostics = [step["diagnostics"] for step in result["steps"]]
        assert [d["action"] for d in diagnostics] == want_actions, f"{name} rank {rank}"
        assert [d["loss"] for d in diagnostics] == [
            mean_loss(step, LOSS_SPIKES) for step in range(LOSS_STEPS)
        ]
    assert_replicas_equal(results)
    model, _, _ = reference_train(seed, LOSS_STEPS, skip=frozenset({BIG_STEP}))
    assert_close_dicts(results[0]["params"], param_snapshot(model), TOL, f"{name}, seed {seed}")


@pytest.mark.parametrize(
    "name",
    [
        "ddp-nan-input",
        "ddp-nan-local",
        "ddp-nan-local-group",
        "sgd-nan-local",
        "zero-nan-other",
        "fsdp2-nan-shard",
        "ddp-loss",
        "fsdp2-loss",
        "zero-loss",
    ],
)
def test_one_all_reduce_per_step(guard_run, name):
    _, ranks, _ = guard_run
    for rank, result in enumerate(rank_results(ranks, name)):
        for step, record in enumerate(result["steps"]):
            where = f"{name} rank {rank} step {step}: {record}"
            assert record["all_reduce_calls"] == 1, where
            if "gloo_all_reduce" in record:  # profiled: no collective of anyone else's either
                assert record["gloo_all_reduce"] == 1, where
                # ZeRO-1 broadcasts the updated parameters after the inner step, skipped or not.
                others = {"gloo:broadcast"} if name.startswith("zero") else set()
                assert set(record["gloo_other"]) <= others, where


@pytest.mark.parametrize("name", ["ddp-track", "fsdp2-track"])
def test_track_update_norm_global_with_one_more_all_reduce(guard_run, name):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, name)
    _, _, records = reference_train(
        seed,
        STEPS,
        skip=frozenset({NAN_STEP}),
        make=lambda p: at.Adam(p, lr=1e-2, guard={"track_update_norm": True}),
    )
    for rank, result in enumerate(results):
        assert _applied(result) == APPLIED
        applied = [s for s in result["steps"] if s["applied"]]
        assert [s["all_reduce_calls"] for s in result["steps"]] == [1 + a for a in APPLIED]
        for key in ("update_norm", "param_norm", "update_ratio"):
            got = [s["diagnostics"][key] for s in applied]
            want = [r["diagnostics"][key] for r in records]
            assert got == pytest.approx(want, rel=NORM_RTOL), f"{name} rank {rank} {key}"


@pytest.mark.parametrize("name", ["fsdp2-rms", "fsdp2-rms-reference"])
def test_fsdp2_rms_update_clip_uses_whole_tensors(guard_run, name):
    seed, ranks, _ = guard_run
    results = rank_results(ranks, name)
    assert_replicas_equal(results)
    clip = {"update_clip": "rms", "rms_threshold": 0.3}
    model, _, records = reference_train(seed, STEPS, make=lambda p: at.Adam(p, lr=1e-2, guard=clip))
    plain, _, _ = reference_train(seed, STEPS)
    want = param_snapshot(model)
    # The clipping acted (the run is far from plain Adam's), so a per-shard mean would show.
    assert_moved(seed, want, RMS_TOL)
    assert (
        max(
            (want[k] - v).abs().max().item() / v.abs().max().item()
            for k, v in param_snapshot(plain).items()
        )
        > 100 * RMS_TOL
    )
    assert_close_dicts(results[0]["params"], want, RMS_TOL, f"{name}, seed {seed}")
    for rank, result in enumerate(results):
        got = [s["diagnostics"]["update_scale_min"] for s in result["steps"]]
        want_scales = [r["diagnostics"]["update_scale_min"] for r in records]
        assert got == pytest.approx(want_scales, rel=RMS_TOL), f"{name} rank {rank}"
        assert [s["all_reduce_calls"] for s in result["steps"]] == [1] * STEPS


def test_zero_accepts_the_guard_keyword(guard_run):
    _, ranks, _ = guard_run
    for result in rank_results(ranks, "zero-guard-keyword"):
        assert result["outcome"] == "ok"


def test_invalid_loss_on_one_rank_raises_on_every_rank(guard_run):
    # With loss-spike handling on; raising on rank 1 alone would leave rank 0 in the collective.
    _, ranks, _ = guard_run
    results = rank_results(ranks, "bad-loss")
    assert results[1]["outcome"].startswith("ValueError: loss must be a single number")
    assert results[0]["outcome"].startswith("ValueError: the loss given to step() on rank(s) [1]")
    for rank, result in enumerate(results):
        assert result["unchanged"] and result["state_after_error"] == 0, (rank, result)
        # Only the good step that followed counts, and it was applied.
        assert result["n_steps"] == 1 and result["applied_after"], (rank, result)
        # Without loss-spike handling the invalid loss is left out, not an error.
        assert result["diagnostic_loss"] == 3.0 and result["diagnostic_applied"], (rank, result)


# -- distributed checkpoints ------------------------------------------------------------------


def _uninterrupted(seed):
    return reference_train(
        seed,
        DCP_STEPS + DCP_MORE_STEPS,
        make=make_dcp_optimizer,
        losses=lambda step: mean_loss(step, DCP_SPIKES),
    )


def _continue(seed, model, optimizer):
    return reference_train(
        seed,
        DCP_STEPS + DCP_MORE_STEPS,
        model=model,
        optimizer=optimizer,
        losses=lambda step: mean_loss(step, DCP_SPIKES),
        start=DCP_STEPS,
    )


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {
            k: v
            for key, value in tree.items()
            for k, v in _leaves(value, f"{prefix}{key}.").items()
        }
    return {prefix: tree}


def _assert_same_guard(got, want, what, tol=0.0):
    """Same counters and snapshot presence; statistics and snapshot tensors equal (``tol=0``) or
    within ``tol`` (relative; FSDP2's norms add per-shard float32 norms, see NORM_RTOL)."""
    assert got["counters"] == want["counters"], what
    assert got["has_snapshot"] == want["has_snapshot"], what
    numbers, wanted = _leaves(got["numbers"]), _leaves(want["numbers"])
    assert numbers.keys() == wanted.keys(), what
    for key, value in wanted.items():
        if tol and isinstance(value, float):
            assert numbers[key] == pytest.approx(value, rel=tol, abs=0), f"{what}: {key}"
        else:
            assert numbers[key] == value, f"{what}: {key}"
    if want["snapshot_params"] is None:
        assert got["snapshot_params"] is None, what
    else:
        pairs = zip(got["snapshot_params"], want["snapshot_params"], strict=True)
        for i, (a, b) in enumerate(pairs):
            assert torch.equal(a, b) if not tol else rel_diff(a, b) <= tol, f"{what}: {i}"


def test_dcp_premise():
    # The uninterrupted run has a snapshot at the checkpoint and rolls back after it, once.
    seed = fresh_seed()
    model, optimizer, _ = reference_train(
        seed, DCP_STEPS, make=make_dcp_optimizer, losses=lambda s: mean_loss(s, DCP_SPIKES)
    )
    assert optimizer.guard.has_snapshot
    _, optimizer, records = _continue(seed, model, optimizer)
    assert [r["diagnostics"]["action"] for r in records][DCP_SPIKE_STEP - DCP_STEPS] == "rollback"
    assert optimizer.guard.counters["n_rollbacks"] == 1


def test_dcp_guard_two_ranks_to_one(guard_run):
    seed, results, checkpoints = guard_run
    ranks = rank_results(results, "dcp-save")
    path = checkpoints["ranks"]
    # Why the guard needs a key of its own: get_state_dict keeps "state" and "param_groups".
    assert ranks[0]["optim_keys"] == ["param_groups", "state"]
    _, saved_optimizer, _ = reference_train(
        seed, DCP_STEPS, make=make_dcp_optimizer, losses=lambda s: mean_loss(s, DCP_SPIKES)
    )
    what = f"seed {seed}"
    saved = guard_summary(saved_optimizer)
    _assert_same_guard(ranks[0]["guard"], saved, f"{what}: saved", tol=10 * NORM_RTOL)

    model = make_model(seed + 12345)
    optimizer = make_dcp_optimizer(model.named_parameters())
    load_checkpoint(model, optimizer, path, flatten=False, guard=False)
    control = copy.deepcopy((model, optimizer))
    load_guard_checkpoint(optimizer, checkpoint_id=str(path))
    # Exactly what the ranks saved (their statistics, their snapshot).
    _assert_same_guard(guard_summary(optimizer), ranks[0]["guard"], f"{what}: loaded")

    _continue(seed, model, optimizer)
    want_model, want_optimizer, _ = _uninterrupted(seed)
    want = param_snapshot(want_model)
    assert_moved(seed, want, TOL)
    assert_close_dicts(param_snapshot(model), want, TOL, f"{what}: resumed")
    assert_state_matches(
        state_snapshot(model, optimizer), state_snapshot(want_model, want_optimizer), TOL, what
    )
    assert optimizer.guard.counters == want_optimizer.guard.counters
    # Without the guard's entry the resumed run decides otherwise (no rollback).
    control_model, control_optimizer = control
    _continue(seed, control_model, control_optimizer)
    assert control_optimizer.guard.counters["n_rollbacks"] == 0


def test_dcp_guard_one_rank_to_two(guard_run):
    seed, results, checkpoints = guard_run
    ranks, saved = rank_results(results, "dcp-resume"), checkpoints["single"]
    what = f"seed {seed}"
    for rank, result in enumerate(ranks):
        _assert_same_guard(result["loaded"], saved, f"{what}: rank {rank} loaded")
    assert_replicas_equal(ranks)
    assert_replicas_equal(ranks, "state")
    want_model, want_optimizer, records = _uninterrupted(seed)
    assert_close_dicts(ranks[0]["params"], param_snapshot(want_model), TOL, f"{what}: resumed")
    assert_state_matches(
        ranks[0]["state"], state_snapshot(want_model, want_optimizer), TOL, f"{what}: resumed"
    )
    want_actions = [r["diagnostics"]["action"] for r in records[DCP_STEPS:]]
    for rank, result in enumerate(ranks):
        assert [d["action"] for d in result["steps"]] == want_actions, f"rank {rank}"
        assert result["guard"]["counters"] == dict(want_optimizer.guard.counters)


# -- single process: arguments and errors -----------------------------------------------------


def _trained(guard, steps=3):
    model = make_model(fresh_seed())
    optimizer = at.Adam(model.parameters(), lr=1e-2, guard=guard)
    for step, batch in enumerate(make_batches(0, steps)):
        x, y = rank_slice(batch, 0, 1)
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step(loss=1.0 + 0.01 * step)
    return model, optimizer


def test_process_group_argument_is_checked():
    model = make_model(0)
    for bad in (True, "world", 0):
        with pytest.raises(TypeError, match="process_group must be None"):
            at.Adam(model.parameters(), process_group=bad)
        with pytest.raises(TypeError, match="process_group must be None"):
            at.GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), process_group=bad)
    optimizer = at.AdamW(model.parameters(), process_group=False)
    assert optimizer._guard.process_group is False
    assert copy.deepcopy(optimizer)._guard.process_group is False


def test_guard_checkpoint_state_round_trip_in_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    _, optimizer = _trained({"loss_spike": True, "loss_warmup": 2, "snapshot_interval": 1})
    assert optimizer._guard.snapshot is not None
    entry = guard_checkpoint_state(optimizer)
    assert set(entry) == {"meta", "snapshot"}
    dcp.save({"guard": entry}, checkpoint_id=str(tmp_path / "a"))
    model = make_model(1)
    fresh = at.Adam(model.parameters(), lr=1e-2, guard=optimizer.guard.config)
    # What set_state_dict hands over: no "guard", so the guard starts afresh until loaded.
    saved = optimizer.state_dict()
    fresh.load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"]})
    assert fresh.guard.counters["n_steps"] == 0
    load_guard_checkpoint(fresh, checkpoint_id=str(tmp_path / "a"))
    assert fresh.guard.state_dict() == optimizer.guard.state_dict()
    for a, b in zip(fresh._guard.snapshot.params, optimizer._guard.snapshot.params, strict=True):
        assert torch.equal(a, b)
    for index, state in optimizer._guard.snapshot.to_state()["state"].items():
        loaded = fresh._guard.snapshot.to_state()["state"][index]
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # Without a snapshot there is no "snapshot" entry, and loading one clears the live one.
    _, plain = _trained(True)
    assert set(guard_checkpoint_state(plain)) == {"meta"}
    dcp.save({"guard": guard_checkpoint_state(plain)}, checkpoint_id=str(tmp_path / "b"))
    load_guard_checkpoint(fresh, checkpoint_id=str(tmp_path / "b"))
    assert fresh._guard.snapshot is None and not fresh.guard.has_snapshot
    assert fresh.guard.counters == plain.guard.counters


def test_guard_checkpoint_errors(tmp_path):
    import torch.distributed.checkpoint as dcp

    model, optimizer = _trained(True)
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        guard_checkpoint_state(model)
    unguarded = at.Adam(model.parameters(), guard=False)
    with pytest.raises(ValueError, match="has no adamkit guard"):
        guard_checkpoint_state(unguarded)
    with pytest.raises(ValueError, match="has no adamkit guard"):
        load_guard_checkpoint(unguarded, checkpoint_id=str(tmp_path))
    dcp.save({"guard": {"meta": '{"format": "something else"}'}}, checkpoint_id=str(tmp_path))
    before = optimizer.guard.state_dict()
    with pytest.raises(ValueError, match=r"is not a 'adamkit\.torch\.guard\.dcp' version 1"):
        load_guard_checkpoint(optimizer, checkpoint_id=str(tmp_path))
    assert optimizer.guard.state_dict() == before
