"""VGG-11 and VGG-19 (``vgg11``, ``vgg19``), with or without BatchNorm, and their spec.

The convolutional trunk is torchvision's configuration A / E (channels scaled by ``width``), each
3x3 conv followed by BatchNorm (``batchnorm=True``, the default) and the activation (``relu``, or
``elu``/``silu`` by the ``activation`` option). ``batchnorm=False`` is the plain conv–activation
trunk of the official code's ``vgg11``/``vgg19``. Two deliberate differences from the ImageNet
model so the network runs on any input of at least 8x8: the 2x2 max-pools use ``ceil_mode`` (a
1x1 map stays 1x1 instead of failing), and the three-layer classifier is replaced by global
average pooling and a single Linear layer (the usual CIFAR choice).

Spec: each conv's output channels are one group (the conv's weight rows and bias, its BatchNorm's
parameters and running statistics when it has one, and the next conv's — or the classifier's —
input axis), observed at that consumer's input (after BatchNorm, the activation and any pooling).
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

from starfast.models.layer_axes import input_axes, output_axes
from starfast.models.options import activation_maker, boolean, image_channels, scaled_channels
from starfast.spec import Group, PermutationSpec, Site

POOL = "M"
CONFIGS = {
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg19": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL),
}


class VGG(nn.Module):
    def __init__(self, config: Sequence[Union[int, str]], num_classes: int, in_channels: int, act: Callable[[], nn.Module],
                 batchnorm: bool = True):
        super().__init__()
        layers = []
        channels = in_channels
        for entry in config:
            if entry == POOL:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, entry, 3, padding=1), *([nn.BatchNorm2d(entry)] if batchnorm else []), act()]
                channels = entry
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))

    def permutation_spec(self) -> PermutationSpec:
        conv_indices = [i for i, layer in enumerate(self.features) if isinstance(layer, nn.Conv2d)]
        consumers = [(f"features.{i}", self.features[i]) for i in conv_indices[1:]] + [("classifier", self.classifier)]
        groups = []
        for i, (consumer_name, consumer) in zip(conv_indices, consumers):
            conv, after = self.features[i], self.features[i + 1]
            norm = output_axes(f"features.{i + 1}", after) if isinstance(after, nn.BatchNorm2d) else ()
            axes = output_axes(f"features.{i}", conv) + norm + input_axes(consumer_name, consumer)
            groups.append(Group(f"features.{i}", conv.out_channels, axes, (Site(consumer_name, "input", 1),)))
        return PermutationSpec(groups)


def _builder(arch: str):
    def build(num_classes: int, in_channels: int, input_shape, *, width: float = 1, activation: str = "relu",
              batchnorm: bool = True) -> VGG:
        config = [entry if entry == POOL else scaled_channels(arch, width, entry) for entry in CONFIGS[arch]]
        act = activation_maker(arch, activation, inplace=True)
        return VGG(config, num_classes, image_channels(arch, in_channels, input_shape), act, boolean(f"{arch}: batchnorm", batchnorm))

    build.__name__ = f"build_{arch}"
    return build


build_vgg11 = _builder("vgg11")
build_vgg19 = _builder("vgg19")
