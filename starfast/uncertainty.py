"""How sure a mean barrier is: a bootstrap confidence interval over the models, the spread due to
the matching, and whether one mean is below another beyond both (issue 26).

- :func:`bootstrap_interval`: a mean over pairs of models is resampled by resampling the *models*
  (a pair's two ends are drawn independently, the multi-way bootstrap: every replicate draws the
  models with replacement and weighs each pair by the product of its two models' draw counts), so
  pairs sharing a model are not counted as independent draws. The interval is the percentile
  interval of the replicate means, from a fixed seed.
  The matching enters the bootstrap too: a pair whose matching kept several optima (the best and
  the next best distinct ones its restarts reached, each curve's ``matching`` entry,
  :mod:`starfast.evaluation`) takes, in each replicate, the barrier of one of them drawn
  uniformly (:func:`pair_values`), so the interval covers the models *and* which good matching
  was found.
- :func:`matching_range`: where a mean would lie had every pair been aligned by its lowest- or
  highest-barrier kept optimum: the mean of each pair's lowest and highest barrier.
- The tables show both beside each mean.
- :func:`difference_side` decides whether a mean is below or above another beyond noise: the
  bootstrap interval of the *difference*, both means recomputed on the same draws (they share
  models, e.g. the held-out ones, so their errors are correlated); the difference counts only when
  that interval excludes 0, and is "within noise" otherwise. :func:`compare` compares two fixed
  intervals (results measured before intervals existed).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0

# Per pair its barrier, or its barriers at its kept optima; and the two models of each pair.
Pairs = Tuple[Sequence[Union[float, Sequence[float]]], Sequence[Tuple[str, str]]]


def pair_values(curves: Sequence[Mapping[str, Any]], key: str, split: str) -> List[List[float]]:
    """Each curve's ``key`` barrier on ``split`` at every optimum its matching kept, the best first."""
    return [[curve[key][split]] + [optimum[key][split] for optimum in (curve.get("matching") or {}).get("optima", [])]
            for curve in curves]


def bootstrap_interval(
    values: Sequence[Union[float, Sequence[float]]], ends: Sequence[Tuple[str, str]], *, credited: Optional[Sequence[str]] = None,
    replicates: int = REPLICATES, level: float = LEVEL, seed: int = BOOTSTRAP_SEED,
) -> Optional[Dict[str, Any]]:
    """The ``level`` percentile interval of a mean of ``values`` (one per pair of models, ``ends``
    naming its two models; a pair's value may be a list, its barriers at the optima its matching
    kept) under the multi-way bootstrap over the models (module docstring).

    The statistic is the mean over pairs, or with ``credited`` (labels of models, e.g. the held-out
    ones) the mean over those models of each one's mean over the pairs it ends (the experiments'
    per-held-out means). In a replicate a model drawn c times counts c times, and a pair c_a·c_b
    times. Replicate b draws ``len(models)`` models with replacement (``numpy.random.default_rng(seed)``,
    models in sorted order, one ``integers`` call per replicate), then, if any pair has several
    values, the one each pair takes in each replicate (one ``integers(0, sizes, (replicates,
    pairs))`` call); a replicate in which the statistic is undefined (no pair, or no credited
    model in a pair, has all its models drawn) is left out (``used`` counts the others). ``None``
    for fewer than two pairs."""
    _check(values, ends, level, replicates)
    if len(values) < 2:
        return None
    models = sorted({label for pair in ends for label in pair})
    generator = np.random.default_rng(seed)
    counts = _draw_counts(generator, len(models), replicates)
    means, defined = _replicate_means(_drawn_values(generator, values, replicates), ends, credited, models, counts)
    if not defined.any():
        return None
    low, high = _percentiles(means[defined], level)
    return {"low": low, "high": high, "level": level, "replicates": replicates, "used": int(defined.sum()), "seed": seed}


def bootstrap_difference(
    first: Pairs, second: Pairs, *, credited: Optional[Sequence[str]] = None, replicates: int = REPLICATES,
    level: float = LEVEL, seed: int = BOOTSTRAP_SEED,
) -> Optional[Dict[str, Any]]:
    """The ``level`` percentile interval of (mean of ``first``) − (mean of ``second``), both means
    as :func:`bootstrap_interval` takes them and recomputed on the same draws of the models (all
    the models of both, sorted; then the values of ``first``'s pairs, then ``second``'s;
    replicates where either mean is undefined are left out). ``None`` when either has fewer than
    two pairs."""
    for values, ends in (first, second):
        _check(values, ends, level, replicates)
    if len(first[0]) < 2 or len(second[0]) < 2:
        return None
    models = sorted({label for _, ends in (first, second) for pair in ends for label in pair})
    generator = np.random.default_rng(seed)
    counts = _draw_counts(generator, len(models), replicates)
    first_values, second_values = (_drawn_values(generator, values, replicates) for values, _ in (first, second))
    first_means, first_defined = _replicate_means(first_values, first[1], credited, models, counts)
    second_means, second_defined = _replicate_means(second_values, second[1], credited, models, counts)
    defined = first_defined & second_defined
    if not defined.any():
        return None
    low, high = _percentiles(first_means[defined] - second_means[defined], level)
    return {"low": low, "high": high, "level": level, "replicates": replicates, "used": int(defined.sum()), "seed": seed}


