"""Data-free check of Lemma 2 (Appendix A.2.1, Figure 5 of the paper).

This module owns the solution-set sampler, the permutation search for the Lemma 2 criterion and
the ``Q(m, eps)`` table behind Figure 5.

The solution set is ``S = {(v1, v2) : |v1| = |v2| = 1, v1 . v2 = C}`` in ``R^m x R^m``. For a
fixed ``phi`` and ``theta`` in ``S`` the criterion asks for a permutation ``pi`` of the ``m``
coordinates with ``|phi1 . pi(theta2) + pi(theta1) . phi2 - 2C|^2 <= eps``. Writing
``pi(v)_i = v_{pi(i)}``, the sum is the value of an assignment,

    s(pi) = sum_i cost[i, pi(i)],   cost[i, j] = phi1_i * theta2_j + phi2_i * theta1_j,

so the quantity of interest is the *gap* ``g(phi, theta) = min_pi |s(pi) - 2C|``. This is not a
linear assignment problem (it is an "exact-sum" assignment problem, NP-hard in general), so:

- ``min_gap_brute_force`` is **exact**: it enumerates all ``m!`` permutations (``m <= 9``); the
  ``m!`` sums come from one matrix product of the flattened costs with the 0/1 incidence matrix
  of the permutations.
- ``min_gap_search`` returns, for every pair, a **certified bracket** ``lower <= g <= upper``
  and a permutation attaining ``upper``:

  1. start from the permutation of the paper's proof (sort ``theta1`` into the rank order of
     ``phi1``; likewise ``theta2`` into ``phi2``'s order; keep the better);
  2. local search: repeatedly apply the single transposition of two coordinates that brings
     ``s`` closest to ``2C``, while that improves the gap (all ``m(m-1)/2`` transpositions
     when ``m <= rows``, else those touching ``rows`` random coordinates per step);
  3. for the pairs still above ``good_enough``: two batched linear assignments give the exact
     extremes ``s_min = min_pi s``, ``s_max = max_pi s``. If ``2C`` lies outside
     ``[s_min, s_max]`` the gap is **exact**: ``dist(2C, [s_min, s_max])``, attained by the
     extreme permutation (``lower = upper``). If ``2C`` lies inside, ``lower = 0`` is only the
     *relaxation* bound (``s`` takes finitely many values, so ``2C`` need not be attained) and
     ``upper`` is *heuristic*: the local search is re-run from both extreme permutations and
     the best permutation found is kept.

  ``lower`` is a true lower bound and ``upper`` is attained by an explicit permutation, so a
  decision ``g^2 <= eps`` is certain whenever ``upper^2 <= eps`` or ``lower^2 > eps``.

``lemma2_table`` samples ``N_phi`` and ``N_theta`` points of ``S`` (the same ``theta`` for every
``phi``, as in the paper), and calls ``phi`` a candidate at ``eps`` when the worst gap over the
``theta`` samples satisfies ``g^2 <= eps`` (the ``sup`` over ``S`` in Lemma 2 becomes a max over
the samples). Widths up to ``exact_max_width`` use brute force; wider ones use the search, and
the table reports ``Q`` from the found permutations (``upper``, a lower estimate of ``Q``)
together with ``Q`` from ``lower`` and the number of (width, eps) cells where they differ.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from starfast.lap import linear_assignment

# Widest problem enumerated by brute force: 9! = 362880 permutations.
MAX_BRUTE_FORCE_WIDTH = 9
# Upper bound on the elements of one temporary buffer (32 MiB of float64); also used by twolayer.
CHUNK_ELEMENTS = 1 << 22


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed is derived from the integers in ``key`` (independent streams)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_solution_set(
    n: int, m: int, c: float = 0.5, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of ``S = {(v1, v2) : |v1| = |v2| = 1, v1 . v2 = c}`` in ``R^m``, drawn uniformly.

    ``v1`` is a normalised Gaussian (uniform on the sphere); ``u`` is a Gaussian projected onto
    the orthogonal complement of ``v1`` and normalised (uniform on that sphere); ``v2 = c v1 +
    sqrt(1 - c^2) u``. The construction commutes with every rotation ``R`` (``R g`` has the law of
    ``g``), so the law of ``(v1, v2)`` is invariant under the orthogonal group, which acts
    transitively on ``S``; the invariant probability on such an orbit is unique, hence this is
    the uniform distribution on ``S``. Returns two ``[n, m]`` tensors.
    """
    if n < 1:
        raise ValueError(f"sample_solution_set: n must be >= 1, got {n}")
    if m < 2:
        raise ValueError(f"sample_solution_set: width m must be >= 2 (the set is degenerate for m = 1), got {m}")
    if not -1.0 <= c <= 1.0:
        raise ValueError(f"sample_solution_set: the inner product c must lie in [-1, 1], got {c}")
    g1 = torch.randn(n, m, generator=generator, dtype=dtype)
    g2 = torch.randn(n, m, generator=generator, dtype=dtype)
    v1 = g1 / g1.norm(dim=1, keepdim=True)
    u = g2
    for _ in range(2):  # the second projection removes the rounding left by the first
        u = u - (u * v1).sum(1, keepdim=True) * v1
    u = u / u.norm(dim=1, keepdim=True)
    v2 = c * v1 + math.sqrt(1.0 - c * c) * u
    return v1, v2


