"""The pipeline: the stages of a run directory, each training or measuring only what is missing.

The command lines parse flags into options and call these; the algorithms below
(:mod:`starfast.training`, :mod:`starfast.starlight`, :mod:`starfast.evaluation`) get models,
tensors, datasets and checkpoint paths, and the run directory's layout stays :class:`RunDir`'s.

- :func:`train_missing_models`: the source and held-out models (or an :class:`ExtraSet`'s) not yet
  finished, resumed from their checkpoints, ``parallel_seeds`` at a time; a finished model is
  reused only when it was trained with the recipe asked for;
- :func:`import_missing_models`: source or held-out models taken from checkpoints trained
  elsewhere (``--sources-from``/``--heldout-from``) instead of trained, each evaluated and stored
  with its provenance;
- :func:`train_missing_stars`: the stars of a star set (the main job's, or a fusion size's) not yet
  finished; a finished star is reused only when it was trained on the same sources with the same
  settings, and refused with a message naming the flag otherwise. Star seed ``s`` starts from θ₀ =
  the regular initialisation of seed ``STAR_SEED_START + s`` (apart from the source and held-out
  seeds), and its random streams derive from that seed too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from starfast import models
from starfast.checkpoint_import import fit_state_dict, read_checkpoint, weights_file
from starfast.environment import versions
from starfast.files import file_digest, load_checkpoint
from starfast.flat import ParamSpace
from starfast.models import ModelSpec
from starfast.progress import progress_bar
from starfast.recipes import Recipe
from starfast.rundir import MAIN_STARS, RunDir, RunDirError, checked_row, extra_role, extra_seeds, heldout_seeds, source_seeds
from starfast.starlight import StarlightOptions, StarResult, train_star
from starfast.training import (
    SpeedOptions, TrainedModel, TrainingDiverged, TrainingMetrics, evaluate, init_model, train_model, train_models_parallel,
)

STAR_SEED_START = 2000
# What each recorded star setting is called on the command line, for reuse refusals.
STAR_FLAGS = {
    "sources": "--sources",
    "t_sampling": "--t-sampling",
    "rematch_every": "--rematch-every",
    "ce_weight": "--ce-weight",
    "samples_per_step": "--samples-per-step",
    "rematch_async": "--rematch-async",
    "matcher": "--matcher",
    "match_restarts": "--star-match-restarts",
    "sinkhorn_lr": "--sinkhorn-lr",
    "sinkhorn_steps": "--sinkhorn-steps",
    "sinkhorn_temperature": "--sinkhorn-temperature",
    "sinkhorn_iterations": "--sinkhorn-iterations",
    "match_examples": "--match-examples",
    "ste_lr": "--ste-lr",
    "ste_steps": "--ste-steps",
    "recipe": "--star-epochs, --star-optimizer/--star-lr/--star-momentum/--star-weight-decay and the recipe flags",
}


@dataclass(frozen=True)
class ModelJob:
    """One model of a run directory: its role (``sources``/``heldout``) and seed."""

    role: str
    seed: int


def regular_jobs(sources: int, heldout: int) -> List[ModelJob]:
    """The ``sources`` source models (seeds 0..) and ``heldout`` held-out models (seeds 1000..) of a run."""
    return [ModelJob("sources", seed) for seed in source_seeds(sources)] + [
        ModelJob("heldout", seed) for seed in heldout_seeds(heldout)
    ]


@dataclass(frozen=True)
class ExtraSet:
    """A named set of extra held-out models trained with a recipe of its own (``--extra-heldout``),
    e.g. Adam solutions to measure an SGD star against (Appendix D.2, Figure 7). Its models live
    under the role ``extra/<name>`` with seeds ``3000..`` (:mod:`starfast.rundir`)."""

    name: str
    count: int
    recipe: Recipe

    def __post_init__(self) -> None:
        extra_role(self.name)  # each raises ValueError naming the flag
        extra_seeds(self.count)

    @property
    def role(self) -> str:
        return extra_role(self.name)

    def jobs(self) -> List[ModelJob]:
        return [ModelJob(self.role, seed) for seed in extra_seeds(self.count)]

    def to_dict(self) -> Dict[str, Any]:
        """What ``config.json`` records of the set (under ``extra_heldout.<name>``)."""
        return {"count": self.count, "recipe": self.recipe.to_dict()}


def model_metadata(spec: ModelSpec, dataset, recipe: Recipe, job: ModelJob, metrics: TrainingMetrics, speed: SpeedOptions, rank: int = 0) -> Dict[str, Any]:
    """The JSON stored beside a trained model."""
    return {
        "model": spec.to_dict(),
        "dataset": dataset.name,
        "role": job.role,
        "seed": job.seed,
        "recipe": recipe.to_dict(),
        "epochs": recipe.epochs,
        "metrics": metrics.to_dict(),
        "device": str(dataset.device),
        "precision": "bf16" if speed.autocast_dtype(torch.device(dataset.device)) else "fp32",
        "rank": rank,
        "versions": versions(),
    }


def _checkpoint_epoch(path: Path) -> int:
    return load_checkpoint(path)["epoch"] if path.exists() else 0


def train_missing_models(
    run: RunDir,
    spec: ModelSpec,
    dataset,
    recipe: Recipe,
    jobs: Sequence[ModelJob],
    *,
    parallel_seeds: int = 1,
    speed: SpeedOptions = SpeedOptions(),
    progress: bool = True,
    rank: int = 0,
    report: Callable[[str], None] = print,
    recipe_flags: str = "recipe flags",
    judge_learning: bool = True,
) -> Tuple[List[ModelJob], List[RuntimeError]]:
    """Train the unfinished ``jobs`` into ``run`` (finished models are never retrained; one trained
    with another recipe is refused, the message naming ``recipe_flags``).

    Each model resumes from its checkpoint, is saved with its metadata, then its checkpoint is
    removed. With ``parallel_seeds`` K > 1, models of one role whose checkpoints are at the same
    epoch are trained K at a time. ``report`` gets one line per trained model. Returns
    ``(trained_jobs, failures)``: a seed whose loss diverged (:class:`TrainingDiverged`) or that
    learned nothing (:class:`ModelDidNotLearn`; unless ``judge_learning`` is False, as in smoke runs,
    which are judged by completing) is not saved, and does not stop the others. A
    finished model whose file fails its checksum raises :class:`StoredFileError`.
    """
    if parallel_seeds < 1:
        raise ValueError(f"--parallel-seeds must be >= 1, got {parallel_seeds}")
    missing = [job for job in jobs if not run.is_finished(job.role, job.seed)]
    for job in jobs:
        if job not in missing:
            _, metadata = run.load_model(job.role, job.seed)  # a finished model is reused only if its checksum holds
            if metadata.get("recipe", recipe.to_dict()) != recipe.to_dict():
                raise RunDirError(
                    f"{run.model_path(job.role, job.seed).with_suffix('.json')} was trained with recipe "
                    f"{metadata['recipe']}, not {recipe.to_dict()}; use the same {recipe_flags} as before, another "
                    "--run-dir, or delete the model's files to train it again"
                )
    if len(missing) < len(jobs):
        report(f"reused {len(jobs) - len(missing)} trained models in {run.path}"
               + (f"; training {len(missing)}" if missing else ""))
    if not missing:
        return [], []
    groups: List[List[ModelJob]] = []
    for role in dict.fromkeys(job.role for job in missing):
        by_epoch: Dict[int, List[ModelJob]] = {}
        for job in (job for job in missing if job.role == role):
            epoch = _checkpoint_epoch(run.model_checkpoint_path(job.role, job.seed)) if parallel_seeds > 1 else 0
            by_epoch.setdefault(epoch, []).append(job)
        for same_epoch in by_epoch.values():
            groups += [same_epoch[i : i + parallel_seeds] for i in range(0, len(same_epoch), parallel_seeds)]

    trained: List[ModelJob] = []
    failures: List[RuntimeError] = []
    chance = LearningCheck.of(dataset)
    # Counted in model-epochs, so the ETA is known after the first epoch, not the first model.
    resumed = sum(_checkpoint_epoch(run.model_checkpoint_path(job.role, job.seed)) for job in missing)
    overall = progress_bar(total=len(missing) * recipe.epochs, initial=resumed,
                           desc=f"models × epochs (rank {rank})" if rank else "models × epochs", unit="epoch", enabled=progress)
    for group in groups:
        paths = [run.model_checkpoint_path(job.role, job.seed) for job in group]
        tick = lambda epoch, count=len(group): overall.update(count)  # noqa: E731
        if len(group) == 1:
            try:
                state_dict, metrics = train_model(
                    spec, dataset, recipe, group[0].seed, checkpoint_path=paths[0], progress=progress, speed=speed,
                    on_epoch_end=tick,
                )
                results, diverged = [TrainedModel(group[0].seed, state_dict, metrics)], []
            except TrainingDiverged as failure:
                results, diverged = [], [failure]
        else:
            results, diverged = train_models_parallel(
                spec, dataset, recipe, [job.seed for job in group], checkpoint_paths=paths, progress=progress, speed=speed,
                on_epoch_end=tick,
            )
        by_seed = {job.seed: (job, path) for job, path in zip(group, paths)}
        for result in results:
            job, path = by_seed[result.seed]
            failed = chance.failure(job, result.metrics, recipe) if judge_learning else None
            if failed is not None:
                failures.append(failed)
                path.unlink(missing_ok=True)  # retraining the same seed and recipe would fail the same way
                continue
            run.save_model(job.role, job.seed, result.state_dict, model_metadata(spec, dataset, recipe, job, result.metrics, speed, rank))
            path.unlink(missing_ok=True)
            trained.append(job)
            report(
                f"trained {job.role}/seed-{job.seed:04d} (rank {rank}): test accuracy {result.metrics.test_accuracy:.4f}, "
                f"train loss {result.metrics.train_loss:.4g}, {result.metrics.seconds:.1f} s"
            )
        failures += diverged
    overall.close()
    return trained, failures


IMPORT_KEY = "imported_from"  # in an imported model's JSON: the checkpoint's original path and SHA-256


def import_missing_models(
    run: RunDir,
    spec: ModelSpec,
    dataset,
    imports: Sequence[Tuple[ModelJob, Path]],
    *,
    flag: str,
    report: Callable[[str], None] = print,
) -> Tuple[List[ModelJob], List[RuntimeError]]:
    """Import each ``(job, checkpoint)`` of ``imports`` not yet in ``run`` (``flag`` names the option
    that gave the checkpoints): the checkpoint is read and fitted to ``spec``
    (:mod:`starfast.checkpoint_import`), evaluated on ``dataset``, and saved like a trained model
    with its metrics and its provenance (:data:`IMPORT_KEY`: original path and SHA-256) in its JSON.
    A model already imported from a checkpoint with the same bytes is reused; one trained here, or
    imported from other bytes, is refused. Returns ``(imported_jobs, failures)``: a model that
    learned nothing (:class:`LearningCheck`) is not saved."""
    skeleton: Optional[torch.nn.Module] = None
    chance = LearningCheck.of(dataset)
    imported: List[ModelJob] = []
    failures: List[RuntimeError] = []
    reused = 0
    for job, path in imports:
        if run.is_finished(job.role, job.seed):
            _check_import_origin(run, job, path, flag)
            run.load_model(job.role, job.seed)  # reused only if its checksum holds
            reused += 1
            continue
        if skeleton is None:
            skeleton = spec.build().to(dataset.device).eval()
        checkpoint = read_checkpoint(path)
        state = fit_state_dict(checkpoint, skeleton.state_dict(), f"--arch {spec.arch} with --arch-kw {spec.kwargs}")
        started = time.perf_counter()
        skeleton.load_state_dict(state)
        train_loss, train_accuracy = (value.item() for value in evaluate(skeleton, dataset, "train"))
        test_loss, test_accuracy = (value.item() for value in evaluate(skeleton, dataset, "test"))
        shortfall = chance.shortfall(train_accuracy, train_loss)
        if shortfall is not None:
            failures.append(ModelDidNotLearn(f"{checkpoint.path} ({flag}) learned nothing: {shortfall}; it was not imported"))
            continue
        metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "test_loss": test_loss,
                   "test_accuracy": test_accuracy, "seconds": time.perf_counter() - started}
        run.save_model(job.role, job.seed, state, {
            "model": spec.to_dict(), "dataset": dataset.name, "role": job.role, "seed": job.seed, "metrics": metrics,
            IMPORT_KEY: {"path": str(checkpoint.path.resolve()), "sha256": checkpoint.sha256},
            "versions": versions(),
        })
        imported.append(job)
        report(f"imported {job.role}/seed-{job.seed:04d} from {checkpoint.path}: test accuracy {test_accuracy:.4f}, "
               f"train loss {train_loss:.4g}")
    if reused:
        report(f"reused {reused} imported models in {run.path}")
    return imported, failures


def _check_import_origin(run: RunDir, job: ModelJob, path: Path, flag: str) -> None:
    """Refuse a finished model that was not imported from a checkpoint with ``path``'s bytes."""
    stored = run.model_path(job.role, job.seed)
    origin = run.read_metadata(job.role, job.seed).get(IMPORT_KEY)
    advice = f"use another --run-dir, or delete {stored} and its .json to import {path} in its place"
    if origin is None:
        raise RunDirError(f"{stored} was trained here, not imported; {flag} would put {path} in its place: {advice}")
    digest = file_digest(weights_file(path))
    if digest != origin["sha256"]:
        raise RunDirError(f"{stored} was imported from {origin['path']} (sha256 {origin['sha256'][:12]}...) but {flag} now "
                          f"gives {path} (sha256 {digest[:12]}...): {advice}")


