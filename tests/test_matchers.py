"""The permutation finders behind ``--matcher`` / ``--eval-matcher``: planted permutations
recovered exactly by ``wm`` and ``sinkhorn`` (from one of three noise seeds) on every architecture of the zoo; Sinkhorn's
straight-through gradient against autograd through dense permutation matrices; its answers are
permutations that preserve the function; Sinkhorn against weight matching on independent models
(printed, no winner asserted); ``none`` bit-identical to identity index maps in Starlight and the
evaluation; the flags, their errors, and a star refused under another matcher."""
import pytest
import torch
from torch.func import functional_call

from starfast import models
from starfast.evaluation import EvaluationConfig, LoadedModel, align
from starfast.files import write_json
from starfast.flat import ParamSpace
from starfast.matchers import MatcherChoice, find_permutations
from starfast.ops import lerp_gather, permute
from starfast.pipeline import train_missing_stars
from starfast.recipes import Recipe
from starfast.rundir import RunDirError
from starfast.sinkhorn import _matrix_gradient, sinkhorn, sinkhorn_match
from starfast.starlight import StarObjective, StarlightOptions, train_star
from starfast.train import build_context, build_parser, Distributed
from test_matching import ARCHS as WM_ARCHS
from test_starlight import toy_dataset
from tiny_runs import TINY_RECIPE, make_tiny_run

# Every architecture, as test_matching builds it, three of them smaller: Sinkhorn's steps cost
# more than weight matching's sweeps.
SMALLER = {"resnet20": dict(width=0.5), "vgg19": dict(width=0.0625), "vit": dict(dim=16, depth=2, heads=2, mlp_dim=32, patch=4)}
ARCHS = [(name, SMALLER.get(name, kwargs), shape) for name, kwargs, shape in WM_ARCHS]
IDS = [arch[0] for arch in ARCHS]
# The defaults recover each plant above within about 70 steps; a margin (the search stops as soon
# as the distance is 0).
PLANTED_SINKHORN = dict(steps=400)
# Sinkhorn is a local search from noisy logits: on the ViT about one plant in 20-30 is not
# recovered from the first noise seed (measured; e.g. STARFAST_TEST_SEED=300206615) while another
# seed recovers it. The test allows this many seeds per source and prints how many were used.
SINKHORN_SEEDS = 3


