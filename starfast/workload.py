"""How much parallel work a run asks of the machine: intra-op threads and seeds trained at once.

Tiny models (the default MLP on digits: 3,010 parameters) do matrix products too small to split
across threads. With torch's default of one intra-op thread per core the threads wait on each
other at every product, and when another process holds a core that wait becomes the step
(measured: the default job took 4.2× its idle time with one core busy, 1.0 s per model alone and
12–16 s under load). So unless the user chose (``OMP_NUM_THREADS``, ``--threads``), a model under
:data:`SMALL_MODEL_PARAMETERS` runs on one thread, and an architecture that trains stacked seeds
as one batched product per layer (the MLP family's ``stacked_forward``) trains
:data:`AUTO_PARALLEL_SEEDS` seeds at once: more work per product instead of more threads per
product. Larger models keep torch's threads and one seed at a time. :func:`choose_workload`
decides; :meth:`Workload.apply` sets the threads; the choice is printed once by the command.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

SMALL_MODEL_PARAMETERS = 2_000_000
AUTO_PARALLEL_SEEDS = 8


@dataclass(frozen=True)
class Workload:
    """``threads``: torch's intra-op threads; ``parallel_seeds``: models trained at once;
    ``reason``: why, in words, for the one line a command prints."""

    threads: int
    parallel_seeds: int
    reason: str

    def apply(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def describe(self) -> str:
        seeds = f"{self.parallel_seeds} seeds trained at once" if self.parallel_seeds > 1 else "one seed at a time"
        return (f"workload: {self.threads} intra-op thread{'s' if self.threads > 1 else ''}, {seeds} ({self.reason}; "
                "--threads and --parallel-seeds choose)")


def choose_workload(model: nn.Module, device: torch.device, *, threads: Optional[int] = None,
                    parallel_seeds: Optional[int] = None, environment: Mapping[str, str] = os.environ) -> Workload:
    """The workload for ``model`` on ``device`` (see the module docstring); ``threads`` and
    ``parallel_seeds`` are the user's explicit choices (``None``: choose), and a set
    ``OMP_NUM_THREADS`` counts as a choice of threads."""
    for flag, value in (("--threads", threads), ("--parallel-seeds", parallel_seeds)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 (or auto), got {value}")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    small = parameters < SMALL_MODEL_PARAMETERS
    stacked = callable(getattr(model, "stacked_forward", None))
    size = f"{parameters:,} parameters"
    reasons = []
    if threads is None and environment.get("OMP_NUM_THREADS"):
        threads, reason = torch.get_num_threads(), f"OMP_NUM_THREADS={environment['OMP_NUM_THREADS']}"
    elif threads is None and small and device.type == "cpu":
        threads, reason = 1, f"{size}: products too small to split across threads"
    elif threads is None:
        threads, reason = torch.get_num_threads(), f"{size} on {device.type}: torch's default"
    else:
        reason = "--threads"
    reasons.append(reason)
    if parallel_seeds is None:
        parallel_seeds = AUTO_PARALLEL_SEEDS if small and stacked else 1
        if parallel_seeds > 1:
            reasons.append("stacked seeds make one batched product per layer")
    return Workload(threads, parallel_seeds, "; ".join(reasons))
