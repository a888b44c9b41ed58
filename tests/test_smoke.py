"""Smoke runs (``--smoke``): the paper preset's code path — CIFAR-10 read from the official
``cifar-10-batches-py`` layout, ResNet-18 / ResNet-20, the paper's recipe, Starlight, BatchNorm
recomputation, tables and figures — end to end on the smoke subset; judged by completing, so a model
that learned nothing is kept (the rule still holds for real runs: test_rundir_guarantees)."""
import json
import tarfile

import pytest
import torch

from starfast import data, smoke, train
from starfast.experiments.__main__ import main as experiments_main
from starfast.pipeline import LearningCheck, ModelJob
from starfast.recipes import Recipe
from starfast.rundir import RunDir
from starfast.training import TrainingMetrics
from test_data import CIFAR_TEST, CIFAR10_TRAIN_PER_BATCH, _write_cifar10_archive

# The narrow ResNet-18 (8 channels first) runs every line of the full one at 1/64 of its cost.
NARROW = ["--arch-kw", "width=0.125"]


@pytest.fixture
def cifar_dir(tmp_path, rng):
    """A CIFAR-10 directory as a user extracts it: DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar10_archive(archive, int(rng.initial_seed()))
    folder = tmp_path / "data"
    with tarfile.open(archive) as opened:
        opened.extractall(folder, filter="data")
    archive.unlink()
    return folder


def stored_recipes(run: RunDir, role: str):
    return [run.read_metadata(role, seed)["recipe"] for seed in run.finished_seeds(role)]


@pytest.mark.slow
def test_grid_paper_preset_smoke(tmp_path, cifar_dir, capsys):
    base = tmp_path / "runs"
    assert experiments_main(["grid", "--preset", "paper", "--smoke", *NARROW, "--data-dir", str(cifar_dir),
                             "--run-dir", str(base), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(smoke.BANNER) == 2 and "MEAN NOTHING" in smoke.BANNER, printed
    folder = base / "experiments" / "grid"
    results = json.loads((folder / "results.json").read_text())
    assert results["smoke"] is True and results["preset"] == "paper" and results["dataset"] == "cifar10"
    assert results["note"].startswith(smoke.BANNER) and "smoke run" in results["verdict"], results["verdict"]
    assert [point["value"] for point in results["points"]] == [11], results["points"]
    assert (folder / "figure.png").stat().st_size > 0 and smoke.BANNER in (folder / "table.md").read_text()
    # The paper's recipe, cut to one epoch on the smoke subset, trained the models the cell asked for.
    run = RunDir(base)
    config = run.read_config()
    assert config["dataset"] == "cifar10" and config["model"]["arch"] == "resnet18", config
    assert run.finished_seeds("sources") == [0, 1] and run.finished_seeds("heldout") == [1000, 1001]
    for recipe in stored_recipes(run, "sources"):
        assert recipe["epochs"] == smoke.EPOCHS and recipe["optimizer"] == "sgd" and recipe["batch_size"] == smoke.TRAIN_EXAMPLES


@pytest.mark.slow
def test_train_smoke_resnet20_on_cifar10(tmp_path, cifar_dir, capsys):
    run_dir = tmp_path / "run"
    # Three points per barrier curve (--ts 3) instead of 11: the same evaluation at a quarter of its cost.
    assert train.main(["--dataset", "cifar10", "--arch", "resnet20", "--smoke", "--ts", "3", "--data-dir", str(cifar_dir),
                       "--run-dir", str(run_dir), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "smoke run completed" in printed and printed.count(smoke.BANNER) == 2, printed
    run = RunDir(run_dir)
    assert (run.results_folder / "results.json").is_file() and (run.results_folder / "curves.png").is_file()
    assert run.finished_seeds("sources") == [0, 1] and run.finished_seeds("heldout") == [1000, 1001]
    metrics = run.read_metadata("sources", 0)["metrics"]
    assert metrics["epochs"] == smoke.EPOCHS, metrics
    # The official layout was read: all 5 train batches and the test batch (then the smoke subset).
    assert smoke.TRAIN_EXAMPLES < 5 * CIFAR10_TRAIN_PER_BATCH and smoke.TEST_EXAMPLES < CIFAR_TEST
    assert (cifar_dir / "cifar10.npz").is_file()


def test_smoke_runs_keep_models_that_learned_nothing(tmp_path, capsys):
    """--lr 5 diverges to chance (test_rundir_guarantees: a real run refuses those models); a smoke
    run keeps them and completes."""
    run_dir = tmp_path / "run"
    assert train.main(["--run-dir", str(run_dir), "--lr", "5", "--smoke", "--arch-kw", "width=8", "--ts", "3", "--quiet"]) == 0
    assert "learned nothing" not in capsys.readouterr().err
    run = RunDir(run_dir)
    assert run.finished_seeds("sources") == [0, 1] and (run.results_folder / "results.json").is_file()
    # ... and the rule refuses what it kept (seeds and data are fixed, so this is deterministic).
    rule = LearningCheck.of(smoke.dataset(data.load("digits")))
    kept = [rule.failure(ModelJob("sources", seed), TrainingMetrics(**run.read_metadata("sources", seed)["metrics"]),
                         Recipe.from_dict(run.read_metadata("sources", seed)["recipe"])) for seed in (0, 1)]
    assert any(failure is not None for failure in kept), [run.read_metadata("sources", seed)["metrics"] for seed in (0, 1)]


def test_smoke_needs_a_dataset_in_memory():
    class FolderDataset:
        name = "imagenet"

    with pytest.raises(ValueError, match="--smoke needs a dataset held in memory; imagenet"):
        smoke.dataset(FolderDataset())


def test_subset_is_the_first_examples_through_the_same_pipeline(rng):
    full = data.load("synthetic", shape=(3, 8, 8), num_train=50, num_test=20, seed=int(torch.randint(0, 2**31, (1,), generator=rng)))
    part = full.subset(10, 5)
    assert (part.name, part.num_train, part.num_test, part.input_shape) == (full.name, 10, 5, full.input_shape)
    for split, count in (("train", 10), ("test", 5)):
        inputs, labels = full.tensors(split)
        got_inputs, got_labels = part.tensors(split)
        assert torch.equal(got_inputs, inputs[:count]) and torch.equal(got_labels, labels[:count]), split
    with pytest.raises(ValueError, match="at least one example per split"):
        full.subset(0, 5)
