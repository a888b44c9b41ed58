"""Tests of starfast.starlight (Algorithm 1 on flat rows).

References are written out plainly here: the interpolated row by hand
(``(1 - t) * θ + t * bank[n][index]``), ``functional_call`` with throwaway copies of the skeleton's
buffers (batch statistics in train mode), ``torch.autograd.grad``, a manual SGD update, per-chunk
loops, ``torch.optim.swa_utils.update_bn`` for the final BatchNorm statistics.
"""
import copy
import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.func import functional_call
from torch.optim.swa_utils import update_bn

from starfast import matchers, models
from starfast.barrier import evaluate_rows
from starfast.data import TensorDataset
from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.ops import permute
from starfast.recipes import Recipe
from starfast.files import StoredFileError, load_state_dict, read_json
from starfast.rundir import RunDir
from starfast.starlight import (
    Draw,
    SourceMatcher,
    StarlightDiverged,
    StarlightOptions,
    StarObjective,
    sample_draws,
    sample_t,
    train_star,
)

CLASSES = 4


def toy_dataset(generator, train=48, test=16, shape=(3, 8, 8), nan=False, dtype=torch.float32):
    inputs = torch.randn(train + test, *shape, generator=generator, dtype=dtype)
    labels = inputs.flatten(1)[:, :CLASSES].argmax(1)  # learnable: the largest of the first pixels
    if nan:
        inputs[:, 0] = float("nan")
    return TensorDataset("toy", inputs[:train], labels[:train], inputs[train:], labels[train:], CLASSES)


def conv_net():
    """A small ResNet-20 (4/8/16 channels) with BatchNorm."""
    return models.build("resnet20", CLASSES, 3, (3, 8, 8), width=0.25)


def mlp(width=8, shape=(3, 8, 8)):
    return models.build("mlp", CLASSES, shape[0], shape, width=width)


def random_bank(space, count, generator):
    return 0.2 * torch.randn(count, space.size, generator=generator)


def reference_loss(skeleton, space, row, inputs, labels):
    """Cross-entropy of the model ``row`` on a batch, BatchNorm on batch statistics (buffers thrown away)."""
    scratch = {name: buffer.clone() for name, buffer in skeleton.named_buffers()}
    model = copy.deepcopy(skeleton).train()
    return F.cross_entropy(functional_call(model, (space.views(row), scratch), (inputs,)), labels)


def reference_row(theta, bank, index_maps, n, t):
    return (1 - t) * theta + t * bank[n][index_maps[n].long()]


# -- one step ------------------------------------------------------------------------------------


def test_one_starlight_step_equals_a_plain_sgd_step(rng):
    """In float64: in float32, BatchNorm over 48 tiny images amplified rounding to 8.7e-5 on some
    draws (the fused step and the reference sum in different orders); in float64 they agree to ~1e-16."""
    skeleton = conv_net().double()
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    data = toy_dataset(rng, dtype=torch.float64)
    bank = random_bank(space, 1, rng).double()  # N = 1 and constant t: the step's draw is (0, 0.5)
    theta0 = space.flatten(conv_net().double()) + 0.01 * torch.randn(space.size, generator=rng, dtype=torch.float64)
    recipe = Recipe(lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=1, batch_size=data.num_train)
    buffers_before = {name: buffer.clone() for name, buffer in skeleton.named_buffers()}

    seed = int(torch.randint(1000, (1,), generator=rng))
    result = train_star(skeleton, bank, spec, data, recipe, StarlightOptions(t_sampling="constant"), init_row=theta0, seed=seed, quiet=True)

    index_maps = spec.index_map(space, result.perms)  # the only match: the cold one before epoch 0
    theta = theta0.clone().requires_grad_()
    inputs, labels = data.tensors("train")
    loss = reference_loss(skeleton, space, reference_row(theta, bank, index_maps, 0, 0.5), inputs, labels)
    (gradient,) = torch.autograd.grad(loss, theta)
    expected = theta0 - recipe.lr * (gradient + recipe.weight_decay * theta0)  # momentum buffer = first d_p
    mismatch = (result.theta - expected).abs().max().item()
    assert mismatch < 1e-12, f"one Starlight step differs from plain SGD by {mismatch:.3g}"
    assert result.metrics["history"][0]["interpolated_loss"] == pytest.approx(loss.item(), rel=1e-6)  # recorded in float32
    for name, buffer in skeleton.named_buffers():  # nothing wrote interpolated statistics anywhere
        assert torch.equal(buffer, buffers_before[name]), name


