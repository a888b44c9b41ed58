"""The paper's experiments (Sections 4–5, Appendices C–D) as declarative descriptions.

Each :class:`Experiment` names the figure or table it reproduces, its sweep axis and default
values per preset, how many models and stars it needs, and how its sweep becomes cells
(:class:`~starfast.experiments.plan.Cell`: one per run directory) of points. Presets
(:data:`PRESETS`): ``quick`` is the bundled ``digits`` data with the main job's MLP (3 × 24) and
recipes, a few minutes per experiment on a 2-core CPU; ``paper`` is CIFAR-10 with ResNet-18 (and
WideResNets for Figure 3) and the recipes of Appendix B, what a GPU user runs.

Experiments sharing a model and recipe share its run directory, so their models and stars are
trained once: e.g. ``grid``, ``t-sampling``, ``perturbation``, ``optimizer`` and ``matcher`` all
measure the stars trained on the first 10 sources (star set ``z0010-e<epochs>``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from starfast import models
from starfast.evaluation import EvaluationConfig
from starfast.experiments.plan import Cell, Perturbation, Point, RunSpec, StarSet
from starfast.pipeline import ExtraSet
from starfast.recipes import ADAPTIVE_DEFAULT_LR, Recipe, default_star_epochs, main_job_arch_kw, resolve
from starfast.starlight import StarlightOptions


_UNSET = object()


@dataclass(frozen=True)
class Preset:
    """The base model, data and recipes of a preset, and what it stands for (``note``, with the
    epochs filled in)."""

    dataset: str
    arch: str
    arch_kw: Tuple[Tuple[str, Any], ...]
    note: str


PRESETS: Dict[str, Preset] = {
    "quick": Preset("digits", "mlp", tuple(sorted(main_job_arch_kw("mlp", "digits").items())),
                    "quick preset: bundled digits, MLP 3 × 24 (the main job's model), digits recipe (SGD, {epochs} "
                    "epochs), stars {star_epochs} epochs; the paper's CIFAR-10 ResNet-18 numbers are not expected, only "
                    "its trends"),
    "paper": Preset("cifar10", "resnet18", (), "paper preset: CIFAR-10, ResNet-18, the recipes of Appendix B ({epochs} "
                                                "epochs, stars {star_epochs})"),
}


@dataclass(frozen=True)
class Settings:
    """A preset with the command line's overrides: what an experiment's cells are built from."""

    preset: str
    dataset: str
    arch: str
    arch_kw: Tuple[Tuple[str, Any], ...]
    recipe: Recipe
    star_recipe: Recipe
    ce_weight: float = 0.0
    note: str = ""

    def run(self, *, sources: int, heldout: int, arch_kw: Optional[Mapping[str, Any]] = None,
            recipe: Optional[Mapping[str, Any]] = None) -> RunSpec:
        """The run directory holding ``sources`` and ``heldout`` models, with ``arch_kw`` merged into
        the preset's model options (those equal to the architecture's defaults left out, so that the
        same model always has the same run directory) and ``recipe`` overriding the regular recipe."""
        defaults = models.options(self.arch)
        options = {key: value for key, value in {**dict(self.arch_kw), **dict(arch_kw or {})}.items()
                   if defaults.get(key, _UNSET) != value}  # a default spelled out is the same model
        regular = replace(self.recipe, **recipe) if recipe else self.recipe
        return RunSpec(self.arch, self.dataset, regular, self.star_recipe, tuple(sorted(options.items())), sources, heldout)


def settings_for(preset: str, *, dataset: Optional[str] = None, arch: Optional[str] = None,
                 arch_kw: Optional[Mapping[str, Any]] = None, epochs: Optional[int] = None, star_epochs: Optional[int] = None,
                 ce_weight: float = 0.0) -> Settings:
    """The preset ``preset`` with overrides (``None``: the preset's); the recipes are those of
    :func:`starfast.recipes.resolve` for the architecture and dataset, stars training
    :func:`~starfast.recipes.default_star_epochs` unless ``star_epochs`` is given."""
    base = PRESETS[preset]
    dataset, arch = dataset or base.dataset, arch or base.arch
    if arch_kw:
        options = tuple(sorted(arch_kw.items()))
    elif (dataset, arch) == (base.dataset, base.arch):
        options = base.arch_kw
    else:
        options = tuple(sorted(main_job_arch_kw(arch, dataset).items()))
    recipe = resolve(arch, dataset, {"epochs": epochs})
    star_recipe = resolve(arch, dataset, {"epochs": star_epochs or default_star_epochs(dataset, recipe.epochs)})
    note = base.note if (dataset, arch, options) == (base.dataset, base.arch, base.arch_kw) else (
        f"{preset} preset with {dataset}, {arch} {dict(options) or ''}".rstrip() + ", {epochs} epochs, stars {star_epochs}")
    note = note.replace("{epochs}", str(recipe.epochs)).replace("{star_epochs}", str(star_recipe.epochs))
    return Settings(preset, dataset, arch, options, recipe, star_recipe, ce_weight, note)


CellBuilder = Callable[[Settings, Sequence[Any], Mapping[str, int]], List[Cell]]


@dataclass(frozen=True)
class Experiment:
    """One figure or table: ``values[preset]`` are its sweep's default values (``parse`` reads
    ``--values``), ``sizes[preset]`` its counts of sources, held-out models and star seeds,
    ``cells`` builds its cells. ``claims`` are what the verdict checks: ``below`` (star–held-out
    below regular–regular at every point), ``falls`` (star–held-out falls along the axis),
    ``separated`` (the largest star–held-out pair below the smallest regular–regular pair, Table 8).
    ``figure``: ``sweep`` (barrier against the axis), ``scatter`` (Figure 3: star–held-out against
    regular–regular), ``curves`` (Figure 7: test loss along the paths). ``analogue[preset]`` says what a preset substitutes for the paper's setting;
    ``model[preset]``, the architecture and options used instead of the preset's;
    ``star_epochs_factor[preset]``, the stars' epochs as a multiple of the regular ones where the
    preset's rule does not fit the sweep; ``controls``, sweep
    values that are not part of the paper's claim (reported beside the verdict: no matching at all,
    or t fixed at 0.5, which the paper reports as giving a much worse star)."""

    name: str
    paper: str
    summary: str
    axis: str
    parse: Callable[[str], Any]
    values: Mapping[str, Tuple[Any, ...]]
    sizes: Mapping[str, Mapping[str, int]]
    cells: CellBuilder
    claims: Tuple[str, ...] = ("below",)
    figure: str = "sweep"
    analogue: Mapping[str, str] = field(default_factory=dict)
    paper_numbers: str = ""
    model: Mapping[str, Tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    controls: Tuple[Any, ...] = ()
    star_epochs_factor: Mapping[str, int] = field(default_factory=dict)

    def settings(self, preset: str, *, arch: Optional[str] = None, arch_kw: Optional[Mapping[str, Any]] = None,
                 epochs: Optional[int] = None, star_epochs: Optional[int] = None, **overrides: Any) -> Settings:
        """:func:`settings_for` the preset, with this experiment's own model for it (``model``)
        unless ``arch`` or ``arch_kw`` is given, and its stars trained ``star_epochs_factor[preset]``
        times the regular epochs unless ``star_epochs`` is given."""
        if arch is None and not arch_kw and preset in self.model:
            arch, arch_kw = self.model[preset][0], dict(self.model[preset][1])
        settings = settings_for(preset, arch=arch, arch_kw=arch_kw, epochs=epochs, star_epochs=star_epochs, **overrides)
        if star_epochs is None and preset in self.star_epochs_factor:
            factor = self.star_epochs_factor[preset]
            settings = settings_for(preset, arch=arch, arch_kw=arch_kw, epochs=epochs,
                                    star_epochs=factor * settings.recipe.epochs, **overrides)
        return settings


def _one_run(points: Callable[[Settings, Any, Mapping[str, int]], Point]) -> CellBuilder:
    """A sweep over points of one run directory, the preset's model: one cell."""

    def cells(settings: Settings, values: Sequence[Any], sizes: Mapping[str, int]) -> List[Cell]:
        built = tuple(points(settings, value, sizes) for value in values)
        sources = max([sizes["sources"], *(point.stars.sources for point in built), *(point.reference_sources for point in built)])
        heldout = max([sizes["heldout"], *(point.heldout for point in built)])
        return [Cell("", settings.run(sources=sources, heldout=heldout), built)]

    return cells


