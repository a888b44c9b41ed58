"""A network of your own, in its own file: a small convolutional net for 8x8 digits.

starfast builds it from ``--arch examples/digits_net.py:make_net``: ``make_net`` receives the
``--arch-kw`` values (``channels=``, ``hidden=``) and the dataset's ``num_classes`` and
``in_channels``, because its signature names them.

``permutation_spec`` says which hidden axes may be permuted without changing the function (each
convolution's channels, with the BatchNorm that follows it, and the hidden units of the
classifier). starfast checks it against the model's tensors before any work.
"""
from torch import nn

from starfast import Axis, Group, PermutationSpec

BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


class DigitsNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        x = self.pool(x).flatten(1)
        return self.out(self.fc(x).relu())

    def permutation_spec(self) -> PermutationSpec:
        def channels_of(conv: str, bn: str, consumer: str):
            return (Axis(f"{conv}.weight", 0), Axis(f"{conv}.bias", 0),
                    *(Axis(f"{bn}.{name}", 0) for name in BATCHNORM_TENSORS), Axis(f"{consumer}.weight", 1))

        return PermutationSpec([
            Group("conv1", self.conv1.out_channels, channels_of("conv1", "bn1", "conv2")),
            Group("conv2", self.conv2.out_channels, channels_of("conv2", "bn2", "fc")),
            Group("fc", self.fc.out_features, (Axis("fc.weight", 0), Axis("fc.bias", 0), Axis("out.weight", 1))),
        ])


def make_net(num_classes: int, in_channels: int, channels: int = 16, hidden: int = 32) -> nn.Module:
    return DigitsNet(in_channels, num_classes, channels, hidden)
