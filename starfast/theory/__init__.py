"""Appendix A of the paper: the two-layer theory of star models, checked numerically.

- :mod:`starfast.theory.lemma2`: uniform sampling of the solution set ``{|v1| = |v2| = 1,
  v1 . v2 = C}``, the permutation search for Lemma 2's criterion (exact brute force, certified
  bracket by linear assignments and local search) and the ``Q(m, eps)`` table of Figure 5.
- :mod:`starfast.theory.twolayer`: the 2-D Gaussian task, batched training of two-layer networks
  (linear and ELU), batched weight matching and barriers, and the star-model proportions of
  Tables 3 and 4.
- :mod:`starfast.theory.cli`: ``python -m starfast.theory`` and its report files.
"""
from starfast.theory.lemma2 import (
    SearchResult,
    lemma2_table,
    min_gap_brute_force,
    min_gap_search,
    sample_solution_set,
)
from starfast.theory.twolayer import (
    GaussianTask,
    TrainRecipe,
    barrier_curves,
    gaussian_data,
    match_two_layer,
    star_table,
    train_two_layer,
)

__all__ = [
    "GaussianTask", "SearchResult", "TrainRecipe", "barrier_curves", "gaussian_data", "lemma2_table",
    "match_two_layer", "min_gap_brute_force", "min_gap_search", "sample_solution_set", "star_table", "train_two_layer",
]