def _per_model(arch_kw: Callable[[Any], Mapping[str, Any]], recipe: Callable[[Any], Mapping[str, Any]] = lambda value: {},
               label: Callable[[Any], str] = str) -> CellBuilder:
    """A sweep over models or recipes: one run directory per value, each with a star set of its
    ``sizes["sources"]`` sources measured against its held-out models."""

    def cells(settings: Settings, values: Sequence[Any], sizes: Mapping[str, int]) -> List[Cell]:
        base = settings.run(sources=sizes["sources"], heldout=sizes["heldout"])
        grouped: Dict[str, Tuple[RunSpec, List[Point]]] = {}
        for value in values:
            run = settings.run(sources=sizes["sources"], heldout=sizes["heldout"], arch_kw=arch_kw(value), recipe=recipe(value))
            point = Point(label(value), value, StarSet(sizes["sources"], sizes["star_seeds"], _star_options(settings)),
                          heldout=sizes["heldout"])
            grouped.setdefault(run.slug(base), (run, []))[1].append(point)
        return [Cell(key, run, tuple(points)) for key, (run, points) in grouped.items()]

    return cells


def _star_options(settings: Settings, **options: Any) -> StarlightOptions:
    return StarlightOptions(ce_weight=settings.ce_weight, **options)


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _model_option(text: str) -> Tuple[str, int]:
    key, separator, value = text.partition("=")
    if key not in ("width", "depth") or not separator:
        raise ValueError(f"expected width=N or depth=N, got {text!r}")
    return key, _positive(int)(value)


