"""Observing a model's permutation groups in a forward pass: the activations at a spec's sites.

A :class:`~starfast.spec.Site` names a submodule's input or output and the axis (and offset) where
a group's units lie. This module owns turning that into numbers:

- :func:`observing` — a context in which every forward pass of a model hands the activation at
  each given site, as a ``[M, size]`` matrix (every example and position a row, the group's units
  the columns), to a callback. It works inside ``torch.func.vmap`` and ``functional_call`` (the
  callback then sees one model's activations and must compute what it needs right there);
- :func:`batch_statistics_copy` — a copy of a skeleton whose BatchNorm layers always normalise with
  the batch's own statistics (no running statistics are read or written): Starlight trains through
  it, and rows without buffers (θ, an interpolated point) can be observed alike.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torch.func import replace_all_batch_norm_modules_

from starfast.spec import Site

SiteKey = Tuple[str, int]  # (group name, index of the site among the group's sites)


def unit_columns(activation: torch.Tensor, site: Site, size: int) -> torch.Tensor:
    """The ``[M, size]`` matrix of units ``[offset, offset + size)`` along ``site.dim``."""
    if not isinstance(activation, torch.Tensor):
        raise TypeError(f"site {site.module!r} ({site.where}) gives a {type(activation).__name__}, not a tensor")
    dim = site.dim if site.dim >= 0 else activation.dim() + site.dim
    if not 0 <= dim < activation.dim() or site.offset + size > activation.shape[dim]:
        raise ValueError(
            f"site {site.module!r} ({site.where}) has shape {list(activation.shape)}, too small for units "
            f"[{site.offset}, {site.offset + size}) along dim {site.dim}; the spec's sites do not fit this model"
        )
    moved = activation.narrow(dim, site.offset, size).movedim(dim, -1)
    return moved.reshape(-1, size)


@contextmanager
def observing(
    model: nn.Module,
    sites: Sequence[Tuple[SiteKey, Site, int]],
    on_activation: Callable[[SiteKey, torch.Tensor], None],
) -> Iterator[None]:
    """Within the block, each forward pass of ``model`` calls ``on_activation(key, [M, size])`` for
    every ``(key, site, size)`` of ``sites`` (see the module docstring). Hooks are removed on exit."""
    by_place: Dict[Tuple[str, str], List[Tuple[SiteKey, Site, int]]] = {}
    for entry in sites:
        by_place.setdefault((entry[1].module, entry[1].where), []).append(entry)
    handles = []
    try:
        for (module_name, where), entries in by_place.items():
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise ValueError(f"a site names submodule {module_name!r}, which the model does not have") from None

            def report(tensor, entries=entries):
                for key, site, size in entries:
                    on_activation(key, unit_columns(tensor, site, size))

            if where == "input":
                handles.append(module.register_forward_pre_hook(lambda _, args, report=report: report(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda _, args, output, report=report: report(output)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def batch_statistics_copy(skeleton: nn.Module) -> nn.Module:
    """A copy of ``skeleton`` whose BatchNorm layers always normalise with the batch's own statistics
    and keep none (``torch.func.replace_all_batch_norm_modules_``), in either mode."""
    model = copy.deepcopy(skeleton)
    replace_all_batch_norm_modules_(model)
    return model
