"""Shared pytest setup: one intra-op thread, and a per-test torch.Generator with a fresh (logged)
seed.

Tests run tiny ops whose cost is dominated by thread synchronisation; on the 2-core CI machine
(and worse when it is shared) one thread is several times faster and keeps results reproducible.
"""
import os
import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng(request):
    """A CPU generator seeded freshly per run; the seed is printed so a failure can be replayed
    with STARFAST_TEST_SEED=<seed>."""
    seed = int(os.environ.get("STARFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"{request.node.name}: STARFAST_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
