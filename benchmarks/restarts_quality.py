"""How often weight matching with R restarts reaches the best objective that many random group
orders find, and what it costs (issue 26), on the trained models of a run directory.

    python benchmarks/restarts_quality.py RUN [--orders 30] [--restarts 1,2,4,8,16]

Every pair of the run's finished models (sources, held-out models and stars, i < j in that order)
is matched: model j onto model i, each anchor's partners batched as the evaluation does. The
reference is the best objective over ``--orders`` runs from the identity, each with its own random
group order (Git Re-Basin's algorithm, one random order per run); a pair *reaches* it when
``match_weights(..., restarts=R)`` (seed 0) is within 1e-9 (relative) of it or above. Prints a
markdown table: per R, the pairs reaching the reference, the pairs beating it, the median and
worst relative shortfall, and the matching time per pair (one thread).
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from starfast import models
from starfast.evaluation import load_models, load_stars
from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.rundir import RunDir
from starfast.training_common import stream_seed

REFERENCE_SEED = 12345  # the random orders' stream: unrelated to the seeds restarts use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--orders", type=int, default=30)
    parser.add_argument("--restarts", default="1,2,4,8,16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = RunDir(args.run)
    skeleton = run.model_spec().build()
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    loaded = [*load_models(run, "sources", space, "cpu"), *load_models(run, "heldout", space, "cpu"), *load_stars(run, space, "cpu")]
    counts = [int(value) for value in args.restarts.split(",")]
    reference, distinct, found, seconds = [], [], {r: [] for r in counts}, {r: 0.0 for r in counts}
    for i, anchor in enumerate(loaded[:-1]):
        bank = torch.stack([partner.row for partner in loaded[i + 1 :]])
        orders = torch.stack([
            match_weights(anchor.row, bank, spec, space=space, seed=stream_seed(REFERENCE_SEED, k)).objective[-1]
            for k in range(args.orders)
        ])
        reference.append(orders.max(0).values)
        distinct += [len({round(float(value), 6) for value in orders[:, k]}) for k in range(len(bank))]
        for r in counts:
            started = time.perf_counter()
            result = match_weights(anchor.row, bank, spec, space=space, restarts=r)
            seconds[r] += time.perf_counter() - started
            found[r].append(result.objective[-1])
    best = torch.cat(reference)
    pairs = len(best)
    print(f"{len(loaded)} models, {pairs} pairs; distinct optima over {args.orders} orders per pair: "
          f"median {statistics.median(distinct)}, max {max(distinct)}")
    print("\n| restarts | pairs reaching the best of the orders | pairs beating it | median shortfall | worst shortfall | ms per pair |")
    print("|---|---|---|---|---|---|")
    for r in counts:
        objective = torch.cat(found[r])
        shortfall = ((best - objective) / best.abs()).clamp(min=0)
        reached = int((shortfall <= 1e-9).sum())
        beating = int((objective > best * (1 + 1e-9)).sum())
        print(f"| {r} | {reached} of {pairs} ({100 * reached / pairs:.0f}%) | {beating} | "
              f"{float(shortfall.median()):.2e} | {float(shortfall.max()):.2e} | {1e3 * seconds[r] / pairs:.2f} |")


if __name__ == "__main__":
    main()
