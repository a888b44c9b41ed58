"""``python -m starfast.train``: the command line of the main job, stage by stage.

This module owns argument parsing, the run context shared by the stages (run directory, device,
dataset, model spec, recipes, distributed rank) and the list of stages. ``--stage models`` trains
the missing source (seeds 0..N-1) and held-out (seeds 1000..1000+H-1) models into the run
directory, and the models of every ``--extra-heldout NAME:COUNT[:KEY=VALUE,...]`` set (seeds
3000.., trained with the regular recipe changed by the set's own values: e.g. Adam solutions for
Appendix D.2), which the evaluation measures against the stars; ``--stage star`` trains
``--star-seeds`` star models with Starlight against all the sources (star seed s is initialised
from seed ``2000 + s``, apart from the source and held-out seeds), with the regular recipe changed
by ``--star-epochs``, ``--star-optimizer``, ``--star-lr``, ``--star-momentum`` and
``--star-weight-decay`` (a star optimizer other than the regular one does not inherit ``--lr``);
``--sources-from PATTERN`` and ``--heldout-from PATTERN`` import those models from checkpoints
trained elsewhere instead (:mod:`starfast.checkpoint_import`, :func:`starfast.pipeline.import_missing_models`);
``--stage evaluate`` measures the barriers and writes the report; ``--stage all`` (the default)
runs models, star and evaluate, reusing whatever the run directory already holds.

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set) the models are sharded over the
processes: rank r trains the r-th, (r+W)-th, ... model of the full list (sources, then held-out),
on ``cuda:LOCAL_RANK`` (or the CPU). The process group (NCCL on CUDA, gloo on CPU) is created only
when ``WORLD_SIZE > 1``; rank 0 writes the config before and the summary after a barrier.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from starfast import data, models, smoke
from starfast.allocator import keep_freed_memory
from starfast.arguments import (
    DATA_ERRORS, check_data_dir, name_parser, parse_arch_kw, parse_arguments, parse_device, parse_extra_heldout,
    parse_milestones, run_command, auto_or_count,
)
from starfast.evaluate import add_evaluation_flags, evaluation_config, matcher_fields, run_evaluation
from starfast.evaluation import EvaluationConfig
from starfast.files import StoredFileError, write_json
from starfast.matchers import MATCHERS
from starfast.models import ModelSpec
from starfast.workload import Workload, choose_workload
from starfast.checkpoint_import import find_checkpoints
from starfast.pipeline import ExtraSet, ModelJob, import_missing_models, regular_jobs, train_missing_models, train_missing_stars
from starfast.recipes import (
    MAIN_JOB_ARCH_KW, OPTIMIZERS, SCHEDULES, STAR_EPOCHS_FACTOR, Recipe, default_star_epochs, main_job_arch_kw, resolve,
    resolve_own,
)
from starfast.rundir import RunDir, heldout_seeds, source_seeds
from starfast.starlight import T_SAMPLINGS, StarlightDiverged, StarlightOptions
from starfast.training import PRECISIONS, SpeedOptions, TrainingDiverged
from starfast.training_common import steps_per_epoch


ARCH_KW_DEFAULTS_HELP = ", ".join(
    f"{' '.join(f'{key}={value}' for key, value in options.items())} for {arch} on {dataset}"
    for (arch, dataset), options in MAIN_JOB_ARCH_KW.items()
)
RECIPE_FLAGS = ("lr", "batch_size", "optimizer", "weight_decay", "momentum", "schedule", "milestones", "gamma", "label_smoothing", "epochs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m starfast.train",
        description="Train source and held-out models (and, in later stages, a star model) into a run directory.",
    )
    parser.add_argument("--stage", choices=sorted(STAGES), default="all", help="what to run (default: all)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<dataset>-<arch>)")
    parser.add_argument("--arch", type=name_parser(models.canonical_arch), default="mlp", metavar="NAME",
                        help=f"architecture: {', '.join(models.names())}; family names "
                             f"{', '.join(models.ALIASES)} also work; or your own network: package.module:factory or "
                             "path/to/file.py:factory, a function given the --arch-kw values and whichever of "
                             "num_classes, in_channels, input_shape it names (default: mlp)")
    parser.add_argument("--arch-kw", type=parse_arch_kw, action="append", default=[], metavar="KEY=VALUE",
                        help="architecture option, repeatable (e.g. --arch-kw width=64); default: none, except "
                             f"{ARCH_KW_DEFAULTS_HELP} (replaced as a whole by any --arch-kw)")
    parser.add_argument("--dataset", type=name_parser(data.canonical_name), default="digits", metavar="NAME",
                        help=f"dataset: {', '.join(data.names())} (default: digits)")
    parser.add_argument("--data-dir", type=Path, help="where file-based datasets live (default: $STARFAST_DATA or ~/.cache/starfast)")
    parser.add_argument("--sources", type=int, help="number of source models, seeds 0..N-1 (default: 10, or as many "
                                                    "as --sources-from names)")
    parser.add_argument("--heldout", type=int, help="number of held-out models, seeds 1000.. (default: 5, or as many as "
                                                    "--heldout-from names)")
    parser.add_argument("--sources-from", metavar="PATTERN",
                        help="import the source models from checkpoints trained elsewhere instead of training them: a "
                             "glob or a folder of .safetensors/.pt/.pth/.bin state dicts (also under a 'state_dict' or "
                             "'model' key) or Hugging Face-style folders, in natural order as seeds 0..")
    parser.add_argument("--heldout-from", metavar="PATTERN", help="import the held-out models likewise (seeds 1000..)")
    parser.add_argument("--extra-heldout", type=parse_extra_heldout, action="append", default=[],
                        metavar="NAME:COUNT[:KEY=VALUE,...]",
                        help="an extra held-out set, repeatable: COUNT models (seeds 3000..) in RUN/extra/NAME trained with "
                             "the recipe changed by KEY=VALUE (optimizer, lr, momentum, weight_decay, schedule, gamma, "
                             "epochs, batch_size, label_smoothing), evaluated against the stars (kinds star_NAME and "
                             "NAME_NAME); e.g. adam:3:optimizer=adam (lr 1e-3 unless given)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if available); under torchrun cuda means cuda:LOCAL_RANK")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-model lines")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smoke run: the same code path on {smoke.TRAIN_EXAMPLES} train / {smoke.TEST_EXAMPLES} test "
                             f"examples, {smoke.EPOCHS} epoch per model and star, at most {smoke.SIZES['sources']} sources, "
                             f"{smoke.SIZES['heldout']} held-out models and {smoke.SIZES['star_seeds']} star (default "
                             "run directory runs/<dataset>-<arch>-smoke); its numbers mean nothing")

    recipe = parser.add_argument_group("recipe overrides (defaults: Appendix B of the paper, or a short preset for bundled data)")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--optimizer", choices=OPTIMIZERS)
    recipe.add_argument("--weight-decay", type=float)
    recipe.add_argument("--momentum", type=float)
    recipe.add_argument("--schedule", choices=SCHEDULES)
    recipe.add_argument("--milestones", type=parse_milestones, help="epochs of the step schedule, e.g. 100,150")
    recipe.add_argument("--gamma", type=float, help="step schedule factor")
    recipe.add_argument("--label-smoothing", type=float)

    star = parser.add_argument_group("star model (Starlight, Algorithm 1)")
    star.add_argument("--star-seeds", type=int, default=3, metavar="K", help="number of star models, seeds 0..K-1 (default: 3)")
    star.add_argument("--star-epochs", type=int,
                      help="epochs of star training (default: the recipe's epochs, times "
                           f"{', '.join(f'{factor} on {name}' for name, factor in STAR_EPOCHS_FACTOR.items())})")
    star.add_argument("--star-optimizer", choices=OPTIMIZERS,
                      help="the star's optimizer (default: the regular recipe's; another one does not inherit --lr)")
    star.add_argument("--star-lr", type=float, help="the star's learning rate (default: --lr, or the optimizer's default)")
    star.add_argument("--star-momentum", type=float, help="the star's SGD momentum (default: --momentum)")
    star.add_argument("--star-weight-decay", type=float, help="the star's weight decay (default: --weight-decay)")
    star.add_argument("--t-sampling", choices=T_SAMPLINGS, default="uniform",
                      help="distribution of t: uniform = Unif[0,1] (the paper), beta = Beta(2,2), constant = 0.5")
    star.add_argument("--rematch-every", type=int, metavar="M", help="re-match the sources every M batches (default: every epoch)")
    star.add_argument("--ce-weight", type=float, default=0.0, metavar="LAMBDA",
                      help="add LAMBDA * loss at the star itself (Section 4.2; default 0)")
    star.add_argument("--samples-per-step", type=int, default=1, metavar="S",
                      help="split each batch into S chunks with their own (n, t) (default: 1)")
    star.add_argument("--rematch-async", action="store_true", help="re-match in a background thread while training")
    star.add_argument("--matcher", choices=MATCHERS, default="wm",
                      help="permutation finder of Starlight's re-matching: wm = weight matching, sinkhorn = Sinkhorn "
                           "re-basin (options --sinkhorn-*), am = activation matching (--match-examples), ste = "
                           "straight-through matching (--ste-*, --match-examples), none = no permutation (default: wm)")
    star.add_argument("--star-match-restarts", type=int, default=1, metavar="R",
                      help="restarts of every re-match per source, batched, the best kept (restart 0 warm-starts from "
                           "the previous match; default: 1)")
    add_evaluation_flags(parser)

    speed = parser.add_argument_group("speed")
    speed.add_argument("--parallel-seeds", type=auto_or_count, metavar="K|auto",
                       help="train K seeds at once (stacked parameters; default auto: 8 for small MLP-family models, else 1)")
    speed.add_argument("--threads", type=auto_or_count, metavar="N|auto",
                       help="torch's intra-op threads (default auto: 1 for models under 2M parameters on a CPU, else torch's "
                            "default; OMP_NUM_THREADS counts as a choice)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    speed.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto = bf16 autocast on CUDA, fp32 on CPU")
    return parser


@dataclass
class Distributed:
    """This process's place among the torchrun processes (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


