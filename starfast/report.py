"""Human-facing output of an evaluation: the markdown table, the printed table and the plot.

``format_table(results)`` renders the paper-style summary (regular and star loss; train and test
loss barriers of regular–regular, star–held-out and star–source pairs as mean ± std [min, max];
each extra held-out set NAME adds its loss and its star–NAME and NAME–NAME barriers; a line
below names the permutation finders the stars were trained and the pairs aligned with, and REPAIR);
``verdict(results)`` is the one-line answer to the paper's claim (see its docstring for the
conditions); ``write_table`` saves the table, the verdict and the environment and seeds the results
came from as ``table.md``; ``plot_curves`` draws
loss and accuracy along t with ±1 std bands, star–held-out against regular–regular (the paper's
Figure 2), as ``curves.png``.

The applications' output: ``format_bma_table`` / ``plot_bma`` (``bma.md`` / ``bma.png``, Figure 4's
three panels) for :mod:`starfast.bma`, ``format_fusion_table`` (``fusion.md``, Table 2 and the
test-time costs) for :mod:`starfast.fusion`; ``write_text`` writes any of them atomically; ``pyplot`` and ``save_figure`` are how every figure is
made and written (the experiments' too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from starfast.files import replaced_atomically
from starfast.environment import environment_line
from starfast.uncertainty import BOOTSTRAP_SEED, difference_side, pair_values

ROWS = (
    ("regular_regular", "regular–regular barrier"),
    ("star_heldout", "star–held-out barrier"),
    ("star_source", "star–source barrier"),
)


def _cell(summary: Optional[Mapping[str, Any]], digits: int = 4) -> str:
    if not summary:
        return "—"
    return (f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} [{summary['min']:.{digits}f}, "
            f"{summary['max']:.{digits}f}]{uncertainty_text(summary, digits)}")


def uncertainty_text(summary: Mapping[str, Any], digits: int = 4) -> str:
    """``"; 95% CI a–b; matching c–d"``: the mean's bootstrap interval and its range over the
    matching's optima, where the summary has them (:mod:`starfast.uncertainty`); empty otherwise."""
    parts = []
    if summary.get("ci"):
        ci = summary["ci"]
        parts.append(f"{100 * ci['level']:.0f}% CI {ci['low']:.{digits}f}–{ci['high']:.{digits}f}")
    if summary.get("matching"):
        parts.append(f"matching {summary['matching']['low']:.{digits}f}–{summary['matching']['high']:.{digits}f}")
    return "".join(f"; {part}" for part in parts)


def pairs_of(curves) -> Tuple[List[List[float]], List[Tuple[str, str]]]:
    """The train loss barriers of ``curves`` at each optimum their matching kept, and the two models
    of each (for the bootstrap, :mod:`starfast.uncertainty`)."""
    return pair_values(curves, "loss_barrier", "train"), [(curve["a"], curve["b"]) for curve in curves]


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
    extra = results.get("extra_heldout", {})
    for name, entry in extra.items():
        lines.append(f"| {name} loss | {entry['count']} | {_cell(entry['loss'])} | {_cell(entry['test_loss'])} |")
    rows = [*ROWS, *((kind, f"{kind.replace('_', '–')} barrier") for entry in extra.values() for kind in entry["kinds"])]
    for kind, label in rows:
        barriers = results["barriers"][kind]
        lines.append(f"| {label} (loss) | {counts.get(kind, 0)} | {_cell(barriers['train'])} | {_cell(barriers['test'])} |")
    for kind, label in rows:
        barriers = results["accuracy_barriers"][kind]
        lines.append(f"| {label} (accuracy) | {counts.get(kind, 0)} | {_cell(barriers['train'])} | {_cell(barriers['test'])} |")
    return "\n".join(lines) + "\n\n" + matchers_line(results)


REPAIR_WORDS = {
    "off": "no REPAIR",
    "repair": "REPAIR (interior points' pre-activation statistics renormalised to the end points' interpolation)",
    "reset": "REPAIR = RESET here (BatchNorm statistics recomputed, as always)",
}


def matchers_line(results: Mapping[str, Any]) -> str:
    """Which permutation finders the results rest on: the stars' (Starlight's re-matching) and the
    evaluation's (aligning each measured pair), and whether the path was REPAIRed; results from
    before the choices existed used wm and no REPAIR."""
    star_matchers = sorted(set((results.get("star_matchers") or {}).values())) or ["—"]
    evaluation = (results.get("config") or {}).get("matcher", "wm")
    repair = REPAIR_WORDS[results.get("repair", "off")]
    return f"permutations: stars trained with {', '.join(star_matchers)}; pairs aligned with {evaluation}; {repair}"


