"""Straight-through matching (Ainsworth et al., "Git Re-Basin", 2022, Algorithm 3), data-based.

``ste_match(target, bank, spec, space=space, probe=probe)`` learns, per source ``B``, a free copy
``θ̃`` of the permuted source and takes as the permutation the projection of ``θ̃`` onto the
permutations of ``B``: weight matching of ``B`` onto ``θ̃`` (:func:`starfast.matching.match_weights`).
One step, on the next batch of the probe (inputs and labels, cycled):

1. project: ``π = weight_matching(target=θ̃, source=B)`` (warm-started from the last projection);
2. straight through: the forward pass uses the hard ``π(B)``, the gradient reaches ``θ̃``
   (``π(B) + θ̃ − stopgrad(θ̃)``);
3. the loss of the midpoint ``(target + π(B)) / 2`` on the batch (cross-entropy, or BCE for one
   logit), with BatchNorm on the batch's statistics (:func:`starfast.sites.batch_statistics_copy`);
4. an Adam step on ``θ̃`` (learning rate ``lr``).

After ``steps`` steps the answer is the last projection (the algorithm's). Start (the
literature's warm start): ``θ̃ = π_wm(B)`` with weight matching's permutations (or ``init``'s), so
step 1 of the first step returns them and a plant that weight matching recovers stays recovered
unless the midpoint loss pulls ``θ̃`` far enough to change a projection. Batched over the sources
where the method allows: the N midpoints run as one ``torch.func.vmap`` and one Adam step moves
all N copies; the projections are one weight-matching call per source (each has its own target
``θ̃``).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch.func import functional_call, vmap

from starfast.activation_matching import ActivationProbe
from starfast.flat import ParamSpace
from starfast.matching import MatchResult, finder_bank, match_weights
from starfast.ops import permute
from starfast.sinkhorn import working_rows
from starfast.sites import batch_statistics_copy
from starfast.spec import Perm, PermutationSpec
from starfast.training_common import per_example_loss

DEFAULT_LR = 1e-3
DEFAULT_STEPS = 30


@dataclass
class SteResult:
    """What :func:`ste_match` found (leading dim N, or none for one ``[P]`` source).

    ``perms``: group -> ``[N, size]`` (the last projection); ``permuted``: ``[N, P]`` the sources
    permuted by them; ``loss``: ``[steps, N]`` float64 midpoint loss of every step (on that step's
    batch); ``changes``: ``[N]`` how many steps changed the projection. ``index_maps`` (``[N, P]``
    int64) is built from ``perms`` when first read."""

    perms: Perm
    permuted: torch.Tensor
    loss: torch.Tensor
    changes: torch.Tensor
    spec: PermutationSpec = field(repr=False)
    space: ParamSpace = field(repr=False)

    @functools.cached_property
    def index_maps(self) -> torch.Tensor:
        return self.spec.index_map(self.space, self.perms)


def check_options(lr: float, steps: int) -> None:
    """Errors name the command-line flags."""
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf")):
        raise ValueError(f"--ste-lr must be a positive number, got {lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--ste-steps must be a positive int, got {steps!r}")


def ste_match(
    target: torch.Tensor,
    sources: torch.Tensor,
    spec: PermutationSpec,
    *,
    space: ParamSpace,
    probe: ActivationProbe,
    init: Union[Perm, MatchResult, "SteResult", None] = None,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    out: Optional[torch.Tensor] = None,
    max_iter: int = 100,
) -> SteResult:
    """Permutations of ``sources`` (``[N, P]`` or one ``[P]``) towards ``target`` ``[P]`` (see the
    module docstring). ``init``: the start's permutations (a result or group -> ``[N, size]``);
    ``None``: weight matching's (``seed`` and ``max_iter`` are its options). ``out``: a contiguous
    ``[N, P]`` tensor (not the sources) that becomes the result's ``permuted``."""
    check_options(lr, steps)
    bank, single = finder_bank(target, sources, spec, space, "ste_match")
    if not isinstance(probe, ActivationProbe) or probe.labels is None:
        raise TypeError("straight-through matching trains on a loss: pass probe=ActivationProbe.from_dataset(skeleton, "
                        "dataset, examples) (inputs with their labels)")
    space.check_compatible(probe.skeleton, "probe.skeleton")
    target = target.detach()
    count = bank.shape[0]
    start = getattr(init, "perms", init)
    if start is None:
        start = match_weights(target, bank, spec, space=space, seed=seed, max_iter=max_iter).perms
    perms = {name: (index.expand(count, -1) if index.dim() == 1 else index).to(bank.device).clone()
             for name, index in start.items()}
    if spec.check_perm(perms, "ste_match: init") != count:
        raise ValueError(f"ste_match: init holds permutations for another number of sources than {count}")
    projected = permute(bank, spec.index_map(space, perms))
    free = projected.clone().requires_grad_()
    optimizer = torch.optim.Adam([free], lr=lr)
    model = batch_statistics_copy(probe.skeleton).eval().to(bank.device)

    def midpoint_loss(row: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_loss(functional_call(model, space.views(row), (x,)), y, probe.binary).mean()

    batched_loss = vmap(midpoint_loss, in_dims=(0, None, None))
    batches = itertools.cycle(zip(probe.inputs, probe.labels))
    losses, changes = [], torch.zeros(count, dtype=torch.long)
    for _ in range(steps):
        x, y = next(batches)
        x = x.to(device=bank.device, dtype=bank.dtype if x.is_floating_point() else x.dtype)
        straight_through = projected + free - free.detach()
        loss = batched_loss(0.5 * (target + straight_through), x, y.to(bank.device))
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach().double().cpu())
        for n in range(count):
            found = match_weights(free[n].detach(), bank[n], spec, space=space, seed=seed, max_iter=max_iter,
                                  init={name: index[n] for name, index in perms.items()})
            if any(not torch.equal(found.perms[name], perms[name][n]) for name in perms):
                changes[n] += 1
                for name in perms:
                    perms[name][n] = found.perms[name]
                projected[n] = found.permuted
    work = working_rows(out, bank, "ste_match")
    work.copy_(projected)
    result = SteResult(perms, work, torch.stack(losses), changes, spec, space)
    if single:
        result = dataclasses.replace(result, perms={name: perm[0] for name, perm in perms.items()}, permuted=work[0],
                                     loss=result.loss[:, 0], changes=changes[0])
    return result

