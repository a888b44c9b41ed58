"""trace_spec: the hand-written zoo specs as its oracle (the same partition of (tensor, axis,
offset) for every architecture and option), its sites observed in real forward passes, the
constructs it must handle (grouped/depthwise convs, GroupNorm, channels-last LayerNorm,
nn.MultiheadAttention, concatenation), what it must leave out (and say so), and the errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from starfast import TraceError, check_spec, models, trace_spec

# Every zoo architecture with each of its options, small: (name, build kwargs, input shape).
ZOO = [
    ("mlp", dict(depth=3, width=16), (1, 8, 8)),
    ("mlp", dict(depth=1, width=8, activation="elu", bias=False), (2,)),
    ("mlp", dict(depth=2, width=8, activation="silu"), (3,)),
    ("mlp", dict(depth=2, width=8, activation="identity"), (3,)),
    ("linear2", dict(width=16), (2,)),
    ("linear2", dict(width=8, activation="elu"), (2,)),
    ("resnet18", dict(width=0.125), (3, 8, 8)),
    ("resnet20", dict(width=0.5, activation="elu"), (3, 8, 8)),
    ("resnet20", dict(width=1, activation="silu"), (1, 8, 8)),
    ("wrn", dict(depth=16, width=1), (3, 8, 8)),
    ("wrn", dict(depth=16, width=2, activation="elu"), (3, 8, 8)),
    ("vgg11", dict(width=0.125), (3, 8, 8)),
    ("vgg11", dict(width=0.125, batchnorm=False, activation="silu"), (3, 8, 8)),
    ("vgg19", dict(width=0.0625), (3, 8, 8)),
    ("vgg19", dict(width=0.0625, batchnorm=False), (3, 8, 8)),
    ("densenet40", dict(growth=4), (3, 8, 8)),
    ("vit", dict(dim=32, depth=2, heads=4, mlp_dim=64, patch=4), (3, 8, 8)),
    ("vit", dict(dim=16, depth=1, heads=1, mlp_dim=8, patch=2), (1, 4, 6)),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw, _ in ZOO]


def partition(spec):
    """A spec as a set of groups, each the set of (tensor, axis, offset) it permutes, with its size."""
    return {(group.size, frozenset((axis.name, axis.axis, axis.offset) for axis in group.axes)) for group in spec.groups}


def build(name, kw, shape, dtype=torch.float32):
    with torch.random.fork_rng():  # a fixed model, and the global generator left as it was
        torch.manual_seed(0)
        return models.build(name, num_classes=5, in_channels=shape[0], input_shape=shape, **kw).to(dtype)


_TRACED = {}


def traced(name, kw, shape, rng):
    """The strict traced spec of a zoo model (traced once per test session: export is the slow part)."""
    key = (name, tuple(sorted(kw.items())), shape)
    if key not in _TRACED:
        _TRACED[key] = trace_spec(build(name, kw, shape), torch.randn(2, *shape, generator=rng), strict=True)
    return _TRACED[key]


@pytest.mark.parametrize("name, kw, shape", ZOO, ids=IDS)
def test_traced_spec_is_the_hand_written_spec(name, kw, shape, rng):
    model = build(name, kw, shape)
    traced_spec = traced(name, kw, shape, rng)
    hand = models.permutation_spec(model)
    traced_only, hand_only = partition(traced_spec) - partition(hand), partition(hand) - partition(traced_spec)
    assert not traced_only and not hand_only, f"traced only: {sorted(map(str, traced_only))[:3]}; hand only: {sorted(map(str, hand_only))[:3]}"
    assert traced_spec.left_out == () and traced_spec.has_sites


def observe(model, sites, x, state=None):
    """The tensor at each of ``sites`` during one ``model(x)`` (with ``state`` swapped in)."""
    seen, handles = {}, []
    for site in sites:
        module = model.get_submodule(site.module)
        if site.where == "input":
            handles.append(module.register_forward_pre_hook(lambda _, args, site=site: seen.setdefault(site, []).append(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _, args, out, site=site: seen.setdefault(site, []).append(out)))
    with torch.no_grad():
        functional_call(model, state or {}, (x,))
    for handle in handles:
        handle.remove()
    assert all(len(seen[site]) == 1 for site in sites), "a site was reached more than once"
    return {site: tensors[0] for site, tensors in seen.items()}


@pytest.mark.parametrize("name, kw, shape", [ZOO[0], ZOO[7], ZOO[12], ZOO[15], ZOO[16]], ids=[IDS[i] for i in (0, 7, 12, 15, 16)])
def test_sites_show_the_group_units_permuted(name, kw, shape, rng):
    # At every site of a group, permuting that group alone permutes exactly the units the site names.
    model = build(name, kw, shape, torch.float64).eval()
    x = torch.randn(3, *shape, generator=rng, dtype=torch.float64)
    spec = traced(name, kw, shape, rng)
    before = observe(model, {site for group in spec.groups for site in group.sites}, x)
    for group in spec.groups:
        perm = spec.identity()
        perm[group.name] = torch.randperm(group.size, generator=rng)
        after = observe(model, group.sites, x, spec.apply(model.state_dict(), perm))
        for site in group.sites:
            expected = before[site].narrow(site.dim, site.offset, group.size).index_select(site.dim, perm[group.name])
            actual = after[site].narrow(site.dim, site.offset, group.size)
            torch.testing.assert_close(actual, expected, msg=lambda m: f"{group.name} at {site}: {m}")


class Blocks(nn.Module):
    """Grouped and depthwise convs, GroupNorm, a ConvNeXt-style channels-last LayerNorm and a
    residual add: every construct a zoo model does not have."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.expand = nn.Linear(8, 12)
        self.reduce = nn.Linear(12, 8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4)
        self.group_norm = nn.GroupNorm(3, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = self.reduce(F.gelu(self.expand(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + y
        x = F.relu(self.group_norm(self.grouped(x)))
        return self.head(x.mean((2, 3)))


def test_grouped_depthwise_groupnorm_channels_last(rng):
    model, x = Blocks(), torch.randn(2, 3, 6, 6, generator=rng)
    spec = trace_spec(model, x, strict=True)
    # The stream: the stem's channels, tied through the depthwise conv (its rows and bias), the
    # channels-last LayerNorm, the MLP's output, and the grouped conv's input axis (shared by its 4
    # groups of 2 channels, so the stream splits into 4 blocks of 2 permuted alike).
    stream = spec.group("stem")
    assert stream.size == 2
    assert {(a.name, a.axis, a.offset) for a in stream.axes} >= {
        ("stem.weight", 0, 0), ("stem.weight", 0, 6), ("depthwise.weight", 0, 4), ("norm.weight", 0, 2),
        ("reduce.weight", 0, 0), ("grouped.weight", 1, 0),
    }
    # The grouped conv's output: 4 groups of 3 rows, cut again by GroupNorm's 3 groups of 4.
    sizes = sorted(group.size for group in spec.groups if any(a.name == "grouped.weight" and a.axis == 0 for a in group.axes))
    assert sizes == [2, 2, 3, 3]  # rows [0,3) [4,6) [6,8) [9,12); rows 3 and 8 each stand alone
    assert sum(1 for g in spec.groups for a in g.axes if a.name == "grouped.weight" and a.axis == 0) == 4
    assert spec.group("expand").size == 12
    check_spec(model, spec, x)


class Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        attended, _ = self.attn(h, h, h)
        return self.head((h + attended).mean(1 if self.attn.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads(batch_first, rng):
    model, x = Attention(batch_first), torch.randn(2, 5, 6, generator=rng)
    spec = trace_spec(model, x, strict=True)
    qk = [g for g in spec.groups if any(a.name == "attn.in_proj_weight" and a.axis == 0 and a.offset < 16 for a in g.axes)]
    v = [g for g in spec.groups if any(a.name == "attn.in_proj_weight" and a.axis == 0 and a.offset >= 32 for a in g.axes)]
    assert [g.size for g in qk] == [4] * 4 and [g.size for g in v] == [4] * 4
    for h, group in enumerate(qk):  # query rows of head h with key rows of head h
        assert {(a.name, a.offset) for a in group.axes} == {
            ("attn.in_proj_weight", 4 * h), ("attn.in_proj_weight", 16 + 4 * h),
            ("attn.in_proj_bias", 4 * h), ("attn.in_proj_bias", 16 + 4 * h),
        }
    for h, group in enumerate(v):  # value rows of head h with the output projection's columns
        assert {(a.name, a.axis, a.offset) for a in group.axes} == {
            ("attn.in_proj_weight", 0, 32 + 4 * h), ("attn.in_proj_bias", 0, 32 + 4 * h), ("attn.out_proj.weight", 1, 4 * h),
        }
    check_spec(model, spec, x)


class Unproven(nn.Module):
    """A cumulative sum over hidden units (order matters) and a conv map flattened with its pixels."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 5)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x, image):
        hidden = self.second(torch.cumsum(torch.relu(self.first(x)), dim=1))
        return hidden.sum(1, keepdim=True) + self.fc(torch.relu(self.conv(image)).flatten(1))


def test_unproven_axes_are_left_out_and_named(rng):
    model = Unproven()
    inputs = (torch.randn(2, 4, generator=rng), torch.randn(2, 1, 4, 4, generator=rng))
    spec = trace_spec(model, inputs)
    groups = {group.name for group in spec.groups}
    assert groups == {"second"}  # only the second layer's units are provably permutable
    left = {axis.name for entry in spec.left_out for axis in entry.axes}
    assert {"first.weight", "conv.weight", "fc.weight"} <= left
    described = "\n".join(entry.describe() for entry in spec.left_out)
    assert "cumsum" in described and "flattened with its pixels" in described
    check_spec(model, spec, inputs)
    with pytest.raises(TraceError, match="could not be proven permutable") as error:
        trace_spec(model, inputs, strict=True)
    assert "cumsum" in str(error.value)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


def test_untraceable_model_is_one_clear_error(rng):
    with pytest.raises(TraceError, match=r"could not trace DataDependent .*permutation_spec\(\)") as error:
        trace_spec(DataDependent(), torch.randn(2, 3, generator=rng))
    assert "test_tracing.py" in str(error.value) and "if x.sum() > 0:" in str(error.value), str(error.value)
    with pytest.raises(TypeError, match="example_input"):
        trace_spec(DataDependent(), 3)


def test_tracing_leaves_the_model_mode_and_weights_alone(rng):
    model = build("resnet20", dict(width=0.5), (3, 8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_spec(model, torch.randn(2, 3, 8, 8, generator=rng))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_readme_tracing_example_runs(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]
    block = next(block for block in blocks if "trace_spec" in block)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    spec = namespace["spec"]
    assert sorted(group.size for group in spec.groups) == [16, 32] and spec.left_out == ()
    assert "all groups at once" in capsys.readouterr().out


class ReturnsHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(3, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        return self.head(torch.relu(self.second(hidden))), hidden


def test_model_outputs_are_never_permuted(rng):
    # The first layer's units are an output of the model: fixed (at the boundary, so not "left out").
    model, x = ReturnsHidden(), torch.randn(4, 3, generator=rng)
    spec = trace_spec(model, x, strict=True)
    assert [(group.name, group.size) for group in spec.groups] == [("second", 5)] and spec.left_out == ()
    check_spec(model, spec, x)


class TokensFlattened(nn.Module):
    """Per-token features flattened token-major into one Linear: each token's block of the
    consumer's input axis carries the same units."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(5 * 4, 2)

    def forward(self, x):  # x: [batch, 5 tokens, 3]
        return self.head(torch.tanh(self.embed(x)).flatten(1))


def test_tokens_flattened_with_features_tile_the_consumer_axis(rng):
    model, x = TokensFlattened(), torch.randn(3, 5, 3, generator=rng)
    spec = trace_spec(model, x, strict=True)
    (group,) = spec.groups
    assert group.size == 4
    assert {(a.name, a.axis, a.offset) for a in group.axes} == {
        ("embed.weight", 0, 0), ("embed.bias", 0, 0), *(("head.weight", 1, 4 * token) for token in range(5)),
    }
    check_spec(model, spec, x)
