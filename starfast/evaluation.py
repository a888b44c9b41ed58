"""Barrier evaluation of a run directory: the paper's verification tables (Tables 1, 6, 8).

``evaluate_run(run, dataset)`` loads the source, held-out and star models of a run, aligns every
pair it measures with the configured permutation finder (``config.matcher``: weight matching by
default, Sinkhorn re-basin, activation or straight-through matching on ``match_examples``
training examples, or ``none`` to interpolate the models as they are; B permuted onto A, A is the
star whenever one is involved, and B's BatchNorm statistics are permuted with it), REPAIRs the
paths when ``config.repair`` (:mod:`starfast.repair`),
computes each pair's barrier curve with batched BatchNorm recomputation
(:func:`starfast.barrier.barrier_curve`) and aggregates three kinds:

- ``regular_regular``: held-out × held-out pairs and held-out × source pairs (counts configurable),
- ``star_heldout``: every star against every held-out model (the paper's central test),
- ``star_source``: every star against the sources it was trained on (its JSON's ``sources``);

and two more per extra held-out set NAME of the run (``--extra-heldout``, models trained with
another recipe, e.g. Adam: Appendix D.2 / Figure 7):

- ``star_NAME``: every star against every model of the set,
- ``NAME_NAME``: the set's pairs (as many as ``heldout_pairs`` allows).

Each curve in ``curves[KIND]`` names its two models (``"a"``, the anchor, and ``"b"``, e.g.
``"star star-0000"`` and ``"heldout seed 1000"``), so per-model summaries can be read off.

The result is a JSON-ready dict ``{"dataset", "model", "regular_loss", "star_loss", "regular_test_loss",
"star_test_loss", "barriers", "accuracy_barriers", "curves", "counts", "extra_heldout", "star_matchers", "repair",
"config", "environment", "seeds", "seconds"}`` (losses summarise each distinct model's own train/test loss;
``star_matchers`` names the matcher each star was trained with, ``config["matcher"]`` the one the evaluation
used; ``repair`` is ``off``, ``repair`` or ``reset`` (``config.repair`` on a BatchNorm network),
:mod:`starfast.repair`; ``environment`` the versions, CPU, threads and device
(:mod:`starfast.environment`), ``seeds`` the models' seeds per role) where
``barriers[KIND][SPLIT]`` holds ``mean, std, min, max, values`` of the loss barriers on ``train`` and ``test``, and ``extra_heldout[NAME]`` the set's
``recipe``, ``count``, own ``loss``/``test_loss`` and its two ``kinds``. Each barrier summary also
holds ``ci``, the mean's 95% bootstrap interval over the models and the matching's kept optima, and ``matching``, the mean's range
over the next best optima of the matching (each curve's ``matching``: the restarts' objective and
the barriers at up to ``matching_optima - 1`` other distinct optima), see :mod:`starfast.uncertainty`. :func:`write_results` stores it as
``RUN/results/results.json`` next to the table and plot made by :mod:`starfast.report`.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from starfast import models
from starfast.barrier import BarrierCurve, barrier_curve
from starfast.bn import has_batchnorm
from starfast.repair import repair_kind
from starfast.flat import ParamSpace
from starfast.activation_matching import ActivationProbe
from starfast.matchers import MatcherChoice, find_permutations
from starfast.ops import permute
from starfast.uncertainty import bootstrap_interval, matching_range, pair_values
from starfast.progress import progress_bar
from starfast.environment import environment
from starfast.files import file_digest, read_json, write_json
from starfast.rundir import MAIN_STARS, RunDir, RunDirError, checked_row, extra_role, extra_seeds, heldout_seeds, source_seeds

KINDS = ("regular_regular", "star_heldout", "star_source")
SPLITS = ("train", "test")


# Restarts of the evaluation's matcher per pair, when --match-restarts is not given: with 32, weight
# matching reaches the best objective that 30 random group orders find on 96% of the default job's
# model pairs, at 9.5x the time of one start (benchmarks/RESULTS.md, issue 26). Sinkhorn's steps
# cost far more than weight matching's sweeps: one start unless asked.
DEFAULT_EVAL_RESTARTS = {"wm": 32, "sinkhorn": 1, "none": 1}
# Per pair, the barrier is also measured at the next best distinct optima the restarts reached, up
# to this many optima in all: the spread due to the matching (:mod:`starfast.uncertainty`).
DEFAULT_MATCHING_OPTIMA = 3
MAX_TS = 1001  # points on a path: beyond this the curve is as fine as any plot, and the cost is not


@dataclass(frozen=True)
class EvaluationConfig(MatcherChoice):
    """How much to measure (``None`` counts mean "all available") and how pairs are aligned
    (``matcher`` and the ``sinkhorn_*`` options, :class:`~starfast.matchers.MatcherChoice`;
    ``match_max_iter`` and ``match_init`` are weight matching's; ``match_restarts`` defaults to the
    matcher's :data:`DEFAULT_EVAL_RESTARTS`; ``matching_optima``: how many of the distinct optima
    the restarts reached are measured per pair, the best first); validated on construction,
    errors naming the CLI flag."""

    MATCHER_FLAG = "--eval-matcher"
    RESTARTS_FLAG = "--match-restarts"

    heldout_pairs: Optional[int] = None  # held-out x held-out pairs (i < j)
    heldout_source_pairs: Optional[int] = 6  # held-out x source pairs
    star_sources: Optional[int] = None  # sources per star for star_source
    ts: int = 11
    bn_batches: Optional[int] = None
    batch_size: int = 500
    match_max_iter: int = 100
    match_init: Optional[str] = None  # None (identity, Git Re-Basin) or "sorted"
    repair: bool = False  # REPAIR every interior point of a path (starfast.repair)
    match_restarts: Optional[int] = None  # None: the matcher's DEFAULT_EVAL_RESTARTS
    matching_optima: int = DEFAULT_MATCHING_OPTIMA  # distinct optima of the restarts measured per pair

    def __post_init__(self) -> None:
        if self.match_restarts is None:
            object.__setattr__(self, "match_restarts", DEFAULT_EVAL_RESTARTS.get(self.matcher, 1))
        super().__post_init__()
        for name in ("heldout_pairs", "heldout_source_pairs", "star_sources"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if not 2 <= self.ts <= MAX_TS:
            raise ValueError(f"--ts must be between 2 (the two end points) and {MAX_TS}, got {self.ts}")
        if self.bn_batches is not None and self.bn_batches < 1:
            raise ValueError(f"--bn-batches must be >= 1 (or omitted: all batches), got {self.bn_batches}")
        if self.batch_size < 1:
            raise ValueError(f"--eval-batch-size must be >= 1, got {self.batch_size}")
        if self.match_max_iter < 1:
            raise ValueError(f"match_max_iter must be >= 1, got {self.match_max_iter}")
        optima = self.matching_optima
        if isinstance(optima, bool) or not isinstance(optima, int) or optima < 1:
            raise ValueError(f"--matching-optima must be a positive int (1: only the best matching), got {optima!r}")
        if self.match_init not in (None, "sorted"):
            raise ValueError(f"--match-init must be identity or sorted, got {self.match_init!r}")
        if self.match_init is not None and self.matcher != "wm":
            raise ValueError(f"--match-init {self.match_init} is a weight-matching start; drop it or use --eval-matcher wm")

    def matcher_options(self) -> Dict[str, Any]:
        """The finder's keywords: weight matching's sweep limit and restarts, or the Sinkhorn options."""
        return {"max_iter": self.match_max_iter, **super().matcher_options()} if self.matcher == "wm" else super().matcher_options()


@dataclass
class LoadedModel:
    """A stored model as a row and its buffers (BatchNorm statistics), loaded through the run."""

    label: str
    row: torch.Tensor
    buffers: Dict[str, torch.Tensor]  # the state dict's entries that are not parameters
    digest: str  # of the file's bytes: partial results are reused only for the same models
    seed: Optional[int] = None
    sources: Optional[List[int]] = None  # a star's: the source seeds it was trained against
    matcher: Optional[str] = None  # a star's: the permutation finder Starlight used

    @classmethod
    def from_state(cls, label: str, state: Mapping[str, torch.Tensor], space: ParamSpace, digest: str,
                   seed: Optional[int] = None) -> "LoadedModel":
        """A model's state dict split into its row (``space``'s parameters) and its buffers."""
        return cls(label, space.flatten(state), _buffers(state, space), digest, seed=seed)

    def state_dict(self, space: ParamSpace) -> Dict[str, torch.Tensor]:
        """Parameters (views of the row) and buffers, loadable into a module of ``space``."""
        return {**space.views(self.row), **self.buffers}


def evaluate_run(
    run: RunDir,
    dataset: Any,
    *,
    config: EvaluationConfig = EvaluationConfig(),
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> Dict[str, Any]:
    """Measure the run's barriers (see the module docstring); returns the results dict."""
    started = time.perf_counter()
    skeleton = run.model_spec().build().to(device)
    space = ParamSpace(skeleton)
    seeds = counted_seeds(run)
    stars = load_stars(run, space, device, seeds=seeds["star"])
    _check_complete(run, stars)
    sources = load_models(run, "sources", space, device, seeds["sources"])
    heldout = load_models(run, "heldout", space, device, seeds["heldout"])
    extra = {role.split("/", 1)[1]: load_models(run, role, space, device, seeds.get(role)) for role in run.extra_roles()}
    extra = {name: members for name, members in extra.items() if members}
    if len(heldout) < 1 or (len(heldout) < 2 and not sources):
        raise RunDirError(f"{run.path} has too few trained models to measure barriers; run python -m starfast.train --stage models")

    pairs: Dict[str, List[Tuple[LoadedModel, LoadedModel]]] = {
        "regular_regular": _limit(list(itertools.combinations(heldout, 2)), config.heldout_pairs)
        + _limit([(h, s) for s in sources for h in heldout], config.heldout_source_pairs),
        "star_heldout": [(star, h) for star in stars for h in heldout],
        "star_source": [(star, s) for star in stars for s in _limit(own_sources(star, sources), config.star_sources)],
    }
    for name, members in extra.items():
        pairs[f"star_{name}"] = [(star, member) for star in stars for member in members]
        pairs[f"{name}_{name}"] = _limit(list(itertools.combinations(members, 2)), config.heldout_pairs)
    loaded = [*sources, *heldout, *stars, *(member for members in extra.values() for member in members)]
    partial = PartialResults(run.results_folder / PARTIAL_NAME, config, loaded)
    total = sum(len(items) for items in pairs.values())
    bar = progress_bar(total=total, desc="barriers", unit="pair", enabled=progress)
    if partial.curves:
        bar.write(f"resuming the evaluation: {len(partial.curves)} of {total} pairs were measured before")
    curves = {kind: measure_pairs(items, partial, skeleton, dataset, config, bar=bar, progress=progress)
              for kind, items in pairs.items()}
    bar.close()
    own = end_point_losses(curve for kind in KINDS for curve in curves[kind])
    star_labels = {star.label for star in stars}
    own_loss = {"regular": {label: loss for label, loss in own.items() if label not in star_labels},
                "star": {label: loss for label, loss in own.items() if label in star_labels}}

    results = {
        "dataset": dataset.name,
        "model": run.model_spec().to_dict(),
        "regular_loss": summarise([train for train, _ in own_loss["regular"].values()]),
        "star_loss": summarise([train for train, _ in own_loss["star"].values()]),
        "regular_test_loss": summarise([test for _, test in own_loss["regular"].values()]),
        "star_test_loss": summarise([test for _, test in own_loss["star"].values()]),
        "barriers": {kind: _barrier_table(curves[kind], "loss_barrier") for kind in curves},
        "accuracy_barriers": {kind: _barrier_table(curves[kind], "acc_barrier") for kind in curves},
        "curves": curves,
        "counts": {"sources": len(sources), "heldout": len(heldout), "stars": len(stars),
                   **{kind: len(curves[kind]) for kind in curves}},
        "extra_heldout": {name: _extra_set_summary(run, name, members, curves) for name, members in extra.items()},
        "star_matchers": {star.label: star.matcher for star in stars},
        "repair": repair_kind(skeleton, config.repair),
        "config": asdict(config),
        "environment": environment(device),
        "seeds": {"sources": [model.seed for model in sources], "heldout": [model.seed for model in heldout],
                  "stars": [star.seed for star in stars],
                  **{f"extra/{name}": [model.seed for model in members] for name, members in extra.items()}},
        "seconds": time.perf_counter() - started,
    }
    return results