@dataclass(frozen=True)
class RunContext:
    """Everything a stage needs, built once from the flags by :func:`build_context`."""

    run: RunDir
    device: torch.device
    dataset: Any
    spec: ModelSpec
    recipe: Recipe
    star_recipe: Recipe
    extra_sets: Tuple[ExtraSet, ...]
    imports: Dict[str, Tuple[str, List[Path]]]  # role -> (the flag, the checkpoints to import as its seeds)
    star_options: StarlightOptions
    evaluation: EvaluationConfig
    speed: SpeedOptions
    sources: int
    heldout: int
    star_seeds: int
    workload: Workload
    progress: bool
    distributed: Distributed
    smoke: bool = False

    def config(self) -> Dict[str, Any]:
        config = {
            "model": self.spec.to_dict(),
            "dataset": self.dataset.name,
            "recipe": self.recipe.to_dict(),
            "sources": self.sources,
            "heldout": self.heldout,
            "star_seeds": self.star_seeds,
        }
        if self.extra_sets:
            config["extra_heldout"] = {extra.name: extra.to_dict() for extra in self.extra_sets}
        return config

    def model_sets(self) -> List[Tuple[Recipe, List[ModelJob], str]]:
        """``(recipe, jobs, the flags that set the recipe)`` of the regular models and of each extra set."""
        return [(self.recipe, regular_jobs(self.sources, self.heldout), "recipe flags")] + [
            (extra.recipe, extra.jobs(), f"--extra-heldout {extra.name}:... (and the recipe flags)") for extra in self.extra_sets
        ]

    def report(self, line: str) -> None:
        if self.progress:
            tqdm.write(line)


