"""The compiled ops (permute, permute_out, lerp_gather) against their pure-PyTorch references:
values on fresh random inputs (lerp_gather bit for bit against torch.lerp), opcheck with inputs
that require grad, gradcheck in float64, the parallel loops, the reference fallback path, the
CUDA kernels when a GPU is present, index values and devices that must be refused on every path,
and the loader's explanation of a missing (or disabled) extension.

``needs_extension`` tests (conftest.py) test the compiled kernels themselves: the fallback run
(``STARFAST_NO_EXTENSION=1``) skips them, saying so; everything else runs in both."""
from pathlib import Path

import pytest
import torch

from starfast import extension, ops
from starfast.testing.op_inputs import block_index, mismatches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_extension = pytest.mark.needs_extension
# The two paths of the public ops: the compiled kernels, and the references with their checks.
PATHS = [pytest.param("compiled", marks=needs_extension), "reference"]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS + [torch.int64], ids=dtype_id)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=dtype_id)
def test_permute_matches_reference(device, dtype, index_dtype, rng):
    length = 1000 + int(torch.randint(0, 500, (1,), generator=rng))
    rows = (100 * torch.randn(4, length, generator=rng)).to(device, dtype)
    shared = torch.randperm(length, generator=rng).to(device, index_dtype)
    per_row = torch.stack([block_index(length, rng) for _ in range(4)]).to(device, index_dtype)
    assert torch.equal(ops.permute(rows[0], shared), ops.permute_reference(rows[0], shared))
    assert torch.equal(ops.permute(rows, shared), ops.permute_reference(rows, shared))
    assert torch.equal(ops.permute(rows, per_row), ops.permute_reference(rows, per_row))
    assert torch.equal(ops.permute(rows.view(2, 2, length), shared), ops.permute_reference(rows, shared).view(2, 2, length))
    assert torch.equal(ops.permute(rows.t().contiguous().t(), per_row), ops.permute_reference(rows, per_row))
    out = torch.empty_like(rows)
    result = ops.permute(rows, per_row, out=out)
    assert result is out and torch.equal(out, ops.permute_reference(rows, per_row))


@pytest.mark.parametrize("device", DEVICES)
def test_permute_into_a_bank_row(device, rng):
    bank = torch.randn(3, 200, generator=rng).to(device)
    index = torch.randperm(200, generator=rng).to(device)
    source = torch.randn(200, generator=rng).to(device)
    ops.permute(source, index, out=bank[1])
    assert torch.equal(bank[1], source[index])
    ops.permute(bank[0], index, out=bank[2])  # another row of the same bank: no overlap
    assert torch.equal(bank[2], bank[0][index])


def test_permute_errors(rng):
    rows = torch.randn(2, 10, generator=rng)
    with pytest.raises(ValueError, match="length"):
        ops.permute(rows, torch.arange(9))
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.permute(rows, torch.arange(10.0))
    with pytest.raises(ValueError, match="must not overlap"):
        ops.permute(rows, torch.arange(10), out=rows)
    with pytest.raises(ValueError, match=r"index must be \[P\] or \[2, P\]"):
        ops.permute(rows, torch.arange(10).repeat(3, 1))
    with pytest.raises(TypeError, match="not supported"):
        ops.permute(rows.bool(), torch.arange(10))
    with pytest.raises(ValueError, match=r"index has shape \[\]"):
        ops.permute(rows, torch.tensor(3))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("with_index", [True, False])
def test_lerp_gather_is_torch_lerp_bit_for_bit(device, dtype, with_index, rng):
    # Lengths below and around the vector width exercise torch's loop tails as well as its body.
    for length in (1, 5, 16, 33, 70, 3000 + int(torch.randint(0, 500, (1,), generator=rng))):
        theta = torch.randn(length, generator=rng).to(device, dtype)
        bank = torch.randn(5, length, generator=rng).to(device, dtype)
        index = block_index(length, rng).to(device) if with_index else None
        for t in (0.0, 0.3, float(torch.rand(1, generator=rng)), 0.5, 0.8, 1.0, -0.7, 1.6):
            got = ops.lerp_gather(theta, bank, 3, index, t)
            want = ops.lerp_gather_reference(theta, bank, 3, index, t)
            assert torch.equal(got, want), f"length {length}, t = {t}: {mismatches(got, want)}"


