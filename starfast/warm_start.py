"""The warm-start certificate of weight matching: which groups provably keep their assignment
when the target moves, so that a warm start (:func:`starfast.matching.match_weights` with
``init=previous_result``) need not solve them again.

Each result keeps, per source and group, the margin by which every unit's own column beats its
other columns in the final cost matrix (:func:`row_margins`). When the target moves by Δ, each
cost entry moves by at most ``‖Δ_j‖·‖B_k‖`` (Cauchy–Schwarz over the group's axes), so a group
whose margins exceed ``2·‖Δ_j‖·max_k ‖B_k‖`` keeps its assignment and starts clean; its margins
carry over, lowered by that bound (:meth:`WarmStart.certify`). The result is the one an ordinary
warm start would find; only work is skipped. ``max_k ‖B_k‖`` ignores permutations, so it is
computed once per bank and carried in the result (``source_scales``), and only for groups where a
cheap lower bound leaves enough sources certifiable (for unrelated models it is never needed).
Every bound is inflated for float rounding, so the certificate stays rigorous. A source
fingerprint (per-parameter squared norms, which permutations only reorder) makes sure a result
is only reused with its own sources (:meth:`WarmStart.check`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

import torch

from starfast.flat import ParamSpace
from starfast.spec import Group

if TYPE_CHECKING:
    from starfast.matching import MatchResult


class WarmStart:
    """What reusing a previous result needs to know about one bank of sources, built before
    matching from the bank's per-parameter views: the fingerprint of the sources (``[N,
    parameters]`` float64, each source's squared norm per parameter, kept in every result) and
    the squared norms of every parameter's rows, which bound the sources' unit norms."""

    def __init__(self, groups: List[Group], space: ParamSpace, bank_views):
        self.groups, self.space = groups, space
        self.row_squares = _row_squares(space, bank_views)
        self.fingerprint = torch.stack([squares.sum(1) for squares in self.row_squares.values()], 1).double().cpu()

    def check(self, previous: "MatchResult") -> None:
        """Raises ``ValueError`` unless ``previous`` is a result for these sources."""
        if previous.fingerprint.shape != self.fingerprint.shape or not _same_fingerprint(previous.fingerprint, self.fingerprint):
            raise ValueError(
                "match_weights: init is a MatchResult of other sources (their norms differ); warm-start from "
                "a result only with the same sources, or pass init=result.perms"
            )

    def certify(
        self, previous: "MatchResult", target_row: torch.Tensor, permuted
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The margins that carry over from ``previous`` to a match against ``target_row``, and
        the sources' largest unit norms (``source_scales``, group -> ``[N, 1]``) for the result.

        ``permuted``: per-parameter views of the working rows (the previous result's permuted
        sources). Returns group -> ``[N, size]`` margins for the groups that were certified: a
        source whose margins are all positive keeps that group's assignment. The other groups
        are absent: they are solved again for every source, margins unknown.
        """
        # A group's largest source unit norm ignores every permutation: computed once per bank,
        # and only for groups where a cheap lower bound (within ~3% of it) leaves at least a
        # quarter of the sources able to keep their assignment. It costs about as much as one
        # cost matrix for all sources, so it is not worth it for a few (unrelated models).
        source_scales = dict(previous.source_scales or {})
        move = _move_bounds(self.groups, self.space, target_row - previous.target.to(target_row), target_row)
        num_sources = self.fingerprint.shape[0]
        carried: Dict[str, torch.Tensor] = {}
        lower = None
        for group in self.groups:
            kept = previous.margins[group.name]
            if group.name not in source_scales:
                if lower is None:
                    lower = _scale_lower_bounds(self.groups, self.space, self.row_squares, permuted)
                if 4 * int((kept > move[group.name] * lower[group.name]).all(1).sum()) < num_sources:
                    continue
                source_scales.update(_largest_unit_norms([group], self.space, permuted))
            carried[group.name] = kept - move[group.name] * source_scales[group.name]
        return carried, source_scales


def row_margins(cost: torch.Tensor, relative: torch.Tensor, improved: torch.Tensor) -> torch.Tensor:
    """``[R, n]``: by how much each unit's column beats its best other column in the assignment
    kept (``relative`` where ``improved``, else the current one), float64 on the CPU."""
    identity = torch.arange(cost.shape[-1], device=cost.device).expand_as(relative)
    chosen = torch.where(improved[:, None], relative.to(cost.device), identity).unsqueeze(2)
    own = torch.gather(cost, 2, chosen).squeeze(2)
    best_other = cost.scatter(2, chosen, float("-inf")).amax(2)
    return (own - best_other).double().cpu()


def _row_squares(space: ParamSpace, views) -> Dict[str, torch.Tensor]:
    """name -> ``[R, d0]``: the squared norm of every parameter's rows (slices along its first
    axis) for the R rows behind ``views``, in one pass that reads memory in order. Permutations
    only reorder these, so they fingerprint a bank (summed per parameter) and bound its units."""
    squares = {}
    for entry in space.entries:
        view = views[entry.name]
        if view.dim() <= 2:  # a vector's rows are its elements (a scalar is one row)
            squares[entry.name] = view.reshape(view.shape[0], -1).square()
        else:
            squares[entry.name] = torch.linalg.vector_norm(view.flatten(2), dim=2).square()
    return squares


