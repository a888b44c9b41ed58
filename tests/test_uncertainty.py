"""Uncertainty of mean barriers (issue 26): the multi-way bootstrap (and the paired difference)
against a plain numpy loop that resamples the models and lists every resampled pair; the
matching's range; verdicts that say "within noise" when the difference is within its uncertainty;
the evaluation measuring the next best optima of the matching's restarts (against the same
restarts run one at a time); tables that state their environment and seeds."""
import itertools

import numpy as np
import pytest
import torch

from starfast import data, models
from starfast.evaluation import EvaluationConfig, LoadedModel, _barrier_table, _match, evaluate_run, write_results
from starfast.experiments.catalog import EXPERIMENTS
from starfast.experiments.measure import summarise_pairs
from starfast.experiments.output import verdict as experiment_verdict
from starfast.flat import ParamSpace
from starfast.matching import match_weights, restart_plan
from starfast.report import format_table, verdict
from starfast.uncertainty import bootstrap_difference, bootstrap_interval, compare, difference_side, matching_range
from test_evaluation import make_run
from test_report import regular_pairs, results_of, star_pairs


def written_out_mean(values, ends, drawn, credited):
    """The mean on the resampled data written out (every drawn copy of a model is a model of its
    own, every pair of drawn copies a pair), or None when no pair survives."""
    copies = list(enumerate(drawn))
    pairs = []  # (copy of a, copy of b, value) for every pair whose two ends were drawn
    for value, (a, b) in zip(values, ends):
        for first, second in itertools.product([c for c in copies if c[1] == a], [c for c in copies if c[1] == b]):
            pairs.append((first, second, value))
    if credited is None:
        return np.mean([value for _, _, value in pairs]) if pairs else None
    per_copy = [np.mean([value for first, second, value in pairs if copy in (first, second)])
                for copy in copies if copy[1] in credited and any(copy in (f, s) for f, s, _ in pairs)]
    return np.mean(per_copy) if per_copy else None


def reference_bootstrap(datasets, credited, replicates, level, seed):
    """``datasets``: one (values, ends), or two for their difference, on the same draws. A value
    that is a list (a pair's barriers at several optima) is one of them, drawn per replicate."""
    models_ = sorted({label for _, ends in datasets for pair in ends for label in pair})
    generator = np.random.default_rng(seed)
    drawn = [[models_[k] for k in generator.integers(0, len(models_), size=len(models_))] for _ in range(replicates)]
    chosen = []  # per dataset, [replicates][pairs] the value each pair takes
    for values, _ in datasets:
        if all(not isinstance(value, list) for value in values):
            chosen.append([list(values)] * replicates)
            continue
        options = [value if isinstance(value, list) else [value] for value in values]
        picks = generator.integers(0, [len(option) for option in options], size=(replicates, len(options)))
        chosen.append([[option[pick] for option, pick in zip(options, row)] for row in picks])
    statistics = []
    for b in range(replicates):
        means = [written_out_mean(chosen[d][b], ends, drawn[b], credited) for d, (_, ends) in enumerate(datasets)]
        if all(mean is not None for mean in means):
            statistics.append(means[0] if len(means) == 1 else means[0] - means[1])
    tail = (1 - level) / 2
    return np.quantile(statistics, [tail, 1 - tail]), len(statistics)


@pytest.mark.parametrize("optima", [False, True])
@pytest.mark.parametrize("credited", [False, True])
def test_the_bootstrap_is_the_resampled_data_written_out(credited, optima, rng):
    heldout = [f"h{k}" for k in range(4)]
    sources, stars = ["s0", "s1"], ["star0", "star1"]
    regular_ends = list(itertools.combinations(heldout, 2)) + [(h, s) for h in heldout for s in sources]
    star_ends = [(star, h) for star in stars for h in heldout]

    def values(count, scale):
        drawn = (scale * torch.rand(count, 3, generator=rng, dtype=torch.float64)).tolist()
        sizes = torch.randint(1, 4, (count,), generator=rng).tolist()  # 1 to 3 kept optima per pair
        return [row[:size] if optima else row[0] for row, size in zip(drawn, sizes)]

    regular, star = (values(len(regular_ends), 1.0), regular_ends), (values(len(star_ends), 0.5), star_ends)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    credit = heldout if credited else None
    for got, datasets in ((bootstrap_interval(*regular, credited=credit, replicates=200, seed=seed), [regular]),
                          (bootstrap_difference(star, regular, credited=credit, replicates=200, seed=seed), [star, regular])):
        (low, high), used = reference_bootstrap(datasets, set(heldout) if credited else None, 200, 0.95, seed)
        assert got["used"] == used
        gap = max(abs(got["low"] - low), abs(got["high"] - high))
        assert gap < 1e-12, f"interval differs from the written-out bootstrap by {gap}"
        assert got["low"] <= got["high"]


