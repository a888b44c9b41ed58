"""DenseNet-40 (Huang et al., 2017), ``densenet40``, and its spec.

DenseNet-40-k without bottlenecks: a 3x3 stem conv of ``2k`` channels (24 for the standard
``growth`` k = 12), three dense blocks of 12 layers, each layer ``BN-ReLU-conv3x3`` adding ``k``
channels by concatenation (``cat([features, new], dim=1)``), transitions ``BN-ReLU-conv1x1``
(no compression) followed by 2x2 average pooling, then ``BN-ReLU``, global average pooling and a
Linear classifier. With k = 12 the classifier sees 456 features.

Spec: a dense block's features are a concatenation of segments — the block's input (produced by
the stem or the previous transition's conv) and the ``k`` channels of each earlier layer. Every
segment is one group; it acts on its producer's output axis and, at the segment's offset, on
every consumer of the concatenation: each later layer's BatchNorm (parameters and running stats)
and conv input axis, the transition's (or final) BatchNorm and conv (or classifier) input axis.
A segment is observed at its first consumer's conv (or classifier) input, after BN-ReLU, at its
offset: later consumers see the same units through other BatchNorms, at a cost that grows with
the block's depth.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from starfast.models.layer_axes import input_axes, output_axes
from starfast.models.options import image_channels, positive_int
from starfast.spec import Axis, Group, PermutationSpec, Site

LAYERS_PER_BLOCK = 12
BLOCKS = 3


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class Transition(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet40(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, growth: int = 12):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 2 * growth, 3, padding=1, bias=False)
        channels = 2 * growth
        for b in range(BLOCKS):
            layers = []
            for _ in range(LAYERS_PER_BLOCK):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            self.add_module(f"block{b + 1}", nn.Sequential(*layers))
            if b + 1 < BLOCKS:
                self.add_module(f"trans{b + 1}", Transition(channels))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for b in range(BLOCKS):
            x = getattr(self, f"block{b + 1}")(x)
            if b + 1 < BLOCKS:
                x = getattr(self, f"trans{b + 1}")(x)
        return self.fc(self.relu(self.bn(x)).mean((2, 3)))

    def permutation_spec(self) -> PermutationSpec:
        axes: Dict[str, List[Axis]] = {}  # group name -> axes, in creation order
        sites: Dict[str, Tuple[Site, ...]] = {}  # group name -> where it is first read
        sizes: Dict[str, int] = {}
        segments: List[Tuple[str, int, int]] = []  # (group, offset, size) of the current concatenation

        def start_segment(group: str, size: int, producer_axes: Tuple[Axis, ...]) -> None:
            offset = sum(segment_size for _, _, segment_size in segments)
            axes[group], sizes[group] = list(producer_axes), size
            segments.append((group, offset, size))

        def consume(bn_name: str, bn: nn.Module, consumer_name: str, consumer: nn.Module) -> None:
            for group, offset, _ in segments:
                axes[group] += output_axes(bn_name, bn, offset) + input_axes(consumer_name, consumer, offset)
                sites.setdefault(group, (Site(consumer_name, "input", 1, offset),))

        start_segment("conv1", self.conv1.out_channels, output_axes("conv1", self.conv1))
        for b in range(1, BLOCKS + 1):
            for i, layer in enumerate(getattr(self, f"block{b}")):
                prefix = f"block{b}.{i}"
                consume(f"{prefix}.bn", layer.bn, f"{prefix}.conv", layer.conv)
                start_segment(f"{prefix}.conv", layer.conv.out_channels, output_axes(f"{prefix}.conv", layer.conv))
            if b < BLOCKS:
                transition = getattr(self, f"trans{b}")
                consume(f"trans{b}.bn", transition.bn, f"trans{b}.conv", transition.conv)
                segments.clear()
                start_segment(f"trans{b}.conv", transition.conv.out_channels, output_axes(f"trans{b}.conv", transition.conv))
        consume("bn", self.bn, "fc", self.fc)
        return PermutationSpec([Group(name, sizes[name], tuple(group_axes), sites[name]) for name, group_axes in axes.items()])


def build_densenet40(num_classes: int, in_channels: int, input_shape, *, growth: int = 12) -> DenseNet40:
    return DenseNet40(num_classes, image_channels("densenet40", in_channels, input_shape), positive_int("growth", growth))
