"""Activation matching (Ainsworth et al., "Git Re-Basin", 2022, Section 3.1), batched over sources.

``activation_match(target, bank, spec, space=space, probe=probe)`` finds, for every source row, the
permutation π that maximises, group by group, the summed correlation between the target's units
and the permuted source's units over the probe's inputs: per group ``g`` and site ``s`` of
``g`` (:class:`~starfast.spec.Site`), ``corr_s[j, k]`` is the Pearson correlation of target unit
``j`` and source unit ``k`` over every example and position; the cost ``Σ_s corr_s`` goes to one
linear assignment per group (:func:`starfast.lap.linear_assignment`, all sources in one batched
call). Groups are independent (no coordinate descent): each unit's activations do not depend on how
the model's other groups are ordered, so one pass suffices and ``init`` has nothing to improve.

Which activations (the pre- vs post-normalisation choice): a group is observed where the spec's
sites say, by the zoo's convention the *inputs of the layers that consume it*, i.e. after its
BatchNorm or LayerNorm and its activation function — the features the next layer weighs. For a
BatchNorm network that is the normalised, rectified map; for a transformer's residual stream the
LayerNorm outputs that feed attention and the MLP (each block's, summed); for a residual stream the
input of every block that reads it; for a DenseNet segment its first reader's input at its offset.
Pre-normalisation features would see each model's own scale and offset per unit, which the
normalisation removes before any weight sees them.

BatchNorm: every model runs with batch statistics (:func:`starfast.sites.batch_statistics_copy`),
so rows without running statistics (Starlight's θ) are observed like trained models; dropout is
off. Data: the probe's input batches (:class:`ActivationProbe`, by default the first
:data:`DEFAULT_MATCH_EXAMPLES` training examples, un-augmented). Each batch runs the target once and
every source once (``models_per_call`` sources per ``torch.func.vmap``); per source only
first and second moments and the ``[n, n]`` cross products with the target are kept, summed in
float64 (each batch's cross products are computed in the models' dtype: the one large product).

A unit that is constant on the probe (a dead ReLU) has no correlation: its row and column are 0,
so it is matched by the other units' leftovers; a larger probe is the remedy.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from starfast.bank import has_convolutions
from starfast.flat import ParamSpace
from starfast.lap import linear_assignment
from starfast.matching import finder_bank
from starfast.ops import permute
from starfast.sinkhorn import working_rows
from starfast.sites import SiteKey, batch_statistics_copy, observing
from starfast.spec import Perm, PermutationSpec, Site

DEFAULT_MATCH_EXAMPLES = 2048
PROBE_BATCH_SIZE = 128
# Sources per vmapped call where vmap pays (not for convolutions on the CPU, see starfast.bank).
MODELS_PER_CALL = 8


def check_match_examples(examples: int) -> None:
    """The error names the command-line flag."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 2:
        raise ValueError(f"--match-examples must be an int >= 2 (correlations need two examples), got {examples!r}")


@dataclass
class ActivationProbe:
    """What data-based matchers observe: a module of the architecture (``skeleton``, not changed),
    input batches ``inputs`` (``[B, ...]`` each) and, for a finder that needs a loss (``ste``),
    their ``labels`` (``[B]`` each) and whether the task is ``binary`` (one logit, BCE)."""

    skeleton: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    labels: Optional[Tuple[torch.Tensor, ...]] = None
    binary: bool = False

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        if not self.inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 and len(x) for x in self.inputs):
            raise ValueError("ActivationProbe: inputs must be one or more non-empty [B, ...] tensors")
        if self.labels is not None:
            self.labels = tuple(self.labels)
            if [len(y) for y in self.labels] != [len(x) for x in self.inputs]:
                raise ValueError("ActivationProbe: labels must be one [B] tensor per input batch, of the same sizes")

    @classmethod
    def from_dataset(cls, skeleton: nn.Module, dataset: Any, examples: int = DEFAULT_MATCH_EXAMPLES,
                     batch_size: int = PROBE_BATCH_SIZE) -> "ActivationProbe":
        """The first ``examples`` training examples of ``dataset`` (all of them when it has fewer),
        un-augmented, in batches of ``batch_size``."""
        check_match_examples(examples)
        batches, labels, taken = [], [], 0
        for x, y in dataset.eval_batches("train", batch_size):
            batches.append(x[: examples - taken])
            labels.append(y[: examples - taken])
            taken += len(batches[-1])
            if taken >= examples:
                break
        return cls(skeleton, tuple(batches), tuple(labels), bool(dataset.binary))

    @property
    def examples(self) -> int:
        return sum(len(x) for x in self.inputs)


