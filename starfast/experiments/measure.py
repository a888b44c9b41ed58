"""Measuring one sweep point in a run directory: its star–held-out and regular–regular barriers.

:func:`measure_point` loads the point's stars (or points on spheres around the first star, for
Table 10), held-out and reference models, measures every pair with
:func:`starfast.evaluation.measure_pairs` and summarises them (:func:`summarise_pairs`): per split,
the barriers of all pairs (mean, std, min, max: Table 8's columns) and, as the paper's error bars,
the mean barrier of each held-out model over its pairs, summarised over the held-out models.

Every curve is kept in ``RUN/experiments/curves/<key>.json`` (:class:`StoredCurves`), keyed by the
bytes of both models' files and the evaluation settings that differ from the defaults, so a pair measured once, by any
experiment, is never measured again, and an interrupted point resumes at its next pair.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import torch

from starfast.evaluation import EvaluationConfig, LoadedModel, end_point_losses, load_models, load_stars, measure_pairs, summarise
from starfast.files import bytes_digest, read_json, write_json
from starfast.flat import ParamSpace
from starfast.experiments.plan import Perturbation, Point
from starfast.progress import progress_bar
from starfast.rundir import RunDir, RunDirError, extra_role, extra_seeds, heldout_seeds, source_seeds
from starfast.uncertainty import bootstrap_interval, matching_range, pair_values

SPLITS = ("train", "test")
PERTURBATION_SEED = 4000
_ABSENT = object()  # sample k of radius r draws its direction from seed PERTURBATION_SEED + k


class StoredCurves:
    """Curves in one folder, one JSON file per (anchor, partner, evaluation settings)."""

    def __init__(self, run: RunDir, config: EvaluationConfig):
        self.folder = run.curves_folder
        # Only the settings that differ from the defaults: a setting added later (at its default,
        # which measures as before) does not make the stored curves unreachable.
        defaults = asdict(EvaluationConfig())
        # Except the matching's restarts: every curve stored before they existed was matched from one start.
        defaults["match_restarts"] = 1
        self.settings = {key: value for key, value in asdict(config).items() if defaults.get(key, _ABSENT) != value}
        self.measured = 0  # curves added by this store (not found on disk)

    def _path(self, anchor: LoadedModel, partner: LoadedModel):
        key = json.dumps([anchor.digest, partner.digest, self.settings], sort_keys=True)
        return self.folder / f"{bytes_digest(key.encode())[:40]}.json"

    def get(self, anchor: LoadedModel, partner: LoadedModel) -> Optional[Dict[str, Any]]:
        path = self._path(anchor, partner)
        return read_json(path) if path.exists() else None

    def add(self, anchor: LoadedModel, partner: LoadedModel, curve: Dict[str, Any]) -> None:
        write_json(self._path(anchor, partner), curve)
        self.measured += 1


def perturbed(star: LoadedModel, perturbation: Perturbation) -> List[LoadedModel]:
    """``perturbation.samples`` points ``θ* + ε·r`` with ``r`` uniform on the unit sphere (a
    normalised Gaussian of a fixed seed per sample) and ``ε`` the radius. They carry no BatchNorm
    statistics: the barrier recomputes them as for the interior points."""
    points = []
    for sample in range(perturbation.samples):
        generator = torch.Generator().manual_seed(PERTURBATION_SEED + sample)
        direction = torch.randn(star.row.shape, generator=generator, dtype=torch.float64)
        direction = (direction / direction.norm()).to(dtype=star.row.dtype, device=star.row.device)
        label = f"{star.label} + {perturbation.radius:g}·r{sample}"
        identity = f"{star.digest}|{perturbation.radius!r}|{PERTURBATION_SEED + sample}"
        points.append(LoadedModel(label, star.row + perturbation.radius * direction, {}, bytes_digest(identity.encode()),
                                  seed=star.seed, sources=star.sources))
    return points


def measure_point(run: RunDir, dataset: Any, point: Point, star_set: str, *, device: torch.device,
                  progress: bool = True) -> Dict[str, Any]:
    """The point's curves (``curves[KIND]``, KIND ``star_heldout`` or ``regular_regular``) and their
    summaries (see :func:`summarise_pairs`), the anchors' and regular models' own losses, and the
    star's norm (the scale a perturbation radius compares with)."""
    skeleton = run.model_spec().build().to(device)
    space = ParamSpace(skeleton)
    if point.heldout_set is None:
        heldout = load_models(run, "heldout", space, device, heldout_seeds(point.heldout))
    else:
        heldout = load_models(run, extra_role(point.heldout_set), space, device, extra_seeds(point.heldout))
    references = load_models(run, "sources", space, device, source_seeds(point.reference_sources))
    stars = load_stars(run, space, device, star_set)[: point.stars.seeds]
    if len(stars) < point.stars.seeds:
        raise RunDirError(f"{run.path / star_set} holds {len(stars)} finished stars, not the {point.stars.seeds} asked for")
    anchors = perturbed(stars[0], point.perturbation) if point.perturbation else stars
    pairs = {
        "star_heldout": [(anchor, model) for anchor in anchors for model in heldout],
        "regular_regular": (list(itertools.combinations(heldout, 2)) if point.reference_heldout_pairs else [])
        + [(model, source) for model in heldout for source in references],
    }
    store = StoredCurves(run, point.evaluation)
    with progress_bar(total=sum(map(len, pairs.values())), desc=f"barriers ({point.label})", unit="pair",
                      enabled=progress, nested=True) as bar:
        curves = {kind: measure_pairs(items, store, skeleton, dataset, point.evaluation, bar=bar, progress=progress)
                  for kind, items in pairs.items()}
    heldout_labels = [model.label for model in heldout]
    ends = end_point_losses(itertools.chain.from_iterable(curves.values()))
    own = {label: dict(zip(SPLITS, losses)) for label, losses in ends.items()}
    return {
        **point.describe(),
        "star_set": star_set,
        "star_norm": summarise([float(star.row.double().norm()) for star in stars[: 1 if point.perturbation else None]]),
        "star_loss": {split: summarise([own[anchor.label][split] for anchor in anchors]) for split in SPLITS},
        "regular_loss": {split: summarise([own[label][split] for label in sorted({c[end] for c in curves["regular_regular"]
                                                                                  for end in ("a", "b")})])
                         for split in SPLITS},
        "barriers": {kind: summarise_pairs(kind_curves, heldout_labels) for kind, kind_curves in curves.items()},
        "curves": curves,
        "measured_now": store.measured,
    }


