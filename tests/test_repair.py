"""REPAIR (``--repair``): every interior point's renormalised pre-activations have the
interpolated end points' per-channel mean and std (end-point statistics by a straightforward
hook-and-torch.std reference) on an MLP, a plain VGG and a LayerNorm ViT; the end points are
untouched; REPAIR lowers the barrier of trained digits MLPs (printed: by how much); a BatchNorm
network's curve is today's exactly (RESET); the flag, the results and the table."""
import pytest
import torch

from starfast import data, models
from starfast.barrier import barrier_curve
from starfast.evaluate import main as evaluate_main
from starfast.files import read_json
from starfast.flat import ParamSpace
from starfast.matchers import find_permutations
from starfast.models import ModelSpec
from starfast.recipes import Recipe
from starfast.repair import RENORMALISE, producers, repaired_buffers
from starfast.report import matchers_line
from starfast.sites import observing
from starfast.spec import Site
from starfast.training import train_model
from test_matchers import context
from tiny_runs import make_tiny_run

NETWORKS = [
    ("mlp", dict(depth=2, width=16), (1, 6, 6)),
    ("vgg11", dict(width=0.125, batchnorm=False), (3, 8, 8)),
    ("vit", dict(dim=16, depth=1, heads=2, mlp_dim=24, patch=4), (3, 8, 8)),
]


def reference_statistics(model, x):
    """Per producer: per-channel mean and population std of its output over every example and
    position, by plain forward hooks."""
    found = {}
    spec = models.permutation_spec(model)

    def hook(name, channel_dim):
        def record(_, __, output):
            columns = output.movedim(channel_dim, -1).reshape(-1, output.shape[channel_dim]).double()
            found[name] = (columns.mean(0), columns.std(0, unbiased=False))
        return record

    handles = [layer.register_forward_hook(hook(name, dim)) for name, layer, dim in producers(model, spec)]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize("name, kw, shape", NETWORKS, ids=[n[0] for n in NETWORKS])
def test_each_interior_point_gets_the_interpolated_statistics(name, kw, shape, rng):
    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=rng)))
    model_a, model_b = (models.build(name, 10, shape[0], shape, **kw).double() for _ in range(2))
    spec, space = models.permutation_spec(model_a), ParamSpace(model_a)
    rows = space.flatten(model_a), space.flatten(model_b)
    size = 400
    x = torch.randn(size, *shape, generator=rng, dtype=torch.float64)
    ts = torch.tensor([0.25, 0.5, 0.8], dtype=torch.float64)
    points = torch.stack([torch.lerp(rows[0], rows[1], float(t)) for t in ts])
    renormalised, buffers = repaired_buffers(skeleton=model_a, spec=spec, space=space, points=points, ts=ts,
                                             ends=((rows[0], {}), (rows[1], {})), train_data=[(x, torch.zeros(size))])
    goal_a, goal_b = reference_statistics(model_a, x), reference_statistics(model_b, x)
    layers = producers(model_a, spec)
    assert layers and {layer for layer, _, _ in layers} == set(goal_a)
    sites = [((layer, where), Site(f"{layer}.{RENORMALISE}", where, dim), layer_module.weight.shape[0])
             for layer, layer_module, dim in layers for where in ("input", "output")]
    for k, t in enumerate(ts.tolist()):
        seen = {}

        def keep(key, columns):
            seen[key] = columns.clone()  # an in-place activation follows

        with observing(renormalised.eval(), sites, keep):
            torch.func.functional_call(renormalised, ({**space.views(points[k]), **{n: b[k] for n, b in buffers.items()}},), (x,))
        worst = 0.0
        for layer, _, _ in layers:
            before, after = seen[(layer, "input")], seen[(layer, "output")]
            mean, std = after.mean(0), after.std(0, unbiased=False)
            goal_mean = torch.lerp(goal_a[layer][0], goal_b[layer][0], t)
            # BatchNorm's eps = 1e-5 is added to the point's own variance v: the renormalised std is
            # the goal's times sqrt(v / (v + eps)).
            own = before.var(0, unbiased=False)
            goal_std = torch.lerp(goal_a[layer][1], goal_b[layer][1], t) * (own / (own + 1e-5)).sqrt()
            scale = goal_std.clamp_min(1e-6)
            worst = max(worst, float(((mean - goal_mean).abs() / scale).max()), float(((std - goal_std).abs() / scale).max()))
        print(f"{name} t={t}: largest mismatch {worst:.3g} of the goal std")
        assert worst < 1e-9, (name, t, worst)


