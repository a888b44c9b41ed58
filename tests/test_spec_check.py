"""check_spec: correct specs pass (eval, and train with BatchNorm statistics), broken ones fail
naming the group, its reported difference agrees with a plain permute-and-run reference, and
running statistics left out of a spec are caught even where outputs cannot see them."""
import re

import pytest
import torch

from starfast import Group, PermutationSpec, check_spec, models, trace_spec
from starfast.spec import permute_model
from starfast.spec_check import ALL_GROUPS


def build(name, kw, shape):
    with torch.random.fork_rng():  # a fixed model, and the global generator left as it was
        torch.manual_seed(0)
        return models.build(name, num_classes=5, in_channels=shape[0], input_shape=shape, **kw)


def without(spec, group_name, dropped):
    """``spec`` with the axes of tensors in ``dropped`` removed from one group."""
    groups = []
    for group in spec.groups:
        if group.name == group_name:
            group = Group(group.name, group.size, tuple(a for a in group.axes if a.name not in dropped), group.sites)
        groups.append(group)
    return PermutationSpec(groups)


def trained_statistics(model, rng):
    """Running statistics that are not the initial zeros and ones (a few train-mode passes)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8, generator=rng))
    return model.eval()


@pytest.mark.parametrize("name, kw, shape, train", [
    ("resnet20", dict(width=0.5), (3, 8, 8), True),
    ("vit", dict(dim=16, depth=1, heads=2, mlp_dim=16, patch=4), (3, 8, 8), False),
    ("mlp", dict(depth=2, width=8), (5,), False),
])
def test_correct_specs_pass_with_a_line_per_group(name, kw, shape, train, rng):
    model = build(name, kw, shape)
    x = torch.randn(4, *shape, generator=rng)
    spec = models.permutation_spec(model)
    report = check_spec(model, spec, x)
    assert report.passed and [c.group for c in report.groups] == [g.name for g in spec.groups] + [ALL_GROUPS]
    assert all((c.train_difference is not None) == train for c in report.groups)
    assert all(c.largest <= report.tolerance for c in report.groups), str(report)
    assert spec.groups[0].name in str(report)


def test_a_broken_group_is_named_with_its_difference(rng):
    model = trained_statistics(build("resnet20", dict(width=0.5), (3, 8, 8)), rng)
    x = torch.randn(4, 3, 8, 8, generator=rng)
    spec = without(models.permutation_spec(model), "layer2.1.conv1", {"layer2.1.conv2.weight"})
    with pytest.raises(ValueError, match=r"group 'layer2.1.conv1' \(16 units\) changes the model's outputs by up to") as error:
        check_spec(model, spec, x)
    report_line = next(line for line in str(error.value).splitlines() if line.strip().startswith("layer2.1.conv1 "))
    assert "FAILS" in report_line
    assert all("FAILS" not in line for line in str(error.value).splitlines() if line.strip().startswith("layer1."))


def test_reported_difference_matches_a_plain_reference(rng):
    # The same permutation applied by permute_model and a float64 forward pass: max |difference| / max |output|.
    model = build("mlp", dict(depth=2, width=8), (5,)).eval()
    x = torch.randn(4, 5, generator=rng)
    spec = without(models.permutation_spec(model), "hidden.1", {"output.weight"})
    with pytest.raises(ValueError) as error:
        check_spec(model, spec, x, seed=3)
    from starfast.spec_check import _moving  # the permutations check_spec draws, in its order
    generator = torch.Generator().manual_seed(3)
    perms = [_moving(spec, [group], generator) for group in spec.groups]
    model64, x64 = model.double(), x.double()  # check_spec runs in float64
    with torch.no_grad():
        reference = model64(x64)
        moved = permute_model(model64, spec, perms[1])(x64)
    expected = float((moved - reference).abs().max() / reference.abs().max())
    line = next(line for line in str(error.value).splitlines() if line.strip().startswith("hidden.1 "))
    assert f"eval {expected:.1e}" in line, (line, expected)


def test_running_statistics_left_out_are_caught_in_train_mode(rng):
    # Fresh running statistics (0 and 1) are the same in any order: outputs cannot show that the
    # spec forgot them, but the statistics the train-mode pass updates come out unpermuted.
    model = build("resnet20", dict(width=0.5), (3, 8, 8))
    x = torch.randn(4, 3, 8, 8, generator=rng)
    spec = without(models.permutation_spec(model), "layer1.0.conv1", {"layer1.0.bn1.running_mean", "layer1.0.bn1.running_var"})
    with pytest.raises(ValueError, match="layer1.0.conv1") as error:
        check_spec(model, spec, x)
    line = next(line for line in str(error.value).splitlines() if line.strip().startswith("layer1.0.conv1 "))
    eval_difference, train_difference = map(float, re.search(r"eval (\S+), train (\S+)", line).groups())
    assert eval_difference < 1e-5 < train_difference, line


def test_model_and_its_state_are_left_as_they_were(rng):
    model = build("resnet20", dict(width=0.5), (3, 8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8, generator=rng)
    check_spec(model, trace_spec(model, x), x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
