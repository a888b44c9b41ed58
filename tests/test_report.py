"""The verdict line: the three conditions of the star-domain claim on hand-made results dicts.

Each results dict is built from labelled pairs ``(a, b, train loss barrier)``; the summaries are
computed here with ``statistics`` (as ``starfast.evaluation`` stores them), so the verdict's ratio
and per-model means are checked against numbers worked out independently in each test.
"""
import statistics

from starfast.report import verdict, write_table

HELDOUT = ("heldout seed 1000", "heldout seed 1001", "heldout seed 1002")
SOURCE = "sources seed 0"
STARS = ("star star-0000", "star star-0001")


def summary(values):
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values), "values": list(values)}


def results_of(regular_pairs, star_pairs, regular_loss=0.003, star_loss=0.003):
    """A results dict shaped like ``evaluate_run``'s, from ``(a, b, barrier)`` triples."""
    curves = {
        kind: [{"a": a, "b": b, "loss_barrier": {"train": barrier, "test": barrier}} for a, b, barrier in pairs]
        for kind, pairs in (("regular_regular", regular_pairs), ("star_heldout", star_pairs), ("star_source", []))
    }
    barriers = {kind: {split: summary([curve["loss_barrier"][split] for curve in kind_curves]) for split in ("train", "test")}
                for kind, kind_curves in curves.items()}
    return {
        "regular_loss": summary([regular_loss] * 4), "regular_test_loss": summary([0.1] * 4),
        "star_loss": summary([star_loss] * len(STARS)) if star_pairs else None,
        "star_test_loss": summary([0.1] * len(STARS)) if star_pairs else None,
        "barriers": barriers, "accuracy_barriers": barriers, "curves": curves,
        "counts": {"stars": len(STARS) if star_pairs else 0, **{kind: len(c) for kind, c in curves.items()}},
    }


def regular_pairs(barriers):
    """The three held-out pairs and each held-out model against the source, in that order."""
    ends = [(HELDOUT[0], HELDOUT[1]), (HELDOUT[0], HELDOUT[2]), (HELDOUT[1], HELDOUT[2])]
    ends += [(heldout, SOURCE) for heldout in HELDOUT]
    return [(a, b, barrier) for (a, b), barrier in zip(ends, barriers)]


def star_pairs(barriers_per_heldout):
    """Every star against every held-out model; ``barriers_per_heldout[h]`` lists one per star."""
    return [(star, HELDOUT[h], barriers[s]) for h, barriers in enumerate(barriers_per_heldout) for s, star in enumerate(STARS)]


def test_the_claim_holds():
    regular = regular_pairs([0.05, 0.07, 0.06, 0.08, 0.06, 0.07])  # mean 0.065; smallest per-model mean 0.057 (h1)
    stars = star_pairs([[0.01, 0.02], [0.02, 0.03], [0.015, 0.025]])  # mean 0.02; largest held-out mean 0.025
    line = verdict(results_of(regular, stars, regular_loss=0.010, star_loss=0.012))
    ratio = 0.02 / statistics.fmean([0.05, 0.07, 0.06, 0.08, 0.06, 0.07])
    assert line.startswith("verdict: star–held-out barrier 0.02 vs regular–regular 0.065 "), line
    assert f"({ratio:.2f}×, per-model means do not overlap)" in line, line
    assert "star train loss 0.012 vs regular 0.01 (1.2×)" in line, line
    assert line.endswith("the star-domain claim holds here"), line
    assert "\n" not in line


def test_it_fails_by_the_ratio_alone():
    regular = regular_pairs([0.06] * 6)
    stars = star_pairs([[0.045, 0.045]] * 3)  # 0.75× the regular mean, yet every model mean is below 0.06
    line = verdict(results_of(regular, stars))
    assert "(0.75×, per-model means do not overlap)" in line, line
    assert line.endswith("the star-domain claim does not hold here (ratio above 0.6×)"), line


