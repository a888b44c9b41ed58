"""Checkpoints trained elsewhere (issue 21 part 6): read in every format people save, fitted to the
model with one error listing every mismatch, and imported into a run directory by the CLI, where
Starlight and the evaluation use them unchanged."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from starfast import data
from starfast.checkpoint_import import CheckpointImportError, find_checkpoints, fit_state_dict, read_checkpoint
from starfast.models import ModelSpec
from starfast.recipes import resolve
from starfast.rundir import RunDir
from starfast.evaluate import main as evaluate_main
from starfast.train import main
from starfast.training import train_model


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", device="cpu")


def random_state(rng):
    """A random state dict of an MLP (width 8) on digits, values drawn from ``rng``."""
    model = ModelSpec("mlp", 10, 1, (64,), {"width": 8}).build()
    return {name: torch.randn(tensor.shape, generator=rng) for name, tensor in model.state_dict().items()}


def prefixed(state, prefix):
    return {prefix + name: tensor for name, tensor in state.items()}


def test_every_way_people_save_a_state_dict_reads_back_the_same_tensors(tmp_path, rng):
    state = random_state(rng)
    written = {
        "plain.safetensors": lambda path: save_file(state, path),
        "plain.pt": lambda path: torch.save(state, path),
        "ddp.pth": lambda path: torch.save({"state_dict": prefixed(state, "module."), "epoch": 7}, path),
        "compiled.bin": lambda path: torch.save({"model": prefixed(state, "module._orig_mod."), "optimizer": {}}, path),
        "tutorial.pt": lambda path: torch.save({"model_state_dict": prefixed(state, "_orig_mod.")}, path),
    }
    for name, write in written.items():
        write(tmp_path / name)
    (tmp_path / "hf-model").mkdir()
    save_file(prefixed(state, "module."), tmp_path / "hf-model" / "model.safetensors")
    for path in [tmp_path / name for name in written] + [tmp_path / "hf-model"]:
        checkpoint = read_checkpoint(path)
        assert checkpoint.state_dict.keys() == state.keys(), path
        for key, tensor in state.items():
            assert torch.equal(checkpoint.state_dict[key], tensor), f"{path}: {key}"
        assert checkpoint.sha256 == hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()
    assert read_checkpoint(tmp_path / "hf-model").path.name == "model.safetensors"


def test_checkpoints_are_found_in_natural_order_in_a_folder_or_by_a_glob(tmp_path):
    for seed in (10, 2, 1):
        torch.save({}, tmp_path / f"seed-{seed}.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "hf").mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "hf" / "model.safetensors")
    expected = [tmp_path / "hf", tmp_path / "seed-1.pt", tmp_path / "seed-2.pt", tmp_path / "seed-10.pt"]
    assert find_checkpoints(str(tmp_path), "--sources-from") == expected
    assert find_checkpoints(str(tmp_path / "seed-*.pt"), "--sources-from") == expected[1:]
    assert find_checkpoints(str(tmp_path / "hf"), "--sources-from") == [tmp_path / "hf"]


@pytest.mark.parametrize("pattern, message", [
    ("missing/*.pt", "matches nothing; give a folder of checkpoints or a glob"),
    ("*.txt", "matches 1 path(s) but no checkpoint"),
])
def test_a_pattern_without_checkpoints_is_one_line_naming_the_flag(tmp_path, pattern, message):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointImportError, match="--heldout-from") as raised:
        find_checkpoints(str(tmp_path / pattern), "--heldout-from")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_missing_unexpected_and_misshaped_names_are_one_error_listing_them(tmp_path, rng):
    state = random_state(rng)
    expected = dict(state)
    broken = dict(state)
    missing = sorted(broken)[0]
    del broken[missing]
    broken["extra.weight"] = torch.zeros(3)
    misshaped = "output.weight"
    broken[misshaped] = torch.zeros(5, 8)
    torch.save({"state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointImportError) as raised:
        fit_state_dict(read_checkpoint(tmp_path / "broken.pt"), expected, "mlp")
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "broken.pt") in message, message
    assert f"missing: {missing}" in message and "unexpected: extra.weight" in message, message
    assert f"mis-shaped: {misshaped} (5, 8) (model: {tuple(state[misshaped].shape)})" in message, message


def test_fitting_casts_to_the_model_dtypes_and_refuses_non_finite_values(tmp_path, rng):
    state = random_state(rng)
    save_file({name: tensor.half() for name, tensor in state.items()}, tmp_path / "half.safetensors")
    fitted = fit_state_dict(read_checkpoint(tmp_path / "half.safetensors"), state, "mlp")
    for name, tensor in state.items():
        assert fitted[name].dtype == torch.float32 and torch.equal(fitted[name], tensor.half().float()), name
    name = sorted(state)[-1]
    poisoned = {**state, name: state[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))}
    save_file(poisoned, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointImportError, match=f"non-finite value\\(s\\) in {name}"):
        fit_state_dict(read_checkpoint(tmp_path / "nan.safetensors"), state, "mlp")


def test_a_pickled_module_is_refused_without_running_its_code(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointImportError, match=r"weights_only=True.*torch.save\(model.state_dict\(\), path\)"):
        read_checkpoint(tmp_path / "module.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointImportError, match="holds a list, not a state dict"):
        read_checkpoint(tmp_path / "list.pt")


# -- the command line ---------------------------------------------------------------------------

FLAGS = ["--arch-kw", "width=16", "--epochs", "2", "--star-seeds", "1", "--star-epochs", "1", "--ts", "3", "--quiet"]


def write_checkpoints(folder, digits, seeds, write):
    """Models trained for two epochs with starfast's loop, then saved by ``write(path, state)``."""
    spec = ModelSpec.for_dataset("mlp", digits, {"width": 16})
    recipe = resolve("mlp", "digits", {"epochs": 2})
    folder.mkdir()
    paths = []
    for seed in seeds:
        state, _ = train_model(spec, digits, recipe, seed, progress=False)
        paths.append(write(folder / f"net-{seed}", state))
    return paths


