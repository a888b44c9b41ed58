"""An 11-point barrier curve on CIFAR-shaped data: ``barrier_curve`` (one [11, P] bank, batched
BatchNorm recomputation and evaluation; on the CPU convolutional models run one at a time, on a
GPU under vmap) against the naive loop (per t: deep copy, load the interpolated row,
``update_bn``, evaluate). ``ours-vmap`` forces every point of the curve into one vmapped call, to
show why the CPU default runs conv nets one model at a time.

Random images in batches of 128 (resnet20: 256 at 16x16, resnet18: 64 at 32x32, so one round fits
a minute on two CPU cores; raise the sizes on a bigger machine); the end points use their own
buffers in every variant, and every variant's losses are checked against the naive loop's.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from starfast import models
from starfast.barrier import barrier_curve
from starfast.flat import ParamSpace

POINTS, BATCH, ROUNDS = 11, 128, 3
SETTINGS = {"resnet20": (256, 16), "resnet18": (64, 32)}  # images, side


@pytest.fixture(scope="module", params=list(SETTINGS))
def setup(request):
    arch = request.param
    images, side = SETTINGS[arch]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(images, 3, side, side, generator=generator)
    labels = torch.randint(0, 10, (images,), generator=generator)
    train = [(inputs[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, images, BATCH)]
    model_a, model_b = models.build(arch), models.build(arch)
    update_bn(train, model_a)
    update_bn(train, model_b)
    return arch, f"{images}x3x{side}x{side}", (model_a, model_b, ParamSpace(model_a), train)


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
            losses.append(total / sum(len(y) for _, y in train))
    return torch.tensor(losses, dtype=torch.float64)


def batched_curve(model_a, model_b, space, train, chunk_size=None):
    curve = barrier_curve(
        model_a, space.flatten(model_a), space.flatten(model_b), train, ts=POINTS,
        buffers_a=model_a.state_dict(), buffers_b=model_b.state_dict(), space=space, chunk_size=chunk_size,
    )
    return curve.train_loss


def vmapped_curve(model_a, model_b, space, train):
    return batched_curve(model_a, model_b, space, train, chunk_size=POINTS)


@pytest.fixture(scope="module")
def curves():
    """Each variant's losses per architecture, so later variants are checked against the loop."""
    return {}


VARIANTS = {"baseline": naive_curve, "ours": batched_curve, "ours-vmap": vmapped_curve}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_barrier_curve(bench, setup, curves, variant):
    arch, shape, arguments = setup
    group = f"barrier curve {arch} {POINTS} points {shape}"
    result = bench(group, variant, VARIANTS[variant], *arguments, rounds=ROUNDS, warmup_rounds=0)
    curves[(arch, variant)] = result
    if (arch, "baseline") in curves:
        torch.testing.assert_close(result, curves[(arch, "baseline")], atol=1e-4, rtol=1e-4)
