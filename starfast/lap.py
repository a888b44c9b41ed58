"""Dense square linear assignment: the public entry point and its scipy reference.

``linear_assignment(cost, maximize=False)`` returns, for every row, the column it is assigned to
in an optimal assignment. It accepts one ``[n, n]`` problem or a batch ``[B, n, n]`` on any
device (problems are solved on the CPU by the compiled Jonker–Volgenant solver in ``csrc/lap``,
in parallel threads over the batch with the GIL released) and returns int64 on the input's
device. ``linear_assignment_reference`` solves the same problems with scipy, one at a time.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from starfast import ops


def _validate(cost: torch.Tensor, check_finite: bool = True) -> None:
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"linear_assignment: cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"linear_assignment: cost must be [n, n] or [B, n, n], got shape {tuple(cost.shape)}")
    if cost.shape[-1] != cost.shape[-2]:
        raise ValueError(
            f"linear_assignment: cost must be square, got shape {tuple(cost.shape)}; pad rectangular "
            "problems with zeros (or a large constant) to make them square"
        )
    if cost.is_complex() or not cost.is_floating_point():
        raise ValueError(f"linear_assignment: cost must be float32 or float64, got {cost.dtype}")
    # The compiled solver validates finiteness in its first pass over the matrix (cheaper than a
    # separate torch.isfinite here, which costs more than solving a weight-matching problem).
    if check_finite and cost.numel() and not bool(torch.isfinite(cost).all()):
        raise ValueError("linear_assignment: cost has NaN or infinite entries")


def linear_assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Optimal assignment of rows to columns for one ``[n, n]`` or a batch ``[B, n, n]`` of costs.

    Returns a LongTensor ``[n]`` (or ``[B, n]``) holding the column of each row, on ``cost``'s
    device. Raises ``ValueError`` for non-square, wrong-rank, non-float or non-finite input.
    """
    _validate(cost, check_finite=not ops.HAVE_EXTENSION)
    work = cost.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.double()
    if not ops.HAVE_EXTENSION:
        return linear_assignment_reference(work, maximize).to(cost.device)
    if work.device.type == "cpu":  # skip two no-op .to calls: they are ~10% of an n = 64 solve
        return ops.linear_assignment_op(work, bool(maximize))
    return ops.linear_assignment_op(work.cpu(), bool(maximize)).to(cost.device)


# scipy's sums (like the compiled solver's, csrc/lap/lap.cpp) overflow when entries come near the
# largest float64 (2^1024): such problems are solved scaled by a power of two, which is exact and
# changes no comparison, so that their largest entry is below 2^960.
_LARGEST_SOLVED_EXPONENT = 960


def linear_assignment_reference(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """The same contract as :func:`linear_assignment`, solved by scipy one problem at a time."""
    _validate(cost)
    n = cost.shape[-1]
    problems = cost.detach().cpu().double().numpy().reshape(cost.shape[:-2].numel(), n, n)
    columns = np.empty(problems.shape[:2], dtype=np.int64)
    for b, problem in enumerate(problems):
        peak = float(np.abs(problem).max()) if n else 0.0
        if peak >= 2.0**_LARGEST_SOLVED_EXPONENT:
            problem = np.ldexp(problem, _LARGEST_SOLVED_EXPONENT - int(np.frexp(peak)[1]))
        rows, cols = linear_sum_assignment(problem, maximize=maximize)
        columns[b, rows] = cols
    return torch.from_numpy(columns).reshape(cost.shape[:-1]).to(cost.device)


def assignment_objective(cost: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``sum_i cost[..., i, columns[..., i]]`` in float64: the value of an assignment.

    The ``n`` picked entries are converted, not the ``n x n`` matrix (exact either way), which
    keeps it cheap inside the weight matching loop."""
    picked = torch.gather(cost, -1, columns.unsqueeze(-1)).squeeze(-1)
    return picked.double().sum(-1)