def test_it_fails_by_overlapping_per_model_means_alone():
    # Regular means per held-out model: h0 (0.03 + 0.03 + 0.15) / 3 = 0.07, h1 and h2 (0.03 + 0.15 + 0.15) / 3 = 0.11.
    regular = regular_pairs([0.03, 0.03, 0.15, 0.15, 0.15, 0.15])
    # Star mean 0.03 (0.27× the regular mean 0.11), but h2's mean to the stars is (0.07 + 0.08) / 2 = 0.075.
    stars = star_pairs([[0.01, 0.01], [0.005, 0.005], [0.07, 0.08]])
    line = verdict(results_of(regular, stars))
    expected_ratio = statistics.fmean([0.01, 0.01, 0.005, 0.005, 0.07, 0.08]) / statistics.fmean([0.03, 0.03, 0.15, 0.15, 0.15, 0.15])
    assert f"({expected_ratio:.2f}×, per-model means overlap: largest held-out mean to the stars 0.075, " \
           "smallest to the regular models 0.07)" in line, line
    assert line.endswith("the star-domain claim does not hold here (per-model means overlap)"), line


def test_per_model_means_compare_the_held_out_models_measured_both_ways():
    # The source is in the three held-out x source pairs only; its mean (0.03) is below every
    # held-out model's mean to the stars, but it has no barrier to a star to compare with.
    regular = regular_pairs([0.15, 0.15, 0.15, 0.03, 0.03, 0.03])  # held-out means (0.15 + 0.15 + 0.03) / 3 = 0.11
    stars = star_pairs([[0.04, 0.05]] * 3)
    line = verdict(results_of(regular, stars))
    assert "(0.50×, per-model means do not overlap)" in line and line.endswith("holds here"), line


def test_a_tie_between_per_model_means_counts_as_overlap():
    regular = regular_pairs([0.06] * 6)
    stars = star_pairs([[0.02, 0.02], [0.02, 0.02], [0.06, 0.06]])  # ratio 0.56, but held-out 2 ties at 0.06
    assert verdict(results_of(regular, stars)).endswith("does not hold here (per-model means overlap)")


def test_it_fails_when_the_star_is_under_trained():
    regular = regular_pairs([0.06] * 6)
    stars = star_pairs([[0.02, 0.02]] * 3)
    line = verdict(results_of(regular, stars, regular_loss=0.002, star_loss=0.005))
    assert "star train loss 0.005 vs regular 0.002 (2.5×)" in line, line
    assert line.endswith("the star-domain claim does not hold here (star under-trained, loss above 2×)"), line
    # Exactly twice the regular loss is still "trained as well".
    assert verdict(results_of(regular, stars, regular_loss=0.25, star_loss=0.5)).endswith("holds here")


def test_every_failing_condition_is_named():
    regular = regular_pairs([0.03, 0.03, 0.15, 0.15, 0.15, 0.15])
    stars = star_pairs([[0.09, 0.09]] * 3)
    line = verdict(results_of(regular, stars, regular_loss=0.001, star_loss=0.01))
    assert line.endswith("(ratio above 0.6×; per-model means overlap; star under-trained, loss above 2×)"), line


def test_no_star_means_no_verdict_on_the_claim():
    line = verdict(results_of(regular_pairs([0.06] * 6), []))
    assert line.startswith("verdict: no star was evaluated"), line
    assert "holds" not in line


def test_curves_without_model_names_leave_the_claim_undecided():
    results = results_of(regular_pairs([0.06] * 6), star_pairs([[0.02, 0.02]] * 3))
    for curves in results["curves"].values():
        for curve in curves:
            del curve["a"], curve["b"]
    line = verdict(results)
    assert "per-model means unknown: the curves name no held-out model in both kinds of pair" in line, line
    assert line.endswith("does not hold here (per-model means not checked)"), line


def test_the_table_file_ends_with_the_verdict(tmp_path):
    results = results_of(regular_pairs([0.06] * 6), star_pairs([[0.02, 0.02]] * 3))
    write_table(tmp_path / "table.md", results)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0].startswith("| quantity |") and lines[-1] == verdict(results)


def test_a_zero_regular_barrier_cannot_be_beaten():
    line = verdict(results_of(regular_pairs([0.0] * 6), star_pairs([[0.0, 0.0]] * 3)))
    assert line.endswith("does not hold here (ratio above 0.6×; per-model means overlap)"), line