def _sources_point(settings: Settings, value: int, sizes: Mapping[str, int]) -> Point:
    return Point(f"|Z| = {value}", value, StarSet(value, sizes["star_seeds"], _star_options(settings)), heldout=sizes["heldout"])


def _grid_point(settings: Settings, value: int, sizes: Mapping[str, int]) -> Point:
    return Point(f"{value} points", value, StarSet(sizes["sources"], sizes["star_seeds"], _star_options(settings)),
                 heldout=sizes["heldout"], evaluation=EvaluationConfig(ts=value))


def _heldout_size_point(settings: Settings, value: int, sizes: Mapping[str, int]) -> Point:
    # Appendix C.2: |H| = |Z| = n, every held-out model against every source (n × n regular pairs).
    return Point(f"|H| = |Z| = {value}", value, StarSet(value, sizes["star_seeds"], _star_options(settings)), heldout=value,
                 reference_sources=value, reference_heldout_pairs=False)


def _t_sampling_point(settings: Settings, value: str, sizes: Mapping[str, int]) -> Point:
    return Point(value, value, StarSet(sizes["sources"], sizes["star_seeds"], _star_options(settings, t_sampling=value)),
                 heldout=sizes["heldout"])


def _perturbation_point(settings: Settings, value: float, sizes: Mapping[str, int]) -> Point:
    return Point(f"ε = {value:g}", value, StarSet(sizes["sources"], 1, _star_options(settings)), heldout=sizes["heldout"],
                 perturbation=Perturbation(value, sizes["star_seeds"]))


def _matcher_point(settings: Settings, value: str, sizes: Mapping[str, int]) -> Point:
    return Point(value, value, StarSet(sizes["sources"], sizes["star_seeds"], _star_options(settings, matcher=value)),
                 heldout=sizes["heldout"], evaluation=EvaluationConfig(matcher=value))


