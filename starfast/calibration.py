"""Uncertainty metrics of a classifier's predictive distribution (the paper's Figure 4).

This module owns

- :func:`class_probabilities`: model outputs as class-probability vectors in float64 (softmax of
  ``C`` logits; a binary model's single logit ``z`` becomes ``[1 - σ(z), σ(z)]``);
- :class:`PerExample` / :func:`summarise`: the per-example quantities every metric here needs
  (top-label confidence, negative entropy, correctness, log-probability of the true class). They
  are ``[..., N]`` tensors, so the predictions of ``S`` nested ensembles are kept as ``[S, N]``,
  never as ``[S, N, C]`` probabilities;
- :func:`expected_calibration_error`: top-label ECE with equal-width bins (15 by default);
- :func:`correctness_auroc`: the AUROC of telling correct from wrong predictions by a confidence
  score (max probability, or negative entropy);
- :func:`classification_metrics`: accuracy, NLL, ECE and both AUROCs of one set of predictions.

The ECE and the AUROCs come from a maintained library: torchmetrics when it is importable
(``binary_calibration_error`` on (confidence, correct), which is the top-label ECE, and
``binary_auroc``), otherwise scikit-learn (``calibration_curve`` and ``roc_auc_score``); pass
``backend=`` to choose. The two agree except for a confidence lying exactly on a bin edge:
torchmetrics bins ``[lo, hi)`` and gives a confidence of exactly 1 a bin of its own, scikit-learn
bins ``(lo, hi]`` with 1 in the last bin. torchmetrics computes the ROC curve in float32 (its
AUROC is good to about 1e-7), scikit-learn in float64. Accuracy and NLL are plain means.

NLL clamps the true class's probability at the smallest normal float64 (so it is at most about
708 per example, never infinite). An AUROC is undefined (``None``) when every prediction is
correct, or every one is wrong.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Dict, Optional

import torch

BACKENDS = ("torchmetrics", "sklearn")
ECE_BINS = 15


def default_backend() -> str:
    """``"torchmetrics"`` when it is installed, else ``"sklearn"``."""
    return "torchmetrics" if importlib.util.find_spec("torchmetrics") is not None else "sklearn"


def backend_version(backend: Optional[str] = None) -> str:
    """E.g. ``"torchmetrics 1.9.0"``: what computed the metrics (recorded with results)."""
    backend = _checked_backend(backend)
    module = importlib.import_module(backend)
    return f"{backend} {module.__version__}"


def class_probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """``outputs [..., C]`` logits as float64 probabilities ``[..., C]``; ``C = 1`` is a binary
    model's single logit ``z``, which becomes ``[1 - σ(z), σ(z)]``."""
    logits = outputs.double()
    if logits.shape[-1] > 1:
        return torch.softmax(logits, dim=-1)
    positive = torch.sigmoid(logits)
    return torch.cat([1.0 - positive, positive], dim=-1)


@dataclass
class PerExample:
    """Per-example quantities of predictions, each ``[..., N]``.

    ``confidence``: the largest class probability; ``negative_entropy``: ``Σ_c p_c log p_c``
    (≤ 0; higher is more confident); ``correct``: the most probable class is the label;
    ``true_log_prob``: ``log p_label`` (clamped, see the module docstring).
    """

    confidence: torch.Tensor
    negative_entropy: torch.Tensor
    correct: torch.Tensor
    true_log_prob: torch.Tensor

    def __getitem__(self, index) -> "PerExample":
        """The same fields indexed over the leading dimensions, e.g. ``summary[s]`` for one ensemble."""
        return PerExample(self.confidence[index], self.negative_entropy[index], self.correct[index], self.true_log_prob[index])

    @staticmethod
    def cat(parts, dim: int = -1) -> "PerExample":
        """Concatenate summaries of consecutive batches along the example axis."""
        parts = list(parts)
        return PerExample(*(torch.cat([getattr(part, name) for part in parts], dim=dim) for name in _FIELDS))


_FIELDS = ("confidence", "negative_entropy", "correct", "true_log_prob")