def _unit_squares(groups: List[Group], space: ParamSpace, views) -> Dict[str, torch.Tensor]:
    """group -> ``[R, n]``: every unit's squared norm summed over the group's axes, for the R rows
    behind ``views``. Each parameter is reduced once, over the axes no group acts on (a
    contiguous reduction for convolutions), and the groups sum the small result: reducing each
    group's axis separately would stride through every tensor twice."""
    acting: Dict[str, List[int]] = {}
    for group in groups:
        for axis in group.axes:
            if axis.name in space and axis.axis not in acting.setdefault(axis.name, []):
                acting[axis.name].append(axis.axis)
    reduced = {}
    for name, axes in acting.items():
        axes.sort()
        view = views[name]
        rest = [dim + 1 for dim in range(view.dim() - 1) if dim not in axes]
        reduced[name] = torch.linalg.vector_norm(view, dim=rest).square() if rest else view.square()
    squares = {}
    for group in groups:
        total = None
        for axis in group.axes:
            if axis.name not in space:
                continue
            dim = 1 + acting[axis.name].index(axis.axis)
            unit = reduced[axis.name].narrow(dim, axis.offset, group.size)
            others = [d for d in range(1, unit.dim()) if d != dim]
            term = unit.sum(others).reshape(unit.shape[0], group.size) if others else unit
            total = term if total is None else total + term
        squares[group.name] = total
    return squares


def _largest_unit_norms(groups: List[Group], space: ParamSpace, sources) -> Dict[str, torch.Tensor]:
    """group -> ``[N, 1]`` float64: an upper bound on ``max_k ‖B_k‖`` over the group's units, per
    source.

    Summed in the sources' own precision (a float64 copy of the bank would cost more than the rest
    of a warm start), then inflated by ``(m + 4)·eps`` for ``m`` terms per unit: the worst-case
    relative error of any summation order of rounded squares (a norm squared counts as its
    terms' sum plus two roundings) and of the square root, so the bound stays rigorous."""
    squares = _unit_squares(groups, space, sources)
    scales = {}
    for group in groups:
        eps = torch.finfo(squares[group.name].dtype).eps
        largest = squares[group.name].amax(1, keepdim=True).double()
        scales[group.name] = (largest * (1 + (_terms_per_unit(group, space) + 4) * eps)).sqrt().cpu()
    return scales


def _scale_lower_bounds(groups: List[Group], space: ParamSpace, row_squares, sources) -> Dict[str, torch.Tensor]:
    """group -> ``[N, 1]`` float64: a lower bound on ``max_k ‖B_k‖``, from the sources'
    :func:`_row_squares`: the largest unit norm over the unit-major (first-axis) terms alone, or
    the mean unit norm ``‖B‖_F / √n``, whichever is larger; deflated by ``(m + 4)·eps`` for
    rounding. Only an axis on part of a later dimension (a concatenation) reads ``sources``."""
    bounds = {}
    for group in groups:
        n, unit_major, total = group.size, None, None
        for axis in group.axes:
            if axis.name not in space:
                continue
            shape = space.entry(axis.name).shape
            if axis.axis == 0:
                unit = row_squares[axis.name].narrow(1, axis.offset, n)
                unit_major = unit if unit_major is None else unit_major + unit
                term = unit.sum(1)
            elif n == shape[axis.axis]:
                term = row_squares[axis.name].sum(1)
            else:
                segment = sources[axis.name].narrow(axis.axis + 1, axis.offset, n)
                term = torch.linalg.vector_norm(segment.flatten(1), dim=1).square()
            total = term if total is None else total + term
        largest = total / n if unit_major is None else torch.maximum(unit_major.amax(1), total / n)
        eps = torch.finfo(largest.dtype).eps
        bounds[group.name] = (largest.double() * (1 - (_terms_per_unit(group, space) + 4) * eps)).clamp(min=0).sqrt().cpu()[:, None]
    return bounds


def _terms_per_unit(group: Group, space: ParamSpace) -> int:
    """How many weights make up one unit of ``group``: the ``m`` of the rounding bounds above."""
    total = 0
    for axis in group.axes:
        if axis.name in space:
            entry = space.entry(axis.name)
            total += entry.numel // entry.shape[axis.axis]
    return total


def _move_bounds(groups: List[Group], space: ParamSpace, delta: torch.Tensor, target_row: torch.Tensor) -> Dict[str, torch.Tensor]:
    """group -> ``[n]``: times ``max_k ‖B_k‖``, a bound on how much the target's move ``delta``
    can shrink each unit's margin: ``2·‖Δ_j‖`` plus float rounding of the cost matrices,
    ``64·eps·‖θ_j‖``."""
    squares = _unit_squares(groups, space, space.views(torch.stack([delta, target_row]).double()))
    eps = torch.finfo(target_row.dtype).eps
    return {name: (2 * unit[0].sqrt() + 64 * eps * unit[1].sqrt()).cpu() for name, unit in squares.items()}


def _same_fingerprint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a reduction of positive terms (relative error ~m·eps at worst,
    whatever the summation order); another model's norms differ by far more than 1e-5."""
    return bool(((a - b).abs() <= 1e-5 * torch.maximum(a, b)).all())