class CurveStore(Protocol):
    """Where measured curves are kept between runs: :class:`PartialResults`, or an experiment's
    store of every pair it ever measured (:mod:`starfast.experiments.measure`)."""

    def get(self, anchor: LoadedModel, partner: LoadedModel) -> Optional[Dict[str, Any]]: ...

    def add(self, anchor: LoadedModel, partner: LoadedModel, curve: Dict[str, Any]) -> None: ...


def measure_pairs(
    pairs: Sequence[Tuple[LoadedModel, LoadedModel]],
    store: CurveStore,
    skeleton: nn.Module,
    dataset: Any,
    config: EvaluationConfig,
    *,
    bar,
    progress: bool = True,
) -> List[Dict[str, Any]]:
    """The barrier curve of each ``(anchor, partner)`` pair, in order: taken from ``store`` when
    it holds it, otherwise the partner is aligned with the anchor by ``config.matcher`` (one
    batched call per anchor for its consecutive pairs), measured, and added to ``store``. ``bar`` ticks once per
    pair. An anchor without buffers (e.g. a perturbed star) gets its BatchNorm statistics
    recomputed like the interior points."""
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    train_data = lambda: dataset.eval_batches("train", config.batch_size)  # noqa: E731
    test_data = lambda: dataset.eval_batches("test", config.batch_size)  # noqa: E731
    batches_per_pair = _batches_per_pair(skeleton, dataset, config)
    grouped = list(_grouped_by_anchor(list(pairs)))
    needs_matching = any(store.get(anchor, partner) is None for anchor, partners in grouped for partner in partners)
    probe = config.probe(skeleton, dataset) if needs_matching else None
    curves: List[Dict[str, Any]] = []
    for anchor, partners in grouped:
        todo = [partner for partner in partners if store.get(anchor, partner) is None]
        matched = dict(zip((id(partner) for partner in todo), align(anchor, todo, spec, space, config, probe))) if todo else {}
        for partner in partners:
            curve = store.get(anchor, partner)
            if curve is None:
                alignments = matched[id(partner)]
                with progress_bar(total=batches_per_pair * len(alignments), desc=f"{anchor.label} ~ {partner.label}, "
                                  f"{config.ts} points", unit="batch", enabled=progress, nested=True) as pair_bar:
                    measured = [pair_curve(skeleton, space, anchor, alignment.row, alignment.buffers,
                                           _counted(train_data, pair_bar), _counted(test_data, pair_bar), config, spec)
                                for alignment in alignments]
                curve = {"a": anchor.label, "b": partner.label, **measured[0].to_dict()}
                if alignments[0].objective is not None:
                    curve["matching"] = {
                        "objective": alignments[0].objective, "restarts": config.match_restarts,
                        "optima": [{"objective": alignment.objective, "loss_barrier": dict(other.loss_barrier),
                                    "acc_barrier": dict(other.acc_barrier)}
                                   for alignment, other in zip(alignments[1:], measured[1:])],
                    }
                store.add(anchor, partner, curve)
            curves.append(curve)
            bar.update(1)
    return curves


