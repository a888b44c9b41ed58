"""Starlight benchmarks (CPU): what one step, one epoch and one interpolated point cost.

- ``starlight-step-resnet18``: one Starlight step (``lerp_gather`` row, ``functional_call`` on its
  views, backward into the flat θ, SGD on θ) against a plain training step of the same ResNet-18
  on the same batch (32 synthetic CIFAR-shaped images). Target: >= 0.9x the plain step's speed.
- ``starlight-epoch-mlp-digits``: one ``train_star`` epoch on digits (MLP, 50 sources, re-matching
  of all 50 at the epoch start, the final BatchNorm/evaluation pass included) against a plain SGD
  epoch of the same model and batches. ``extra_info`` holds the re-matching share of the epoch.
- ``interpolate-resnet18``: the point ``(1 - t) θ + t π(θ_n)`` at ResNet-18's P: the fused
  ``lerp_gather`` against gather-then-lerp (``torch.lerp(θ, bank[n][index], t)``) and against the
  per-parameter loop over module copies (deep copy, permute the source's state dict, lerp each
  parameter) as the baseline.

Every benchmark runs on one intra-op thread: on a machine whose cores are shared with other jobs,
multi-threaded timings swing by 2-3x between rounds, which would drown the ratios.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from starfast import models
from starfast.flat import ParamSpace
from starfast.ops import lerp_gather
from starfast.recipes import Recipe
from starfast.starlight import StarObjective, sample_draws, train_star
from starfast import data
from starfast.models import ModelSpec
from starfast.training import init_model, make_optimizer, train_model

STEP_BATCH, IMAGE_SHAPE, CLASSES = 32, (3, 32, 32), 10
EPOCH_SOURCES, EPOCH_BATCH = 50, 32


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet18():
    generator = torch.Generator().manual_seed(0)
    model = models.build("resnet18", CLASSES, 3, IMAGE_SHAPE)
    space, spec = ParamSpace(model), models.permutation_spec(model)
    bank = 0.05 * torch.randn(2, space.size, generator=generator)
    perm = spec.random(generator)
    index_maps = torch.stack([spec.index_map(space, perm), spec.index_map(space, spec.identity())]).int()
    inputs = torch.randn(STEP_BATCH, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(CLASSES, (STEP_BATCH,), generator=generator)
    return model, space, spec, bank, perm, index_maps, inputs, labels


def test_starlight_step(bench, resnet18):
    model, space, _, bank, _, index_maps, inputs, labels = resnet18
    objective = StarObjective(model, bank, space=space)
    theta = space.flatten(model).requires_grad_()
    optimizer = make_optimizer(Recipe(), [theta])
    draws = torch.Generator().manual_seed(1)

    def step():
        losses = objective(theta, index_maps, inputs, labels, sample_draws(bank.shape[0], 1, "uniform", draws))
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()

    bench("starlight-step-resnet18", "ours", step, rounds=5)


def plain_step(model, optimizer, inputs, labels) -> None:
    """One ordinary training step: the baseline of the step and epoch benchmarks."""
    loss = F.cross_entropy(model(inputs), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def test_plain_step(bench, resnet18):
    model, _, _, _, _, _, inputs, labels = resnet18
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(Recipe(), model.parameters())
    bench("starlight-step-resnet18", "baseline", lambda: plain_step(model, optimizer, inputs, labels), rounds=5)


@pytest.fixture(scope="module")
def digits_setup():
    from starfast import data

    digits = data.load("digits")
    model = models.build("mlp", digits.num_classes, 1, digits.input_shape)
    space = ParamSpace(model)
    bank = 0.1 * torch.randn(EPOCH_SOURCES, space.size, generator=torch.Generator().manual_seed(2))
    return digits, model, space, models.permutation_spec(model), bank


def test_starlight_epoch(bench, benchmark, digits_setup):
    digits, model, space, spec, bank = digits_setup
    recipe = Recipe(lr=0.05, epochs=1, batch_size=EPOCH_BATCH)
    results = []

    def epoch():
        results.append(train_star(model, bank, spec, digits, recipe, space=space, quiet=True))

    bench("starlight-epoch-mlp-digits", "ours", epoch, rounds=3)
    benchmark.extra_info["rematch_share"] = results[-1].metrics["rematch_share"]
    benchmark.extra_info["rematch_seconds"] = results[-1].metrics["rematch_seconds"]


def test_plain_epoch(bench, digits_setup):
    digits, model, _, _, _ = digits_setup
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(Recipe(lr=0.05), model.parameters())
    generator = torch.Generator().manual_seed(3)

    def epoch():
        for inputs, labels in digits.train_batches(EPOCH_BATCH, generator=generator):
            plain_step(model, optimizer, inputs, labels)

    bench("starlight-epoch-mlp-digits", "baseline", epoch, rounds=3)


@pytest.fixture(scope="module")
def resnet20_run():
    """Synthetic 3x16x16 data (512 images), a ResNet-20 and 50 independently initialised sources."""
    dataset = data.load("synthetic", shape=(3, 16, 16), num_train=512, num_test=64)
    spec = ModelSpec.for_dataset("resnet20", dataset)
    skeleton = init_model(spec, 0)
    space = ParamSpace(skeleton)
    bank = torch.stack([space.flatten(init_model(spec, seed)) for seed in range(1, EPOCH_SOURCES + 1)])
    return dataset, spec, skeleton, space, models.permutation_spec(skeleton), bank, Recipe(lr=0.05, epochs=3, batch_size=64)


def test_star_training_resnet20(bench, benchmark, resnet20_run):
    """Three epochs of Starlight (one cold match of 50 sources, then two warm re-matches)."""
    dataset, _, skeleton, space, spec, bank, recipe = resnet20_run
    results = []
    bench("train-3-epochs-resnet20-50-sources", "ours",
          lambda: results.append(train_star(skeleton, bank, spec, dataset, recipe, space=space, quiet=True)), rounds=3)
    benchmark.extra_info["rematch_share"] = results[-1].metrics["rematch_share"]


def test_regular_training_resnet20(bench, resnet20_run):
    """The same three epochs of regular training (starfast.training.train_model)."""
    dataset, spec, _, _, _, _, recipe = resnet20_run
    bench("train-3-epochs-resnet20-50-sources", "baseline", lambda: train_model(spec, dataset, recipe, 0, progress=False), rounds=3)


def test_lerp_gather(bench, resnet18):
    _, space, _, bank, _, index_maps, _, _ = resnet18
    theta = space.flatten(resnet18[0])
    bench("interpolate-resnet18", "ours", lambda: lerp_gather(theta, bank, 0, index_maps[0], 0.3), rounds=10)


def test_gather_then_lerp(bench, resnet18):
    _, space, _, bank, _, index_maps, _, _ = resnet18
    theta = space.flatten(resnet18[0])
    index = index_maps[0].long()
    bench("interpolate-resnet18", "gather-then-lerp", lambda: torch.lerp(theta, bank[0][index], 0.3), rounds=10)


def test_per_parameter_module_copies(bench, resnet18):
    model, space, spec, bank, perm, _, _, _ = resnet18
    source = space.load_(copy.deepcopy(model), bank[0])
    theta = dict(model.named_parameters())

    @torch.no_grad()
    def interpolate():
        point = copy.deepcopy(model)
        permuted = spec.apply(source.state_dict(), perm)
        for name, parameter in point.named_parameters():
            parameter.copy_(torch.lerp(theta[name], permuted[name], 0.3))
        return point

    bench("interpolate-resnet18", "baseline", interpolate, rounds=5)