class ModelDidNotLearn(RuntimeError):
    """A trained model ended at chance accuracy or no better than a uniform guess."""


@dataclass(frozen=True)
class LearningCheck:
    """When a trained model counts as having learned nothing: its final train accuracy is within
    ``ACCURACY_MARGIN`` of always answering the most frequent class, or its train loss is not below
    that of predicting the uniform distribution (ln C, or ln 2 for one binary logit)."""

    majority_rate: float
    uniform_loss: float

    ACCURACY_MARGIN = 0.01

    @classmethod
    def of(cls, dataset) -> "LearningCheck":
        _, labels = dataset.tensors("train")
        counts = torch.bincount(labels.long().flatten().cpu())
        classes = 2 if dataset.binary else dataset.num_classes
        return cls(float(counts.max()) / float(counts.sum()), math.log(classes))

    def shortfall(self, train_accuracy: float, train_loss: float) -> Optional[str]:
        """Why a model with these final train metrics learned nothing, or ``None`` when it learned."""
        at_chance = train_accuracy <= self.majority_rate + self.ACCURACY_MARGIN
        no_better = train_loss >= self.uniform_loss
        if not (at_chance or no_better):
            return None
        return (f"train accuracy {train_accuracy:.3f} (always answering the most frequent class gives "
                f"{self.majority_rate:.3f}), train loss {train_loss:.4g} (a uniform guess gives {self.uniform_loss:.4g})")

    def failure(self, job: ModelJob, metrics: TrainingMetrics, recipe: Recipe) -> Optional[ModelDidNotLearn]:
        shortfall = self.shortfall(metrics.train_accuracy, metrics.train_loss)
        if shortfall is None:
            return None
        return ModelDidNotLearn(
            f"{job.role} seed {job.seed} learned nothing: {shortfall} after {recipe.epochs} epochs at lr {recipe.lr}; it "
            "was not saved. Change the recipe (--lr, --epochs, ...)"
        )