@needs_extension
def test_lerp_gather_float16_over_every_half(rng):
    """Every finite float16 as θ (all conversions to float) against random sources: the results
    cover rounding back to float16 from normal, subnormal and overflowing values."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    theta = bits.view(torch.float16)
    theta = theta[torch.isfinite(theta)]
    bank = (torch.randn(2, theta.numel(), generator=rng) * torch.logspace(-9, 5, theta.numel())).half()
    bank[1, :50] = torch.tensor(65504.0).half()  # with |w| large these overflow to inf
    for t in (0.25, 0.75, 3.0):
        for n in (0, 1):
            got = ops.lerp_gather(theta, bank, n, None, t)
            want = torch.lerp(theta, bank[n], t)
            same = (got == want) | (torch.isnan(got) & torch.isnan(want))
            assert bool(same.all()), f"t = {t}, n = {n}: {mismatches(got[~same], want[~same])}"


@needs_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_parallel_loops_match(dtype, rng):
    """Rows long enough that two threads split them (the kernels' grain is 2^15 elements)."""
    length = 200_003
    rows = torch.randn(3, length, generator=rng).to(dtype)
    index = torch.stack([torch.randperm(length, generator=rng) for _ in range(3)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        permuted = ops.permute(rows, index)
        mixed = ops.lerp_gather(rows[0], rows, 2, index[1], 0.35)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(permuted, ops.permute_reference(rows, index))
    assert torch.equal(mixed, torch.lerp(rows[0], rows[2][index[1]], 0.35))


@pytest.mark.parametrize("device", DEVICES)
def test_lerp_gather_gradient(device, rng):
    theta = torch.randn(50, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    bank = torch.randn(3, 50, generator=rng, dtype=torch.float64).to(device)
    index = torch.randperm(50, generator=rng).to(device)
    assert torch.autograd.gradcheck(lambda th: ops.lerp_gather(th, bank, 2, index, 0.37), (theta,))
    assert torch.autograd.gradcheck(lambda th: ops.lerp_gather(th, bank, 0, None, 0.81), (theta,))
    # d theta = (1 - t) * d out; the bank gets no gradient even when it asks for one.
    bank.requires_grad_()
    out = ops.lerp_gather(theta, bank, 1, index, 0.25)
    weights = torch.randn(50, generator=rng, dtype=torch.float64).to(device)
    (out * weights).sum().backward()
    torch.testing.assert_close(theta.grad, 0.75 * weights)
    assert bank.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_permute_gradient(device, rng):
    rows = torch.randn(3, 40, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    shared = torch.randperm(40, generator=rng).to(device)
    per_row = torch.stack([torch.randperm(40, generator=rng) for _ in range(3)]).to(device)
    # Not a permutation: positions read twice or never; the adjoint must still be exact.
    repeated = torch.randint(0, 40, (40,), generator=rng).to(device)
    for index in (shared, per_row, repeated, repeated.int()):
        assert torch.autograd.gradcheck(lambda r: ops.permute(r, index), (rows,))
    assert torch.autograd.gradcheck(lambda r: ops.permute(r[1], repeated), (rows,))


@needs_extension
def test_opcheck(rng):
    rows = torch.randn(3, 64, generator=rng, dtype=torch.float64, requires_grad=True)
    index = torch.randperm(64, generator=rng)
    torch.library.opcheck(torch.ops.starfast.permute, (rows, index))
    torch.library.opcheck(torch.ops.starfast.permute, (rows, torch.randint(0, 64, (3, 64), generator=rng)))
    torch.library.opcheck(torch.ops.starfast.permute, (rows.detach().float(), index.int()))
    # The out= form is not differentiable (as torch's own out= variants are not).
    torch.library.opcheck(torch.ops.starfast.permute_out, (rows.detach(), index, torch.empty_like(rows.detach())))
    theta = torch.randn(64, generator=rng, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(2, 64, generator=rng, dtype=torch.float64)
    torch.library.opcheck(torch.ops.starfast.lerp_gather, (theta, bank, 1, index, 0.4))
    torch.library.opcheck(torch.ops.starfast.lerp_gather, (theta, bank, 0, None, 0.9))
    torch.library.opcheck(torch.ops.starfast.lerp_gather, (theta.detach().float(), bank.float(), 1, index.int(), 0.6))


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
    with pytest.raises(ValueError, match="length"):
        ops.permute(bank, index[:-1])


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Runs a test through the compiled kernels, or through the references as when the extension
    is absent."""
    if request.param == "reference":
        monkeypatch.setattr(ops, "HAVE_EXTENSION", False)
    return request.param


def bad_values(length: int, dtype: torch.dtype) -> list:
    """Index values outside [0, length) of every kind: just past the end (the next row's first
    element, read silently before), far past it, negative, and the type's extremes."""
    info = torch.iinfo(dtype)
    return [length, length + 5, -1, -length, info.min, info.max] + ([2**40] if dtype == torch.int64 else [])


def with_bad(index: torch.Tensor, positions, value: int) -> torch.Tensor:
    spoiled = index.clone()
    spoiled.view(-1)[positions] = value
    return spoiled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=dtype_id)
def test_out_of_range_index_values_raise_on_every_op(path, device, index_dtype, rng):
    """Every kind of out-of-range value, on every op and index form, on both paths: an IndexError
    naming the op and the first bad value (before the fix the kernels read whatever lay there)."""
    length = 50
    rows = torch.randn(3, length, generator=rng).to(device)
    theta, bank = rows[0], rows[1:]
    shared = torch.randperm(length, generator=rng).to(device, index_dtype)
    per_row = torch.stack([torch.randperm(length, generator=rng) for _ in range(3)]).to(device, index_dtype)
    for value in bad_values(length, index_dtype):
        first, second = sorted(torch.randperm(length, generator=rng)[:2].tolist())
        spoiled = with_bad(shared, [second, first], value)
        where = rf"index\[{first}\] = {value} is out of range for rows of length {length}"
        calls = {
            "permute one row": lambda: ops.permute(theta, spoiled),
            "permute shared": lambda: ops.permute(rows, spoiled),
            "permute out": lambda: ops.permute(rows, spoiled, out=torch.empty_like(rows)),
            "lerp_gather": lambda: ops.lerp_gather(theta, bank, 1, spoiled, 0.3),
        }
        for name, call in calls.items():
            with pytest.raises(IndexError, match=("lerp_gather: " if name == "lerp_gather" else "permute: ") + where):
                call()
        row = int(torch.randint(0, 3, (1,), generator=rng))
        spoiled_rows = with_bad(per_row, [row * length + second, row * length + first], value)
        with pytest.raises(IndexError, match=rf"permute: index\[{row}, {first}\] = {value} is out of range"):
            ops.permute(rows, spoiled_rows)
        if device == "cpu":  # on the CPU (and the reference path) reporting costs nothing: never waived
            with ops.trusted_index_maps(), pytest.raises(IndexError, match="lerp_gather: " + where):
                ops.lerp_gather(theta, bank, 0, spoiled, 0.5)


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trusted_cuda_kernels_read_nothing_outside(rng):
    """Inside trusted_index_maps the CUDA kernels skip the report (no synchronisation) but still
    read each out-of-range element's own position, as index.hpp says."""
    rows = torch.randn(2, 1000, generator=rng).cuda()
    index = torch.randperm(1000, generator=rng).cuda()
    spoiled = with_bad(index, [3, 500], -7)
    read = with_bad(index, [3, 500], 0)
    read[[3, 500]] = torch.tensor([3, 500], device=read.device)
    with ops.trusted_index_maps():
        out = ops.permute(rows, spoiled)
        mixed = ops.lerp_gather(rows[0], rows, 1, spoiled, 0.5)
    assert torch.equal(out, rows[:, read])
    assert torch.equal(mixed, torch.lerp(rows[0], rows[1][read], 0.5))


@needs_extension
def test_out_of_range_values_read_nothing_outside(rng):
    """What the kernels do with an out-of-range value (index.hpp, shared with the CUDA kernels):
    that element reads its own position, so the out= rows hold in-bounds data only; the lowest bad
    position is reported even when two threads' chunks both hold one."""
    length = 200_003  # two chunks of the parallel loop
    rows = torch.randn(2, length, generator=rng)
    index = torch.randperm(length, generator=rng)
    positions = [length - 3, 150_000, 7, 90_000]
    spoiled = with_bad(index, positions, length)
    out = torch.empty_like(rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(IndexError, match=rf"index\[7\] = {length} "):
            ops.permute(rows, spoiled, out=out)
        with pytest.raises(IndexError, match=rf"index\[7\] = {length} "):
            ops.lerp_gather(rows[0], rows, 1, spoiled.int(), 0.25)
    finally:
        torch.set_num_threads(threads)
    read = index.clone()
    read[positions] = torch.tensor(positions)
    assert torch.equal(out, rows[:, read]), mismatches(out, rows[:, read])


@pytest.mark.parametrize("where", ["index", "bank", "theta"])
def test_index_or_data_on_another_device_is_refused(path, where, rng):
    """A CPU op with an argument on ``meta`` reached the shape-only fake kernel and returned
    uninitialised memory; every mix of devices is now a ValueError naming the argument."""
    theta, bank, index = torch.randn(8, generator=rng), torch.randn(2, 8, generator=rng), torch.randperm(8, generator=rng)
    moved = {"theta": theta, "bank": bank, "index": index}
    moved[where] = moved[where].to("meta")
    message = "bank is on cpu, theta on meta" if where == "theta" else f"{where} is on meta, theta on cpu"
    with pytest.raises(ValueError, match=f"lerp_gather: {message}"):
        ops.lerp_gather(moved["theta"], moved["bank"], 1, moved["index"], 0.5)
    if where == "index":
        with pytest.raises(ValueError, match="permute: index is on meta, rows on cpu; move index to cpu"):
            ops.permute(bank, moved["index"])
        with pytest.raises(ValueError, match="permute: index is on meta, rows on cpu"):
            ops.permute(bank, moved["index"], out=torch.empty_like(bank))
        with pytest.raises(ValueError, match="permute: index is on cpu, rows on meta"):
            ops.permute(bank.to("meta"), index)
        # All on meta: shapes only, on both paths.
        assert ops.permute(bank.to("meta"), moved["index"]).shape == bank.shape
        assert ops.lerp_gather(theta.to("meta"), bank.to("meta"), 1, moved["index"], 0.5).shape == theta.shape


@needs_extension
def test_registered_ops_refuse_a_meta_index(rng):
    """Called through torch.ops (the dispatcher picks the Meta kernel when any argument is on meta)."""
    rows, index = torch.randn(2, 8, generator=rng), torch.randperm(8, generator=rng)
    with pytest.raises(ValueError, match="permute: index is on meta, rows on cpu"):
        torch.ops.starfast.permute(rows, index.to("meta"))
    with pytest.raises(ValueError, match="permute: index is on meta, rows on cpu"):
        torch.ops.starfast.permute_out(rows, index.to("meta"), torch.empty_like(rows))
    with pytest.raises(ValueError, match="lerp_gather: index is on meta, theta on cpu"):
        torch.ops.starfast.lerp_gather(rows[0], rows, 1, index.to("meta"), 0.5)
    # All on meta: shapes only, as torch.compile's tracing needs.
    assert torch.ops.starfast.permute(rows.to("meta"), index.to("meta")).shape == rows.shape


def test_lerp_gather_errors(path, rng):
    theta = torch.randn(10, generator=rng)
    with pytest.raises(ValueError, match="outside the bank"):
        ops.lerp_gather(theta, torch.randn(2, 10), 2, None, 0.5)
    with pytest.raises(ValueError, match=r"bank must be \[N, 10\]"):
        ops.lerp_gather(theta, torch.randn(2, 11), 0, None, 0.5)
    with pytest.raises(TypeError, match="share one of"):
        ops.lerp_gather(theta, torch.randn(2, 10, dtype=torch.float64), 0, None, 0.5)
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.lerp_gather(theta, torch.randn(2, 10), 0, torch.arange(10.0), 0.5)


def test_missing_extension_message_names_the_shadowing_source_tree(tmp_path):
    source = tmp_path / "checkout" / "starfast"
    installed = tmp_path / "site-packages" / "starfast"
    missing = ModuleNotFoundError("No module named 'starfast._C'", name="starfast._C")
    message = extension.failure_message(missing, source, installed)
    assert (f"running from the source tree {tmp_path / 'checkout'}, which shadows the installed starfast; "
            "run from another directory, or `pip install -e .`") in message
    # Not installed elsewhere (or an editable install of this very tree): it was not built.
    for elsewhere in (None, source):
        assert f"it was not built in {source}" in extension.failure_message(missing, source, elsewhere)
    broken = ImportError("undefined symbol: omp_get_num_threads")
    assert "failed to load (undefined symbol: omp_get_num_threads)" in extension.failure_message(broken, source, installed)


def test_installed_package_dir_reads_the_distribution_record(tmp_path):
    def distribution(site: Path, record: str) -> None:
        info = site / "starfast-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: starfast\nVersion: 0.1.0\n")
        (info / "RECORD").write_text(record)

    regular, editable = tmp_path / "regular", tmp_path / "editable"
    distribution(regular, "starfast/__init__.py,,\nstarfast/_C.abi3.so,,\n")
    (regular / "starfast").mkdir()
    distribution(editable, "__editable__.starfast-0.1.0.pth,,\n")
    assert extension.installed_package_dir([str(regular)]) == (regular / "starfast").resolve()
    assert extension.installed_package_dir([str(editable)]) is None
    assert extension.installed_package_dir([str(tmp_path / "empty")]) is None


def test_the_no_extension_variable(monkeypatch):
    """STARFAST_NO_EXTENSION=1 disables the extension without a warning (the fallback run of
    `make test-fallback` relies on it); other values than 0 and 1 are ignored, with a warning."""
    import warnings

    if extension.disabled():  # this is the fallback run: the ops must be on their references
        assert not ops.HAVE_EXTENSION and not ops._compiled_for(torch.zeros(1))
    monkeypatch.setenv("STARFAST_NO_EXTENSION", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extension.load() is None
    for value in ("0", ""):
        monkeypatch.setenv("STARFAST_NO_EXTENSION", value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not extension.disabled()
    monkeypatch.setenv("STARFAST_NO_EXTENSION", "yes")
    with pytest.warns(RuntimeWarning, match="STARFAST_NO_EXTENSION='yes' is ignored: set it to 1"):
        assert not extension.disabled()


PUBLIC_AUTOGRAD_PROGRAM = """
import torch
from starfast import ops
assert ops.HAVE_EXTENSION and not ops.LEAN_AUTOGRAD
generator = torch.Generator().manual_seed(SEED)
theta = torch.randn(30, generator=generator, dtype=torch.float64, requires_grad=True)
rows = torch.randn(3, 30, generator=generator, dtype=torch.float64, requires_grad=True)
bank = torch.randn(2, 30, generator=generator, dtype=torch.float64)
index = torch.randperm(30, generator=generator)
repeated = torch.randint(0, 30, (30,), generator=generator)
assert torch.autograd.gradcheck(lambda th: ops.lerp_gather(th, bank, 1, index, 0.37), (theta,))
assert torch.autograd.gradcheck(lambda r: ops.permute(r, repeated), (rows,))
out = ops.lerp_gather(theta, bank, 0, index, 0.25)
out.sum().backward()
assert torch.equal(theta.grad, torch.full_like(theta, 0.75))
print("ok")
"""


@needs_extension
def test_autograd_without_the_private_dispatcher_pieces(rng):
    """ops.py's lean autograd kernels use torch._C._after_autograd_keyset and OpOverload.redispatch,
    which are private; without them (or with STARFAST_PUBLIC_AUTOGRAD=1, as here, in a subprocess:
    the choice is made at import) it registers the public torch.library.register_autograd with
    the same formulas."""
    import os
    import subprocess
    import sys

    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    program = PUBLIC_AUTOGRAD_PROGRAM.replace("SEED", str(seed))
    environment = {**os.environ, "STARFAST_PUBLIC_AUTOGRAD": "1"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert ops.LEAN_AUTOGRAD  # this process (torch 2.13) takes the lean path, which the other tests cover


@needs_extension
@pytest.mark.skipif(not ops.HAVE_CUDA_KERNELS, reason="the extension was built without nvcc: no CUDA bindings")
def test_cuda_bindings_accept_what_ops_passes():
    """Rehearsed without a GPU: the CUDA bindings parse the arguments ops.py builds for them (the
    kernels' operands, then the bad-position slot, device and stream); an empty launch returns
    before any CUDA call."""
    rows = torch.empty(0, 5)
    permute_args = ops._permute_core_args(*ops._permute_operands(rows, torch.arange(5), rows.clone()), rows)
    assert ops._core.permute_cuda(*permute_args, 0, 0, 0) is None
    theta, source, index = ops._lerp_gather_operands(torch.empty(0), torch.empty(1, 0), 0, torch.arange(0))
    assert ops._core.lerp_gather_cuda(*ops._lerp_gather_core_args(theta, source, index, theta, 0.5), 0, 0, 0) is None
    with pytest.raises(TypeError):  # the slot is not optional: a call without it is refused, not misread
        ops._core.permute_cuda(*permute_args, 0, 0)
