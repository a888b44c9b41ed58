"""WideResNet (Zagoruyko & Komodakis, 2016): ``wrn`` with pre-activation blocks, and its spec.

WRN-``depth``-``width``: a 3x3 stem of 16 channels, three stages of ``(depth - 4) / 6`` blocks
with ``16·width``, ``32·width``, ``64·width`` channels (stride 1, 2, 2), a final BN-ReLU, global
average pooling and one Linear classifier. A block is ``conv2(relu(bn2(conv1(relu(bn1(x))))))``
plus the identity, or plus a 1x1 conv of ``relu(bn1(x))`` where the shape changes. No dropout.
The ``activation`` option (relu, elu, silu) replaces every ReLU; the default builds today's network.

Spec (via :func:`starfast.models.resnet.residual_stream_spec`): the stream is read by each
block's ``bn1``, ``conv1`` and shortcut input, written by ``conv2`` and the shortcut conv, and
finally read by the last BatchNorm and the classifier; each block's ``conv1`` output (with
``bn2`` and ``conv2``'s input) is an inner group. Sites are post-normalisation: a stream is
observed at each block's ``conv1`` input (``act(bn1(stream))``) and the classifier's input, an
inner group at ``conv2``'s input.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from starfast.models.layer_axes import input_axes, output_axes
from starfast.models.options import activation_maker, image_channels
from starfast.models.resnet import BlockAxes, residual_stream_spec
from starfast.spec import Group, PermutationSpec, Site


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, act: nn.Module):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.act = act
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act(self.bn1(x))
        out = self.conv2(self.act(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))

    def block_axes(self, prefix: str) -> BlockAxes:
        reads = output_axes(f"{prefix}.bn1", self.bn1) + input_axes(f"{prefix}.conv1", self.conv1)
        writes = output_axes(f"{prefix}.conv2", self.conv2)
        inner_axes = (
            output_axes(f"{prefix}.conv1", self.conv1)
            + output_axes(f"{prefix}.bn2", self.bn2)
            + input_axes(f"{prefix}.conv2", self.conv2)
        )
        new_stream_size = None
        if self.shortcut is not None:
            reads += input_axes(f"{prefix}.shortcut", self.shortcut)
            writes += output_axes(f"{prefix}.shortcut", self.shortcut)
            new_stream_size = self.conv2.out_channels
        inner = (Group(f"{prefix}.conv1", self.conv1.out_channels, inner_axes, (Site(f"{prefix}.conv2", "input", 1),)),)
        return BlockAxes(reads, inner, writes, new_stream_size, (Site(f"{prefix}.conv1", "input", 1),))


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int, act: Callable[[], nn.Module]):
        super().__init__()
        if not isinstance(depth, int) or not 16 <= depth <= 40 or (depth - 4) % 6:
            raise ValueError(f"wrn: depth={depth!r} must be an int in 16..40 with (depth - 4) % 6 == 0 (16, 22, 28, 34, 40)")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 8:
            raise ValueError(f"wrn: width={width!r} must be an int in 1..8")
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages = []
        channels_in = 16
        for stage, base in enumerate((16, 32, 64)):
            channels = base * width
            stride = 1 if stage == 0 else 2
            stages.append(
                nn.Sequential(
                    *(PreActBlock(channels_in if i == 0 else channels, channels, stride if i == 0 else 1, act()) for i in range(blocks_per_stage))
                )
            )
            channels_in = channels
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(channels_in)
        self.act = act()
        self.fc = nn.Linear(channels_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.stages:
            x = stage(x)
        x = self.act(self.bn(x))
        return self.fc(x.mean((2, 3)))

    def permutation_spec(self) -> PermutationSpec:
        blocks = [
            block.block_axes(f"stages.{s}.{i}") for s, stage in enumerate(self.stages) for i, block in enumerate(stage)
        ]
        head_reads = output_axes("bn", self.bn) + input_axes("fc", self.fc)
        return residual_stream_spec(output_axes("conv1", self.conv1), self.conv1.out_channels, blocks, head_reads,
                                    (Site("fc", "input", 1),))


def build_wrn(num_classes: int, in_channels: int, input_shape, *, depth: int = 22, width: int = 1,
              activation: str = "relu") -> WideResNet:
    act = activation_maker("wrn", activation, inplace=True)
    return WideResNet(depth, width, num_classes, image_channels("wrn", in_channels, input_shape), act)
