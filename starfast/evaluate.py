"""``python -m starfast.evaluate RUN``: measure a run directory's barriers and write the report.

Reads ``RUN/config.json`` for the architecture and dataset, evaluates (see
:mod:`starfast.evaluation`), writes ``RUN/results/{results.json, table.md, curves.png}`` and
prints the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from starfast import data
from starfast.allocator import keep_freed_memory
from starfast.evaluation import EvaluationConfig, evaluate_run, write_results
from starfast.report import format_table
from starfast.rundir import RunDir, RunDirError


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


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    for flag in ("heldout_pairs", "heldout_source_pairs", "star_sources", "bn_batches"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.ts < 2:
        raise ValueError(f"--ts must be >= 2 (the two end points), got {args.ts}")
    return EvaluationConfig(
        heldout_pairs=args.heldout_pairs, heldout_source_pairs=args.heldout_source_pairs, star_sources=args.star_sources,
        ts=args.ts, bn_batches=args.bn_batches, batch_size=args.eval_batch_size,
        match_init=None if args.match_init == "identity" else args.match_init,
    )


def run_evaluation(run: RunDir, dataset, args: argparse.Namespace, device: torch.device, progress: bool) -> int:
    results = evaluate_run(run, dataset, config=evaluation_config(args), device=device, progress=progress)
    folder = write_results(run, results)
    print(format_table(results))
    print(f"(written to {folder}/results.json, table.md, curves.png)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starfast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run directory made by python -m starfast.train")
    parser.add_argument("--data-dir", type=Path, help="where file-based datasets live")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_evaluation_flags(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()
    run = RunDir(args.run_dir)
    config = run.read_config()
    if config is None:
        parser.error(f"{run.config_path} does not exist: is {args.run_dir} a run directory of python -m starfast.train?")
    try:
        evaluation_config(args)
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(args.device)
    try:
        dataset = data.load(config["dataset"], data_dir=args.data_dir, device=device)
        return run_evaluation(run, dataset, args, device, progress=not args.quiet)
    except RunDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
