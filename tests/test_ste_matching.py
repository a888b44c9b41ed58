"""Straight-through matching (``ste``, Git Re-Basin Algorithm 3): warm-started from weight
matching it keeps every planted permutation of the zoo; on independent models its answers are
permutations that preserve the function, and a larger learning rate moves them; the flags."""
import pytest
import torch
from torch.func import functional_call

from starfast import models
from starfast.activation_matching import ActivationProbe
from starfast.flat import ParamSpace
from starfast.matchers import MatcherChoice, find_permutations
from starfast.ops import permute
from starfast.ste_matching import ste_match
from test_matchers import ARCHS, IDS, build, context, planted

# Steps of the planted test: each re-projects every source by weight matching; fewer than the
# default 30 keep the zoo's test within a minute.
PLANTED_STEPS = 5


def labelled_probe(model, shape, rng, batches=2, size=32, dtype=torch.float32):
    inputs = tuple(torch.randn(size, *shape, generator=rng, dtype=dtype) for _ in range(batches))
    labels = tuple(torch.randint(10, (size,), generator=rng) for _ in range(batches))
    return ActivationProbe(model, inputs, labels)


@pytest.mark.parametrize("name, kw, shape", ARCHS, ids=IDS)
def test_ste_keeps_a_planted_permutation(name, kw, shape, rng):
    model, spec, space, row, bank = planted(name, kw, shape, rng)
    result = find_permutations("ste", row, bank, spec, space=space, probe=labelled_probe(model, shape, rng),
                               **MatcherChoice(matcher="ste", ste_steps=PLANTED_STEPS).matcher_options())
    for k in range(len(bank)):
        assert torch.equal(result.permuted[k], row), (name, k, int(result.changes[k]))
    assert torch.equal(permute(bank, result.index_maps), result.permuted)
    assert result.loss.shape == (PLANTED_STEPS, len(bank))


def test_ste_answers_are_function_preserving_and_move_with_the_learning_rate(rng):
    shape = (1, 6, 6)
    target, *sources = (build("mlp", dict(depth=2, width=16), shape, seed, torch.float64) for seed in range(3))
    spec, space = models.permutation_spec(target), ParamSpace(target)
    row, bank = space.flatten(target), space.stack(sources)
    probe = labelled_probe(target, shape, rng, dtype=torch.float64)
    wm = find_permutations("wm", row, bank, spec, space=space)
    still = ste_match(row, bank, spec, space=space, probe=probe, lr=1e-9, steps=3)
    for name in wm.perms:  # a learning rate too small to move θ̃: weight matching's answer
        assert torch.equal(still.perms[name], wm.perms[name])
    moved = ste_match(row, bank, spec, space=space, probe=probe, lr=0.5, steps=10)
    print(f"projections changed per source with lr 0.5: {moved.changes.tolist()}; midpoint losses "
          f"{moved.loss[0].tolist()} -> {moved.loss[-1].tolist()}")
    assert int(moved.changes.sum()) > 0
    x = probe.inputs[0]
    for k, source in enumerate(sources):
        perm = {name: index[k] for name, index in moved.perms.items()}
        spec.check_perm(perm)
        torch.testing.assert_close(functional_call(target, space.views(moved.permuted[k]), (x,)), source(x), rtol=1e-10, atol=1e-10)


def test_the_ste_flags(tmp_path, capsys):
    built = context(["--eval-matcher", "ste", "--ste-lr", "0.01", "--ste-steps", "4", "--match-examples", "64"], tmp_path)
    assert built.evaluation.matcher_options() == {"lr": 0.01, "steps": 4} and built.evaluation.match_examples == 64
    assert built.star_options.ste_steps == MatcherChoice().ste_steps  # --matcher is wm: not its options
    with pytest.raises(SystemExit):
        context(["--ste-steps", "4"], tmp_path)
    assert "--ste-steps only applies to the ste matcher; add --eval-matcher ste or --matcher ste" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ste-lr must be a positive number"):
        MatcherChoice(matcher="ste", ste_lr=0.0)
    with pytest.raises(ValueError, match="pass probe="):
        find_permutations("ste", torch.zeros(3), torch.zeros(1, 3), None, space=None)


def test_a_star_trains_with_ste_rematches(rng):
    from starfast.recipes import Recipe
    from starfast.starlight import StarlightOptions, train_star
    from test_starlight import toy_dataset

    skeleton = models.build("mlp", 4, 3, (3, 8, 8), width=8)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = 0.2 * torch.randn(3, space.size, generator=rng)
    options = StarlightOptions(matcher="ste", ste_steps=2, match_examples=32)
    result = train_star(skeleton, bank, spec, toy_dataset(rng), Recipe(lr=0.05, weight_decay=0.0, epochs=2, batch_size=16),
                        options, seed=2, quiet=True)
    assert spec.check_perm(result.perms) == 3 and result.metrics["rematches"] == 2
    assert torch.equal(result.index_maps.long(), spec.index_map(space, result.perms))
    assert result.settings["matcher"] == "ste" and result.settings["ste_steps"] == 2