def as_ddp_pt(path, state):
    path = path.with_suffix(".pt")
    torch.save({"state_dict": prefixed(state, "module."), "epoch": 2}, path)
    return path


def as_hf_folder(path, state):
    path.mkdir()
    save_file(state, path / "model.safetensors")
    return path / "model.safetensors"


def test_imported_models_go_through_starlight_and_the_evaluation_and_are_reused(tmp_path, digits, capsys):
    sources = write_checkpoints(tmp_path / "mine", digits, [5, 6], as_ddp_pt)
    heldout = write_checkpoints(tmp_path / "theirs", digits, [7, 8], as_hf_folder)
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--sources-from", str(tmp_path / "mine" / "*.pt"),
            "--heldout-from", str(tmp_path / "theirs"), *FLAGS]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "\nverdict: star–held-out barrier " in out
    run = RunDir(run_dir)
    assert run.finished_seeds("sources") == [0, 1] and run.finished_seeds("heldout") == [1000, 1001]
    for role, seed, original in [("sources", 0, sources[0]), ("sources", 1, sources[1]), ("heldout", 1001, heldout[1])]:
        metadata = run.read_metadata(role, seed)
        assert metadata["imported_from"] == {"path": str(original.resolve()),
                                             "sha256": hashlib.sha256(original.read_bytes()).hexdigest()}
        stored = run.model_path(role, seed)
        assert metadata["weights_sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert metadata["metrics"]["test_accuracy"] > 0.5
        # the stored copy is the checkpoint's state dict, prefixes stripped
        theirs = read_checkpoint(original).state_dict
        ours = run.load_model(role, seed)[0]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    results = json.loads((run_dir / "results" / "results.json").read_text())
    assert results["counts"]["sources"] == 2 and results["counts"]["heldout"] == 2 and results["counts"]["stars"] == 1
    assert json.loads((run_dir / "config.json").read_text())["sources"] == 2
    applications = ["--bma", "--bma-samples", "2", "--fusion", "--fusion-sizes", "2", "--fusion-star-seeds", "1",
                    "--fusion-star-epochs", "1", "--quiet"]
    assert evaluate_main([str(run_dir), *applications]) == 0, capsys.readouterr().err
    assert (run_dir / "results" / "bma.json").exists() and (run_dir / "results" / "fusion.json").exists()
    capsys.readouterr()

    # A rerun reuses the imports; a checkpoint whose bytes changed is refused by name.
    argv += ["--stage", "models"]
    stamps = {path: path.stat().st_mtime_ns for path in run_dir.rglob("seed-*.safetensors")}
    assert main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("seed-*.safetensors")} == stamps
    torch.save({"state_dict": {}}, sources[1])
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"now gives {sources[1]}" in error and "sources/seed-0001.safetensors" in error


def test_bad_imports_are_one_line_each(tmp_path, digits, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["--run-dir", run_dir, "--sources-from", str(tmp_path / "nothing-*.pt"), *FLAGS]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--sources-from" in error and "matches nothing" in error

    state = ModelSpec.for_dataset("mlp", digits, {"width": 32}).build().state_dict()
    (tmp_path / "wide").mkdir()
    torch.save(state, tmp_path / "wide" / "a.pt")
    assert main(["--run-dir", run_dir, "--sources-from", str(tmp_path / "wide"), *FLAGS]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not fit --arch mlp" in error and "mis-shaped" in error

    with pytest.raises(SystemExit):
        main(["--run-dir", run_dir, "--sources-from", str(tmp_path / "wide"), "--sources", "3", *FLAGS])
    assert "--sources 3 but --sources-from names 1 checkpoints" in capsys.readouterr().err


def test_a_checkpoint_at_chance_is_refused_like_a_trained_model(tmp_path, digits, capsys):
    spec = ModelSpec.for_dataset("mlp", digits, {"width": 16})
    (tmp_path / "untrained").mkdir()
    zeros = {name: torch.zeros_like(tensor) for name, tensor in spec.build().state_dict().items()}  # a constant guess
    torch.save(zeros, tmp_path / "untrained" / "a.pt")
    argv = ["--run-dir", str(tmp_path / "run"), "--stage", "models", "--sources-from", str(tmp_path / "untrained"),
            "--heldout", "1", *FLAGS]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "a.pt (--sources-from) learned nothing: train accuracy" in error and "it was not imported" in error
    assert not RunDir(tmp_path / "run").is_finished("sources", 0)