def models_stage(context: RunContext) -> int:
    """Import the models given by ``--sources-from``/``--heldout-from`` (rank 0), and train the
    missing source, held-out and extra held-out models (this rank's share of them)."""
    distributed = context.distributed
    failures: List[RuntimeError] = []
    imported_roles = set(context.imports)
    if distributed.rank == 0:
        for role, (flag, checkpoints) in context.imports.items():
            jobs = [job for job in regular_jobs(context.sources, context.heldout) if job.role == role]
            failures += import_missing_models(context.run, context.spec, context.dataset, list(zip(jobs, checkpoints)),
                                              flag=flag, report=context.report)[1]
    sets = [(recipe, [job for job in jobs if job.role not in imported_roles], flags)
            for recipe, jobs, flags in context.model_sets()]
    share = set([job for _, jobs, _ in sets for job in jobs][distributed.rank :: distributed.world_size])
    for recipe, jobs, flags in sets:
        failures += train_missing_models(
            context.run, context.spec, context.dataset, recipe, [job for job in jobs if job in share],
            parallel_seeds=context.workload.parallel_seeds, speed=context.speed, progress=context.progress,
            rank=distributed.rank, report=context.report, recipe_flags=flags, judge_learning=not context.smoke,
        )[1]
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    distributed.barrier()
    if distributed.rank == 0:
        summarise_models(context)
    return 1 if failures else 0


