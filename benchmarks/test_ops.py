"""Op benchmarks (CPU): the compiled gathers against the obvious torch calls, on a small row and a
large one.

- ``permute <row>``: ``ops.permute(row, index)`` against ``row.index_select(0, index)``.
- ``lerp_gather <row>``: ``ops.lerp_gather(θ, bank, 0, index, 0.3)`` against
  ``torch.lerp(θ, bank[0].index_select(0, index), 0.3)``, with θ requiring grad as Starlight calls it
  (the autograd node is recorded, no backward); ``lerp_gather <row> no-grad`` with a plain θ.

Rows: ``mlp-digits`` (the digits MLP at width 40: 4,650 parameters, where the per-call overhead
dominates — Starlight calls ``lerp_gather`` every step) and ``resnet18`` (11.2M parameters, where
memory traffic does). Index maps are real ones (a random permutation of each model's spec). One
intra-op thread, as in the other benchmarks; the ``resnet18`` groups also run on two threads
(``2 threads``), which exercises the kernels' parallel loops.
"""
import functools

import pytest
import torch

from starfast import models, ops
from starfast.flat import ParamSpace

ROWS = {"mlp-digits": ("mlp", 10, 1, (1, 8, 8), {"width": 40}), "resnet18": ("resnet18", 10, 3, (3, 32, 32), {})}
CASES = [("mlp-digits", 1), ("resnet18", 1), ("resnet18", 2)]


@functools.lru_cache(maxsize=None)
def make_row(row_name: str):
    """θ (the flat model), a bank of two perturbed copies, and a real index map of the model."""
    name, classes, channels, shape, kw = ROWS[row_name]
    generator = torch.Generator().manual_seed(0)
    model = models.build(name, classes, channels, shape, **kw)
    space, spec = ParamSpace(model), models.permutation_spec(model)
    theta = space.flatten(model).detach()
    bank = theta + 0.05 * torch.randn(2, space.size, generator=generator)
    return theta, bank, spec.index_map(space, spec.random(generator))


@pytest.fixture(params=CASES, ids=[f"{name}-{threads}t" for name, threads in CASES])
def case(request):
    """(row name, θ, bank, index, threads), with torch's intra-op threads set for the test."""
    row_name, threads = request.param
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield (row_name, *make_row(row_name), threads)
    torch.set_num_threads(before)


def group(op: str, row_name: str, threads: int, suffix: str = "") -> str:
    return f"{op} {row_name}{suffix}" + (f" {threads} threads" if threads > 1 else "")


def rounds_for(theta: torch.Tensor):
    return 30 if theta.numel() > 1_000_000 else None  # None: pytest-benchmark calibrates


@pytest.mark.parametrize("role", ["ours", "baseline"])
def test_permute(bench, case, role):
    name, theta, _, index, threads = case
    fn = (lambda: ops.permute(theta, index)) if role == "ours" else (lambda: theta.index_select(0, index))
    assert torch.equal(fn(), theta[index])
    bench(group("permute", name, threads), role, fn, rounds=rounds_for(theta))


@pytest.mark.parametrize("role", ["ours", "baseline"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_lerp_gather(bench, case, role, grad):
    name, theta, bank, index, threads = case
    theta = theta.clone().requires_grad_(grad)
    if role == "ours":
        fn = lambda: ops.lerp_gather(theta, bank, 0, index, 0.3)  # noqa: E731
    else:
        fn = lambda: torch.lerp(theta, bank[0].index_select(0, index), 0.3)  # noqa: E731
    torch.testing.assert_close(fn(), torch.lerp(theta, bank[0][index], 0.3))
    bench(group("lerp_gather", name, threads, "" if grad else " no-grad"), role, fn, rounds=rounds_for(theta))
