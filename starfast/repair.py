"""REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
ICLR 2023) for the points of a linear path, batched over the points.

On the segment ``θ_t = (1 − t)·θ_a + t·θ_b`` the interpolated network's per-channel activation
statistics collapse (variance shrinks, means drift), which is most of the barrier of a network
without BatchNorm. REPAIR makes every interior point's per-channel *pre-activation* mean and
standard deviation equal to the interpolation of the end points', ``(1 − t)·μ_a + t·μ_b`` and
``(1 − t)·σ_a + t·σ_b``.

Where: at the output of every Linear/Conv layer that produces a permutation group's units (its
weight's output axis belongs to a group of the spec: the hidden layers of an MLP, every conv of a
plain VGG, a ViT's patch embedding, query/key/value/out projections and MLP layers; never the
classifier), over every example and position. How, as in the paper: each such layer gets a
normalisation (:class:`Renormalise`, a BatchNorm without affine parameters, followed by the goal
scale ``σ_goal`` and shift ``μ_goal``; it keeps population variances) whose running statistics are then recomputed exactly like
BatchNorm's (:func:`starfast.bn.recompute_bn`, one batched pass over the points: each layer
normalises with the batch's statistics during the pass, so the layers after it see corrected
inputs), and the points are evaluated in eval mode with them. The end points are the models as
they are (evaluated without the added layers).

BatchNorm networks (ResNets, VGG with BatchNorm, WRN, DenseNet): every group of the zoo's
BatchNorm networks is normalised by a BatchNorm before any weight reads it, and recomputing the
interpolated points' BatchNorm statistics — what :func:`starfast.barrier.barrier_curve` always
does — is REPAIR's *RESET* variant; ``repair`` then changes nothing and is reported as RESET
(:func:`repair_kind`).

The end points' goal statistics are read on the same training batches (``max_batches`` of them)
at the same layers, by forward hooks (:func:`starfast.sites.observing`).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from starfast.bank import Data, iterate_batches
from starfast.bn import has_batchnorm, recompute_bn
from starfast.flat import ParamSpace
from starfast.sites import observing
from starfast.spec import PermutationSpec, Site

REPAIR_KINDS = ("off", "repair", "reset")
RENORMALISE = "renormalise"  # the name of the added layer under each producer


def repair_kind(skeleton: nn.Module, repair: bool) -> str:
    """What ``repair`` does to this architecture's path: ``off``, ``repair`` (renormalised
    producers) or ``reset`` (a BatchNorm network: the recomputation done anyway)."""
    if not repair:
        return "off"
    return "reset" if has_batchnorm(skeleton) else "repair"


class Renormalise(nn.BatchNorm1d):
    """Channels of a ``[B, ..., C, ...]`` output (``channel_dim``) normalised, then scaled by
    ``goal_std`` and shifted by ``goal_mean`` (buffers, one per channel, not parameters: they are
    set per point, never interpolated or trained).

    A BatchNorm (so :func:`starfast.bn.recompute_bn` finds it and folds each batch in with its
    momentum) that keeps the *population* variance of each batch where BatchNorm keeps the
    unbiased one: the statistics a point is evaluated with are then exactly those the layers after
    it saw during the recomputation (with one batch; the average of the batches' with several)."""

    def __init__(self, channels: int, channel_dim: int):
        super().__init__(channels, affine=False)
        self.channel_dim = channel_dim
        self.register_buffer("goal_mean", torch.zeros(channels))
        self.register_buffer("goal_std", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.movedim(self.channel_dim, -1)
        columns = moved.reshape(-1, moved.shape[-1])
        if self.training:
            mean, variance = columns.mean(0), columns.var(0, unbiased=False)
            momentum = self.momentum  # recompute_bn sets 1 / (i + 1) for batch i: equal weights
            self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(variance, alpha=momentum)
            self.num_batches_tracked.add_(1)
        else:
            mean, variance = self.running_mean, self.running_var
        normalised = (columns - mean) * torch.rsqrt(variance + self.eps) * self.goal_std + self.goal_mean
        return normalised.reshape(moved.shape).movedim(-1, self.channel_dim)


def producers(skeleton: nn.Module, spec: PermutationSpec) -> List[Tuple[str, nn.Module, int]]:
    """``(name, layer, channel dim)`` of every Linear/Conv layer whose output units belong to a
    group of ``spec`` (see the module docstring), in module order."""
    rows = {axis.name for group in spec.groups for axis in group.axes if axis.axis == 0}
    found = []
    for name, module in skeleton.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and f"{name}.weight" in rows:
            found.append((name, module, -1 if isinstance(module, nn.Linear) else 1))
    return found


def renormalised_copy(skeleton: nn.Module, spec: PermutationSpec) -> nn.Module:
    """A copy of ``skeleton`` with a :class:`Renormalise` layer after every producer (registered as
    its child ``renormalise``, so parameter names and the row layout do not change)."""
    copied = copy.deepcopy(skeleton)
    for name, _, channel_dim in producers(skeleton, spec):
        layer = copied.get_submodule(name)
        renormalise = Renormalise(_channels(layer), channel_dim).to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.add_module(RENORMALISE, renormalise)
        layer.register_forward_hook(lambda module, args, output: getattr(module, RENORMALISE)(output))
    return copied


@torch.no_grad()
def end_point_statistics(
    skeleton: nn.Module, spec: PermutationSpec, space: ParamSpace, row: torch.Tensor, buffers: Dict[str, torch.Tensor],
    data: Data, max_batches: Optional[int] = None,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Producer name -> ``(mean, std)`` ``[C]`` of the model ``row`` (eval mode, its ``buffers``),
    over every example and position of ``data`` (the first ``max_batches`` batches)."""
    sites = [((name, 0), Site(name, "output", channel_dim), _channels(layer)) for name, layer, channel_dim in producers(skeleton, spec)]
    sums: Dict[str, List[torch.Tensor]] = {}

    def record(key, columns: torch.Tensor) -> None:
        values = columns.double()
        batch = [values.sum(0), values.square().sum(0), torch.tensor(float(len(values)), dtype=torch.float64)]
        sums[key[0]] = batch if key[0] not in sums else [old + new for old, new in zip(sums[key[0]], batch)]

    modes = {module: module.training for module in skeleton.modules()}
    skeleton.eval()
    try:
        with observing(skeleton, sites, record):
            for seen, (x, _) in enumerate(iterate_batches(data, "train_data")):
                if max_batches is not None and seen >= max_batches:
                    break
                x = x.to(device=row.device, dtype=row.dtype if x.is_floating_point() else x.dtype)
                functional_call(skeleton, ({**space.views(row), **buffers},), (x,))
    finally:
        for module, training in modes.items():
            module.train(training)
    statistics = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        statistics[name] = (mean.to(row.dtype), (squares / count - mean.square()).clamp_min(0).sqrt().to(row.dtype))
    return statistics


@torch.no_grad()
def repaired_buffers(
    skeleton: nn.Module,
    spec: PermutationSpec,
    space: ParamSpace,
    points: torch.Tensor,
    ts: torch.Tensor,
    ends: Tuple[Tuple[torch.Tensor, Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
    train_data: Data,
    *,
    max_batches: Optional[int] = None,
    **chunking,
) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The renormalised skeleton and the ``[K, ...]`` buffers of the ``K`` interior ``points``
    (rows at ``ts`` ``[K]`` between the end points ``ends = ((row_a, buffers_a), (row_b,
    buffers_b))``): goal statistics interpolated from the ends', running statistics of every
    :class:`Renormalise` (and BatchNorm) layer recomputed in one batched pass over ``train_data``."""
    statistics_a, statistics_b = (end_point_statistics(skeleton, spec, space, row, buffers, train_data, max_batches)
                                  for row, buffers in ends)
    weights = ts.to(device=points.device, dtype=points.dtype)[:, None]
    goals = {}
    for name, (mean_a, std_a) in statistics_a.items():
        mean_b, std_b = statistics_b[name]
        goals[f"{name}.{RENORMALISE}.goal_mean"] = torch.lerp(mean_a[None], mean_b[None], weights)
        goals[f"{name}.{RENORMALISE}.goal_std"] = torch.lerp(std_a[None], std_b[None], weights)
    renormalised = renormalised_copy(skeleton, spec)
    running = recompute_bn(renormalised, points, train_data, space=space, max_batches=max_batches, argument="train_data",
                           fixed_buffers=goals, **chunking)
    return renormalised, {**running, **goals}


def _channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
