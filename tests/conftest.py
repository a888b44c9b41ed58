"""Shared pytest setup: one intra-op thread, a per-test torch.Generator with a fresh (logged)
seed, and the ``needs_extension`` marker.

Tests run tiny ops whose cost is dominated by thread synchronisation; on the 2-core CI machine
(and worse when it is shared) one thread is several times faster and keeps results reproducible.
"""
import os
import random

import pytest
import torch

from starfast import extension, ops

torch.set_num_threads(1)


def pytest_runtest_setup(item):
    """``@pytest.mark.needs_extension``: a test of the compiled extension itself. It is skipped
    only in the fallback run (``STARFAST_NO_EXTENSION=1``, ``make test-fallback``), which tests the
    pure-PyTorch references instead; anywhere else a missing extension fails it, never skips it."""
    if item.get_closest_marker("needs_extension") is None:
        return
    if extension.disabled():
        pytest.skip(f"{extension.DISABLE_VARIABLE}=1: this run tests the pure-PyTorch references, not the extension")
    if not ops.HAVE_EXTENSION:
        pytest.fail("this test needs starfast's compiled extension, which did not load (see the RuntimeWarning "
                    "of starfast.extension); build it with `make install`, or run the fallback suite with "
                    f"{extension.DISABLE_VARIABLE}=1", pytrace=False)


@pytest.fixture
def rng(request):
    """A CPU generator seeded freshly per run; the seed is printed so a failure can be replayed
    with STARFAST_TEST_SEED=<seed>."""
    seed = int(os.environ.get("STARFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"{request.node.name}: STARFAST_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