def write_results(run: RunDir, results: Mapping[str, Any]) -> Path:
    """``RUN/results/{results.json, table.md, curves.png}``, published as a unit; the partial
    results of the evaluation are removed afterwards."""
    from starfast import report

    def write(folder: Path) -> List[str]:
        write_json(folder / "results.json", dict(results))
        report.write_table(folder / "table.md", results)
        drawn = report.plot_curves(folder / "curves.png", results)
        return ["results.json", "table.md"] + (["curves.png"] if drawn else [])

    folder = run.publish(run.results_folder, write, owned=["curves.png"])
    (folder / PARTIAL_NAME).unlink(missing_ok=True)
    return folder


# -- resuming an interrupted evaluation -----------------------------------------------------------

PARTIAL_NAME = "partial.json"


class PartialResults:
    """The curves measured so far, in ``RUN/results/partial.json``, rewritten (atomically) after
    every pair, so a killed evaluation resumes at the next pair. Curves are kept only while the
    evaluation settings and the bytes of every model file are those they were measured with; the
    file is removed once the results are written."""

    def __init__(self, path: Path, config: EvaluationConfig, loaded: Sequence[LoadedModel]):
        self.path = path
        self.identity = {"config": asdict(config), "models": {model.label: model.digest for model in loaded}}
        stored = read_json(path) if path.exists() else {}
        same = isinstance(stored, dict) and stored.get("identity") == self.identity
        self.curves: Dict[str, Dict[str, Any]] = dict(stored.get("curves", {})) if same else {}

    @staticmethod
    def _key(anchor: LoadedModel, partner: LoadedModel) -> str:
        return f"{anchor.label} ~ {partner.label}"

    def get(self, anchor: LoadedModel, partner: LoadedModel) -> Optional[Dict[str, Any]]:
        return self.curves.get(self._key(anchor, partner))

    def add(self, anchor: LoadedModel, partner: LoadedModel, curve: Dict[str, Any]) -> None:
        self.curves[self._key(anchor, partner)] = curve
        write_json(self.path, {"identity": self.identity, "curves": self.curves})