def summarise_pairs(curves: Sequence[Dict[str, Any]], heldout: Sequence[str]) -> Dict[str, Any]:
    """Per split: ``pairs`` (every pair's loss barrier: mean, std, min, max), ``per_heldout`` (each
    held-out model's mean over the pairs it ends) and ``over_heldout`` (those means summarised:
    the paper's error bars over held-out models, with ``ci``, the bootstrap interval of their mean
    over the models, and ``matching``, its range over the matching's optima, see
    :mod:`starfast.uncertainty`); ``accuracy_pairs`` for the accuracy barriers."""
    summary: Dict[str, Any] = {}
    for split in SPLITS:
        per_model: Dict[str, List[float]] = {label: [] for label in heldout}
        for curve in curves:
            for end in ("a", "b"):
                if curve[end] in per_model:
                    per_model[curve[end]].append(curve["loss_barrier"][split])
        means = {label: sum(values) / len(values) for label, values in per_model.items() if values}
        over_heldout = summarise(list(means.values()))
        if over_heldout is not None:
            ends = [(curve["a"], curve["b"]) for curve in curves]
            over_heldout["ci"] = bootstrap_interval(pair_values(curves, "loss_barrier", split), ends, credited=heldout)
            over_heldout["matching"] = matching_range(curves, "loss_barrier", split, credited=heldout)
        summary[split] = {
            "pairs": summarise([curve["loss_barrier"][split] for curve in curves]),
            "accuracy_pairs": summarise([curve["acc_barrier"][split] for curve in curves]),
            "per_heldout": means,
            "over_heldout": over_heldout,
        }
    return summary

