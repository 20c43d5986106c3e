"""Fixtures shared by several test files.

The tests are grouped by area: ``core/`` (spec, sites, rewrite, schedules, summary), ``regularizers/`` (the ops
and their contract), ``training/`` (the recipes' config, data, loop and resume), ``integrations/`` (timm's
``train.py`` and test checks, Hugging Face, Lightning, detection backbones) and ``tools/`` (CLI, viz, coverage,
benchmarks, packaging). ``tiny.py`` (tiny models, images and runs) and ``scripts.py`` (load a repository script,
a child process's environment) sit here, beside this file, which puts this folder on ``sys.path`` for them.
"""

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
