"""Uncertainty metrics: hand-computed values on tiny cases, both backends (torchmetrics and
scikit-learn) against brute-force references on random predictions, and the documented edge
conventions."""
import math

import pytest
import torch

from starfast import calibration
from starfast.calibration import (
    PerExample, class_probabilities, classification_metrics, correctness_auroc, expected_calibration_error, summarise,
)

BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    name == "torchmetrics" and calibration.default_backend() != "torchmetrics", reason="torchmetrics not installed (optional)"
)) for name in calibration.BACKENDS]


def brute_force_ece(confidence, correct, bins=15):
    """Σ_b (n_b / N) |acc_b - conf_b| with bins [b/15, (b+1)/15), for confidences off the edges."""
    total = 0.0
    for b in range(bins):
        inside = [(c, k) for c, k in zip(confidence.tolist(), correct.tolist()) if b / bins < c < (b + 1) / bins]
        if inside:
            accuracy = sum(k for _, k in inside) / len(inside)
            mean_confidence = sum(c for c, _ in inside) / len(inside)
            total += len(inside) / len(confidence) * abs(accuracy - mean_confidence)
    return total


def auroc_tolerance(backend, count):
    """torchmetrics computes the ROC curve in float32 (the rates are long / long divisions): each
    of the ``count`` trapezoids may be off by a few float32 ulps; scikit-learn works in float64."""
    return 4 * count * 2.0**-24 if backend == "torchmetrics" else 1e-12


def brute_force_auroc(score, correct):
    """P(score of a correct > score of a wrong) + P(tie) / 2 over all (correct, wrong) pairs."""
    right = [s for s, k in zip(score.tolist(), correct.tolist()) if k]
    wrong = [s for s, k in zip(score.tolist(), correct.tolist()) if not k]
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ece_by_hand(backend):
    # bins of width 1/15: 0.9 -> [13/15, 14/15), 0.62 -> [9/15, 10/15), 0.35 -> [5/15, 6/15)
    confidence = torch.tensor([0.9, 0.9, 0.62, 0.35], dtype=torch.float64)
    correct = torch.tensor([True, False, True, False])
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.62) + 1 / 4 * abs(0 - 0.35)  # 0.3825
    assert expected_calibration_error(confidence, correct, backend=backend) == pytest.approx(expected, abs=1e-12)
    # Two bins of width 1/2: [0.25, 0.25] wrong, [0.55, 0.75, 0.75] right.
    two_bins = expected_calibration_error(torch.tensor([0.25, 0.25, 0.55, 0.75, 0.75], dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1]),
                                          bins=2, backend=backend)
    assert two_bins == pytest.approx(2 / 5 * 0.25 + 3 / 5 * (1 - 2.05 / 3), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auroc_by_hand(backend):
    # correct at 0.9 and 0.7, wrong at 0.8 and 0.6: 3 of the 4 (correct, wrong) pairs are ordered
    score = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, False])
    assert correctness_auroc(score, correct, backend=backend) == pytest.approx(0.75, abs=1e-12)
    assert correctness_auroc(torch.tensor([0.5, 0.5]), torch.tensor([True, False]), backend=backend) == pytest.approx(0.5)
    # negative scores (negative entropies) keep their order
    assert correctness_auroc(-torch.tensor([0.1, 2.0, 0.3]), torch.tensor([True, False, False]), backend=backend) == 1.0
    # undefined when every prediction is correct (or every one wrong)
    assert correctness_auroc(score, torch.ones(4, dtype=torch.bool), backend=backend) is None
    assert correctness_auroc(score, torch.zeros(4, dtype=torch.bool), backend=backend) is None


def test_summary_and_metrics_by_hand():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [0.0, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2])
    summary = summarise(probabilities, labels)
    assert summary.confidence.tolist() == [0.7, 0.5, 1.0]
    assert summary.correct.tolist() == [True, False, False]
    entropy = [0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1), 2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5), 0.0]
    assert summary.negative_entropy.tolist() == pytest.approx(entropy, abs=1e-15)
    # a zero probability of the true class is clamped: finite NLL
    clamp = math.log(torch.finfo(torch.float64).tiny)
    assert summary.true_log_prob.tolist() == pytest.approx([math.log(0.7), math.log(0.25), clamp], abs=1e-12)
    metrics = classification_metrics(summary)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.25) + clamp) / 3)
    # the correct prediction (0.7) is above one wrong one (0.5) and below the other (1.0)
    assert metrics["auroc_max_prob"] == pytest.approx(0.5) and metrics["auroc_entropy"] == pytest.approx(0.5)
    assert metrics["ece"] == pytest.approx((0.3 + 0.5 + 1.0) / 3)  # three examples, three bins
    assert set(metrics) == {"accuracy", "nll", "ece", "auroc_max_prob", "auroc_entropy"}


