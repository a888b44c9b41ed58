"""``python -m starfast.theory``: run the Appendix A checks and write their report files.

This module owns the command line, the run configurations (full and ``--quick``), the report
files and the figures. It writes, atomically (temp file + ``os.replace``), into ``--out``
(default ``runs/theory``):

- ``results.json``: ``lemma2`` (``Q(m, eps)``), ``table3`` (linear networks) and ``table4``
  (ELU networks), each ``{width: {epsilon: proportion}}`` with string keys (``str(m)`` and
  ``f"{eps:.6g}"``); ``paper`` (the paper's Tables 3 and 4 in the same form); ``details``
  (the evidence behind each table, see ``lemma2_table`` and ``star_table``); ``config``.
- ``lemma2.png``: heatmap of ``Q(m, eps)`` (Figure 5: tolerances 0.01 at the top to 0.1 at the
  bottom, widths along x).
- ``tables.png``: proportion of empirical star models against width, one line per tolerance,
  ours solid and the paper's dashed, linear (Table 3) and ELU (Table 4) side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import torch

from starfast.allocator import keep_freed_memory
from starfast.arguments import parse_arguments
from starfast.theory.lemma2 import default_epsilons, lemma2_table
from starfast.theory.twolayer import PAPER_EPSILONS, GaussianTask, TrainRecipe, star_table

PAPER_TABLE3 = {2: (0.00, 0.01, 0.05, 0.12), 4: (0.03, 0.08, 0.25, 0.40), 8: (0.21, 0.38, 0.60, 0.72), 32: (0.86, 0.97, 1.00, 1.00)}
PAPER_TABLE4 = {2: (0.00, 0.00, 0.00, 0.00), 4: (0.00, 0.00, 0.00, 0.04), 8: (0.00, 0.00, 0.00, 0.71), 32: (0.93, 1.00, 1.00, 1.00)}

FULL = {
    "lemma2": {"widths": [2 ** k for k in range(1, 11)], "epsilons": default_epsilons(50), "n_phi": 100, "n_theta": 100},
    "tables": {"widths": [2, 4, 8, 32], "n_models": 100, "recipe": TrainRecipe()},
}
QUICK = {
    "lemma2": {"widths": [2, 4, 8, 16], "epsilons": default_epsilons(5), "n_phi": 12, "n_theta": 12},
    "tables": {"widths": [2, 8], "n_models": 6, "recipe": TrainRecipe(epochs=3)},
}


def json_keys(value):
    """``value`` with every mapping key a string: ints as ``str(m)``, floats as ``f"{eps:.6g}"``."""
    if isinstance(value, Mapping):
        return {(f"{k:.6g}" if isinstance(k, float) else str(k)): json_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_keys(v) for v in value]
    return value


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, payload: object) -> None:
    """Write ``payload`` as JSON to ``path`` through a temp file and ``os.replace``."""
    tmp = _temp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _save_figure_atomic(fig, path: Path) -> None:
    tmp = _temp_path(path)
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_lemma2(q: Mapping[int, Mapping[float, float]], path: Path) -> None:
    """Figure 5: heatmap of ``Q(m, eps)``, widths along x, tolerances increasing downwards."""
    from matplotlib.figure import Figure

    widths = list(q)
    epsilons = list(next(iter(q.values())))
    grid = [[q[m][e] for m in widths] for e in epsilons]
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(widths)), [str(m) for m in widths])
    ticks = sorted({0, len(epsilons) - 1, *range(0, len(epsilons), max(1, len(epsilons) // 6))})
    ax.set_yticks(ticks, [f"{epsilons[i]:.3f}" for i in ticks])
    ax.set_xlabel("width m")
    ax.set_ylabel("tolerance ε")
    ax.set_title("Lemma 2: Q(m, ε), fraction of φ that are star candidates")
    fig.colorbar(image, ax=ax, label="Q(m, ε)")
    _save_figure_atomic(fig, path)


def plot_tables(ours: Sequence[Mapping[int, Mapping[float, float]]], paper: Sequence[Mapping[int, Sequence[float]]], titles: Sequence[str], path: Path) -> None:
    """Proportion of star models vs width per tolerance: ours solid, the paper's dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(ours), sharey=True)
    colors = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for ax, table, reference, title in zip(axes, ours, paper, titles):
        widths = list(table)
        for k, eps in enumerate(next(iter(table.values()))):
            color = colors[k % len(colors)]
            ax.plot(widths, [table[m][eps] for m in widths], "o-", color=color, label=f"ours ε={eps:g}")
            if eps in PAPER_EPSILONS:
                col = PAPER_EPSILONS.index(eps)
                ax.plot(list(reference), [row[col] for row in reference.values()], "s--", color=color, alpha=0.6, label=f"paper ε={eps:g}")
        ax.set_xscale("log", base=2)
        ticks = sorted(set(widths) | set(reference))
        ax.set_xticks(ticks, [str(m) for m in ticks])
        ax.set_xlabel("width m")
        ax.set_title(title)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("proportion of empirical star models")
    axes[-1].legend(fontsize=7, loc="lower right")
    _save_figure_atomic(fig, path)


