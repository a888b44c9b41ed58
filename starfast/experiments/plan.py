"""What an experiment asks for, as data: run directories (cells), star sets and sweep points.

An experiment of :mod:`starfast.experiments.catalog` describes itself as a list of :class:`Cell`:
each cell is one run directory (:class:`RunSpec`: model, dataset, recipes and how many source and
held-out models it must hold) with the :class:`Point` of the sweep measured in it. A point names
a :class:`StarSet` (stars trained on the first ``sources`` sources with given Starlight options),
the held-out models measured against the stars, the regular–regular reference pairs, the
evaluation settings, and optionally a :class:`Perturbation` of the first star (Table 10).

Nothing here trains or reads anything; :mod:`starfast.experiments.cells` executes a cell. Names
are derived from the settings, so that two experiments asking for the same models or stars get the
same run directory and star set and reuse them: a variant run directory is named by what differs
from the experiment's base run (``width=48``, ``optimizer=adam``), a star set by its number of
sources, its epochs and its Starlight options that differ from the defaults (``z0010-e90``,
``z0010-e90-t_sampling=beta``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from starfast.evaluation import EvaluationConfig
from starfast.pipeline import ExtraSet
from starfast.recipes import Recipe
from starfast.starlight import StarlightOptions


def spelled(value: Any) -> str:
    """A setting or sweep value as names and listings write it: ``0.001``, ``width=48``."""
    if isinstance(value, tuple):
        return f"{value[0]}={spelled(value[1])}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class RunSpec:
    """A run directory's identity (``arch``, ``arch_kw``, ``dataset``, ``recipe``) and the models it
    must hold (source seeds ``0..sources-1``, held-out seeds ``1000..1000+heldout-1``, and the
    extra held-out sets ``extra_sets`` trained with recipes of their own); stars train with
    ``star_recipe``."""

    arch: str
    dataset: str
    recipe: Recipe
    star_recipe: Recipe
    arch_kw: Tuple[Tuple[str, Any], ...] = ()
    sources: int = 0
    heldout: int = 0
    extra_sets: Tuple[ExtraSet, ...] = ()

    def slug(self, base: "RunSpec") -> str:
        """``""`` for the base run's model and recipes, else what differs, e.g. ``width=48``."""
        parts = [] if self.arch == base.arch else [self.arch]
        ours, theirs = dict(self.arch_kw), dict(base.arch_kw)
        parts += [f"{key}={spelled(value)}" for key, value in sorted(ours.items()) if theirs.get(key) != value]
        parts += [f"no-{key}" for key in sorted(set(theirs) - set(ours))]
        for name, recipe, other in (("", self.recipe, base.recipe), ("star-", self.star_recipe, base.star_recipe)):
            mine, base_values = recipe.to_dict(), other.to_dict()
            parts += [f"{name}{key}={spelled(value)}" for key, value in mine.items() if base_values[key] != value
                      and not isinstance(value, list)]
        if self.dataset != base.dataset:
            parts.insert(0, self.dataset)
        return "_".join(parts)


@dataclass(frozen=True)
class StarSet:
    """``seeds`` stars trained by Starlight on the first ``sources`` sources with ``options``."""

    sources: int
    seeds: int
    options: StarlightOptions = field(default_factory=StarlightOptions)

    def name(self, recipe: Recipe) -> str:
        """The folder name: sources, epochs and the options that differ from the defaults."""
        defaults = StarlightOptions().to_dict()
        changed = [f"{key}={spelled(value)}" for key, value in self.options.to_dict().items() if defaults.get(key) != value]
        return "-".join([f"z{self.sources:04d}", f"e{recipe.epochs}", *changed])


@dataclass(frozen=True)
class Perturbation:
    """``samples`` points on the sphere of radius ``radius`` around the first star (Table 10)."""

    radius: float
    samples: int = 3


@dataclass(frozen=True)
class Point:
    """One point of a sweep: ``value`` on the sweep axis (``label`` as shown), the stars measured
    (``star_heldout`` against the first ``heldout`` held-out models), and the regular–regular
    reference: the pairs among those held-out models (``reference_heldout_pairs``) and each of them
    with the first ``reference_sources`` sources. With ``heldout_set``, the held-out models are
    those of the run's extra held-out set of that name (e.g. Adam solutions, Figure 7)."""

    label: str
    value: Any
    stars: StarSet
    heldout: int
    reference_sources: int = 2
    reference_heldout_pairs: bool = True
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    perturbation: Optional[Perturbation] = None
    heldout_set: Optional[str] = None

    def describe(self) -> Dict[str, Any]:
        """JSON-ready settings of the point (what results.json records beside its numbers)."""
        return {"label": self.label, "value": self.value, "star_sources": self.stars.sources, "star_seeds": self.stars.seeds,
                "star_options": self.stars.options.to_dict(), "heldout": self.heldout, "heldout_set": self.heldout_set,
                "reference_sources": self.reference_sources, "reference_heldout_pairs": self.reference_heldout_pairs,
                "evaluation": asdict(self.evaluation),
                "perturbation": asdict(self.perturbation) if self.perturbation else None}


@dataclass(frozen=True)
class Cell:
    """One run directory of a sweep and the points measured in it; ``key`` is its variant slug
    (``""`` for the experiment's base run directory)."""

    key: str
    run: RunSpec
    points: Tuple[Point, ...]