def build(name, kw, shape, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return models.build(name, num_classes=10, in_channels=shape[0], input_shape=shape, **kw).to(dtype)


def planted(name, kw, shape, rng, count=2):
    """``model, spec, space, row, bank``: ``count`` randomly permuted copies of one model."""
    model = build(name, kw, shape, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    spec, space = models.permutation_spec(model), ParamSpace(model)
    row = space.flatten(model)
    bank = torch.stack([permute(row, spec.index_map(space, spec.random(rng))) for _ in range(count)])
    return model, spec, space, row, bank


@pytest.mark.parametrize("matcher, options", [("wm", {}), ("sinkhorn", PLANTED_SINKHORN)], ids=["wm", "sinkhorn"])
@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=IDS)
def test_every_matcher_recovers_a_planted_permutation(name, kw, shape, matcher, options, rng):
    _, spec, space, row, bank = planted(name, kw, shape, rng)
    result = find_permutations(matcher, row, bank, spec, space=space, **options)
    assert torch.equal(permute(bank, result.index_maps), result.permuted)
    for k in range(len(bank)):
        recovered, seed = result.permuted[k], 0
        while matcher == "sinkhorn" and not torch.equal(recovered, row) and seed + 1 < SINKHORN_SEEDS:
            seed += 1
            recovered = find_permutations(matcher, row, bank[k], spec, space=space, seed=seed, **options).permuted
        print(f"{matcher} source {k}: seeds used {seed + 1}")
        assert torch.equal(recovered, row), (matcher, k, f"max difference {(recovered - row).abs().max().item():.3g} after {seed + 1} seeds")


def dense_permuted(spec, space, source, matrices):
    """The source row permuted by dense ``[n, n]`` matrices, one axis at a time (the autograd reference)."""
    views = dict(space.views(source))
    for name in list(views):
        tensor = views[name]
        for axis, group in spec.axes_of(name):
            n = matrices[group].shape[0]
            moved = tensor.movedim(axis.axis, 0)
            segment = torch.tensordot(matrices[group], moved[axis.offset : axis.offset + n], dims=1)
            moved = torch.cat([moved[: axis.offset], segment, moved[axis.offset + n :]])
            tensor = moved.movedim(0, axis.axis)
        views[name] = tensor
    return torch.cat([views[name].reshape(-1) for name in space.names])


@pytest.mark.parametrize("name, kw, shape", [ARCHS[0], ARCHS[3], ARCHS[7], ARCHS[8]], ids=["mlp", "resnet20", "densenet40", "vit"])
def test_the_straight_through_gradient_is_autograd_through_permutation_matrices(name, kw, shape, rng):
    target = build(name, kw, shape, 1, torch.float64)
    spec, space = models.permutation_spec(target), ParamSpace(target)
    target_row, source = space.flatten(target), space.flatten(build(name, kw, shape, 2, torch.float64))
    perms = spec.random(rng)
    matrices = {group.name: torch.eye(group.size, dtype=torch.float64)[perms[group.name]].requires_grad_() for group in spec.groups}
    permuted = dense_permuted(spec, space, source, matrices)
    assert torch.equal(permuted.detach(), permute(source, spec.index_map(space, perms)))
    # C_L2 = ‖target − π(s)‖² / P, which on permutations is const − (2/P)·⟨target, π(s)⟩.
    objective = -(2.0 / space.size) * (target_row @ permuted)
    objective.backward()
    target_views, permuted_views = space.views(target_row), space.views(permuted.detach().unsqueeze(0))
    for group in spec.groups:
        ours = _matrix_gradient(group, space, target_views, permuted_views, perms[group.name].unsqueeze(0))[0]
        error = (ours - matrices[group.name].grad).abs().max().item()
        print(f"{name} {group.name}: largest gradient mismatch {error:.3g}")
        torch.testing.assert_close(ours, matrices[group.name].grad, rtol=1e-12, atol=1e-15)


def test_sinkhorn_normalisation_is_doubly_stochastic(rng):
    """The last-normalised axis sums to 1 at once; the other converges linearly, at a rate that
    depends on the matrix (at 200 iterations, 3.5% of 7 × 7 logit matrices of scale 3 were still
    above 1e-7, up to 2.4e-3; at 1000 the worst of 2000 was 3.9e-5): its L1 error never grows and
    is small after enough iterations."""
    logits = 3.0 * torch.randn(4, 7, 7, generator=rng, dtype=torch.float64)
    ones = torch.ones(4, 7, dtype=torch.float64)
    errors = []
    for iterations in (50, 200, 1000):
        soft = sinkhorn(logits, iterations).exp()
        torch.testing.assert_close(soft.sum(-1), ones, rtol=0, atol=1e-12)
        errors.append((soft.sum(-2) - 1).abs().sum(-1))
    print("column L1 errors at 50, 200, 1000 iterations:", [error.max().item() for error in errors])
    assert bool((errors[1] <= errors[0] + 1e-15).all() and (errors[2] <= errors[1] + 1e-15).all()), errors
    assert errors[2].max().item() < 1e-3, errors[2]


def model_output(model, space, row, buffers, inputs):
    return functional_call(model, ({**space.views(row), **buffers},), (inputs,))


@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=IDS)
def test_sinkhorn_is_function_preserving_and_reported_against_wm(name, kw, shape, rng):
    target = build(name, kw, shape, 1, torch.float64)
    spec, space = models.permutation_spec(target), ParamSpace(target)
    sources = [build(name, kw, shape, 2 + k, torch.float64) for k in range(2)]
    for source in sources:  # BatchNorm statistics that are not the defaults, to be permuted too
        for buffer_name, buffer in source.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand(buffer.shape, generator=rng, dtype=torch.float64) + 0.5)
    row, bank = space.flatten(target), space.stack(sources)
    found = sinkhorn_match(row, bank, spec, space=space, steps=40)
    weights = find_permutations("wm", row, bank, spec, space=space)
    identity = ((bank - row) ** 2).sum(1)
    inputs = torch.randn(5, *shape, generator=rng, dtype=torch.float64)
    for k, source in enumerate(sources):
        perm = {group: index[k] for group, index in found.perms.items()}
        spec.check_perm(perm)
        assert float(found.distance[found.best_step[k], k]) == float(found.distance[:, k].min()) <= float(identity[k])
        wm_distance = float(((weights.permuted[k] - row) ** 2).sum())
        print(f"{name} source {k}: ‖target − π(source)‖² identity {float(identity[k]):.4f}, "
              f"sinkhorn {float(found.distance[:, k].min()):.4f}, weight matching {wm_distance:.4f}")
        buffers = {key: value for key, value in source.state_dict().items() if key not in space.names}
        permuted_state = spec.apply(source.state_dict(), perm)
        assert torch.equal(space.flatten(permuted_state), found.permuted[k])
        source.eval()
        torch.testing.assert_close(
            model_output(source, space, found.permuted[k], {key: permuted_state[key] for key in buffers}, inputs),
            model_output(source, space, bank[k], buffers, inputs),
            rtol=1e-10, atol=1e-10,
        )


