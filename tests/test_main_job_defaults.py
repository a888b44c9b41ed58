"""The main job's per-dataset defaults: what ``python -m starfast.train`` builds when flags are left out.

The values themselves were chosen by the sweep in ``docs/evidence/default-sweep.md``; these tests
pin how they apply: only to the dataset (and architecture) they were measured on, the model options
replaced as a whole by any ``--arch-kw``, the star's epochs a multiple of the regular models' epochs
and overridden by ``--star-epochs``.
"""
import pytest

from starfast.recipes import BUNDLED_PRESETS, MAIN_JOB_ARCH_KW, STAR_EPOCHS_FACTOR, resolve
from starfast.train import Distributed, build_context, build_parser


def context_for(tmp_path, *flags):
    parser = build_parser()
    args = parser.parse_args(["--run-dir", str(tmp_path / "run"), "--device", "cpu", *flags])
    return build_context(args, parser, Distributed())


def test_the_default_job_is_the_measured_digits_setting(tmp_path):
    context = context_for(tmp_path)
    assert context.spec.arch == "mlp" and context.dataset.name == "digits"
    assert context.spec.kwargs == MAIN_JOB_ARCH_KW[("mlp", "digits")] == {"width": 24, "depth": 3}
    model = context.spec.build()
    assert [layer.out_features for layer in model.hidden] == [24, 24, 24]
    assert context.recipe == BUNDLED_PRESETS["digits"]
    assert context.star_recipe.epochs == STAR_EPOCHS_FACTOR["digits"] * BUNDLED_PRESETS["digits"].epochs == 90
    # Apart from its length the star trains with the regular recipe.
    assert context.star_recipe.to_dict() == {**context.recipe.to_dict(), "epochs": 90}
    assert (context.sources, context.heldout, context.star_seeds) == (10, 5, 3)
    assert context.star_options.t_sampling == "uniform"  # the paper's sampling


def test_any_arch_kw_replaces_the_default_options_as_a_whole(tmp_path):
    context = context_for(tmp_path, "--arch-kw", "width=64")
    assert context.spec.kwargs == {"width": 64}
    assert len(context.spec.build().hidden) == 2  # the MLP's own default depth, not the main job's 3


def test_the_star_epochs_follow_the_regular_epochs_and_the_flag(tmp_path):
    assert context_for(tmp_path, "--epochs", "4").star_recipe.epochs == 4 * STAR_EPOCHS_FACTOR["digits"]
    assert context_for(tmp_path, "--star-epochs", "7").star_recipe.epochs == 7


@pytest.mark.parametrize("dataset", ["gaussians", "synthetic"])
def test_other_datasets_keep_the_architectures_own_defaults(tmp_path, dataset):
    context = context_for(tmp_path, "--dataset", dataset)
    assert context.spec.kwargs == {}
    assert context.star_recipe == context.recipe == resolve("mlp", dataset)  # the star trains as long as a regular model
