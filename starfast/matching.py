"""Weight matching (Ainsworth et al., "Git Re-Basin", 2022), batched over many source models.

``match_weights(target, sources, spec)`` finds, for every source row, the permutation π that
maximises ⟨target, π(source)⟩ by coordinate descent over the spec's groups: each sweep visits the
groups in a random order and, for one group, solves the linear assignment that is optimal with
all other groups held fixed. All N sources advance together: one group's N cost matrices come
from one matmul on the rows' device and go to one batched ``linear_assignment`` call.

Implementation choices (why it is fast): the sources are kept *already permuted* in working
per-parameter tensors ``[N, *shape]``, and each group's assignment is solved relative to the
current permutation (cost against the permuted sources, then ``new = current[relative]``).
Building a cost matrix therefore never re-gathers the other groups' axes; only the parameters a
group touches are re-gathered, and only after it improved. A relative assignment is accepted only
when it strictly raises that source's objective, so the objective never decreases and ties never
flip a converged answer. A group is re-solved for a source only when it is *dirty*: a group that
shares a parameter with it changed since it was last solved. Skipping clean groups changes no
result (their assignment problem is the one already solved) but makes confirmation sweeps and
warm starts cheap. A source stops after a sweep with no accepted change (or ``max_iter`` sweeps).

Warm starts from a previous result (``init=previous_match``, the same sources, a moved target)
also skip the groups that *provably* cannot change. Each result keeps, per source and group, the
margin by which every unit's own column beats its other columns in the final cost matrix. When
the target moves by Δ, each cost entry moves by at most ``‖Δ_j‖·‖B_k‖`` (Cauchy–Schwarz over the
group's axes), so a group whose margins exceed ``2·‖Δ_j‖·max_k ‖B_k‖`` keeps its assignment and
starts clean; its margins carry over, lowered by that bound. The result is the one an ordinary
warm start would find; only work is skipped.

Starting point: the identity (Git Re-Basin's choice, the default), warm-start permutations, or
``init="sorted"``: every group solved once, independently, on each unit's weights *sorted*, which
is invariant to all other groups' permutations. Coordinate descent from the identity can stall
when one group is shared by the whole network (a transformer's residual stream mixes every
block's weights into one cost matrix); the sorted start recovers a permuted copy exactly and gives
a coupling-free first guess for unrelated models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from starfast.flat import ParamSpace
from starfast.lap import linear_assignment
from starfast.ops import permute
from starfast.spec import Group, PermutationSpec

Perm = Dict[str, torch.Tensor]
ModelLike = Union[nn.Module, Mapping[str, torch.Tensor], torch.Tensor]


@dataclass
class MatchResult:
    """What :func:`match_weights` found for each source (leading dim N, or none for one source).

    ``perms``: group -> ``[N, size]`` gather indices, ``index_maps``: ``[N, P]`` (``permute(source,
    index_map) == permuted``), ``permuted``: ``[N, P]`` the permuted sources, ``objective``:
    ``[sweeps + 1, N]`` ⟨target, π(source)⟩ at the start and after every sweep (float64),
    ``sweeps``: ``[N]`` sweeps run per source (the last one made no change unless max_iter hit).
    ``target``, ``margins`` (group -> ``[N, size]``, ``-inf`` where unknown) and ``fingerprint``
    (``[N]`` row sums of the sources) let a later call warm-start from this result.
    """

    perms: Perm
    index_maps: torch.Tensor
    permuted: torch.Tensor
    objective: torch.Tensor
    sweeps: torch.Tensor
    target: torch.Tensor
    margins: Dict[str, torch.Tensor]
    fingerprint: torch.Tensor


def match_weights(
    target: ModelLike,
    sources: Union[ModelLike, Sequence[ModelLike]],
    spec: PermutationSpec,
    *,
    space: Optional[ParamSpace] = None,
    init: Union[Perm, str, "MatchResult", None] = None,
    max_iter: int = 100,
    seed: int = 0,
) -> MatchResult:
    """Permutations of ``sources`` that best align them with ``target`` (see module docstring).

    ``target``: a module, a state dict or a row ``[P]``. ``sources``: one of those, a list of
    them, or a bank ``[N, P]``. Rows need ``space`` (inferred from a module target). ``init``:
    ``None`` (identity), ``"sorted"`` (see module docstring), warm-start permutations
    (group -> ``[N, size]`` or ``[size]``), or the previous :class:`MatchResult` for the same
    sources (warm start that also skips provably unchanged groups; see the module docstring).
    ``seed`` fixes the random group order of every sweep (the same order for all sources).
    Returns a :class:`MatchResult`; with a single (non-bank) source its tensors have no N dim.
    """
    if max_iter < 1:
        raise ValueError(f"match_weights: max_iter must be >= 1, got {max_iter}")
    if space is None:
        if not isinstance(target, nn.Module):
            raise ValueError("match_weights: pass space=ParamSpace(model) when the target is a row or state dict")
        space = ParamSpace(target)
    target_row = _as_row(target, space, "target")
    bank, single = _as_bank(sources, space)
    bank = bank.to(device=target_row.device, dtype=target_row.dtype)
    num_sources = bank.shape[0]
    groups = [group for group in spec.groups if any(axis.name in space for axis in group.axes)]

    target_views = space.views(target_row)
    fingerprint = bank.sum(1, dtype=torch.float64).cpu()
    previous = _batched(init, num_sources, fingerprint) if isinstance(init, MatchResult) else None
    if isinstance(init, str):
        if init != "sorted":
            raise ValueError(f"match_weights: init must be None, 'sorted', a dict of permutations or a MatchResult, got {init!r}")
        init = _sorted_init(groups, space, target_views, space.views(bank))
    perms = _initial_perms(spec, previous.perms if previous is not None else init, num_sources, target_row.device)
    if previous is not None:
        start = previous.permuted.to(bank.device)
    else:
        start = permute(bank, spec.index_map(space, perms)) if init is not None else bank
    touched = sorted({axis.name for group in groups for axis in group.axes if axis.name in space})
    start_views = space.views(start)
    # Always a copy: with one source the view is already contiguous and would alias the input.
    permuted = {name: start_views[name].clone(memory_format=torch.contiguous_format) for name in touched}
    neighbours = _neighbours(groups)
    unknown = float("-inf")
    margins = {group.name: torch.full((num_sources, group.size), unknown, dtype=torch.float64) for group in groups}
    dirty = {group.name: torch.ones(num_sources, dtype=torch.bool) for group in groups}
    if previous is not None:
        for group in groups:
            slack = _margin_bound(group, space, target_row - previous.target.to(target_row), target_row, permuted)
            carried = previous.margins[group.name] - slack
            margins[group.name] = carried
            dirty[group.name] = ~(carried > 0).all(1)

    fixed = _objective(target_views, start_views, [e.name for e in space.entries if e.name not in permuted])
    history = [fixed + _objective(target_views, permuted, touched)]
    sweeps = torch.zeros(num_sources, dtype=torch.long)
    active = torch.ones(num_sources, dtype=torch.bool)
    order_rng = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        changed = torch.zeros(num_sources, dtype=torch.bool)
        for group_index in torch.randperm(len(groups), generator=order_rng).tolist():
            group = groups[group_index]
            rows = (active & dirty[group.name]).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            dirty[group.name][rows] = False
            all_rows = rows.numel() == num_sources
            cost = _group_cost(group, space, target_views, permuted, None if all_rows else rows.to(target_row.device))
            relative = linear_assignment(cost, maximize=True)
            current = torch.diagonal(cost, dim1=1, dim2=2).double().sum(-1)
            gain = _assignment_value(cost, relative) - current
            improved = (gain > 1e-12 * torch.clamp(current.abs(), min=1.0)).cpu()
            margins[group.name][rows] = _row_margins(cost, relative, improved.to(cost.device))
            if not bool(improved.any()):
                continue
            accepted = rows[improved]
            step = relative[improved.to(relative.device)]
            perms[group.name][accepted] = torch.gather(perms[group.name][accepted], 1, step)
            _regather(group, space, permuted, accepted.to(target_row.device), step)
            changed[accepted] = True
            for name in neighbours[group.name]:
                dirty[name][accepted] = True
                margins[name][accepted] = unknown
        sweeps[active] += 1
        active &= changed
        history.append(fixed + _objective(target_views, permuted, touched))

    if previous is not None and all(torch.equal(perms[name], previous.perms[name].to(perms[name])) for name in perms):
        index_maps, rows = previous.index_maps.to(bank.device), start  # nothing moved: reuse
    else:
        index_maps = spec.index_map(space, perms)
        rows = permute(bank, index_maps)
    result = MatchResult(perms, index_maps, rows, torch.stack(history), sweeps, target_row.clone(), margins, fingerprint)
    return _squeeze(result) if single else result


def _group_cost(group: Group, space: ParamSpace, target_views, permuted, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``cost[b, j, k] = Σ_axes ⟨target unit j, permuted source b unit k⟩`` for ``rows`` (None: all)."""
    n = group.size
    cost = None
    for axis in group.axes:
        if axis.name not in space:
            continue  # a buffer: not part of the weights being matched
        a = target_views[axis.name].narrow(axis.axis, axis.offset, n).movedim(axis.axis, 0).reshape(n, -1)
        b = permuted[axis.name] if rows is None else permuted[axis.name].index_select(0, rows)
        b = b.narrow(axis.axis + 1, axis.offset, n).movedim(axis.axis + 1, 1).reshape(b.shape[0] * n, -1)
        term = (b @ a.T).view(-1, n, n).transpose(1, 2)
        cost = term if cost is None else cost + term
    return cost.contiguous()