def summarise_models(context: RunContext) -> None:
    """Write ``RUN/models.json`` (metrics per finished model, per role) and print mean accuracies."""
    run = context.run
    summary: Dict[str, Any] = {}
    for role in ("sources", "heldout", *run.extra_roles()):
        metrics = {seed: run.read_metadata(role, seed)["metrics"] for seed in run.finished_seeds(role)}
        summary[role] = {f"seed-{seed:04d}": values for seed, values in metrics.items()}
        if metrics and context.progress:
            accuracies = [values["test_accuracy"] for values in metrics.values()]
            losses = [values["train_loss"] for values in metrics.values()]
            spread = statistics.pstdev(accuracies)
            print(f"{role}: {len(metrics)} models, test accuracy {statistics.mean(accuracies):.4f} ± {spread:.4f}, "
                  f"train loss {statistics.mean(losses):.4g}")
    write_json(run.models_summary_path, summary)


def star_stage(context: RunContext) -> int:
    """Train the missing star models (Starlight) against every source model of the run."""
    train_missing_stars(
        context.run, context.spec, context.dataset, context.star_recipe, context.star_options,
        star_seeds=context.star_seeds, sources=source_seeds(context.sources), device=context.device,
        progress=context.progress, rank=context.distributed.rank, barrier=context.distributed.barrier,
        report=context.report,
    )
    return 0


def evaluate_stage(context: RunContext) -> int:
    """Measure the barriers of the run and write RUN/results (rank 0 only)."""
    if context.distributed.rank != 0:
        return 0
    return run_evaluation(context.run, context.dataset, context.evaluation, context.device, progress=context.progress)


def plan_line(context: RunContext, stage: str) -> str:
    """One line saying what ``stage`` will run: the models and stars still to train (what the run
    directory already holds is reused) and the barriers' points per pair."""
    run, parts = context.run, []
    if stage in ("all", "models"):
        jobs = [job for _, jobs, _ in context.model_sets() for job in jobs]
        todo = [job for job in jobs if not run.is_finished(job.role, job.seed)]
        parts.append(f"{len(todo)} models × {context.recipe.epochs} epochs" + (f" ({len(jobs) - len(todo)} reused)" if len(todo) < len(jobs) else ""))
    if stage in ("all", "star"):
        finished = set(run.finished_stars())
        todo_stars = [seed for seed in range(context.star_seeds) if seed not in finished]
        parts.append(f"{len(todo_stars)} stars × {context.star_recipe.epochs} epochs against {context.sources} sources"
                     + (f" ({context.star_seeds - len(todo_stars)} reused)" if len(todo_stars) < context.star_seeds else ""))
    if stage in ("all", "evaluate"):
        parts.append(f"barriers of every star and model pair at {context.evaluation.ts} points")
    return f"plan: {', then '.join(parts)}; the ETA follows the first epoch"


