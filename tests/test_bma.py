"""Bayesian model averaging over the star domain: a sample equals a plainly built model
(permuted source, interpolated weights, BatchNorm statistics recomputed in train mode), the
predictions are nested over S, draws are reproducible from the seed, and the run-directory
command writes its files."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from starfast import bma, calibration, data, models
from starfast.bma import BMAConfig, StarDomain, bayesian_model_averaging, nested_predictions, own_statistics, write_bma
from starfast.bn import has_batchnorm, recompute_bn
from starfast.evaluate import main as evaluate_main
from starfast.flat import ParamSpace
from starfast.rundir import RunDirError

from tiny_runs import make_tiny_run

ARCHS = [("mlp", dict(width=6, depth=2)), ("resnet20", dict(width=0.25))]


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def random_batches(rng, count, size, classes=3):
    return [(torch.randn(size, 1, 8, 8, generator=rng, dtype=torch.float64), torch.randint(classes, (size,), generator=rng))
            for _ in range(count)]


def fresh_model(arch, kwargs, seed):
    torch.manual_seed(seed)
    return models.build(arch, num_classes=3, in_channels=1, input_shape=(1, 8, 8), **kwargs).double()


def reference_probabilities(skeleton, star, source, perm, t, train, test):
    """One posterior sample the plain way: the source's state dict permuted, the weights
    interpolated and loaded into a copy, BatchNorm statistics recomputed in train mode with equal
    weight per batch, then test probabilities in eval mode."""
    permuted = models.permutation_spec(skeleton).apply(source.state_dict(), perm)
    own = star.state_dict()
    parameters = dict(star.named_parameters())
    model = copy.deepcopy(skeleton)
    model.load_state_dict({name: (1 - t) * own[name] + t * permuted[name] if name in parameters else own[name] for name in own})
    for layer in model.modules():
        if isinstance(layer, _BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average: each batch weighs the same
    model.train()
    with torch.no_grad():
        for x, _ in train:
            model(x)
        model.eval()
        return torch.cat([torch.softmax(model(x), -1) for x, _ in test])


@pytest.mark.parametrize("arch, kwargs", ARCHS)
def test_samples_equal_a_plain_loop_in_float64(arch, kwargs, rng):
    train, test = random_batches(rng, 3, 16), random_batches(rng, 2, 10)
    labels = torch.cat([y for _, y in test])
    skeleton, star = fresh_model(arch, kwargs, 0), fresh_model(arch, kwargs, 1)
    sources = [fresh_model(arch, kwargs, seed) for seed in (2, 3, 4)]
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    domain = StarDomain.matched(space.flatten(star), space.stack(sources), spec, space, [10, 11, 12])
    draws = domain.draw(5, seed=int(torch.randint(1000, (1,), generator=rng)))
    rows = domain.rows(draws)
    buffers = recompute_bn(skeleton, rows, train)
    assert has_batchnorm(skeleton) == bool(buffers)
    predictions = nested_predictions(skeleton, rows, buffers, test)

    probabilities = torch.stack([
        reference_probabilities(skeleton, star, sources[n], {g: index[n] for g, index in domain.perms.items()}, t, train, test)
        for n, t in draws
    ])
    nested = probabilities.cumsum(0) / torch.arange(1, len(draws) + 1, dtype=torch.float64).view(-1, 1, 1)
    reference = calibration.summarise(nested, labels)
    for field in ("confidence", "negative_entropy", "true_log_prob"):
        mismatch = (getattr(predictions, field) - getattr(reference, field)).abs().max().item()
        assert mismatch < 1e-10, f"{field} differs from the plain loop by {mismatch:.3g}"
    assert torch.equal(predictions.correct, reference.correct)


def test_predictions_are_nested_and_draws_reproducible(rng):
    train, test = random_batches(rng, 2, 12), random_batches(rng, 2, 9)
    arch, kwargs = ARCHS[1]
    skeleton, star = fresh_model(arch, kwargs, 0), fresh_model(arch, kwargs, 1)
    space = ParamSpace(skeleton)
    bank = space.stack([fresh_model(arch, kwargs, seed) for seed in (2, 3)])
    domain = StarDomain.matched(space.flatten(star), bank, models.permutation_spec(skeleton), space, [0, 1])
    seed = int(torch.randint(1000, (1,), generator=rng))
    draws = domain.draw(6, seed)
    assert draws == domain.draw(6, seed) and draws != domain.draw(6, seed + 1)
    assert all(0 <= n < 2 and 0 <= t <= 1 for n, t in draws)
    rows = domain.rows(draws)
    buffers = recompute_bn(skeleton, rows, train)
    full = nested_predictions(skeleton, rows, buffers, test)
    for size in (1, 4):
        prefix = nested_predictions(skeleton, rows[:size], {k: v[:size] for k, v in buffers.items()}, test)
        mismatch = (full.confidence[:size] - prefix.confidence).abs().max().item()
        assert mismatch < 1e-12, f"the first {size} averages depend on later samples (off by {mismatch:.3g})"
    # A sample at t = 0 is the star, at t = 1 the matched source.
    from starfast.ops import permute

    ends = domain.rows([(1, 0.0), (1, 1.0)])
    assert torch.equal(ends[0], domain.theta)
    assert torch.allclose(ends[1], permute(bank[1], domain.index_maps[1]), rtol=0, atol=1e-12)


def test_own_statistics_stack_the_stored_buffers(rng):
    model = fresh_model("resnet20", dict(width=0.25), 0)
    states = [fresh_model("resnet20", dict(width=0.25), seed).state_dict() for seed in (1, 2)]
    stacked = own_statistics(model, states)
    name = next(iter(stacked))
    assert torch.equal(stacked[name][1], states[1][name])
    del states[0][name]
    with pytest.raises(RunDirError, match="BatchNorm statistic"):
        own_statistics(model, states)
    assert own_statistics(nn.Linear(2, 2), [{}]) == {}


def test_run_directory_results_and_files(tmp_path, digits):
    run = make_tiny_run(tmp_path / "run", digits, sources=3, heldout=2, star_sources=2)
    results = bayesian_model_averaging(run, digits, config=BMAConfig(samples=4, seed=3, batch_size=400), progress=False)
    again = bayesian_model_averaging(run, digits, config=BMAConfig(samples=4, seed=3, batch_size=400), progress=False)
    assert results["draws"] == again["draws"] and results["methods"] == again["methods"]
    assert results["star_sources"] == [0, 1]  # the star's own sources only
    assert {draw["source_seed"] for draw in results["draws"]} <= {0, 1}
    methods = results["methods"]
    assert methods["star_domain"]["models"] == [1, 2, 3, 4]
    assert methods["source_ensemble"]["models"] == [1, 2]  # the ensembles stop at the models there are
    assert methods["heldout_ensemble"]["models"] == [1, 2]
    for curve in methods.values():
        assert set(bma.METRICS) <= set(curve)
        assert all(0 <= value <= 1 for value in curve["accuracy"] + curve["ece"])
    folder = write_bma(run, results)
    assert json.loads((folder / "bma.json").read_text())["draws"] == results["draws"]
    assert "| 4 | star domain |" in (folder / "bma.md").read_text()
    assert (folder / "bma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path, digits, capsys):
    run = make_tiny_run(tmp_path / "run", digits, sources=2, heldout=1)
    assert evaluate_main([str(run.path), "--bma", "--bma-samples", "3", "--quiet"]) == 0
    assert "star domain" in capsys.readouterr().out
    assert (run.path / "results" / "bma.json").exists() and not (run.path / "results" / "results.json").exists()
    for bad in (["--bma", "--bma-samples", "0"], ["--bma-seed", "2"], ["--bma", "--bma-samples", "many"]):
        with pytest.raises(SystemExit):
            evaluate_main([str(run.path), *bad])
    for path in (run.path / "star").glob("*.json"):
        path.unlink()
    assert evaluate_main([str(run.path), "--bma", "--quiet"]) == 1
    assert "no finished star" in capsys.readouterr().err