def _row_margins(cost: torch.Tensor, relative: torch.Tensor, improved: torch.Tensor) -> torch.Tensor:
    """``[R, n]``: by how much each unit's column beats its best other column in the assignment
    kept (``relative`` where ``improved``, else the current one), float64 on the CPU."""
    identity = torch.arange(cost.shape[-1], device=cost.device).expand_as(relative)
    chosen = torch.where(improved[:, None], relative.to(cost.device), identity).unsqueeze(2)
    own = torch.gather(cost, 2, chosen).squeeze(2)
    best_other = cost.scatter(2, chosen, float("-inf")).amax(2)
    return (own - best_other).double().cpu()


def _margin_bound(group: Group, space: ParamSpace, delta: torch.Tensor, target_row: torch.Tensor, permuted) -> torch.Tensor:
    """``[N, n]`` bound on how much the target's move ``delta`` can shrink each unit's margin:
    ``2·‖Δ_j‖·max_k ‖B_k‖`` (plus float rounding of the cost matrices, ``64·eps·‖θ_j‖·max_k ‖B_k‖``)."""
    n = group.size
    delta_views, target_views = space.views(delta), space.views(target_row)
    delta_sq = torch.zeros(n, dtype=torch.float64, device=delta.device)
    target_sq = torch.zeros_like(delta_sq)
    source_sq = None
    for axis in group.axes:
        if axis.name not in space:
            continue
        for views, total in ((delta_views, delta_sq), (target_views, target_sq)):
            unit = views[axis.name].narrow(axis.axis, axis.offset, n).movedim(axis.axis, 0).reshape(n, -1)
            total += torch.linalg.vector_norm(unit, dim=1, dtype=torch.float64).pow(2)
        b = permuted[axis.name].narrow(axis.axis + 1, axis.offset, n)
        reduce = [d for d in range(1, b.dim()) if d != axis.axis + 1]
        term = torch.linalg.vector_norm(b, dim=reduce, dtype=torch.float64).pow(2) if reduce else b.double().pow(2)
        source_sq = term if source_sq is None else source_sq + term
    largest_source = source_sq.amax(1, keepdim=True).sqrt()  # [N, 1]
    rounding = 64 * torch.finfo(target_row.dtype).eps * target_sq.sqrt()
    return ((2 * delta_sq.sqrt() + rounding) * largest_source).cpu()


