"""Independently initialised models of one architecture as rows: the benchmarks' matching
problems (``independent_zoo``)."""
from __future__ import annotations

import torch

from starfast import models
from starfast.flat import ParamSpace


def independent_zoo(arch: str, count: int, device: str = "cpu"):
    """``space, spec, target row, bank [count, P]``: ``count + 1`` independently initialised
    models of ``arch`` (CIFAR-shaped, drawn after seeding torch's global RNG with 0) on ``device``."""
    torch.manual_seed(0)
    target = models.build(arch, num_classes=10, in_channels=3)
    space, spec = ParamSpace(target), models.permutation_spec(target)
    bank = torch.stack([space.flatten(models.build(arch, num_classes=10, in_channels=3)) for _ in range(count)])
    return space, spec, space.flatten(target).to(device), bank.to(device)