def _format_table(name: str, table: Mapping[int, Mapping[float, float]], paper: Optional[Mapping[int, Sequence[float]]]) -> str:
    epsilons = list(next(iter(table.values())))
    lines = [name, "m".rjust(5) + "".join(f"{f'eps={e:g}':>16}" for e in epsilons)]
    for m, row in table.items():
        cells = []
        for e in epsilons:
            cell = f"{row[e]:.2f}"
            if paper is not None and m in paper and e in PAPER_EPSILONS:
                cell += f" ({paper[m][PAPER_EPSILONS.index(e)]:.2f})"
            cells.append(f"{cell:>16}")
        lines.append(f"{m:>5}" + "".join(cells))
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m starfast.theory",
        description="Appendix A checks: Lemma 2's Q(m, eps) (Figure 5) and the star-model tables of "
        "trained two-layer networks (Tables 3 and 4).",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/theory"), help="output directory (default: runs/theory)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run with few samples, widths and models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, initialisations and batch orders (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1; the batched ops are small, more threads rarely help)")
    parser.add_argument("--class-mean", type=float, default=GaussianTask().mean[0], metavar="MU",
                        help="class means of the Gaussian task are +-(MU, MU) (default: %(default)s)")
    args = parse_arguments(parser, argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: cannot create the output directory --out {args.out}: {error}", file=sys.stderr)
        return 2
    config = QUICK if args.quick else FULL
    progress = not args.quiet
    task = GaussianTask(mean=(args.class_mean, args.class_mean))
    started = time.perf_counter()

    lemma2 = lemma2_table(**config["lemma2"], seed=args.seed, progress=progress)
    tables = {
        name: star_table(activation, widths=config["tables"]["widths"], n_models=config["tables"]["n_models"],
                         task=task, recipe=config["tables"]["recipe"], seed=args.seed, progress=progress)
        for name, activation in (("table3", "linear"), ("table4", "elu"))
    }
    results = {
        "lemma2": json_keys(lemma2["Q"]),
        "table3": json_keys(tables["table3"]["table"]),
        "table4": json_keys(tables["table4"]["table"]),
        "paper": {
            name: json_keys({m: dict(zip(PAPER_EPSILONS, row)) for m, row in table.items()})
            for name, table in (("table3", PAPER_TABLE3), ("table4", PAPER_TABLE4))
        },
        "details": json_keys({"lemma2": lemma2, "table3": tables["table3"], "table4": tables["table4"]}),
        "config": {"quick": args.quick, "seed": args.seed, "threads": args.threads,
                   "seconds": round(time.perf_counter() - started, 1)},
    }
    write_json_atomic(args.out / "results.json", results)
    plot_lemma2(lemma2["Q"], args.out / "lemma2.png")
    plot_tables([tables["table3"]["table"], tables["table4"]["table"]], [PAPER_TABLE3, PAPER_TABLE4],
                ["Table 3: linear two-layer networks", "Table 4: ELU two-layer networks"], args.out / "tables.png")

    print(_format_table("Table 3 (linear), ours (paper)", tables["table3"]["table"], PAPER_TABLE3))
    print(_format_table("Table 4 (ELU), ours (paper)", tables["table4"]["table"], PAPER_TABLE4))
    print(f"Lemma 2: Q(m, eps) for widths {list(lemma2['Q'])}; undecided cells: {lemma2['undecided_cells']}")
    print(f"wrote {args.out / 'results.json'}, lemma2.png, tables.png in {results['config']['seconds']} s")
    return 0