def _batched(previous: "MatchResult", num_sources: int, fingerprint: torch.Tensor) -> "MatchResult":
    """A previous result as ``[N, ...]`` tensors, checked to belong to these sources."""
    if previous.index_maps.dim() == 1:
        previous = MatchResult(
            {name: index[None] for name, index in previous.perms.items()}, previous.index_maps[None],
            previous.permuted[None], previous.objective[:, None], previous.sweeps[None], previous.target,
            {name: margin[None] for name, margin in previous.margins.items()}, previous.fingerprint,
        )
    if previous.fingerprint.shape != fingerprint.shape or not torch.allclose(previous.fingerprint, fingerprint, rtol=1e-9, atol=0):
        raise ValueError(
            "match_weights: init is a MatchResult of other sources (their row sums differ); warm-start from "
            "a result only with the same sources, or pass init=result.perms"
        )
    return previous


def _neighbours(groups: List[Group]) -> Dict[str, List[str]]:
    """Groups sharing a tensor with each group: the ones whose costs its changes move."""
    by_tensor: Dict[str, set] = {}
    for group in groups:
        for axis in group.axes:
            by_tensor.setdefault(axis.name, set()).add(group.name)
    return {
        group.name: sorted({other for axis in group.axes for other in by_tensor[axis.name]} - {group.name})
        for group in groups
    }


