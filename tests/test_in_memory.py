"""The Python API for models in memory (issue 21 part 7): ``starfast.barrier`` against a plain
PyTorch loop and a planted permutation, ``starfast.find_star`` against the star stage's own
``train_star`` call."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import starfast
from starfast import data, models, permute_model
from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.models import ModelSpec
from starfast.pipeline import STAR_SEED_START
from starfast.recipes import resolve
from starfast.starlight import StarlightOptions, train_star
from starfast.training import train_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_net.py"


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", device="cpu")


@pytest.fixture(scope="module")
def trained_mlps(digits):
    spec = ModelSpec.for_dataset("mlp", digits, {"width": 16})
    recipe = resolve("mlp", "digits", {"epochs": 3})
    trained = []
    for seed in range(3):
        model = spec.build()
        model.load_state_dict(train_model(spec, digits, recipe, seed, progress=False)[0])
        trained.append(model)
    return trained


def plain_barrier(model_a, model_b, inputs, labels, ts):
    """Eq. (1) by a plain loop: interpolate the state dicts, mean cross-entropy at each t."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    losses = []
    for t in ts:
        point = copy.deepcopy(model_a)
        point.load_state_dict({name: (1 - t) * state_a[name] + t * state_b[name] for name in state_a})
        with torch.no_grad():
            losses.append(F.cross_entropy(point(inputs), labels).item())
    return max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(ts, losses)), losses


def test_barrier_without_matching_is_the_plain_interpolation(rng):
    inputs = torch.randn(300, 1, 8, 8, generator=rng, dtype=torch.float64)
    labels = torch.randint(0, 10, (300,), generator=rng)
    model_a, model_b = (ModelSpec("mlp", 10, 1, (1, 8, 8), {"width": 12}).build().double() for _ in range(2))
    curve = starfast.barrier(model_a, model_b, (inputs, labels), match=False, ts=5)
    expected, losses = plain_barrier(model_a, model_b, inputs, labels, [0, 0.25, 0.5, 0.75, 1])
    difference = (curve.train_loss - torch.tensor(losses, dtype=torch.float64)).abs().max().item()
    assert difference < 1e-12, f"losses along the path differ by {difference}"
    assert abs(curve.loss_barrier["train"] - expected) < 1e-12, (curve.loss_barrier, expected)
    assert curve.test_loss is None and "test" not in curve.loss_barrier  # tensors without a test split


def assert_same_curves(curve, reference, what):
    for split in ("train", "test"):
        difference = (getattr(curve, f"{split}_loss") - getattr(reference, f"{split}_loss")).abs().max().item()
        assert difference < 1e-5, f"{split}: {what} differs by {difference}"


def test_barrier_with_matching_undoes_a_planted_permutation(rng, digits):
    # One hidden layer: weight matching is one exact assignment problem, so the planted
    # permutation is recovered exactly and the path is the model itself all along.
    net = ModelSpec.for_dataset("mlp", digits, {"width": 12, "depth": 1}).build()
    spec = models.permutation_spec(net)
    planted = permute_model(net, spec, spec.random(rng))
    reference = starfast.barrier(net, net, digits, match=False, ts=3)
    assert_same_curves(starfast.barrier(net, planted, digits, ts=3), reference, "the matched path from the self path")
    unmatched = starfast.barrier(net, planted, digits, match=False, ts=3)
    assert (unmatched.train_loss - reference.train_loss).abs().max() > 1e-3  # the permutation did matter


def test_barrier_aligns_by_weight_matching_and_carries_batchnorm_statistics(rng, digits):
    net = ModelSpec(f"{EXAMPLE}:make_net", 10, 1, (1, 8, 8), {"channels": 8}).build()
    for module in (net.bn1, net.bn2):  # statistics of their own, which the permutation must carry along
        module.running_mean.normal_(generator=rng)
        module.running_var.uniform_(0.5, 2.0, generator=rng)
    spec = models.permutation_spec(net)
    planted = permute_model(net, spec, spec.random(rng))
    space = ParamSpace(net)
    found = match_weights(space.flatten(net), space.flatten(planted)[None], spec, space=space).perms
    aligned = permute_model(planted, spec, {name: index[0] for name, index in found.items()})
    reference = starfast.barrier(net, aligned, digits, match=False, ts=3)
    assert_same_curves(starfast.barrier(net, planted, digits, ts=3), reference, "the matched path from the aligned one")


def test_find_star_is_the_star_stage_on_models_in_memory(trained_mlps, digits):
    star = starfast.find_star(trained_mlps, digits, epochs=1, seed=4)
    assert type(star) is type(trained_mlps[0]) and not star.training
    # The reference: train_star called as the star stage calls it, from the documented θ₀.
    skeleton = copy.deepcopy(trained_mlps[0])
    start = copy.deepcopy(trained_mlps[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAR_SEED_START + 4)
        for module in start.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    space = ParamSpace(skeleton)
    expected = train_star(skeleton, space.stack(trained_mlps), models.permutation_spec(skeleton), digits,
                          resolve("", "digits", {"epochs": 1}), StarlightOptions(), space=space,
                          init_row=space.flatten(start), seed=STAR_SEED_START + 4, quiet=True).state_dict
    for name, tensor in star.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    curve = starfast.barrier(star, trained_mlps[1], digits, ts=3)
    assert all(torch.isfinite(curve.train_loss)) and math.isfinite(curve.loss_barrier["test"])


def test_find_star_takes_tensors(trained_mlps, digits):
    inputs, labels = digits.tensors("train")
    star = starfast.find_star(trained_mlps[:2], (inputs, labels), test_data=digits.tensors("test"), epochs=1)
    with torch.no_grad():
        accuracy = (star(inputs).argmax(-1) == labels).double().mean().item()
    assert accuracy > 0.2, f"a star of two trained models should beat chance, got train accuracy {accuracy}"


def test_bad_input_to_the_api_is_named(trained_mlps, digits):
    with pytest.raises(ValueError, match=r"data must be a starfast.data.Dataset or \(inputs, labels\) tensors"):
        starfast.barrier(trained_mlps[0], trained_mlps[1], [1, 2, 3])
    other = ModelSpec.for_dataset("mlp", digits, {"width": 8}).build()
    with pytest.raises(ValueError, match=r"models\[1\] does not match this architecture"):
        starfast.find_star([trained_mlps[0], other], digits, epochs=1)


def test_the_readme_example_of_models_in_memory_runs_as_written():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Models in memory", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    star, nets = namespace["star"], namespace["nets"]
    assert type(star) is type(nets[0]) and math.isfinite(namespace["curve"].loss_barrier["test"])
