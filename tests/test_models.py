"""Architecture zoo and permutation specs: every spec is exactly function-preserving and complete.

References are independent of ``starfast.spec``: a hand-permuted MLP, a per-parameter
``index_select`` loop for index maps, and plain list composition for the group algebra.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util

import pytest
import torch
from torch import nn

from starfast import models, ops
from starfast.flat import ParamSpace
from starfast.models.options import ACTIVATIONS
from starfast.spec import Axis, Group, PermutationSpec, permute_model

# name -> (build kwargs, per-example input shape, the only parameters that no group permutes)
ARCHS = {
    "mlp": (dict(input_shape=(1, 8, 8), depth=3, width=12, activation="elu"), (1, 8, 8), {"output.bias"}),
    "linear2": (dict(input_shape=(2,), num_classes=1, width=8, activation="elu"), (2,), set()),
    "resnet18": (dict(width=0.0625), (3, 8, 8), {"fc.bias"}),
    "resnet20": (dict(width=0.5, in_channels=2), (2, 12, 10), {"fc.bias"}),
    "wrn": (dict(depth=16, width=2), (3, 8, 8), {"fc.bias"}),
    "vgg11": (dict(width=0.125), (3, 8, 8), {"classifier.bias"}),
    "vgg19": (dict(width=0.0625, in_channels=1), (1, 9, 8), {"classifier.bias"}),
    "densenet40": (dict(growth=3), (3, 8, 8), {"fc.bias"}),
    "vit": (dict(in_channels=1, input_shape=(1, 8, 8), patch=4, dim=16, depth=2, heads=2, mlp_dim=24), (1, 8, 8), {"head.bias"}),
}
ARCH_NAMES = list(ARCHS)
# Options the ablations use (activations, VGG without BatchNorm): every test of the `arch` fixture
# runs on these too. id -> (architecture, build kwargs, input shape, unpermuted parameters)
VARIANTS = {
    "resnet18-elu": ("resnet18", dict(width=0.0625, activation="elu"), (3, 8, 8), {"fc.bias"}),
    "resnet20-silu": ("resnet20", dict(width=0.25, activation="silu"), (3, 8, 9), {"fc.bias"}),
    "wrn-elu": ("wrn", dict(depth=16, activation="elu"), (3, 8, 8), {"fc.bias"}),
    "wrn-silu": ("wrn", dict(depth=16, activation="silu"), (3, 8, 8), {"fc.bias"}),
    "vgg11-silu": ("vgg11", dict(width=0.125, activation="silu"), (3, 8, 8), {"classifier.bias"}),
    "vgg11-nobn": ("vgg11", dict(width=0.125, batchnorm=False), (3, 8, 8), {"classifier.bias"}),
    "vgg19-nobn-elu": ("vgg19", dict(width=0.0625, batchnorm=False, activation="elu"), (3, 8, 8), {"classifier.bias"}),
}
CASES = {**{name: (name, *ARCHS[name]) for name in ARCH_NAMES}, **VARIANTS}
BATCH = 6


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter and give BatchNorm non-trivial running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def arch(request):
    name, kwargs, input_shape, unpermuted = CASES[request.param]
    torch.manual_seed(1234)
    model = _randomized(models.build(name, **kwargs).double(), seed=99)
    spec = models.permutation_spec(model)
    x = torch.randn(BATCH, *input_shape, generator=torch.Generator().manual_seed(7), dtype=torch.double)
    return name, model, spec, x, unpermuted


def _nonidentity_random(spec: PermutationSpec, seed: int):
    """A random permutation in which no group is the identity (so every covered tensor moves)."""
    perm = spec.random(torch.Generator().manual_seed(seed))
    for name, index in perm.items():
        if torch.equal(index, torch.arange(index.numel())):
            perm[name] = index.roll(1)
    return perm


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(x)


def _assert_same_function(expected: torch.Tensor, actual: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _buffers(model: nn.Module):
    return dict(model.named_buffers())


# ---------------------------------------------------------------------------------------------
# Specs preserve the function


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_random_permutation_preserves_outputs(arch, train):
    name, model, spec, x, _ = arch
    perm = _nonidentity_random(spec, seed=11)
    expected = _outputs(copy.deepcopy(model), x, train)

    _assert_same_function(expected, _outputs(permute_model(model, spec, perm), x, train))

    # The flat path: gather the row through the index map, permute the buffers separately.
    space = ParamSpace(model)
    row = ops.permute(space.flatten(model), spec.index_map(space, perm))
    through_row = space.load_(copy.deepcopy(model), row)
    with torch.no_grad():
        for buffer_name, buffer in spec.apply(_buffers(model), perm).items():
            through_row.get_buffer(buffer_name).copy_(buffer)
    _assert_same_function(expected, _outputs(through_row, x, train))


def test_permuted_outputs_differ_from_unaligned_mix(arch):
    # Guards the test above against vacuous passes: the permutation really moves the weights,
    # so averaging a model with its permuted copy changes the function.
    name, model, spec, x, _ = arch
    permuted = permute_model(model, spec, _nonidentity_random(spec, seed=12))
    space = ParamSpace(model)
    mixed = space.load_(copy.deepcopy(model), 0.5 * (space.flatten(model) + space.flatten(permuted)))
    assert not torch.allclose(_outputs(mixed, x, False), _outputs(model, x, False), rtol=1e-3, atol=1e-6)


def test_spec_validates_and_covers_every_hidden_axis(arch):
    name, model, spec, _, unpermuted = arch
    spec.validate(model)
    state = model.state_dict()
    permuted = spec.apply(state, _nonidentity_random(spec, seed=13))
    unchanged = {
        key for key, tensor in state.items() if not key.endswith("num_batches_tracked") and torch.equal(tensor, permuted[key])
    }
    assert unchanged == unpermuted
    assert all(not spec.axes_of(key) for key in unpermuted)
    for key in state:
        if key.endswith("num_batches_tracked"):
            assert permuted[key] is state[key]

    # Every claimed axis is tiled exactly by its groups' ranges (catches offset mistakes).
    for key in spec.tensor_names:
        covered = {}
        for axis, group_name in spec.axes_of(key):
            units = range(axis.offset, axis.offset + spec.group(group_name).size)
            covered.setdefault(axis.axis, []).extend(units)
        for dim, units in covered.items():
            assert sorted(units) == list(range(state[key].shape[dim])), (key, dim)


def test_classes_and_inputs_are_never_permuted(arch):
    name, model, spec, _, _ = arch
    matrices = [key for key, tensor in model.named_parameters() if tensor.dim() >= 2 and "embed" not in key and "token" not in key]
    classifier_weight = matrices[-1]
    first_weight = next(key for key, tensor in model.named_parameters() if tensor.dim() >= 2 and "token" not in key and "pos" not in key)
    assert all(axis.axis != 0 for axis, _ in spec.axes_of(classifier_weight))
    assert all(axis.axis != 1 for axis, _ in spec.axes_of(first_weight))


# ---------------------------------------------------------------------------------------------
# Index maps


def _reference_index_map(space: ParamSpace, spec: PermutationSpec, perm) -> torch.Tensor:
    pieces = []
    for entry in space.entries:
        index = torch.arange(entry.offset, entry.offset + entry.numel).view(entry.shape)
        for axis, group_name in spec.axes_of(entry.name):
            full = torch.arange(entry.shape[axis.axis])
            full[axis.offset : axis.offset + spec.group(group_name).size] = axis.offset + perm[group_name]
            index = index.index_select(axis.axis, full)
        pieces.append(index.reshape(-1))
    return torch.cat(pieces)


def test_index_map_matches_reference_and_apply(arch):
    name, model, spec, _, _ = arch
    space = ParamSpace(model)
    perm = _nonidentity_random(spec, seed=21)
    index = spec.index_map(space, perm)
    assert index.dtype == torch.int64 and index.shape == (space.size,)
    assert torch.equal(index, _reference_index_map(space, spec, perm))
    assert torch.equal(ops.permute(space.flatten(model), index), space.flatten(spec.apply(model.state_dict(), perm)))
    assert torch.equal(spec.index_map(space, spec.identity()), torch.arange(space.size))


def test_batched_index_map_equals_stacked_single_maps(arch):
    name, model, spec, _, _ = arch
    space = ParamSpace(model)
    perms = [_nonidentity_random(spec, seed=30 + k) for k in range(3)]
    batched = {group.name: torch.stack([perm[group.name] for perm in perms]) for group in spec.groups}
    index = spec.index_map(space, batched)
    assert torch.equal(index, torch.stack([spec.index_map(space, perm) for perm in perms]))
    out = torch.full((3, space.size), -1, dtype=torch.int32)
    assert spec.index_map(space, batched, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out.long(), index)
    with pytest.raises(ValueError, match="out must be an int32 or int64 tensor of shape"):
        spec.index_map(space, batched, out=torch.empty(2, space.size, dtype=torch.int32))

    # A batched apply on stacked state dicts agrees with one apply per model.
    state = model.state_dict()
    stacked = {key: torch.stack([tensor] * 3) for key, tensor in state.items()}
    applied = spec.apply(stacked, batched)
    for k, perm in enumerate(perms):
        single = spec.apply(state, perm)
        assert all(torch.equal(applied[key][k], single[key]) for key in state)


# ---------------------------------------------------------------------------------------------
# Group algebra


def test_compose_and_inverse(arch):
    name, model, spec, _, _ = arch
    p, q = spec.random(torch.Generator().manual_seed(41)), spec.random(torch.Generator().manual_seed(42))
    state = model.state_dict()
    composed = spec.compose(p, q)
    for group in spec.groups:
        expected = [q[group.name][p[group.name][k]].item() for k in range(group.size)]
        assert composed[group.name].tolist() == expected
    twice = spec.apply(spec.apply(state, q), p)
    once = spec.apply(state, composed)
    assert all(torch.equal(twice[key], once[key]) for key in state)

    inverse = spec.inverse(p)
    identity = spec.identity()
    for group in spec.groups:
        assert torch.equal(spec.compose(p, inverse)[group.name], identity[group.name])
        assert torch.equal(spec.compose(inverse, p)[group.name], identity[group.name])
        assert torch.equal(spec.inverse(inverse)[group.name], p[group.name])
    restored = spec.apply(spec.apply(state, p), inverse)
    assert all(torch.equal(restored[key], state[key]) for key in state)


def test_batched_compose_and_inverse_match_per_row():
    spec = PermutationSpec([Group("a", 5, (Axis("w", 0),)), Group("b", 3, (Axis("w", 1),))])
    generator = torch.Generator().manual_seed(5)
    singles = [spec.random(generator) for _ in range(4)]
    batched = {name: torch.stack([perm[name] for perm in singles]) for name in ("a", "b")}
    fixed = spec.random(generator)
    composed, inverse = spec.compose(batched, fixed), spec.inverse(batched)
    for k, perm in enumerate(singles):
        for name in ("a", "b"):
            assert torch.equal(composed[name][k], spec.compose(perm, fixed)[name])
            assert torch.equal(inverse[name][k], spec.inverse(perm)[name])


# ---------------------------------------------------------------------------------------------
# Independent references and specific structure


def test_mlp_permutation_matches_hand_permuted_weights():
    model = models.build("mlp", input_shape=(5,), depth=2, width=7, num_classes=3)
    spec = models.permutation_spec(model)
    perm = spec.random(torch.Generator().manual_seed(3))
    p0, p1 = perm["hidden.0"], perm["hidden.1"]
    state = model.state_dict()
    expected = {
        "hidden.0.weight": state["hidden.0.weight"][p0],
        "hidden.0.bias": state["hidden.0.bias"][p0],
        "hidden.1.weight": state["hidden.1.weight"][p1][:, p0],
        "hidden.1.bias": state["hidden.1.bias"][p1],
        "output.weight": state["output.weight"][:, p1],
        "output.bias": state["output.bias"],
    }
    permuted = spec.apply(state, perm)
    assert permuted.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(permuted[key], tensor), key


def test_densenet_groups_follow_the_concatenation():
    model = models.build("densenet40", growth=2)
    spec = models.permutation_spec(model)
    # Stem, 36 layers, 2 transitions; later layers see every earlier segment at its offset.
    assert len(spec.groups) == 1 + 36 + 2
    assert model.fc.in_features == 4 + 3 * 12 * 2 + 0  # stem 2k, each block adds 12k (no compression)
    layer_axes = {group: axis.offset for axis, group in spec.axes_of("block2.5.conv.weight") if axis.axis == 1}
    assert layer_axes == {"trans1.conv": 0, **{f"block2.{i}.conv": 28 + 2 * i for i in range(5)}}
    assert len(spec.group("block1.0.conv").axes) > len(spec.group("block1.11.conv").axes)


def test_resnet_streams_are_shared_across_blocks():
    model = models.build("resnet18", width=0.0625)
    spec = models.permutation_spec(model)
    names = [group.name for group in spec.groups]
    assert sorted(name for name in names if name.startswith("residual")) == ["residual0", "residual1", "residual2", "residual3"]
    stream0 = {axis.name for axis in spec.group("residual0").axes}
    assert {"conv1.weight", "bn1.running_var", "layer1.0.bn2.weight", "layer1.1.conv1.weight", "layer2.0.downsample.0.weight"} <= stream0
    stream1 = {axis.name for axis in spec.group("residual1").axes}
    assert {"layer2.0.downsample.1.running_mean", "layer2.1.bn2.bias", "layer3.0.conv1.weight"} <= stream1


# ---------------------------------------------------------------------------------------------
# Building


def test_names_lists_every_architecture():
    assert set(models.names()) == set(ARCH_NAMES) | {"resnet18-imagenet"}


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "densenet40", "wrn"])
@pytest.mark.parametrize("size", [(8, 8), (16, 11)])
def test_conv_nets_take_small_and_odd_inputs(name, size):
    kwargs = {"resnet20": dict(width=0.25), "vgg11": dict(width=0.0625), "densenet40": dict(growth=1), "wrn": dict(depth=16)}[name]
    model = models.build(name, num_classes=4, in_channels=2, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, *size)).shape == (2, 4)


# Recorded from the builders of commit d43a8b8 (before the activation and batchnorm options), in
# float64 from torch.manual_seed(0): the number of state-dict entries, the first 16 hex digits of
# the sha256 of their names, and sum(y * (1, 2, 3, ...)) of the train- and eval-mode outputs on a
# fixed input. The default options must still build exactly those networks.
BEFORE_THE_OPTIONS = {
    "resnet20": (dict(width=0.25), 128, "8b63b6f92921e186", -151.28101089099366, -34.68152055490445),
    "resnet18": (dict(width=0.0625), 122, "779447cf0a59dec8", 158.46870966018963, -8.977065897941273),
    "wrn": (dict(depth=16, width=1), 82, "327e171650fc2adc", -77.18829991077284, -8.057233801661011),
    "vgg11": (dict(width=0.125), 58, "45f01fa07017d9dd", -56.293444523425045, -11.208058276263843),
    "vgg19": (dict(width=0.0625), 114, "d4113d8763b40fa1", 37.809362528064156, 0.2786955190535847),
}


@pytest.mark.parametrize("name", list(BEFORE_THE_OPTIONS))
def test_default_options_build_the_networks_of_before(name):
    kwargs, entries, names_digest, train_sum, eval_sum = BEFORE_THE_OPTIONS[name]
    torch.manual_seed(0)
    model = models.build(name, **kwargs).double()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    keys = list(model.state_dict())
    assert len(keys) == entries and hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == names_digest
    with torch.no_grad():
        outputs = {"train": model.train()(x), "eval": model.eval()(x)}
    for mode, recorded in (("train", train_sum), ("eval", eval_sum)):
        weights = torch.arange(1, outputs[mode].numel() + 1, dtype=torch.double).view_as(outputs[mode])
        measured = float((outputs[mode] * weights).sum())
        # float64 convolutions may sum in another order on another CPU: ~1e-16 relative per term
        assert measured == pytest.approx(recorded, rel=1e-9, abs=1e-9), (mode, measured - recorded)


@pytest.mark.parametrize("name, kwargs", [("resnet20", dict(width=0.25)), ("wrn", dict(depth=16)), ("vgg11", dict(width=0.125))])
@pytest.mark.parametrize("activation, function", [("elu", torch.nn.functional.elu), ("silu", torch.nn.functional.silu)])
def test_activation_option_swaps_only_the_activation(name, kwargs, activation, function):
    torch.manual_seed(5)
    relu = models.build(name, **kwargs).double().eval()
    torch.manual_seed(5)
    other = models.build(name, activation=activation, **kwargs).double().eval()
    state = relu.state_dict()
    assert list(other.state_dict()) == list(state) and all(torch.equal(t, state[k]) for k, t in other.state_dict().items())
    used = {type(module) for module in other.modules() if not list(module.children())} - {nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.MaxPool2d, nn.AdaptiveAvgPool2d}
    assert used == {type(ACTIVATIONS[activation]())}
    # Reference: the ReLU network with torch.relu patched to the other function computes the same.
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.double)
    for module in relu.modules():
        if isinstance(module, nn.ReLU):
            module.forward = function
    with torch.no_grad():
        torch.testing.assert_close(other(x), relu(x), rtol=0, atol=0)


def test_vgg_without_batchnorm_is_conv_activation_and_its_groups_have_no_norm_axes():
    model = models.build("vgg11", width=0.125, batchnorm=False)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    kinds = [type(layer).__name__ for layer in model.features]
    assert kinds[:5] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU"]
    spec = models.permutation_spec(model)
    convs = [i for i, layer in enumerate(model.features) if isinstance(layer, nn.Conv2d)]
    assert [group.name for group in spec.groups] == [f"features.{i}" for i in convs]
    consumers = [f"features.{i}.weight" for i in convs[1:]] + ["classifier.weight"]
    for i, consumer, group in zip(convs, consumers, spec.groups):
        assert {(axis.name, axis.axis) for axis in group.axes} == {(f"features.{i}.weight", 0), (f"features.{i}.bias", 0), (consumer, 1)}


def test_linear2_is_a_bias_free_two_layer_net():
    model = models.build("linear2", input_shape=(2,), num_classes=1, width=4)
    assert [tuple(p.shape) for p in model.parameters()] == [(4, 2), (1, 4)]
    x = torch.randn(5, 2)
    assert torch.allclose(model(x), x @ model.hidden[0].weight.T @ model.output.weight.T)


def test_resnet18_imagenet_spec_when_torchvision_is_available():
    pytest.importorskip("torchvision")  # optional dependency; it does not import with CPU-only torch here
    model = _randomized(models.build("resnet18-imagenet", num_classes=5).double(), seed=3)
    spec = models.permutation_spec(model)
    spec.validate(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.double)
    permuted = permute_model(model, spec, _nonidentity_random(spec, seed=4))
    for train in (True, False):
        _assert_same_function(_outputs(copy.deepcopy(model), x, train), _outputs(permuted, x, train))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_resnet18_imagenet_without_torchvision_says_so():
    with pytest.raises(ImportError, match="torchvision"):
        models.build("resnet18-imagenet")


# ---------------------------------------------------------------------------------------------
# Clear errors


def test_build_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown architecture 'resnet99'.*resnet18"):
        models.build("resnet99")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['depth'\].*width="):
        models.build("resnet18", depth=3)
    with pytest.raises(ValueError, match="input_shape"):
        models.build("mlp")
    with pytest.raises(ValueError, match="input_shape"):
        models.build("vit")
    with pytest.raises(ValueError, match="pass in_channels=1"):
        models.build("vgg11", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="at least 8x8"):
        models.build("resnet20", input_shape=(3, 4, 4))
    with pytest.raises(ValueError, match="depth=17"):
        models.build("wrn", depth=17)
    with pytest.raises(ValueError, match="activation='tanh'"):
        models.build("mlp", input_shape=(4,), activation="tanh")
    with pytest.raises(ValueError, match="patch=3"):
        models.build("vit", in_channels=1, input_shape=(1, 8, 8), patch=3)
    with pytest.raises(ValueError, match="width=0"):
        models.build("vgg19", width=0)
    for name in ("resnet20", "wrn", "vgg11"):
        with pytest.raises(ValueError, match=f"{name}: activation='tanh' is not supported; choose one of relu, elu, silu"):
            models.build(name, activation="tanh")
    with pytest.raises(ValueError, match="vgg19: batchnorm='no' must be true or false"):
        models.build("vgg19", batchnorm="no")
    with pytest.raises(ValueError, match="bias='false' must be true or false"):
        models.build("mlp", input_shape=(4,), bias="false")


def test_bad_permutations_are_rejected():
    model = models.build("mlp", input_shape=(4,), depth=2, width=5)
    spec = models.permutation_spec(model)
    good = spec.identity()
    with pytest.raises(ValueError, match=r"shape \[4\].*\[5\]"):
        spec.apply(model.state_dict(), {**good, "hidden.0": torch.arange(4)})
    with pytest.raises(ValueError, match="not a permutation"):
        spec.index_map(ParamSpace(model), {**good, "hidden.1": torch.tensor([0, 0, 1, 2, 3])})
    with pytest.raises(ValueError, match="missing groups \\['hidden.1'\\]"):
        permute_model(model, spec, {"hidden.0": good["hidden.0"]})
    with pytest.raises(ValueError, match="unknown groups \\['extra'\\]"):
        spec.compose(good, {**good, "extra": torch.arange(2)})
    with pytest.raises(TypeError, match="int64"):
        spec.inverse({**good, "hidden.0": good["hidden.0"].float()})
    with pytest.raises(ValueError, match="mixes batched and unbatched"):
        spec.index_map(ParamSpace(model), {**good, "hidden.0": torch.arange(5).repeat(2, 1)})
    with pytest.raises(ValueError, match="batched"):
        permute_model(model, spec, {name: index.repeat(2, 1) for name, index in good.items()})


def test_validate_rejects_a_mismatched_model():
    spec = models.permutation_spec(models.build("resnet20", width=0.5))
    spec.validate(models.build("resnet20", width=0.5).state_dict())
    with pytest.raises(ValueError, match="has shape"):
        spec.validate(models.build("resnet20", width=0.25))
    with pytest.raises(ValueError, match="no parameter or buffer"):
        spec.validate(models.build("vgg11", width=0.125))
    with pytest.raises(ValueError, match="has shape"):
        spec.index_map(ParamSpace(models.build("resnet20", width=0.25)), spec.identity())
    with pytest.raises(TypeError, match="no permutation spec"):
        models.permutation_spec(nn.Linear(2, 2))


def test_spec_construction_errors():
    with pytest.raises(ValueError, match="used twice"):
        PermutationSpec([Group("a", 2, (Axis("w", 0),)), Group("a", 2, (Axis("w", 1),))])
    with pytest.raises(ValueError, match=r"claimed twice.*\[2, 5\).*\[0, 3\)"):
        PermutationSpec([Group("a", 3, (Axis("w", 0),)), Group("b", 3, (Axis("w", 0, offset=2),))])
    with pytest.raises(ValueError, match="acts on no axis"):
        PermutationSpec([Group("a", 3, ())])
    with pytest.raises(KeyError, match="no group named 'zz'"):
        PermutationSpec([Group("a", 3, (Axis("w", 0),))]).group("zz")
    # Disjoint ranges of one axis are fine (concatenations).
    PermutationSpec([Group("a", 2, (Axis("w", 0),)), Group("b", 3, (Axis("w", 0, offset=2),))])


@pytest.mark.parametrize("name, kwargs", [("mlp", dict(depth=3, width=7, activation="elu")), ("linear2", dict(width=5)),
                                          ("mlp", dict(depth=1, width=4, bias=False))])
def test_mlp_stacked_forward_equals_each_model(name, kwargs, rng):
    shape = (1, 4, 4)
    nets = [models.build(name, 3, 1, shape, **kwargs).double() for _ in range(4)]
    for net in nets:
        for parameter in net.parameters():
            parameter.data.normal_(generator=rng)
    stacked = {key: torch.stack([dict(net.named_parameters())[key] for net in nets]) for key, _ in nets[0].named_parameters()}
    per_model = torch.randn(4, 6, *shape, generator=rng, dtype=torch.float64)
    want = torch.stack([net(x) for net, x in zip(nets, per_model)])
    torch.testing.assert_close(nets[0].stacked_forward(stacked, per_model), want)
    shared = per_model[0]
    torch.testing.assert_close(nets[0].stacked_forward(stacked, shared, shared=True), torch.stack([net(shared) for net in nets]))


def test_groups_carry_validated_sites():
    from starfast.spec import Site

    site = Site("hidden.1", "input", 1)
    spec = PermutationSpec([Group("a", 3, (Axis("w", 0),), (site,)), Group("b", 2, (Axis("v", 0),))])
    assert spec.group("a").sites == (site,) and spec.group("b").sites == ()
    assert not spec.has_sites
    assert PermutationSpec([Group("a", 3, (Axis("w", 0),), (site,))]).has_sites
    for bad in (Site("m", "inside", 1), Site("m", "output", 1, offset=-1), ("m", "output", 1)):
        with pytest.raises(ValueError, match="site"):
            PermutationSpec([Group("a", 3, (Axis("w", 0),), (bad,))])
