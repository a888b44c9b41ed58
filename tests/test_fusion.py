"""Model fusion (Table 2): accuracies (MergeMany's too) equal a plain evaluation of the stored models, the cost
columns equal hand counts, fusion stars are trained once (checkpointed) and reused, and the CLI
validates its flags."""
import json

import pytest
import torch

from starfast import data, models, pipeline
from starfast.flat import ParamSpace
from starfast.merge_many import merge_many
from starfast.evaluate import main as evaluate_main
from starfast.files import load_state_dict, write_json
from starfast.fusion import FusionConfig, fusion_table, star_recipe, usable_sizes, write_fusion
from starfast.recipes import Recipe
from starfast.rundir import RunDir, RunDirError, fusion_star_set

from tiny_runs import TINY_RECIPE, make_tiny_run


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_usable_sizes():
    assert usable_sizes([50, 2, 5, 2], 10) == ([2, 5], [50])
    assert usable_sizes([50], 3) == ([], [50])


def test_star_recipe_follows_the_runs_star(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare({"model": {}, "dataset": "digits", "recipe": Recipe(epochs=10, schedule="step", milestones=(5, 8)).to_dict()})
    assert star_recipe(run).epochs == 10
    stretched = star_recipe(run, 20)
    assert (stretched.epochs, stretched.milestones) == (20, (10, 16))
    write_json(run.star_path(0).with_suffix(".json"), {"recipe": Recipe(epochs=30).to_dict()})
    run.star_path(0).touch()  # a finished star: weights and metadata
    assert star_recipe(run).epochs == 30  # the run's star recipe, e.g. its --star-epochs


def plain_probabilities(module, digits):
    x, _ = digits.tensors("test")
    with torch.no_grad():
        return torch.softmax(module.eval()(x).double(), -1)


def test_table_matches_a_plain_evaluation_and_stars_are_reused(tmp_path, digits, monkeypatch):
    run = make_tiny_run(tmp_path / "run", digits, sources=3, heldout=1)
    checkpoints = []
    train_star = pipeline.train_star

    def recording_train_star(*args, **kwargs):
        checkpoints.append(kwargs["checkpoint_path"])
        return train_star(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_star", recording_train_star)
    config = FusionConfig(sizes=(2, 3, 50), star_seeds=2, star_epochs=1, batch_size=400, timing_repeats=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = fusion_table(run, digits, config=config, progress=False)
        assert torch.get_num_threads() == 2  # timing runs on one thread, then restores the setting
    finally:
        torch.set_num_threads(threads)
    assert [row["size"] for row in results["rows"]] == [2, 3] and results["dropped_sizes"] == [50]
    assert checkpoints[0] == run.star_checkpoint_path(0, fusion_star_set(2)) and len(checkpoints) == 4
    assert not any(path.exists() for path in checkpoints)  # removed once the star is saved

    _, labels = digits.tensors("test")
    spec = run.model_spec()
    sources = [plain_probabilities(run.build_model("sources", seed), digits) for seed in (0, 1, 2)]
    per_example = spec.build()
    flops = 2 * sum(layer.in_features * layer.out_features for layer in per_example.modules() if isinstance(layer, torch.nn.Linear))
    parameter_bytes = 4 * sum(p.numel() for p in per_example.parameters())
    for row in results["rows"]:
        size = row["size"]
        accuracies = [float((p.argmax(-1) == labels).double().mean()) for p in sources[:size]]
        assert row["regular"]["values"] == pytest.approx(accuracies, abs=1e-12)
        ensemble = float((torch.stack(sources[:size]).mean(0).argmax(-1) == labels).double().mean())
        assert row["ensemble"]["accuracy"] == pytest.approx(ensemble, abs=1e-12)
        stars = []
        for star_seed in range(2):
            path = run.star_path(star_seed, fusion_star_set(size))
            stored = json.loads(path.with_suffix(".json").read_text())
            assert stored["sources"] == list(range(size)) and stored["ce_weight"] == 1.0 and stored["recipe"]["epochs"] == 1
            module = spec.build()
            module.load_state_dict(load_state_dict(path))
            stars.append(float((plain_probabilities(module, digits).argmax(-1) == labels).double().mean()))
        assert row["star"]["values"] == pytest.approx(stars, abs=1e-12)
        merged = spec.build()
        space = ParamSpace(merged)
        bank = space.stack([run.build_model("sources", seed) for seed in range(size)])
        space.load_(merged, merge_many(bank, models.permutation_spec(merged), space=space).row)
        merged_accuracy = float((plain_probabilities(merged, digits).argmax(-1) == labels).double().mean())
        assert row["mergemany"]["accuracy"] == pytest.approx(merged_accuracy, abs=1e-12) and row["mergemany"]["converged"]
        cost = row["cost"]
        methods = ("regular", "ensemble", "star", "mergemany")
        assert [cost[m]["flops_per_example"] for m in methods] == [flops, size * flops, flops, flops]
        assert [cost[m]["parameter_bytes"] for m in methods] == [parameter_bytes, size * parameter_bytes, parameter_bytes, parameter_bytes]
        assert all(cost[m]["seconds_per_batch"] > 0 and cost[m]["clock"] == "cpu time, 1 thread" for m in cost)

    # A second call trains nothing and finds the same stars.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished fusion star was trained again")

    monkeypatch.setattr(pipeline, "train_star", no_training)
    again = fusion_table(run, digits, config=config, progress=False)
    assert [row["star"] for row in again["rows"]] == [row["star"] for row in results["rows"]]
    with pytest.raises(RunDirError, match="--fusion-ce-weight"):
        fusion_table(run, digits, config=FusionConfig(sizes=(2,), star_seeds=1, star_epochs=1, ce_weight=0.5), progress=False)
    with pytest.raises(RunDirError, match="--fusion-star-epochs"):
        fusion_table(run, digits, config=FusionConfig(sizes=(2,), star_seeds=1, star_epochs=2), progress=False)

    folder = write_fusion(run, results)
    assert json.loads((folder / "fusion.json").read_text())["rows"][0]["size"] == 2
    table = (folder / "fusion.md").read_text()
    assert "| 3 | ensemble |" in table and "best star" in table and "| 3 | mergemany |" in table and "MergeMany" in table


def test_cli(tmp_path, digits, capsys):
    run = make_tiny_run(tmp_path / "run", digits, sources=2, heldout=0)
    assert TINY_RECIPE.epochs == 1  # the run's star recipe: one epoch
    assert evaluate_main([str(run.path), "--fusion", "--fusion-sizes", "2,9", "--fusion-star-seeds", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "--fusion-sizes 9 dropped: the run has 2 source models" in out and "| 2 | star |" in out
    assert "| 2 | mergemany |" in out
    assert evaluate_main([str(run.path), "--fusion", "--fusion-sizes", "9", "--quiet"]) == 1
    assert "fewer than every --fusion-sizes value" in capsys.readouterr().err
    for bad in (["--fusion", "--fusion-sizes", "2,x"], ["--fusion", "--fusion-sizes", "0"], ["--fusion", "--fusion-ce-weight", "-1"],
                ["--fusion", "--fusion-star-seeds", "0"], ["--fusion", "--fusion-star-epochs", "0"], ["--fusion-sizes", "2"]):
        with pytest.raises(SystemExit):
            evaluate_main([str(run.path), *bad])