def test_bootstrap_edge_cases():
    assert bootstrap_interval([0.1], [("a", "b")]) is None
    with pytest.raises(ValueError, match="2 values but 1 pairs of ends"):
        bootstrap_interval([0.1, 0.2], [("a", "b")])
    same = bootstrap_interval([0.3, 0.3, 0.3], [("a", "b"), ("a", "c"), ("b", "c")])
    assert same["low"] == same["high"] == pytest.approx(0.3)


def test_the_matching_range():
    curves = [
        {"a": "s", "b": "h0", "loss_barrier": {"train": 0.2}, "matching": {"optima": [{"loss_barrier": {"train": 0.1}},
                                                                                       {"loss_barrier": {"train": 0.5}}]}},
        {"a": "s", "b": "h1", "loss_barrier": {"train": 0.3}, "matching": {"optima": []}},
        {"a": "h0", "b": "h1", "loss_barrier": {"train": 0.4}},
    ]
    assert matching_range(curves, "loss_barrier", "train") == pytest.approx({"low": (0.1 + 0.3 + 0.4) / 3, "high": (0.5 + 0.3 + 0.4) / 3})
    per_model = matching_range(curves, "loss_barrier", "train", credited=["h0", "h1"])
    assert per_model["low"] == pytest.approx((np.mean([0.1, 0.4]) + np.mean([0.3, 0.4])) / 2)
    assert matching_range(curves[1:], "loss_barrier", "train") is None
    assert compare((0.1, 0.2), (0.25, 0.3)) == "below" and compare((0.25, 0.3), (0.1, 0.2)) == "above"
    assert compare((0.1, 0.26), (0.25, 0.3)) == "within noise"


def test_difference_side_counts_the_matching_s_optima():
    ends = [("a", "h0"), ("a", "h1"), ("b", "h0"), ("b", "h1")]
    low, high = [0.1, 0.11, 0.1, 0.11], [0.5, 0.52, 0.49, 0.5]
    regular = ([0.5, 0.5, 0.52], [("h0", "h1"), ("h0", "s"), ("h1", "s")])
    side, interval = difference_side((low, ends), regular)
    assert side == "below" and interval[1] < 0
    # Other good matchings of every star pair give barriers as high as the regular pairs': noise.
    side, _ = difference_side(([[value, 0.6] for value in low], ends), regular)
    assert side == "within noise"
    assert difference_side((high, ends), ([0.1, 0.1, 0.12], regular[1]))[0] == "above"
    assert difference_side((low[:1], ends[:1]), regular) == ("below", None)  # too few pairs: the means


