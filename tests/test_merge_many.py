"""MergeMany: the batched-bank implementation equals a straightforward loop over state dicts
(Algorithm 2 of Git Re-Basin as written); permuted copies of one model merge into that model;
the permutations it reports produce its aligned rows; errors."""
import pytest
import torch

from starfast import models
from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.merge_many import merge_many
from starfast.ops import permute
from test_matchers import build, planted


def reference_merge(states, spec, space, seed=0, max_rounds=100):
    """Algorithm 2 as written: every round, each model (random order) weight-matched to the mean of
    the others and replaced by its permuted state dict, until a round changes nothing."""
    states = [dict(state) for state in states]
    names = space.names
    order = torch.Generator().manual_seed(seed)
    for rounds in range(1, max_rounds + 1):
        changed = False
        for i in torch.randperm(len(states), generator=order).tolist():
            others = {name: sum(states[j][name] for j in range(len(states)) if j != i) / (len(states) - 1) for name in names}
            found = match_weights(others, states[i], spec, space=space, seed=seed + rounds)
            if any(not torch.equal(index, torch.arange(len(index))) for index in found.perms.values()):
                changed = True
                states[i] = spec.apply(states[i], found.perms)
        if not changed:
            break
    return {name: sum(state[name] for state in states) / len(states) for name in names}, rounds


@pytest.mark.parametrize("name, kw, shape", [("mlp", dict(depth=2, width=12), (1, 6, 6)),
                                             ("resnet20", dict(width=0.25), (3, 8, 8))], ids=["mlp", "resnet20"])
def test_merge_many_equals_the_straightforward_loop(name, kw, shape, rng):
    seeds = torch.randint(0, 10**6, (4,), generator=rng).tolist()
    sources = [build(name, kw, shape, seed, torch.float64) for seed in seeds]
    spec, space = models.permutation_spec(sources[0]), ParamSpace(sources[0])
    merged = merge_many(space.stack(sources), spec, space=space, seed=3)
    expected, rounds = reference_merge([{n: p.detach() for n, p in s.named_parameters()} for s in sources], spec, space, seed=3)
    mismatch = float((merged.row - space.flatten(expected)).abs().max())
    print(f"{name}: {merged.rounds} rounds (reference {rounds}), largest difference {mismatch:.3g}")
    assert merged.rounds == rounds and merged.converged
    torch.testing.assert_close(merged.row, space.flatten(expected), rtol=1e-12, atol=1e-12)
    bank = space.stack(sources)
    assert torch.equal(permute(bank, spec.index_map(space, merged.perms)), merged.aligned)


def test_permuted_copies_merge_into_the_model(rng):
    _, spec, space, row, bank = planted("mlp", dict(depth=3, width=32), (1, 8, 8), rng, count=4)
    merged = merge_many(bank, spec, space=space)
    for k in range(len(bank)):  # every copy aligned onto the same ordering, so the mean is the model
        assert torch.equal(merged.aligned[k], merged.aligned[0])
    assert torch.equal(merged.row.sort().values, row.sort().values) and merged.converged


def test_bad_input_is_refused():
    model = build("mlp", dict(depth=1, width=4), (2,), 0)
    spec, space = models.permutation_spec(model), ParamSpace(model)
    with pytest.raises(ValueError, match="at least two sources"):
        merge_many(space.flatten(model).unsqueeze(0), spec, space=space)
    with pytest.raises(ValueError, match="max_rounds"):
        merge_many(space.stack([model, model]), spec, space=space, max_rounds=0)
