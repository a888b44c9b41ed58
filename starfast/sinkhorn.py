"""Sinkhorn re-basin (Guerrero Peña et al., "Re-basin via implicit Sinkhorn differentiation",
CVPR 2023) in its data-free form, batched over many source models.

``sinkhorn_match(target, bank, spec, space=space)`` finds, for every source row, a permutation π
(one per group of the :class:`~starfast.spec.PermutationSpec`, the same groups weight matching
uses, so every architecture of the zoo is covered, residual streams and dense blocks included)
that lowers the paper's C_L2 objective, the mean squared distance ``‖target − π(source)‖² / P``.

Per group and source it learns logits ``X`` ``[n, n]``. One step:

1. soft permutation ``S = sinkhorn(X / temperature)``: ``iterations`` alternating column and row
   normalisations in the log domain (a doubly stochastic matrix);
2. hard permutation ``Π``: the assignment maximising ``Σ_j log S[j, Π[j]]`` (batched
   :func:`starfast.lap.linear_assignment`); it is the limit of ``S`` as the temperature goes to 0
   and, unlike ``S`` itself, has no entries that underflow to ties;
3. straight-through estimator: the forward pass uses ``Π``, i.e. the sources permuted exactly
   (one gather through the index map), and the gradient with respect to the permutation *matrix*
   is handed to ``S`` and back-propagated through the Sinkhorn iterations. On permutations
   ``C_L2 = (‖target‖² + ‖s‖² − 2⟨target, π(s)⟩) / P``; the gradient taken is that of
   ``−(2/P)·⟨target, P·s⟩``, i.e. ``−(2/P)·Σ_axes target_units · (s with every other permutation
   applied)_unitsᵀ``: weight matching's cost matrix. The quadratic ``‖P·s‖²``, constant on
   permutations, is left out: its gradient only pulls towards the centre of the Birkhoff
   polytope, which a hard forward pass never visits;
4. an Adam step on the logits.

The answer is always a hard permutation: per source, the best one seen (the start counts, so a
warm start never gets worse). Logits start at ``one_hot(start) + 0.1·N(0, 1)`` as in the authors'
code (``eye + 0.1·randn``), where the start is the identity or the ``init`` permutations (warm
start, e.g. the previous result for the same sources and a moved target).

Restarts (``restarts=R``): the descent is a local search, and from one draw of the initial noise
about 1 in 20-30 planted permutations of a small ViT is not recovered where another draw recovers
it. Restart 0 draws its noise from ``seed``, restart r >= 1 from the stream ``(seed, r)``; all R·N
rows are optimised together (more rows of the same batched Sinkhorn passes and assignments; Adam
acts elementwise, so each row follows its own run exactly) and each source keeps its restart of
lowest distance (the first on ties). The search stops once every source is matched exactly by
some restart.

Options. The star-domain paper (Appendix D.3, VGG-19 on CIFAR-10, the authors' soft-forward code)
searched ``lr`` in {0.01, 0.1, 1, 10, 20, 30, 40, 50, 60, 80, 100, 120, 150, 200} and found 150
best; the authors' examples run 50 to 1000 ``steps`` with ``temperature`` 1 and 20 ``iterations``.
Our defaults (lr 1, τ 10, 100 steps, 20 iterations) are chosen on planted permutations of every
architecture of the zoo, which they recover within about 70 steps, where τ = 1 needed lr ≈ 0.1
and still missed some ViT plants within 1000; on independent models they land within a fraction
of a percent of weight matching's distance. Adam is invariant to the scale of the objective, so
the learning rate is in units of logit change per step.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from starfast.flat import ParamSpace
from starfast.lap import linear_assignment
from starfast.matching import finder_bank, group_cost
from starfast.ops import permute, trusted_index_maps
from starfast.spec import Group, Perm, PermutationSpec
from starfast.training_common import stream_seed

LR_SEARCH_SPACE = (0.01, 0.1, 1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 120.0, 150.0, 200.0)
DEFAULT_LR = 1.0
DEFAULT_STEPS = 100
DEFAULT_TEMPERATURE = 10.0
DEFAULT_ITERATIONS = 20
INIT_NOISE = 0.1  # the authors' initial logits: eye + 0.1 * randn


@dataclass
class SinkhornResult:
    """What :func:`sinkhorn_match` found (leading dim N, or none for one ``[P]`` source).

    ``perms``: group -> ``[N, size]`` gather indices (the best hard permutation per source);
    ``permuted``: ``[N, P]`` the sources permuted by them; ``distance``: ``[steps + 1, N]`` float64
    ``‖target − π(source)‖²`` of the hard permutation at the start and after every step (fewer rows
    when every source reached distance 0, which nothing can improve);
    ``best_step``: ``[N]`` the row of ``distance`` the answer comes from. ``index_maps`` (``[N, P]``
    int64) is built from ``perms`` when first read.
    """

    perms: Perm
    permuted: torch.Tensor
    distance: torch.Tensor
    best_step: torch.Tensor
    spec: PermutationSpec = field(repr=False)
    space: ParamSpace = field(repr=False)

    @functools.cached_property
    def index_maps(self) -> torch.Tensor:
        return self.spec.index_map(self.space, self.perms)


def sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The log of the doubly stochastic matrix of ``logits`` ``[..., n, n]`` after ``iterations``
    column-then-row normalisations (log domain; differentiable)."""
    log_p = logits
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return log_p


