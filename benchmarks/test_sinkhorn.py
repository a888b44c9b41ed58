"""Sinkhorn re-basin against weight matching on the same 10 ResNet-20 sources.

Both align 10 independently initialised ResNet-20s (CIFAR width, 16/32/64 channels) with one
target, batched over the sources: weight matching (``wm``, the baseline: what Starlight and the
evaluation use by default) to convergence, Sinkhorn re-basin with its defaults
(:mod:`starfast.sinkhorn`, 100 steps) and with 300 steps. Recorded per method in ``extra_info``: the mean final squared L2
distance ``‖target − π(source)‖²`` over the sources (Sinkhorn's objective, C_L2 up to the factor
1/P; weight matching maximises ⟨target, π(source)⟩, the same thing on permutations) and the
distance before any permutation. The time ratio says what Sinkhorn costs; the distances whether
it buys anything.
"""
import pytest
import torch

from starfast.matchers import find_permutations
from starfast.testing.zoo import independent_zoo

NUM_SOURCES = 10
ARCH = "resnet20"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUP = f"align {NUM_SOURCES}x {ARCH}: sinkhorn vs wm"


@pytest.fixture(scope="module")
def zoo():
    return independent_zoo(ARCH, NUM_SOURCES, DEVICE)


def record(benchmark, target, bank, result):
    distance = ((result.permuted.double() - target.double()) ** 2).sum(1)
    benchmark.extra_info["mean_distance"] = float(distance.mean())
    benchmark.extra_info["mean_distance_unpermuted"] = float(((bank.double() - target.double()) ** 2).sum(1).mean())


@pytest.mark.parametrize("matcher, role, options", [
    ("wm", "baseline", {}),
    ("sinkhorn", "ours", {}),
    ("sinkhorn", "ours-300-steps", {"steps": 300}),
], ids=["wm", "sinkhorn", "sinkhorn-300-steps"])
def test_align(bench, benchmark, zoo, matcher, role, options):
    space, spec, target, bank = zoo
    result = bench(GROUP, role, lambda: find_permutations(matcher, target, bank, spec, space=space, **options),
                   rounds=1, warmup_rounds=0)
    record(benchmark, target, bank, result)
