"""The data-based matchers (activation matching ``am``, straight-through ``ste``) against weight
matching on the same 10 ResNet-20 sources.

All three align 10 independently initialised ResNet-20s (CIFAR width) with one target, batched
over the sources: weight matching (``wm``, the baseline) to convergence; activation matching on
a probe of ``EXAMPLES`` random 32x32 inputs (one pass of each of the 11 models, in batches of 128);
straight-through matching with 5 steps on the same probe (warm-started from weight matching,
whose time it includes; the default 30 steps take six times its step cost: 10 midpoint forward and
backward passes and 10 weight-matching projections per step, over 20 minutes on the shared CPU). Recorded per method in ``extra_info``: the mean final squared
distance ‖target − π(source)‖² (weight matching's objective; the data-based matchers optimise
something else, so this says how far apart their answers are, not which is better).
"""
import pytest
import torch

from starfast.activation_matching import ActivationProbe
from starfast.matchers import MatcherChoice, find_permutations
from starfast.models import build
from starfast.testing.zoo import independent_zoo

NUM_SOURCES = 10
ARCH = "resnet20"
EXAMPLES = 512
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUP = f"align {NUM_SOURCES}x {ARCH}: am, ste vs wm"


@pytest.fixture(scope="module")
def zoo():
    space, spec, target, bank = independent_zoo(ARCH, NUM_SOURCES, DEVICE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(EXAMPLES, 3, 32, 32, generator=generator).to(DEVICE)
    labels = torch.randint(10, (EXAMPLES,), generator=generator).to(DEVICE)
    probe = ActivationProbe(build(ARCH, 10, 3).to(DEVICE), inputs.split(128), labels.split(128))
    return space, spec, target, bank, probe


@pytest.mark.parametrize("matcher, role, choice", [
    ("wm", "baseline", {}),
    ("am", "ours", {}),
    ("ste", "ours-ste-5-steps", {"ste_steps": 5}),
], ids=["wm", "am", "ste"])
def test_align(bench, benchmark, zoo, matcher, role, choice):
    space, spec, target, bank, probe = zoo
    options = MatcherChoice(matcher=matcher, **choice).matcher_options()
    result = bench(GROUP, role, lambda: find_permutations(matcher, target, bank, spec, space=space, probe=probe, **options),
                   rounds=1, warmup_rounds=0)
    distance = ((result.permuted.double() - target.double()) ** 2).sum(1)
    benchmark.extra_info["mean_distance"] = float(distance.mean())