def sinkhorn_match(
    target: torch.Tensor,
    sources: torch.Tensor,
    spec: PermutationSpec,
    *,
    space: ParamSpace,
    init: Union[Perm, "SinkhornResult", None] = None,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    temperature: float = DEFAULT_TEMPERATURE,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    out: Optional[torch.Tensor] = None,
    restarts: int = 1,
) -> SinkhornResult:
    """Permutations of ``sources`` (``[N, P]`` or one ``[P]``) towards ``target`` ``[P]`` (see the
    module docstring). ``init``: the start (identity when ``None``), permutations (group ->
    ``[N, size]`` or ``[size]``) or a previous result for the same sources. ``seed`` draws the
    initial noise of the logits. ``out``: a contiguous ``[N, P]`` tensor (not the sources) that
    becomes the result's ``permuted``, e.g. the previous result's rows (updated in place).
    ``restarts``: draws of the initial noise per source, optimised together; each source keeps
    the best (see the module docstring). The spec and the bank are checked as weight matching
    checks them (:func:`~starfast.matching.check_problem`)."""
    check_options(lr, steps, temperature, iterations)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"sinkhorn_match: restarts must be a positive int (--match-restarts), got {restarts!r}")
    bank, single = finder_bank(target, sources, spec, space, "sinkhorn_match")
    target = target.detach()
    sources_count, device = bank.shape[0], bank.device
    groups = list(spec.groups)
    start = _start_perms(spec, init.perms if isinstance(init, SinkhornResult) else init, sources_count, device)
    work = working_rows(out, bank)
    if restarts > 1:  # restart-major rows [R * N, P]: every restart of every source from the same start
        bank, work = bank.repeat(restarts, 1), torch.empty(restarts * sources_count, space.size, dtype=bank.dtype, device=device)
        start = {name: perm.repeat(restarts, 1) for name, perm in start.items()}
    count = bank.shape[0]
    index = torch.empty(count, space.size, dtype=torch.long, device=device)
    seeds = [seed] + [stream_seed(seed, r) for r in range(1, restarts)]
    logits = _Logits(groups, start, seeds, target.dtype, device)
    optimizer = torch.optim.Adam(logits.leaves(), lr=lr)

    def distance_of(perms: Perm) -> torch.Tensor:
        """Fill ``work`` with the sources permuted by ``perms``; ``‖target − work‖²`` per source."""
        with trusted_index_maps():  # index_map validates the perms it is given (check_perm)
            permute(bank, spec.index_map(space, perms, out=index), out=work)
        return _squared_distance(work, target)

    target_views, work_views = space.views(target), space.views(work)
    best = {name: perm.clone() for name, perm in start.items()}
    history = [distance_of(best)]
    best_distance, best_step = history[0].clone(), torch.zeros(count, dtype=torch.long)
    for step in range(1, steps + 1):
        log_soft = logits.sinkhorn(temperature, iterations)
        hard = {**start, **logits.assignments(log_soft)}
        history.append(distance_of(hard))
        improved = history[-1] < best_distance
        if bool(improved.any()):
            best_distance = torch.where(improved, history[-1], best_distance)
            best_step[improved] = step
            rows = improved.to(device)
            for name in best:
                best[name][rows] = hard[name][rows]
        if step == steps or not bool(best_distance.view(restarts, sources_count).amin(0).gt(0).any()):
            break  # the last hard permutation is measured (or every source is matched exactly by some restart)
        grads = {group.name: _matrix_gradient(group, space, target_views, work_views, hard[group.name]) for group in groups}
        optimizer.zero_grad(set_to_none=True)
        logits.backward(log_soft, grads)
        optimizer.step()

    history = torch.stack(history)
    if restarts > 1:
        chosen = best_distance.view(restarts, sources_count).argmin(0) * sources_count + torch.arange(sources_count)
        best = {name: perm[chosen.to(device)] for name, perm in best.items()}
        history, best_step = history[:, chosen], best_step[chosen]
        bank, work = bank[:sources_count], working_rows(out, bank[:sources_count])
        index = index[:sources_count]
    distance_of(best)  # the answer's rows into ``work``
    result = SinkhornResult(best, work, history, best_step, spec, space)
    if single:
        result = dataclasses.replace(
            result, perms={name: perm[0] for name, perm in best.items()}, permuted=work[0],
            distance=result.distance[:, 0], best_step=best_step[0],
        )
    return result