def test_a_warm_start_begins_at_its_permutations_and_never_ends_worse(rng):
    name, kw, shape = ARCHS[3]
    target, source = build(name, kw, shape, 1), build(name, kw, shape, 2)
    spec, space = models.permutation_spec(target), ParamSpace(target)
    row, bank = space.flatten(target), space.flatten(source).unsqueeze(0)
    first = sinkhorn_match(row, bank, spec, space=space, steps=10)
    moved = row + 0.01 * row.abs().mean() * torch.randn(row.shape, generator=rng)
    buffer = first.permuted.clone()
    again = sinkhorn_match(moved, bank, spec, space=space, steps=5, init=first, out=buffer)
    start = ((first.permuted[0].double() - moved.double()) ** 2).sum()
    torch.testing.assert_close(again.distance[0, 0], start)
    assert float(again.distance[:, 0].min()) <= float(start)
    assert again.permuted.data_ptr() == buffer.data_ptr()
    with pytest.raises(ValueError, match="must not be the sources themselves"):
        sinkhorn_match(row, bank, spec, space=space, out=bank)


# -- none: no permutation at all -------------------------------------------------------------------


def test_none_interpolates_exactly_as_identity_maps_do(rng):
    skeleton = models.build("resnet20", 4, 3, (3, 8, 8), width=0.25)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = 0.2 * torch.randn(3, space.size, generator=rng)
    identity_maps = spec.index_map(space, {g: i.expand(3, -1) for g, i in spec.identity().items()}).int()
    objective = StarObjective(skeleton, bank, space=space)
    inputs, labels = torch.randn(8, 3, 8, 8, generator=rng), torch.randint(4, (8,), generator=rng)
    results = []
    for maps in (None, identity_maps):
        theta = (0.2 * torch.randn(space.size, generator=torch.Generator().manual_seed(7))).requires_grad_()
        losses = objective(theta, maps, inputs, labels, [(1, 0.3)])
        losses.total.backward()
        results.append((losses.total.detach(), theta.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    theta = torch.randn(space.size, generator=rng)
    assert torch.equal(lerp_gather(theta, bank, 2, None, 0.7), lerp_gather(theta, bank, 2, identity_maps[2], 0.7))


def test_a_star_without_permutations_is_the_star_of_identity_matches(rng, monkeypatch):
    skeleton = models.build("mlp", 4, 3, (3, 8, 8), width=8)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = 0.2 * torch.randn(3, space.size, generator=rng)
    data, recipe = toy_dataset(rng), Recipe(lr=0.05, weight_decay=0.0, epochs=2, batch_size=16)
    theta0 = space.flatten(skeleton)
    none = train_star(skeleton, bank, spec, data, recipe, StarlightOptions(matcher="none"), init_row=theta0, seed=3, quiet=True)
    assert none.perms is None and none.index_maps is None and none.metrics["rematches"] == 0

    def identity_matches(name, target, bank, spec, *, space, **kwargs):
        return find_permutations("none", target, bank, spec, space=space)

    monkeypatch.setattr("starfast.starlight.find_permutations", identity_matches)
    identity = train_star(skeleton, bank, spec, data, recipe, StarlightOptions(), init_row=theta0, seed=3, quiet=True)
    assert torch.equal(none.theta, identity.theta)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_sinkhorn_star_trains_on_valid_permutations(rng, background):
    skeleton = models.build("resnet20", 4, 3, (3, 8, 8), width=0.25)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = 0.2 * torch.randn(3, space.size, generator=rng)
    data, recipe = toy_dataset(rng), Recipe(lr=0.05, weight_decay=0.0, epochs=2, batch_size=16)
    options = StarlightOptions(matcher="sinkhorn", sinkhorn_steps=3, rematch_every=2, rematch_async=background)
    result = train_star(skeleton, bank, spec, data, recipe, options, seed=5, quiet=True)
    assert spec.check_perm(result.perms) == 3 and result.metrics["rematches"] == 3
    assert torch.equal(result.index_maps.long(), spec.index_map(space, result.perms))
    assert result.settings["matcher"] == "sinkhorn" and result.settings["sinkhorn_steps"] == 3


def test_the_evaluation_with_none_measures_the_models_as_they_are(rng):
    skeleton = models.build("resnet20", 4, 3, (3, 8, 8), width=0.25)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    buffers = dict(skeleton.named_buffers())
    loaded = [LoadedModel(f"m{k}", 0.2 * torch.randn(space.size, generator=rng), buffers, "") for k in range(3)]
    unmatched = align(loaded[0], loaded[1:], spec, space, EvaluationConfig(matcher="none"))
    for (got,), partner in zip(unmatched, loaded[1:]):
        assert got.row is partner.row and got.buffers is partner.buffers
    aligned = align(loaded[0], loaded[1:], spec, space, EvaluationConfig(matcher="sinkhorn", sinkhorn_steps=3))
    for (got,), partner in zip(aligned, loaded[1:]):  # a permutation of the partner's weights
        assert torch.equal(got.row.sort().values, partner.row.sort().values)


# -- flags and settings ------------------------------------------------------------------------------


def context(argv, tmp_path):
    parser = build_parser()
    return build_context(parser.parse_args(["--run-dir", str(tmp_path / "run"), *argv]), parser, Distributed())


def test_the_flags_reach_the_options(tmp_path):
    built = context(["--matcher", "sinkhorn", "--sinkhorn-lr", "5", "--sinkhorn-steps", "7", "--eval-matcher", "none"], tmp_path)
    defaults = MatcherChoice()
    assert built.star_options.matcher == "sinkhorn" and built.star_options.matcher_options() == {
        "lr": 5.0, "steps": 7, "temperature": defaults.sinkhorn_temperature, "iterations": defaults.sinkhorn_iterations}
    assert built.evaluation.matcher == "none" and built.evaluation.sinkhorn_lr == MatcherChoice().sinkhorn_lr
    default = context([], tmp_path)
    assert default.star_options.matcher == "wm" and default.evaluation.matcher == "wm"


@pytest.mark.parametrize("argv, message", [
    (["--matcher", "hungarian"], "invalid choice: 'hungarian'"),
    (["--eval-matcher", "sink"], "invalid choice: 'sink'"),
    (["--sinkhorn-lr", "5"], "--sinkhorn-lr only applies to the sinkhorn matcher; add --eval-matcher sinkhorn or --matcher sinkhorn"),
    (["--matcher", "sinkhorn", "--sinkhorn-lr", "-1"], "--sinkhorn-lr must be a positive number"),
    (["--eval-matcher", "sinkhorn", "--sinkhorn-steps", "0"], "--sinkhorn-steps must be a positive int"),
    (["--eval-matcher", "none", "--match-init", "sorted"], "--match-init sorted is a weight-matching start"),
])
def test_bad_matcher_flags_are_refused_naming_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        context(argv, tmp_path)
    assert message in capsys.readouterr().err


def test_the_applications_refuse_another_matcher(tmp_path, capsys):
    from starfast.evaluate import main as evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path), "--bma", "--eval-matcher", "sinkhorn"])
    assert "--bma and --fusion align with weight matching; drop --eval-matcher sinkhorn" in capsys.readouterr().err