def _optimizer_cells(settings: Settings, values: Sequence[str], sizes: Mapping[str, int]) -> List[Cell]:
    """Appendix D.2: one star trained on the regular (SGD) sources, measured against the regular
    held-out models and against an extra held-out set per other optimizer (its pairs the reference)."""
    stars = StarSet(sizes["sources"], sizes["star_seeds"], _star_options(settings))
    points, extra_sets = [], []
    for value in values:
        if value == settings.recipe.optimizer:
            points.append(Point(value, value, stars, heldout=sizes["heldout"]))
            continue
        lr = settings.recipe.lr if settings.recipe.optimizer != "sgd" else ADAPTIVE_DEFAULT_LR
        extra_sets.append(ExtraSet(value, sizes["heldout"], replace(settings.recipe, optimizer=value, lr=lr)))
        points.append(Point(value, value, stars, heldout=sizes["heldout"], reference_sources=0, heldout_set=value))
    run = settings.run(sources=max(sizes["sources"], 2), heldout=sizes["heldout"])
    return [Cell("", replace(run, extra_sets=tuple(extra_sets)), tuple(points))]


def _sizes(sources: int, heldout: int, star_seeds: int) -> Dict[str, int]:
    return {"sources": sources, "heldout": heldout, "star_seeds": star_seeds}


