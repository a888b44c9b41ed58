"""``python -m starfast.evaluate RUN``: measure a run directory's barriers and write the report.

Reads ``RUN/config.json`` for the architecture and dataset, evaluates (see
:mod:`starfast.evaluation`), writes ``RUN/results/{results.json, table.md, curves.png}`` and
prints the table and the verdict line (:func:`starfast.report.verdict`). With ``--bma`` and/or
``--fusion`` it runs those applications of the star instead (Section 4 of the paper): Bayesian
model averaging over the star domain (:mod:`starfast.bma`, ``RUN/results/bma.{json,md,png}``) and
model fusion (:mod:`starfast.fusion`, ``RUN/results/fusion.{json,md}``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from starfast import bma, data, fusion, report
from starfast.allocator import keep_freed_memory
from starfast.arguments import DATA_ERRORS, check_data_dir, parse_arguments, parse_device, run_command
from starfast.evaluation import DEFAULT_EVAL_RESTARTS, DEFAULT_MATCHING_OPTIMA, EvaluationConfig, evaluate_run, write_results
from starfast.activation_matching import DEFAULT_MATCH_EXAMPLES
from starfast.matchers import DATA_MATCHERS, MATCHERS, SINKHORN_FIELDS, STE_FIELDS
from starfast.ste_matching import DEFAULT_LR as STE_LR, DEFAULT_STEPS as STE_STEPS
from starfast.report import format_table, verdict
from starfast.files import StoredFileError
from starfast.rundir import RunDir
from starfast.sinkhorn import DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TEMPERATURE, LR_SEARCH_SPACE


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape an evaluation (shared with ``python -m starfast.train``)."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--heldout-pairs", type=int, help="held-out x held-out pairs to measure (default: all)")
    group.add_argument("--heldout-source-pairs", type=int, default=6, help="held-out x source pairs (default: 6)")
    group.add_argument("--star-sources", type=int, help="sources per star for star–source barriers (default: all)")
    group.add_argument("--ts", type=int, default=11, help="points on each linear path, ends included (default: 11)")
    group.add_argument("--bn-batches", type=int, help="batches used to recompute BatchNorm statistics (default: all)")
    group.add_argument("--eval-batch-size", type=int, default=500, help="evaluation batch size (default: 500)")
    group.add_argument("--match-init", choices=["identity", "sorted"], default="identity",
                       help="weight-matching start: identity (Git Re-Basin) or sorted (default: identity)")
    group.add_argument("--match-restarts", type=int, metavar="R",
                       help="restarts of the matcher per pair, batched, the best kept: weight matching's starts and "
                            "group orders, Sinkhorn's noise draws (default: "
                            f"{', '.join(f'{count} for {name}' for name, count in DEFAULT_EVAL_RESTARTS.items() if name != 'none')})")
    group.add_argument("--matching-optima", type=int, default=DEFAULT_MATCHING_OPTIMA, metavar="K",
                       help="per pair, also measure the barrier at the next best distinct optima the restarts reached, "
                            f"K in all, for the spread due to the matching (1: only the best; default: {DEFAULT_MATCHING_OPTIMA})")
    group.add_argument("--eval-matcher", choices=MATCHERS, default="wm",
                       help="permutation finder aligning each measured pair: wm = weight matching, sinkhorn = Sinkhorn "
                            "re-basin, am = activation matching, ste = straight-through matching, none = no permutation "
                            "(default: wm)")
    group.add_argument("--repair", action="store_true",
                       help="REPAIR every interpolated point: its per-channel pre-activation mean and std set to the "
                            "interpolation of the end points' (on BatchNorm networks the usual recomputation, RESET)")
    group.add_argument("--match-examples", type=int, metavar="N",
                       help=f"training examples the data-based matchers (am, ste) observe (default: {DEFAULT_MATCH_EXAMPLES})")
    finders = parser.add_argument_group("Sinkhorn re-basin options (used where a matcher is sinkhorn)")
    finders.add_argument("--sinkhorn-lr", type=float, metavar="LR",
                         help=f"Adam learning rate on the logits (default: {DEFAULT_LR:g}; the paper searched "
                              f"{', '.join(f'{lr:g}' for lr in LR_SEARCH_SPACE)})")
    finders.add_argument("--sinkhorn-steps", type=int, metavar="K", help=f"optimisation steps (default: {DEFAULT_STEPS})")
    finders.add_argument("--sinkhorn-temperature", type=float, metavar="TAU",
                         help=f"Sinkhorn temperature (default: {DEFAULT_TEMPERATURE:g})")
    finders.add_argument("--sinkhorn-iterations", type=int, metavar="I",
                         help=f"Sinkhorn normalisation iterations (default: {DEFAULT_ITERATIONS})")
    straight = parser.add_argument_group("straight-through matching options (used where a matcher is ste)")
    straight.add_argument("--ste-lr", type=float, metavar="LR", help=f"Adam learning rate on the free copy (default: {STE_LR:g})")
    straight.add_argument("--ste-steps", type=int, metavar="K", help=f"optimisation steps (default: {STE_STEPS})")


def finder_flags(args: argparse.Namespace, matcher: str, fields) -> Dict[str, Any]:
    """The flags of ``fields`` given, as :class:`~starfast.matchers.MatcherChoice` fields; refused
    unless a matcher of the command line (``--eval-matcher``, and ``--matcher`` where it exists) is
    ``matcher``."""
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if given and matcher not in (args.eval_matcher, getattr(args, "matcher", None)):
        where = f"--eval-matcher {matcher}" + (f" or --matcher {matcher}" if hasattr(args, "matcher") else "")
        raise ValueError(f"--{next(iter(given)).replace('_', '-')} only applies to the {matcher} matcher; add {where}")
    return given


def matcher_fields(args: argparse.Namespace, matcher: str) -> Dict[str, Any]:
    """The finder options of the command line that apply to ``matcher``, as
    :class:`~starfast.matchers.MatcherChoice` fields. Every option given must apply to a matcher of
    the command line (``--eval-matcher``, and ``--matcher`` where it exists): ``--sinkhorn-*`` to
    ``sinkhorn``, ``--ste-*`` to ``ste``, ``--match-examples`` to a data-based one (``am``, ``ste``)."""
    sinkhorn = finder_flags(args, "sinkhorn", SINKHORN_FIELDS)
    ste = finder_flags(args, "ste", STE_FIELDS)
    examples = {} if args.match_examples is None else {"match_examples": args.match_examples}
    if examples and not set(DATA_MATCHERS) & {args.eval_matcher, getattr(args, "matcher", None)}:
        where = "--eval-matcher am" + (" or --matcher am" if hasattr(args, "matcher") else "")
        raise ValueError(f"--match-examples only applies to the data-based matchers (am, ste); add {where}")
    return {**(sinkhorn if matcher == "sinkhorn" else {}), **(ste if matcher == "ste" else {}),
            **(examples if matcher in DATA_MATCHERS else {})}


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    """The evaluation flags as a (validated) :class:`EvaluationConfig`."""
    return EvaluationConfig(
        heldout_pairs=args.heldout_pairs, heldout_source_pairs=args.heldout_source_pairs, star_sources=args.star_sources,
        ts=args.ts, bn_batches=args.bn_batches, batch_size=args.eval_batch_size,
        match_init=None if args.match_init == "identity" else args.match_init, repair=args.repair,
        match_restarts=args.match_restarts, matching_optima=args.matching_optima,
        matcher=args.eval_matcher, **matcher_fields(args, args.eval_matcher),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sizes(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers of sources such as 2,5,50, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of sources >= 1 such as 2,5,50, got {text!r}")
    return sizes


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


APPLICATION_OPTIONS = {
    "bma": ("bma_samples", "bma_seed"),
    "fusion": ("fusion_sizes", "fusion_ce_weight", "fusion_star_seeds", "fusion_star_epochs"),
}


def add_application_flags(parser: argparse.ArgumentParser) -> None:
    """``--bma`` and ``--fusion`` with their options (their defaults are filled in by
    :func:`check_application_flags`, so that an option without its flag can be refused)."""
    group = parser.add_argument_group("applications (Section 4 of the paper; run instead of the barriers)")
    group.add_argument("--bma", action="store_true", help="Bayesian model averaging over the star domain (Figure 4)")
    group.add_argument("--bma-samples", type=_positive_int, metavar="K", help="largest number of models averaged (default: 19)")
    group.add_argument("--bma-seed", type=int, metavar="S", help="seed of the posterior draws (default: 0)")
    group.add_argument("--fusion", action="store_true", help="model fusion: star vs single models vs ensemble (Table 2)")
    group.add_argument("--fusion-sizes", type=_sizes, metavar="2,5,50",
                       help="numbers of sources |Z| (default: 2,5,50; sizes above the run's sources are dropped)")
    group.add_argument("--fusion-ce-weight", type=_weight, metavar="LAMBDA", help="λ of the stars' cross-entropy term (default: 1)")
    group.add_argument("--fusion-star-seeds", type=_positive_int, metavar="N", help="stars per size (default: 3)")
    group.add_argument("--fusion-star-epochs", type=_positive_int, metavar="E",
                       help="epochs of the fusion stars (default: those of the run's star)")


def check_application_flags(args: argparse.Namespace) -> None:
    """Refuse an application option without its flag, and another matcher than weight matching
    for the applications (they align with it); fill in the defaults."""
    for flag, options in APPLICATION_OPTIONS.items():
        given = [name for name in options if getattr(args, name) is not None]
        if given and not getattr(args, flag):
            raise ValueError(f"--{given[0].replace('_', '-')} needs --{flag}")
    if (args.bma or args.fusion) and args.eval_matcher != "wm":
        raise ValueError(f"--bma and --fusion align with weight matching; drop --eval-matcher {args.eval_matcher}")
    if (args.bma or args.fusion) and args.repair:
        raise ValueError("--repair applies to the barriers, which --bma and --fusion do not measure; drop --repair")
    defaults = {"bma_samples": 19, "bma_seed": 0, "fusion_sizes": [2, 5, 50], "fusion_ce_weight": 1.0, "fusion_star_seeds": 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def run_applications(run: RunDir, dataset, args: argparse.Namespace, config: EvaluationConfig, device: torch.device,
                     progress: bool) -> int:
    """``--bma`` and ``--fusion``: compute, write and print their results."""
    if args.bma:
        bma_config = bma.BMAConfig(
            samples=args.bma_samples, seed=args.bma_seed, batch_size=config.batch_size, bn_batches=config.bn_batches,
            match_max_iter=config.match_max_iter, match_init=config.match_init,
        )
        results = bma.bayesian_model_averaging(run, dataset, config=bma_config, device=device, progress=progress)
        folder = bma.write_bma(run, results)
        print(report.format_bma_table(results))
        print(f"(written to {folder}/bma.json, bma.md, bma.png)")
    if args.fusion:
        available = len(run.finished_seeds("sources"))
        _, dropped = fusion.usable_sizes(args.fusion_sizes, available)
        if dropped:
            print(f"note: --fusion-sizes {','.join(map(str, dropped))} dropped: the run has {available} source models")
        fusion_config = fusion.FusionConfig(
            sizes=tuple(args.fusion_sizes), ce_weight=args.fusion_ce_weight, star_seeds=args.fusion_star_seeds,
            star_epochs=args.fusion_star_epochs, batch_size=config.batch_size,
        )
        results = fusion.fusion_table(run, dataset, config=fusion_config, device=device, progress=progress)
        folder = fusion.write_fusion(run, results)
        print(report.format_fusion_table(results))
        print(f"(written to {folder}/fusion.json, fusion.md)")
    return 0


def run_evaluation(run: RunDir, dataset, config: EvaluationConfig, device: torch.device, progress: bool) -> int:
    results = evaluate_run(run, dataset, config=config, device=device, progress=progress)
    folder = write_results(run, results)
    print(format_table(results))
    print(verdict(results))
    print(f"(written to {folder}/results.json, table.md, curves.png)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starfast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run directory made by python -m starfast.train")
    parser.add_argument("--data-dir", type=Path, help="where file-based datasets live")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_evaluation_flags(parser)
    add_application_flags(parser)
    args = parse_arguments(parser, argv)
    keep_freed_memory()
    try:
        device = parse_device(args.device)
        evaluation = evaluation_config(args)
        check_application_flags(args)
        check_data_dir(args.data_dir)
    except ValueError as error:
        parser.error(str(error))
    run = RunDir(args.run_dir)
    try:
        config = run.read_config()
        if config is None:
            parser.error(f"{run.config_path} does not exist: is {args.run_dir} a run directory of python -m starfast.train?")
        dataset_name = run.dataset_name()
        run.model_spec()  # checked before the lock and the data
        with run.locked(" ".join(["python -m starfast.evaluate", *map(str, sys.argv[1:] if argv is None else argv)])):
            dataset = data.load(dataset_name, data_dir=args.data_dir, device=device)
            if args.bma or args.fusion:
                return run_applications(run, dataset, args, evaluation, device, progress=not args.quiet)
            return run_evaluation(run, dataset, evaluation, device, progress=not args.quiet)
    except (StoredFileError, OSError, *DATA_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    run_command(main, "python -m starfast.evaluate " + " ".join(sys.argv[1:]))