class _Logits:
    """The learnable logits, one leaf ``[G, N, n, n]`` per group size ``n`` (its ``G`` groups
    stacked), so that each size costs one Sinkhorn pass, one batched assignment and one backward."""

    def __init__(self, groups, start: Perm, seeds: List[int], dtype: torch.dtype, device):
        """``seeds``: one per restart; restart r's noise covers its rows (restart-major)."""
        noises = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.names: Dict[int, list] = {}
        for group in groups:
            self.names.setdefault(group.size, []).append(group.name)
        self.values: Dict[int, torch.Tensor] = {}
        for size, names in self.names.items():
            chosen = torch.stack([start[name].cpu() for name in names])  # [G, N, n]
            one_hot = torch.zeros(*chosen.shape, size, dtype=dtype).scatter_(3, chosen.unsqueeze(3), 1.0)
            per_restart = (one_hot.shape[0], one_hot.shape[1] // len(noises), size, size)
            jitter = INIT_NOISE * torch.cat([torch.randn(per_restart, generator=noise, dtype=dtype) for noise in noises], 1)
            self.values[size] = (one_hot + jitter).to(device).requires_grad_()

    def leaves(self) -> list:
        return list(self.values.values())

    def sinkhorn(self, temperature: float, iterations: int) -> Dict[int, torch.Tensor]:
        """The log soft permutations per size (differentiable)."""
        return {size: sinkhorn(value / temperature, iterations) for size, value in self.values.items()}

    def assignments(self, log_soft: Dict[int, torch.Tensor]) -> Perm:
        """The hard permutation of every group: ``[N, n]`` gather indices."""
        hard = {}
        for size, value in log_soft.items():
            columns = linear_assignment(value.detach().flatten(0, 1), maximize=True).view(value.shape[:3])
            hard.update(zip(self.names[size], columns.unbind(0)))
        return hard

    def backward(self, log_soft: Dict[int, torch.Tensor], grads: Dict[str, torch.Tensor]) -> None:
        """Hand ``grads`` (group -> ``∂C/∂P`` ``[N, n, n]``) to the soft matrices (straight through)."""
        soft = [value.exp() for value in log_soft.values()]
        stacked = [torch.stack([grads[name] for name in self.names[size]]) for size in log_soft]
        torch.autograd.backward(soft, stacked)


def _matrix_gradient(group: Group, space: ParamSpace, target_views, permuted_views, perm: torch.Tensor) -> torch.Tensor:
    """``∂C/∂P`` ``[N, n, n]`` for the group's permutation matrix ``P`` (``P[j, perm[j]] = 1``), of
    ``C = −(2/P)·⟨target, π(s)⟩ + const`` (see :func:`sinkhorn_match`).

    On each axis the group acts on, ``π(s) = P · r`` where ``r`` is the source with every other
    permutation applied, so ``∂C/∂P[j, k] = −(2/P)·Σ_axes ⟨target unit j, r unit k⟩``; unit ``k``
    of ``r`` is unit ``inverse[k]`` of ``π(s)``, so this is weight matching's cost matrix against
    ``π(s)`` (:func:`starfast.matching.group_cost`) with its columns reordered."""
    products = group_cost(group, space, target_views, permuted_views, None).mul_(-2.0 / space.size)
    inverse = torch.empty_like(perm).scatter_(1, perm, torch.arange(group.size, device=perm.device).expand_as(perm))
    return torch.gather(products, 2, inverse.unsqueeze(1).expand(-1, group.size, -1))


def _squared_distance(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖target − row‖²`` per row, accumulated in float64 (``[N]`` on the CPU; exactly 0 for a row
    equal to the target)."""
    return torch.linalg.vector_norm(rows - target, dim=1, dtype=torch.float64).square().cpu()


def _start_perms(spec: PermutationSpec, init: Optional[Perm], count: int, device) -> Perm:
    perms = {name: index.expand(count, -1).clone() for name, index in spec.identity(device=device).items()}
    if init is None:
        return perms
    if not isinstance(init, dict):
        raise TypeError(f"sinkhorn_match: init must be None, a dict of permutations or a SinkhornResult, got {type(init).__name__}")
    unknown = sorted(set(init) - set(perms))
    if unknown:
        raise ValueError(f"sinkhorn_match: init has groups {unknown} that the spec does not have")
    for name, index in init.items():
        index = index.to(device=device, dtype=torch.long)
        perms[name] = (index.expand(count, -1) if index.dim() == 1 else index).clone()
    batch = spec.check_perm(perms, "sinkhorn_match: init")
    if batch != count:
        raise ValueError(f"sinkhorn_match: init holds permutations for {batch} sources, not {count}")
    return perms


def working_rows(out: Optional[torch.Tensor], bank: torch.Tensor, caller: str = "sinkhorn_match") -> torch.Tensor:
    """Where a finder that permutes the sources afresh writes its rows: ``out`` (checked; the
    error names ``caller``) or a new tensor."""
    if out is None:
        return torch.empty_like(bank)
    rows = out.view(1, -1) if out.dim() == 1 else out
    layout = (tuple(rows.shape), rows.dtype, rows.device)
    if layout != (tuple(bank.shape), bank.dtype, bank.device) or not rows.is_contiguous():
        raise ValueError(f"{caller}: out must be a contiguous tensor laid out as the sources "
                         f"{(tuple(bank.shape), bank.dtype, bank.device)}, got {layout}")
    if rows.data_ptr() == bank.data_ptr():
        raise ValueError(f"{caller}: out must not be the sources themselves (they are permuted afresh into it)")
    return rows


def check_options(lr: float, steps: int, temperature: float, iterations: int) -> None:
    """Errors name the command-line flags."""
    if not (isinstance(lr, (int, float)) and lr > 0 and lr == lr and lr != float("inf")):
        raise ValueError(f"--sinkhorn-lr must be a positive number, got {lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--sinkhorn-steps must be a positive int, got {steps!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"--sinkhorn-temperature must be a positive number, got {temperature!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"--sinkhorn-iterations must be a positive int, got {iterations!r}")
