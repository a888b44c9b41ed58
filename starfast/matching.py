"""Weight matching (Ainsworth et al., "Git Re-Basin", 2022), batched over many source models.

``match_weights(target, sources, spec)`` finds, for every source row, the permutation π that
maximises ⟨target, π(source)⟩ by coordinate descent over the spec's groups: each sweep visits the
groups in a random order and, for one group, solves the linear assignment that is optimal with
all other groups held fixed. All N sources advance together: one group's N cost matrices come
from one matmul on the rows' device and go to one batched ``linear_assignment`` call.

Implementation choices (why it is fast): the sources are kept *already permuted* in one working
copy of the rows (which becomes the result's ``permuted``; cost matrices are batched matmuls on
its per-parameter views), and each group's assignment is solved relative to the
current permutation (cost against the permuted sources, then ``new = current[relative]``).
Building a cost matrix therefore never re-gathers the other groups' axes; only the parameters a
group touches are re-gathered, and only after it improved. A relative assignment is accepted only
when it strictly raises that source's objective, so the objective never decreases and ties never
flip a converged answer. A group is re-solved for a source only when it is *dirty*: a group that
shares a parameter with it changed since it was last solved. Skipping clean groups changes no
result (their assignment problem is the one already solved) but makes confirmation sweeps and
warm starts cheap. A source stops after a sweep with no accepted change (or ``max_iter`` sweeps).
The float64 objective is kept per (parameter, source) and only the pairs a sweep changed are
recomputed.

Warm starts from a previous result (``init=previous_match``, the same sources, a moved target)
also skip the groups that *provably* cannot change: each result keeps, per source and group, the
margin of every unit's assignment, and the certificate in :mod:`starfast.warm_start` carries
them over the target's move. The result is the one an ordinary warm start would find; only work
is skipped. ``out=previous_match.permuted`` updates the previous result's rows in place instead
of copying them.

Starting point: the identity (Git Re-Basin's choice, the default), warm-start permutations, or
``init="sorted"``: every group solved once, independently, on each unit's weights *sorted*, which
is invariant to all other groups' permutations. Coordinate descent from the identity can stall
when one group is shared by the whole network (a transformer's residual stream mixes every
block's weights into one cost matrix); the sorted start recovers a permuted copy exactly and gives
a coupling-free first guess for unrelated models.

Restarts (``restarts=R``): coordinate descent has many local optima (unrelated MLPs reach 6 to 13
distinct matchings over 30 group orders, and barriers can double between them), so one run's
answer depends on its luck. Restart 0 is the ordinary run (``init``, ``seed``); restart 1 starts
from the sorted start (the identity when ``init`` is already ``"sorted"``); later restarts start
from the identity and from random permutations in turn, each with group orders of its own
(:func:`restart_plan`). All R·N rows advance together: they are more rows of the same batched cost
matrices and assignments (at each position of a sweep the rows are grouped by the group their
restart visits there), and each source keeps its restart of highest objective. Restart r of a source is exactly the run
``match_weights(..., init=start_r, seed=seed_r)``; more restarts never lower the objective.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from starfast.flat import ParamSpace
from starfast.lap import assignment_objective, linear_assignment
from starfast.ops import permute, trusted_index_maps
from starfast.spec import Group, Perm, PermutationSpec
from starfast.training_common import stream_seed
from starfast.warm_start import WarmStart, row_margins

ModelLike = Union[nn.Module, Mapping[str, torch.Tensor], torch.Tensor]


@dataclass
class MatchResult:
    """What :func:`match_weights` found for each source (leading dim N, or none for one source).

    ``perms``: group -> ``[N, size]`` gather indices, ``permuted``: ``[N, P]`` the permuted
    sources, ``objective``: ``[sweeps + 1, N]`` ⟨target, π(source)⟩ at the start and after every
    sweep (float64), ``sweeps``: ``[N]`` sweeps run per source (the last one made no change unless
    max_iter hit). ``index_maps``: ``[N, P]`` int64 (``permute(source, index_map) == permuted``),
    built from ``perms`` when first read: Starlight installs the perms into its own int32 maps and
    never needs these. ``target``, ``margins`` (group -> ``[N, size]``, ``-inf`` where unknown),
    ``fingerprint`` (``[N, parameters]``: each source's squared norm per parameter) and
    ``source_scales`` (group -> ``[N, 1]``, the sources' largest unit norm, for the groups where a
    warm start needed it) let a later call warm-start from this result. ``restart_objectives``
    (``[R, N]`` float64, each restart's final objective), ``restart_perms`` (group -> ``[R, N,
    size]``, each restart's answer) and ``restart`` (``[N]``, the restart each answer comes from)
    describe the restarts (``None`` with one).
    """

    perms: Perm
    permuted: torch.Tensor
    objective: torch.Tensor
    sweeps: torch.Tensor
    target: torch.Tensor
    margins: Dict[str, torch.Tensor]
    fingerprint: torch.Tensor
    spec: PermutationSpec = field(repr=False)
    space: ParamSpace = field(repr=False)
    source_scales: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)
    restart_objectives: Optional[torch.Tensor] = None
    restart_perms: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)
    restart: Optional[torch.Tensor] = None

    @functools.cached_property
    def index_maps(self) -> torch.Tensor:
        return self.spec.index_map(self.space, self.perms)


def match_weights(
    target: ModelLike,
    sources: Union[ModelLike, Sequence[ModelLike]],
    spec: PermutationSpec,
    *,
    space: Optional[ParamSpace] = None,
    init: Union[Perm, str, "MatchResult", None] = None,
    max_iter: int = 100,
    seed: int = 0,
    out: Optional[torch.Tensor] = None,
    restarts: int = 1,
) -> MatchResult:
    """Permutations of ``sources`` that best align them with ``target`` (see module docstring).

    ``target``: a module, a state dict or a row ``[P]``. ``sources``: one of those, a list of
    them, or a bank ``[N, P]``. Rows need ``space`` (inferred from a module target). ``init``:
    ``None`` (identity), ``"sorted"`` (see module docstring), warm-start permutations
    (group -> ``[N, size]`` or ``[size]``), or the previous :class:`MatchResult` for the same
    sources (warm start that also skips provably unchanged groups; see the module docstring).
    ``seed`` fixes the random group order of every sweep (the same order for all sources).
    ``out``: a contiguous ``[N, P]`` tensor (``[P]`` for a single source) that becomes the
    result's ``permuted``. It may be the ``permuted`` of the ``MatchResult`` passed as ``init``:
    the warm start then updates those rows in place, which saves a copy of the bank in time and
    memory but leaves that previous result unusable. It may also be the bank itself.
    ``restarts``: runs per source from the starts and group orders of :func:`restart_plan`, batched;
    each source keeps the best (see the module docstring). Restarts beyond the first hold R - 1
    more working copies of the bank. Returns a :class:`MatchResult`; with a single (non-bank)
    source its tensors have no N dim. Raises ``ValueError`` when ``spec`` does not fit ``space``
    exactly (e.g. the spec of a narrower or wider model) or the bank is empty or of another width
    (:func:`check_problem`).
    """
    if max_iter < 1:
        raise ValueError(f"match_weights: max_iter must be >= 1, got {max_iter}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"match_weights: restarts must be a positive int (--match-restarts), got {restarts!r}")
    if space is None:
        if not isinstance(target, nn.Module):
            raise ValueError("match_weights: pass space=ParamSpace(model) when the target is a row or state dict")
        space = ParamSpace(target)
    target_row = _as_row(target, space, "target")
    bank, single = _as_bank(sources, space)
    check_problem(spec, space, bank, "match_weights")
    bank = bank.to(device=target_row.device, dtype=target_row.dtype)
    num_sources = bank.shape[0]
    groups = list(spec.groups)

    target_views = space.views(target_row)
    warm_start = WarmStart(groups, space, space.views(bank))
    previous = None
    if isinstance(init, MatchResult):
        warm_start.check(init)
        previous = init if init.permuted.dim() == 2 else _with_source_dim(init, None)
    elif isinstance(init, str) and init != "sorted":
        raise ValueError(f"match_weights: init must be None, 'sorted', a dict of permutations or a MatchResult, got {init!r}")
    plan = restart_plan(spec, init, restarts, seed)
    starts = [_start(spec, space, groups, start, previous, target_views, bank) for start, _ in plan]
    perms = {name: torch.cat([start_perms[name] for start_perms, _ in starts]) for name in starts[0][0]}
    # The working rows, restart-major ([R * N, P]), permuted in place as groups change; with one
    # restart they are the result's ``permuted``.
    work = _working_rows(out, starts[0][1]) if restarts == 1 else torch.cat([rows for _, rows in starts])
    rows_total = work.shape[0]
    permuted = space.views(work)
    neighbours = _neighbours(groups)
    unknown = float("-inf")
    margins = {group.name: torch.full((rows_total, group.size), unknown, dtype=torch.float64) for group in groups}
    dirty = {group.name: torch.ones(rows_total, dtype=torch.bool) for group in groups}
    source_scales: Dict[str, torch.Tensor] = {}
    if previous is not None:
        # Certified groups start clean for the sources whose margins survive the move (restart 0's rows).
        carried, source_scales = warm_start.certify(previous, target_row, space.views(work[:num_sources]))
        for name, kept in carried.items():
            margins[name][:num_sources] = kept
            dirty[name][:num_sources] = ~(kept > 0).all(1)

    objective = _Objective(target_views, permuted)
    history = [objective.total()]
    sweeps = torch.zeros(rows_total, dtype=torch.long)
    active = torch.ones(rows_total, dtype=torch.bool)
    order_rngs = [torch.Generator().manual_seed(order_seed) for _, order_seed in plan]
    restart_of_row = torch.arange(rows_total) // num_sources
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        changed = torch.zeros(rows_total, dtype=torch.bool)
        orders = torch.stack([torch.randperm(len(groups), generator=order_rng) for order_rng in order_rngs])
        for visits in orders.T:  # one position of the sweep: restart r visits group visits[r]
            visit_of_row = visits[restart_of_row]
            for group_index in visits.unique().tolist():
                group = groups[group_index]
                rows = (active & dirty[group.name] & (visit_of_row == group_index)).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                dirty[group.name][rows] = False
                all_rows = rows.numel() == rows_total
                cost = group_cost(group, space, target_views, permuted, None if all_rows else rows.to(target_row.device))
                relative = linear_assignment(cost, maximize=True)
                current = torch.diagonal(cost, dim1=1, dim2=2).double().sum(-1)
                gain = assignment_objective(cost, relative) - current
                improved = (gain > 1e-12 * torch.clamp(current.abs(), min=1.0)).cpu()
                margins[group.name][rows] = row_margins(cost, relative, improved.to(cost.device))
                if not bool(improved.any()):
                    continue
                accepted = rows[improved]
                step = relative[improved.to(relative.device)]
                perms[group.name][accepted] = torch.gather(perms[group.name][accepted], 1, step)
                _regather(group, space, permuted, accepted.to(target_row.device), step)
                objective.mark_changed(group, space, accepted)
                changed[accepted] = True
                for name in neighbours[group.name]:
                    dirty[name][accepted] = True
                    margins[name][accepted] = unknown
        sweeps[active] += 1
        active &= changed
        history.append(objective.total())

    history = torch.stack(history)
    restart_objectives = restart_index = restart_perms = None
    if restarts > 1:
        restart_perms = {name: perm.view(restarts, num_sources, -1) for name, perm in perms.items()}
        restart_objectives = history[-1].view(restarts, num_sources)
        restart_index = restart_objectives.argmax(0)  # the first best restart on ties
        chosen = restart_index * num_sources + torch.arange(num_sources)
        perms = {name: perm[chosen.to(perm.device)] for name, perm in perms.items()}
        best_rows = work.index_select(0, chosen.to(work.device))
        work = best_rows if out is None else _working_rows(out, best_rows)
        history, sweeps = history[:, chosen], sweeps[chosen]
        margins = {name: margin[chosen] for name, margin in margins.items()}
    result = MatchResult(
        perms, work, history, sweeps, target_row.clone(), margins, warm_start.fingerprint, spec, space,
        source_scales, restart_objectives, restart_perms, restart_index,
    )
    built = _built_index_maps(previous) if previous is not None else None
    if built is not None and all(torch.equal(perms[name], previous.perms[name].to(perms[name])) for name in perms):
        result.index_maps = built.to(bank.device)  # the permutations did not change: neither did their maps
    return _with_source_dim(result, 0) if single else result


def restart_plan(spec: PermutationSpec, init: Any, restarts: int, seed: int) -> List[Tuple[Any, int]]:
    """``(start, order seed)`` of each restart of :func:`match_weights`. Restart 0 is ``(init,
    seed)``; restart 1 starts from ``"sorted"`` (from the identity when ``init`` is ``"sorted"``);
    after that, even restarts start from the identity (``None``) and odd ones from a random
    permutation of every group (the same for all sources), drawn from the stream ``(seed, r)``
    that also seeds restart r's group orders. A plan of R restarts is the first R of any longer
    one. Mixing the two starts reaches the best optimum more often than either alone
    (benchmarks/RESULTS.md, issue 26)."""
    plan = [(init, seed)]
    for r in range(1, restarts):
        order_seed = stream_seed(seed, r)
        if r == 1:
            start = None if isinstance(init, str) and init == "sorted" else "sorted"
        elif r % 2 == 0:
            start = None
        else:
            start = spec.random(torch.Generator().manual_seed(order_seed))
        plan.append((start, order_seed))
    return plan


def _start(spec: PermutationSpec, space: ParamSpace, groups: List[Group], start: Any, previous: Optional["MatchResult"],
           target_views, bank: torch.Tensor) -> Tuple[Perm, torch.Tensor]:
    """One restart's starting permutations (group -> ``[N, size]``) and rows (the bank permuted by them)."""
    if previous is not None and isinstance(start, MatchResult):
        return _initial_perms(spec, previous.perms, bank.shape[0], bank.device), previous.permuted.to(bank.device)
    if isinstance(start, str):
        start = _sorted_init(groups, space, target_views, space.views(bank))
    perms = _initial_perms(spec, start, bank.shape[0], bank.device)
    if start is None:
        return perms, bank
    with trusted_index_maps():  # index_map validates the perms it is given (check_perm)
        return perms, permute(bank, spec.index_map(space, perms))


def check_problem(spec: PermutationSpec, space: ParamSpace, bank: torch.Tensor, caller: str) -> None:
    """The checks every permutation finder makes before it starts: ``spec`` fits the rows of
    ``space`` exactly (:meth:`~starfast.spec.PermutationSpec.check_space`), and ``bank`` holds at
    least one row of that space (:meth:`~starfast.flat.ParamSpace.check_bank`)."""
    spec.check_space(space, caller)
    space.check_bank(bank, caller)


def finder_bank(target: torch.Tensor, sources: torch.Tensor, spec: PermutationSpec, space: ParamSpace,
                caller: str) -> Tuple[torch.Tensor, bool]:
    """``(bank, single)``: a finder's ``sources`` (``[N, P]`` or one ``[P]``) as a detached ``[N, P]``
    bank on ``target``'s device and dtype, and whether one row was given; ``target`` must be one
    row of ``space`` and the problem pass :func:`check_problem` (errors name ``caller``)."""
    if target.dim() != 1 or target.shape[0] != space.size:
        raise ValueError(f"{caller}: target must be one row [{space.size}], got {tuple(target.shape)}")
    single = sources.dim() == 1
    bank = (sources.unsqueeze(0) if single else sources).detach().to(device=target.device, dtype=target.dtype)
    check_problem(spec, space, bank, caller)
    return bank, single


def group_cost(group: Group, space: ParamSpace, target_views, permuted, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``cost[b, j, k] = Σ_axes ⟨target unit j, permuted source b unit k⟩`` for ``rows`` (None: all).

    One batched matmul per axis on ``[N, n, d]`` views of the working rows: a unit-major axis
    (the output axis) needs no copy, even though each source's parameter lies in a different row."""
    n = group.size
    cost = None
    for axis in group.axes:
        if axis.name not in space:
            continue  # a buffer: not part of the weights being matched
        a = target_views[axis.name].narrow(axis.axis, axis.offset, n).movedim(axis.axis, 0).reshape(n, -1)
        b = permuted[axis.name].narrow(axis.axis + 1, axis.offset, n).movedim(axis.axis + 1, 1)
        if rows is not None:
            b = b.index_select(0, rows)  # one copy, already unit-major
        b = b.reshape(b.shape[0], n, -1)
        term = torch.bmm(a.expand(b.shape[0], -1, -1), b.transpose(1, 2))
        cost = term if cost is None else cost.add_(term)
    return cost


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
        dim = axis.axis + 1
        segment = permuted[axis.name].narrow(dim, axis.offset, n)
        every_row = len(rows) == segment.shape[0]
        selected = segment if every_row else segment.index_select(0, rows)
        shape = [len(rows)] + [1] * (segment.dim() - 1)
        shape[dim] = n
        gathered = torch.gather(selected, dim, step.view(shape).expand_as(selected))
        if every_row:
            segment.copy_(gathered)
        else:
            segment.index_copy_(0, rows, gathered)


class _Objective:
    """⟨target, source⟩ per source in float64, kept per parameter so that after a sweep only the
    (parameter, source) pairs that a regather changed are recomputed."""

    def __init__(self, target_views, source_views):
        self.targets = {name: view.reshape(-1).double() for name, view in target_views.items()}
        self.sources = source_views
        self.inner = {name: _dot64(view.reshape(view.shape[0], -1), self.targets[name]) for name, view in source_views.items()}
        self.stale: Dict[str, torch.Tensor] = {}

    def mark_changed(self, group: Group, space: ParamSpace, rows: torch.Tensor) -> None:
        for axis in group.axes:
            if axis.name in space:
                stale = self.stale.setdefault(axis.name, torch.zeros(len(self.inner[axis.name]), dtype=torch.bool))
                stale[rows] = True

    def total(self) -> torch.Tensor:
        """``[N]`` on the CPU, after refreshing the stale pairs."""
        for name, stale in self.stale.items():
            rows = stale.nonzero().squeeze(1).to(self.inner[name].device)
            source = self.sources[name].index_select(0, rows)
            self.inner[name][rows] = _dot64(source.reshape(len(rows), -1), self.targets[name])
        self.stale.clear()
        return torch.stack(list(self.inner.values())).sum(0).cpu()


_DOT64_COLUMNS = 4096


def _dot64(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``matrix @ vector`` in float64 (``[R, m]`` float32 rows, ``[m]`` float64). Converted in
    column blocks that stay in cache: about 6x faster than converting the whole matrix first."""
    total = torch.zeros(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    for start in range(0, matrix.shape[1], _DOT64_COLUMNS):
        block = matrix[:, start : start + _DOT64_COLUMNS]
        total += block.double() @ vector[start : start + _DOT64_COLUMNS]
    return total


def _working_rows(out: Optional[torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """A copy of ``start`` to permute in place: ``out`` filled with it (nothing to copy when
    ``out`` already holds it), or a new tensor."""
    if out is None:
        return start.clone()
    rows = out.unsqueeze(0) if out.dim() == 1 else out
    if rows.shape != start.shape or rows.dtype != start.dtype or rows.device != start.device or not rows.is_contiguous():
        raise ValueError(
            f"match_weights: out must be a contiguous {start.dtype} tensor of shape {tuple(start.shape)} "
            f"(or [P] for one source) on {start.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if rows.data_ptr() != start.data_ptr():
        rows.copy_(start)
    return rows


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
        return sources.detach(), False  # its shape: check_problem
    if isinstance(sources, (nn.Module, Mapping)):
        return _as_row(sources, space, "source").unsqueeze(0), True
    rows = [_as_row(source, space, f"source {k}") for k, source in enumerate(sources)]
    if not rows:
        raise ValueError("match_weights: no sources given")
    return torch.stack(rows), False


def _with_source_dim(result: MatchResult, index: Optional[int]) -> MatchResult:
    """``result`` with its per-source tensors indexed by ``index`` along their source dim: ``0``
    drops it (a single source's result), ``None`` adds it back."""
    changed = dataclasses.replace(
        result,
        perms={name: perm[index] for name, perm in result.perms.items()},
        permuted=result.permuted[index],
        objective=result.objective[:, index],
        sweeps=result.sweeps[index],
        margins={name: margin[index] for name, margin in result.margins.items()},
        restart_objectives=None if result.restart_objectives is None else result.restart_objectives[:, index],
        restart_perms=None if result.restart_perms is None else {
            name: perm[:, index] for name, perm in result.restart_perms.items()},
        restart=None if result.restart is None else result.restart[index],
    )
    built = _built_index_maps(result)
    if built is not None:
        changed.index_maps = built[index]
    return changed


def _built_index_maps(result: MatchResult) -> Optional[torch.Tensor]:
    """``result.index_maps`` if already built (read, or carried over), else ``None``."""
    return vars(result).get("index_maps")