def _batches_per_pair(skeleton: nn.Module, dataset: Any, config: EvaluationConfig) -> int:
    """Data batches one barrier curve reads: BatchNorm recomputation (if any), train, test."""
    train = math.ceil(dataset.num_train / config.batch_size)
    test = math.ceil(dataset.num_test / config.batch_size)
    recompute = min(train, config.bn_batches or train) if has_batchnorm(skeleton) else 0
    return recompute + train + test


def _counted(data, bar) -> Callable[[], Iterator]:
    """``data`` (a callable giving batches) ticking ``bar`` once per batch read."""

    def batches():
        for batch in data():
            bar.update(1)  # before the yield: a reader that stops early (bn_batches) still counts
            yield batch

    return batches


# -- helpers --------------------------------------------------------------------------------------


def load_models(run: RunDir, role: str, space: ParamSpace, device, seeds: Optional[Sequence[int]] = None) -> List[LoadedModel]:
    """Every finished model of ``role`` (``sources``, ``heldout`` or ``extra/<name>``), in seed order; only those of
    ``seeds`` when given (each must be finished)."""
    models = []
    for seed in run.finished_seeds(role) if seeds is None else seeds:
        state, _ = run.load_model(role, seed, device)
        models.append(_loaded(run.model_path(role, seed), f"{role} seed {seed}", state, space, seed=seed))
    return models


