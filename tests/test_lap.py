"""linear_assignment against scipy on thousands of fresh random problems, and its error contract."""
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


def test_edge_sizes():
    assert linear_assignment(torch.zeros(0, 0)).shape == (0,)
    assert linear_assignment(torch.zeros(3, 0, 0)).shape == (3, 0)
    assert linear_assignment(torch.tensor([[5.0]])).tolist() == [0]
    assert linear_assignment(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), maximize=True).tolist() == [0, 1]


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


def test_registered_op_errors_name_the_problem():
    if not ops.HAVE_EXTENSION:
        pytest.skip("extension not built: only the compiled op has these checks")
    bad = torch.zeros(2, 3, 3)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="problem 1"):
        ops.linear_assignment_op(bad, False)


def test_opcheck(rng):
    if not ops.HAVE_EXTENSION:
        pytest.skip("extension not built: only the compiled op has these checks")
    for cost in (torch.randn(5, 5, generator=rng), torch.randn(3, 7, 7, generator=rng, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.starfast.linear_assignment, (cost, True), test_utils=("test_schema", "test_faketensor"))


def test_direct_call_dispatcher_and_compiled_trace_agree_with_scipy(rng):
    """linear_assignment calls the CPU kernel directly outside torch.compile and the registered op
    while tracing: both paths, and the op called through torch.ops, give scipy's answer."""
    if not ops.HAVE_EXTENSION:
        pytest.skip("extension not built: the reference is the only path")
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
