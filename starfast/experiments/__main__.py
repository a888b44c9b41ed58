"""``python -m starfast.experiments NAME``: one of the paper's experiments, end to end.

Builds the experiment's cells from its description (:mod:`starfast.experiments.catalog`) and the
preset (``--preset quick``: bundled digits on a CPU; ``paper``: CIFAR-10 at the paper's settings)
with the flags' overrides, runs them through a launcher (``--launcher local`` or ``submitit``),
and publishes ``RUN/experiments/NAME/{results.json, table.md, figure.png}`` as a unit, printing the
table and a one-line verdict; a run in which a cell failed writes to ``NAME/incomplete/`` instead,
leaving earlier complete results as they were. Everything already in the run directories (models, stars, measured curves) is
reused, so a second invocation trains and measures nothing. ``--list`` shows the experiments.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from starfast import data, models, smoke
from starfast.arguments import DATA_ERRORS, check_data_dir, name_parser, parse_arch_kw, parse_arguments, parse_device, run_command
from starfast.environment import environment
from starfast.experiments.catalog import EXPERIMENTS, PRESETS, Experiment
from starfast.experiments.cells import cell_tasks
from starfast.experiments.launch import LAUNCHERS, LauncherError, make_executor, run_cells
from starfast.experiments.output import OUTPUT_NAMES, format_table, verdict, write_outputs
from starfast.experiments.plan import spelled
from starfast.files import StoredFileError
from starfast.names import resolve_name
from starfast.progress import progress_bar
from starfast.rundir import RunDir

SMOKE_VALUES = 1  # a smoke run measures the first value of the sweep (unless --values says otherwise)
INCOMPLETE_NAME = "incomplete"  # RUN/experiments/NAME/incomplete: the outputs of a run in which a cell failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starfast.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", type=name_parser(lambda text: resolve_name("experiment", text, list(EXPERIMENTS))),
                        metavar="NAME", help=f"the experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--list", action="store_true", help="list the experiments and what they reproduce")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick: bundled digits, minutes on a CPU (default); paper: CIFAR-10 at the paper's settings")
    parser.add_argument("--run-dir", type=Path, help="base run directory (default: runs/experiments-<preset>); outputs go to "
                                                     "RUN/experiments/NAME (NAME-ce_weight=λ with --ce-weight, "
                                                     "NAME-star_epochs=E with --star-epochs, ...)")
    parser.add_argument("--values", help="the sweep's values, comma-separated (default: the preset's; see --list)")
    parser.add_argument("--sources", type=int, help="source models per star set (or the pool of them) instead of the preset's")
    parser.add_argument("--heldout", type=int, help="held-out models measured against the stars instead of the preset's")
    parser.add_argument("--star-seeds", type=int, help="stars per point instead of the preset's (perturbation: samples per radius)")
    parser.add_argument("--ce-weight", type=float, default=0.0, metavar="LAMBDA",
                        help="λ of the stars' cross-entropy term (Section 4.2; 1 gives Table 11 with `sources`)")
    parser.add_argument("--dataset", type=name_parser(data.canonical_name), help="dataset instead of the preset's")
    parser.add_argument("--arch", type=name_parser(models.canonical_name), help="architecture instead of the preset's")
    parser.add_argument("--arch-kw", type=parse_arch_kw, action="append", default=[], metavar="KEY=VALUE",
                        help="architecture option, repeatable (replaces the preset's options as a whole)")
    parser.add_argument("--epochs", type=int, help="epochs of the regular models instead of the recipe's")
    parser.add_argument("--star-epochs", type=int, help="epochs of the stars (default: the main job's rule)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: cells in this process (or --workers processes); submitit: Slurm jobs (pip install submitit)")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once by --launcher local (default: 1)")
    parser.add_argument("--launcher-kw", type=parse_arch_kw, action="append", default=[], metavar="KEY=VALUE",
                        help="submitit parameter, repeatable (e.g. slurm_partition=gpu, timeout_min=600, gpus_per_node=1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", type=Path, help="where file-based datasets live")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-model lines")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smoke run of the preset: its dataset, model and recipes on {smoke.TRAIN_EXAMPLES} train / "
                             f"{smoke.TEST_EXAMPLES} test examples, {smoke.EPOCHS} epoch per model and star, at most "
                             f"{smoke.SIZES['sources']} sources, {smoke.SIZES['heldout']} held-out models and "
                             f"{smoke.SIZES['star_seeds']} star per point, the sweep's first value (default "
                             "run directory runs/experiments-<preset>-smoke); its numbers mean nothing")
    return parser


def listing() -> str:
    lines = []
    for experiment in EXPERIMENTS.values():
        values = ", ".join(f"{preset}: {','.join(spelled(value) for value in experiment.values[preset])}" for preset in PRESETS)
        lines.append(f"{experiment.name:13s} {experiment.paper}: {experiment.summary} ({experiment.axis}; {values})")
    return "\n".join(lines)


def _values(experiment: Experiment, text: Optional[str], preset: str) -> List[Any]:
    if text is None:
        return list(experiment.values[preset])
    try:
        return [experiment.parse(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--values {text!r} for {experiment.name} ({experiment.axis}): {error}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.list:
        print(listing())
        return 0
    if args.name is None:
        parser.error("name an experiment (one of: " + ", ".join(EXPERIMENTS) + "), or use --list")
    experiment: Experiment = EXPERIMENTS[args.name]
    started = time.perf_counter()
    try:
        for flag in ("sources", "heldout", "star_seeds", "epochs", "star_epochs"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        sizes = {**experiment.sizes[args.preset],
                 **{key: getattr(args, key) for key in ("sources", "heldout", "star_seeds") if getattr(args, key) is not None}}
        settings = experiment.settings(args.preset, dataset=args.dataset, arch=args.arch, arch_kw=dict(args.arch_kw),
                                       epochs=args.epochs, star_epochs=args.star_epochs, ce_weight=args.ce_weight)
        values = _values(experiment, args.values, args.preset)
        if args.smoke:
            sizes = {key: min(count, smoke.SIZES[key]) for key, count in sizes.items()}
            settings = replace(settings, recipe=smoke.recipe(settings.recipe), star_recipe=smoke.recipe(settings.star_recipe),
                               note=f"{smoke.BANNER} (a smoke run of: {settings.note})")
            values = values if args.values else values[:SMOKE_VALUES]
            print(smoke.BANNER)
        cells = experiment.cells(settings, values, sizes)
        check_data_dir(args.data_dir)
        parse_device(args.device)
        base = RunDir(args.run_dir or Path("runs") / f"experiments-{args.preset}{'-smoke' if args.smoke else ''}")
        # Stars with the cross-entropy term (Table 11) or other epochs are written beside the preset's, not over them.
        output_name = "-".join([experiment.name, *(f"{flag}={spelled(getattr(args, flag))}"
                                                   for flag in ("ce_weight", "epochs", "star_epochs") if getattr(args, flag))])
        executor = make_executor(args.launcher, workers=args.workers, folder=base.experiment_folder(output_name) / "launcher",
                                 options=dict(args.launcher_kw))
    except (ValueError, TypeError, LauncherError) as error:
        parser.error(str(error))
    tasks = cell_tasks(experiment.name, cells, base, device=args.device, data_dir=args.data_dir, progress=not args.quiet,
                       smoke_run=args.smoke)
    bar = progress_bar(total=sum(len(cell.points) for cell in cells), desc=f"{experiment.name} sweep", unit="point",
                       enabled=not args.quiet)
    try:
        measured, errors = run_cells(tasks, executor, on_point=lambda: bar.update(1))
    finally:
        bar.close()
        shutdown = getattr(executor, "shutdown", None)
        if callable(shutdown):
            shutdown()
    for key, message in errors.items():
        print(f"error: cell {key or 'base'}: {message}", file=sys.stderr)
    points = [point for cell in cells for point in measured.get(cell.key, [])]
    order = {repr(value): index for index, value in enumerate(values)}
    points.sort(key=lambda point: order.get(repr(_as_value(point["value"])), len(order)))
    missing = [point.label for cell in cells if cell.key in errors for point in cell.points]
    results: Dict[str, Any] = {
        "experiment": experiment.name, "paper": experiment.paper, "preset": args.preset, "ce_weight": args.ce_weight,
        "note": settings.note,
        "analogue": experiment.analogue.get(args.preset, ""), "paper_numbers": experiment.paper_numbers,
        "dataset": settings.dataset, "model": f"{settings.arch} {dict(settings.arch_kw) or ''}".rstrip(),
        "recipe": settings.recipe.to_dict(), "star_recipe": settings.star_recipe.to_dict(), "axis": experiment.axis,
        "cells": {cell.key or "base": tasks[index].folder for index, cell in enumerate(cells)},
        "points": points, "failed": errors, "smoke": args.smoke,
        "verdict": (f"verdict ({experiment.name}): none: a smoke run, judged by completing; its numbers mean nothing"
                    if args.smoke else verdict(experiment, points, missing)),
        "curves_measured_now": sum(point["measured_now"] for point in points),
        "environment": environment(torch.device(args.device)),
        "seconds": time.perf_counter() - started,
    }
    # A run with a failed cell never replaces complete results: its outputs go to NAME/incomplete/.
    complete = base.experiment_folder(output_name)
    folder = complete / INCOMPLETE_NAME if errors else complete
    try:
        with base.locked(f"python -m starfast.experiments {experiment.name} (writing results)"):
            base.publish(folder, lambda pending: write_outputs(pending, experiment, results), owned=OUTPUT_NAMES)
            if not errors and (complete / INCOMPLETE_NAME).is_dir():
                shutil.rmtree(complete / INCOMPLETE_NAME)  # superseded by these complete results
    except (StoredFileError, OSError, *DATA_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(experiment, points))
    print(results["verdict"])
    names = [name for name in OUTPUT_NAMES if (folder / name).exists()]
    print(f"({results['seconds']:.1f} s; written to {folder}/{', '.join(names)})")
    if args.smoke:
        print(smoke.BANNER)
    if errors:
        kept = " (the complete results of an earlier run there are kept)" if (complete / "results.json").exists() else ""
        print(f"error: {len(errors)} of {len(cells)} cells failed; these partial results are in {folder}, not in "
              f"{complete}{kept}; fix the errors above and run again: finished work is reused", file=sys.stderr)
        return 1
    return 0


def _as_value(value: Any) -> Any:
    """A point's value as the sweep spells it (JSON turned width-depth's tuples into lists)."""
    return tuple(value) if isinstance(value, list) else value


if __name__ == "__main__":
    run_command(main, "python -m starfast.experiments " + " ".join(sys.argv[1:]))
