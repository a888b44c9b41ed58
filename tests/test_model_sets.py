"""Optimizer per role (Appendix D.2 / Figure 7): the star's own recipe flags and the extra held-out
sets (``--extra-heldout NAME:COUNT[:KEY=VALUE,...]``): what each model records, what a rerun with
other settings refuses, what the evaluation measures, and the run-directory guarantees for
``RUN/extra/<name>``."""
import argparse
import json
import shutil

import pytest

from starfast.arguments import parse_extra_heldout
from starfast.evaluate import main as evaluate_main
from starfast.recipes import ADAPTIVE_DEFAULT_LR, BUNDLED_PRESETS, resolve, resolve_own
from starfast.rundir import RunDir, extra_role
from starfast.train import Distributed, build_context, build_parser, main

SMALL = ["--arch-kw", "width=8", "--sources", "2", "--heldout", "2", "--epochs", "2", "--star-seeds", "1", "--star-epochs", "2",
         "--ts", "3", "--quiet"]
ADAM_SET = ["--extra-heldout", "adam:2:optimizer=adam,lr=0.01"]  # Adam's 1e-3 learns nothing in two epochs here


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    """SGD sources, an SGD star, two Adam-trained held-out models: one finished run."""
    run_dir = tmp_path_factory.mktemp("model-sets") / "run"
    assert main(["--run-dir", str(run_dir), *SMALL, *ADAM_SET, "--star-optimizer", "sgd"]) == 0
    return run_dir


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


# -- recipes per role ----------------------------------------------------------------------------


def test_own_overrides_go_on_top_of_the_shared_flags():
    base = BUNDLED_PRESETS["digits"]
    assert resolve_own("mlp", "digits", {"epochs": 4}, {}) == resolve("mlp", "digits", {"epochs": 4})
    adam = resolve_own("mlp", "digits", {"epochs": 4, "lr": 0.2}, {"optimizer": "adam"})
    # a new optimizer does not inherit the shared --lr: Adam gets its own default
    assert (adam.optimizer, adam.lr, adam.epochs, adam.batch_size) == ("adam", ADAPTIVE_DEFAULT_LR, 4, base.batch_size)
    assert resolve_own("mlp", "digits", {"lr": 0.2}, {"optimizer": "adam", "lr": 3e-4}).lr == 3e-4
    assert resolve_own("mlp", "digits", {"lr": 0.2}, {"optimizer": "sgd"}).lr == 0.2  # same optimizer: --lr holds
    sgd = resolve_own("mlp", "digits", {"optimizer": "adam", "lr": 3e-4}, {"optimizer": "sgd"})
    assert (sgd.optimizer, sgd.lr, sgd.momentum) == ("sgd", base.lr, base.momentum)


def test_star_flags_change_only_the_stars_recipe(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--optimizer", "adam", "--epochs", "3",
                              "--star-optimizer", "sgd", "--star-weight-decay", "0", "--star-epochs", "5", *ADAM_SET,
                              "--extra-heldout", "wide-lr:1:lr=0.5,epochs=2"])
    context = build_context(args, parser, Distributed())
    assert (context.recipe.optimizer, context.recipe.lr, context.recipe.epochs) == ("adam", ADAPTIVE_DEFAULT_LR, 3)
    star = context.star_recipe
    assert (star.optimizer, star.lr, star.weight_decay, star.epochs) == ("sgd", BUNDLED_PRESETS["digits"].lr, 0.0, 5)
    adam, wide = context.extra_sets
    assert (adam.name, adam.count, adam.recipe) == ("adam", 2, resolve("mlp", "digits", {"optimizer": "adam", "lr": 0.01, "epochs": 3}))
    assert (wide.recipe.optimizer, wide.recipe.lr, wide.recipe.epochs) == ("adam", 0.5, 2)  # the regular recipe's Adam
    assert context.config()["extra_heldout"] == {"adam": adam.to_dict(), "wide-lr": wide.to_dict()}