# The star-domain claim, as :func:`verdict` tests it on the train-split loss barriers.
CLAIM_RATIO = 0.6  # star–held-out at most this fraction of regular–regular
CLAIM_LOSS_FACTOR = 2.0  # the star's own train loss at most this multiple of the regular models'


def verdict(results: Mapping[str, Any]) -> str:
    """One line: do the results show the paper's claim (a star is closer to held-out solutions)?

    All quantities are train-split loss barriers (eq. 1, ``barriers[KIND]["train"]``). The claim
    holds when all three conditions do:

    - **ratio**: mean star–held-out barrier / mean regular–regular barrier <= ``CLAIM_RATIO``;
    - **per-model means do not overlap**: each held-out model's barriers are averaged over the
      pairs it is in (``curves[KIND]``, whose ``"a"``/``"b"`` name the two models): over the stars
      for star–held-out, over its regular partners for regular–regular. The largest held-out
      model's mean barrier to the stars is below the smallest held-out model's mean barrier to the
      regular models. A mean per model, not per pair, because pairs sharing a model are not
      independent draws; the worst against the best, so no held-out model is closer to the
      regular models than another is to the stars; and held-out models on both sides, because
      they are the models measured against both, while a source is in only the few held-out ×
      source pairs the evaluation draws (``--heldout-source-pairs``; with 5 held-out models the
      second source is in one pair, and its "mean" would be a single barrier; the stricter
      minimum over all models, sources included, is reported beside it in
      docs/evidence/default-sweep.md);
    - **the star is trained as well**: mean star train loss <= ``CLAIM_LOSS_FACTOR`` × mean
      regular train loss (an under-trained star has low barriers for the wrong reason);
    - **beyond noise**: the difference star–held-out − regular–regular is below 0 beyond its
      uncertainty: its 95% bootstrap interval over the models and the matching's kept optima (both
      means on the same draws, :func:`starfast.uncertainty.difference_side`) lies below 0;
      otherwise it is "within noise" (checked where the results carry intervals; older results
      do not).

    Results without a star (or without regular pairs) get a line saying the claim was not tested.
    """
    barriers = results["barriers"]
    regular, star = barriers["regular_regular"]["train"], barriers["star_heldout"]["train"]
    if not star:
        return "verdict: no star was evaluated, so the star-domain claim was not tested (train the star stage)"
    if not regular:
        return "verdict: no regular–regular pair was measured, so the star-domain claim was not tested"
    ratio = star["mean"] / regular["mean"] if regular["mean"] > 0 else float("inf")
    star_loss, regular_loss = results["star_loss"]["mean"], results["regular_loss"]["mean"]
    loss_factor = star_loss / regular_loss if regular_loss > 0 else float("inf")
    star_means = _model_means(results["curves"]["star_heldout"], ("b",))  # "a" is the star
    regular_means = _model_means(results["curves"]["regular_regular"], ("a", "b"))
    compared = [label for label in star_means if label in regular_means]
    checked = bool(compared)
    worst_star = max(star_means[label] for label in compared) if checked else None
    best_regular = min(regular_means[label] for label in compared) if checked else None
    separated = checked and worst_star < best_regular
    if not checked:
        overlap = "per-model means unknown: the curves name no held-out model in both kinds of pair"
    elif separated:
        overlap = "per-model means do not overlap"
    else:
        overlap = (f"per-model means overlap: largest held-out mean to the stars {worst_star:.3g}, "
                   f"smallest to the regular models {best_regular:.3g}")
    # Results from before intervals existed are judged as they were.
    measured_noise = "ci" in star and "ci" in regular
    if measured_noise:
        noise, difference = difference_side(pairs_of(results["curves"]["star_heldout"]),
                                            pairs_of(results["curves"]["regular_regular"]))
    failures = [
        reason for failed, reason in (
            (measured_noise and noise == "within noise", "the difference is within noise"),
            (ratio > CLAIM_RATIO, f"ratio above {CLAIM_RATIO:g}×"),
            (not separated, "per-model means overlap" if checked else "per-model means not checked"),
            (loss_factor > CLAIM_LOSS_FACTOR, f"star under-trained, loss above {CLAIM_LOSS_FACTOR:g}×"),
        ) if failed
    ]
    outcome = "the star-domain claim holds here" if not failures else f"the star-domain claim does not hold here ({'; '.join(failures)})"
    intervals = ""
    if measured_noise:
        spread = f" {difference[0]:.3g} to {difference[1]:.3g}" if difference else ""
        intervals = (f"; difference star − regular{spread} (95% bootstrap over models and matchings): "
                     f"{'below, beyond noise' if noise == 'below' else noise}")
    return (f"verdict: star–held-out barrier {star['mean']:.3g} vs regular–regular {regular['mean']:.3g} "
            f"({ratio:.2f}×, {overlap}{intervals}); star train loss {star_loss:.3g} vs regular {regular_loss:.3g} "
            f"({loss_factor:.1f}×): {outcome}")


