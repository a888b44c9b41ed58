"""ParamSpace: flat rows round-trip through modules and state dicts, views alias the row and
work with functional_call (also for [K, P] banks), gradients reach the row, and mismatched
architectures are reported by the first differing parameter."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from starfast.flat import ParamSpace


def net(width=5, classes=3):
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, classes))


def test_layout_and_round_trip(rng):
    model = net()
    space = ParamSpace(model)
    assert space.names == [name for name, _ in model.named_parameters()]
    assert space.size == sum(p.numel() for p in model.parameters())
    row = space.flatten(model)
    # The row is the parameters concatenated in named_parameters() order, by an independent cat.
    assert torch.equal(row, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    other = net()
    new_row = torch.randn(space.size, generator=rng)
    space.load_(other, new_row)
    assert torch.equal(space.flatten(other), new_row)
    # A state dict (with buffers) flattens to the same row.
    assert torch.equal(space.flatten(other.state_dict()), new_row)


def test_views_alias_the_row_and_run_the_model(rng):
    model = net().eval()
    space = ParamSpace(model)
    row = torch.randn(space.size, generator=rng)
    views = space.views(row)
    views["0.weight"][0, 0] = 123.0
    assert row[space.entry("0.weight").offset] == 123.0
    x = torch.randn(6, 4, generator=rng)
    reference = space.load_(net().eval(), row)
    torch.testing.assert_close(functional_call(model, views, (x,)), reference(x))


def test_a_scalar_parameter_has_scalar_views(rng):
    model = net()
    model.temperature = nn.Parameter(torch.tensor(1.5))
    space = ParamSpace(model)
    row = torch.randn(space.size, generator=rng)
    assert space.views(row)["temperature"].shape == ()
    assert space.views(row)["temperature"] == row[space.entry("temperature").offset]
    assert space.views(torch.stack([row, 2 * row]))["temperature"].shape == (2,)
    space.load_(model, row)
    assert torch.equal(space.flatten(model), row)


def test_bank_views_run_each_model(rng):
    model = net().eval()
    space = ParamSpace(model)
    bank = torch.randn(3, space.size, generator=rng)
    views = space.views(bank)
    assert views["3.weight"].shape == (3, 3, 5)
    x = torch.randn(6, 4, generator=rng)
    batched = torch.vmap(lambda params: functional_call(model, params, (x,)))(views)
    for k in range(3):
        torch.testing.assert_close(batched[k], space.load_(net().eval(), bank[k])(x))


def test_gradient_reaches_the_row(rng):
    model = net().eval()
    space = ParamSpace(model)
    row = torch.randn(space.size, generator=rng, requires_grad=True)
    x = torch.randn(6, 4, generator=rng)
    functional_call(model, space.views(row), (x,)).sum().backward()
    loaded = space.load_(net().eval(), row.detach())
    loaded(x).sum().backward()
    torch.testing.assert_close(row.grad, torch.cat([p.grad.reshape(-1) for p in loaded.parameters()]))


def test_stack_and_unflatten(rng):
    models = [net() for _ in range(3)]
    space = ParamSpace(models[0])
    bank = space.stack(models)
    assert bank.shape == (3, space.size)
    copies = space.unflatten(bank[1])
    bank.zero_()
    assert torch.equal(copies["0.bias"], models[1][0].bias.detach())


def test_mismatched_architectures_name_the_first_difference():
    space = ParamSpace(net(width=5))
    with pytest.raises(ValueError, match=r"expected parameter '0.weight' of shape \[5, 4\], found '0.weight' of shape \[6, 4\]"):
        space.flatten(net(width=6))
    with pytest.raises(ValueError, match=r"'3.bias' is missing"):
        space.flatten({k: v for k, v in net().state_dict().items() if k != "3.bias"})
    with pytest.raises(ValueError, match=r"it has 2 parameters instead of 6"):
        space.flatten(nn.Sequential(nn.Linear(4, 5)))
    with pytest.raises(ValueError, match="row has length 7"):
        space.views(torch.zeros(7))
    with pytest.raises(ValueError, match="share one dtype"):
        ParamSpace({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(KeyError, match="no parameter named 'nope'"):
        space.entry("nope")