def train_missing_stars(
    run: RunDir,
    spec: ModelSpec,
    dataset,
    recipe: Recipe,
    options: StarlightOptions,
    *,
    star_seeds: int,
    sources: Sequence[int],
    star_set: str = MAIN_STARS,
    flags: Mapping[str, str] = STAR_FLAGS,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    report: Callable[[str], None] = print,
) -> List[int]:
    """Train the stars ``0 .. star_seeds-1`` of ``star_set`` that are not finished, with Starlight
    against the ``sources`` (seeds of finished source models), and return the seeds trained.

    Under ``torch.distributed`` every rank trains (data parallel), rank 0 writes, and ``barrier``
    is called after each star. ``flags`` names, per recorded setting, the flag that changes it.
    """
    missing = [seed for seed in sources if not run.is_finished("sources", seed)]
    if missing:
        raise RunDirError(f"source models {missing[:5]} are not trained; run --stage models first (or --stage all)")
    wanted = {"sources": list(sources), **options.to_dict(), "recipe": recipe.to_dict()}
    todo = []
    for star_seed in range(star_seeds):
        if star_seed in run.finished_stars(star_set):
            _check_star_settings(run, star_seed, star_set, wanted, flags)
            run.load_star(star_seed, star_set)  # reused only if its checksum holds
        else:
            todo.append(star_seed)
    if not todo:
        return []
    skeleton = spec.build()
    space, permutation_spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    bank = torch.stack([checked_row(run.model_path("sources", seed), run.load_model("sources", seed)[0], space) for seed in sources])
    resumed = sum(_checkpoint_epoch(run.star_checkpoint_path(star_seed, star_set)) for star_seed in todo)
    overall = progress_bar(total=len(todo) * recipe.epochs, initial=resumed, desc="stars × epochs", unit="epoch",
                           enabled=progress and rank == 0)
    for star_seed in todo:
        checkpoint = run.star_checkpoint_path(star_seed, star_set)
        seed = STAR_SEED_START + star_seed
        result = train_star(
            skeleton, bank, permutation_spec, dataset, recipe, options, space=space,
            init_row=space.flatten(init_model(spec, seed)), seed=seed, device=device, checkpoint_path=checkpoint,
            quiet=not progress, on_epoch_end=lambda epoch: overall.update(1),
        )
        if rank == 0:
            run.save_star(star_seed, result.state_dict, star_metadata(star_seed, result, sources, spec, dataset), star_set)
            checkpoint.unlink(missing_ok=True)
            metrics = result.metrics
            report(f"star {star_seed}: loss at the star {metrics['final_loss']:.4g}, mean interpolated loss "
                   f"{metrics['mean_interpolated_loss']:.4g}, {metrics['seconds']:.1f} s")
        barrier()
    overall.close()
    return todo


def star_metadata(star_seed: int, result: StarResult, sources: Sequence[int], spec: ModelSpec, dataset) -> Dict[str, Any]:
    """The JSON stored beside a star: its settings (options, seed, recipe), metrics and origin."""
    return {"star_seed": star_seed, **result.settings, "metrics": result.metrics, "sources": list(sources),
            "model": spec.to_dict(), "dataset": dataset.name}


def _check_star_settings(run: RunDir, star_seed: int, star_set: str, wanted: Mapping[str, Any], flags: Mapping[str, str]) -> None:
    """Refuse a finished star that was trained on other sources or with other settings. A star
    recorded before an option existed was trained with that option's default (e.g. ``matcher``:
    weight matching)."""
    stored = {**StarlightOptions().to_dict(), **run.read_star_metadata(star_seed, star_set)}
    for key, value in wanted.items():
        if stored.get(key) != value:
            path = run.star_path(star_seed, star_set).with_suffix(".json")
            raise RunDirError(
                f"{path} was trained with {key} = {stored.get(key)!r}, not {value!r}; use the same {flags[key]} as "
                f"before, another --run-dir, or delete the star's files to train it again"
            )