def _model_means(curves, ends: Tuple[str, ...]) -> Dict[str, float]:
    """Mean train loss barrier per model over the curves it is an end (``"a"``/``"b"``) of;
    empty when a curve does not name its models (results written before curves did)."""
    barriers: Dict[str, List[float]] = {}
    for curve in curves:
        if any(end not in curve for end in ends):
            return {}
        for end in ends:
            barriers.setdefault(curve[end], []).append(curve["loss_barrier"]["train"])
    return {label: sum(values) / len(values) for label, values in barriers.items()}


def write_table(path: Path, results: Mapping[str, Any]) -> None:
    """``table.md``: the table, the verdict line, then where the numbers came from (environment and
    seeds, where the results record them)."""
    origin = [line for line in (environment_line(results.get("environment")), seeds_line(results.get("seeds"))) if line]
    write_text(path, format_table(results) + "\n\n" + verdict(results) + "\n" + "".join(f"\n{line}\n" for line in origin))


def seeds_line(seeds: Optional[Mapping[str, Sequence[int]]]) -> str:
    """``seeds: sources 0–9, heldout 1000–1002, …`` (ranges where consecutive); empty without seeds."""
    if not seeds:
        return ""

    def spelled(values: Sequence[int]) -> str:
        values = sorted(values)
        if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
            return f"{values[0]}–{values[-1]}"
        return ", ".join(map(str, values)) or "none"

    return "seeds: " + "; ".join(f"{role} {spelled(values)}" for role, values in seeds.items()) + (
        f" (bootstrap seed {BOOTSTRAP_SEED})")


def plot_curves(path: Path, results: Mapping[str, Any]) -> bool:
    """Write ``curves.png``; returns False (and writes nothing) when matplotlib is missing."""
    plt = pyplot(path)
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
    axes[0, 0].legend(title="lines: mean over pairs\nbands: ± 1 std over pairs", title_fontsize="small")
    model = results.get("model") or {}
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted((model.get("kwargs") or {}).items()))
    described = f"{model.get('arch', 'model')}" + (f" ({kwargs})" if kwargs else "")
    figure.suptitle(f"{results.get('dataset', 'dataset')}, {described}: loss and accuracy along the matched linear paths")
    return save_figure(plt, figure, path)


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
    plt = pyplot(path)
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
    return save_figure(plt, figure, path)


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
        "| #models | regular | best of n | ensemble | star | best star | MergeMany |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        stars = row["star"]
        lines.append(
            f"| {row['size']} | {_percent(row['regular'])} | {_percent(row['regular'], 'max')} | "
            f"{100 * row['ensemble']['accuracy']:.2f} | {_percent(stars)} (n={len(stars['values']) if stars else 0}) | "
            f"{_percent(stars, 'max')} | {_mergemany(row)} |"
        )
    clock = results["rows"][0]["cost"]["regular"].get("clock", "wall time") if results["rows"] else "wall time"
    lines += [
        "",
        f"| #models | method | forward FLOPs / example | parameter memory | time / test batch (ms, {clock}) | time vs regular |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for method in [method for method in ("regular", "ensemble", "star", "mergemany") if method in row["cost"]]:
            cost = row["cost"][method]
            lines.append(
                f"| {row['size']} | {method} | {cost['flops_per_example']:,.0f} | {_bytes(cost['parameter_bytes'])} | "
                f"{1000 * cost['seconds_per_batch']:.3f} | {cost['seconds_per_batch'] / row['cost']['regular']['seconds_per_batch']:.2f}× |"
            )
    return "\n".join(lines)


def _mergemany(row: Mapping[str, Any]) -> str:
    """MergeMany's accuracy and rounds (fusion results from before it existed have none)."""
    merged = row.get("mergemany")
    if merged is None:
        return "—"
    return f"{100 * merged['accuracy']:.2f} ({merged['rounds']} rounds{'' if merged['converged'] else ', not converged'})"


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


def save_figure(plt, figure, path: Path) -> bool:
    """Lay out ``figure``, write it to ``path`` atomically as PNG, close it; True."""
    figure.tight_layout()
    with replaced_atomically(path) as name:
        figure.savefig(name, format="png", dpi=120)
    plt.close(figure)
    return True


def pyplot(path: Path):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {Path(path).name} was not drawn (pip install matplotlib)")
        return None
    return plt