# Five held-out models: with three, the bootstrap interval of the star-minus-regular difference
# (over models and matchings) spanned zero on a fresh default run (-0.163 to 0.002) although the
# ratio was 0.44; five gave -0.107 to -0.007 (README, "Why these defaults").
DEFAULT_HELDOUT = 5

Stage = Callable[[RunContext], int]
STAGES: Dict[str, Sequence[Stage]] = {
    "models": (models_stage,),
    "star": (star_stage,),
    "evaluate": (evaluate_stage,),
    "all": (models_stage, star_stage, evaluate_stage),
}


def recipe_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The recipe overrides the regular flags give (``None`` where a flag is absent)."""
    return {name: getattr(args, name) for name in RECIPE_FLAGS}


def star_recipe_flags(args: argparse.Namespace, star_epochs: int) -> Dict[str, Any]:
    """The star's own overrides on top of :func:`recipe_flags` (``--star-epochs``, ``--star-optimizer``...)."""
    return {"epochs": star_epochs, "optimizer": args.star_optimizer, "lr": args.star_lr, "momentum": args.star_momentum,
            "weight_decay": args.star_weight_decay}


IMPORT_FLAGS = {"sources": "--sources-from", "heldout": "--heldout-from"}


def checkpoints_to_import(args: argparse.Namespace) -> Dict[str, Tuple[str, List[Path]]]:
    """Per role given ``--sources-from``/``--heldout-from``: the flag and the checkpoints it names
    (:class:`~starfast.checkpoint_import.CheckpointImportError` when it names none)."""
    patterns = {role: getattr(args, f"{role}_from") for role in IMPORT_FLAGS}
    return {role: (IMPORT_FLAGS[role], find_checkpoints(pattern, IMPORT_FLAGS[role]))
            for role, pattern in patterns.items() if pattern is not None}


def model_count(args: argparse.Namespace, role: str, default: int, imports: Mapping[str, Tuple[str, List[Path]]]) -> int:
    """``--sources``/``--heldout``: as given, else the number of checkpoints imported for the role,
    else ``default``; a count that contradicts the checkpoints is refused."""
    given = getattr(args, role)
    if role not in imports:
        return default if given is None else given
    flag, checkpoints = imports[role]
    if given is not None and given != len(checkpoints):
        raise ValueError(f"--{role} {given} but {flag} names {len(checkpoints)} checkpoints ({checkpoints[0]} ...); drop "
                         f"--{role} (the checkpoints set the count) or change the pattern")
    return len(checkpoints)