def _check_pairs(phi1: torch.Tensor, phi2: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in (phi1, phi2, theta1, theta2)}
    if len(shapes) != 1 or phi1.dim() != 2:
        raise ValueError(
            "phi1, phi2, theta1, theta2 must all have the same shape [B, m] (one row per pair), got "
            f"{[tuple(t.shape) for t in (phi1, phi2, theta1, theta2)]}"
        )
    if phi1.shape[1] < 1:
        raise ValueError("the width m must be >= 1")


def assignment_costs(phi1: torch.Tensor, phi2: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
    """``cost[b, i, j] = phi1[b, i] * theta2[b, j] + phi2[b, i] * theta1[b, j]`` (``[B, m, m]``)."""
    _check_pairs(phi1, phi2, theta1, theta2)
    return phi1[:, :, None] * theta2[:, None, :] + phi2[:, :, None] * theta1[:, None, :]


def permuted_sum(phi1: torch.Tensor, phi2: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``s(pi) = phi1 . pi(theta2) + pi(theta1) . phi2`` with ``pi(v)_i = v[perm_i]`` (``[B]``)."""
    _check_pairs(phi1, phi2, theta1, theta2)
    return (phi1 * theta2.gather(1, perm) + phi2 * theta1.gather(1, perm)).sum(1)


def all_permutations(m: int) -> torch.Tensor:
    """All ``m!`` permutations of ``range(m)`` as a ``[m!, m]`` LongTensor (``m <= 9``)."""
    if not 1 <= m <= MAX_BRUTE_FORCE_WIDTH:
        raise ValueError(f"brute force enumerates m! permutations; m must be in [1, {MAX_BRUTE_FORCE_WIDTH}], got {m}")
    return torch.tensor(list(itertools.permutations(range(m))), dtype=torch.long)


def min_gap_brute_force(
    phi1: torch.Tensor, phi2: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor, target: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact ``min_pi |s(pi) - target|`` for every pair, by enumerating all permutations.

    Returns ``(gap [B], perm [B, m])`` with ``perm`` a minimiser. ``m <= 9``.
    """
    _check_pairs(phi1, phi2, theta1, theta2)
    batch, m = phi1.shape
    perms = all_permutations(m)
    incidence = torch.zeros(m * m, perms.shape[0], dtype=torch.float64)
    rows = torch.arange(m).expand_as(perms)
    incidence[(rows * m + perms).reshape(-1), torch.arange(perms.shape[0]).repeat_interleave(m)] = 1.0
    gaps = torch.empty(batch, dtype=torch.float64)
    best = torch.empty(batch, dtype=torch.long)
    step = max(1, CHUNK_ELEMENTS // perms.shape[0])
    for start in range(0, batch, step):
        sl = slice(start, start + step)
        cost = assignment_costs(phi1[sl], phi2[sl], theta1[sl], theta2[sl]).double().reshape(-1, m * m)
        gaps[sl], best[sl] = ((cost @ incidence) - target).abs().min(1)
    return gaps, perms[best]


def rank_matching(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The permutation of the paper's proof: ``other[perm]`` has the rank order of ``reference``."""
    ranks = reference.argsort(1).argsort(1)
    return other.argsort(1).gather(1, ranks)


class SearchResult(NamedTuple):
    """Bracket of the gap ``lower <= min_pi |s(pi) - target| <= upper``; ``perm`` attains ``upper``."""

    upper: torch.Tensor
    lower: torch.Tensor
    perm: torch.Tensor


def _local_search(
    a: torch.Tensor, c: torch.Tensor, p_all: torch.Tensor, q_all: torch.Tensor, perm: torch.Tensor,
    target: float, good_enough: float, max_iter: int, rows: int, generator: torch.Generator,
) -> torch.Tensor:
    """Improve ``perm`` (in place) by single transpositions towards ``s = target``; returns ``perm``.

    ``a, c`` are ``phi1, phi2``; ``p_all, q_all`` are ``theta2, theta1`` (unpermuted). Swapping
    coordinates ``i, j`` changes ``s`` by ``-(a_i - a_j)(p_i - p_j) - (c_i - c_j)(q_i - q_j)`` where
    ``p = theta2[perm]``, ``q = theta1[perm]``.
    """
    batch, m = a.shape
    full = m <= rows
    p = p_all.gather(1, perm)
    q = q_all.gather(1, perm)
    s = (a * p + c * q).sum(1)
    active = torch.ones(batch, dtype=torch.bool)
    for _ in range(max_iter):
        active &= (s - target).abs() > good_enough
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        n_rows = m if full else rows
        step = max(1, CHUNK_ELEMENTS // (n_rows * m))
        for start in range(0, idx.numel(), step):
            b = idx[start:start + step]
            gap = s[b] - target
            if full:
                ri = torch.arange(m).expand(b.numel(), m)
            else:
                ri = torch.rand(b.numel(), m, generator=generator, dtype=torch.float64).argsort(1)[:, :rows]
            ab, cb, pb, qb = a[b], c[b], p[b], q[b]
            ai, ci, pi, qi = ab.gather(1, ri), cb.gather(1, ri), pb.gather(1, ri), qb.gather(1, ri)
            delta = -(ai[:, :, None] - ab[:, None, :]) * (pi[:, :, None] - pb[:, None, :])
            delta -= (ci[:, :, None] - cb[:, None, :]) * (qi[:, :, None] - qb[:, None, :])
            new_gap, flat = (gap[:, None, None] + delta).abs().reshape(b.numel(), -1).min(1)
            better = new_gap < gap.abs() * (1 - 1e-12)
            if full:
                active[b[~better]] = False  # a local optimum of the full transposition neighbourhood
            if not bool(better.any()):
                continue
            b, flat = b[better], flat[better]
            i = ri[better].gather(1, (flat // m)[:, None]).squeeze(1)
            j = flat % m
            s[b] = s[b] + delta[better].reshape(b.numel(), -1).gather(1, flat[:, None]).squeeze(1)
            for t in (perm, p, q):
                ti, tj = t[b, i].clone(), t[b, j].clone()
                t[b, i], t[b, j] = tj, ti
    return perm


def min_gap_search(
    phi1: torch.Tensor, phi2: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor, target: float,
    good_enough: float = 0.0, max_iter: int = 200, rows: int = 32, generator: Optional[torch.Generator] = None,
) -> SearchResult:
    """Certified bracket of ``min_pi |s(pi) - target|`` for every pair (see the module docstring).

    ``good_enough``: a pair whose found gap is ``<= good_enough`` is not searched further (its
    decisions at tolerances ``eps >= good_enough^2`` are already certain) and gets ``lower = 0``.
    """
    _check_pairs(phi1, phi2, theta1, theta2)
    if good_enough < 0 or max_iter < 0 or rows < 1:
        raise ValueError("min_gap_search: good_enough and max_iter must be >= 0 and rows >= 1")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    a, c, q_all, p_all = (t.double() for t in (phi1, phi2, theta1, theta2))
    batch, m = a.shape

    def gap_of(perm: torch.Tensor, sel=slice(None)) -> torch.Tensor:
        return (permuted_sum(a[sel], c[sel], q_all[sel], p_all[sel], perm) - target).abs()

    def improve(perm: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return _local_search(a[sel], c[sel], p_all[sel], q_all[sel], perm, target, good_enough, max_iter, rows, generator)

    def keep_better(candidate: torch.Tensor, sel: torch.Tensor) -> None:
        cand_gap = gap_of(candidate, sel)
        better = cand_gap < upper[sel]
        upper[sel[better]] = cand_gap[better]
        perm[sel[better]] = candidate[better]

    everyone = torch.arange(batch)
    perm = rank_matching(a, q_all)
    upper = gap_of(perm)
    keep_better(rank_matching(c, p_all), everyone)
    perm = improve(perm, everyone)
    upper = gap_of(perm)
    lower = torch.zeros(batch, dtype=torch.float64)

    hard = (upper > good_enough).nonzero().squeeze(1)
    step = max(1, CHUNK_ELEMENTS // (m * m))
    for start in range(0, hard.numel(), step):
        sel = hard[start:start + step]
        cost = assignment_costs(a[sel], c[sel], q_all[sel], p_all[sel])
        extremes = [linear_assignment(cost), linear_assignment(cost, maximize=True)]
        s_min, s_max = (permuted_sum(a[sel], c[sel], q_all[sel], p_all[sel], e) for e in extremes)
        lower[sel] = (s_min - target).clamp(min=0) + (target - s_max).clamp(min=0)
        for extreme in extremes:
            keep_better(extreme, sel)
        inside = lower[sel] == 0  # 2C within [s_min, s_max]: search on from both extremes
        for extreme in extremes:
            keep_better(improve(extreme[inside].clone(), sel[inside]), sel[inside])
    return SearchResult(upper, lower, perm)


def default_epsilons(count: int = 50) -> List[float]:
    """The paper's tolerances: ``count`` equi-spaced values in ``[0.01, 0.1]`` inclusive."""
    return [float(e) for e in np.linspace(0.01, 0.1, count)]


def lemma2_table(
    widths: Sequence[int], epsilons: Sequence[float], n_phi: int = 100, n_theta: int = 100, c: float = 0.5,
    seed: int = 0, exact_max_width: int = 8, progress: bool = False,
) -> Dict[str, object]:
    """``Q(m, eps)`` for every width and tolerance, with the evidence behind it.

    Returns a dict: ``Q`` and ``Q_upper`` (``{m: {eps: fraction}}``; ``Q`` from found
    permutations, ``Q_upper`` from the lower bounds; equal for brute-forced widths), ``method``
    (``{m: "brute-force" | "search"}``), ``undecided_cells`` (cells where they differ),
    ``search_check`` (``{m: agreement}`` of the search with brute force at the brute-forced widths
    ``m >= 3``: fraction of pairs whose found gap equals the exact one to 1e-9, and fraction of
    ``(phi, eps)`` decisions that agree) and ``max_gap`` (``{m: [worst gap per phi]}``).
    """
    from starfast.progress import progress_bar

    if not epsilons or min(epsilons) <= 0:
        raise ValueError("lemma2_table: give at least one tolerance, all > 0")
    if exact_max_width > MAX_BRUTE_FORCE_WIDTH:
        raise ValueError(f"lemma2_table: exact_max_width must be <= {MAX_BRUTE_FORCE_WIDTH}, got {exact_max_width}")
    eps = torch.tensor(list(epsilons), dtype=torch.float64)
    target = 2.0 * c
    q_found: Dict[int, Dict[float, float]] = {}
    q_upper: Dict[int, Dict[float, float]] = {}
    method: Dict[int, str] = {}
    check: Dict[int, Dict[str, float]] = {}
    max_gap: Dict[int, List[float]] = {}
    for m in progress_bar(list(widths), desc="lemma 2 widths", enabled=progress):
        gen = seeded_generator(seed, m)
        phi1, phi2 = sample_solution_set(n_phi, m, c, gen)
        theta1, theta2 = sample_solution_set(n_theta, m, c, gen)
        pairs = (
            phi1.repeat_interleave(n_theta, 0), phi2.repeat_interleave(n_theta, 0),
            theta1.repeat(n_phi, 1), theta2.repeat(n_phi, 1),
        )

        def decide(gap: torch.Tensor) -> torch.Tensor:  # [n_phi, n_eps]: phi is a candidate at eps
            return gap.view(n_phi, n_theta).max(1).values[:, None] ** 2 <= eps[None, :]

        if m <= exact_max_width:
            upper, _ = min_gap_brute_force(*pairs, target)
            lower = upper
            method[m] = "brute-force"
            if m >= 3:
                found = min_gap_search(*pairs, target, generator=seeded_generator(seed, m, 1)).upper
                check[m] = {
                    "pairs_exact": float(((found - upper).abs() <= 1e-9).double().mean()),
                    "decisions_agree": float((decide(found) == decide(upper)).double().mean()),
                }
        else:
            result = min_gap_search(*pairs, target, good_enough=math.sqrt(float(eps.min())), generator=seeded_generator(seed, m, 1))
            upper, lower = result.upper, result.lower
            method[m] = "search"
        found_decisions, bound_decisions = decide(upper).double().mean(0), decide(lower).double().mean(0)
        q_found[m] = {float(e): float(v) for e, v in zip(eps, found_decisions)}
        q_upper[m] = {float(e): float(v) for e, v in zip(eps, bound_decisions)}
        max_gap[m] = upper.view(n_phi, n_theta).max(1).values.tolist()
    undecided = sum(q_found[m][e] != q_upper[m][e] for m in q_found for e in q_found[m])
    return {
        "Q": q_found, "Q_upper": q_upper, "method": method, "undecided_cells": int(undecided),
        "search_check": check, "max_gap": max_gap,
        "config": {"widths": list(widths), "epsilons": [float(e) for e in eps], "n_phi": n_phi,
                   "n_theta": n_theta, "C": c, "seed": seed, "exact_max_width": exact_max_width},
    }