def counted_seeds(run: RunDir, report: Callable[[str], None] = print) -> Dict[str, Optional[List[int]]]:
    """The seeds the run's ``config.json`` counts, per role (``sources``, ``heldout``, each
    ``extra/<name>``) and for the main stars (key ``star``); ``None`` where the config states no
    count (a run written before counts were recorded: every finished one is used). Models and stars
    stored beyond the counts (a rerun with a smaller ``--heldout`` or ``--star-seeds``) are kept on
    disk but not measured, and ``report`` gets one line saying so."""
    config = run.read_config() or {}
    counts = {"sources": (config.get("sources"), source_seeds), "heldout": (config.get("heldout"), heldout_seeds),
              "star": (config.get("star_seeds"), lambda count: list(range(count)))}
    for name, entry in (config.get("extra_heldout") or {}).items():
        counts[extra_role(name)] = (entry.get("count") if isinstance(entry, dict) else None, extra_seeds)
    chosen: Dict[str, Optional[List[int]]] = {}
    for role, (count, seeds_of) in counts.items():
        chosen[role] = seeds_of(count) if isinstance(count, int) and not isinstance(count, bool) else None
        stored = run.finished_stars() if role == "star" else run.finished_seeds(role)
        unused = [seed for seed in stored if chosen[role] is not None and seed not in chosen[role]]
        if unused:
            flag = {"star": "--star-seeds", "sources": "--sources", "heldout": "--heldout"}.get(role, "--extra-heldout")
            report(f"note: measuring {count} of the {len(stored)} {'stars' if role == 'star' else role + ' models'} stored "
                   f"in {run.path} ({flag} {count}); the other {len(unused)} are kept on disk, unused")
    return chosen


def load_stars(run: RunDir, space: ParamSpace, device, star_set: str = MAIN_STARS,
               seeds: Optional[Sequence[int]] = None) -> List[LoadedModel]:
    """Every finished star of ``star_set``, in seed order, with the source seeds it was trained on;
    only those of ``seeds`` that are finished when given."""
    stars = []
    finished = run.finished_stars(star_set)
    for star_seed in finished if seeds is None else [seed for seed in seeds if seed in finished]:
        path = run.star_path(star_seed, star_set)
        state, metadata = run.load_star(star_seed, star_set, device)
        star = _loaded(path, f"star {path.stem}", state, space, seed=star_seed)
        star.sources = metadata.get("sources")
        star.matcher = metadata.get("matcher", "wm")  # stars recorded before the choice existed used wm
        stars.append(star)
    return stars


