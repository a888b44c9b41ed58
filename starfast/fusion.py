"""Model fusion with star models (Section 4.2 and Table 2 of the paper).

A star trained with the cross-entropy term (``ce_weight`` λ: the loss at θ itself is added to
Starlight's objective, λ = 1 in the paper) is one model standing in for an ensemble of its
sources. For each number of sources ``|Z|`` (the first ``|Z|`` sources of the run, seed order),
:func:`fusion_table` compares on the test set

- regular: the single sources' accuracy, mean ± std and the best of the ``|Z|``;
- ensemble: the average of the ``|Z|`` sources' probability vectors;
- star: ``star_seeds`` stars trained on those sources, mean ± std and the best;
- mergemany: the MergeMany model of the ``|Z|`` sources (:mod:`starfast.merge_many`: each aligned
  by weight matching with the mean of the others until no permutation changes, averaged, its
  BatchNorm statistics recomputed on the training data), with its rounds;

and each method's test-time cost: forward FLOPs per example (counted by
``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions), parameter memory, and the
measured time per test batch (median of interleaved repeats, softmax averaging included; CPU time
on one thread on the CPU, wall time on a GPU: see :func:`inference_costs`).

The stars of size ``|Z|`` live in ``RUN/fusion/zNNNN/star/star-SSSS.safetensors`` (+ ``.json``
recording sources, λ, recipe and seed), trained by :func:`starfast.pipeline.train_missing_stars`
like the run's own stars: a finished star is reused (never retrained) when its JSON matches the
requested sources, λ and recipe, and refused with a message naming the flag otherwise; an
interrupted one resumes from ``RUN/checkpoints/fusion/zNNNN/star/star-SSSS.pt``. Star seed ``s``
starts from the same θ₀ and random streams as the run's own star ``s``. The star recipe is the one the run's first
star was trained with (the run's recipe when it has none), with ``star_epochs`` replacing its
epochs when given.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from starfast import models
from starfast.barrier import evaluate_rows
from starfast.bn import recompute_bn
from starfast.merge_many import merge_many
from starfast.bma import nested_predictions, own_statistics
from starfast.calibration import class_probabilities
from starfast.evaluation import LoadedModel, counted_seeds, load_models, load_stars, summarise
from starfast.files import write_json
from starfast.flat import ParamSpace
from starfast.models import ModelSpec
from starfast.pipeline import STAR_FLAGS, train_missing_stars
from starfast.progress import progress_bar
from starfast.recipes import Recipe
from starfast.rundir import RunDir, RunDirError, fusion_star_set
from starfast.starlight import StarlightOptions

DEFAULT_SIZES = (2, 5, 50)
METHODS = ("regular", "ensemble", "star", "mergemany")


@dataclass
class FusionConfig:
    """``sizes``: the ``|Z|`` of Table 2 (those above the run's sources are dropped);
    ``ce_weight``: λ; ``star_seeds``: stars per size; ``star_epochs``: ``None`` for the run's star
    recipe as it is; ``batch_size``: evaluation and timing batch; ``timing_repeats``: timed
    forward passes per method (the median is reported; see :func:`inference_costs`)."""

    sizes: Tuple[int, ...] = DEFAULT_SIZES
    ce_weight: float = 1.0
    star_seeds: int = 3
    star_epochs: Optional[int] = None
    batch_size: int = 500
    timing_repeats: int = 15


def usable_sizes(sizes: Sequence[int], available: int) -> Tuple[List[int], List[int]]:
    """``(kept, dropped)``: the distinct sizes in ``[1, available]`` (sorted), and the larger ones."""
    distinct = sorted(set(int(size) for size in sizes))
    return [size for size in distinct if size <= available], [size for size in distinct if size > available]


def star_recipe(run: RunDir, star_epochs: Optional[int] = None) -> Recipe:
    """The recipe of the run's first star (the run's recipe without one), with ``star_epochs``
    replacing its epochs (step milestones rescaled with them) when given."""
    stars = run.finished_stars()
    stored = run.read_star_metadata(stars[0]).get("recipe") if stars else None
    config = run.read_config() or {}
    if stored is None:
        stored = config.get("recipe")
    if stored is None:
        raise RunDirError(f"{run.config_path} has no recipe; train the models with python -m starfast.train first")
    recipe = Recipe.from_dict(stored)
    if star_epochs is None or star_epochs == recipe.epochs:
        return recipe
    scale = star_epochs / recipe.epochs
    return replace(recipe, epochs=star_epochs, milestones=sorted({max(1, round(m * scale)) for m in recipe.milestones}))


# What changes a fusion star's recorded settings, for reuse refusals.
FUSION_FLAGS = {
    **{key: "(fixed for fusion stars)" for key in STAR_FLAGS},
    "sources": "--fusion-sizes (or the run's sources)",
    "ce_weight": "--fusion-ce-weight",
    "recipe": "--fusion-star-epochs",
}


def fusion_stars(
    run: RunDir,
    dataset: Any,
    sources: List[LoadedModel],
    recipe: Recipe,
    *,
    ce_weight: float,
    star_seeds: int,
    device: torch.device,
    progress: bool = True,
) -> List[LoadedModel]:
    """The ``star_seeds`` fusion stars of ``sources``, trained where missing (see the module
    docstring for where they live and when they are reused)."""
    spec = run.model_spec()
    star_set = fusion_star_set(len(sources))
    train_missing_stars(
        run, spec, dataset, recipe, StarlightOptions(ce_weight=ce_weight), star_seeds=star_seeds,
        sources=[source.seed for source in sources], star_set=star_set, flags=FUSION_FLAGS, device=device,
        progress=progress, report=lambda line: None,
    )
    return load_stars(run, ParamSpace(spec.build()), device, star_set)[:star_seeds]


def fusion_table(
    run: RunDir,
    dataset: Any,
    *,
    config: FusionConfig = FusionConfig(),
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> Dict[str, Any]:
    """Table 2 for the run (see the module docstring); a JSON-ready dict with one entry of
    ``rows`` per kept size and the sizes dropped for lack of sources."""
    started = time.perf_counter()
    model_spec = run.model_spec()
    skeleton = model_spec.build().to(device)
    space = ParamSpace(skeleton)
    sources = load_models(run, "sources", space, device, counted_seeds(run)["sources"])
    sizes, dropped = usable_sizes(config.sizes, len(sources))
    if not sizes:
        raise RunDirError(
            f"{run.path} has {len(sources)} source models, fewer than every --fusion-sizes value {sorted(config.sizes)}; "
            f"pass sizes up to {len(sources)}"
        )
    recipe = star_recipe(run, config.star_epochs)
    test_data = lambda: dataset.eval_batches("test", config.batch_size)  # noqa: E731
    train_data = lambda: dataset.eval_batches("train", config.batch_size)  # noqa: E731
    used = sources[: sizes[-1]]
    rows = torch.stack([source.row for source in used])
    source_statistics = own_statistics(skeleton, [source.buffers for source in used])
    _, accuracies = evaluate_rows(skeleton, rows, source_statistics, test_data, space=space, argument="test_data")
    ensembles = nested_predictions(skeleton, rows, source_statistics, test_data, space=space, argument="test_data")
    timing_batch = next(iter(test_data()))[0].to(device)
    modules = {source.label: _module(model_spec, source, device) for source in used}

    table = []
    for size in progress_bar(sizes, desc="fusion", unit="size", enabled=progress):
        stars = fusion_stars(
            run, dataset, sources[:size], recipe,
            ce_weight=config.ce_weight, star_seeds=config.star_seeds, device=device, progress=progress,
        )
        merged = merge_many(rows[:size], models.permutation_spec(skeleton), space=space) if size > 1 else None
        merged_row = rows[0] if merged is None else merged.row
        merged_statistics = recompute_bn(skeleton, merged_row, train_data, space=space, argument="train_data")
        _, merged_accuracy = evaluate_rows(skeleton, merged_row, merged_statistics or None, test_data, space=space,
                                           argument="test_data")
        star_rows = torch.stack([star.row for star in stars])
        star_statistics = own_statistics(skeleton, [star.buffers for star in stars])
        _, star_accuracies = evaluate_rows(skeleton, star_rows, star_statistics, test_data, space=space, argument="test_data")
        members = {
            "regular": [modules[used[0].label]],
            "ensemble": [modules[source.label] for source in used[:size]],
            "star": [_module(model_spec, stars[0], device)],
            "mergemany": [_module(model_spec, LoadedModel("mergemany", merged_row, merged_statistics, ""), device)],
        }
        ensemble = ensembles[size - 1]
        table.append({
            "size": size,
            "sources": [source.seed for source in used[:size]],
            "regular": summarise(accuracies[:size].tolist()),
            "ensemble": {"accuracy": float(ensemble.correct.double().mean()), "nll": float(-ensemble.true_log_prob.mean())},
            "star": summarise(star_accuracies.tolist()),
            "stars": [star.label for star in stars],
            "mergemany": {"accuracy": float(merged_accuracy), "rounds": 0 if merged is None else merged.rounds,
                          "converged": True if merged is None else merged.converged},
            "cost": inference_costs(members, timing_batch, config.timing_repeats),
        })
    return {
        "dataset": dataset.name,
        "arch": model_spec.arch,
        "model": model_spec.to_dict(),
        "ce_weight": float(config.ce_weight),
        "star_epochs": recipe.epochs,
        "star_recipe": recipe.to_dict(),
        "rows": table,
        "dropped_sizes": dropped,
        "counts": {"sources": len(sources), "test_examples": int(ensembles.confidence.shape[1])},
        "device": str(device),
        "config": {**asdict(config), "sizes": list(config.sizes)},
        "seconds": time.perf_counter() - started,
    }


def write_fusion(run: RunDir, results: Mapping[str, Any]) -> Path:
    """``RUN/results/{fusion.json, fusion.md}``, published as a unit."""
    from starfast import report

    def write(folder: Path) -> List[str]:
        write_json(folder / "fusion.json", dict(results))
        report.write_text(folder / "fusion.md", report.format_fusion_table(results) + "\n")
        return ["fusion.json", "fusion.md"]

    return run.publish(run.results_folder, write)


@torch.no_grad()
def inference_costs(methods: Mapping[str, Sequence[nn.Module]], inputs: torch.Tensor, repeats: int) -> Dict[str, Dict[str, float]]:
    """Cost of each method, predicting with the average of its members' probability vectors on
    one batch: counted forward FLOPs per example, parameter bytes, and the median seconds of
    ``repeats`` timed passes. The methods are timed in interleaved rounds (each round times every
    method once, in a rotated order), so a busy machine slows them alike instead of whichever
    happened to run during a burst of load. On the CPU the clock is the process's CPU time, on one
    thread (with several, every operation waits for its slowest thread and the waiting is spent
    spinning); on a GPU it is wall time."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    def predictor(members: Sequence[nn.Module]) -> Callable[[], torch.Tensor]:
        return lambda: sum(class_probabilities(member(inputs)) for member in members) / len(members)

    predictors = {name: predictor(members) for name, members in methods.items()}
    costs: Dict[str, Dict[str, float]] = {}
    for name, members in methods.items():
        counter = FlopCounterMode(display=False)
        with counter:
            predictors[name]()
        predictors[name]()  # warm-up outside the counter
        costs[name] = {
            "members": len(members),
            "flops_per_example": counter.get_total_flops() / inputs.shape[0],
            "parameter_bytes": sum(p.numel() * p.element_size() for member in members for p in member.parameters()),
            "batch_size": int(inputs.shape[0]),
        }
    names = list(methods)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    threads = torch.get_num_threads()
    if inputs.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for turn in range(repeats):
            first = turn % len(names)
            for name in names[first:] + names[:first]:
                seconds[name].append(_timed(predictors[name], inputs.device))
    finally:
        torch.set_num_threads(threads)
    for name in names:
        costs[name]["seconds_per_batch"] = median(seconds[name])
        costs[name]["clock"] = "cpu time, 1 thread" if inputs.device.type == "cpu" else "wall time"
    return costs


def _timed(work: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds of one call: CPU time of this process on the CPU (time spent descheduled does not
    count, so other programs' load does not show), wall time with synchronisation on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        torch.cuda.synchronize()
        return time.perf_counter() - started
    started = time.process_time()
    work()
    return time.process_time() - started


def _module(spec: ModelSpec, model: LoadedModel, device: torch.device) -> nn.Module:
    module = spec.build().to(device)
    module.load_state_dict(model.state_dict(ParamSpace(module)))
    return module.eval()
