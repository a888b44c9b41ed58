"""How sure a mean barrier is: a bootstrap confidence interval over the models, the spread due to
the matching, and the comparison of two means against both (issue 26).

- :func:`bootstrap_interval`: a mean over pairs of models is resampled by resampling the *models*
  (a pair's two ends are drawn independently, the multi-way bootstrap: every replicate draws the
  models with replacement and weighs each pair by the product of its two models' draw counts), so
  pairs sharing a model are not counted as independent draws. The interval is the percentile
  interval of the replicate means, from a fixed seed.
- :func:`matching_range`: where a mean would lie had every pair been aligned by another of the good
  optima the matching's restarts reached (each curve's ``matching`` entry, :mod:`starfast.evaluation`):
  the mean over pairs of each pair's lowest and highest barrier over those optima.
- :func:`noise_interval` joins the two (the bootstrap interval widened by the matching's range on
  each side), and :func:`compare` says whether one mean is below, above or within noise of another:
  a difference counts only when the two intervals do not overlap.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0


def bootstrap_interval(
    values: Sequence[float], ends: Sequence[Tuple[str, str]], *, credited: Optional[Sequence[str]] = None,
    replicates: int = REPLICATES, level: float = LEVEL, seed: int = BOOTSTRAP_SEED,
) -> Optional[Dict[str, Any]]:
    """The ``level`` percentile interval of a mean of ``values`` (one per pair of models, ``ends``
    naming its two models) under the multi-way bootstrap over the models (module docstring).

    The statistic is the mean over pairs, or with ``credited`` (labels of models, e.g. the held-out
    ones) the mean over those models of each one's mean over the pairs it ends (the experiments'
    per-held-out means). In a replicate a model drawn c times counts c times, and a pair c_a·c_b
    times. Replicate b draws ``len(models)`` models with replacement (``numpy.random.default_rng(seed)``,
    models in sorted order, one ``integers`` call per replicate); a replicate in which the statistic
    is undefined (no pair, or no credited model in a pair, has all its models drawn) is left out
    (``used`` counts the others). ``None`` for fewer than two pairs."""
    if len(values) != len(ends):
        raise ValueError(f"bootstrap_interval: {len(values)} values but {len(ends)} pairs of ends")
    if len(values) < 2:
        return None
    if not 0 < level < 1 or replicates < 1:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1) and replicates >= 1, got {level}, {replicates}")
    values = np.asarray(values, dtype=np.float64)
    models = sorted({label for pair in ends for label in pair})
    index = {label: k for k, label in enumerate(models)}
    first = np.array([index[a] for a, _ in ends])
    second = np.array([index[b] for _, b in ends])
    generator = np.random.default_rng(seed)
    draws = np.stack([generator.integers(0, len(models), size=len(models)) for _ in range(replicates)])
    counts = np.zeros((replicates, len(models)))
    np.add.at(counts, (np.repeat(np.arange(replicates), len(models)), draws.ravel()), 1.0)
    if credited is None:
        total = counts[:, first] * counts[:, second]
        weighted = total @ values
        total = total.sum(1)
    else:
        # Per credited model h: its mean over its pairs, each weighted by its other end's count;
        # then the mean over the models h, each weighted by its own count.
        weighted, total = np.zeros(replicates), np.zeros(replicates)
        for label in sorted(set(credited) & set(models)):
            h = index[label]
            others = np.concatenate([second[first == h], first[second == h]])
            own = np.concatenate([values[first == h], values[second == h]])
            weights = counts[:, others]
            defined = (weights.sum(1) > 0) & (counts[:, h] > 0)
            mean = np.divide(weights @ own, weights.sum(1), out=np.zeros(replicates), where=defined)
            weighted += np.where(defined, counts[:, h] * mean, 0.0)
            total += np.where(defined, counts[:, h], 0.0)
    used = total > 0
    if not used.any():
        return None
    means = weighted[used] / total[used]
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"low": float(low), "high": float(high), "level": level, "replicates": replicates, "used": int(used.sum()),
            "seed": seed}


def matching_range(
    curves: Sequence[Mapping[str, Any]], key: str, split: str, *, credited: Optional[Sequence[str]] = None,
) -> Optional[Dict[str, float]]:
    """``{"low", "high"}``: the mean (as :func:`bootstrap_interval` takes it, over pairs or over the
    ``credited`` models) of each pair's lowest and highest ``key`` (``loss_barrier`` or
    ``acc_barrier``) on ``split`` over the optima its matching kept (the curve's own barrier and
    those of ``curve["matching"]["optima"]``); ``None`` when no curve kept another optimum."""
    if not curves or not any((curve.get("matching") or {}).get("optima") for curve in curves):
        return None
    lows, highs = [], []
    for curve in curves:
        barriers = [curve[key][split]] + [optimum[key][split] for optimum in (curve.get("matching") or {}).get("optima", [])]
        lows.append(min(barriers))
        highs.append(max(barriers))
    if credited is None:
        return {"low": float(np.mean(lows)), "high": float(np.mean(highs))}
    ends = [(curve["a"], curve["b"]) for curve in curves]
    return {"low": per_model_mean(lows, ends, credited), "high": per_model_mean(highs, ends, credited)}


def per_model_mean(values: Sequence[float], ends: Sequence[Tuple[str, str]], credited: Sequence[str]) -> float:
    """The mean over the ``credited`` models (those ending a pair) of each one's mean value over its pairs."""
    means = []
    for label in credited:
        own = [value for value, pair in zip(values, ends) if label in pair]
        if own:
            means.append(float(np.mean(own)))
    return float(np.mean(means))


def noise_interval(mean: float, bootstrap: Optional[Mapping[str, Any]], matching: Optional[Mapping[str, float]]) -> Tuple[float, float]:
    """The bootstrap interval (the mean itself without one) widened on each side by how far the
    matching's range reaches from the mean."""
    low, high = (bootstrap["low"], bootstrap["high"]) if bootstrap else (mean, mean)
    if matching:
        low -= max(0.0, mean - matching["low"])
        high += max(0.0, matching["high"] - mean)
    return low, high


def compare(first: Tuple[float, float], second: Tuple[float, float]) -> str:
    """``"below"`` when the interval ``first`` lies entirely below ``second``, ``"above"`` when
    entirely above, ``"within noise"`` when they overlap."""
    if first[1] < second[0]:
        return "below"
    if first[0] > second[1]:
        return "above"
    return "within noise"
