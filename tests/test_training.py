"""Tests of regular training: recipes, seeding, resume, parallel seeds, the run directory, the CLI."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starfast import data
from starfast.recipes import Recipe, resolve
from starfast.models import ModelSpec
from starfast.files import StoredFileError
from starfast.rundir import RunDir, heldout_seeds, source_seeds
from starfast.train import main
from starfast.pipeline import ModelJob, train_missing_models
from starfast.training import TrainingDiverged, init_model, train_model, train_models_parallel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def mlp(digits):
    return ModelSpec.for_dataset("mlp", digits, {"width": 32})


@pytest.fixture(scope="module")
def digits64(digits):
    """digits in float64: batched and sequential training sum in different orders, and float32
    rounding makes their trajectories drift apart differently on different CPUs."""
    splits = (*digits.tensors("train"), *digits.tensors("test"))
    return data.TensorDataset("digits", *(t.double() if t.is_floating_point() else t for t in splits),
                              num_classes=digits.num_classes)


@pytest.fixture
def float64_defaults():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def assert_same_weights(a, b, atol=0.0):
    assert sorted(a) == sorted(b)
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            mismatch = (a[name].double() - b[name].double()).abs().max().item() if a[name].numel() else 0.0
            assert mismatch <= atol, f"{name}: largest difference {mismatch:.3g} > atol {atol:.3g}"


# -- recipes -------------------------------------------------------------------------------------


def test_paper_recipes_follow_appendix_b():
    resnet = resolve("resnet18", "cifar10")
    assert (resnet.optimizer, resnet.lr, resnet.momentum, resnet.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert (resnet.schedule, resnet.epochs, resnet.batch_size, resnet.label_smoothing) == ("cosine", 200, 128, 0.0)
    densenet = resolve("densenet40", "cifar100")
    assert (densenet.batch_size, densenet.weight_decay, densenet.epochs, densenet.milestones) == (64, 1e-4, 300, (150, 225))
    vgg = resolve("vgg19", "cifar10")
    assert (vgg.lr, vgg.milestones, vgg.epochs, vgg.batch_size, vgg.weight_decay) == (0.05, (100, 150), 200, 128, 5e-4)
    imagenet = resolve("resnet18-imagenet", "imagenet")
    assert (imagenet.batch_size, imagenet.lr, imagenet.milestones, imagenet.weight_decay, imagenet.epochs) == (
        256, 0.1, (30, 60, 90), 1e-4, 100)


def test_recipe_overrides_and_schedules():
    shortened = resolve("vgg11", "cifar10", {"epochs": 100, "lr": None})
    assert shortened.milestones == (50, 75) and shortened.lr == 0.05
    adam = resolve("resnet18", "cifar10", {"optimizer": "adam"})
    assert adam.optimizer == "adam" and adam.lr == 1e-3
    assert resolve("resnet18", "cifar10", {"optimizer": "adam", "lr": 0.01}).lr == 0.01
    step = resolve("mlp", "digits", {"milestones": [5]})
    assert step.schedule == "step" and step.lr_at(4.9) == step.lr and step.lr_at(5.0) == pytest.approx(step.lr * 0.1)
    cosine = resolve("resnet18", "cifar10")
    assert cosine.lr_at(0) == 0.1 and cosine.lr_at(100) == pytest.approx(0.05) and cosine.lr_at(200) == pytest.approx(0)
    densenet = resolve("densenet40", "cifar10")
    assert Recipe.from_dict(json.loads(json.dumps(densenet.to_dict()))) == densenet
    with pytest.raises(ValueError, match="--optimizer"):
        resolve("mlp", "digits", {"optimizer": "lbfgs"})
    with pytest.raises(ValueError, match="unknown recipe override"):
        resolve("mlp", "digits", {"learning_rate": 0.1})


def test_seed_sets_do_not_overlap():
    assert not set(source_seeds(1000)) & set(heldout_seeds(50))
    with pytest.raises(ValueError, match="--sources"):
        source_seeds(1001)


# -- training ------------------------------------------------------------------------------------


def test_mlp_on_digits_preset_reaches_95_percent(digits):
    spec = ModelSpec.for_dataset("mlp", digits)
    state_dict, metrics = train_model(spec, digits, resolve("mlp", "digits"), seed=0, progress=False)
    assert metrics.test_accuracy >= 0.95 and metrics.train_accuracy >= 0.99
    model = spec.build()
    model.load_state_dict(state_dict)
    inputs, labels = digits.tensors("test")
    with torch.no_grad():
        accuracy = (model.eval()(inputs).argmax(-1) == labels).double().mean().item()
    assert accuracy == pytest.approx(metrics.test_accuracy)


def test_same_seed_same_weights_and_other_seed_differs(digits, mlp):
    recipe = resolve("mlp", "digits", {"epochs": 2})
    global_state = torch.get_rng_state()
    first, _ = train_model(mlp, digits, recipe, seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), global_state)  # the caller's RNG is untouched
    torch.manual_seed(123)  # ... and does not matter
    again, _ = train_model(mlp, digits, recipe, seed=5, progress=False)
    other, _ = train_model(mlp, digits, recipe, seed=6, progress=False)
    assert_same_weights(first, again)
    assert not torch.equal(first["output.weight"], other["output.weight"])


class Interrupt(Exception):
    pass


def interrupt_after(epoch):
    def hook(finished_epoch):
        if finished_epoch == epoch:
            raise Interrupt

    return hook


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_interruption_is_bit_identical(digits, mlp, tmp_path, optimizer):
    recipe = resolve("mlp", "digits", {"epochs": 3, "optimizer": optimizer})
    checkpoint = tmp_path / "seed.pt"
    with pytest.raises(Interrupt):
        train_model(mlp, digits, recipe, 1, checkpoint_path=checkpoint, progress=False, on_epoch_end=interrupt_after(2))
    resumed_epochs = []
    resumed, _ = train_model(mlp, digits, recipe, 1, checkpoint_path=checkpoint, progress=False, on_epoch_end=resumed_epochs.append)
    assert resumed_epochs == [3]
    uninterrupted, _ = train_model(mlp, digits, recipe, 1, progress=False)
    assert_same_weights(resumed, uninterrupted)


def test_nan_loss_names_seed_and_epoch(digits, mlp):
    recipe = resolve("mlp", "digits", {"epochs": 3, "lr": 1e6})
    with pytest.raises(TrainingDiverged, match=r"seed 3 diverged: .* in epoch 1 of 3"):
        train_model(mlp, digits, recipe, 3, progress=False)
    trained, diverged = train_models_parallel(mlp, digits, recipe, [3, 4], progress=False)
    assert not trained and [failure.seed for failure in diverged] == [3, 4] and diverged[0].epoch == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_parallel_seeds_equal_sequential_runs(digits64, mlp, optimizer, float64_defaults):
    recipe = resolve("mlp", "digits", {"epochs": 2, "optimizer": optimizer})
    seeds = [0, 7, 1002]
    trained, diverged = train_models_parallel(mlp, digits64, recipe, seeds, progress=False)
    assert not diverged and [model.seed for model in trained] == seeds
    for model in trained:
        state_dict, metrics = train_model(mlp, digits64, recipe, model.seed, progress=False)
        assert_same_weights(model.state_dict, state_dict, atol=1e-10)
        assert model.metrics.test_accuracy == metrics.test_accuracy
        assert model.metrics.train_loss == pytest.approx(metrics.train_loss, rel=1e-10)


def test_parallel_seeds_with_batchnorm_equal_sequential_runs(digits64, float64_defaults):
    # In float32, BatchNorm over 2x2 feature maps amplifies the two paths' different summation
    # orders chaotically (another CPU failed a 1e-4 bound); in float64 they agree to about 1e-16 here
    # (the 1e-9 bound leaves seven orders of magnitude for that amplification).
    spec = ModelSpec.for_dataset("resnet20", digits64, {"width": 0.25})
    recipe = resolve("resnet20", "digits", {"epochs": 1, "batch_size": 256, "lr": 0.01})
    trained, _ = train_models_parallel(spec, digits64, recipe, [0, 1], progress=False)
    for model in trained:
        state_dict, _ = train_model(spec, digits64, recipe, model.seed, progress=False)
        running = [name for name in state_dict if name.endswith("running_var")]
        assert running and not torch.equal(state_dict[running[0]], init_model(spec, model.seed).state_dict()[running[0]])
        assert all(value.dtype in (torch.float64, torch.int64) for value in state_dict.values())
        assert_same_weights(model.state_dict, state_dict, atol=1e-9)


def test_parallel_checkpoints_resume_in_sequential_path(digits64, mlp, tmp_path, float64_defaults):
    recipe = resolve("mlp", "digits", {"epochs": 3, "optimizer": "adam"})
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    with pytest.raises(Interrupt):
        train_models_parallel(mlp, digits64, recipe, [2, 3], checkpoint_paths=paths, progress=False, on_epoch_end=interrupt_after(1))
    resumed, _ = train_model(mlp, digits64, recipe, 3, checkpoint_path=paths[1], progress=False)
    uninterrupted, _ = train_model(mlp, digits64, recipe, 3, progress=False)
    assert_same_weights(resumed, uninterrupted, atol=1e-10)


# -- run directory -------------------------------------------------------------------------------


def test_finished_models_are_not_retrained_and_load_back(digits, mlp, tmp_path):
    run = RunDir(tmp_path / "run")
    recipe = resolve("mlp", "digits", {"epochs": 1})
    run.prepare({"model": mlp.to_dict(), "dataset": "digits", "recipe": recipe.to_dict()})
    jobs = [ModelJob("sources", 0), ModelJob("sources", 1), ModelJob("heldout", 1000)]
    trained, _ = train_missing_models(run, mlp, digits, recipe, jobs, parallel_seeds=2, progress=False, report=lambda line: None)
    assert trained == jobs
    stamps = {path: path.stat().st_mtime_ns for path in run.path.rglob("seed-*")}
    lines = []
    trained_again, _ = train_missing_models(run, mlp, digits, recipe, jobs, progress=True, report=lines.append)
    assert lines == [f"reused 3 trained models in {run.path}"]
    assert trained_again == [] and stamps == {path: path.stat().st_mtime_ns for path in run.path.rglob("seed-*")}
    assert not list(run.checkpoint_path().rglob("*.pt"))
    model = run.build_model("heldout", 1000)
    state_dict, metadata = run.load_model("heldout", 1000)
    assert_same_weights(model.state_dict(), state_dict)
    assert metadata["seed"] == 1000 and metadata["model"]["arch"] == "mlp" and metadata["versions"]["torch"] == torch.__version__
    assert set(metadata["metrics"]) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}


def test_corrupt_files_are_reported_by_name(digits, mlp, tmp_path):
    run = RunDir(tmp_path)
    run.save_model("sources", 4, init_model(mlp, 4).state_dict(), {"model": mlp.to_dict()})
    weights = run.model_path("sources", 4)
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(StoredFileError, match=f"{re.escape(str(weights))}.*delete it"):
        run.load_model("sources", 4)
    checkpoint = run.model_checkpoint_path("sources", 5)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(StoredFileError, match=f"{re.escape(str(checkpoint))}.*delete it"):
        train_model(mlp, digits, resolve("mlp", "digits", {"epochs": 1}), 5, checkpoint_path=checkpoint, progress=False)


# -- command line --------------------------------------------------------------------------------


def test_cli_models_stage_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = ["--run-dir", str(run_dir), "--sources", "2", "--heldout", "1", "--epochs", "1", "--arch-kw", "width=16"]
    assert main(["--stage", "models", *flags]) == 0
    files = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file())
    assert files == [
        ".lock", "config.json", "heldout/seed-1000.json", "heldout/seed-1000.safetensors", "models.json",
        "sources/seed-0000.json", "sources/seed-0000.safetensors", "sources/seed-0001.json", "sources/seed-0001.safetensors",
    ]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["kwargs"] == {"width": 16} and config["recipe"]["epochs"] == 1
    assert RunDir(run_dir).build_model("sources", 1).hidden[0].out_features == 16
    capsys.readouterr()

    # The models are reused; the star is trained and the barriers are measured and reported.
    assert main(["--stage", "all", "--quiet", "--star-seeds", "1", "--star-epochs", "1", "--ts", "3", *flags]) == 0
    out = capsys.readouterr().out
    assert "star–held-out barrier (loss)" in out and "\nverdict: star–held-out barrier " in out
    assert (run_dir / "star" / "star-0000.json").exists()
    results = json.loads((run_dir / "results" / "results.json").read_text())
    assert results["counts"]["stars"] == 1 and results["barriers"]["star_heldout"]["train"] is not None

    assert main(["--stage", "models", *flags, "--arch", "linear2"]) == 1
    assert "--arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--arch", "nosuchnet"])
    error = capsys.readouterr().err
    assert "unknown architecture 'nosuchnet'" in error and "resnet18" in error


@pytest.mark.slow
def test_torchrun_two_processes_shard_the_models(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "starfast.train", "--stage", "models", "--device", "cpu", "--run-dir", str(run_dir),
        "--sources", "3", "--heldout", "1", "--epochs", "1", "--arch-kw", "width=16",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("trained ")]
    names = sorted(line.split()[1] for line in lines)
    assert names == ["heldout/seed-1000", "sources/seed-0000", "sources/seed-0001", "sources/seed-0002"]
    run = RunDir(run_dir)
    for index, (role, seed) in enumerate([("sources", 0), ("sources", 1), ("sources", 2), ("heldout", 1000)]):
        assert run.read_metadata(role, seed)["rank"] == index % 2
    assert (run_dir / "models.json").exists() and (run_dir / "config.json").exists()


def test_a_star_trained_on_other_sources_is_refused(tmp_path, capsys):
    flags = ["--run-dir", str(tmp_path / "run"), "--sources", "2", "--heldout", "1", "--epochs", "1",
             "--arch-kw", "width=8", "--star-epochs", "1", "--quiet", "--ts", "3"]
    assert main(["--stage", "all", *flags]) == 0
    capsys.readouterr()
    assert main(["--stage", "all", *[f if f != "2" else "3" for f in flags]]) == 1
    assert "was trained with sources = [0, 1], not [0, 1, 2]; use the same --sources" in capsys.readouterr().err