@pytest.mark.parametrize("text, message", [
    ("adam", "expects NAME:COUNT"), ("adam:x", "expects NAME:COUNT"), (":3", "expects NAME:COUNT"),
    ("adam:3:optimiser=adam", "'optimiser=adam' is not KEY=VALUE with KEY one of optimizer, lr"),
    ("adam:3:lr=fast", "lr='fast' is not a valid float"), ("adam:3:epochs=1.5", "epochs='1.5' is not a valid int"),
])
def test_extra_heldout_spec_errors_say_what_is_expected(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_extra_heldout(text)


@pytest.mark.parametrize("flags, message", [
    (["--extra-heldout", "Adam:2"], "set name 'Adam' must be lowercase"),
    (["--extra-heldout", "heldout:2"], "not one of sources, source, heldout, regular, star"),
    (["--extra-heldout", "adam:2", "--extra-heldout", "adam:3"], "--extra-heldout names must differ"),
    (["--extra-heldout", "adam:1001"], "holds 0..1000 models"),
    (["--extra-heldout", "adam:2:optimizer=lbfgs"], "--optimizer must be one of"),
    (["--star-lr", "-1"], "--lr must be a positive number"),
])
def test_bad_role_flags_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["--run-dir", str(tmp_path / "run"), *SMALL, *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- one run with an Adam set --------------------------------------------------------------------


def test_each_model_records_its_recipe_and_the_evaluation_measures_the_set(adam_run):
    run = RunDir(adam_run)
    assert run.extra_roles() == ["extra/adam"] and run.finished_seeds("extra/adam") == [3000, 3001]
    adam_recipe = run.read_metadata("extra/adam", 3000)["recipe"]
    assert (adam_recipe["optimizer"], adam_recipe["lr"], adam_recipe["epochs"]) == ("adam", 0.01, 2)
    sgd_recipe = run.read_metadata("heldout", 1000)["recipe"]
    assert sgd_recipe["optimizer"] == "sgd" and {**sgd_recipe, "optimizer": "adam", "lr": 0.01} == adam_recipe
    assert run.read_star_metadata(0)["recipe"]["optimizer"] == "sgd"
    config = run.read_config()
    assert config["extra_heldout"] == {"adam": {"count": 2, "recipe": adam_recipe}}
    assert set(json.loads(run.models_summary_path.read_text())) == {"sources", "heldout", "extra/adam"}

    results = json.loads((adam_run / "results" / "results.json").read_text())
    assert results["counts"]["star_adam"] == 2 and results["counts"]["adam_adam"] == 1
    assert [(curve["a"], curve["b"]) for curve in results["curves"]["star_adam"]] == [
        ("star star-0000", "extra/adam seed 3000"), ("star star-0000", "extra/adam seed 3001")]
    assert [(curve["a"], curve["b"]) for curve in results["curves"]["adam_adam"]] == [("extra/adam seed 3000", "extra/adam seed 3001")]
    summary = results["extra_heldout"]["adam"]
    assert summary["recipe"] == adam_recipe and summary["count"] == 2 and summary["kinds"] == ["star_adam", "adam_adam"]
    own = {curve["b"]: curve["train_loss"][-1] for curve in results["curves"]["star_adam"]}
    # the same model's loss computed permuted (star–adam) or not (adam–adam): float32 sums in another order
    assert summary["loss"]["values"] == pytest.approx(list(own.values()), rel=1e-6)
    for kind in ("star_adam", "adam_adam"):
        assert results["barriers"][kind]["train"]["values"] == [curve["loss_barrier"]["train"] for curve in results["curves"][kind]]
    # The Adam models are not regular models of the paper's tables.
    assert "extra/adam seed 3000" not in {curve["b"] for kind in ("regular_regular", "star_heldout") for curve in results["curves"][kind]}
    assert len(results["regular_loss"]["values"]) == 4  # two sources and two held-out models, no Adam model
    table = (adam_run / "results" / "table.md").read_text()
    assert "| adam loss | 2 |" in table and "| star–adam barrier (loss) | 2 |" in table and "| adam–adam barrier (accuracy) | 1 |" in table


def test_a_rerun_reuses_the_set_and_refuses_another_recipe(adam_run, tmp_path, capsys):
    run_dir = copy_of(adam_run, tmp_path)
    before = {path: path.stat().st_mtime_ns for path in (run_dir / "extra" / "adam").iterdir()}
    assert main(["--run-dir", str(run_dir), "--stage", "models", *SMALL, *ADAM_SET]) == 0
    assert {path: path.stat().st_mtime_ns for path in (run_dir / "extra" / "adam").iterdir()} == before
    capsys.readouterr()

    assert main(["--run-dir", str(run_dir), "--stage", "models", *SMALL, "--extra-heldout", "adam:2:optimizer=adam,lr=0.02"]) == 1
    error = capsys.readouterr().err
    assert "extra/adam/seed-3000.json was trained with recipe" in error and "use the same --extra-heldout adam:..." in error

    assert main(["--run-dir", str(run_dir), "--stage", "star", *SMALL, *ADAM_SET, "--star-optimizer", "adam"]) == 1
    assert "star-0000.json was trained with recipe" in (error := capsys.readouterr().err) and "--star-optimizer" in error


def test_a_second_set_is_trained_beside_the_first(adam_run, tmp_path, capsys):
    run_dir = copy_of(adam_run, tmp_path)
    flags = [*SMALL, *ADAM_SET, "--extra-heldout", "slow:1:lr=0.01"]
    assert main(["--run-dir", str(run_dir), "--stage", "models", *flags]) == 0
    run = RunDir(run_dir)
    assert run.extra_roles() == ["extra/adam", "extra/slow"] and run.read_metadata("extra/slow", 3000)["recipe"]["lr"] == 0.01
    assert set(run.read_config()["extra_heldout"]) == {"adam", "slow"}


# -- run-directory guarantees for RUN/extra ------------------------------------------------------


def test_a_flipped_byte_in_an_extra_model_is_an_error_naming_the_file(adam_run, tmp_path, capsys):
    run_dir = copy_of(adam_run, tmp_path)
    model = run_dir / "extra" / "adam" / "seed-3001.safetensors"
    data = bytearray(model.read_bytes())
    data[-8] ^= 0x40
    model.write_bytes(bytes(data))
    for stage in ("models", "evaluate"):
        assert main(["--run-dir", str(run_dir), "--stage", stage, *SMALL, *ADAM_SET]) == 1
        assert f"{model} does not match the checksum" in capsys.readouterr().err


def test_an_evaluation_missing_an_extra_model_stops_and_leftovers_are_removed(adam_run, tmp_path, capsys):
    run_dir = copy_of(adam_run, tmp_path)
    leftover = run_dir / "extra" / "adam" / ".starfast-seed-3000.json.12345.tmp"
    leftover.write_text("{")
    (run_dir / "extra" / "adam" / "seed-3001.json").unlink()
    assert evaluate_main([str(run_dir), "--quiet", "--ts", "3"]) == 1
    error = capsys.readouterr().err
    assert "needs every model the run names, but 1 are missing" in error and "extra/adam/seed-3001.safetensors" in error
    assert not leftover.exists()


def test_extra_roles_are_checked_and_only_valid_folders_count(tmp_path):
    run = RunDir(tmp_path / "run")
    assert extra_role("adam-2") == "extra/adam-2"
    (tmp_path / "run" / "extra" / "Not A Set").mkdir(parents=True)
    assert run.extra_roles() == [] and not run.holds_work()
    with pytest.raises(ValueError, match="role must be one of"):
        run.model_path("extra/Not A Set", 3000)
