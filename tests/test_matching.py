"""Weight matching: recovery of known permutations on every architecture, monotone objective,
agreement with an independent per-model scipy implementation, warm starts and bad input."""
import pytest
import torch

from starfast import models
from starfast.flat import ParamSpace
from starfast.matchers import find_permutations
from starfast.matching import match_weights
from starfast.ops import lerp_gather, permute
from starfast.testing.matching_reference import match_one

# Small instances of every architecture: (name, build kwargs, input shape).
ARCHS = [
    ("mlp", dict(depth=3, width=32), (1, 8, 8)),
    ("linear2", dict(width=16), (2,)),
    ("resnet18", dict(width=0.125), (3, 8, 8)),
    ("resnet20", dict(width=1), (3, 8, 8)),
    ("wrn", dict(depth=16, width=1), (3, 8, 8)),
    ("vgg11", dict(width=0.125), (3, 8, 8)),
    ("vgg19", dict(width=0.125), (3, 8, 8)),
    ("densenet40", dict(growth=4), (3, 8, 8)),
    ("vit", dict(dim=32, depth=2, heads=4, mlp_dim=64, patch=4), (3, 8, 8)),
]


def build(name, kw, shape, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    model = models.build(name, num_classes=10, in_channels=shape[0], input_shape=shape, **kw)
    return model.to(dtype)


@pytest.mark.parametrize("init", [None, "sorted"])
@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_recovers_a_random_permutation(name, kw, shape, init, rng):
    model = build(name, kw, shape, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    spec, space = models.permutation_spec(model), ParamSpace(model)
    row = space.flatten(model)
    hidden = spec.random(rng)
    source = permute(row, spec.index_map(space, hidden))
    result = match_weights(row, source, spec, space=space, init=init)
    # The permuted copy comes back exactly: objective = squared norm, and the interpolation
    # between the model and its matched copy is the model itself.
    assert torch.equal(result.permuted, row)
    torch.testing.assert_close(result.objective[-1], (row.double() ** 2).sum())
    assert torch.equal(lerp_gather(row, source.unsqueeze(0), 0, result.index_maps, 0.5), row)
    assert torch.equal(permute(source, result.index_maps), row)


def test_sorted_init_recovers_a_default_size_vit(rng):
    # One residual-stream group couples every block; from the identity, coordinate descent can
    # stall on a fully random permutation of this size, the sorted start cannot.
    model = build("vit", {}, (3, 8, 8), seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    spec, space = models.permutation_spec(model), ParamSpace(model)
    row = space.flatten(model)
    source = permute(row, spec.index_map(space, spec.random(rng)))
    result = match_weights(row, source, spec, space=space, init="sorted")
    assert torch.equal(result.permuted, row)
    assert int(result.sweeps) == 1


@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_objective_is_monotone_and_beats_identity(name, kw, shape, rng):
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    target = build(name, kw, shape, seed)
    space = ParamSpace(target)
    bank = space.stack([build(name, kw, shape, seed + k + 1) for k in range(3)])
    result = match_weights(target, bank, models.permutation_spec(target))
    history = result.objective
    assert history.shape[1] == 3
    assert bool((history[1:] >= history[:-1] - 1e-9 * history.abs()[:-1]).all())
    assert bool((history[-1] >= history[0]).all())
    identity_objective = bank.double() @ space.flatten(target).double()
    torch.testing.assert_close(history[0], identity_objective)
    torch.testing.assert_close(result.objective[-1], result.permuted.double() @ space.flatten(target).double())


@pytest.mark.parametrize("name, kw, shape", [ARCHS[0], ARCHS[3], ARCHS[2]], ids=["mlp", "resnet20", "resnet18"])
def test_equals_per_model_scipy_reference(name, kw, shape, rng):
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    target = build(name, kw, shape, seed, dtype=torch.float64)
    sources = [build(name, kw, shape, seed + k + 1, dtype=torch.float64) for k in range(3)]
    spec, space = models.permutation_spec(target), ParamSpace(target)
    result = match_weights(target, sources, spec, seed=seed)
    target_views = space.views(space.flatten(target))
    for k, source in enumerate(sources):
        want, sweeps = match_one(target_views, space.views(space.flatten(source)), spec, seed=seed)
        for group in spec.groups:
            assert torch.equal(result.perms[group.name][k], want[group.name]), (k, group.name)
        assert int(result.sweeps[k]) == sweeps


def independent_zoo(name, kw, shape, first_seed, count=4):
    """``space, spec, row, bank``: a target and ``count`` independently initialised sources."""
    target = build(name, kw, shape, 1)
    space, spec = ParamSpace(target), models.permutation_spec(target)
    bank = space.stack([build(name, kw, shape, first_seed + k) for k in range(count)])
    return space, spec, space.flatten(target), bank


def test_warm_start_after_a_small_move_needs_fewer_sweeps(rng):
    space, spec, row, bank = independent_zoo(*ARCHS[3], first_seed=10)
    first = match_weights(row, bank, spec, space=space)
    moved = row + 0.01 * row.abs().mean() * torch.randn(row.shape, generator=rng)
    cold = match_weights(moved, bank, spec, space=space)
    warm = match_weights(moved, bank, spec, space=space, init=first.perms)
    assert int(warm.sweeps.sum()) < int(cold.sweeps.sum())
    # Warm starts begin where the last match ended, so they start far above the identity.
    assert bool((warm.objective[0] > cold.objective[0]).all())
    assert bool((warm.objective[-1] >= warm.objective[0]).all())


def test_single_source_and_module_inputs(rng):
    name, kw, shape = ARCHS[0]
    target, source = build(name, kw, shape, 1), build(name, kw, shape, 2)
    spec = models.permutation_spec(target)
    single = match_weights(target, source, spec)
    batched = match_weights(target, [source], spec)
    assert single.index_maps.dim() == 1 and single.objective.dim() == 1
    assert torch.equal(single.index_maps, batched.index_maps[0])


def test_a_model_with_a_scalar_parameter_and_unpermuted_tensors(rng):
    """Parameters no group touches (here a scalar and a bias) ride along unchanged, and warm
    starts from a result (whose fingerprint covers every parameter) work."""
    from starfast.spec import Axis, Group, PermutationSpec

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(5, 3, generator=rng))
    model.v = torch.nn.Parameter(torch.randn(4, 5, generator=rng))
    model.bias = torch.nn.Parameter(torch.randn(4, generator=rng))
    model.temperature = torch.nn.Parameter(torch.tensor(2.0))
    space = ParamSpace(model)
    spec = PermutationSpec([Group("hidden", 5, (Axis("w", 0), Axis("v", 1)))])
    row = space.flatten(model)
    perms = torch.stack([torch.randperm(5, generator=rng) for _ in range(3)])
    bank = permute(row.expand(3, -1) + 0.01 * torch.randn(3, space.size, generator=rng), spec.index_map(space, {"hidden": perms}))
    first = match_weights(row, bank, spec, space=space)
    again = match_weights(row + 1e-3 * torch.randn(space.size, generator=rng), bank, spec, space=space, init=first)
    for result in (first, again):
        assert torch.equal(result.permuted, permute(bank, result.index_maps))
        views, source_views = space.views(result.permuted), space.views(bank)
        assert torch.equal(views["temperature"], source_views["temperature"])
        assert torch.equal(views["bias"], source_views["bias"])
    assert torch.equal(torch.argsort(perms, dim=1), first.perms["hidden"])  # undoes the permutation


def test_bad_input():
    name, kw, shape = ARCHS[0]
    target = build(name, kw, shape, 1)
    spec, space = models.permutation_spec(target), ParamSpace(target)
    row = space.flatten(target)
    with pytest.raises(ValueError, match="space=ParamSpace"):
        match_weights(row, row, spec)
    with pytest.raises(ValueError, match="sources bank must be"):
        match_weights(row, torch.zeros(2, 5), spec, space=space)
    with pytest.raises(ValueError, match="init must be None, 'sorted'"):
        match_weights(row, row, spec, space=space, init="random")
    with pytest.raises(ValueError, match="init has groups"):
        match_weights(row, row, spec, space=space, init={"nope": torch.arange(3)})
    other = build("mlp", dict(depth=2, width=16), shape, 1)
    with pytest.raises(ValueError, match="does not match this architecture"):
        match_weights(target, other, spec)


def star_like_zoo(name, kw, shape, rng, count=4, noise=1.0):
    """A target and sources that are randomly permuted noisy copies of it."""
    target = build(name, kw, shape, int(torch.randint(0, 1000, (1,), generator=rng)))
    space, spec = ParamSpace(target), models.permutation_spec(target)
    row = space.flatten(target)
    noisy = row + noise * row.abs().mean() * torch.randn(count, space.size, generator=rng)
    perms = {group: torch.stack([spec.random(rng)[group] for _ in range(count)]) for group in spec.identity()}
    return space, spec, row, permute(noisy, spec.index_map(space, perms))


@pytest.mark.parametrize("name, kw, shape", [ARCHS[0], ARCHS[3]], ids=["mlp", "resnet20"])
@pytest.mark.parametrize("move", [1e-3, 0.3, 3.0])
def test_warm_start_from_a_result_equals_warm_start_from_its_perms(name, kw, shape, move, rng):
    space, spec, row, bank = star_like_zoo(name, kw, shape, rng)
    first = match_weights(row, bank, spec, space=space)
    moved = row + move * row.abs().mean() * torch.randn(row.shape, generator=rng)
    from_result = match_weights(moved, bank, spec, space=space, init=first)
    from_perms = match_weights(moved, bank, spec, space=space, init=first.perms)
    for group in spec.groups:
        assert torch.equal(from_result.perms[group.name], from_perms.perms[group.name])
    assert torch.equal(from_result.permuted, from_perms.permuted)
    assert torch.equal(from_result.permuted, permute(bank, from_result.index_maps))
    torch.testing.assert_close(from_result.objective[-1], from_perms.objective[-1])


def brute_force_unit_norms(group, space, row):
    """``[n]`` float64: each unit's norm over the group's axes, one unit at a time."""
    views = space.views(row.double())
    norms = torch.zeros(group.size, dtype=torch.float64)
    for unit in range(group.size):
        for axis in group.axes:
            if axis.name in space:
                norms[unit] += views[axis.name].select(axis.axis, axis.offset + unit).pow(2).sum()
    return norms.sqrt()


@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_source_scale_bounds_bracket_the_largest_unit_norm(name, kw, shape, rng):
    """The exact scale (an upper bound within rounding) and its cheap lower bound, against a
    unit-by-unit float64 loop, on every architecture (concatenations, heads, later axes)."""
    from starfast import warm_start

    target = build(name, kw, shape, 0)
    space, spec = ParamSpace(target), models.permutation_spec(target)
    bank = torch.randn(3, space.size, generator=rng) * torch.rand(3, 1, generator=rng)
    groups = [g for g in spec.groups if any(axis.name in space for axis in g.axes)]
    views = space.views(bank)
    upper = warm_start._largest_unit_norms(groups, space, views)
    lower = warm_start._scale_lower_bounds(groups, space, warm_start._row_squares(space, views), views)
    for group in groups:
        exact = torch.stack([brute_force_unit_norms(group, space, row).max() for row in bank])
        assert bool((upper[group.name][:, 0] >= exact).all()), group.name
        terms_per_unit = sum(space.entry(a.name).numel // space.entry(a.name).shape[a.axis] for a in group.axes if a.name in space)
        inflation = (terms_per_unit + 4) * torch.finfo(torch.float32).eps  # the bound's stated slack
        assert bool((upper[group.name][:, 0] <= exact * (1 + inflation)).all()), group.name
        assert bool((lower[group.name][:, 0] <= exact).all()), group.name
        assert bool((lower[group.name][:, 0] > 0).all()), group.name


def test_unrelated_sources_skip_the_exact_scale_and_match_as_from_perms(monkeypatch, rng):
    """Independently initialised sources: a 1% move leaves no source certifiable by the lower
    bound, so the exact scale is never computed, and the result is still the plain warm start's."""
    from starfast import warm_start

    space, spec, row, bank = independent_zoo(*ARCHS[3], first_seed=20)
    first = match_weights(row, bank, spec, space=space)
    exact_groups = []
    original = warm_start._largest_unit_norms
    monkeypatch.setattr(warm_start, "_largest_unit_norms", lambda groups, *args: exact_groups.extend(groups) or original(groups, *args))
    moved = row + 0.01 * row.abs().mean() * torch.randn(row.shape, generator=rng)
    from_result = match_weights(moved, bank, spec, space=space, init=first)
    from_perms = match_weights(moved, bank, spec, space=space, init=first.perms)
    assert len(exact_groups) < len(spec.groups)
    assert set(from_result.source_scales) == {group.name for group in exact_groups}
    assert all(torch.equal(from_result.perms[g], from_perms.perms[g]) for g in from_perms.perms)
    assert torch.equal(from_result.permuted, from_perms.permuted)


def test_small_moves_skip_every_cost_matrix(monkeypatch, rng):
    from starfast import matching

    name, kw, shape = ARCHS[3]
    space, spec, row, bank = star_like_zoo(name, kw, shape, rng)
    first = match_weights(row, bank, spec, space=space)
    assert all(bool((margin > 0).all()) for margin in first.margins.values())  # converged: all known
    calls = []
    original = matching.group_cost
    monkeypatch.setattr(matching, "group_cost", lambda *args: calls.append(1) or original(*args))
    moved = row + 1e-4 * row.abs().mean() * torch.randn(row.shape, generator=rng)
    again = match_weights(moved, bank, spec, space=space, init=first)
    assert not calls
    assert all(torch.equal(again.perms[g], first.perms[g]) for g in first.perms)
    # ... and chains: the carried margins certify the next small move too.
    third = match_weights(moved + 1e-4 * row.abs().mean() * torch.randn(row.shape, generator=rng), bank, spec,
                          space=space, init=again)
    assert not calls and all(torch.equal(third.perms[g], first.perms[g]) for g in first.perms)


def test_index_maps_are_built_once_and_reused_while_the_permutations_hold(rng):
    """``index_maps`` is built on first read and cached; a warm start that changes no permutation
    carries the previous result's maps over (for a bank and for a single source) instead of
    building them again; any other result builds its own from its perms."""
    name, kw, shape = ARCHS[3]
    space, spec, row, bank = star_like_zoo(name, kw, shape, rng)
    first = match_weights(row, bank, spec, space=space)
    maps = first.index_maps
    assert first.index_maps is maps and torch.equal(maps, spec.index_map(space, first.perms))
    moved = row + 1e-4 * row.abs().mean() * torch.randn(row.shape, generator=rng)
    again = match_weights(moved, bank, spec, space=space, init=first)
    assert all(torch.equal(again.perms[g], first.perms[g]) for g in first.perms)
    assert again.index_maps is maps
    single = match_weights(row, bank[1], spec, space=space)
    single_maps = single.index_maps
    single_again = match_weights(moved, bank[1], spec, space=space, init=single)
    assert all(torch.equal(single_again.perms[g], single.perms[g]) for g in single.perms)
    assert single_again.index_maps.data_ptr() == single_maps.data_ptr()
    assert torch.equal(single_again.index_maps, spec.index_map(space, single_again.perms))
    far = match_weights(row + 3.0 * row.abs().mean() * torch.randn(row.shape, generator=rng), bank, spec,
                        space=space, init=first)
    assert torch.equal(far.index_maps, spec.index_map(space, far.perms))
    assert torch.equal(far.permuted, permute(bank, far.index_maps))


@pytest.mark.parametrize("zoo", ["star-like", "independent"])
def test_out_receives_the_rows_and_may_be_updated_in_place(zoo, rng):
    """``out=`` a fresh buffer, the previous result's rows (updated in place) or the bank itself:
    the same permutations, rows and objective as a match that allocates its own rows."""
    if zoo == "star-like":
        space, spec, row, bank = star_like_zoo(*ARCHS[3], rng)
    else:
        space, spec, row, bank = independent_zoo(*ARCHS[3], first_seed=30, count=3)
    first = match_weights(row, bank, spec, space=space)
    moved = row + 0.01 * row.abs().mean() * torch.randn(row.shape, generator=rng)
    expected = match_weights(moved, bank, spec, space=space, init=first)

    def same(result):
        assert all(torch.equal(result.perms[g], expected.perms[g]) for g in expected.perms)
        assert torch.equal(result.permuted, expected.permuted)
        assert torch.equal(result.objective, expected.objective)

    buffer = torch.full_like(bank, float("nan"))
    into_buffer = match_weights(moved, bank, spec, space=space, init=first, out=buffer)
    same(into_buffer)
    assert into_buffer.permuted.data_ptr() == buffer.data_ptr()
    rows = first.permuted.data_ptr()
    in_place = match_weights(moved, bank, spec, space=space, init=first, out=first.permuted)
    same(in_place)
    assert in_place.permuted.data_ptr() == rows
    cold = match_weights(moved, bank, spec, space=space)
    own_bank = bank.clone()
    cold_in_bank = match_weights(moved, own_bank, spec, space=space, out=own_bank)
    assert torch.equal(cold_in_bank.permuted, cold.permuted) and cold_in_bank.permuted.data_ptr() == own_bank.data_ptr()
    single = match_weights(moved, bank[1], spec, space=space, out=torch.empty(space.size))
    assert torch.equal(single.permuted, match_weights(moved, bank[1], spec, space=space).permuted)


def test_a_bad_out_is_refused(rng):
    name, kw, shape = ARCHS[0]
    space, spec, row, bank = star_like_zoo(name, kw, shape, rng)
    for out in (torch.empty(len(bank) + 1, space.size), torch.empty_like(bank, dtype=torch.float64),
                torch.empty(space.size, len(bank)).T):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            match_weights(row, bank, spec, space=space, out=out)


def test_warm_start_from_a_result_of_other_sources_is_refused(rng):
    name, kw, shape = ARCHS[0]
    space, spec, row, bank = star_like_zoo(name, kw, shape, rng)
    first = match_weights(row, bank, spec, space=space)
    with pytest.raises(ValueError, match="MatchResult of other sources"):
        match_weights(row, bank + 1.0, spec, space=space, init=first)
    # Same total norm, moved between parameters: the per-parameter fingerprint still tells.
    views = space.views(bank)
    first_name, second_name = space.entries[0].name, space.entries[2].name
    a, b = views[first_name].flatten(1).norm(dim=1), views[second_name].flatten(1).norm(dim=1)
    shifted = bank.clone()
    shifted_views = space.views(shifted)
    shifted_views[first_name].mul_(0.5)
    scale = ((b**2 + 0.75 * a**2).sqrt() / b).view(-1, *[1] * (shifted_views[second_name].dim() - 1))
    shifted_views[second_name].mul_(scale)
    torch.testing.assert_close(shifted.norm(dim=1), bank.norm(dim=1))
    with pytest.raises(ValueError, match="MatchResult of other sources"):
        match_weights(row, shifted, spec, space=space, init=first)


@pytest.mark.parametrize("finder", ["wm", "sinkhorn", "none"])
def test_a_spec_of_another_width_or_an_empty_bank_is_refused(finder, rng):
    """A spec of a narrower model matched a subset of the units (perms of 8 for 16 units) and one
    of a wider model or an empty bank raised a raw torch error: each finder now refuses them,
    naming itself and the mismatch."""
    name, _, shape = ARCHS[0]
    model = build(name, dict(depth=2, width=16), shape, int(torch.randint(0, 1000, (1,), generator=rng)))
    space = ParamSpace(model)
    row = space.flatten(model)
    bank = row + 0.1 * torch.randn(2, space.size, generator=rng)
    caller = {"wm": "match_weights", "sinkhorn": "sinkhorn_match", "none": "find_permutations"}[finder]
    options = {"steps": 2} if finder == "sinkhorn" else {}
    narrower = models.permutation_spec(build(name, dict(depth=2, width=8), shape, 0))
    with pytest.raises(ValueError, match=rf"{caller}: the spec permutes 8 of the 16 units on axis 0 of '.+'; "
                                         "it was built for a model of another width"):
        find_permutations(finder, row, bank, narrower, space=space, **options)
    wider = models.permutation_spec(build(name, dict(depth=2, width=32), shape, 0))
    with pytest.raises(ValueError, match=rf"permutes units \[0, 32\) of axis 0 of '.+', but in the model given to "
                                         rf"{caller} that tensor has shape \[16, "):
        find_permutations(finder, row, bank, wider, space=space, **options)
    other = models.permutation_spec(build("resnet20", dict(width=1), (3, 8, 8), 0))
    with pytest.raises(ValueError, match=rf"{caller}: group '.+' of the spec acts on no parameter of the model"):
        find_permutations(finder, row, bank, other, space=space, **options)
    spec = models.permutation_spec(model)
    with pytest.raises(ValueError, match=rf"{caller}: the sources bank is empty \(\[0, {space.size}\]\)"):
        find_permutations(finder, row, bank[:0], spec, space=space, **options)
    with pytest.raises(ValueError, match=rf"{caller}: the sources bank must be \[N, {space.size}\] rows"):
        find_permutations(finder, row, bank[:, 1:], spec, space=space, **options)
    found = find_permutations(finder, row, bank, spec, space=space, **options)  # the matching spec works
    assert all(found.perms[group.name].shape == (2, group.size) for group in spec.groups)


def test_match_weights_refuses_a_narrower_spec_on_modules(rng):
    name, _, shape = ARCHS[0]
    target, source = (build(name, dict(depth=2, width=16), shape, seed) for seed in (1, 2))
    narrower = models.permutation_spec(build(name, dict(depth=2, width=8), shape, 0))
    with pytest.raises(ValueError, match="match_weights: the spec permutes 8 of the 16 units"):
        match_weights(target, source, narrower)
