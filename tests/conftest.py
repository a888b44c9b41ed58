"""Shared pytest fixtures: a per-test torch.Generator with a fresh (logged) seed."""
import os
import random

import pytest
import torch


@pytest.fixture
def rng(request):
    """A CPU generator seeded freshly per run; the seed is printed so a failure can be replayed
    with STARFAST_TEST_SEED=<seed>."""
    seed = int(os.environ.get("STARFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"{request.node.name}: STARFAST_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