EXPERIMENTS: Dict[str, Experiment] = {experiment.name: experiment for experiment in (
    Experiment(
        "sources", "Figure 1, Figure 6, Table 11 (with --ce-weight 1)",
        "star–held-out barrier against the number of sources |Z| the star is trained on", "number of sources |Z|",
        _positive(int), {"quick": (2, 5, 10, 20), "paper": (2, 5, 10, 20, 50)},
        {"quick": _sizes(20, 5, 3), "paper": _sizes(50, 5, 3)}, _one_run(_sources_point), claims=("below", "falls"),
        star_epochs_factor={"quick": 6},
        analogue={"quick": "without --star-epochs the stars train 6× the regular epochs (180), twice the main job's 3×: "
                           "a star on 20 sources visits each one half as often as a star on 10, and at 90 epochs the "
                           "|Z| = 20 stars are the worse ones (--star-epochs 90 shows it)"},
        paper_numbers="Figure 1 (CIFAR-10 ResNet-18): the barrier falls steadily from |Z| = 2 to 50, below the "
                      "regular–regular reference; Table 11 (λ = 1): 0.31 ± 0.05 (2), 0.25 ± 0.05 (5), 0.12 ± 0.02 (50) "
                      "against a regular–regular 0.38",
    ),
    Experiment(
        "grid", "Table 7", "barriers measured with 11, 21 and 51 points on each path", "points on a path",
        _positive(int), {"quick": (11, 21, 51), "paper": (11, 21, 51)},
        {"quick": _sizes(10, 3, 3), "paper": _sizes(10, 3, 3)}, _one_run(_grid_point),
        paper_numbers="Table 7: regular–regular 0.376 / 0.369 / 0.369, star–held-out 0.090 / 0.089 / 0.094 (11 / 21 / 51 points)",
    ),
    Experiment(
        "heldout-size", "Table 8", "min / mean / max barriers with |H| = |Z| = 3, 5, 15 (all held-out × source pairs)",
        "|H| = |Z|", _positive(int), {"quick": (3, 5, 15), "paper": (3, 5, 15)},
        {"quick": _sizes(3, 3, 1), "paper": _sizes(3, 3, 1)}, _one_run(_heldout_size_point), claims=("below", "separated"),
        paper_numbers="Table 8: RR-min 0.300 / 0.292 / 0.255, SR-max 0.095 / 0.084 / 0.117, RR-avg ≈ 0.38, "
                      "SR-avg 0.090 / 0.077 / 0.093 (|H| = 3 / 5 / 15)",
    ),
    Experiment(
        "t-sampling", "Table 9", "Starlight's t drawn from Unif[0, 1], Beta(2, 2) or fixed at 0.5", "t sampling",
        _choice(("uniform", "beta", "constant")), {"quick": ("uniform", "beta", "constant"), "paper": ("uniform", "beta", "constant")},
        {"quick": _sizes(10, 5, 3), "paper": _sizes(10, 3, 3)}, _one_run(_t_sampling_point), controls=("constant",),
        paper_numbers="Table 9: star–held-out 0.084 ± 0.012 (uniform), 0.069 ± 0.010 (beta), 0.018 ± 0.009 (constant, "
                      "whose star loss is 0.082 against 0.001); regular–regular 0.383",
    ),
    Experiment(
        "perturbation", "Table 10", "points on spheres of radius ε around a star (3 samples each) against held-out models",
        "radius ε", _positive(float), {"quick": (0.5, 1.0, 2.0, 4.0, 8.0, 16.0), "paper": (2.0, 4.0, 8.0, 16.0)},
        {"quick": _sizes(10, 3, 3), "paper": _sizes(10, 3, 3)}, _one_run(_perturbation_point),
        analogue={"quick": "the radii are absolute, as in the paper (2^1..2^4), with 0.5 and 1 added: the digits MLP's star "
                           "has a far smaller norm than a ResNet-18's (star_norm in results.json), so the same ε moves it "
                           "much further"},
        paper_numbers="Table 10: star–held-out 0.078, 0.080, 0.086, 0.120 and star loss 0.001 → 0.012 for ε = 2, 4, 8, 16; "
                      "regular–regular 0.38",
    ),
    Experiment(
        "width-depth", "Figure 3", "star–held-out against regular–regular barriers across model widths and depths",
        "model", _model_option,
        {"quick": (("width", 12), ("width", 24), ("width", 48), ("width", 96), ("depth", 2), ("depth", 3), ("depth", 4)),
         "paper": (("width", 1), ("width", 2), ("width", 4), ("width", 8), ("depth", 22), ("depth", 28), ("depth", 34),
                   ("depth", 40))},
        {"quick": _sizes(5, 3, 2), "paper": _sizes(10, 3, 1)},
        _per_model(lambda value: dict([value]), label=lambda value: f"{value[0]} {value[1]}"), figure="scatter",
        model={"paper": ("wrn", {"depth": 22, "width": 1})},
        analogue={"quick": "MLP widths 12–96 at depth 3 and depths 2–4 at width 24 stand in for the WideResNets "
                           "(widths 1–8 at depth 22, depths 22–40 at width 1), which do not fit a CPU budget",
                  "paper": "WideResNet (wrn) widths 1, 2, 4, 8 at depth 22 and depths 22–40 at width 1"},
        paper_numbers="Figure 3: star–held-out about a third of regular–regular at every width (≈ 0.004 vs 0.012 at 8×); "
                      "the same, less pronounced, across depths",
    ),
    Experiment(
        "activation", "Table 12", "ReLU, ELU and SiLU (Swish) networks", "activation",
        _choice(("relu", "elu", "silu")), {"quick": ("relu", "elu", "silu"), "paper": ("relu", "elu", "silu")},
        {"quick": _sizes(10, 3, 2), "paper": _sizes(10, 3, 1)}, _per_model(lambda value: {"activation": value}),
        paper_numbers="Table 12: regular–regular 0.383 / 0.497 / 0.347, star–held-out ≈ 0.19 / 0.224 / 0.208 "
                      "(ReLU / ELU / SiLU)",
    ),
    Experiment(
        "optimizer", "Figure 7", "an SGD star against SGD solutions and against Adam solutions (test loss along the paths)",
        "held-out solutions", _choice(("sgd", "adam", "adamw")), {"quick": ("sgd", "adam"), "paper": ("sgd", "adam")},
        {"quick": _sizes(10, 3, 1), "paper": _sizes(10, 3, 1)}, _optimizer_cells, figure="curves",
        paper_numbers="Figure 7 (CIFAR-10 ResNet-18, test loss): star–SGD nearly flat, SGD–SGD a clear barrier; star–Adam "
                      "above star–SGD but well below Adam–Adam",
    ),
    Experiment(
        "matcher", "Figure 8", "weight matching, Sinkhorn re-basin or no matching, for the star's sources and the barriers",
        "matcher", _choice(("wm", "sinkhorn", "none")), {"quick": ("wm", "sinkhorn", "none"), "paper": ("wm", "sinkhorn")},
        {"quick": _sizes(10, 3, 1), "paper": _sizes(10, 3, 1)}, _one_run(_matcher_point), controls=("none",),
        paper_numbers="Figure 8 (CIFAR-10 VGG19-BN): star below regular with both weight matching and Sinkhorn re-basin; "
                      "Sinkhorn's barriers are higher than weight matching's there",
    ),
)}

