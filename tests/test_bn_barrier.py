"""Tests of starfast.bn (batched BatchNorm recomputation) and starfast.barrier (barrier curves).

References are the obvious per-model loops: deep copy, load the row, ``update_bn``, evaluate.
The networks are built here (an MLP with BatchNorm1d, a conv net with BatchNorm2d and a residual
connection) so the tests do not depend on starfast.models.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from starfast.barrier import BarrierCurve, barrier_curve, evaluate_rows, loss_barrier
from starfast.bn import has_batchnorm, recompute_bn
from starfast.flat import ParamSpace

CLASSES = 4


class MLP(nn.Module):
    def __init__(self, inputs: int = 8, hidden: int = 16, outputs: int = CLASSES):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)


class ResidualConvNet(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def fresh_seeds(rng: torch.Generator, count: int):
    """Seeds drawn from the test's freshly seeded generator (see tests/conftest.py)."""
    return torch.randint(0, 2**31, (count,), generator=rng).tolist()


def random_model(kind: str, seed: int) -> nn.Module:
    """A model with random weights, including non-trivial BatchNorm affine parameters."""
    torch.manual_seed(seed)
    model = MLP() if kind == "mlp" else ResidualConvNet()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bn" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def random_batches(kind: str, seed: int, sizes=(16, 16, 16, 10)):
    """(x, y) batches; the short last batch checks that every batch weighs the same."""
    generator = torch.Generator().manual_seed(seed)
    shape = (8,) if kind == "mlp" else (3, 6, 6)
    return [
        (torch.randn(size, *shape, generator=generator) * 2 + 1, torch.randint(0, CLASSES, (size,), generator=generator))
        for size in sizes
    ]


def reference_bn(model: nn.Module, space: ParamSpace, row: torch.Tensor, batches) -> dict:
    """update_bn on a deep copy holding ``row``."""
    copied = space.load_(copy.deepcopy(model), row)
    update_bn(batches, copied)
    return {name: buffer for name, buffer in copied.named_buffers()}


def reference_evaluate(model: nn.Module, batches, binary: bool = False):
    model.eval()
    total, correct, count = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            if binary:
                total += float(F.binary_cross_entropy_with_logits(out.reshape(-1), y.float(), reduction="sum"))
                correct += float(((out.reshape(-1) > 0) == (y > 0.5)).sum())
            else:
                total += float(F.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
            count += len(y)
    return total / count, correct / count


def reference_curve(model: nn.Module, space, row_a, row_b, ts, train, splits, own_ends=None):
    """The naive barrier loop: per t, deep copy, load the interpolated row, ``update_bn`` on
    ``train``, evaluate on each split; ``own_ends`` are end models kept with their own buffers.
    Returns ``{split: (losses [T], accuracies [T])}``."""
    values = {split: ([], []) for split in splits}
    for t in ts.tolist():
        if own_ends is not None and t in (0.0, 1.0):
            copied = own_ends[int(t)]
        else:
            copied = space.load_(copy.deepcopy(model), (1 - t) * row_a + t * row_b)
            update_bn(train, copied)
        for split, batches in splits.items():
            loss, accuracy = reference_evaluate(copied, batches)
            values[split][0].append(loss)
            values[split][1].append(accuracy)
    return {split: tuple(torch.tensor(v, dtype=torch.float64) for v in pair) for split, pair in values.items()}


def trained_mlp(seed: int, batches) -> MLP:
    """An MLP fitted to ``batches`` (a real solution, so interpolating to a permutation of it
    crosses a loss barrier)."""
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(20):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    update_bn(batches, model)
    return model


def permute_first_hidden_layer(model: MLP, order: torch.Tensor) -> MLP:
    """The same function with the units of the first hidden layer reordered by ``order``."""
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted.fc1.weight.copy_(model.fc1.weight[order])
        permuted.fc1.bias.copy_(model.fc1.bias[order])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(permuted.bn1, name).copy_(getattr(model.bn1, name)[order])
        permuted.fc2.weight.copy_(model.fc2.weight[:, order])
    return permuted


# -- recompute_bn -----------------------------------------------------------------------------------


def three_models_and_data(kind, rng):
    """Three fresh random models of ``kind`` as rows, their space, and random batches."""
    *seeds, data_seed = fresh_seeds(rng, 4)
    models = [random_model(kind, seed) for seed in seeds]
    space = ParamSpace(models[0])
    return models, space, space.stack(models), random_batches(kind, data_seed)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_recompute_bn_matches_update_bn_per_model(kind, rng):
    models, space, rows, batches = three_models_and_data(kind, rng)
    skeleton = random_model(kind, fresh_seeds(rng, 1)[0])
    before = copy.deepcopy(skeleton.state_dict())
    skeleton.train()

    # data as a callable returning a fresh iterator, as datasets' eval_batches do
    stats = recompute_bn(skeleton, rows, lambda: iter(batches), space=space)

    for k in range(3):
        expected = reference_bn(skeleton, space, rows[k], batches)
        assert set(stats) == set(expected)
        for name, value in stats.items():
            assert value.shape == (3, *expected[name].shape)
            torch.testing.assert_close(value[k], expected[name], atol=1e-5, rtol=1e-5)
    assert stats["bn1.num_batches_tracked"].tolist() == [len(batches)] * 3
    # the skeleton is left as it was
    assert skeleton.training and all(m.momentum == 0.1 for m in skeleton.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for name, value in skeleton.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_recompute_bn_max_batches_and_chunking(kind, rng):
    models, space, rows, batches = three_models_and_data(kind, rng)

    first_two = recompute_bn(models[0], rows, batches, max_batches=2)
    for k in range(3):
        expected = reference_bn(models[0], space, rows[k], batches[:2])
        for name, value in first_two.items():
            torch.testing.assert_close(value[k], expected[name], atol=1e-5, rtol=1e-5)
    assert first_two["bn1.num_batches_tracked"].tolist() == [2, 2, 2]

    whole = recompute_bn(models[0], rows, batches)
    for chunked in (
        recompute_bn(models[0], rows, batches, chunk_size=1),
        recompute_bn(models[0], rows, batches, chunk_size=2),
        recompute_bn(models[0], rows, batches, memory_budget_bytes=1),  # forces one model per call
    ):
        for name, value in whole.items():
            torch.testing.assert_close(chunked[name], value, atol=1e-6, rtol=1e-6)


def test_recompute_bn_single_row_and_models_without_batchnorm(rng):
    model_seed, data_seed = fresh_seeds(rng, 2)
    model = random_model("mlp", model_seed)
    space = ParamSpace(model)
    batches = random_batches("mlp", data_seed)
    single = recompute_bn(model, space.flatten(model), batches)
    expected = reference_bn(model, space, space.flatten(model), batches)
    for name, value in single.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5)

    plain = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, CLASSES))
    assert not has_batchnorm(plain) and has_batchnorm(model)
    assert not has_batchnorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))

    def untouchable():
        raise AssertionError("data must not be read for a model without BatchNorm")

    rows = ParamSpace(plain).stack([plain, plain])
    assert recompute_bn(plain, rows, untouchable) == {}