def _extra_set_summary(run: RunDir, name: str, members: List[LoadedModel], curves: Mapping[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """An extra held-out set in the results: its recipe (from its first model's JSON), its size, the
    own train/test losses of its models (read off the ends of its curves) and its kinds."""
    kinds = [f"star_{name}", f"{name}_{name}"]
    labels = {member.label for member in members}
    own = {label: loss for label, loss in end_point_losses(curve for kind in kinds for curve in curves[kind]).items()
           if label in labels}
    recipe = run.read_metadata(extra_role(name), members[0].seed).get("recipe")
    return {"recipe": recipe, "count": len(members), "loss": summarise([train for train, _ in own.values()]),
            "test_loss": summarise([test for _, test in own.values()]), "kinds": kinds}


def end_point_losses(curves: Iterable[Mapping[str, Any]]) -> Dict[str, Tuple[float, float]]:
    """Each model's own (train, test) loss, read off the end points of the curves it is part of."""
    own: Dict[str, Tuple[float, float]] = {}
    for curve in curves:
        own[curve["a"]] = (curve["train_loss"][0], curve["test_loss"][0])
        own[curve["b"]] = (curve["train_loss"][-1], curve["test_loss"][-1])
    return own


def _check_complete(run: RunDir, stars: List[LoadedModel]) -> None:
    """Every model the run's config names, and every source a star was trained on, is finished:
    a missing one would silently shrink the tables."""
    config = run.read_config() or {}
    wanted = {(role, seed) for role, seeds in (("sources", source_seeds), ("heldout", heldout_seeds))
              if isinstance(config.get(role), int) for seed in seeds(config[role])}
    wanted |= {(extra_role(name), seed) for name, entry in (config.get("extra_heldout") or {}).items()
               for seed in extra_seeds(entry["count"])}
    wanted |= {("sources", seed) for star in stars for seed in star.sources or ()}
    missing = sorted(run.model_path(role, seed) for role, seed in wanted if not run.is_finished(role, seed))
    if missing:
        listed = ", ".join(str(path) for path in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RunDirError(
            f"the evaluation needs every model the run names, but {len(missing)} are missing or unfinished ({listed}); "
            "train them with python -m starfast.train --stage models and the run's flags"
        )


def own_sources(star: LoadedModel, sources: List[LoadedModel]) -> List[LoadedModel]:
    """The sources a star was trained against (all sources when its metadata does not say)."""
    if star.sources is None:
        return sources
    return [source for source in sources if source.seed in set(star.sources)]


def _loaded(path: Path, label: str, state: Dict[str, torch.Tensor], space: ParamSpace, seed: int) -> LoadedModel:
    return LoadedModel(label, checked_row(path, state, space), _buffers(state, space), file_digest(path), seed=seed)


def _buffers(state: Mapping[str, torch.Tensor], space: ParamSpace) -> Dict[str, torch.Tensor]:
    """The entries of a state dict that are not ``space``'s parameters (BatchNorm statistics)."""
    parameters = set(space.names)
    return {name: tensor for name, tensor in state.items() if name not in parameters}


def _limit(items: Sequence, count: Optional[int]) -> List:
    return list(items) if count is None else list(items)[: max(0, count)]


def _grouped_by_anchor(items: List[Tuple[LoadedModel, LoadedModel]]):
    """Consecutive pairs sharing their first model, so each anchor matches its partners at once."""
    for _, group in itertools.groupby(items, key=lambda pair: id(pair[0])):
        group = list(group)
        yield group[0][0], [partner for _, partner in group]


def pair_curve(skeleton: nn.Module, space: ParamSpace, anchor: LoadedModel, partner_row: torch.Tensor,
               partner_buffers: Mapping[str, torch.Tensor], train_data, test_data, config: EvaluationConfig,
               spec=None) -> BarrierCurve:
    """The barrier curve from ``anchor`` to an aligned partner (its row and buffers, from
    :func:`align`) on ``config.ts`` points. An anchor without buffers gets its BatchNorm statistics
    recomputed like the interior points. ``spec``: the permutation spec, which ``config.repair``
    needs (REPAIR observes the groups' sites)."""
    return barrier_curve(skeleton, anchor.row, partner_row, train_data, test_data, config.ts,
                         buffers_a=anchor.buffers or None, buffers_b=partner_buffers, bn_batches=config.bn_batches,
                         space=space, repair=config.repair, spec=spec)


@dataclass
class Alignment:
    """A partner aligned with its anchor: its permuted ``row`` and ``buffers`` (BatchNorm
    statistics), and the matching's objective (weight matching's ⟨anchor, row⟩; ``None`` otherwise)."""

    row: torch.Tensor
    buffers: Dict[str, torch.Tensor]
    objective: Optional[float] = None


def align(anchor: LoadedModel, partners: List[LoadedModel], spec, space: ParamSpace, config: EvaluationConfig,
          probe: Optional[ActivationProbe] = None) -> List[List[Alignment]]:
    """Each partner aligned with the anchor by ``config.matcher``: per partner, its
    :class:`Alignment` by the best matching, then those by the next best distinct optima the
    restarts reached (up to ``config.matching_optima`` in all; weight matching only). The rows come
    permuted from the finder; the BatchNorm statistics are permuted here. With ``none`` the
    partners are returned as they are, and nothing is matched. ``probe``: the data of a data-based
    finder (``config.probe(skeleton, dataset)``)."""
    if not config.permutes:
        return [[Alignment(partner.row, partner.buffers)] for partner in partners]
    bank = torch.stack([partner.row for partner in partners])
    result = find_permutations(config.matcher, anchor.row, bank, spec, space=space, init=config.match_init,
                               probe=probe, **config.matcher_options())
    objectives = getattr(result, "objective", None)
    matched = []
    for k, partner in enumerate(partners):
        perm = {name: index[k] for name, index in result.perms.items()}
        objective = None if objectives is None else float(objectives[-1, k])
        alignments = [Alignment(result.permuted[k], spec.apply(partner.buffers, perm), objective)]
        for other, other_objective in _other_optima(result, k, config.matching_optima - 1):
            row = permute(partner.row, spec.index_map(space, other))
            alignments.append(Alignment(row, spec.apply(partner.buffers, other), other_objective))
        matched.append(alignments)
    return matched


def _other_optima(result, k: int, count: int) -> List[Tuple[Dict[str, torch.Tensor], float]]:
    """Up to ``count`` permutations of source ``k`` that other restarts of ``result`` ended at,
    distinct from the answer and from each other, highest objective first, with their objectives."""
    restart_perms = getattr(result, "restart_perms", None)
    if count < 1 or restart_perms is None:
        return []
    objectives = result.restart_objectives[:, k]
    kept = [{name: index[k] for name, index in result.perms.items()}]
    others = []
    for r in torch.argsort(objectives, descending=True, stable=True).tolist():
        candidate = {name: index[r, k] for name, index in restart_perms.items()}
        if any(all(torch.equal(candidate[name], seen[name]) for name in candidate) for seen in kept):
            continue
        kept.append(candidate)
        others.append((candidate, float(objectives[r])))
        if len(others) == count:
            break
    return others


def summarise(values: Sequence) -> Optional[Dict[str, Any]]:
    values = [float(v) for v in values]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _barrier_table(curves: List[Dict[str, Any]], key: str) -> Dict[str, Optional[Dict[str, Any]]]:
    """Per split: the barriers' :func:`summarise`, with the mean's bootstrap interval over the
    models and the matching's optima (``ci``) and its range over those optima (``matching``), see
    :mod:`starfast.uncertainty`."""
    table: Dict[str, Optional[Dict[str, Any]]] = {}
    for split in SPLITS:
        measured = [curve for curve in curves if split in curve[key]]
        summary = summarise([curve[key][split] for curve in measured])
        if summary is not None:
            ends = [(curve["a"], curve["b"]) for curve in measured] if all("a" in curve for curve in measured) else None
            summary["ci"] = bootstrap_interval(pair_values(measured, key, split), ends) if ends else None
            summary["matching"] = matching_range(measured, key, split)
        table[split] = summary
    return table
