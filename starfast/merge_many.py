"""MergeMany (Ainsworth et al., "Git Re-Basin", 2022, Algorithm 2): one model from many sources.

``merge_many(bank, spec, space=space)`` aligns every source with the mean of the *others* and
averages: each round visits the sources in a random order (drawn from ``seed``) and, for source
``i``, weight-matches its current row to ``mean_{j ≠ i} θ_j`` (:func:`starfast.matching.match_weights`,
from its current permutation) and replaces it by the permuted row, so later sources of the round
already see it moved. It stops after a round in which no source's permutation changed (weight
matching accepts a change only when it strictly raises its objective, so this is a fixed point),
or after ``max_rounds``. The merged model is the mean of the aligned rows; BatchNorm statistics are
not rows, and the caller recomputes them for the merged model (:func:`starfast.bn.recompute_bn`),
as the paper does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.spec import Perm, PermutationSpec


@dataclass
class MergeResult:
    """``row``: the merged model ``[P]``; ``perms``: group -> ``[N, size]``, each source's
    permutation onto the merged model; ``aligned``: ``[N, P]`` the sources permuted by them;
    ``rounds``: rounds run; ``converged``: whether the last round changed nothing."""

    row: torch.Tensor
    perms: Perm
    aligned: torch.Tensor
    rounds: int
    converged: bool


@torch.no_grad()
def merge_many(
    bank: torch.Tensor,
    spec: PermutationSpec,
    *,
    space: ParamSpace,
    max_rounds: int = 100,
    match_max_iter: int = 100,
    seed: int = 0,
) -> MergeResult:
    """The MergeMany model of the sources ``bank`` ``[N, P]`` (see the module docstring)."""
    if bank.dim() != 2 or bank.shape[1] != space.size or bank.shape[0] < 2:
        raise ValueError(f"merge_many: bank must hold at least two sources [N >= 2, {space.size}], got {tuple(bank.shape)}")
    if max_rounds < 1:
        raise ValueError(f"merge_many: max_rounds must be >= 1, got {max_rounds}")
    count = bank.shape[0]
    aligned = bank.detach().clone()
    total = aligned.sum(0, dtype=torch.float64)
    identity = spec.identity(device=bank.device)
    perms = {name: index.expand(count, -1).clone() for name, index in identity.items()}
    order = torch.Generator().manual_seed(seed)
    rounds, changed = 0, True
    while changed and rounds < max_rounds:
        changed, rounds = False, rounds + 1
        for i in torch.randperm(count, generator=order).tolist():
            others = ((total - aligned[i].double()) / (count - 1)).to(bank.dtype)
            found = match_weights(others, aligned[i], spec, space=space, max_iter=match_max_iter, seed=seed + rounds)
            if all(torch.equal(found.perms[name], identity[name]) for name in identity):
                continue
            changed = True
            total += found.permuted.double() - aligned[i].double()
            aligned[i] = found.permuted
            current = {name: perm[i] for name, perm in perms.items()}
            for name, index in spec.compose(found.perms, current).items():
                perms[name][i] = index
    return MergeResult(aligned.mean(0), perms, aligned, rounds, not changed)