def trained_digits_mlps(count=3, epochs=8):
    dataset = data.load("digits")
    spec = ModelSpec.for_dataset("mlp", dataset, dict(width=64))
    recipe = Recipe(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=epochs, batch_size=32)
    states = [train_model(spec, dataset, recipe, seed, progress=False)[0] for seed in range(count)]
    skeleton = spec.build()
    space = ParamSpace(skeleton)
    return dataset, skeleton, space, [space.flatten(state) for state in states]


def test_repair_lowers_the_digits_mlp_barrier():
    dataset, skeleton, space, rows = trained_digits_mlps()
    spec = models.permutation_spec(skeleton)
    train = lambda: dataset.eval_batches("train", 500)  # noqa: E731
    aligned = find_permutations("wm", rows[0], torch.stack(rows[1:]), spec, space=space).permuted
    plain, repaired = [], []
    for row in aligned:
        before = barrier_curve(skeleton, rows[0], row, train, ts=11)
        after = barrier_curve(skeleton, rows[0], row, train, ts=11, repair=True)
        assert before.repair == "off" and after.repair == "repair"
        # The end points are the models as they are.
        for end in (0, -1):
            assert after.train_loss[end] == before.train_loss[end] and after.train_acc[end] == before.train_acc[end]
        plain.append(before.loss_barrier["train"])
        repaired.append(after.loss_barrier["train"])
    mean_plain, mean_repaired = sum(plain) / len(plain), sum(repaired) / len(repaired)
    print(f"digits MLP regular–regular train loss barrier (wm): {mean_plain:.4f} without REPAIR, {mean_repaired:.4f} "
          f"with ({mean_repaired / mean_plain:.2f}x); pairs {plain} -> {repaired}")
    assert all(after < before for before, after in zip(plain, repaired)), (plain, repaired)


def test_a_batchnorm_networks_curve_is_unchanged_as_reset(rng):
    skeleton = models.build("resnet20", 4, 3, (3, 8, 8), width=0.25)
    space = ParamSpace(skeleton)
    rows = 0.2 * torch.randn(2, space.size, generator=rng)
    batches = [(torch.randn(16, 3, 8, 8, generator=rng), torch.randint(4, (16,), generator=rng)) for _ in range(2)]
    today = barrier_curve(skeleton, rows[0], rows[1], batches, batches, ts=5)
    reset = barrier_curve(skeleton, rows[0], rows[1], batches, batches, ts=5, repair=True)
    assert reset.repair == "reset" and today.repair == "off"
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert torch.equal(getattr(reset, key), getattr(today, key)), key
    assert reset.loss_barrier == today.loss_barrier


def test_the_repair_flag_reaches_the_results_and_the_table(tmp_path, capsys):
    dataset = data.load("digits")
    run = make_tiny_run(tmp_path / "run", dataset, sources=2, heldout=2)
    assert context(["--repair"], tmp_path).evaluation.repair
    assert evaluate_main([str(run.path), "--repair", "--quiet", "--heldout-source-pairs", "1"]) == 0
    printed = capsys.readouterr().out
    results = read_json(run.results_folder / "results.json")
    assert results["repair"] == "repair" and results["config"]["repair"] is True
    assert {curve["repair"] for curves in results["curves"].values() for curve in curves} == {"repair"}
    assert "REPAIR (interior points' pre-activation statistics renormalised" in printed
    assert matchers_line({"repair": "reset"}).endswith("REPAIR = RESET here (BatchNorm statistics recomputed, as always)")
    with pytest.raises(SystemExit):
        evaluate_main([str(run.path), "--fusion", "--repair"])
    assert "--repair applies to the barriers" in capsys.readouterr().err
