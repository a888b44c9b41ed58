"""linear_assignment vs scipy (and lapx when installed) on weight-matching-like and iid costs,
single problems and a batch of 50 x 512 against a scipy loop."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from starfast.lap import linear_assignment
from starfast.testing.lap_problems import make_costs

SIZES = [64, 256, 512, 1024, 2048]


def _rounds(n: int) -> int:
    return 5 if n >= 2048 else 11 if n >= 1024 else 31


def _iterations(n: int) -> int:
    return 100 if n <= 64 else 1  # a ~30 µs call: time 100 in a round, or jitter is the median


@pytest.mark.parametrize("kind", ["wm", "iid"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("solver", ["ours", "scipy", "lapx"])
def test_single(bench, kind, n, solver):
    cost = make_costs(kind, 1, n, torch.Generator().manual_seed(n))[0]
    group = f"lap {kind} n={n}"
    if solver == "ours":
        bench(group, "ours", linear_assignment, cost, True, rounds=_rounds(n), iterations=_iterations(n))
    elif solver == "scipy":
        array = cost.numpy()
        bench(group, "baseline", lambda: linear_sum_assignment(array, maximize=True), rounds=_rounds(n), iterations=_iterations(n))
    else:
        lapx = pytest.importorskip("lap")  # lapx is an optional comparison point, not a dependency
        negated = -cost.numpy()
        bench(group, "lapx", lambda: lapx.lapjv(negated), rounds=_rounds(n), iterations=_iterations(n))


@pytest.mark.parametrize("solver", ["ours", "scipy"])
def test_batch_50x512(bench, solver):
    costs = make_costs("wm", 50, 512, torch.Generator().manual_seed(7))
    if solver == "ours":
        bench("lap batch 50x512 wm", "ours", linear_assignment, costs, True, rounds=7)
    else:
        arrays = list(costs.numpy())
        bench("lap batch 50x512 wm", "baseline", lambda: [linear_sum_assignment(a, maximize=True) for a in arrays], rounds=7)