def summarise(probabilities: torch.Tensor, labels: torch.Tensor) -> PerExample:
    """``probabilities [..., N, C]`` (rows summing to one) and integer ``labels [N]`` as a
    :class:`PerExample` of shape ``[..., N]``."""
    if probabilities.dim() < 2 or probabilities.shape[-2] != labels.shape[0] or labels.dim() != 1:
        raise ValueError(
            f"probabilities must be [..., N, C] and labels [N]; got {list(probabilities.shape)} and {list(labels.shape)}"
        )
    probabilities = probabilities.double()
    confidence, predicted = probabilities.max(dim=-1)
    labels = labels.to(probabilities.device).long()
    true_prob = probabilities.gather(-1, labels.expand(probabilities.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return PerExample(
        confidence=confidence,
        negative_entropy=torch.xlogy(probabilities, probabilities).sum(-1),
        correct=predicted == labels,
        true_log_prob=true_prob.clamp_min(torch.finfo(torch.float64).tiny).log(),
    )


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS, backend: Optional[str] = None
) -> float:
    """Top-label ECE: ``Σ_b (n_b / N) |accuracy_b - mean confidence_b|`` over ``bins`` equal-width
    bins of the confidence (see the module docstring for the bin edges of each backend)."""
    backend = _checked_backend(backend)
    confidence, correct = _checked_pair(confidence, correct, "confidence")
    if not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise ValueError("confidence must lie in [0, 1] (probabilities, not logits)")
    if backend == "torchmetrics":
        from torchmetrics.functional.classification import binary_calibration_error

        return float(binary_calibration_error(confidence, correct.long(), n_bins=bins, norm="l1"))
    import numpy as np
    from sklearn.calibration import calibration_curve

    confidence_np, correct_np = confidence.cpu().numpy(), correct.cpu().numpy().astype(np.int64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # calibration_curve returns the per-bin means of the non-empty bins but not their sizes; these
    # are the sizes of the same bins (its rule: searchsorted on the inner edges).
    sizes = np.bincount(np.searchsorted(edges[1:-1], confidence_np), minlength=bins)
    accuracy, mean_confidence = calibration_curve(correct_np, confidence_np, n_bins=bins, strategy="uniform", pos_label=1)
    return float(np.sum(sizes[sizes > 0] / len(confidence_np) * np.abs(accuracy - mean_confidence)))


def correctness_auroc(score: torch.Tensor, correct: torch.Tensor, backend: Optional[str] = None) -> Optional[float]:
    """AUROC of ``score`` (higher = more confident) separating correct from wrong predictions;
    ``None`` when only one of the two occurs."""
    backend = _checked_backend(backend)
    score, correct = _checked_pair(score, correct, "score")
    hits = int(correct.sum())
    if hits in (0, correct.numel()):
        return None
    if backend == "torchmetrics":
        from torchmetrics.functional.classification import binary_auroc

        # binary_auroc applies a sigmoid to scores outside [0, 1] (a negative entropy is <= 0),
        # which can merge close scores; the AUROC depends only on the order, so pass the dense
        # ranks scaled into [0, 1] instead: same order, same ties, exactly.
        ranks = torch.unique(score, return_inverse=True)[1].double()
        scaled = ranks / max(1.0, float(ranks.max()))
        return float(binary_auroc(scaled, correct.long()))
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(correct.cpu().numpy(), score.cpu().numpy()))


def classification_metrics(
    summary: PerExample, bins: int = ECE_BINS, backend: Optional[str] = None
) -> Dict[str, Optional[float]]:
    """``accuracy``, ``nll``, ``ece``, ``auroc_max_prob`` and ``auroc_entropy`` (negative entropy
    as the confidence) of one set of predictions (a 1-D :class:`PerExample`)."""
    if summary.confidence.dim() != 1:
        raise ValueError(f"classification_metrics takes one set of predictions [N], got {list(summary.confidence.shape)}")
    return {
        "accuracy": float(summary.correct.double().mean()),
        "nll": float(-summary.true_log_prob.mean()),
        "ece": expected_calibration_error(summary.confidence, summary.correct, bins, backend),
        "auroc_max_prob": correctness_auroc(summary.confidence, summary.correct, backend),
        "auroc_entropy": correctness_auroc(summary.negative_entropy, summary.correct, backend),
    }


def _checked_backend(backend: Optional[str]) -> str:
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"metrics backend must be one of {BACKENDS}, got {backend!r}")
    if importlib.util.find_spec(backend) is None:
        package = "scikit-learn" if backend == "sklearn" else backend
        raise ImportError(f"the {backend} metrics backend needs `pip install {package}`")
    return backend


def _checked_pair(score: torch.Tensor, correct: torch.Tensor, name: str):
    score = torch.as_tensor(score).double().flatten().cpu()
    correct = torch.as_tensor(correct).flatten().cpu()
    if score.numel() != correct.numel() or score.numel() == 0:
        raise ValueError(f"{name} and correct must be non-empty and of equal length, got {score.numel()} and {correct.numel()}")
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return score, correct.bool()

