"""An 11-point barrier curve of a ResNet-20 on CIFAR-shaped data: ``barrier_curve`` (one [11, P]
bank, batched BatchNorm recomputation and evaluation under vmap) against the naive loop (per t:
deep copy, load the interpolated row, ``update_bn``, evaluate). ``ours-sequential`` is
``barrier_curve(chunk_size=1)``: the same bank and buffers, one model per plain functional call.

256 random 3x16x16 training images in batches of 128 (CIFAR's 32x32 quadruples the work and does
not fit two minutes on two shared CPU cores; raise ``SIDE``/``IMAGES`` on a bigger machine); the
end points use their own buffers in every variant. Uses ``starfast.models.build("resnet20")``
when the models package imports, else a local ResNet-20 of the same shape (3 stages x 3 basic
blocks, widths 16/32/64). On CPU the curve is bound by the convolutions, which vmap turns into
grouped convolutions: expect the vmapped variant near or below the loop there; its gain is on GPUs.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from starfast.barrier import barrier_curve
from starfast.flat import ParamSpace

POINTS, IMAGES, SIDE, BATCH, ROUNDS = 11, 256, 16, 128, 2


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs)
        self.conv2, self.bn2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class LocalResNet20(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, inputs = [], 16
        for outputs, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(3):
                blocks.append(BasicBlock(inputs, outputs, stride if index == 0 else 1))
                inputs = outputs
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def resnet20() -> nn.Module:
    try:
        from starfast.models import build
    except ImportError:
        return LocalResNet20()
    return build("resnet20")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(IMAGES, 3, SIDE, SIDE, generator=generator)
    labels = torch.randint(0, 10, (IMAGES,), generator=generator)
    train = [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, IMAGES, BATCH)]
    model_a, model_b = resnet20(), resnet20()
    update_bn(train, model_a)
    update_bn(train, model_b)
    space = ParamSpace(model_a)
    return model_a, model_b, space, train


def naive_curve(model_a, model_b, space, train):
    row_a, row_b = space.flatten(model_a), space.flatten(model_b)
    losses = []
    with torch.no_grad():
        for t in torch.linspace(0, 1, POINTS).tolist():
            if t in (0.0, 1.0):
                model = model_a if t == 0.0 else model_b
            else:
                model = space.load_(copy.deepcopy(model_a), torch.lerp(row_a, row_b, t))
                update_bn(train, model)
            model.eval()
            total = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in train)
            losses.append(total / IMAGES)
    return torch.tensor(losses, dtype=torch.float64)


def batched_curve(model_a, model_b, space, train, chunk_size=None):
    curve = barrier_curve(
        model_a, space.flatten(model_a), space.flatten(model_b), train, ts=POINTS,
        buffers_a=model_a.state_dict(), buffers_b=model_b.state_dict(), space=space, chunk_size=chunk_size,
    )
    return curve.train_loss


def sequential_curve(model_a, model_b, space, train):
    return batched_curve(model_a, model_b, space, train, chunk_size=1)


@pytest.fixture(scope="module")
def curves():
    """Each variant's losses, so the second one run can be checked against the first."""
    return {}


VARIANTS = {"baseline": naive_curve, "ours": batched_curve, "ours-sequential": sequential_curve}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_barrier_curve_resnet20(bench, setup, curves, variant):
    group = f"barrier curve resnet20 {POINTS} points {IMAGES}x3x{SIDE}x{SIDE}"
    curves[variant] = bench(group, variant, VARIANTS[variant], *setup, rounds=ROUNDS, warmup_rounds=0)
    if "baseline" in curves:
        torch.testing.assert_close(curves[variant], curves["baseline"], atol=1e-4, rtol=1e-4)
