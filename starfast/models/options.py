"""Architecture options every family shares: their checks (so every builder rejects bad values
with the same clear message) and the table of elementwise activations by name (``activation=``).

Every activation here is elementwise, so it commutes with any permutation of its units: a
family's permutation spec holds whichever activation it is built with.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from torch import nn

ACTIVATIONS: Dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,  # takes (and ignores) inplace=
}


def activation_maker(arch: str, name, inplace: bool = False) -> Callable[[], nn.Module]:
    """A maker of fresh modules of the activation called ``name`` (checked now), ``inplace`` where
    the network allows it."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{arch}: activation={name!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
    return lambda: ACTIVATIONS[name](inplace=inplace)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")
    return value


def positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def scaled_channels(name: str, width, base: int) -> int:
    """``base * width`` channels for a width multiplier ``width`` (a positive number)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"{name}: width={width!r} must be a positive number (a channel multiplier)")
    channels = round(base * width)
    if channels < 1:
        raise ValueError(f"{name}: width={width!r} leaves {base} * {width} < 1 channel; use a larger width")
    return channels


def image_channels(arch: str, in_channels: int, input_shape: Optional[Sequence[int]], min_size: int = 8) -> int:
    """The channel count of an image model, checked against ``input_shape`` (C, H, W) when given."""
    positive_int("in_channels", in_channels)
    if input_shape is None:
        return in_channels
    if len(input_shape) != 3:
        raise ValueError(f"{arch} takes images: input_shape must be (channels, height, width), got {tuple(input_shape)}")
    if input_shape[0] != in_channels:
        raise ValueError(
            f"{arch}: in_channels={in_channels} but input_shape={tuple(input_shape)} has {input_shape[0]} channels; "
            f"pass in_channels={input_shape[0]}"
        )
    if min(input_shape[1:]) < min_size:
        raise ValueError(f"{arch} needs images of at least {min_size}x{min_size}, got input_shape={tuple(input_shape)}")
    return in_channels
