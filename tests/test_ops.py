"""The compiled ops (permute, permute_out, lerp_gather) against their pure-PyTorch references:
values on fresh random inputs, opcheck, gradcheck in float64, the reference fallback path, and
the CUDA kernels when a GPU is present."""
import pytest
import torch

from starfast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_extension = pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="compiled extension not built")


def block_index(length: int, rng: torch.Generator) -> torch.Tensor:
    """A realistic index map: contiguous blocks (rows of weight matrices) moved as a whole."""
    block = 7
    blocks = torch.randperm(length // block, generator=rng)
    index = (blocks.unsqueeze(1) * block + torch.arange(block)).reshape(-1)
    return torch.cat([index, torch.arange(index.numel(), length)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_permute_matches_reference(device, dtype, index_dtype, rng):
    length = 1000 + int(torch.randint(0, 500, (1,), generator=rng))
    rows = torch.randn(4, length, generator=rng).to(device, dtype)
    shared = torch.randperm(length, generator=rng).to(device, index_dtype)
    per_row = torch.stack([block_index(length, rng) for _ in range(4)]).to(device, index_dtype)
    assert torch.equal(ops.permute(rows[0], shared), ops.permute_reference(rows[0], shared))
    assert torch.equal(ops.permute(rows, shared), ops.permute_reference(rows, shared))
    assert torch.equal(ops.permute(rows, per_row), ops.permute_reference(rows, per_row))
    out = torch.empty_like(rows)
    result = ops.permute(rows, per_row, out=out)
    assert result is out and torch.equal(out, ops.permute_reference(rows, per_row))


@pytest.mark.parametrize("device", DEVICES)
def test_permute_into_a_bank_row(device, rng):
    bank = torch.randn(3, 200, generator=rng, device="cpu").to(device)
    index = torch.randperm(200, generator=rng).to(device)
    source = torch.randn(200, generator=rng).to(device)
    ops.permute(source, index, out=bank[1])
    assert torch.equal(bank[1], source[index])


def test_permute_errors(rng):
    rows = torch.randn(2, 10, generator=rng)
    with pytest.raises(ValueError, match="length"):
        ops.permute(rows, torch.arange(9))
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.permute(rows, torch.arange(10.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_index", [True, False])
def test_lerp_gather_matches_reference(device, dtype, with_index, rng):
    length = 3000 + int(torch.randint(0, 500, (1,), generator=rng))
    theta = torch.randn(length, generator=rng).to(device, dtype)
    bank = torch.randn(5, length, generator=rng).to(device, dtype)
    index = block_index(length, rng).to(device) if with_index else None
    for t in (0.0, 0.3, float(torch.rand(1, generator=rng)), 0.5, 0.8, 1.0):
        got = ops.lerp_gather(theta, bank, 3, index, t)
        want = ops.lerp_gather_reference(theta, bank, 3, index, t)
        torch.testing.assert_close(got, want)  # torch.lerp may fuse differently: rounding-level


@pytest.mark.parametrize("device", DEVICES)
def test_lerp_gather_gradient(device, rng):
    theta = torch.randn(50, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    bank = torch.randn(3, 50, generator=rng, dtype=torch.float64).to(device)
    index = torch.randperm(50, generator=rng).to(device)
    assert torch.autograd.gradcheck(lambda th: ops.lerp_gather(th, bank, 2, index, 0.37), (theta,))
    # d theta = (1 - t) * d out; the bank gets no gradient even when it asks for one.
    bank.requires_grad_()
    out = ops.lerp_gather(theta, bank, 1, index, 0.25)
    weights = torch.randn(50, generator=rng, dtype=torch.float64).to(device)
    (out * weights).sum().backward()
    torch.testing.assert_close(theta.grad, 0.75 * weights)
    assert bank.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_lerp_gather_vmap_over_several_draws(device, rng):
    theta = torch.randn(300, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    bank = torch.randn(4, 300, generator=rng, dtype=torch.float64).to(device)
    index_maps = torch.stack([torch.randperm(300, generator=rng) for _ in range(4)]).to(device)
    ns = torch.tensor([3, 0, 3, 1])
    ts = torch.rand(4, generator=rng, dtype=torch.float64)
    rows = torch.vmap(lambda n, index, t: ops.lerp_gather(theta, bank, n, index, t))(ns, index_maps[ns.to(device)], ts)
    want = torch.stack([torch.lerp(theta, bank[n][index_maps[n]], float(t)) for n, t in zip(ns.tolist(), ts)])
    torch.testing.assert_close(rows, want)
    weights = torch.randn(4, 300, generator=rng, dtype=torch.float64).to(device)
    (gradient,) = torch.autograd.grad((rows * weights).sum(), theta)
    torch.testing.assert_close(gradient, ((1 - ts.to(device))[:, None] * weights).sum(0))
    # Batching θ instead (several points against one draw) works too.
    thetas = torch.randn(3, 300, generator=rng, dtype=torch.float64).to(device)
    batched = torch.vmap(lambda th: ops.lerp_gather(th, bank, 2, index_maps[2], 0.25))(thetas)
    torch.testing.assert_close(batched, torch.lerp(thetas, bank[2][index_maps[2]], 0.25))


@needs_extension
def test_opcheck(rng):
    rows = torch.randn(3, 64, generator=rng)
    index = torch.randperm(64, generator=rng)
    torch.library.opcheck(torch.ops.starfast.permute, (rows, index))
    torch.library.opcheck(torch.ops.starfast.permute_out, (rows, index, torch.empty_like(rows)))
    theta = torch.randn(64, generator=rng, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(2, 64, generator=rng, dtype=torch.float64)
    n, t = torch.tensor(1), torch.tensor(0.4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.starfast.lerp_gather, (theta, bank, n, index, t))
    torch.library.opcheck(torch.ops.starfast.lerp_gather, (theta, bank, torch.tensor(0), None, torch.tensor(0.9)))


def test_reference_fallback_when_extension_is_absent(monkeypatch, rng):
    monkeypatch.setattr(ops, "HAVE_EXTENSION", False)
    theta = torch.randn(40, generator=rng, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(2, 40, generator=rng, dtype=torch.float64)
    index = torch.randperm(40, generator=rng)
    out = ops.lerp_gather(theta, bank, 1, index, 0.6)
    torch.testing.assert_close(out, torch.lerp(theta, bank[1][index], 0.6))
    out.sum().backward()
    torch.testing.assert_close(theta.grad, torch.full_like(theta, 0.4))
    assert torch.equal(ops.permute(bank, index), bank[:, index])


@needs_extension
def test_lerp_gather_errors(rng):
    theta = torch.randn(10, generator=rng)
    with pytest.raises(RuntimeError, match="outside the bank"):
        ops.lerp_gather(theta, torch.randn(2, 10), 2, None, 0.5)
    with pytest.raises(RuntimeError, match="bank must be"):
        ops.lerp_gather(theta, torch.randn(2, 11), 0, None, 0.5)