@dataclass
class ActivationMatchResult:
    """What :func:`activation_match` found (leading dim N, or none for one ``[P]`` source).

    ``perms``: group -> ``[N, size]`` gather indices; ``permuted``: ``[N, P]`` the sources permuted
    by them; ``correlation``: group -> ``[N]`` float64, the matched units' correlation with their
    target unit, averaged over units and the group's sites (1 for an exact copy). ``index_maps``
    (``[N, P]`` int64) is built from ``perms`` when first read."""

    perms: Perm
    permuted: torch.Tensor
    correlation: Dict[str, torch.Tensor]
    spec: PermutationSpec = field(repr=False)
    space: ParamSpace = field(repr=False)

    @functools.cached_property
    def index_maps(self) -> torch.Tensor:
        return self.spec.index_map(self.space, self.perms)


def activation_match(
    target: torch.Tensor,
    sources: torch.Tensor,
    spec: PermutationSpec,
    *,
    space: ParamSpace,
    probe: ActivationProbe,
    out: Optional[torch.Tensor] = None,
    models_per_call: Optional[int] = None,
) -> ActivationMatchResult:
    """Permutations of ``sources`` (``[N, P]`` or one ``[P]``) aligning their activations with
    ``target``'s (see the module docstring). ``out``: a contiguous ``[N, P]`` tensor that becomes
    the result's ``permuted`` (not the sources themselves). ``models_per_call``: sources per
    vmapped forward (default: one for convolutional nets on the CPU, else :data:`MODELS_PER_CALL`)."""
    bank, single = finder_bank(target, sources, spec, space, "activation_match")
    if not isinstance(probe, ActivationProbe):
        raise TypeError("activation matching needs data: pass probe=ActivationProbe(skeleton, inputs) "
                        "(or ActivationProbe.from_dataset(skeleton, dataset, examples))")
    missing = [group.name for group in spec.groups if not group.sites]
    if missing:
        raise ValueError(f"activation matching observes every group at its sites, but the spec gives none for "
                         f"{missing[:3]}{' …' if len(missing) > 3 else ''}; declare Site(s) in the architecture's spec")
    space.check_compatible(probe.skeleton, "probe.skeleton")
    sites = [((group.name, i), site, group.size) for group in spec.groups for i, site in enumerate(group.sites)]
    moments = _site_moments(probe, bank, target.detach(), space, sites, models_per_call)
    cost: Dict[str, torch.Tensor] = {}
    for (name, _), (target_moments, source_moments, count) in moments.items():
        correlation = _correlation(target_moments, source_moments, count)
        cost[name] = correlation if name not in cost else cost[name] + correlation
    perms = {name: linear_assignment(matrix, maximize=True) for name, matrix in cost.items()}
    matched = {
        name: torch.gather(cost[name], 2, perm.unsqueeze(2)).squeeze(2).mean(1) / len(spec.group(name).sites)
        for name, perm in perms.items()
    }
    perms = {group.name: perms[group.name].to(bank.device) for group in spec.groups}
    work = working_rows(out, bank, "activation_match")
    permute(bank, spec.index_map(space, perms), out=work)
    result = ActivationMatchResult(perms, work, {name: value.cpu() for name, value in matched.items()}, spec, space)
    if single:
        result = dataclasses.replace(
            result, perms={name: perm[0] for name, perm in perms.items()}, permuted=work[0],
            correlation={name: value[0] for name, value in result.correlation.items()},
        )
    return result


Moments = Tuple[torch.Tensor, ...]


