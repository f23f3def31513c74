"""Fixtures for the torch.distributed tests (real gloo process groups on CPU, see _dist_launch)."""

import pytest
import torch

# Builds of torch without torch.distributed or gloo (some macOS/Windows wheels) cannot run these.
_AVAILABLE = torch.distributed.is_available() and torch.distributed.is_gloo_available()
collect_ignore_glob = [] if _AVAILABLE else ["test_*.py"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The reference runs in this process on tiny tensors; one thread avoids fighting with the
    # rank processes (one thread each) over a small CI machine's cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
