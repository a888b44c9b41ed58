"""linear_assignment against scipy on thousands of fresh random problems, and its error contract;
costs up to the largest float64 / float32 against exact brute force (fractions)."""
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from starfast import ops
from starfast.lap import assignment_objective, linear_assignment, linear_assignment_reference
from starfast.testing.lap_problems import KINDS, make_costs


def scipy_objective(cost: np.ndarray, maximize: bool) -> float:
    rows, cols = linear_sum_assignment(cost, maximize=maximize)
    return float(cost[rows, cols].sum())


def assert_optimal(cost: torch.Tensor, columns: torch.Tensor, maximize: bool) -> None:
    assert columns.dtype == torch.int64 and columns.shape == cost.shape[:-1]
    n = cost.shape[-1]
    assert torch.equal(columns.sort(-1).values, torch.arange(n).expand_as(columns)), "not a permutation"
    ours = assignment_objective(cost, columns)
    for b, problem in enumerate(cost.double().numpy().reshape(-1, n, n)):
        want = scipy_objective(problem, maximize)
        assert abs(float(ours.reshape(-1)[b]) - want) <= 1e-9 * max(1.0, abs(want)), (b, float(ours.reshape(-1)[b]), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_small_problems_match_scipy(kind, maximize, rng):
    # 7 kinds x 2 directions x 25 sizes x 8 problems = 2800 problems.
    for n in range(1, 26):
        cost = make_costs(kind, 8, n, rng)
        assert_optimal(cost, linear_assignment(cost, maximize=maximize), maximize)


@pytest.mark.parametrize("kind", ["iid", "ties", "wm", "huge"])
@pytest.mark.parametrize("n", [64, 200, 600])
def test_large_problems_match_scipy(kind, n, rng):
    cost = make_costs(kind, 2, n, rng)
    for maximize in (False, True):
        assert_optimal(cost, linear_assignment(cost, maximize=maximize), maximize)


@pytest.mark.parametrize("kind", ["iid", "wm", "ties"])
def test_float32_costs(kind, rng):
    cost = make_costs(kind, 4, 50, rng, dtype=torch.float32)
    columns = linear_assignment(cost, maximize=True)
    # The float32 matrix is solved exactly as its float64 widening would be.
    assert_optimal(cost.double(), columns, True)


def test_single_and_batched_agree(rng):
    cost = make_costs("iid", 6, 40, rng)
    batched = linear_assignment(cost)
    for b in range(6):
        assert torch.equal(linear_assignment(cost[b]), batched[b])


def test_reference_path_agrees(rng):
    cost = make_costs("wm", 3, 30, rng)
    ours = assignment_objective(cost, linear_assignment(cost, maximize=True))
    ref = assignment_objective(cost, linear_assignment_reference(cost, maximize=True))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solve", [linear_assignment, linear_assignment_reference], ids=["public", "reference"])
def test_edge_sizes(solve):
    # The reference crashed on a 0 x 0 cost (numpy cannot reshape an empty batch with -1).
    assert solve(torch.zeros(0, 0)).shape == (0,)
    assert solve(torch.zeros(3, 0, 0)).shape == (3, 0)
    assert solve(torch.zeros(0, 4, 4)).shape == (0, 4)
    assert solve(torch.tensor([[5.0]])).tolist() == [0]
    assert solve(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), maximize=True).tolist() == [0, 1]


