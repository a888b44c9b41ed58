"""Human-facing output of an evaluation: the markdown table, the printed table and the plot.

``format_table(results)`` renders the paper-style summary (regular and star loss; train and test
loss barriers of regular–regular, star–held-out and star–source pairs as mean ± std [min, max]);
``write_table`` saves it as ``table.md``; ``plot_curves`` draws loss and accuracy along t with ±1
std bands, star–held-out against regular–regular (the paper's Figure 2), as ``curves.png``.

The applications' output: ``format_bma_table`` / ``plot_bma`` (``bma.md`` / ``bma.png``, Figure 4's
three panels) for :mod:`starfast.bma`, ``format_fusion_table`` (``fusion.md``, Table 2 and the
test-time costs) for :mod:`starfast.fusion`; ``write_text`` writes any of them atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from starfast.files import replaced_atomically

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
    write_text(path, format_table(results) + "\n")


def plot_curves(path: Path, results: Mapping[str, Any]) -> bool:
    """Write ``curves.png``; returns False (and writes nothing) when matplotlib is missing."""
    plt = _pyplot(path)
    if plt is None:
        return False
    import numpy as np

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
    with replaced_atomically(path) as name:
        figure.savefig(name, format="png", dpi=120)
    plt.close(figure)
    return True


# -- applications: Bayesian model averaging (Figure 4) and model fusion (Table 2) -------------------

BMA_METHODS = (
    ("star_domain", "star domain", "tab:red"),
    ("source_ensemble", "ensemble of sources", "tab:blue"),
    ("heldout_ensemble", "ensemble of held-out", "tab:gray"),
)
BMA_PANELS = (("auroc_max_prob", "AUROC (max probability)"), ("auroc_entropy", "AUROC (entropy)"), ("ece", "ECE (15 bins)"))


def _number(value: Optional[float], digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_bma_table(results: Mapping[str, Any]) -> str:
    """Markdown: accuracy, NLL, ECE and both AUROCs per number of models and method."""
    lines = [
        f"Bayesian model averaging on {results['dataset']} ({results['arch']}), star {results['star']}, "
        f"{len(results['star_sources'])} sources; metrics by {results['metrics_backend']}",
        "",
        "| models | method | accuracy | NLL | ECE | AUROC (max p) | AUROC (entropy) |",
        "|---|---|---|---|---|---|---|",
    ]
    methods = results["methods"]
    largest = max(len(curve["models"]) for curve in methods.values())
    for index in range(largest):
        for method, label, _ in BMA_METHODS:
            curve = methods.get(method)
            if curve is None or index >= len(curve["models"]):
                continue
            cells = " | ".join(_number(curve[metric][index]) for metric in ("accuracy", "nll", "ece", "auroc_max_prob", "auroc_entropy"))
            lines.append(f"| {curve['models'][index]} | {label} | {cells} |")
    return "\n".join(lines)


def plot_bma(path: Path, results: Mapping[str, Any]) -> bool:
    """Figure 4's form: AUROC (max probability), AUROC (entropy) and ECE against the number of
    models, for each method; returns False (and writes nothing) when matplotlib is missing."""
    plt = _pyplot(path)
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, (metric, title) in zip(axes, BMA_PANELS):
        for method, label, color in BMA_METHODS:
            curve = results["methods"].get(method)
            if curve is None:
                continue
            points = [(size, value) for size, value in zip(curve["models"], curve[metric]) if value is not None]
            axis.plot([size for size, _ in points], [value for _, value in points], marker="o", markersize=3, color=color, label=label)
        axis.set_title(title)
        axis.set_xlabel("number of models")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"Bayesian model averaging: {results['dataset']}, {results['arch']} (star trained on {len(results['star_sources'])} sources)")
    figure.tight_layout()
    with replaced_atomically(path) as name:
        figure.savefig(name, format="png", dpi=120)
    plt.close(figure)
    return True


def _percent(summary: Optional[Mapping[str, Any]], key: str = "mean") -> str:
    if not summary:
        return "—"
    if key == "mean":
        return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"
    return f"{100 * summary[key]:.2f}"


def format_fusion_table(results: Mapping[str, Any]) -> str:
    """Markdown: Table 2's test accuracies (%) per number of sources, then each method's test-time
    cost (forward FLOPs per example, parameter memory, measured time per test batch)."""
    lines = [
        f"Model fusion on {results['dataset']} ({results['arch']}): stars trained with ce-weight λ = "
        f"{results['ce_weight']:g} for {results['star_epochs']} epochs; test accuracy in %",
        "",
        "| #models | regular | best of n | ensemble | star | best star |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        stars = row["star"]
        lines.append(
            f"| {row['size']} | {_percent(row['regular'])} | {_percent(row['regular'], 'max')} | "
            f"{100 * row['ensemble']['accuracy']:.2f} | {_percent(stars)} (n={len(stars['values']) if stars else 0}) | "
            f"{_percent(stars, 'max')} |"
        )
    lines += [
        "",
        "| #models | method | forward FLOPs / example | parameter memory | time / test batch (ms) | time vs regular |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for method in ("regular", "ensemble", "star"):
            cost = row["cost"][method]
            lines.append(
                f"| {row['size']} | {method} | {cost['flops_per_example']:,.0f} | {_bytes(cost['parameter_bytes'])} | "
                f"{1000 * cost['seconds_per_batch']:.3f} | {cost['seconds_per_batch'] / row['cost']['regular']['seconds_per_batch']:.2f}× |"
            )
    return "\n".join(lines)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with replaced_atomically(path) as name:
        name.write_text(text)


def _pyplot(path: Path):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {Path(path).name} was not drawn (pip install matplotlib)")
        return None
    return plt
