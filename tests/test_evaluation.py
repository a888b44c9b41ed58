"""Run-directory evaluation: pairs are matched before their barrier is measured, the results
file has the documented shape, and the table, plot and CLI work."""
import json

import pytest
import torch

from starfast import data, models
from starfast.bn import recompute_bn
from starfast.flat import ParamSpace
from starfast.evaluate import main as evaluate_main
from starfast.evaluation import EvaluationConfig, evaluate_run, write_results
from starfast.report import format_table
from starfast.files import write_json
from starfast.models import ModelSpec
from starfast.rundir import RunDir


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _model_with_exact_statistics(spec: ModelSpec, seed: int, digits):
    """A fresh model whose BatchNorm statistics (if any) are the exact ones over the train set,
    i.e. what the interior points of a path get, so identical models give a zero barrier."""
    torch.manual_seed(seed)
    model = spec.build()
    space = ParamSpace(model)
    buffers = recompute_bn(model, space.flatten(model), lambda: digits.eval_batches("train", 400))
    with torch.no_grad():
        for name, value in model.named_buffers():
            if name in buffers:
                value.copy_(buffers[name].reshape(value.shape))
    return model


def make_run(tmp_path, digits, arch="mlp", kwargs=None):
    """A run dir with 2 sources, 2 held-out models where held-out 1001 is a permuted copy of
    1000, and one star that is a permuted copy of source 0."""
    spec = ModelSpec.for_dataset(arch, digits, kwargs or dict(width=16, depth=2))
    run = RunDir(tmp_path / "run")
    run.prepare({"model": spec.to_dict(), "dataset": "digits", "recipe": {}})
    model_spec = None
    states = {}
    for role, seed in (("sources", 0), ("sources", 1), ("heldout", 1000)):
        model = _model_with_exact_statistics(spec, seed, digits)
        model_spec = models.permutation_spec(model)
        states[(role, seed)] = model.state_dict()
        run.save_model(role, seed, model.state_dict(), {"model": spec.to_dict(), "metrics": {}})
    generator = torch.Generator().manual_seed(5)
    twin = model_spec.apply(states[("heldout", 1000)], model_spec.random(generator))
    run.save_model("heldout", 1001, twin, {"model": spec.to_dict(), "metrics": {}})
    star = model_spec.apply(states[("sources", 0)], model_spec.random(generator))
    run.save_star(0, star, {"star_seed": 0})
    return run


@pytest.mark.parametrize("arch, kwargs", [("mlp", dict(width=16, depth=2)), ("resnet20", dict(width=0.5))])
def test_permuted_copies_have_zero_barrier(tmp_path, digits, arch, kwargs):
    run = make_run(tmp_path, digits, arch, kwargs)
    config = EvaluationConfig(heldout_source_pairs=0, ts=5, batch_size=400, match_init="sorted")
    results = evaluate_run(run, digits, config=config, progress=False)
    # regular_regular: only the held-out pair (1000, 1001), a permuted copy -> barrier 0.
    assert results["counts"]["regular_regular"] == 1
    for split in ("train", "test"):
        assert abs(results["barriers"]["regular_regular"][split]["max"]) < 1e-4
    # The star is a permuted copy of source 0: a flat path and barrier 0 to it; the path to
    # source 1 (another model) is not flat.
    star_source = results["barriers"]["star_source"]["train"]["values"]
    curves = results["curves"]["star_source"]
    assert abs(star_source[0]) < 1e-4 and max(curves[0]["train_loss"]) - min(curves[0]["train_loss"]) < 1e-4
    assert max(curves[1]["train_loss"]) - min(curves[1]["train_loss"]) > 1e-3
    assert results["counts"]["star_heldout"] == 2 and results["counts"]["stars"] == 1


def test_results_file_table_and_plot(tmp_path, digits):
    run = make_run(tmp_path, digits)
    results = evaluate_run(run, digits, config=EvaluationConfig(ts=3, batch_size=400), progress=False)
    folder = write_results(run, results)
    stored = json.loads((folder / "results.json").read_text())
    assert {"regular_loss", "star_loss", "barriers", "accuracy_barriers", "curves"} <= set(stored)
    for kind in ("regular_regular", "star_heldout", "star_source"):
        for split in ("train", "test"):
            summary = stored["barriers"][kind][split]
            assert set(summary) == {"mean", "std", "min", "max", "values", "ci", "matching"}
            assert summary["min"] <= summary["mean"] <= summary["max"]
            assert len(stored["curves"][kind][0]["t"]) == 3
    assert (folder / "table.md").read_text().startswith("| quantity |")
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "star–held-out barrier (loss)" in format_table(stored)