def _sorted_init(groups: List[Group], space: ParamSpace, target_views, bank_views) -> Perm:
    """Each group's assignment on per-unit sorted weights (blind to every other permutation)."""
    perms = {}
    for group in groups:
        n, cost = group.size, None
        for axis in group.axes:
            if axis.name not in space:
                continue
            a = target_views[axis.name].narrow(axis.axis, axis.offset, n).movedim(axis.axis, 0).reshape(n, -1)
            b = bank_views[axis.name].narrow(axis.axis + 1, axis.offset, n).movedim(axis.axis + 1, 1)
            b = b.reshape(b.shape[0] * n, -1).sort(dim=1).values
            term = (b @ a.sort(dim=1).values.T).view(-1, n, n).transpose(1, 2)
            cost = term if cost is None else cost + term
        perms[group.name] = linear_assignment(cost.contiguous(), maximize=True)
    return perms


def _regather(group: Group, space: ParamSpace, permuted, rows: torch.Tensor, step: torch.Tensor) -> None:
    """Apply the accepted relative permutations ``step [R, n]`` to sources ``rows``."""
    n = group.size
    for axis in group.axes:
        if axis.name not in space:
            continue
        tensor = permuted[axis.name]
        dim = axis.axis + 1
        updated = tensor.index_select(0, rows)
        segment = updated.narrow(dim, axis.offset, n)
        shape = [len(rows)] + [1] * (segment.dim() - 1)
        shape[dim] = n
        segment.copy_(torch.gather(segment, dim, step.view(shape).expand_as(segment)))
        tensor.index_copy_(0, rows, updated)


def _assignment_value(cost: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return torch.gather(cost, 2, columns.unsqueeze(2).to(cost.device)).squeeze(2).double().sum(-1)


def _objective(target_views, source_views, names: List[str]) -> torch.Tensor:
    """``[N]`` float64 ⟨target, source⟩ restricted to the parameters ``names``."""
    total = None
    for name in names:
        source = source_views[name]
        term = source.reshape(source.shape[0], -1).double() @ target_views[name].reshape(-1).double()
        total = term if total is None else total + term
    return (total if total is not None else torch.zeros(next(iter(source_views.values())).shape[0], dtype=torch.float64)).cpu()


def _initial_perms(spec: PermutationSpec, init: Optional[Perm], num_sources: int, device) -> Perm:
    identity = spec.identity(device=device)
    perms = {name: index.expand(num_sources, -1).clone() for name, index in identity.items()}
    if init is None:
        return perms
    unknown = set(init) - set(perms)
    if unknown:
        raise ValueError(f"match_weights: init has groups {sorted(unknown)} that the spec does not have")
    for name, index in init.items():
        index = index.to(device=device, dtype=torch.long)
        if index.dim() == 1:
            index = index.expand(num_sources, -1)
        if tuple(index.shape) != tuple(perms[name].shape):
            raise ValueError(
                f"match_weights: init[{name!r}] has shape {tuple(index.shape)}, expected {tuple(perms[name].shape)}"
            )
        perms[name] = index.clone()
    return perms


def _as_row(model: ModelLike, space: ParamSpace, what: str) -> torch.Tensor:
    if isinstance(model, torch.Tensor):
        if model.dim() != 1 or model.shape[0] != space.size:
            raise ValueError(f"match_weights: {what} row must have shape [{space.size}], got {tuple(model.shape)}")
        return model.detach()
    return space.flatten(model)


def _as_bank(sources, space: ParamSpace):
    if isinstance(sources, torch.Tensor):
        if sources.dim() == 1:
            return _as_row(sources, space, "source").unsqueeze(0), True
        if sources.dim() != 2 or sources.shape[1] != space.size:
            raise ValueError(f"match_weights: sources bank must be [N, {space.size}], got {tuple(sources.shape)}")
        return sources.detach(), False
    if isinstance(sources, (nn.Module, Mapping)):
        return _as_row(sources, space, "source").unsqueeze(0), True
    rows = [_as_row(source, space, f"source {k}") for k, source in enumerate(sources)]
    if not rows:
        raise ValueError("match_weights: no sources given")
    return torch.stack(rows), False


def _squeeze(result: MatchResult) -> MatchResult:
    return MatchResult(
        perms={name: index[0] for name, index in result.perms.items()},
        index_maps=result.index_maps[0],
        permuted=result.permuted[0],
        objective=result.objective[:, 0],
        sweeps=result.sweeps[0],
        target=result.target,
        margins={name: margin[0] for name, margin in result.margins.items()},
        fingerprint=result.fingerprint,
    )
