"""Activation matching (``am``): planted permutations recovered exactly on every architecture of
the zoo; on an MLP the permutations equal a straightforward reference (activations by plain
forward hooks, ``numpy.corrcoef`` and scipy's ``linear_sum_assignment`` per layer); the sites are
post-normalisation (the spec's documented choice); the matcher through the evaluation, Starlight
and the flags; errors."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from starfast import models
from starfast.activation_matching import ActivationProbe, activation_match
from starfast.evaluation import EvaluationConfig, LoadedModel, _match
from starfast.flat import ParamSpace
from starfast.matchers import MatcherChoice, find_permutations
from starfast.ops import permute
from starfast.recipes import Recipe
from starfast.sites import observing
from starfast.spec import Group, PermutationSpec
from starfast.starlight import StarlightOptions, train_star
from test_matchers import ARCHS, IDS, build, context, planted
from test_starlight import toy_dataset


# Correlations from float32 cross products of a few hundred rows: within ~1e-6 of exact.
CORRELATION_TOLERANCE = 1e-4


def probe_for(model, shape, rng, batches=2, size=64, dtype=torch.float32):
    """Random inputs, scaled up: a random deep MLP's units are mostly dead on N(0, 1) inputs (its
    biases dominate), far fewer on N(0, 16)."""
    return ActivationProbe(model, tuple(4 * torch.randn(size, *shape, generator=rng, dtype=dtype) for _ in range(batches)))


def is_live(model, spec, space, probe):
    """No unit of the model is constant on the probe: its self-correlation is 1 in every group (a
    constant unit costs 1/size of it; float32 cross products cost ~1e-6)."""
    row = space.flatten(model)
    itself = activation_match(row, row.unsqueeze(0), spec, space=space, probe=probe)
    return all(abs(float(value[0]) - 1) < CORRELATION_TOLERANCE for value in itself.correlation.values())


def live_plant(name, kw, shape, rng, draws=20):
    """``planted(...)`` and a probe on which no unit is constant. A unit that is constant on the
    data (a dead ReLU, common in a deep random MLP) has no correlation with anything, so units of
    that kind are interchangeable to activation matching (the module docstring says so); the model
    is redrawn until its self-correlation is 1 in every group."""
    for draw in range(draws):
        model, spec, space, row, bank = planted(name, kw, shape, rng)
        probe = probe_for(model, shape, rng)
        if is_live(model, spec, space, probe):
            print(f"{name}: a model without constant units at draw {draw}")
            return model, spec, space, row, bank, probe
    raise AssertionError(f"{name}: every one of {draws} random models has a unit constant on the probe")


@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=IDS)
def test_am_recovers_a_planted_permutation(name, kw, shape, rng):
    model, spec, space, row, bank, probe = live_plant(name, kw, shape, rng)
    result = find_permutations("am", row, bank, spec, space=space, probe=probe)
    for k in range(len(bank)):
        assert torch.equal(result.permuted[k], row), (name, k, {g: float(c[k]) for g, c in result.correlation.items()})
        for group, correlation in result.correlation.items():
            assert abs(float(correlation[k]) - 1) < CORRELATION_TOLERANCE, (group, float(correlation[k]))
    assert torch.equal(permute(bank, result.index_maps), result.permuted)


def test_units_constant_on_the_data_have_no_correlation(rng):
    model = build("mlp", dict(depth=1, width=6), (3,), 0)
    with torch.no_grad():
        model.hidden[0].bias[:2] = -1e3  # two dead ReLUs
    spec, space = models.permutation_spec(model), ParamSpace(model)
    row = space.flatten(model)
    itself = activation_match(row, row.unsqueeze(0), spec, space=space, probe=probe_for(model, (3,), rng))
    torch.testing.assert_close(itself.correlation["hidden.0"][0], torch.tensor(4 / 6, dtype=torch.float64))


def reference_permutations(target, source, inputs):
    """Per hidden layer of an MLP: the correlation of the two models' post-activation units over
    ``inputs`` (numpy.corrcoef) and scipy's maximal assignment."""

    def activations(model):
        found = []
        hooks = [layer.register_forward_hook(lambda _, __, out: found.append(model.activation(out))) for layer in model.hidden]
        with torch.no_grad():
            for x in inputs:
                model(x)
        for hook in hooks:
            hook.remove()
        depth = len(model.hidden)
        return [torch.cat(found[layer::depth]).double().numpy() for layer in range(depth)]

    perms = {}
    for layer, (a, b) in enumerate(zip(activations(target), activations(source))):
        n = a.shape[1]
        correlation = np.nan_to_num(np.corrcoef(a.T, b.T)[:n, n:])
        rows, cols = linear_sum_assignment(correlation, maximize=True)
        perms[f"hidden.{layer}"] = torch.from_numpy(cols[np.argsort(rows)])
    return perms


