"""What a run directory guarantees (README "What a run directory guarantees"): one process at a
time, checksummed weights, complete evaluations, stars that match their settings, results
published as a unit, failed trainings reported, and every flag checked before anything is written.
Each case uses real processes and real files, as a user would meet it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from starfast.evaluate import main as evaluate_main
from starfast.rundir import RunDir
from starfast.train import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--arch-kw", "width=8", "--sources", "2", "--heldout", "2", "--epochs", "2", "--star-seeds", "1", "--star-epochs", "2",
         "--ts", "3", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run: models, one star, results."""
    run_dir = tmp_path_factory.mktemp("guarantees") / "run"
    assert main(["--run-dir", str(run_dir), *SMALL]) == 0
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x40  # in the tensor data, past the safetensors header
    path.write_bytes(bytes(data))


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_second_process_on_the_same_run_directory_stops_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "starfast.train", "--run-dir", str(run_dir), "--arch-kw", "width=8",
                              "--sources", "2", "--heldout", "2", "--epochs", "400", "--stage", "models", "--quiet"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / ".lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
            assert time.monotonic() < deadline and first.poll() is None, "the first process never took the lock"
            time.sleep(0.1)
        second = cli("starfast.train", "--run-dir", str(run_dir), "--lr", "0.01", *SMALL)
        assert second.returncode == 1
        assert f"is in use by another starfast process (pid {first.pid}: python -m starfast.train" in second.stderr
        evaluation = cli("starfast.evaluate", str(run_dir), "--quiet")
        assert evaluation.returncode == 1 and "in use by another starfast process" in evaluation.stderr
        assert first.poll() is None, "the first process ended before the others were tried"
    finally:
        first.kill()
        first.wait()
    with RunDir(run_dir).locked("the next command"):  # the lock died with its holder
        assert "the next command" in (run_dir / ".lock").read_text()


