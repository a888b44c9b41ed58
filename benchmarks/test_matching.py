"""Weight matching and permutation benchmarks.

- 50 sources matched to one target: batched (one matmul + one batched compiled LAP per group)
  vs the Git Re-Basin way (one model at a time, costs rebuilt with index_select, scipy LAP).
  Both follow the same rules and run the same number of sweeps (asserted), so the times compare
  equal work; the FLOP rate of the cost matmuls is recorded in extra_info.
- Warm-started re-match after a small move of the target (θ + 1% noise) vs a cold match. Warm
  from the previous result (which skips provably unchanged groups), from a warm result
  (Starlight's steady state), in place from a warm result (``out=``, what Starlight runs), and
  from the perms alone. Two zoos: ``independent`` (the 50 independently initialised sources
  above, where even a cold match converges in ~4 sweeps) and ``star-like`` (each source a
  randomly permuted copy of the target plus noise of its own size: related to the target the way
  Starlight's sources are related to the star it trains, the case re-matching is for).
- ``permute`` of a [50, P] bank vs a per-parameter index_select loop.
"""
import dataclasses

import pytest
import torch

from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.ops import permute
from starfast.testing.matching_reference import match_one
from starfast.testing.zoo import independent_zoo

NUM_SOURCES = 50
ARCH = "resnet18" if torch.cuda.is_available() else "resnet20"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def zoo():
    return independent_zoo(ARCH, NUM_SOURCES, DEVICE)


def cost_flops_per_sweep(space: ParamSpace, spec, num_sources: int) -> int:
    flops = 0
    for group in spec.groups:
        for axis in group.axes:
            if axis.name in space:
                rest = space.entry(axis.name).shape
                numel = 1
                for size in rest:
                    numel *= size
                flops += 2 * num_sources * group.size * numel  # [n, d] @ [d, n] per source, d = numel / n
    return flops


def test_match_batched(bench, benchmark, zoo):
    space, spec, target, bank = zoo
    result = bench(f"match {NUM_SOURCES}x {ARCH}", "ours", lambda: match_weights(target, bank, spec, space=space), rounds=3)
    sweeps = int(result.sweeps.sum())
    benchmark.extra_info["sweeps"] = sweeps
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["cost_gflops_per_s"] = cost_flops_per_sweep(space, spec, 1) * sweeps / seconds / 1e9


def test_match_per_model_scipy(bench, benchmark, zoo):
    space, spec, target, bank = zoo
    target_views = space.views(target.cpu())
    bank_views = [space.views(row) for row in bank.cpu()]

    def loop():
        return [match_one(target_views, views, spec) for views in bank_views]

    results = bench(f"match {NUM_SOURCES}x {ARCH}", "baseline", loop, rounds=1, warmup_rounds=0)
    benchmark.extra_info["sweeps"] = sum(sweeps for _, sweeps in results)


@pytest.fixture(scope="module")
def star_like_zoo(zoo):
    space, spec, target, _ = zoo
    generator = torch.Generator().manual_seed(3)
    noisy = target.cpu() + target.abs().mean() * torch.randn(NUM_SOURCES, space.size, generator=generator)
    perms = {name: torch.stack([torch.randperm(spec.group(name).size, generator=generator) for _ in range(NUM_SOURCES)])
             for name in spec.identity()}
    return space, spec, target, permute(noisy, spec.index_map(space, perms)).to(target.device)


@pytest.mark.parametrize(
    "start", ["warm from the result", "warm from a warm result", "in place from a warm result", "warm from the perms", "cold"]
)
@pytest.mark.parametrize("zoo_kind", ["independent", "star-like"])
def test_rematch_after_small_move(bench, benchmark, request, start, zoo_kind):
    """``warm from the result``: from the cold match (the first warm start may also compute the
    sources' unit-norm scales); ``warm from a warm result``: from a result that already carries
    what it needed; ``in place``: the same, updating that result's rows (``out=``), as Starlight
    does (each round gets its own copy of the result, made outside the timing)."""
    space, spec, target, bank = request.getfixturevalue("zoo" if zoo_kind == "independent" else "star_like_zoo")
    first = match_weights(target, bank, spec, space=space)
    settled = match_weights(target, bank, spec, space=space, init=first)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)).to(target.device)
    moved = target + 0.01 * target.abs().mean() * noise
    group = f"rematch {NUM_SOURCES}x {ARCH} {zoo_kind} zoo after 1% move"
    if start == "in place from a warm result":
        def fresh_copy():
            own = dataclasses.replace(settled, permuted=settled.permuted.clone())
            return (own,), {}

        result = bench(group, "ours-in-place", lambda own: match_weights(moved, bank, spec, space=space, init=own, out=own.permuted),
                       rounds=7, setup=fresh_copy)
    else:
        init = {"warm from the result": first, "warm from a warm result": settled, "warm from the perms": first.perms, "cold": None}[start]
        role = {"warm from the result": "ours", "warm from a warm result": "ours-steady", "warm from the perms": "warm-perms", "cold": "baseline"}[start]
        result = bench(group, role, lambda: match_weights(moved, bank, spec, space=space, init=init), rounds=7)
    benchmark.extra_info["sweeps"] = int(result.sweeps.sum())


@pytest.mark.parametrize("how", ["permute", "index_select loop"])
def test_permute_bank(bench, zoo, how):
    space, spec, _, bank = zoo
    generator = torch.Generator().manual_seed(2)
    perms = {name: torch.stack([torch.randperm(spec.group(name).size, generator=generator) for _ in range(NUM_SOURCES)])
             for name in spec.identity()}
    index_maps = spec.index_map(space, {k: v.to(bank.device) for k, v in perms.items()})
    if how == "permute":
        out = torch.empty_like(bank)
        bench(f"permute [{NUM_SOURCES}, P] {ARCH}", "ours", lambda: permute(bank, index_maps, out=out), rounds=11)
        return
    per_model = [{name: index[k].to(bank.device) for name, index in perms.items()} for k in range(NUM_SOURCES)]

    def loop():
        rows = []
        for k in range(NUM_SOURCES):
            views = space.views(bank[k])
            parts = []
            for entry in space.entries:
                tensor = views[entry.name]
                for axis, group in spec.axes_of(entry.name):
                    size = spec.group(group).size
                    tensor = tensor.clone()
                    segment = tensor.narrow(axis.axis, axis.offset, size)
                    segment.copy_(segment.index_select(axis.axis, per_model[k][group]))
                parts.append(tensor.reshape(-1))
            rows.append(torch.cat(parts))
        return torch.stack(rows)

    result = bench(f"permute [{NUM_SOURCES}, P] {ARCH}", "baseline", loop, rounds=3)
    assert torch.equal(result, permute(bank, index_maps))
