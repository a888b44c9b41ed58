"""An experiment's outputs: ``results.json``, ``table.md``, ``figure.png`` and the verdict line.

All barriers are train-split loss barriers (eq. 1), as in the paper's figures and Tables 7–12.
A point's "star–held-out" and "regular–regular" numbers are means ± std over the held-out models
of each held-out model's mean barrier over its pairs (the paper's error bars "across held-out
models"), then the mean's 95% bootstrap interval over the models and the matching's kept optima,
and its range over those optima (:mod:`starfast.uncertainty`); the min and max columns are over single pairs
(Table 8). The verdict counts a difference (star below regular, a step along the axis) only when
the bootstrap interval of the difference (both means on the same draws of the models and of the
matching's kept optima) excludes 0, and counts it "within noise" otherwise.

The figure takes the paper's form: ``sweep`` draws the star–held-out barrier against the sweep
axis with error bars, and regular–regular as the paper draws its reference (one band when every
point shares the same reference pairs, error bars per point otherwise); ``scatter`` (Figure 3)
draws star–held-out against regular–regular, one panel per swept option, each point annotated, on
log–log axes with the diagonal; ``curves``
(Figure 7) draws the test loss along the paths of each point's star–model and model–model pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from starfast.experiments.catalog import Experiment
from starfast.experiments.plan import spelled
from starfast.files import write_json
from starfast.report import CLAIM_LOSS_FACTOR, pairs_of, pyplot, save_figure, uncertainty_text, write_text
from starfast.environment import environment_line
from starfast.uncertainty import BOOTSTRAP_SEED, compare, difference_side

SPLIT = "train"


def _barrier(point: Mapping[str, Any], kind: str, key: str = "over_heldout") -> Optional[Dict[str, Any]]:
    return point["barriers"][kind][SPLIT][key]


def _mean_std(summary: Optional[Mapping[str, Any]]) -> str:
    return "—" if not summary else f"{summary['mean']:.4f} ± {summary['std']:.4f}{uncertainty_text(summary)}"


def _side(first: Mapping[str, Any], first_kind: str, second: Mapping[str, Any], second_kind: str) -> str:
    """Whether the mean barrier of ``first_kind`` at point ``first`` is below, above or within noise
    of that of ``second_kind`` at ``second`` (:func:`starfast.uncertainty.difference_side`, the
    per-held-out means on the same draws of the models); points without curves (or measured
    before intervals existed) compare their means."""
    a, b = _barrier(first, first_kind), _barrier(second, second_kind)
    curves = [point.get("curves", {}).get(kind) for point, kind in ((first, first_kind), (second, second_kind))]
    if "ci" not in a or "ci" not in b or not all(curves):
        return compare((a["mean"], a["mean"]), (b["mean"], b["mean"]))
    heldout = sorted(set(first["barriers"][first_kind][SPLIT]["per_heldout"]) | set(second["barriers"][second_kind][SPLIT]["per_heldout"]))
    side, _ = difference_side(pairs_of(curves[0]), pairs_of(curves[1]), credited=heldout)
    return side


def _number(summary: Optional[Mapping[str, Any]], key: str) -> str:
    return "—" if not summary else f"{summary[key]:.4f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # |Z| inside a table cell


def format_table(experiment: Experiment, points: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per point (see the module docstring for the columns)."""
    lines = [
        f"| {_cell(experiment.axis)} | stars × held-out | regular loss | star loss | regular–regular | star–held-out | ratio | "
        "RR min | SR min | RR max | SR max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in points:
        regular, star = _barrier(point, "regular_regular"), _barrier(point, "star_heldout")
        regular_pairs, star_pairs = _barrier(point, "regular_regular", "pairs"), _barrier(point, "star_heldout", "pairs")
        ratio = f"{star['mean'] / regular['mean']:.2f}×" if regular and star and regular["mean"] > 0 else "—"
        anchors = point["perturbation"]["samples"] if point["perturbation"] else point["star_seeds"]
        lines.append(
            f"| {_cell(point['label'])} | {anchors} × {point['heldout']} | {_mean_std(point['regular_loss'][SPLIT])} | "
            f"{_mean_std(point['star_loss'][SPLIT])} | {_mean_std(regular)} | {_mean_std(star)} | {ratio} | "
            f"{_number(regular_pairs, 'min')} | {_number(star_pairs, 'min')} | {_number(regular_pairs, 'max')} | "
            f"{_number(star_pairs, 'max')} |"
        )
    return "\n".join(lines)


def verdict(experiment: Experiment, points: Sequence[Mapping[str, Any]], missing: Sequence[str] = ()) -> str:
    """One line: do the experiment's claims (``experiment.claims``) hold here, with the numbers.
    ``falls`` holds when every step along the axis is down, and in part when the barrier ends below
    where it started but some step is up. No claim holds at a point whose star's train loss is above
    ``CLAIM_LOSS_FACTOR`` times the regular models' (as in the main job's verdict). The experiment's
    ``controls`` (e.g. no matching at all) are reported beside the claim, not judged by it."""
    measured = [point for point in points if _barrier(point, "star_heldout") and _barrier(point, "regular_regular")]
    controls = [point for point in measured if point["value"] in experiment.controls]
    measured = [point for point in measured if point not in controls]
    if not measured:
        return f"verdict ({experiment.name}): nothing was measured" + (f" (failed: {', '.join(missing)})" if missing else "")
    ratios = [_barrier(point, "star_heldout")["mean"] / _barrier(point, "regular_regular")["mean"] for point in measured]
    sides = [_side(point, "star_heldout", point, "regular_regular") for point in measured]
    below, unclear = sides.count("below"), sides.count("within noise")
    parts = [f"star–held-out below regular–regular at {below} of {len(measured)} points"
             + (f", within noise at {unclear}" if unclear else "") + f" ({min(ratios):.2f}–{max(ratios):.2f}× of it)"]
    # A star (or perturbed star) far worse than the regular models has a low barrier for the wrong reason.
    worse = [point["label"] for point in measured if point.get("star_loss") and point.get("regular_loss")
             and point["star_loss"][SPLIT]["mean"] > CLAIM_LOSS_FACTOR * point["regular_loss"][SPLIT]["mean"]]
    if worse:
        parts.append(f"but the star's own loss is above {CLAIM_LOSS_FACTOR:g}× the regular models' at {', '.join(worse)}")
    holds = below == len(measured) and not worse
    in_part = False  # the barrier falls overall, but not at every step
    if "falls" in experiment.claims:
        barriers = [_barrier(point, "star_heldout")["mean"] for point in measured]
        moves = [_side(later, "star_heldout", earlier, "star_heldout") for earlier, later in zip(measured, measured[1:])]
        steps, still = moves.count("below"), moves.count("within noise")
        first, last = measured[0], measured[-1]
        parts.insert(0, f"star–held-out goes from {barriers[0]:.4f} at {first['label']} to {barriers[-1]:.4f} at "
                        f"{last['label']} ({steps} of {len(barriers) - 1} steps down"
                        + (f", {still} within noise" if still else "") + ")")
        in_part = holds and _side(last, "star_heldout", first, "star_heldout") == "below" and steps < len(barriers) - 1
        holds = holds and steps == len(barriers) - 1
    if "separated" in experiment.claims:
        separated = [point["label"] for point in measured
                     if _barrier(point, "star_heldout", "pairs")["max"] < _barrier(point, "regular_regular", "pairs")["min"]]
        parts.append(f"largest star–held-out pair below the smallest regular–regular pair at {len(separated)} of "
                     f"{len(measured)} points")
        holds = holds and len(separated) == len(measured)
    for control in controls:
        ratio = _barrier(control, "star_heldout")["mean"] / _barrier(control, "regular_regular")["mean"]
        losses = control["star_loss"][SPLIT]["mean"] / control["regular_loss"][SPLIT]["mean"]
        parts.append(f"control {control['label']} (not the paper's claim): star–held-out {ratio:.2f}× regular–regular, "
                     f"star loss {losses:.3g}× the regular models'")
    outcome = ("the paper's trend holds here" if holds else "the paper's trend holds here only in part: not every step is "
               "down beyond noise" if in_part else "the paper's trend does not hold here")
    if missing:
        outcome += f" (points not measured: {', '.join(missing)})"
    return f"verdict ({experiment.name}): {'; '.join(parts)}: {outcome}"


def _value(point: Mapping[str, Any]) -> Any:
    return point["value"]


def plot(path: Path, experiment: Experiment, points: Sequence[Mapping[str, Any]], title: str) -> bool:
    """``figure.png`` (see the module docstring); False (nothing written) without matplotlib or
    without a measured point."""
    measured = [point for point in points if _barrier(point, "star_heldout") and _barrier(point, "regular_regular")]
    plt = pyplot(path) if measured else None
    if plt is None:
        return False
    if experiment.figure == "scatter":
        figure = _draw_scatter(plt, measured)
    else:
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        if experiment.figure == "curves":
            _draw_curves(axis, measured)
        else:
            _draw_sweep(axis, experiment, measured)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    return save_figure(plt, figure, path)


def _draw_sweep(axis, experiment: Experiment, points: Sequence[Mapping[str, Any]]) -> None:
    """Figure 1's form: star–held-out against the axis, regular–regular as a band when every point
    shares its reference pairs, as points with error bars otherwise."""
    star = [_barrier(point, "star_heldout") for point in points]
    regular = [_barrier(point, "regular_regular") for point in points]
    numeric = all(isinstance(_value(point), (int, float)) for point in points)
    xs: List[Any] = [_value(point) for point in points] if numeric else list(range(len(points)))
    axis.errorbar(xs, [s["mean"] for s in star], yerr=[s["std"] for s in star], fmt="o-", color="tab:orange",
                  capsize=3, label="star–held-out")
    if len({repr(point["barriers"]["regular_regular"][SPLIT]["per_heldout"]) for point in points}) == 1:
        axis.axhline(regular[0]["mean"], color="tab:blue", label="regular–regular")
        axis.axhspan(regular[0]["mean"] - regular[0]["std"], regular[0]["mean"] + regular[0]["std"], color="tab:blue", alpha=0.15)
    else:
        axis.errorbar(xs, [r["mean"] for r in regular], yerr=[r["std"] for r in regular], fmt="s--", color="tab:blue",
                      capsize=3, label="regular–regular")
    axis.set_xticks(xs, [spelled(_value(point)) if numeric else point["label"] for point in points])
    axis.set_xlabel(experiment.axis)
    axis.set_ylabel("train loss barrier")
    axis.set_ylim(bottom=0)
    axis.legend(title="mean ± std over held-out models", title_fontsize="small")


def _draw_scatter(plt, points: Sequence[Mapping[str, Any]]):
    """Figure 3's form: star–held-out against regular–regular, one panel per swept option (width,
    depth), each point annotated, on log–log axes with the diagonal."""
    panels: Dict[str, List[Mapping[str, Any]]] = {}
    for point in points:
        value = _value(point)
        panels.setdefault(str(value[0]) if isinstance(value, (tuple, list)) else "", []).append(point)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for axis, (option, members) in zip(axes[0], panels.items()):
        star = [_barrier(point, "star_heldout") for point in members]
        regular = [_barrier(point, "regular_regular") for point in members]
        axis.errorbar([r["mean"] for r in regular], [s["mean"] for s in star], xerr=[r["std"] for r in regular],
                      yerr=[s["std"] for s in star], fmt="o", color="tab:orange", capsize=3)
        for point, r, s in zip(members, regular, star):
            axis.annotate(point["label"], (r["mean"], s["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        values = [r["mean"] for r in regular] + [s["mean"] for s in star]
        low, high = min(values) / 2, max(values) * 2
        axis.plot([low, high], [low, high], color="tab:blue", linestyle="--", label="star = regular")
        if low > 0:
            from matplotlib.ticker import NullFormatter

            axis.set_xscale("log")
            axis.set_yscale("log")
            for ticks in (axis.xaxis, axis.yaxis):
                ticks.set_minor_formatter(NullFormatter())  # labels on decades only: minor ones collide
        axis.set_title(f"varying {option}" if option else "", fontsize=9)
        axis.set_xlabel("regular–regular barrier (mean ± std over held-out models)")
        axis.set_ylabel("star–held-out barrier")
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    return figure


def _draw_curves(axis, points: Sequence[Mapping[str, Any]]) -> None:
    """Figure 7's form: the test loss along t, mean ± std over pairs, for each point's star–model
    and model–model pairs."""
    import numpy as np

    colors = iter(["tab:orange", "tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown"])
    for point in points:
        for kind, name in (("star_heldout", f"star–{point['label']}"), ("regular_regular", f"{point['label']}–{point['label']}")):
            curves = point["curves"][kind]
            if not curves:
                continue
            stacked = np.asarray([curve["test_loss"] for curve in curves])
            t, mean, std, color = np.asarray(curves[0]["t"]), stacked.mean(0), stacked.std(0), next(colors)
            axis.plot(t, mean, color=color, linestyle="-" if kind == "star_heldout" else "--", label=f"{name} (n={len(curves)})")
            axis.fill_between(t, mean - std, mean + std, color=color, alpha=0.15)
    axis.set_xlabel("t  (0 = first model, 1 = matched second model)")
    axis.set_ylabel("test loss")
    axis.legend(title="mean ± std over pairs", title_fontsize="small", fontsize="small")


OUTPUT_NAMES = ("results.json", "table.md", "figure.png")  # an experiment's outputs, published as a unit


def write_outputs(folder: Path, experiment: Experiment, results: Mapping[str, Any]) -> List[str]:
    """``results.json``, ``table.md`` (notes with the environment, table, verdict) and ``figure.png``
    into ``folder``; returns the names written (of :data:`OUTPUT_NAMES`)."""
    points = results["points"]
    write_json(folder / "results.json", dict(results))
    notes = [f"{experiment.name}: {experiment.paper}; {results['note']}"] + ([results["analogue"]] if results["analogue"] else [])
    if results.get("environment"):  # results from before environments were recorded have none
        notes.append(f"{environment_line(results['environment'])}; bootstrap seed {BOOTSTRAP_SEED}")
    write_text(folder / "table.md", "\n".join(notes) + "\n\n" + format_table(experiment, points) + "\n\n" + results["verdict"] + "\n")
    title = f"{experiment.paper.split(',')[0].split(' (')[0]} analogue: {results['dataset']}, {results['model']}"
    drawn = plot(folder / "figure.png", experiment, points, title)
    return ["results.json", "table.md"] + (["figure.png"] if drawn else [])