def build_context(args: argparse.Namespace, parser: argparse.ArgumentParser, distributed: Distributed) -> RunContext:
    """Every flag checked and turned into options before anything is loaded or written."""
    try:
        device = parse_device(args.device, distributed.local_rank if distributed.active else None)
    except ValueError as error:
        parser.error(str(error))
    for flag in ("star_seeds", "star_epochs"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "star_seeds" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'star_seeds' else 1}, got {value}")
    try:
        recipe = resolve(args.arch, args.dataset, recipe_flags(args))
        star_epochs = default_star_epochs(args.dataset, recipe.epochs) if args.star_epochs is None else args.star_epochs
        star_recipe = resolve_own(args.arch, args.dataset, recipe_flags(args), star_recipe_flags(args, star_epochs))
        names = [name for name, _, _ in args.extra_heldout]
        if len(set(names)) < len(names):
            raise ValueError(f"--extra-heldout names must differ, got {', '.join(names)}")
        extra_sets = tuple(ExtraSet(name, count, resolve_own(args.arch, args.dataset, recipe_flags(args), own))
                           for name, count, own in args.extra_heldout)
        if args.smoke:
            recipe, star_recipe = smoke.recipe(recipe), smoke.recipe(star_recipe)
            extra_sets = tuple(replace(extra, count=min(extra.count, smoke.SIZES["heldout"]), recipe=smoke.recipe(extra.recipe))
                               for extra in extra_sets)
            args.star_seeds = min(args.star_seeds, smoke.SIZES["star_seeds"])
        star_options = StarlightOptions(
            t_sampling=args.t_sampling, rematch_every=args.rematch_every, ce_weight=args.ce_weight,
            samples_per_step=args.samples_per_step, rematch_async=args.rematch_async, matcher=args.matcher,
            match_restarts=args.star_match_restarts, **matcher_fields(args, args.matcher),
        )
        speed = SpeedOptions(precision=args.precision)
        imports = checkpoints_to_import(args)
        sources, heldout = (model_count(args, role, default, imports) for role, default in (("sources", 10), ("heldout", DEFAULT_HELDOUT)))
        if args.smoke:  # imported checkpoints are used as they are; trained ones are capped
            sources, heldout = (count if role in imports else min(count, smoke.SIZES[role])
                                for role, count in (("sources", sources), ("heldout", heldout)))
        source_seeds(sources), heldout_seeds(heldout)
        if sources < 1 or heldout < 1:
            raise ValueError(f"--sources and --heldout must each be >= 1 (a star needs sources, the tables held-out "
                             f"models), got --sources {sources} --heldout {heldout}")
        if star_recipe.batch_size % star_options.samples_per_step:
            raise ValueError(f"--samples-per-step {star_options.samples_per_step} must divide --batch-size "
                             f"{star_recipe.batch_size} (each draw gets an equal chunk)")
        evaluation = evaluation_config(args)
        check_data_dir(args.data_dir)
    except ValueError as error:
        parser.error(str(error))
    dataset = data.load(args.dataset, data_dir=args.data_dir, device=device)
    if args.smoke:
        try:
            dataset = smoke.dataset(dataset)
        except ValueError as error:
            parser.error(str(error))
    try:
        for checked in (recipe, star_recipe, *(extra.recipe for extra in extra_sets)):
            steps_per_epoch(dataset, checked.batch_size, distributed.world_size)
    except ValueError as error:
        parser.error(str(error))
    try:
        arch_kw = dict(args.arch_kw) or main_job_arch_kw(args.arch, args.dataset)
        spec = ModelSpec.for_dataset(args.arch, dataset, arch_kw)
        skeleton = spec.build()
    except (TypeError, ValueError) as error:
        parser.error(f"--arch {args.arch} with --arch-kw {arch_kw}: {error}")
    try:
        workload = choose_workload(skeleton, device, threads=args.threads, parallel_seeds=args.parallel_seeds)
    except ValueError as error:
        parser.error(str(error))
    run = RunDir(args.run_dir or Path("runs") / f"{args.dataset}-{models.run_label(args.arch)}{'-smoke' if args.smoke else ''}")
    return RunContext(
        run, device, dataset, spec, recipe, star_recipe, extra_sets, imports, star_options, evaluation, speed,
        sources=sources, heldout=heldout, star_seeds=args.star_seeds, workload=workload, progress=not args.quiet,
        distributed=distributed, smoke=args.smoke,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    keep_freed_memory()
    distributed = Distributed.from_environment()
    if distributed.active:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    try:
        context = build_context(args, parser, distributed)
        context.workload.apply()
        if context.progress and distributed.rank == 0:
            print(context.workload.describe())
            print(plan_line(context, args.stage))
        command = " ".join(["python -m starfast.train", *(sys.argv[1:] if argv is None else argv)])
        with context.run.locked(command) if distributed.rank == 0 else contextlib.nullcontext():
            context.run.check_config(context.config())  # every rank fails the same way on a mismatch
            if distributed.rank == 0:
                context.run.prepare(context.config())
            distributed.barrier()
            if context.smoke:
                print(smoke.BANNER)
            for stage in STAGES[args.stage]:
                status = stage(context)
                if status:
                    return status
            if context.smoke:
                print(f"smoke run completed in {context.run.path}. {smoke.BANNER}")
            return 0
    except (StoredFileError, TrainingDiverged, StarlightDiverged, OSError, *DATA_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if distributed.active:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_command(main, "python -m starfast.train " + " ".join(sys.argv[1:]))