def extreme_costs(kind: str, n: int, dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    """Entries up to the dtype's largest finite value, whose sums overflow float64: uniform in
    [-max, max]; only -max, 0 and max; or max everywhere but one small entry per row."""
    top = torch.finfo(dtype).max
    if kind == "uniform":
        cost = (2 * torch.rand(n, n, generator=rng, dtype=torch.float64) - 1) * top
    elif kind == "signs":
        cost = torch.randint(-1, 2, (n, n), generator=rng).double() * top
    else:
        cost = torch.full((n, n), top, dtype=torch.float64)
        cost[torch.arange(n), torch.randint(0, n, (n,), generator=rng)] = torch.randn(n, generator=rng, dtype=torch.float64)
    return cost.to(dtype)


def exact_objective(cost: torch.Tensor, columns) -> Fraction:
    return sum((Fraction(float(cost[i, int(j)])) for i, j in enumerate(columns)), Fraction(0))


@pytest.mark.parametrize("solve", [linear_assignment, linear_assignment_reference], ids=["public", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["uniform", "signs", "rows"])
def test_costs_near_the_largest_float_are_solved(solve, dtype, kind, rng):
    """The compiled solver aborted the process (``free(): invalid pointer``) on float64 costs near
    ±1.7e308, and scipy (the reference) answered wrongly: intermediate sums overflowed. Exact brute
    force over all permutations (n <= 6, fractions) and, for larger n, the exact objective of
    scipy's answer on the costs times 2^-64 (a power of two: the same problem, no overflow)."""
    for n in (1, 2, 3, 4, 5, 6, 30):
        for maximize in (False, True):
            cost = extreme_costs(kind, n, dtype, rng)
            columns = solve(cost, maximize=maximize)
            assert sorted(columns.tolist()) == list(range(n)), f"n = {n}: not a permutation: {columns.tolist()}"
            sign = -1 if maximize else 1
            ours = sign * exact_objective(cost, columns.tolist())
            if n <= 6:
                best = min(sign * exact_objective(cost, perm) for perm in itertools.permutations(range(n)))
            else:
                scaled = np.ldexp(cost.double().numpy(), -64)
                best = sign * exact_objective(cost, linear_sum_assignment(scaled, maximize=maximize)[1])
            # Solved in float64: exact to a few ulps of the largest entry per row.
            slack = Fraction(4 * n) * Fraction(float(cost.double().abs().max())) * Fraction(2) ** -52
            top = Fraction(torch.finfo(dtype).max)
            assert ours <= best + slack, (f"n = {n}, maximize = {maximize}: objective {float(sign * ours / top):.6g} "
                                          f"vs optimum {float(sign * best / top):.6g} (in units of the dtype's max)")



@pytest.mark.parametrize(
    "cost, message",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN or infinite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "NaN or infinite"),
        (torch.zeros(2, 3), "square"),
        (torch.zeros(4), "\\[n, n\\]"),
        (torch.zeros(2, 2, 2, 2), "\\[n, n\\]"),
        (torch.zeros(3, 3, dtype=torch.int64), "float32 or float64"),
        (torch.zeros(3, 3, dtype=torch.complex64), "float32 or float64"),
    ],
)
def test_bad_input_is_a_clear_value_error(cost, message):
    with pytest.raises(ValueError, match=message):
        linear_assignment(cost)


@pytest.mark.needs_extension
def test_registered_op_errors_name_the_problem():
    bad = torch.zeros(2, 3, 3)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="problem 1"):
        ops.linear_assignment_op(bad, False)


@pytest.mark.needs_extension
def test_opcheck(rng):
    for cost in (torch.randn(5, 5, generator=rng), torch.randn(3, 7, 7, generator=rng, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.starfast.linear_assignment, (cost, True), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.needs_extension
def test_direct_call_dispatcher_and_compiled_trace_agree_with_scipy(rng):
    """linear_assignment calls the CPU kernel directly outside torch.compile and the registered op
    while tracing: both paths, and the op called through torch.ops, give scipy's answer."""
    cost = make_costs("wm", 4, 24, rng)
    expected = linear_assignment_reference(cost, maximize=True)
    compiled = torch.compile(lambda c: linear_assignment(c, maximize=True), backend="eager", fullgraph=True)
    for path, columns in (("direct", linear_assignment(cost, maximize=True)),
                          ("torch.ops", torch.ops.starfast.linear_assignment(cost, True)),
                          ("torch.compile", compiled(cost))):
        assert torch.equal(columns, expected), f"{path}: {columns} vs scipy {expected}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_input_returns_on_cuda(rng):
    cost = make_costs("iid", 2, 20, rng).cuda()
    columns = linear_assignment(cost)
    assert columns.device == cost.device
    assert_optimal(cost.cpu(), columns.cpu(), False)
