"""The permutable axes of standard torch layers, the vocabulary every model's spec is written in.

``output_axes(name, layer)`` lists the axes that carry a layer's output units: the rows of a
Linear/Conv weight and its bias, or every per-channel tensor of a normalisation layer (affine
weight and bias, BatchNorm running mean and variance). ``input_axes(name, layer)`` lists the axes
that consume units: the input axis of a Linear/Conv weight; a normalisation layer's inputs are
its outputs. ``offset`` places a group inside a wider axis (concatenated features).
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

from starfast.spec import Axis

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


def output_axes(name: str, layer: nn.Module, offset: int = 0) -> Tuple[Axis, ...]:
    """Axes of ``layer`` (registered under ``name``) that carry its output units."""
    if isinstance(layer, _WEIGHTED):
        _require_ungrouped(name, layer)
        axes = [Axis(f"{name}.weight", 0, offset)]
        if layer.bias is not None:
            axes.append(Axis(f"{name}.bias", 0, offset))
        return tuple(axes)
    if isinstance(layer, _NORMS):
        if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) != 1:
            raise ValueError(f"{name}: only LayerNorm over the last dimension has a permutable axis")
        tensors = [tensor_name for tensor_name, tensor in _norm_tensors(layer) if tensor is not None]
        return tuple(Axis(f"{name}.{tensor_name}", 0, offset) for tensor_name in tensors)
    raise TypeError(f"{name}: no permutation axes known for {type(layer).__name__}")


def input_axes(name: str, layer: nn.Module, offset: int = 0) -> Tuple[Axis, ...]:
    """Axes of ``layer`` (registered under ``name``) that consume its input units."""
    if isinstance(layer, _WEIGHTED):
        _require_ungrouped(name, layer)
        return (Axis(f"{name}.weight", 1, offset),)
    if isinstance(layer, _NORMS):
        return output_axes(name, layer, offset)
    raise TypeError(f"{name}: no permutation axes known for {type(layer).__name__}")


def _norm_tensors(layer: nn.Module):
    yield "weight", layer.weight
    yield "bias", layer.bias
    yield "running_mean", getattr(layer, "running_mean", None)
    yield "running_var", getattr(layer, "running_var", None)


def _require_ungrouped(name: str, layer: nn.Module) -> None:
    # A grouped convolution ties input and output channels together block-wise; a plain
    # per-axis permutation of either would not preserve the function.
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(f"{name}: grouped convolutions (groups={layer.groups}) are not supported by these specs")