def _check(values, ends, level: float, replicates: int) -> None:
    if len(values) != len(ends):
        raise ValueError(f"bootstrap: {len(values)} values but {len(ends)} pairs of ends")
    if not 0 < level < 1 or replicates < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1) and replicates >= 1, got {level}, {replicates}")


def _draw_counts(generator: np.random.Generator, models: int, replicates: int) -> np.ndarray:
    """``[replicates, models]``: how often each model is drawn in each replicate."""
    draws = np.stack([generator.integers(0, models, size=models) for _ in range(replicates)])
    counts = np.zeros((replicates, models))
    np.add.at(counts, (np.repeat(np.arange(replicates), models), draws.ravel()), 1.0)
    return counts


def _drawn_values(generator: np.random.Generator, values, replicates: int) -> np.ndarray:
    """``[replicates, pairs]``: each pair's value in each replicate (one of its values, drawn
    uniformly, where it has several; nothing is drawn when no pair has)."""
    options = [list(value) if isinstance(value, (list, tuple)) else [value] for value in values]
    sizes = np.array([len(option) for option in options])
    if (sizes == 1).all():
        return np.tile(np.array([option[0] for option in options], dtype=np.float64), (replicates, 1))
    table = np.full((len(options), sizes.max()), np.nan)
    for k, option in enumerate(options):
        table[k, : len(option)] = option
    choice = generator.integers(0, sizes, size=(replicates, len(options)))
    return table[np.arange(len(options)), choice]


def _replicate_means(values: np.ndarray, ends, credited, models: Sequence[str], counts: np.ndarray):
    """Each replicate's mean (see :func:`bootstrap_interval`) of ``values`` ``[replicates, pairs]``
    and whether it is defined."""
    index = {label: k for k, label in enumerate(models)}
    first = np.array([index[a] for a, _ in ends])
    second = np.array([index[b] for _, b in ends])
    replicates = counts.shape[0]
    if credited is None:
        weights = counts[:, first] * counts[:, second]
        weighted, total = (weights * values).sum(1), weights.sum(1)
    else:
        # Per credited model h: its mean over its pairs, each weighted by its other end's count;
        # then the mean over the models h, each weighted by its own count.
        weighted, total = np.zeros(replicates), np.zeros(replicates)
        for label in sorted(set(credited) & {label for pair in ends for label in pair}):
            h = index[label]
            others = np.concatenate([second[first == h], first[second == h]])
            own = np.concatenate([values[:, first == h], values[:, second == h]], axis=1)
            weights = counts[:, others]
            defined = (weights.sum(1) > 0) & (counts[:, h] > 0)
            mean = np.divide((weights * own).sum(1), weights.sum(1), out=np.zeros(replicates), where=defined)
            weighted += np.where(defined, counts[:, h] * mean, 0.0)
            total += np.where(defined, counts[:, h], 0.0)
    defined = total > 0
    return np.divide(weighted, total, out=np.zeros(replicates), where=defined), defined


def _percentiles(samples: np.ndarray, level: float) -> Tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def matching_range(
    curves: Sequence[Mapping[str, Any]], key: str, split: str, *, credited: Optional[Sequence[str]] = None,
) -> Optional[Dict[str, float]]:
    """``{"low", "high"}``: the mean (as :func:`bootstrap_interval` takes it, over pairs or over the
    ``credited`` models) of each pair's lowest and highest ``key`` (``loss_barrier`` or
    ``acc_barrier``) on ``split`` over the optima its matching kept (the curve's own barrier and
    those of ``curve["matching"]["optima"]``); ``None`` when no curve kept another optimum."""
    if not curves or not any((curve.get("matching") or {}).get("optima") for curve in curves):
        return None
    barriers = pair_values(curves, key, split)
    lows, highs = [min(values) for values in barriers], [max(values) for values in barriers]
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


def difference_side(first: Pairs, second: Pairs, *, credited: Optional[Sequence[str]] = None) -> Tuple[str, Optional[Tuple[float, float]]]:
    """``("below" | "above" | "within noise", interval)``: whether the mean of ``first`` is below
    or above that of ``second`` beyond noise, from :func:`bootstrap_difference` (module
    docstring), and that interval (``None`` when too few pairs for a bootstrap: the means, the
    best optima's, are then compared as they are)."""
    interval = bootstrap_difference(first, second, credited=credited)
    if interval is None:
        best = lambda pairs: [value[0] if isinstance(value, (list, tuple)) else value for value in pairs[0]]  # noqa: E731
        mean = lambda pairs: (float(np.mean(best(pairs))) if credited is None  # noqa: E731
                              else per_model_mean(best(pairs), pairs[1], credited))
        difference = mean(first) - mean(second)
        return compare((difference, difference), (0.0, 0.0)), None
    return compare((interval["low"], interval["high"]), (0.0, 0.0)), (interval["low"], interval["high"])


def compare(first: Tuple[float, float], second: Tuple[float, float]) -> str:
    """``"below"`` when the interval ``first`` lies entirely below ``second``, ``"above"`` when
    entirely above, ``"within noise"`` when they overlap."""
    if first[1] < second[0]:
        return "below"
    if first[0] > second[1]:
        return "above"
    return "within noise"