def test_am_equals_the_reference_on_an_mlp(rng):
    shape, kw = (1, 8, 8), dict(depth=3, width=24)
    probe = probe_for(build("mlp", kw, shape, 0, torch.float64), shape, rng, batches=3, size=50, dtype=torch.float64)
    spec, space = models.permutation_spec(probe.skeleton), ParamSpace(probe.skeleton)
    # Units constant on the data tie (see live_plant): only models without them have one answer.
    live = [model for model in (build("mlp", kw, shape, seed, torch.float64) for seed in range(1, 100))
            if is_live(model, spec, space, probe)][:4]
    assert len(live) == 4, f"only {len(live)} of 99 random MLPs have no unit constant on the probe"
    target, sources, inputs = live[0], live[1:], probe.inputs
    result = activation_match(space.flatten(target), space.stack(sources), spec, space=space, probe=probe, models_per_call=2)
    for k, source in enumerate(sources):
        expected = reference_permutations(target, source, inputs)
        for group, perm in expected.items():
            assert torch.equal(result.perms[group][k], perm), (k, group)


def test_the_sites_are_post_normalisation():
    """The documented choice: every site reads what the next weight layer reads, after BatchNorm /
    LayerNorm and the activation — here the ViT stream after LayerNorm (each token's features have
    mean 0 before the affine part) and a VGG group after BatchNorm and ReLU (non-negative)."""
    vit = models.build("vit", 10, 3, (3, 8, 8), dim=16, depth=1, heads=2, mlp_dim=16)
    with torch.no_grad():
        vit.blocks[0].norm1.bias.zero_()
        vit.blocks[0].norm1.weight.fill_(1.0)
    vgg = models.build("vgg11", 10, 3, (3, 8, 8), width=0.125)
    x = torch.randn(4, 3, 8, 8)
    for model, group_name, check in (
        (vit, "stream", lambda columns: columns.mean(1).abs().max() < 1e-5),
        (vgg, "features.0", lambda columns: bool((columns >= 0).all()) and bool((columns > 0).any())),
    ):
        group = models.permutation_spec(model).group(group_name)
        seen = []
        with observing(model, [((group.name, 0), group.sites[0], group.size)], lambda key, columns: seen.append(columns)):
            model(x)
        assert len(seen) == 1 and check(seen[0]), (group_name, group.sites[0])


def test_a_spec_without_sites_is_refused(rng):
    model = build("mlp", dict(depth=1, width=4), (2,), 0)
    space = ParamSpace(model)
    bare = PermutationSpec([Group(g.name, g.size, g.axes) for g in models.permutation_spec(model).groups])
    row = space.flatten(model)
    with pytest.raises(ValueError, match="declare Site"):
        activation_match(row, row.unsqueeze(0), bare, space=space, probe=probe_for(model, (2,), rng))
    with pytest.raises(ValueError, match="pass probe="):
        find_permutations("am", row, row.unsqueeze(0), models.permutation_spec(model), space=space)


def test_the_evaluation_and_starlight_match_with_am(rng):
    dataset = toy_dataset(rng)
    skeleton = models.build("mlp", 4, 3, (3, 8, 8), width=8)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    base = 0.3 * torch.randn(space.size, generator=rng)
    plants = [spec.random(rng) for _ in range(2)]
    loaded = [LoadedModel("a", base, {}, "")] + [
        LoadedModel(f"p{k}", permute(base, spec.index_map(space, plant)), {}, "") for k, plant in enumerate(plants)]
    config = EvaluationConfig(matcher="am", match_examples=40)
    matched = _match(loaded[0], loaded[1:], spec, space, config, probe=config.probe(skeleton, dataset))
    for _, row in matched:
        assert torch.equal(row, base)
    bank = 0.2 * torch.randn(3, space.size, generator=rng)
    recipe = Recipe(lr=0.05, weight_decay=0.0, epochs=2, batch_size=16)
    result = train_star(skeleton, bank, spec, dataset, recipe, StarlightOptions(matcher="am", match_examples=32), seed=1, quiet=True)
    assert spec.check_perm(result.perms) == 3 and result.metrics["rematches"] == 2
    assert result.settings["matcher"] == "am" and result.settings["match_examples"] == 32


def test_the_am_flags_reach_the_options_and_are_refused_elsewhere(tmp_path, capsys):
    built = context(["--matcher", "am", "--eval-matcher", "am", "--match-examples", "500"], tmp_path)
    assert built.star_options.matcher == "am" and built.star_options.match_examples == 500
    assert built.evaluation.matcher == "am" and built.evaluation.match_examples == 500
    with pytest.raises(SystemExit):
        context(["--match-examples", "500"], tmp_path)
    assert "--match-examples only applies to the data-based matchers (am, ste)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--match-examples must be an int >= 2"):
        MatcherChoice(matcher="am", match_examples=1)