# -- evaluate_rows ----------------------------------------------------------------------------------


def test_evaluate_rows_matches_per_model_evaluation_and_binary_outputs(rng):
    *seeds, data_seed, binary_seed = fresh_seeds(rng, 5)
    models = [random_model("conv", seed) for seed in seeds]
    space = ParamSpace(models[0])
    batches = random_batches("conv", data_seed)
    for model in models:
        update_bn(batches, model)
    buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in models]) for name, _ in models[0].named_buffers()}
    losses, accuracies = evaluate_rows(models[0], space.stack(models), buffers, batches, chunk_size=2)
    for k, model in enumerate(models):
        loss, accuracy = reference_evaluate(model, batches)
        assert math.isclose(float(losses[k]), loss, abs_tol=1e-5)
        assert math.isclose(float(accuracies[k]), accuracy, abs_tol=1e-9)

    torch.manual_seed(binary_seed)
    binary = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1))
    binary_batches = [(x, (y % 2)) for x, y in random_batches("mlp", binary_seed)]
    losses, accuracies = evaluate_rows(binary, ParamSpace(binary).flatten(binary), None, binary_batches)
    loss, accuracy = reference_evaluate(binary, binary_batches, binary=True)
    assert losses.dim() == 0
    assert math.isclose(float(losses), loss, abs_tol=1e-6) and math.isclose(float(accuracies), accuracy, abs_tol=1e-9)


# -- loss_barrier and barrier_curve -----------------------------------------------------------------


def test_loss_barrier_is_equation_one(rng):
    for _ in range(5):
        ts = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), torch.rand(7, generator=rng, dtype=torch.float64)])
        losses = torch.rand(3, 9, generator=rng, dtype=torch.float64)
        got = loss_barrier(losses, ts)
        for row in range(3):
            direct = max(
                float(losses[row, i]) - ((1 - float(t)) * float(losses[row, 0]) + float(t) * float(losses[row, 1]))
                for i, t in enumerate(ts)
            )
            assert math.isclose(float(got[row]), direct, abs_tol=1e-12)
    assert float(loss_barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])) == pytest.approx(1.5)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_batched_curve_equals_naive_loop(kind, rng):
    seed_a, seed_b, train_seed, test_seed = fresh_seeds(rng, 4)
    model_a, model_b = random_model(kind, seed_a), random_model(kind, seed_b)
    space = ParamSpace(model_a)
    train, test = random_batches(kind, train_seed), random_batches(kind, test_seed, sizes=(12, 9))
    row_a, row_b = space.flatten(model_a), space.flatten(model_b)

    curve = barrier_curve(model_a, row_a, row_b, train, test, ts=5)
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    expected = reference_curve(model_a, space, row_a, row_b, ts, train, {"train": train, "test": test})
    for split, (losses, accuracies) in expected.items():
        torch.testing.assert_close(getattr(curve, f"{split}_loss"), losses, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(curve, f"{split}_acc"), accuracies, atol=1e-9, rtol=0)
        assert curve.loss_barrier[split] == pytest.approx(float(loss_barrier(losses, ts)), abs=1e-5)
        assert curve.acc_barrier[split] == pytest.approx(float(loss_barrier(-accuracies, ts)), abs=1e-9)
    assert isinstance(curve, BarrierCurve) and curve.to_dict()["t"] == ts.tolist()


