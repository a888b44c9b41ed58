"""Weight matching with restarts (issue 26): R restarts batched as R·N rows of the same problems
(``match_weights(..., restarts=R)``) against the obvious alternative, the same R runs one after
another (one ``match_weights`` call per start and group order of :func:`restart_plan`).

Models: the default job's architecture (digits MLP, width 24, depth 3, 8x8 inputs), independently
initialised; 12 sources against one target, as the evaluation matches one anchor's partners. The
two sides find the same answers (asserted on the objective).
"""
import pytest
import torch

from starfast import models
from starfast.flat import ParamSpace
from starfast.matching import match_weights, restart_plan

SOURCES = 12


@pytest.fixture(scope="module")
def digits_mlps():
    torch.manual_seed(0)
    build = lambda: models.build("mlp", num_classes=10, in_channels=1, input_shape=(1, 8, 8), width=24, depth=3)  # noqa: E731
    target = build()
    space, spec = ParamSpace(target), models.permutation_spec(target)
    bank = torch.stack([space.flatten(build()) for _ in range(SOURCES)])
    return space, spec, space.flatten(target), bank


@pytest.mark.parametrize("restarts", [1, 8, 32])
@pytest.mark.parametrize("how", ["batched", "one run at a time"])
def test_restarts(bench, benchmark, digits_mlps, restarts, how):
    space, spec, target, bank = digits_mlps
    group = f"wm {restarts} restarts x {SOURCES} digits MLPs"
    if how == "batched":
        result = bench(group, "ours", lambda: match_weights(target, bank, spec, space=space, restarts=restarts), rounds=7)
        best = result.objective[-1]
    else:
        plan = restart_plan(spec, None, restarts, 0)

        def loop():
            return [match_weights(target, bank, spec, space=space, init=start, seed=seed) for start, seed in plan]

        runs = bench(group, "baseline", loop, rounds=7)
        best = torch.stack([run.objective[-1] for run in runs]).max(0).values
    benchmark.extra_info["mean_objective"] = float(best.mean())
    expected = match_weights(target, bank, spec, space=space, restarts=restarts).objective[-1]
    torch.testing.assert_close(best, expected, rtol=1e-6, atol=0)
