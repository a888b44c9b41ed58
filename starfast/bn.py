"""BatchNorm running statistics for banks of models.

This module owns:

- ``recompute_bn``: exact cumulative (equal-weight per batch) BatchNorm running statistics over a
  dataset for ``K`` models at once — one ``torch.func.vmap`` over the rows of a ``[K, P]`` bank
  (run by :func:`starfast.bank.run_bank`), with the parameters as views of the bank and the
  running statistics as stacked ``[K, ...]`` buffers. This is what interpolated models need
  before evaluation (paper, Appendix B.3), and it equals ``torch.optim.swa_utils.update_bn`` run
  on each model separately.
- ``has_batchnorm`` / ``batchnorm_buffer_names``: whether a module has BatchNorm running
  statistics to recompute, and their names.

The data: see :mod:`starfast.bank` (a callable returning fresh ``(x, y)`` batches, or a
re-iterable; un-augmented).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from starfast.bank import Data, check_bank, run_bank
from starfast.flat import ParamSpace


def _tracking_batchnorms(module: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """``(qualified name, module)`` of every BatchNorm layer that keeps running statistics."""
    return [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, _BatchNorm) and child.track_running_stats and child.running_mean is not None
    ]


def batchnorm_buffer_names(module: nn.Module) -> List[str]:
    """Names (as in ``module.state_dict()``) of the running statistics that BatchNorm layers keep."""
    names = []
    for prefix, layer in _tracking_batchnorms(module):
        prefix = f"{prefix}." if prefix else ""
        names += [prefix + "running_mean", prefix + "running_var"]
        if layer.num_batches_tracked is not None:
            names.append(prefix + "num_batches_tracked")
    return names


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` contains a BatchNorm layer with running statistics to recompute.

    BatchNorm layers built with ``track_running_stats=False`` always normalise with the batch's
    own statistics, so they do not count.
    """
    return bool(_tracking_batchnorms(module))


def _reset_stats(skeleton: nn.Module, count: int, dtype: torch.dtype, device: torch.device) -> Dict[str, torch.Tensor]:
    """Fresh stacked ``[count, ...]`` running statistics, as ``reset_running_stats`` leaves them."""
    stats: Dict[str, torch.Tensor] = {}
    for prefix, layer in _tracking_batchnorms(skeleton):
        prefix = f"{prefix}." if prefix else ""
        shape = (count, *layer.running_mean.shape)
        stats[prefix + "running_mean"] = torch.zeros(shape, dtype=dtype, device=device)
        stats[prefix + "running_var"] = torch.ones(shape, dtype=dtype, device=device)
        if layer.num_batches_tracked is not None:
            stats[prefix + "num_batches_tracked"] = torch.zeros(count, dtype=torch.long, device=device)
    return stats


@torch.no_grad()
def recompute_bn(
    skeleton: nn.Module,
    rows: torch.Tensor,
    data: Data,
    *,
    space: Optional[ParamSpace] = None,
    max_batches: Optional[int] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    argument: str = "data",
    fixed_buffers: Optional[Dict[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """BatchNorm running statistics of every row of ``rows``, over ``data``, in one pass.

    Args:
        skeleton: a module of the architecture; its parameters and buffers are not changed (its
            BatchNorm momenta and train/eval flags are changed during the call and restored).
        rows: ``[K, P]`` bank (or one ``[P]`` row) in ``space``'s layout.
        data: ``(x, y)`` batches, see the module docstring; ``y`` is ignored.
        space: layout of the rows; ``ParamSpace(skeleton)`` when omitted.
        max_batches: use only the first ``max_batches`` batches.
        chunk_size: models per vmapped call; by default as many as fit ``memory_budget_bytes``.
        memory_budget_bytes: budget of one vmapped call (default: 1 GiB on CPU, half the free
            memory on an accelerator).
        argument: the name of ``data`` in error messages.
        fixed_buffers: other per-model buffers ``{name: [K, ...]}`` the rows run with (read, not
            returned), e.g. REPAIR's goal statistics (:mod:`starfast.repair`).

    Returns:
        ``{buffer name: [K, ...]}`` (no leading ``K`` for a ``[P]`` row) with ``running_mean``,
        ``running_var`` and ``num_batches_tracked`` of every BatchNorm layer, named as in
        ``skeleton.state_dict()``; ``{}`` at once when the skeleton has no such layer.

    Batch ``i`` is folded in with momentum ``1 / (i + 1)``: each batch weighs the same, exactly as
    ``update_bn`` (``momentum=None``) does. Unlike ``update_bn``, only the BatchNorm layers run in
    train mode (dropout stays off), so the result is deterministic; for models without stochastic
    layers the two agree.
    """
    space, bank, single = check_bank(skeleton, rows, space, "rows")
    if not has_batchnorm(skeleton):
        return {}
    stats = _reset_stats(skeleton, bank.shape[0], bank.dtype, bank.device)
    run_bank(
        skeleton, space, bank, {**(fixed_buffers or {}), **stats}, data,
        accumulating_batchnorms=[layer for _, layer in _tracking_batchnorms(skeleton)],
        argument=argument, max_batches=max_batches, chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
    )
    if single:
        return {name: value[0] for name, value in stats.items()}
    return stats
