"""Permutation specs: which tensor axes each neuron permutation acts on, and how to apply one.

A ``PermutationSpec`` is a list of ``Group``s — one per permutable hidden axis of an
architecture (a layer's output units, a residual stream, a dense-block segment, an attention
head's query/key dims…). Each group lists the ``Axis``es it acts on: a state-dict name
(parameter or buffer), the axis of that tensor, and an ``offset`` for groups that own only a
slice of the axis (DenseNet concatenations, fused projections). A group may also list ``Site``s:
the submodule inputs or outputs where its units can be observed in a forward pass, which the
data-based matchers and REPAIR read; weight matching needs only the axes.

A permutation ``Perm`` maps every group name to a LongTensor ``[size]`` (or a batch ``[K, size]``).
Semantics are gathers: on every axis of group ``g`` the new unit ``k`` is the old unit
``perm[g][k]``. This module owns validating specs and permutations, the group algebra
(identity, random, compose, inverse), applying a permutation to a state dict or to a model, and
turning a permutation into a flat ``[P]`` (or ``[K, P]``) index map for :func:`starfast.ops.permute`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from starfast.flat import ParamSpace

Perm = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Axis:
    """One tensor axis a group permutes: ``tensor[name].narrow(axis, offset, group.size)``."""

    name: str
    axis: int
    offset: int = 0


SITE_PLACES = ("input", "output")


@dataclass(frozen=True)
class Site:
    """Where a group's units can be observed in a forward pass: the first positional input
    (``where="input"``, a forward pre-hook) or the output (``"output"``, a forward hook) of the
    submodule registered as ``module`` ("" is the model itself), units ``[offset, offset + size)``
    along axis ``dim`` of that tensor (``1`` for ``[B, C, ...]`` maps and ``[B, F]`` features, ``-1``
    for ``[B, tokens, F]``). Data-based matchers (activation matching, REPAIR) read activations
    here; weight-based ones ignore sites."""

    module: str
    where: str
    dim: int
    offset: int = 0


@dataclass(frozen=True)
class Group:
    """One permutable set of ``size`` units and every tensor axis that carries them; ``sites``:
    where the units can be observed (empty when the spec does not say)."""

    name: str
    size: int
    axes: Tuple[Axis, ...]
    sites: Tuple[Site, ...] = ()


class PermutationSpec:
    """The permutation symmetry of one architecture (see the module docstring)."""

    def __init__(self, groups: Sequence[Group]):
        self.groups: Tuple[Group, ...] = tuple(groups)
        self._by_name: Dict[str, Group] = {}
        self._axes_by_tensor: Dict[str, List[Tuple[Axis, str]]] = {}
        claimed: Dict[Tuple[str, int], List[Tuple[int, int, str]]] = {}
        for group in self.groups:
            if not isinstance(group, Group):
                raise TypeError(f"PermutationSpec: expected Group objects, got {type(group).__name__}")
            if group.name in self._by_name:
                raise ValueError(f"PermutationSpec: group name {group.name!r} is used twice")
            if not isinstance(group.size, int) or group.size < 1:
                raise ValueError(f"PermutationSpec: group {group.name!r} has size {group.size!r}; it must be a positive int")
            if not group.axes:
                raise ValueError(f"PermutationSpec: group {group.name!r} acts on no axis")
            self._by_name[group.name] = group
            for site in group.sites:
                if not isinstance(site, Site) or site.where not in SITE_PLACES or site.offset < 0:
                    raise ValueError(
                        f"PermutationSpec: group {group.name!r} has site {site!r}; a site is a Site whose "
                        f"where is one of {SITE_PLACES} and whose offset is non-negative"
                    )
            for axis in group.axes:
                if axis.axis < 0 or axis.offset < 0:
                    raise ValueError(
                        f"PermutationSpec: group {group.name!r} has {axis}; axis and offset must be non-negative"
                    )
                start, stop = axis.offset, axis.offset + group.size
                for other_start, other_stop, other in claimed.setdefault((axis.name, axis.axis), []):
                    if start < other_stop and other_start < stop:
                        raise ValueError(
                            f"PermutationSpec: axis {axis.axis} of {axis.name!r} is claimed twice: units "
                            f"[{start}, {stop}) by group {group.name!r} overlap [{other_start}, {other_stop}) "
                            f"of group {other!r}"
                        )
                claimed[(axis.name, axis.axis)].append((start, stop, group.name))
                self._axes_by_tensor.setdefault(axis.name, []).append((axis, group.name))

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.groups)} groups, {len(self._axes_by_tensor)} tensors)"

    # -- structure ------------------------------------------------------------------------------

    def group(self, name: str) -> Group:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"PermutationSpec: no group named {name!r}") from None

    @property
    def has_sites(self) -> bool:
        """True when every group says where its units can be observed (data-based matchers need it)."""
        return all(group.sites for group in self.groups)

    def axes_of(self, name: str) -> List[Tuple[Axis, str]]:
        """The ``(Axis, group name)`` pairs acting on tensor ``name`` (empty if none)."""
        return list(self._axes_by_tensor.get(name, ()))

    @property
    def tensor_names(self) -> List[str]:
        """Every state-dict name some group acts on."""
        return list(self._axes_by_tensor)

    def validate(self, model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]]) -> None:
        """Raise ``ValueError`` unless every axis of the spec exists in the model, big enough."""
        state = _state_of(model_or_state)
        for name, pairs in self._axes_by_tensor.items():
            if name not in state:
                raise ValueError(
                    f"PermutationSpec.validate: the model has no parameter or buffer {name!r} that group "
                    f"{pairs[0][1]!r} acts on; was this spec built for a different architecture?"
                )
            for axis, group_name in pairs:
                _check_fits(name, tuple(state[name].shape), axis, self._by_name[group_name], "the model")

    def check_space(self, space: ParamSpace, caller: str) -> None:
        """Raise ``ValueError`` (naming ``caller``) unless this spec fits the rows of ``space``
        exactly: every group acts on at least one of its parameters, and on every parameter axis
        the spec permutes, its groups cover all the units, no more and no fewer. Tensors the
        space lacks are buffers (rows hold parameters only). Without this check a spec of a
        narrower model permutes only part of each axis, and one of a wider model reaches past it."""
        covered: Dict[Tuple[str, int], int] = {}
        for group in self.groups:
            present = [axis for axis in group.axes if axis.name in space]
            if not present:
                raise ValueError(
                    f"{caller}: group {group.name!r} of the spec acts on no parameter of the model "
                    f"(it names {sorted({axis.name for axis in group.axes})}); the spec was built for another architecture"
                )
            for axis in present:
                _check_fits(axis.name, space.entry(axis.name).shape, axis, group, f"the model given to {caller}")
                covered[(axis.name, axis.axis)] = covered.get((axis.name, axis.axis), 0) + group.size
        for (name, axis), units in covered.items():
            length = space.entry(name).shape[axis]
            if units != length:  # groups never overlap (see __init__), so this is the only gap left
                raise ValueError(
                    f"{caller}: the spec permutes {units} of the {length} units on axis {axis} of {name!r}; "
                    "it was built for a model of another width or architecture"
                )

    # -- permutations ---------------------------------------------------------------------------

    def identity(self, device: Union[str, torch.device, None] = None) -> Perm:
        return {group.name: torch.arange(group.size, device=device) for group in self.groups}

    def random(self, generator: torch.Generator) -> Perm:
        """A uniformly random permutation of every group, drawn from ``generator`` (on its device)."""
        return {
            group.name: torch.randperm(group.size, generator=generator, device=generator.device)
            for group in self.groups
        }

    def compose(self, p: Perm, q: Perm) -> Perm:
        """The permutation that applies ``q`` first, then ``p``: ``q[p]`` per group."""
        self.check_perm(p, "p")
        self.check_perm(q, "q")
        composed = {}
        for name in self._by_name:
            outer, inner = torch.broadcast_tensors(p[name].long(), q[name].long().to(p[name].device))
            composed[name] = torch.gather(inner, -1, outer)
        return composed

    def inverse(self, p: Perm) -> Perm:
        self.check_perm(p, "p")
        inverted = {}
        for name in self._by_name:
            index = p[name].long()
            positions = torch.arange(index.shape[-1], device=index.device).expand_as(index)
            inverted[name] = torch.empty_like(index).scatter_(-1, index, positions)
        return inverted

    def check_perm(self, perm: Perm, what: str = "perm") -> Optional[int]:
        """Raise unless ``perm`` is a permutation for this spec; return its batch size (None if unbatched)."""
        if not isinstance(perm, Mapping):
            raise TypeError(f"{what} must be a dict of group name -> index tensor, got {type(perm).__name__}")
        missing = [name for name in self._by_name if name not in perm]
        extra = [name for name in perm if name not in self._by_name]
        if missing or extra:
            raise ValueError(
                f"{what} does not match this spec: missing groups {missing[:5]}, unknown groups {extra[:5]} "
                "(build permutations with spec.identity() / spec.random() or a matcher for this architecture)"
            )
        batch_shapes = set()
        for name, group in self._by_name.items():
            index = perm[name]
            if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{what}[{name!r}] must be an int64 tensor, got {_describe(index)}")
            if index.dim() not in (1, 2) or index.shape[-1] != group.size:
                raise ValueError(
                    f"{what}[{name!r}] has shape {list(index.shape)}; group {name!r} needs [{group.size}] or [K, {group.size}]"
                )
            ordered = index.sort(-1).values
            if not bool((ordered == torch.arange(group.size, device=index.device)).all()):
                raise ValueError(f"{what}[{name!r}] is not a permutation of 0..{group.size - 1}")
            batch_shapes.add(tuple(index.shape[:-1]))
        if len(batch_shapes) > 1:
            raise ValueError(
                f"{what} mixes batched and unbatched (or differently batched) groups: leading shapes {sorted(batch_shapes)}"
            )
        (lead,) = batch_shapes or {()}
        return lead[0] if lead else None

    # -- applying -------------------------------------------------------------------------------

    def apply(self, tensors: Mapping[str, torch.Tensor], perm: Perm) -> Dict[str, torch.Tensor]:
        """Permute a state dict (parameters and buffers) by ``perm``.

        Covered tensors are returned as new permuted tensors; every other entry (including names
        the spec covers but ``tensors`` lacks) is passed through as the same object. With a
        batched ``perm`` (``[K, size]`` per group) every covered tensor must carry a leading
        ``K`` dimension (e.g. stacked state dicts).
        """
        batch = self.check_perm(perm)
        out = dict(tensors)
        for name, pairs in self._axes_by_tensor.items():
            if name not in tensors:
                continue
            tensor = tensors[name]
            shape = tuple(tensor.shape[1:] if batch is not None else tensor.shape)
            if batch is not None and (tensor.dim() == 0 or tensor.shape[0] != batch):
                raise ValueError(
                    f"PermutationSpec.apply: perm is batched over K={batch} but {name!r} has shape "
                    f"{list(tensor.shape)}; stack K state dicts so every tensor starts with K"
                )
            for axis, group_name in pairs:
                _check_fits(name, shape, axis, self._by_name[group_name], "the state dict")
            permuted = tensor.clone()  # clone, not detach: gradients still flow through apply
            self._permute_in_place(permuted, pairs, perm, batch is not None)
            out[name] = permuted
        return out

    def index_map(self, space: ParamSpace, perm: Perm, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gather index ``[P]`` (``[K, P]`` for a batched ``perm``) that permutes flat rows.

        ``ops.permute(space.flatten(model), spec.index_map(space, perm))`` equals
        ``space.flatten(spec.apply(model.state_dict(), perm))``. Built as a broadcast sum: the
        source of element ``(i_0, i_1, ...)`` of a parameter is ``offset + Σ_a index_a[i_a] ·
        stride_a``, where ``index_a`` is the identity with each group's permutation written into
        its segment of axis ``a`` (no gathers). The axes after the last permuted one form one
        contiguous run (``+ arange``), and the final addition writes straight into the result, so
        each element is written once. ``out``: an existing ``[K, P]`` (``[P]``) int64 or int32
        tensor to write into, e.g. Starlight's int32 maps (no int64 copy in between).
        """
        batch = self.check_perm(perm)
        device = next(iter(perm.values())).device if perm else None
        count = 1 if batch is None else batch
        if out is None:
            rows = torch.empty(count, space.size, dtype=torch.long, device=device)
        else:
            expected = (space.size,) if batch is None else (count, space.size)
            if tuple(out.shape) != expected or out.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"index_map: out must be an int32 or int64 tensor of shape {expected}, got {out.dtype} {tuple(out.shape)}")
            rows = out.view(count, space.size)
            device = out.device
        for entry in space.entries:
            pairs = self._axes_by_tensor.get(entry.name, [])
            for axis, group_name in pairs:
                _check_fits(entry.name, entry.shape, axis, self._by_name[group_name], "the ParamSpace")
            last = max((axis.axis for axis, _ in pairs), default=-1)
            lead, run = entry.shape[: last + 1], math.prod(entry.shape[last + 1 :])
            rank = len(lead) + 1  # the leading axes, then the contiguous run
            terms = []
            for a, size in enumerate(lead):
                index = torch.arange(size, device=device).expand(count, size)
                on_axis = [(axis, group_name) for axis, group_name in pairs if axis.axis == a]
                if on_axis:
                    index = index.clone()
                    for axis, group_name in on_axis:
                        group_perm = perm[group_name].to(device).long()
                        index[:, axis.offset : axis.offset + group_perm.shape[-1]] = axis.offset + group_perm
                shape = [count] + [1] * rank
                shape[1 + a] = size
                terms.append(index.reshape(shape) * math.prod(entry.shape[a + 1 :]))
            within_run = torch.arange(run, device=device).view([1] * rank + [run])
            prefix = torch.full((count,) + (1,) * rank, entry.offset, dtype=torch.long, device=device)
            for term in terms[:-1]:
                prefix = prefix + term
            suffix = within_run + terms[-1] if terms else within_run
            torch.add(prefix, suffix, out=rows[:, entry.segment].view(count, *lead, run))
        return rows if batch is not None else rows[0]

    @staticmethod
    def _permute_in_place(tensor: torch.Tensor, pairs: List[Tuple[Axis, str]], perm: Perm, batched: bool) -> None:
        lead = 1 if batched else 0
        for axis, group_name in pairs:
            index = perm[group_name].to(tensor.device).long()
            dim = axis.axis + lead
            segment = tensor.narrow(dim, axis.offset, index.shape[-1])
            broadcast_shape = [1] * segment.dim()
            broadcast_shape[dim] = index.shape[-1]
            if batched:
                broadcast_shape[0] = index.shape[0]
            gathered = torch.gather(segment, dim, index.view(broadcast_shape).expand(segment.shape))
            segment.copy_(gathered)


def permute_model(model: nn.Module, spec: PermutationSpec, perm: Perm) -> nn.Module:
    """A deep copy of ``model`` with parameters and buffers permuted by ``perm`` (unbatched)."""
    if spec.check_perm(perm) is not None:
        raise ValueError("permute_model: perm is batched ([K, size] per group); pass one permutation ([size] per group)")
    spec.validate(model)
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted.load_state_dict(spec.apply(model.state_dict(), perm))
    return permuted


def _state_of(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    if isinstance(model_or_state, Mapping):
        return model_or_state
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_state).__name__}")


def _check_fits(name: str, shape: Tuple[int, ...], axis: Axis, group: Group, where: str) -> None:
    if axis.axis >= len(shape) or axis.offset + group.size > shape[axis.axis]:
        raise ValueError(
            f"PermutationSpec: group {group.name!r} permutes units [{axis.offset}, {axis.offset + group.size}) "
            f"of axis {axis.axis} of {name!r}, but in {where} that tensor has shape {list(shape)}; "
            "the spec was built for a different architecture or width"
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