# The exact-gradient tests run in float64: BatchNorm over a batch of 8 tiny images amplifies float32
# rounding to ~1e-4 relative on a few gradient entries for some draws, which would hide nothing
# but make the comparison flaky; in float64 both sides agree to ~1e-16.


def test_objective_at_a_fixed_draw_equals_the_reference(rng):
    skeleton = conv_net().double()
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = random_bank(space, 3, rng).double()
    perms = [spec.random(rng) for _ in range(3)]
    index_maps = spec.index_map(space, {name: torch.stack([perm[name] for perm in perms]) for name in spec.identity()})
    theta = (0.2 * torch.randn(space.size, generator=rng, dtype=torch.float64)).requires_grad_()
    inputs = torch.randn(10, 3, 8, 8, generator=rng, dtype=torch.float64)
    labels = torch.randint(CLASSES, (10,), generator=rng)

    losses = StarObjective(skeleton, bank, space=space)(theta, index_maps.int(), inputs, labels, [Draw(2, 0.3)])
    (gradient,) = torch.autograd.grad(losses.total, theta)

    reference = reference_loss(skeleton, space, reference_row(theta, bank, index_maps, 2, 0.3), inputs, labels)
    (expected,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(losses.total, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    assert losses.at_theta is None


def test_ce_weight_adds_exactly_lambda_times_the_loss_at_theta(rng):
    skeleton = conv_net().double()
    space = ParamSpace(skeleton)
    bank = random_bank(space, 2, rng).double()
    index_maps = torch.arange(space.size).repeat(2, 1)
    theta = (0.2 * torch.randn(space.size, generator=rng, dtype=torch.float64)).requires_grad_()
    inputs = torch.randn(8, 3, 8, 8, generator=rng, dtype=torch.float64)
    labels = torch.randint(CLASSES, (8,), generator=rng)
    weight = 0.7

    losses = StarObjective(skeleton, bank, space=space, ce_weight=weight)(theta, index_maps, inputs, labels, [Draw(1, 0.6)])
    (gradient,) = torch.autograd.grad(losses.total, theta)

    at_theta = reference_loss(skeleton, space, theta, inputs, labels)
    interpolated = reference_loss(skeleton, space, reference_row(theta, bank, index_maps, 1, 0.6), inputs, labels)
    reference = interpolated + weight * at_theta
    (expected,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(losses.at_theta, at_theta.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses.total, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)


def test_samples_per_step_is_the_mean_of_independent_chunk_losses(rng):
    # float64: vmap's grouped convolutions and the loop round differently in float32.
    skeleton = conv_net().double()
    space = ParamSpace(skeleton)
    bank = random_bank(space, 3, rng).double()
    index_maps = torch.stack([torch.randperm(space.size, generator=rng) for _ in range(3)])  # any gather works
    theta = (0.2 * torch.randn(space.size, generator=rng, dtype=torch.float64)).requires_grad_()
    inputs = torch.randn(12, 3, 8, 8, generator=rng, dtype=torch.float64)
    labels = torch.randint(CLASSES, (12,), generator=rng)
    draws = [Draw(0, 0.2), Draw(2, 0.7), Draw(0, 0.95)]

    losses = StarObjective(skeleton, bank, space=space)(theta, index_maps, inputs, labels, draws)
    (gradient,) = torch.autograd.grad(losses.total, theta)

    chunk_losses = [
        reference_loss(skeleton, space, reference_row(theta, bank, index_maps, n, t), inputs[chunk], labels[chunk])
        for (n, t), chunk in zip(draws, (slice(0, 4), slice(4, 8), slice(8, 12)))
    ]
    reference = torch.stack(chunk_losses).mean()
    (expected,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(losses.interpolated, torch.stack(chunk_losses).detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="12 examples cannot be split into 5"):
        StarObjective(skeleton, bank, space=space)(theta, index_maps, inputs, labels, [Draw(0, 0.5)] * 5)


def test_binary_datasets_use_bce_with_logits(rng):
    skeleton = models.build("mlp", 1, 1, (6,), width=5)
    space = ParamSpace(skeleton)
    bank = random_bank(space, 1, rng)
    theta = (0.3 * torch.randn(space.size, generator=rng)).requires_grad_()
    inputs, labels = torch.randn(8, 6, generator=rng), torch.randint(2, (8,), generator=rng)
    identity = torch.arange(space.size)[None]
    losses = StarObjective(skeleton, bank, space=space, binary=True)(theta, identity, inputs, labels, [Draw(0, 0.4)])
    row = reference_row(theta, bank, identity, 0, 0.4)
    logits = functional_call(skeleton, space.views(row), (inputs,)).squeeze(-1)
    torch.testing.assert_close(losses.total, F.binary_cross_entropy_with_logits(logits, labels.float()), rtol=1e-6, atol=1e-6)


# -- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, mean, variance", [("uniform", 0.5, 1 / 12), ("beta", 0.5, 1 / 20), ("constant", 0.5, 0.0)])
def test_t_sampling_has_the_right_support_mean_and_variance(kind, mean, variance):
    samples = sample_t(kind, 200_000, torch.Generator().manual_seed(7))
    assert samples.dtype == torch.float64 and samples.shape == (200_000,)
    assert bool(((samples >= 0) & (samples <= 1)).all())
    assert samples.mean().item() == pytest.approx(mean, abs=3e-3)
    assert samples.var().item() == pytest.approx(variance, abs=2e-3)
    if kind != "constant":  # the CDFs: x for Unif[0, 1], 3x^2 - 2x^3 for Beta(2, 2)
        for x in (0.1, 0.25, 0.5, 0.8):
            cdf = x if kind == "uniform" else 3 * x**2 - 2 * x**3
            assert (samples <= x).double().mean().item() == pytest.approx(cdf, abs=4e-3)


def test_draws_pick_every_source_uniformly():
    draws = sample_draws(5, 50_000, "uniform", torch.Generator().manual_seed(3))
    counts = torch.bincount(torch.tensor([draw.n for draw in draws]), minlength=5).double() / len(draws)
    torch.testing.assert_close(counts, torch.full((5,), 0.2, dtype=torch.float64), rtol=0, atol=0.01)
    with pytest.raises(ValueError, match="--t-sampling"):
        sample_t("gaussian", 3, torch.Generator())


# -- re-matching -----------------------------------------------------------------------------------


def test_rematching_updates_the_index_maps_in_place_and_warm_starts(rng, monkeypatch):
    skeleton = mlp(width=6)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = random_bank(space, 4, rng)
    calls = []

    def spy(*args, **kwargs):
        init = kwargs["init"]
        rows = None if kwargs["out"] is None else kwargs["out"].data_ptr()
        result = match_weights(*args, **kwargs)
        calls.append((init, result, rows))
        return result

    monkeypatch.setattr(matchers, "match_weights", spy)
    matcher = SourceMatcher(bank, spec, space)
    maps = matcher.index_maps
    address = maps.data_ptr()
    for round_ in range(3):
        theta = random_bank(space, 1, rng)[0]
        matcher.rematch(theta, background=round_ == 2)
        matcher.finish()
        init, result, rows = calls[-1]
        if round_ == 0:
            assert init is None and rows is None  # the first match is cold
        else:
            assert init is calls[-2][1]  # warm-started from the previous match's result ...
            # ... whose permuted rows it updated in place: no second copy of the bank.
            assert rows == calls[0][1].permuted.data_ptr() == result.permuted.data_ptr()
        assert matcher.index_maps is maps and maps.data_ptr() == address
        assert torch.equal(maps.long(), result.index_maps)
        assert torch.equal(result.permuted, permute(bank, result.index_maps))
        assert spec.check_perm(matcher.perms) == 4
    assert len(calls) == 3 and matcher.rematches == 3
    matcher.close()


def test_background_rematching_trains_with_valid_permutations(rng):
    skeleton = mlp(width=6)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    data = toy_dataset(rng)
    bank = random_bank(space, 3, rng)
    recipe = Recipe(lr=0.1, epochs=12, batch_size=8, weight_decay=0.0)
    result = train_star(skeleton, bank, spec, data, recipe, StarlightOptions(rematch_every=2, rematch_async=True), quiet=True)
    assert spec.check_perm(result.perms) == 3
    assert torch.equal(result.index_maps.long(), spec.index_map(space, result.perms))
    assert result.metrics["rematches"] == 12 * 6 // 2
    losses = [epoch["interpolated_loss"] for epoch in result.metrics["history"]]
    assert all(math.isfinite(loss) for loss in losses)
    # Epoch losses at random t are noisy: compare the last four epochs' mean with the first epoch
    # (over seeds: first ~1.4, last-four mean ~0.8-1.0; a 4-epoch run can end above its start).
    assert sum(losses[-4:]) / 4 < losses[0]


# -- resume, errors, saving ------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_bit_identically(rng, tmp_path):
    skeleton = mlp(width=6)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    data = toy_dataset(rng)
    bank = random_bank(space, 3, rng)
    recipe = Recipe(lr=0.05, epochs=3, batch_size=8)
    star_options = StarlightOptions(t_sampling="beta", rematch_every=4, samples_per_step=2, ce_weight=0.5)
    options = dict(options=star_options, seed=11, quiet=True)
    uninterrupted = train_star(skeleton, bank, spec, data, recipe, **options)

    checkpoint = tmp_path / "star.pt"

    def interrupt(epoch):
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_star(skeleton, bank, spec, data, recipe, checkpoint_path=checkpoint, on_epoch_end=interrupt, **options)
    resumed = train_star(skeleton, bank, spec, data, recipe, checkpoint_path=checkpoint, **options)
    assert torch.equal(resumed.theta, uninterrupted.theta)
    assert all(torch.equal(resumed.perms[name], uninterrupted.perms[name]) for name in resumed.perms)
    assert [epoch["loss"] for epoch in resumed.metrics["history"]] == [epoch["loss"] for epoch in uninterrupted.metrics["history"]]
    with pytest.raises(StoredFileError, match="t_sampling"):  # a checkpoint of other settings is refused
        other = dataclasses.replace(star_options, t_sampling="uniform")
        train_star(skeleton, bank, spec, data, recipe, checkpoint_path=checkpoint, **{**options, "options": other})


def test_a_nan_loss_stops_with_epoch_step_n_and_t(rng):
    skeleton = mlp(width=6)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    data = toy_dataset(rng, nan=True)
    recipe = Recipe(lr=0.05, epochs=2, batch_size=8)
    with pytest.raises(StarlightDiverged, match=r"epoch 1 of 2, step 1 of 6: the loss became nan at source n = [0-2], t = 0\.\d{4}"):
        train_star(skeleton, random_bank(space, 3, rng), spec, data, recipe, quiet=True)


def test_bad_arguments_give_one_clear_error(rng):
    skeleton = mlp(width=6)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    data = toy_dataset(rng)
    recipe = Recipe(epochs=1, batch_size=8)
    bank = random_bank(space, 3, rng)
    poisoned = bank.clone()
    poisoned[1, 5] = float("inf")
    cases = [
        (dict(bank=poisoned), "source 1 of the bank has NaN or infinite"),
        (dict(bank=bank[:, :-1]), r"bank must be the sources as rows \[N, "),
        (dict(options=StarlightOptions(samples_per_step=3)), "--samples-per-step 3 must divide --batch-size 8"),
        (dict(init_row=torch.full((space.size,), float("nan"))), "init_row has NaN"),
    ]
    for overrides, message in cases:
        arguments = {"bank": bank, **overrides}
        with pytest.raises(ValueError, match=message):
            train_star(skeleton, arguments.pop("bank"), spec, data, recipe, quiet=True, **arguments)
    option_cases = [
        (dict(t_sampling="normal"), "--t-sampling must be one of"),
        (dict(rematch_every=0), "--rematch-every must be a positive"),
        (dict(ce_weight=float("nan")), "--ce-weight must be a finite number"),
        (dict(ce_weight=-1.0), "--ce-weight must be a finite number >= 0"),
        (dict(samples_per_step=0), "--samples-per-step must be a positive int"),
    ]
    for fields, message in option_cases:
        with pytest.raises(ValueError, match=message):
            StarlightOptions(**fields)


def test_final_batchnorm_statistics_and_saved_star_load_into_the_architecture(rng, tmp_path):
    skeleton = conv_net()
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    data = toy_dataset(rng)
    recipe = Recipe(lr=0.02, epochs=1, batch_size=16)
    result = train_star(skeleton, random_bank(space, 2, rng), spec, data, recipe, quiet=True)

    reference = space.load_(copy.deepcopy(skeleton), result.theta)
    update_bn(list(data.eval_batches("train", 1000)), reference)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(result.buffers[name], buffer, rtol=1e-5, atol=1e-6)
    expected_loss, _ = evaluate_rows(skeleton, result.theta, result.buffers, lambda: data.eval_batches("train"), space=space)
    assert result.metrics["final_loss"] == pytest.approx(expected_loss.item(), rel=1e-6)

    run = RunDir(tmp_path)
    path = run.save_star(3, result.state_dict, {"star_seed": 3, **result.settings, "metrics": result.metrics, "sources": [0, 1]})
    assert path == tmp_path / "star" / "star-0003.safetensors" and run.finished_stars() == [3]
    rebuilt = conv_net()
    rebuilt.load_state_dict(load_state_dict(path))  # strict: every parameter and buffer is there
    torch.testing.assert_close(space.flatten(rebuilt), result.theta)
    meta = read_json(path.with_suffix(".json"))
    assert meta["sources"] == [0, 1] and meta["t_sampling"] == "uniform" and meta["recipe"]["epochs"] == 1
    assert meta["metrics"]["epochs"] == 1 and meta["metrics"]["final_loss"] == result.metrics["final_loss"]
    assert not list(tmp_path.glob("star/.*.tmp"))


# -- data parallel -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _distributed_worker(rank, world_size, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(5)
        skeleton = mlp(width=6)
        space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
        data = toy_dataset(generator)
        bank = random_bank(space, 3, generator)
        recipe = Recipe(lr=0.05, epochs=2, batch_size=8)
        result = train_star(skeleton, bank, spec, data, recipe, seed=1, quiet=True)
        outcome = {"theta": result.theta, "index_maps": result.index_maps, "history": result.metrics["history"]}
        torch.save(outcome, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_theta(tmp_path):
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert torch.equal(first["theta"], second["theta"])
    assert torch.equal(first["index_maps"], second["index_maps"])
    assert first["history"][0]["loss"] == second["history"][0]["loss"]  # averaged over the ranks
    assert len(first["history"]) == 2


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_star_model_is_closer_to_its_sources_than_a_regular_model():
    from starfast import data as datasets
    from starfast.models import ModelSpec
    from starfast.training import train_models_parallel

    digits = datasets.load("digits")
    model_spec = ModelSpec.for_dataset("mlp", digits, {"width": 24})
    recipe = Recipe(lr=0.05, weight_decay=5e-4, epochs=20, batch_size=32)
    trained, diverged = train_models_parallel(model_spec, digits, recipe, list(range(9)), progress=False)
    assert not diverged
    skeleton = model_spec.build()
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    rows = space.stack([model.state_dict for model in trained])
    sources, regular = rows[:8], rows[8]

    star = train_star(skeleton, sources, spec, digits, recipe, seed=100, quiet=True).theta

    def midpoint_loss(center):
        permuted = match_weights(center, sources, spec, space=space).permuted
        losses, _ = evaluate_rows(skeleton, 0.5 * center + 0.5 * permuted, None, lambda: digits.eval_batches("train"), space=space)
        return losses.mean().item()

    star_loss, regular_loss = midpoint_loss(star), midpoint_loss(regular)
    assert star_loss < 0.85 * regular_loss, (star_loss, regular_loss)  # about 0.65x measured