def test_verdicts_say_within_noise_when_the_difference_is_within_its_uncertainty():
    regular = regular_pairs([0.05, 0.07, 0.06, 0.08, 0.06, 0.07])
    stars = star_pairs([[0.01, 0.02], [0.02, 0.03], [0.015, 0.025]])
    results = results_of(regular, stars)
    assert verdict(results).endswith("the star-domain claim holds here")  # no intervals: the means
    results["barriers"] = {kind: _barrier_table(curves, "loss_barrier") for kind, curves in results["curves"].items()}
    line = verdict(results)
    assert "below, beyond noise" in line and line.endswith("the star-domain claim holds here"), line
    for curve in results["curves"]["star_heldout"]:  # other good matchings as bad as the regular pairs
        curve["matching"] = {"optima": [{"loss_barrier": {"train": 0.09, "test": 0.09}}]}
    results["barriers"] = {kind: _barrier_table(curves, "loss_barrier") for kind, curves in results["curves"].items()}
    line = verdict(results)
    assert line.endswith("(the difference is within noise)"), line
    assert "; matching 0.0200–0.0900" in format_table(results)

    heldout = [f"heldout seed {1000 + k}" for k in range(4)]

    def point(label, star_barriers):
        curves = {"star_heldout": [{"a": f"star {label}-{s}", "b": h, "loss_barrier": {"train": value, "test": value},
                                    "acc_barrier": {"train": 0.0, "test": 0.0}}
                                   for s, row in enumerate(star_barriers) for h, value in zip(heldout, row)],
                  "regular_regular": [{"a": a, "b": b, "loss_barrier": {"train": 0.3 + 0.01 * k, "test": 0.3},
                                       "acc_barrier": {"train": 0.0, "test": 0.0}}
                                      for k, (a, b) in enumerate(itertools.combinations(heldout, 2))]}
        return {"label": label, "value": label, "curves": curves,
                "barriers": {kind: summarise_pairs(kind_curves, heldout) for kind, kind_curves in curves.items()},
                "star_loss": {"train": {"mean": 0.01}}, "regular_loss": {"train": {"mean": 0.01}}}

    steady = [[0.20, 0.21, 0.20, 0.21], [0.21, 0.20, 0.21, 0.20]]
    lower = [[0.10, 0.11, 0.10, 0.11], [0.11, 0.10, 0.11, 0.10]]
    noisy = [[0.01, 0.45, 0.02, 0.44], [0.02, 0.44, 0.01, 0.45]]  # mean 0.23: below 0.3, but not beyond noise
    line = experiment_verdict(EXPERIMENTS["sources"], [point("2", steady), point("5", lower), point("10", noisy)])
    assert "(1 of 2 steps down, 1 within noise)" in line, line
    assert "below regular–regular at 2 of 3 points, within noise at 1" in line, line


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_the_evaluation_measures_the_next_best_optima_of_the_restarts(tmp_path, digits, rng):
    spec_model = models.build("mlp", num_classes=10, in_channels=1, input_shape=(1, 8, 8), width=12, depth=3)
    space, spec = ParamSpace(spec_model), models.permutation_spec(spec_model)
    rows = [torch.randn(space.size, generator=rng, dtype=torch.float64) for _ in range(4)]
    loaded = [LoadedModel(f"m{k}", row, {}, str(k)) for k, row in enumerate(rows)]
    config = EvaluationConfig(match_restarts=6, matching_optima=3)
    aligned = _match(loaded[0], loaded[1:], spec, space, config)
    bank = torch.stack(rows[1:])
    runs = [match_weights(rows[0], bank, spec, space=space, init=start, seed=seed)
            for start, seed in restart_plan(spec, None, 6, 0)]
    for k, alignments in enumerate(aligned):
        # The plain way: each restart's answer for source k, best first, the distinct ones.
        ranked = sorted(range(len(runs)), key=lambda r: -float(runs[r].objective[-1, k]))
        distinct = []
        for r in ranked:
            if all(not torch.equal(runs[r].permuted[k], runs[seen].permuted[k]) for seen in distinct):
                distinct.append(r)
        want = distinct[:3]
        assert len(alignments) == len(want)
        for alignment, r in zip(alignments, want):
            assert torch.equal(alignment.row, runs[r].permuted[k]), (k, r)
            assert alignment.objective == pytest.approx(float(runs[r].objective[-1, k]), rel=1e-12)

    run = make_run(tmp_path, digits)
    results = evaluate_run(run, digits, config=EvaluationConfig(ts=3, batch_size=600, match_restarts=4), progress=False)
    curve = results["curves"]["star_source"][1]  # the star against another source: several optima
    assert curve["matching"]["restarts"] == 4 and len(curve["matching"]["optima"]) <= 2
    summary = results["barriers"]["star_source"]["train"]
    assert "ci" in summary and "matching" in summary
    objectives = [curve["matching"]["objective"]] + [optimum["objective"] for optimum in curve["matching"]["optima"]]
    assert objectives == sorted(objectives, reverse=True), objectives
    # The table states where its numbers came from.
    assert results["environment"]["torch"] == torch.__version__ and results["environment"]["threads"] == torch.get_num_threads()
    assert results["seeds"] == {"sources": [0, 1], "heldout": [1000, 1001], "stars": [0]}
    table = (write_results(run, results) / "table.md").read_text()
    assert f"{torch.get_num_threads()} thread" in table and f"torch {torch.__version__}" in table, table
    assert "seeds: sources 0, 1; heldout 1000, 1001; stars 0 (bootstrap seed 0)" in table, table