def test_end_points_use_their_own_buffers(rng):
    seed_a, seed_b, train_seed, other_seed_a, other_seed_b = fresh_seeds(rng, 5)
    model_a, model_b = random_model("conv", seed_a), random_model("conv", seed_b)
    space = ParamSpace(model_a)
    train = random_batches("conv", train_seed)
    update_bn(random_batches("conv", other_seed_a), model_a)  # statistics different from train's
    update_bn(random_batches("conv", other_seed_b), model_b)
    row_a, row_b = space.flatten(model_a), space.flatten(model_b)
    ts = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)

    curve = barrier_curve(
        model_a, row_a, row_b, train, ts=ts, buffers_a=model_a.state_dict(), buffers_b=model_b.state_dict()
    )
    losses, accuracies = reference_curve(model_a, space, row_a, row_b, ts, train, {"train": train}, (model_a, model_b))["train"]
    torch.testing.assert_close(curve.train_loss, losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(curve.train_acc, accuracies, atol=1e-9, rtol=0)
    assert curve.test_loss is None and set(curve.loss_barrier) == {"train"}


def test_barrier_of_a_model_with_itself_is_zero(rng):
    model_seed, train_seed, test_seed = fresh_seeds(rng, 3)
    model = random_model("conv", model_seed)
    row = ParamSpace(model).flatten(model)
    curve = barrier_curve(model, row, row.clone(), random_batches("conv", train_seed), random_batches("conv", test_seed))
    for split in ("train", "test"):
        assert abs(curve.loss_barrier[split]) < 1e-6 and abs(curve.acc_barrier[split]) < 1e-9
    assert len(curve.t) == 11


def test_barrier_sees_permutations(rng):
    (model_seed,) = fresh_seeds(rng, 1)
    teacher = torch.randn(8, CLASSES, generator=rng)
    batches = []
    for _ in range(4):
        x = torch.randn(64, 8, generator=rng)
        batches.append((x, (x @ teacher).argmax(1)))
    model = trained_mlp(model_seed, batches)
    space = ParamSpace(model)
    order = torch.randperm(16, generator=rng)
    permuted = permute_first_hidden_layer(model, order)
    restored = permute_first_hidden_layer(permuted, torch.argsort(order))

    # the permutation keeps the function, so both ends have the same loss
    assert reference_evaluate(permuted, batches) == pytest.approx(reference_evaluate(model, batches), abs=1e-6)

    def barrier_to(other: MLP) -> BarrierCurve:
        return barrier_curve(
            model, space.flatten(model), space.flatten(other), batches,
            buffers_a=model.state_dict(), buffers_b=other.state_dict(),
        )

    unmatched, matched = barrier_to(permuted), barrier_to(restored)
    assert unmatched.loss_barrier["train"] > 0.05
    assert abs(matched.loss_barrier["train"]) < 1e-6 and abs(matched.acc_barrier["train"]) < 1e-9


# -- errors -----------------------------------------------------------------------------------------


def test_clear_errors(rng):
    model_seed, data_seed = fresh_seeds(rng, 2)
    model = random_model("mlp", model_seed)
    space = ParamSpace(model)
    row = space.flatten(model)
    batches = random_batches("mlp", data_seed)

    with pytest.raises(ValueError, match=r"rows has shape \[2, 7\].*P = "):
        recompute_bn(model, torch.zeros(2, 7), batches)
    with pytest.raises(ValueError, match="row_b has shape"):
        barrier_curve(model, row, row[:-1], batches)
    with pytest.raises(ValueError, match="row_a must be one model's row"):
        barrier_curve(model, row[None], row, batches)
    with pytest.raises(ValueError, match="data yielded no batches"):
        recompute_bn(model, row, [])
    with pytest.raises(ValueError, match="train_data yielded no batches"):
        barrier_curve(model, row, row, lambda: iter([]))
    with pytest.raises(TypeError, match="one-shot iterator"):
        recompute_bn(model, row, iter(batches))
    with pytest.raises(ValueError, match="buffers is None but the skeleton has BatchNorm"):
        evaluate_rows(model, row, None, batches)
    with pytest.raises(ValueError, match="must contain both end points"):
        barrier_curve(model, row, row, batches, ts=[0.0, 0.5])
    with pytest.raises(ValueError, match="buffers_b lacks the BatchNorm statistic"):
        barrier_curve(model, row, row, batches, buffers_b={})
