"""Post-activation ResNets (``resnet18``, ``resnet20``, ``resnet18-imagenet``) and residual-stream specs.

``ResNet`` is the CIFAR variant (3x3 stem without max-pool, BasicBlocks, a 1x1 conv + BatchNorm
shortcut where the shape changes, global average pooling, one Linear classifier). Its module
names are torchvision's (``conv1``, ``bn1``, ``layer1``…, blocks with ``conv1``/``bn1``/``conv2``/
``bn2``/``downsample``, ``fc``), so :func:`resnet_spec` serves it and torchvision's ImageNet
ResNets alike. Its ``activation`` option (relu, elu, silu; :data:`~starfast.models.options.ACTIVATIONS`)
replaces every ReLU; the default builds today's network exactly.

Permutation groups of a residual network (:func:`residual_stream_spec`): everything added into
the residual stream shares one group, from the stem (or a projection shortcut) to the next
projection shortcut — the stem / shortcut / last conv of each block and their BatchNorms as
producers, the first conv / shortcut input / classifier as consumers. Each inner conv of a block
(its output, BatchNorm, and the next conv's input) is a group of its own.

Sites (where activation matching and REPAIR observe a group): the input of the layer that consumes
it, i.e. after BatchNorm and the activation — each block's first conv for a stream (the stream
after the block's closing activation), the classifier for the last one, the next conv for an
inner group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from starfast.models.layer_axes import input_axes, output_axes
from starfast.models.options import activation_maker, image_channels, scaled_channels
from starfast.spec import Axis, Group, PermutationSpec, Site


@dataclass(frozen=True)
class BlockAxes:
    """How one residual block touches the residual stream."""

    reads: Tuple[Axis, ...]  # axes consuming the incoming stream
    inner: Tuple[Group, ...]  # groups private to the block
    writes: Tuple[Axis, ...]  # axes producing the outgoing stream
    new_stream_size: Optional[int]  # a projection shortcut starts a new stream of this size; None keeps the stream
    read_sites: Tuple[Site, ...] = ()  # where the block's incoming stream can be observed


def residual_stream_spec(
    stem_writes: Sequence[Axis], stem_size: int, blocks: Sequence[BlockAxes], head_reads: Sequence[Axis],
    head_sites: Sequence[Site] = (),
) -> PermutationSpec:
    """Spec of a residual network: streams named ``residual0``, ``residual1``… plus the blocks' inner
    groups. A stream is observed wherever a block (or the head) reads it: ``read_sites``, ``head_sites``."""
    groups: List[Group] = []
    streams = 0
    stream, size, sites = list(stem_writes), stem_size, []
    for block in blocks:
        stream.extend(block.reads)
        sites.extend(block.read_sites)
        if block.new_stream_size is not None:
            groups.append(Group(f"residual{streams}", size, tuple(stream), tuple(sites)))
            streams += 1
            stream, size, sites = [], block.new_stream_size, []
        groups.extend(block.inner)
        stream.extend(block.writes)
    stream.extend(head_reads)
    sites.extend(head_sites)
    groups.append(Group(f"residual{streams}", size, tuple(stream), tuple(sites)))
    return PermutationSpec(groups)


class BasicBlock(nn.Module):
    """``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))`` with torchvision's names."""

    def __init__(self, in_channels: int, channels: int, stride: int, act: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = act
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(out + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet of BasicBlocks (see the module docstring)."""

    def __init__(self, stage_channels: Sequence[int], blocks_per_stage: Sequence[int], num_classes: int, in_channels: int,
                 act: Callable[[], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stage_channels[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_channels[0])
        self.act = act()
        self.num_stages = len(stage_channels)
        channels_in = stage_channels[0]
        for stage, (channels, blocks) in enumerate(zip(stage_channels, blocks_per_stage)):
            first_stride = 1 if stage == 0 else 2
            layer = nn.Sequential(
                *(BasicBlock(channels_in if i == 0 else channels, channels, first_stride if i == 0 else 1, act()) for i in range(blocks))
            )
            self.add_module(f"layer{stage + 1}", layer)
            channels_in = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        return resnet_spec(self)


def resnet_spec(model: nn.Module) -> PermutationSpec:
    """Spec of a post-activation ResNet with torchvision's module names (this module's or torchvision's)."""
    blocks = []
    stage = 1
    while hasattr(model, f"layer{stage}"):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            blocks.append(_post_activation_block_axes(f"layer{stage}.{i}", block))
        stage += 1
    stem_writes = output_axes("conv1", model.conv1) + output_axes("bn1", model.bn1)
    return residual_stream_spec(stem_writes, model.conv1.out_channels, blocks, input_axes("fc", model.fc),
                                (Site("fc", "input", 1),))


def _post_activation_block_axes(prefix: str, block: nn.Module) -> BlockAxes:
    # Works for any block of conv1/bn1 … convN/bnN in sequence: BasicBlock (N=2) or Bottleneck (N=3).
    layers = []
    while hasattr(block, f"conv{len(layers) + 1}"):
        n = len(layers) + 1
        layers.append((f"{prefix}.conv{n}", getattr(block, f"conv{n}"), f"{prefix}.bn{n}", getattr(block, f"bn{n}")))
    if not layers:
        raise TypeError(f"{prefix}: expected a residual block with conv1/bn1…, got {type(block).__name__}")
    inner = []
    for (conv_name, conv, bn_name, bn), (next_conv_name, next_conv, _, _) in zip(layers, layers[1:]):
        axes = output_axes(conv_name, conv) + output_axes(bn_name, bn) + input_axes(next_conv_name, next_conv)
        inner.append(Group(conv_name, conv.out_channels, axes, (Site(next_conv_name, "input", 1),)))
    first_name, first_conv = layers[0][0], layers[0][1]
    last_name, last_conv, last_bn_name, last_bn = layers[-1]
    reads = input_axes(first_name, first_conv)
    writes = output_axes(last_name, last_conv) + output_axes(last_bn_name, last_bn)
    new_stream_size = None
    if block.downsample is not None:
        shortcut_conv, shortcut_bn = block.downsample[0], block.downsample[1]
        reads += input_axes(f"{prefix}.downsample.0", shortcut_conv)
        writes += output_axes(f"{prefix}.downsample.0", shortcut_conv) + output_axes(f"{prefix}.downsample.1", shortcut_bn)
        new_stream_size = last_conv.out_channels
    return BlockAxes(reads, tuple(inner), writes, new_stream_size, (Site(first_name, "input", 1),))


def build_resnet18(num_classes: int, in_channels: int, input_shape, *, width: float = 1, activation: str = "relu") -> ResNet:
    return _cifar_resnet("resnet18", (64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, input_shape, width, activation)


def build_resnet20(num_classes: int, in_channels: int, input_shape, *, width: float = 1, activation: str = "relu") -> ResNet:
    return _cifar_resnet("resnet20", (16, 32, 64), (3, 3, 3), num_classes, in_channels, input_shape, width, activation)


def _cifar_resnet(arch: str, base_channels, blocks, num_classes: int, in_channels: int, input_shape, width, act_name) -> ResNet:
    channels = [scaled_channels(arch, width, base) for base in base_channels]
    act = activation_maker(arch, act_name, inplace=True)
    return ResNet(channels, blocks, num_classes, image_channels(arch, in_channels, input_shape), act)


def build_resnet18_imagenet(num_classes: int, in_channels: int, input_shape) -> nn.Module:
    """torchvision's ``resnet18`` (7x7 stride-2 stem, max-pool), randomly initialised."""
    channels = image_channels("resnet18-imagenet", in_channels, input_shape)
    try:
        from torchvision.models import resnet18
    except Exception as error:  # torchvision missing or built for another torch
        raise ImportError(
            f"resnet18-imagenet needs torchvision, which could not be imported ({error}); install the "
            "torchvision release that matches your torch"
        ) from error
    model = resnet18(num_classes=num_classes)
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return model