def test_flipped_bytes_in_a_model_or_star_are_an_error_naming_the_file(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    model = run_dir / "heldout" / "seed-1001.safetensors"
    flip_a_byte(model)
    for stage in ("models", "evaluate"):
        assert main(["--run-dir", str(run_dir), "--stage", stage, *SMALL]) == 1
        assert f"{model} does not match the checksum" in capsys.readouterr().err
    model.unlink()
    model.with_suffix(".json").unlink()
    assert main(["--run-dir", str(run_dir), "--stage", "models", *SMALL]) == 0  # retrained, identically
    star = run_dir / "star" / "star-0000.safetensors"
    flip_a_byte(star)
    assert main(["--run-dir", str(run_dir), "--stage", "star", *SMALL]) == 1
    assert f"{star} does not match the checksum" in capsys.readouterr().err


def test_an_evaluation_with_a_missing_model_stops_instead_of_shrinking(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    (run_dir / "sources" / "seed-0001.json").unlink()
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    error = capsys.readouterr().err
    assert "needs every model the run names, but 1 are missing" in error and "sources/seed-0001.safetensors" in error


@pytest.mark.parametrize("flag, value, named", [("--t-sampling", "beta", "--t-sampling"), ("--ce-weight", "0.5", "--ce-weight"),
                                                ("--star-epochs", "3", "--star-epochs")])
def test_a_star_of_other_settings_is_never_kept_silently(finished_run, tmp_path, capsys, flag, value, named):
    run_dir = copy_of(finished_run, tmp_path)
    flags = [*SMALL]
    if flag in flags:
        flags[flags.index(flag) + 1] = value
    else:
        flags += [flag, value]
    assert main(["--run-dir", str(run_dir), *flags]) == 1
    assert f"use the same {named}" in capsys.readouterr().err


def test_a_killed_evaluation_resumes_and_leaves_no_mixed_results(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    results = run_dir / "results"
    before = {name: (results / name).read_bytes() for name in ("results.json", "table.md", "curves.png")}
    evaluation = subprocess.Popen([sys.executable, "-m", "starfast.evaluate", str(run_dir), "--ts", "401", "--quiet"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (results / "partial.json").exists():  # killed once a pair has been measured
        assert time.monotonic() < deadline and evaluation.poll() is None, evaluation.communicate()
        time.sleep(0.05)
    evaluation.send_signal(signal.SIGKILL)
    evaluation.wait()
    (run_dir / "star" / ".starfast-star-0000.json.12345.tmp").write_text("{")  # what a write killed mid-way leaves
    # the old results stand untouched and whole
    assert {name: (results / name).read_bytes() for name in before} == before
    done = cli("starfast.evaluate", str(run_dir), "--ts", "401", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "resuming the evaluation:" in done.stdout, done.stdout
    stored = json.loads((results / "results.json").read_text())
    assert stored["config"]["ts"] == 401 and "401" not in before["table.md"].decode()
    assert not (results / "partial.json").exists() and not list(run_dir.rglob("*.tmp"))


def test_publication_interrupted_after_its_mark_is_finished_by_the_next_process(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    run = RunDir(run_dir)
    pending = run.results_folder / ".pending"
    pending.mkdir()
    (pending / "table.md").write_text("new table\n")
    (pending / "results.json").write_text('{"new": true}\n')
    (pending / "complete.json").write_text('{"files": ["results.json", "table.md"]}\n')
    with run.locked("test"):
        pass
    assert (run.results_folder / "table.md").read_text() == "new table\n"
    assert json.loads((run.results_folder / "results.json").read_text()) == {"new": True}
    assert not pending.exists()
    pending.mkdir()  # not marked complete: dropped, the published results stay
    (pending / "table.md").write_text("half\n")
    with run.locked("test"):
        pass
    assert not pending.exists() and (run.results_folder / "table.md").read_text() == "new table\n"


def test_models_that_learned_nothing_are_reported_and_not_used(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--lr", "5", *SMALL]) == 1
    error = capsys.readouterr().err
    assert "learned nothing" in error and "--lr" in error
    assert RunDir(run_dir).finished_seeds("sources") == []
    # nothing was trained, so the directory does not hold on to the failing settings
    assert main(["--run-dir", str(run_dir), "--lr", "0.05", "--stage", "models", *SMALL]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--sources", "0"], "--sources and --heldout must each be >= 1"),
    (["--samples-per-step", "0"], "--samples-per-step must be a positive int"),
    (["--samples-per-step", "3"], "--samples-per-step 3 must divide --batch-size"),
    (["--rematch-every", "0"], "--rematch-every must be a positive"),
    (["--ce-weight", "nan"], "--ce-weight must be a finite number"),
    (["--ce-weight", "-1"], "--ce-weight must be a finite number >= 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--ts", "5000"], "--ts must be between 2"),
    (["--batch-size", "1000000000"], "--batch-size 1000000000 needs at least"),
    (["--data-dir", "/nonexistent/starfast-data"], "--data-dir /nonexistent/starfast-data is not an existing folder"),
])
def test_every_flag_is_checked_before_anything_is_written(tmp_path, capsys, flags, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["--run-dir", str(run_dir), *SMALL, *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_diverged_first_attempt_does_not_lock_its_settings(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--lr", "1000", "--stage", "models", *SMALL]) == 1
    assert "diverged" in capsys.readouterr().err
    assert main(["--run-dir", str(run_dir), "--lr", "0.05", "--stage", "models", *SMALL]) == 0
    assert json.loads((run_dir / "config.json").read_text())["recipe"]["lr"] == 0.05


@pytest.mark.parametrize("content, message", [("[1, 2]", "holds a JSON list"), ('{"dataset": "digits"}', "has no valid 'model' entry")])
def test_a_malformed_config_is_one_clear_error(finished_run, tmp_path, capsys, content, message):
    run_dir = copy_of(finished_run, tmp_path)
    (run_dir / "config.json").write_text(content)
    status = evaluate_main([str(run_dir), "--quiet"]) if "list" not in message else main(["--run-dir", str(run_dir), *SMALL])
    assert status == 1 and message in capsys.readouterr().err


def test_nan_weights_name_their_file(finished_run, tmp_path, capsys):
    import torch

    run_dir = copy_of(finished_run, tmp_path)
    run = RunDir(run_dir)
    state, metadata = run.load_model("heldout", 1000)
    state = {name: torch.full_like(value, float("nan")) if value.is_floating_point() else value for name, value in state.items()}
    run.save_model("heldout", 1000, state, metadata)  # written with a valid checksum: the weights themselves are bad
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    assert f"{run.model_path('heldout', 1000)} holds NaN or infinite weights" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so this cannot be provoked as root")
def test_a_read_only_run_directory_is_one_clear_error(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    os.chmod(run_dir, 0o555)
    try:
        assert main(["--run-dir", str(run_dir), *SMALL]) == 1
        assert "cannot write to the run directory" in capsys.readouterr().err
    finally:
        os.chmod(run_dir, 0o755)


def test_a_run_directory_that_cannot_be_created_is_one_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["--run-dir", str(blocker / "run"), *SMALL]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot write to the run directory {blocker / 'run'}") and "Traceback" not in error


def copy_model(run_dir: Path, source: str, target: str, *, sidecar: bool = True) -> None:
    """Copy ``source`` (e.g. ``sources/seed-0001``) over ``target``: the weights, and the sidecar too."""
    import shutil

    for suffix in (".safetensors", ".json") if sidecar else (".safetensors",):
        shutil.copyfile(run_dir / f"{source}{suffix}", run_dir / f"{target}{suffix}")


def test_a_model_under_another_models_name_is_refused(finished_run, tmp_path, capsys):
    """A source copied (with its sidecar) over a held-out model would be measured as a held-out model
    at barrier 0; its sidecar's role and seed differ from its place."""
    run_dir = copy_of(finished_run, tmp_path)
    copy_model(run_dir, "sources/seed-0001", "heldout/seed-1001")
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    error = capsys.readouterr().err
    assert "heldout/seed-1001.json records role 'sources' but lies where role 'heldout' belongs" in error, error


def test_a_renamed_model_with_a_forged_sidecar_is_refused_by_its_own_header(finished_run, tmp_path, capsys):
    """The sidecar edited to match the place (and to record the copied file's checksum): the
    weights file's own header still names the model it is."""
    run_dir = copy_of(finished_run, tmp_path)
    copy_model(run_dir, "sources/seed-0001", "heldout/seed-1001")
    sidecar = run_dir / "heldout" / "seed-1001.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "role": "heldout", "seed": 1001}))
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    error = capsys.readouterr().err
    assert "heldout/seed-1001.safetensors holds the model of role 'sources', not 'heldout'" in error, error


def test_weights_copied_without_their_sidecar_fail_the_checksum_and_say_so(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    copy_model(run_dir, "sources/seed-0000", "sources/seed-0001", sidecar=False)
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    error = capsys.readouterr().err
    assert "sources/seed-0001.safetensors does not match the checksum that its .json sidecar records" in error, error


def test_a_sidecar_of_another_width_than_the_config_is_refused(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["kwargs"]["width"] = 16  # a hand-edited config: every model now disagrees with it
    (run_dir / "config.json").write_text(json.dumps(config))
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    error = capsys.readouterr().err
    assert "was made for model" in error and "if config.json was edited, restore it" in error, error


@pytest.mark.parametrize("flag, value, counted, note", [
    ("--heldout", "1", {"heldout": 1, "stars": 1}, "measuring 1 of the 2 heldout models stored"),
    ("--star-seeds", "0", {"heldout": 2, "stars": 0}, "measuring 0 of the 1 stars stored"),
])
def test_a_smaller_count_is_what_is_measured_and_is_said(finished_run, tmp_path, capsys, flag, value, counted, note):
    run_dir = copy_of(finished_run, tmp_path)
    flags = [*SMALL]
    flags[flags.index(flag) + 1] = value
    assert main(["--run-dir", str(run_dir), *flags]) == 0
    assert note in capsys.readouterr().out
    results = json.loads((run_dir / "results" / "results.json").read_text())
    assert {key: results["counts"][key] for key in counted} == counted
    assert RunDir(run_dir).finished_seeds("heldout") == [1000, 1001] and RunDir(run_dir).finished_stars() == [0]  # kept


def test_a_source_of_other_shapes_is_one_error_naming_it_at_the_star_stage(finished_run, tmp_path, capsys):
    """Weights of a wider network saved in a source's place with a consistent sidecar (checksum,
    role, seed, model): the star stage names the file instead of raising from deep in the code."""
    import shutil

    from starfast.models import ModelSpec
    from starfast.training import init_model

    run_dir = copy_of(finished_run, tmp_path)
    run = RunDir(run_dir)
    _, metadata = run.load_model("sources", 1)
    wider = ModelSpec.from_dict({**metadata["model"], "kwargs": {**metadata["model"]["kwargs"], "width": 16}})
    run.save_model("sources", 1, init_model(wider, 1).state_dict(), metadata)
    shutil.rmtree(run_dir / "star")
    assert main(["--run-dir", str(run_dir), "--stage", "star", *SMALL]) == 1
    assert f"{run.model_path('sources', 1)} does not fit this run's architecture" in capsys.readouterr().err


def test_a_run_directory_that_is_a_dangling_link_or_has_a_folder_for_a_lock_says_so(tmp_path, capsys):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    assert main(["--run-dir", str(link), *SMALL]) == 1
    assert f"is a symbolic link to {tmp_path / 'gone'}, which does not exist" in capsys.readouterr().err
    (tmp_path / "other" / ".lock").mkdir(parents=True)
    assert main(["--run-dir", str(tmp_path / "other"), *SMALL]) == 1
    assert ".lock is a folder, not starfast's lock file" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [({"model": {"arch": "nosuch"}}, "has no valid 'model' entry"),
                                           ({"dataset": "nosuch"}, "has no valid 'dataset' entry")])
def test_an_unknown_architecture_or_dataset_in_the_config_is_one_line(finished_run, tmp_path, capsys, edit, message):
    run_dir = copy_of(finished_run, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (run_dir / "config.json").write_text(json.dumps(config))
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("foo", "is not a device"), ("meta", "starfast runs on cpu or cuda")])
def test_evaluate_checks_its_device_flag_like_train(finished_run, capsys, device, message):
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([str(finished_run), "--device", device])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_ctrl_c_is_one_line_that_says_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "starfast.train", "--run-dir", str(run_dir), "--arch-kw", "width=8",
                                "--sources", "2", "--heldout", "2", "--epochs", "400", "--stage", "models", "--quiet"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a loaded machine takes long to import torch
        while not list(run_dir.glob("checkpoints/*/*.pt")):  # well inside training
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, error = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, error
    assert "Traceback" not in error and error.strip().splitlines() == [
        f"interrupted: python -m starfast.train --run-dir {run_dir} --arch-kw width=8 --sources 2 --heldout 2 --epochs 400 "
        "--stage models --quiet; run the same command again to resume (finished work and checkpoints are kept)"], error