def test_cli(tmp_path, digits, capsys):
    run = make_run(tmp_path, digits)
    assert evaluate_main([str(run.path), "--quiet", "--ts", "3", "--heldout-source-pairs", "1"]) == 0
    assert "regular–regular barrier" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path / "nothing-here")])
    with pytest.raises(SystemExit):
        evaluate_main([str(run.path), "--ts", "1"])


def test_corrupt_model_file_is_reported(tmp_path, digits):
    run = make_run(tmp_path, digits)
    run.model_path("sources", 1).write_bytes(b"not a safetensors file")
    assert evaluate_main([str(run.path), "--quiet", "--ts", "3"]) == 1


def test_stars_are_measured_against_their_own_sources(tmp_path, digits):
    run = make_run(tmp_path, digits)
    write_json(run.star_path(0).with_suffix(".json"), {"star_seed": 0, "sources": [1]})
    results = evaluate_run(run, digits, config=EvaluationConfig(ts=3, batch_size=400), progress=False)
    assert results["counts"]["star_source"] == 1


class Interrupted(Exception):
    pass


def test_an_interrupted_evaluation_resumes_at_the_next_pair(tmp_path, digits, monkeypatch):
    from starfast import evaluation

    run = make_run(tmp_path, digits)
    config = EvaluationConfig(ts=3, batch_size=600, matching_optima=1)  # one barrier curve per pair
    uninterrupted = evaluate_run(run, digits, config=config, progress=False)
    (run.results_folder / "partial.json").unlink()  # kept until write_results: start afresh
    real_curve, measured, interrupt_at = evaluation.barrier_curve, [], [3]

    def measure(*args, **kwargs):
        if len(measured) in interrupt_at:
            raise Interrupted
        measured.append(1)
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(evaluation, "barrier_curve", measure)
    with pytest.raises(Interrupted):
        evaluate_run(run, digits, config=config, progress=False)
    stored = json.loads((run.results_folder / "partial.json").read_text())
    assert len(stored["curves"]) == 3
    measured.clear()
    interrupt_at.clear()
    resumed = evaluate_run(run, digits, config=config, progress=False)
    total = sum(resumed["counts"][kind] for kind in ("regular_regular", "star_heldout", "star_source"))
    assert len(measured) == total - 3  # only the pairs that were not measured yet
    assert resumed["curves"] == uninterrupted["curves"] and resumed["barriers"] == uninterrupted["barriers"]
    write_results(run, resumed)
    assert not (run.results_folder / "partial.json").exists()


def test_partial_results_of_other_settings_or_other_models_are_not_reused(tmp_path, digits, monkeypatch):
    from starfast import evaluation

    run = make_run(tmp_path, digits)
    config = EvaluationConfig(ts=3, batch_size=600)
    real_curve, measured = evaluation.barrier_curve, []

    def measure(*args, **kwargs):
        measured.append(1)
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(evaluation, "barrier_curve", measure)
    first = evaluate_run(run, digits, config=config, progress=False)
    pairs = len(measured)
    evaluate_run(run, digits, config=EvaluationConfig(ts=5, batch_size=600), progress=False)
    assert len(measured) == 2 * pairs  # other settings: everything measured again
    # the ts=5 run's partial file stands; a model file that changed invalidates it as well
    state = run.load_model("heldout", 1000)[0]
    run.save_model("heldout", 1000, {name: value * 1.01 if value.is_floating_point() else value for name, value in state.items()},
                   {"model": run.read_config()["model"], "metrics": {}})
    again = evaluate_run(run, digits, config=EvaluationConfig(ts=5, batch_size=600), progress=False)
    assert len(measured) == 3 * pairs and again["curves"] != first["curves"]


@pytest.mark.parametrize("arch, kwargs, bn_batches", [("mlp", dict(width=16, depth=2), None), ("resnet20", dict(width=0.25), 2)])
def test_each_pair_shows_progress_over_the_batches_it_reads(tmp_path, digits, monkeypatch, arch, kwargs, bn_batches):
    from starfast import evaluation

    bars = []

    class Recorder:
        def __init__(self, total=None, nested=False, **options):
            self.total, self.nested, self.count = total, nested, 0
            bars.append(self)

        def update(self, count=1):
            self.count += count

        def write(self, line):
            pass

        def close(self):
            pass

        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *exc: None  # noqa: E731

    monkeypatch.setattr(evaluation, "progress_bar", Recorder)
    run = make_run(tmp_path, digits, arch, kwargs)
    evaluate_run(run, digits, config=EvaluationConfig(ts=3, batch_size=500, bn_batches=bn_batches), progress=True)
    pair_bars = [bar for bar in bars if bar.nested]
    assert pair_bars and all(bar.count == bar.total for bar in pair_bars), [(bar.count, bar.total) for bar in pair_bars]
    assert [bar.count for bar in bars if not bar.nested] == [len(pair_bars)]