def test_the_options_object_names_its_own_flag():
    with pytest.raises(ValueError, match="--matcher must be one of wm, none, sinkhorn"):
        StarlightOptions(matcher="hungarian")
    with pytest.raises(ValueError, match="--eval-matcher must be one of"):
        EvaluationConfig(matcher="hungarian")
    with pytest.raises(ValueError, match="takes no options"):
        find_permutations("none", torch.zeros(3), torch.zeros(1, 3), None, space=None, lr=1.0)


def test_a_star_is_not_reused_under_another_matcher(tmp_path):
    from starfast import data

    dataset = data.load("digits")
    run = make_tiny_run(tmp_path / "run", dataset, sources=2, heldout=1)
    spec = run.model_spec()
    stored = run.read_star_metadata(0)
    assert stored["matcher"] == "wm"
    for options, flag in ((StarlightOptions(matcher="none"), "--matcher"),
                          (StarlightOptions(matcher="sinkhorn"), "--matcher"),
                          (StarlightOptions(matcher="wm", sinkhorn_lr=3.0), "--sinkhorn-lr")):
        with pytest.raises(RunDirError, match=f"was trained with .* use the same {flag} as before"):
            train_missing_stars(run, spec, dataset, TINY_RECIPE, options, star_seeds=1, sources=[0, 1], progress=False)
    assert train_missing_stars(run, spec, dataset, TINY_RECIPE, StarlightOptions(), star_seeds=1, sources=[0, 1], progress=False) == []
    # A star recorded before the matchers existed was trained with weight matching.
    older = {key: value for key, value in stored.items() if key != "matcher" and not key.startswith("sinkhorn_")}
    write_json(run.star_path(0).with_suffix(".json"), older)
    assert train_missing_stars(run, spec, dataset, TINY_RECIPE, StarlightOptions(), star_seeds=1, sources=[0, 1], progress=False) == []
    with pytest.raises(RunDirError, match="was trained with matcher = 'wm', not 'none'"):
        train_missing_stars(run, spec, dataset, TINY_RECIPE, StarlightOptions(matcher="none"), star_seeds=1, sources=[0, 1],
                            progress=False)