def test_class_probabilities():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    expected = torch.exp(logits.double()) / torch.exp(logits.double()).sum(-1, keepdim=True)
    assert torch.allclose(class_probabilities(logits), expected, rtol=0, atol=1e-15)
    binary = class_probabilities(torch.tensor([[0.0], [2.0]]))  # a binary model's one logit per example
    sigmoid = 1 / (1 + math.exp(-2.0))
    assert torch.allclose(binary, torch.tensor([[0.5, 0.5], [1 - sigmoid, sigmoid]], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_brute_force_on_random_predictions(backend, rng):
    logits = 3 * torch.randn(400, 7, generator=rng, dtype=torch.float64)
    labels = torch.randint(7, (400,), generator=rng)
    summary = summarise(torch.softmax(logits, -1), labels)
    ece = expected_calibration_error(summary.confidence, summary.correct, backend=backend)
    reference = brute_force_ece(summary.confidence, summary.correct)
    assert abs(ece - reference) < 1e-12, f"ECE {ece} vs brute force {reference}: off by {abs(ece - reference):.3g}"
    for score in (summary.confidence, summary.negative_entropy):
        auroc, reference = correctness_auroc(score, summary.correct, backend=backend), brute_force_auroc(score, summary.correct)
        assert abs(auroc - reference) < auroc_tolerance(backend, 400), f"AUROC {auroc} vs brute force {reference}: off by {abs(auroc - reference):.3g}"


@pytest.mark.skipif(calibration.default_backend() != "torchmetrics", reason="torchmetrics not installed (optional)")
def test_backends_agree_with_ties_and_close_scores(rng):
    # Scores a sigmoid would merge (negative entropies within 1e-18 of 0) and ties keep their order.
    score = torch.cat([-torch.rand(50, generator=rng, dtype=torch.float64) * 1e-17, -torch.rand(50, generator=rng, dtype=torch.float64)])
    score[::7] = score[0]
    correct = torch.rand(100, generator=rng) < 0.6
    values = {backend: correctness_auroc(score, correct, backend=backend) for backend in calibration.BACKENDS}
    assert abs(values["torchmetrics"] - values["sklearn"]) < auroc_tolerance("torchmetrics", 100), values
    assert abs(values["sklearn"] - brute_force_auroc(score, correct)) < 1e-12


def test_bin_edge_conventions():
    """A confidence of exactly 1 gets a bin of its own in torchmetrics, the last bin in scikit-learn."""
    confidence, correct = torch.tensor([1.0, 0.95]), torch.tensor([False, True])
    assert expected_calibration_error(confidence, correct, backend="sklearn") == pytest.approx(abs(0.5 - 0.975))
    if calibration.default_backend() == "torchmetrics":
        assert expected_calibration_error(confidence, correct, backend="torchmetrics") == pytest.approx(0.5 * 1 + 0.5 * 0.05)


def test_bad_input():
    with pytest.raises(ValueError, match="backend"):
        expected_calibration_error(torch.tensor([0.5]), torch.tensor([True]), backend="numpy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.tensor([1.5]), torch.tensor([True]))
    with pytest.raises(ValueError, match="equal length"):
        correctness_auroc(torch.tensor([0.5, 0.2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="labels"):
        summarise(torch.ones(3, 2) / 2, torch.tensor([0, 1]))


def test_per_example_indexing_and_concatenation():
    a = summarise(torch.tensor([[[0.6, 0.4]], [[0.2, 0.8]]], dtype=torch.float64), torch.tensor([0]))
    b = summarise(torch.tensor([[[0.3, 0.7]], [[0.9, 0.1]]], dtype=torch.float64), torch.tensor([1]))
    joined = PerExample.cat([a, b])
    assert joined.confidence.shape == (2, 2)
    assert joined[1].confidence.tolist() == [0.8, 0.9] and joined[1].correct.tolist() == [False, False]
