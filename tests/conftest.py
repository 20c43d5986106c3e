"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread.

    Small models gain nothing from intra-op threads, and on a shared 2-core runner the threads spin against
    other processes (7 s of CPU instead of 0.5 s for one small coverage check).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
