"""Fixtures for the adamkit.torch tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: one intra-op thread is several times faster than many fighting
    # over a small CI machine's cores.  Restored afterwards for other test folders.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
