"""adamkit.torch.distributed's helpers, and impl="reference" refusing DTensors it cannot pair up.

:func:`any_rank` is the collective the stability guard uses so that all ranks skip a step
together; :func:`state_nbytes` is how the other tests measure state per rank.

``adamkit.torch.formats.round_to_bf16_`` with a ``ShardRng`` (what an FSDP2 shard of a bfloat16
parameter rounds with under ``param_rounding="stochastic"``): the shards of a tensor get the
whole tensor's bits, and every rank's generator advances alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _dist_launch import run_ranks
from torch import nn

import adamkit.torch as at
from adamkit.kernels.stored import ShardRng
from adamkit.torch.distributed import any_rank, state_nbytes
from adamkit.torch.formats import round_to_bf16_

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return run_ranks("checks", WORLD_SIZE, tmp_path_factory.mktemp("checks"), {})


def test_any_rank_agrees_across_ranks(checks):
    for rank, result in enumerate(checks):
        assert result["any_rank"] == {
            "only_rank0": True,
            "none": False,
            "all": True,
            "tensor_last_rank": True,
        }, f"rank {rank}: {result['any_rank']}"


def test_reference_impl_refuses_mismatched_dtensor_layout(checks):
    for rank, result in enumerate(checks):
        check = result["reference_on_mismatched_dtensor"]
        assert check["outcome"].startswith("ValueError: impl='reference'"), (rank, check)
        assert "laid out" in check["outcome"], (rank, check)
        assert check["param_unchanged"], (rank, check)
        assert check["step"] == 0.0, (rank, check)


def test_any_rank_without_process_group():
    assert any_rank(True) is True
    assert any_rank(False) is False
    flag = torch.tensor([1], dtype=torch.int32)
    assert any_rank(flag) is True
    assert any_rank(torch.tensor(False)) is False
    assert torch.equal(flag, torch.tensor([1], dtype=torch.int32))
    for bad in (1, 1.0, None, torch.tensor([0.5]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="flag"):
            any_rank(bad)


def test_state_nbytes_counts_each_state_tensor_once():
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2)).to(torch.float64)
    optimizer = at.Adam(model.parameters(), amsgrad=True)
    assert state_nbytes(optimizer) == 0
    model(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    optimizer.step()
    numbers = sum(p.numel() for p in model.parameters())
    steps = 4 * torch.tensor(0.0).element_size()  # one float32 `step` per parameter
    assert state_nbytes(optimizer) == 3 * 8 * numbers + steps
    # A tensor reachable twice is held once.
    first = next(iter(optimizer.state.values()))
    first["alias"] = first["exp_avg"]
    assert state_nbytes(optimizer) == 3 * 8 * numbers + steps
    with pytest.raises(TypeError, match="optimizer"):
        state_nbytes(model)


def test_round_to_bf16_shards_get_the_bits_of_the_whole():
    # A (7, 33) tensor split by rows 3 + 4, as FSDP2 splits it on 2 ranks: each "rank" holds a
    # copy of the optimizer's generator and rounds its rows from their flat offset.
    values = torch.randn(7, 33, generator=torch.Generator().manual_seed(11)) * 1e-3 + 1
    seed = int(torch.randint(0, 2**62, (1,)).item())
    whole = torch.zeros(7, 33, dtype=torch.bfloat16)
    one = np.random.default_rng(seed)
    round_to_bf16_(whole, values.numpy(), one)
    states = []
    for rows in (slice(0, 3), slice(3, 7)):
        shard = torch.zeros(rows.stop - rows.start, 33, dtype=torch.bfloat16)
        parent = np.random.default_rng(seed)
        round_to_bf16_(shard, values[rows].numpy(), ShardRng(parent, rows.start * 33))
        assert torch.equal(shard.view(torch.int16), whole[rows].view(torch.int16)), rows
        states.append(parent.bit_generator.state)
    assert states[0] == states[1] == one.bit_generator.state
    # Stochastic, not nearest: values between two bf16 neighbours go both ways.
    nearest = values.to(torch.bfloat16)
    assert 0 < int((whole != nearest).sum()) < whole.numel()