def _site_moments(
    probe: ActivationProbe,
    bank: torch.Tensor,
    target: torch.Tensor,
    space: ParamSpace,
    sites: Sequence[Tuple[SiteKey, Site, int]],
    models_per_call: Optional[int],
) -> Dict[SiteKey, Tuple[Moments, Moments, int]]:
    """Per site: the target's ``(Σa, Σa²)`` ``[n]``, the sources' ``(Σb, Σb², Σaᵀb)`` ``[N, n]``,
    ``[N, n]``, ``[N, n, n]``, and the number of rows ``M``; float64, over the probe's batches."""
    model = batch_statistics_copy(probe.skeleton).eval().to(bank.device)
    count = bank.shape[0]
    per_call = models_per_call or (1 if bank.device.type == "cpu" and has_convolutions(model) else MODELS_PER_CALL)
    if per_call < 1:
        raise ValueError(f"models_per_call must be a positive number of models, got {per_call}")
    keys = [key for key, _, _ in sites]
    totals: Dict[SiteKey, List[Any]] = {}

    def source_moments(params: Dict[str, torch.Tensor], x: torch.Tensor, seen: Dict[SiteKey, torch.Tensor]):
        """One source's moments on one batch; ``seen`` holds the target's columns per site."""
        found: Dict[SiteKey, Moments] = {}

        def record(key: SiteKey, columns: torch.Tensor) -> None:
            b = columns.double()
            found[key] = (b.sum(0), (b * b).sum(0), (seen[key].T @ columns).double())

        with observing(model, sites, record):
            functional_call(model, params, (x,))
        return tuple(found[key] for key in keys)

    batched = vmap(source_moments, in_dims=(0, None, None))
    with torch.no_grad():
        for x in probe.inputs:
            x = x.to(device=bank.device, dtype=bank.dtype if x.is_floating_point() else x.dtype)
            seen: Dict[SiteKey, torch.Tensor] = {}

            def keep(key: SiteKey, columns: torch.Tensor) -> None:
                seen[key] = columns.clone()  # a later in-place activation may overwrite a view

            with observing(model, sites, keep):
                functional_call(model, space.views(target), (x,))
            chunks = []
            for first in range(0, count, per_call):
                rows = bank[first : first + per_call]
                if len(rows) == 1:
                    one = source_moments(space.views(rows[0]), x, seen)
                    chunks.append(tuple(tuple(part.unsqueeze(0) for part in site) for site in one))
                else:
                    chunks.append(batched(space.views(rows), x, seen))
            for index, key in enumerate(keys):
                a = seen[key].double()
                parts = [torch.cat([chunk[index][p] for chunk in chunks]) for p in range(3)]
                batch = [a.sum(0), (a * a).sum(0), *parts, len(a)]
                totals[key] = batch if key not in totals else [old + new for old, new in zip(totals[key], batch)]
    return {key: (tuple(value[:2]), tuple(value[2:5]), value[5]) for key, value in totals.items()}


def _correlation(target_moments: Moments, source_moments: Moments, count: int) -> torch.Tensor:
    """``[N, n, n]`` Pearson correlations from the moments (0 where a unit is constant)."""
    sum_a, square_a = target_moments
    sum_b, square_b, cross = source_moments
    mean_a, mean_b = sum_a / count, sum_b / count
    covariance = cross / count - mean_a[None, :, None] * mean_b[:, None, :]
    var_a = (square_a / count - mean_a**2).clamp_min(0)
    var_b = (square_b / count - mean_b**2).clamp_min(0)
    scale = torch.sqrt(var_a[None, :, None] * var_b[:, None, :])
    # A constant unit's variance is cancellation noise (~1e-16 of its mean²): treat it as constant.
    floor = 1e-12 * torch.maximum(mean_a.square()[None, :, None], mean_b.square()[:, None, :]).clamp_min(1e-300)
    live = (var_a[None, :, None] > floor) & (var_b[:, None, :] > floor)
    return torch.where(live, covariance / torch.where(live, scale, torch.ones_like(scale)), torch.zeros_like(scale))
