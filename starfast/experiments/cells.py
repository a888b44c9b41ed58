"""Executing one cell of a sweep: its run directory's stages, each doing only what is missing.

:func:`run_cell` takes the run directory's lock, writes its config (counts of models only grow:
a run directory serves every experiment that shares its model and recipe), trains the missing
source and held-out models and those of its extra held-out sets
(:func:`starfast.pipeline.train_missing_models`), then for each point
trains the missing stars of its star set (:func:`starfast.pipeline.train_missing_stars`, which
reuses a finished star only when its recorded sources and settings are the ones asked for) and
measures it (:func:`starfast.experiments.measure.measure_point`, every curve stored). Every stage
resumes, so a cell killed anywhere (a pre-empted cluster job) continues where it stopped when it is
run again, and a cell run a second time trains and measures nothing.

:class:`CellTask` is the cell as a picklable call, what a launcher submits
(:mod:`starfast.experiments.launch`); :func:`cell_tasks` places each cell in its run directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from starfast import data, smoke
from starfast.experiments.measure import measure_point
from starfast.experiments.plan import Cell
from starfast.models import ModelSpec
from starfast.pipeline import regular_jobs, train_missing_models, train_missing_stars
from starfast.rundir import RunDir, experiment_star_set, source_seeds


class CellFailed(RuntimeError):
    """A cell could not finish (a model that diverged or learned nothing); the message says which."""


def run_cell(experiment: str, cell: Cell, run: RunDir, *, device: torch.device, data_dir: Optional[Path] = None,
             progress: bool = True, on_point: Callable[[], None] = lambda: None, smoke_run: bool = False) -> List[Dict[str, Any]]:
    """Run ``cell`` in ``run`` (see the module docstring); returns each point's measurements, and
    calls ``on_point`` after each point. A smoke run (:mod:`starfast.smoke`) reads the smoke subset
    of the data and keeps models that learned nothing."""
    def report(line: str) -> None:
        if progress:
            tqdm.write(line)

    with run.locked(f"python -m starfast.experiments {experiment} (cell {cell.key or 'base'})"):
        dataset = data.load(cell.run.dataset, data_dir=data_dir, device=device)
        if smoke_run:
            dataset = smoke.dataset(dataset)
        spec = ModelSpec.for_dataset(cell.run.arch, dataset, dict(cell.run.arch_kw))
        stored = run.read_config() or {}
        counts = {role: max(wanted, stored.get(role) if isinstance(stored.get(role), int) else 0)
                  for role, wanted in (("sources", cell.run.sources), ("heldout", cell.run.heldout))}
        extra_sets = {**stored.get("extra_heldout", {}), **{extra.name: extra.to_dict() for extra in cell.run.extra_sets}}
        run.prepare({"model": spec.to_dict(), "dataset": dataset.name, "recipe": cell.run.recipe.to_dict(), **counts,
                     **({"extra_heldout": extra_sets} if extra_sets else {})})
        regular = regular_jobs(cell.run.sources, cell.run.heldout)
        for recipe, jobs in [(cell.run.recipe, regular), *((extra.recipe, extra.jobs()) for extra in cell.run.extra_sets)]:
            _, failures = train_missing_models(run, spec, dataset, recipe, jobs, progress=progress, report=report,
                                               judge_learning=not smoke_run)
            if failures:
                raise CellFailed(f"{run.path}: {len(failures)} model(s) could not be trained, first: {failures[0]}")
        measured = []
        for point in cell.points:
            star_set = experiment_star_set(point.stars.name(cell.run.star_recipe))
            train_missing_stars(
                run, spec, dataset, cell.run.star_recipe, point.stars.options, star_seeds=point.stars.seeds,
                sources=source_seeds(point.stars.sources), star_set=star_set, device=device, progress=progress, report=report,
            )
            measured.append(measure_point(run, dataset, point, star_set, device=device, progress=progress))
            on_point()
    return measured


@dataclass(frozen=True)
class CellTask:
    """``run_cell`` of one cell as a picklable call (``folder`` is the cell's run directory).
    ``on_point`` is for a task run in this process (a progress bar); leave it unset for a task sent
    elsewhere."""

    experiment: str
    cell: Cell
    folder: str
    device: str = "cpu"
    data_dir: Optional[str] = None
    progress: bool = True
    on_point: Optional[Callable[[], None]] = field(default=None, compare=False)
    smoke: bool = False

    def __call__(self) -> List[Dict[str, Any]]:
        return run_cell(self.experiment, self.cell, RunDir(self.folder), device=torch.device(self.device),
                        data_dir=None if self.data_dir is None else Path(self.data_dir), progress=self.progress,
                        on_point=self.on_point or (lambda: None), smoke_run=self.smoke)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook when a job is pre-empted or times out: submit the same task again; its
        stages resume from what the run directory holds."""
        import submitit  # only reached inside a submitit job

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def cell_tasks(experiment: str, cells: Sequence[Cell], base: RunDir, *, device: str = "cpu",
               data_dir: Optional[Path] = None, progress: bool = True, smoke_run: bool = False) -> List[CellTask]:
    """One task per cell: the base run directory for the cell of the base model and recipe
    (key ``""``), ``base.variant(key)`` for the others."""
    return [CellTask(experiment, cell, str((base.variant(cell.key) if cell.key else base).path), device,
                     None if data_dir is None else str(data_dir), progress, smoke=smoke_run) for cell in cells]
