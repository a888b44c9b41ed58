"""Uncertainty of mean barriers (issue 26): the multi-way bootstrap against a plain numpy loop that
resamples the models and lists every resampled pair; the matching's range against a plain loop;
verdicts that say "within noise" when the intervals overlap; the evaluation measuring the next best
optima of the matching's restarts (against the same restarts run one at a time)."""
import itertools

import numpy as np
import pytest
import torch

from starfast import data, models
from starfast.evaluation import EvaluationConfig, LoadedModel, _match, evaluate_run
from starfast.experiments.catalog import EXPERIMENTS
from starfast.experiments.output import verdict as experiment_verdict
from starfast.flat import ParamSpace
from starfast.matching import match_weights, restart_plan
from starfast.report import format_table, verdict
from starfast.uncertainty import bootstrap_interval, compare, matching_range, noise_interval
from test_evaluation import make_run
from test_report import regular_pairs, results_of, star_pairs


def reference_bootstrap(values, ends, credited, replicates, level, seed):
    """The resampled data written out: every drawn copy of a model is a model of its own."""
    models_ = sorted({label for pair in ends for label in pair})
    generator = np.random.default_rng(seed)
    means = []
    for _ in range(replicates):
        drawn = [models_[k] for k in generator.integers(0, len(models_), size=len(models_))]
        copies = [(label, copy) for copy, label in enumerate(drawn)]
        pairs = []  # (copy of a, copy of b, value) for every pair whose two ends were drawn
        for value, (a, b) in zip(values, ends):
            for first, second in itertools.product([c for c in copies if c[0] == a], [c for c in copies if c[0] == b]):
                pairs.append((first, second, value))
        if credited is None:
            if pairs:
                means.append(np.mean([value for _, _, value in pairs]))
            continue
        per_copy = [np.mean([value for first, second, value in pairs if copy in (first, second)])
                    for copy in copies if copy[0] in credited and any(copy in (f, s) for f, s, _ in pairs)]
        if per_copy:
            means.append(np.mean(per_copy))
    tail = (1 - level) / 2
    return np.quantile(means, [tail, 1 - tail]), len(means)


@pytest.mark.parametrize("credited", [False, True])
def test_the_bootstrap_is_the_resampled_data_written_out(credited, rng):
    heldout = [f"h{k}" for k in range(4)]
    sources = ["s0", "s1"]
    ends = list(itertools.combinations(heldout, 2)) + [(h, s) for h in heldout for s in sources]
    values = torch.rand(len(ends), generator=rng, dtype=torch.float64).tolist()
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    got = bootstrap_interval(values, ends, credited=heldout if credited else None, replicates=300, seed=seed)
    (low, high), used = reference_bootstrap(values, ends, set(heldout) if credited else None, 300, 0.95, seed)
    assert got["used"] == used
    gap = max(abs(got["low"] - low), abs(got["high"] - high))
    assert gap < 1e-12, f"interval differs from the written-out bootstrap by {gap}"
    mean = np.mean(values)
    assert got["low"] <= got["high"] and got["low"] < mean + 0.5 and got["high"] > mean - 0.5


def test_bootstrap_edge_cases():
    assert bootstrap_interval([0.1], [("a", "b")]) is None
    with pytest.raises(ValueError, match="2 values but 1 pairs"):
        bootstrap_interval([0.1, 0.2], [("a", "b")])
    same = bootstrap_interval([0.3, 0.3, 0.3], [("a", "b"), ("a", "c"), ("b", "c")])
    assert same["low"] == same["high"] == pytest.approx(0.3)


def test_the_matching_range_and_the_noise_interval():
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
    assert noise_interval(0.3, {"low": 0.25, "high": 0.32}, {"low": 0.2, "high": 0.45}) == pytest.approx((0.15, 0.47))
    assert compare((0.1, 0.2), (0.25, 0.3)) == "below" and compare((0.25, 0.3), (0.1, 0.2)) == "above"
    assert compare((0.1, 0.26), (0.25, 0.3)) == "within noise"


def test_verdicts_say_within_noise_when_the_intervals_overlap():
    regular = regular_pairs([0.05, 0.07, 0.06, 0.08, 0.06, 0.07])
    stars = star_pairs([[0.01, 0.02], [0.02, 0.03], [0.015, 0.025]])
    results = results_of(regular, stars)
    assert verdict(results).endswith("the star-domain claim holds here")  # no intervals: the means
    results["barriers"]["star_heldout"]["train"]["matching"] = {"low": 0.01, "high": 0.07}  # reaches regular's mean
    line = verdict(results)
    assert "within noise" in line and line.endswith("(the difference is within noise)"), line
    assert "; matching 0.0100–0.0700" in format_table(results)

    def point(label, star, ci=None):
        summary = lambda mean, ci: {"train": {"over_heldout": {"mean": mean, "std": 0.0, "ci": ci}}}  # noqa: E731
        return {"label": label, "value": label, "barriers": {"star_heldout": summary(star, ci),
                                                             "regular_regular": summary(0.1, None)},
                "star_loss": {"train": {"mean": 0.01}}, "regular_loss": {"train": {"mean": 0.01}}}

    wide = {"low": 0.02, "high": 0.06, "level": 0.95}
    line = experiment_verdict(EXPERIMENTS["sources"], [point("2", 0.05), point("5", 0.04, wide), point("10", 0.01)])
    assert "(1 of 2 steps down, 1 within noise)" in line and line.endswith("not every step is down beyond noise"), line


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
