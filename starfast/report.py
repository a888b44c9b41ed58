"""Human-facing output of an evaluation: the markdown table, the printed table and the plot.

``format_table(results)`` renders the paper-style summary (regular and star loss; train and test
loss barriers of regular–regular, star–held-out and star–source pairs as mean ± std [min, max]);
``write_table`` saves it as ``table.md``; ``plot_curves`` draws loss and accuracy along t with ±1
std bands, star–held-out against regular–regular (the paper's Figure 2), as ``curves.png``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

ROWS = (
    ("regular_regular", "regular–regular barrier"),
    ("star_heldout", "star–held-out barrier"),
    ("star_source", "star–source barrier"),
)


def _cell(summary: Optional[Mapping[str, Any]], digits: int = 4) -> str:
    if not summary:
        return "—"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} [{summary['min']:.{digits}f}, {summary['max']:.{digits}f}]"


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown table of losses and loss/accuracy barriers (mean ± std [min, max])."""
    counts = results.get("counts", {})
    lines = [
        "| quantity | n | train | test |",
        "|---|---|---|---|",
        f"| regular loss | {len(results['regular_loss']['values']) if results.get('regular_loss') else 0} "
        f"| {_cell(results.get('regular_loss'))} | {_cell(results.get('regular_test_loss'))} |",
        f"| star loss | {counts.get('stars', 0)} | {_cell(results.get('star_loss'))} | {_cell(results.get('star_test_loss'))} |",
    ]
    for kind, label in ROWS:
        barriers = results["barriers"][kind]
        lines.append(f"| {label} (loss) | {counts.get(kind, 0)} | {_cell(barriers['train'])} | {_cell(barriers['test'])} |")
    for kind, label in ROWS:
        barriers = results["accuracy_barriers"][kind]
        lines.append(f"| {label} (accuracy) | {counts.get(kind, 0)} | {_cell(barriers['train'])} | {_cell(barriers['test'])} |")
    return "\n".join(lines)


def write_table(path: Path, results: Mapping[str, Any]) -> None:
    path = Path(path)
    _atomic_write(path, lambda name: Path(name).write_text(format_table(results) + "\n"))


def plot_curves(path: Path, results: Mapping[str, Any]) -> bool:
    """Write ``curves.png``; returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("note: matplotlib is not installed, so curves.png was not drawn (pip install matplotlib)")
        return False
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    styles = {"regular_regular": ("regular–regular", "tab:gray"), "star_heldout": ("star–held-out", "tab:red"),
              "star_source": ("star–source", "tab:blue")}
    for column, split in enumerate(("train", "test")):
        for row, (metric, label) in enumerate((("loss", "loss"), ("acc", "accuracy"))):
            axis = axes[row, column]
            for kind, (name, color) in styles.items():
                curves = results["curves"].get(kind) or []
                values = [curve[f"{split}_{metric}"] for curve in curves if curve.get(f"{split}_{metric}") is not None]
                if not values:
                    continue
                t = np.asarray(curves[0]["t"])
                stacked = np.asarray(values)
                mean, std = stacked.mean(0), stacked.std(0)
                axis.plot(t, mean, color=color, label=f"{name} (n={len(values)})")
                axis.fill_between(t, mean - std, mean + std, color=color, alpha=0.2)
            axis.set_title(f"{split} {label}")
            axis.set_xlabel("t  (0 = first model, 1 = matched second model)")
            axis.grid(alpha=0.3)
    axes[0, 0].legend()
    figure.tight_layout()
    _atomic_write(Path(path), lambda name: figure.savefig(name, format="png", dpi=120))
    plt.close(figure)
    return True


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(name)
        os.replace(name, path)
    except BaseException:
        if os.path.exists(name):
            os.unlink(name)
        raise
