"""``python -m starfast.check``: the installation's self-test, to run after installing and to paste
into a bug report.

This module owns the checks and their one-line report. Each check prints one line, ``ok``,
``FAIL``, ``info`` (a measurement or a fact, never a failure) or ``skip`` (with why: "not checked
here: no CUDA device"), then a summary; the exit status is 1 when any check failed, else 0. The
checks, by group (``--only GROUP`` runs some of them):

- ``versions``: starfast, Python, torch, torch's CUDA and compiler, nvcc if one is on PATH;
- ``extension``: whether the compiled core (:mod:`starfast.extension`) and its CUDA kernels are
  loaded, and why not;
- ``ops``: ``permute`` and ``lerp_gather`` (:mod:`starfast.ops`) against their pure-PyTorch
  references, bit for bit, on fresh random inputs, on every available device and dtype;
- ``opcheck``: ``torch.library.opcheck`` on the registered ops, per device;
- ``gradients``: ``torch.autograd.gradcheck`` in float64 of both ops, per device;
- ``bandwidth``: the achieved bandwidth of ``lerp_gather`` against a plain copy of the same row on
  the same device, measured in the same run;
- ``lap``: ``linear_assignment`` (:mod:`starfast.lap`) against scipy on a few sizes and kinds;
- ``end-to-end``: ``python -m starfast.train`` in a temporary directory with tiny settings
  (models, a star, the barriers), on the default device.

The random inputs come from a fresh seed printed in the first line; ``--seed`` replays it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import platform
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

import starfast
from starfast import extension, ops
from starfast.arguments import parse_arguments, run_command
from starfast.files import read_json
from starfast.lap import assignment_objective, linear_assignment, linear_assignment_reference
from starfast.testing.lap_problems import make_costs
from starfast.testing.op_inputs import block_index, mismatches

NO_CUDA = "not checked here: no CUDA device"
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STATUSES = ("ok", "FAIL", "info", "skip")


@dataclass(frozen=True)
class Line:
    """One check's outcome: ``status`` (one of :data:`STATUSES`), what was checked, and the detail."""

    status: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status:4s}  {self.name}" + (f": {self.detail}" if self.detail else "")


def devices() -> List[torch.device]:
    """The devices the ops are checked on: the CPU, and the current CUDA device when there is one."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- versions and the compiled core ---------------------------------------------------------------


def torch_compiler() -> str:
    """The compiler torch says it was built with (the first line of its build configuration that
    names one), or "unknown"."""
    for line in torch.__config__.show().splitlines():
        text = line.strip().lstrip("- ")
        if text.startswith(("GCC", "clang", "MSVC", "Clang")):
            return text
    return "unknown"


def tool_answer(tool: str, *arguments: str) -> str:
    """The last line ``tool`` prints with ``arguments``, or why there is none."""
    path = shutil.which(tool)
    if path is None:
        return f"no {tool} on PATH"
    try:
        output = subprocess.run([path, *arguments], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"{path} did not answer ({error})"
    return f"{path}: {output.splitlines()[-1] if output else 'nothing printed'}"


def check_versions(rng: torch.Generator) -> Iterator[Line]:
    yield Line("info", "starfast", f"{starfast.__version__} from {extension.PACKAGE_DIR}")
    yield Line("info", "python", f"{platform.python_version()} on {platform.platform()}")
    yield Line("info", "torch", f"{torch.__version__}, built with {torch_compiler()}")
    cuda = torch.version.cuda or "none (a CPU-only build of torch)"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found = ", ".join(torch.cuda.get_device_name(index) for index in range(count)) or "no CUDA device"
    yield Line("info", "CUDA", f"torch built for {cuda}; {found}; driver: "
                               f"{tool_answer('nvidia-smi', '--query-gpu=name,driver_version', '--format=csv,noheader')}")
    yield Line("info", "C++ compiler", f"{sysconfig.get_config_var('CXX') or 'unknown'} (what pip uses to build "
                                       f"starfast unless $CXX says otherwise); nvcc: {tool_answer('nvcc', '--version')}")


def extension_problem() -> str:
    """Why ``starfast._C`` is not loaded, as the loader's warning says it."""
    try:
        __import__("starfast._C")
    except ImportError as error:
        return extension.failure_message(error, extension.PACKAGE_DIR, extension.installed_package_dir())
    return "it imports now, but did not when starfast was first imported"


def check_extension(rng: torch.Generator) -> Iterator[Line]:
    if extension.disabled():
        yield Line("skip", "compiled core", f"not loaded on request ({extension.DISABLE_VARIABLE}=1): the ops run their "
                                            "pure-PyTorch references; unset it to check the compiled core")
        return
    if not ops.HAVE_EXTENSION:
        yield Line("FAIL", "compiled core", extension_problem())
    else:
        yield Line("ok", "compiled core", f"loaded from {extension.core.__file__}")
    if ops.HAVE_CUDA_KERNELS:
        yield Line("ok" if torch.cuda.is_available() else "info", "CUDA kernels",
                   "built" + ("" if torch.cuda.is_available() else f" ({NO_CUDA} to run them on)"))
    elif torch.cuda.is_available():
        yield Line("FAIL", "CUDA kernels", "not built, although a CUDA device is present: the ops run torch's slower "
                   "references there; rebuild with a CUDA toolkit: FORCE_CUDA=1 pip install . (CUDA_HOME=<toolkit>)")
    else:
        yield Line("skip", "CUDA kernels", f"not built; {NO_CUDA}")


# -- the ops ----------------------------------------------------------------------------------------


def _on_cuda_too(check: Callable[[torch.device], Iterator[Line]], name: str) -> Callable[[torch.Generator], Iterator[Line]]:
    """Runs ``check`` per available device, with a skip line for CUDA when there is none."""

    def run(rng: torch.Generator) -> Iterator[Line]:
        for device in devices():
            yield from check(device, rng)
        if not torch.cuda.is_available():
            yield Line("skip", f"{name} cuda", NO_CUDA)

    return run


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> Line:
    if got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want):
        return Line("ok", name, f"equal to the reference ({got.numel()} elements)")
    if got.shape != want.shape or got.dtype != want.dtype:
        return Line("FAIL", name, f"got {got.dtype} {list(got.shape)}, the reference {want.dtype} {list(want.shape)}")
    return Line("FAIL", name, mismatches(got.cpu(), want.cpu()))


def check_permute(device: torch.device, rng: torch.Generator) -> Iterator[Line]:
    length = 3000 + int(torch.randint(0, 1000, (1,), generator=rng))
    for dtype in FLOATS + (torch.int64,):
        for index_dtype in (torch.int64, torch.int32):
            rows = (100 * torch.randn(4, length, generator=rng)).to(device, dtype)
            shared = torch.randperm(length, generator=rng).to(device, index_dtype)
            per_row = torch.stack([block_index(length, rng) for _ in range(4)]).to(device, index_dtype)
            name = f"permute {device.type} {name_of(dtype)} ({name_of(index_dtype)} index)"
            lines = [_compare(name, ops.permute(rows, shared), ops.permute_reference(rows, shared)),
                     _compare(name, ops.permute(rows, per_row), ops.permute_reference(rows, per_row))]
            out = torch.empty_like(rows)
            ops.permute(rows, per_row, out=out)
            lines.append(_compare(name, out, ops.permute_reference(rows, per_row)))
            yield next((line for line in lines if line.status == "FAIL"), lines[0])


def check_lerp_gather(device: torch.device, rng: torch.Generator) -> Iterator[Line]:
    length = 3000 + int(torch.randint(0, 1000, (1,), generator=rng))
    for dtype in FLOATS:
        theta = torch.randn(length, generator=rng).to(device, dtype)
        bank = torch.randn(3, length, generator=rng).to(device, dtype)
        index = block_index(length, rng).to(device)
        name = f"lerp_gather {device.type} {name_of(dtype)}"
        line = Line("ok", name, f"equal to torch.lerp of the gathered row ({length} elements, 4 values of t, "
                                "with and without an index)")
        for t in (0.0, float(torch.rand(1, generator=rng)), 1.0, 1.7):
            for used in (index, index.int(), None):
                got = ops.lerp_gather(theta, bank, 2, used, t)
                want = ops.lerp_gather_reference(theta, bank, 2, used, t)
                compared = _compare(f"{name} (t = {t:.3g}, {'no' if used is None else name_of(used.dtype)} index)", got, want)
                if compared.status == "FAIL":
                    line = compared
        yield line


def check_opcheck(device: torch.device, rng: torch.Generator) -> Iterator[Line]:
    name = f"opcheck {device.type}"
    if not ops.HAVE_EXTENSION:
        yield Line("skip", name, "the compiled core is not loaded (see 'compiled core'): no op is registered")
        return
    if device.type == "cuda" and not ops.HAVE_CUDA_KERNELS:
        yield Line("skip", name, "the CUDA kernels are not built (see 'CUDA kernels')")
        return
    rows = torch.randn(3, 64, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    index = torch.randperm(64, generator=rng).to(device)
    theta = torch.randn(64, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    bank = torch.randn(2, 64, generator=rng, dtype=torch.float64).to(device)
    cases = [
        ("permute", torch.ops.starfast.permute, (rows, index)),
        ("permute per-row index", torch.ops.starfast.permute, (rows, torch.randint(0, 64, (3, 64), generator=rng).to(device))),
        ("permute_out", torch.ops.starfast.permute_out, (rows.detach(), index, torch.empty_like(rows.detach()))),
        ("lerp_gather", torch.ops.starfast.lerp_gather, (theta, bank, 1, index, 0.4)),
        ("lerp_gather no index", torch.ops.starfast.lerp_gather, (theta, bank, 0, None, 0.9)),
    ]
    for label, op, args in cases:
        try:
            torch.library.opcheck(op, args)
        except Exception as error:  # opcheck raises OpCheckError (or the op's own error)
            yield Line("FAIL", f"{name} {label}", f"{type(error).__name__}: {str(error).splitlines()[0]}")
            return
    yield Line("ok", name, f"{', '.join(label for label, _, _ in cases)}")


def check_gradients(device: torch.device, rng: torch.Generator) -> Iterator[Line]:
    theta = torch.randn(40, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    bank = torch.randn(3, 40, generator=rng, dtype=torch.float64).to(device)
    rows = torch.randn(3, 40, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    index = torch.randperm(40, generator=rng).to(device)
    repeated = torch.randint(0, 40, (40,), generator=rng).to(device)  # not a permutation: the adjoint still holds
    cases = {
        "lerp_gather": lambda: torch.autograd.gradcheck(lambda th: ops.lerp_gather(th, bank, 2, index, 0.37), (theta,)),
        "permute": lambda: torch.autograd.gradcheck(lambda r: ops.permute(r, index), (rows,)),
        "permute repeated index": lambda: torch.autograd.gradcheck(lambda r: ops.permute(r, repeated), (rows,)),
    }
    for label, run in cases.items():
        try:
            run()
        except Exception as error:  # gradcheck raises GradcheckError
            yield Line("FAIL", f"gradcheck {device.type} {label}", f"{type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        yield Line("ok", f"gradcheck {device.type} {label}", "float64")


def median_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_bandwidth(device: torch.device, rng: torch.Generator, length: Optional[int] = None) -> Iterator[Line]:
    length = length or (50_000_000 if device.type == "cuda" else 4_000_000)
    theta = torch.randn(length, generator=rng).to(device)
    bank = torch.randn(1, length, generator=rng).to(device)
    index = block_index(length, rng).to(device)
    out = torch.empty_like(theta)
    repeats = 20 if device.type == "cuda" else 5
    ours = median_seconds(lambda: ops.lerp_gather(theta, bank, 0, index, 0.3), device, repeats)
    copy = median_seconds(lambda: out.copy_(theta), device, repeats)
    # Bytes moved: lerp_gather reads θ, the bank row and the int64 index and writes the result;
    # the copy reads and writes one float32 row.
    moved, copied = length * (4 + 4 + 8 + 4), length * (4 + 4)
    yield Line("info", f"bandwidth {device.type}",
               f"lerp_gather {moved / ours / 1e9:.1f} GB/s, plain copy {copied / copy / 1e9:.1f} GB/s "
               f"({moved / ours / (copied / copy):.2f} of the copy's), P = {length:,} float32, median of {repeats}")


# -- the assignment solver --------------------------------------------------------------------------

LAP_CASES = (("iid", 1, 8), ("ties", 4, 32), ("wm", 4, 64), ("iid", 2, 200))


def check_lap(device: torch.device, rng: torch.Generator) -> Iterator[Line]:
    for kind, batch, n in LAP_CASES:
        cost = make_costs(kind, batch, n, rng).to(device)
        name = f"linear_assignment {device.type} {kind} {batch} x {n}x{n}"
        columns = linear_assignment(cost, maximize=True)
        want = assignment_objective(cost.cpu(), linear_assignment_reference(cost, maximize=True).cpu())
        if columns.device.type != device.type or columns.shape != cost.shape[:-1]:
            yield Line("FAIL", name, f"returned {list(columns.shape)} on {columns.device}")
            continue
        columns = columns.cpu()
        if not all(torch.equal(row.sort().values, torch.arange(n)) for row in columns):
            yield Line("FAIL", name, "an answer is not a permutation")
            continue
        got = assignment_objective(cost.cpu(), columns)
        # Two optimal assignments may pick different entries of equal sum: each float64 sum of n entries
        # of at most max|cost| is off by at most n roundings of n * max|cost|.
        tolerance = 2 * n * n * torch.finfo(torch.float64).eps * cost.abs().amax(dim=(-2, -1)).double().cpu()
        gap = (want - got).abs()
        if bool((gap > tolerance).any()):
            yield Line("FAIL", name, f"objective below scipy's by up to {float(gap.max()):.3g} (tolerance "
                                     f"{float(tolerance.max()):.3g})")
        else:
            yield Line("ok", name, f"optimal as scipy's (largest objective gap {float(gap.max()):.2g})")


# -- end to end --------------------------------------------------------------------------------------

END_TO_END_ARGS = ("--dataset", "digits", "--arch", "mlp", "--arch-kw", "width=16", "--sources", "2", "--heldout", "2",
                   "--star-seeds", "1", "--epochs", "3", "--star-epochs", "2", "--quiet")


def check_end_to_end(rng: torch.Generator) -> Iterator[Line]:
    from starfast import train  # the command line's whole stack: imported only when this check runs

    device = devices()[-1]
    name = f"end-to-end {device.type}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="starfast-check-") as folder:
        argv = [*END_TO_END_ARGS, "--device", str(device), "--run-dir", str(Path(folder) / "run")]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            status = train.main(argv)
        results = Path(folder) / "run" / "results" / "results.json"
        if status != 0 or not results.is_file():
            tail = " | ".join(printed.getvalue().strip().splitlines()[-3:])
            yield Line("FAIL", name, f"python -m starfast.train {' '.join(argv)} exited {status}: {tail}")
            return
        barriers = read_json(results)["barriers"]
    summary = ", ".join(f"{kind} {splits['test']['mean']:.3f}" for kind, splits in barriers.items() if splits.get("test"))
    yield Line("ok", name, f"4 models, 1 star, barriers measured in {time.perf_counter() - started:.0f} s "
                           f"(test loss barriers at tiny settings, meaningless: {summary or 'none'})")


CHECKS: Dict[str, Callable[[torch.Generator], Iterator[Line]]] = {
    "versions": check_versions,
    "extension": check_extension,
    "ops": lambda rng: (line for check in (_on_cuda_too(check_permute, "permute"), _on_cuda_too(check_lerp_gather, "lerp_gather"))
                        for line in check(rng)),
    "opcheck": _on_cuda_too(check_opcheck, "opcheck"),
    "gradients": _on_cuda_too(check_gradients, "gradcheck"),
    "bandwidth": _on_cuda_too(check_bandwidth, "bandwidth"),
    "lap": _on_cuda_too(check_lap, "linear_assignment"),
    "end-to-end": check_end_to_end,
}


def run_checks(groups: Sequence[str], seed: int, write: Callable[[str], None] = print) -> List[Line]:
    """Run the checks of ``groups`` in order, writing each line as it comes; a check that raises
    is one FAIL line naming it and the error."""
    rng = torch.Generator().manual_seed(seed)
    lines: List[Line] = []
    for group in groups:
        try:
            for line in CHECKS[group](rng):
                lines.append(line)
                write(str(line))
        except Exception as error:  # reported, and the remaining groups still run
            where = traceback.extract_tb(error.__traceback__)[-1]
            line = Line("FAIL", group, f"{type(error).__name__}: {error} (at {Path(where.filename).name}:{where.lineno})")
            lines.append(line)
            write(str(line))
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starfast.check", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=list(CHECKS), metavar="GROUP",
                        help=f"run only this group of checks, repeatable: {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--seed", type=int, help="seed of the random inputs (default: a fresh one, printed)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_arguments(build_parser(), argv)
    seed = random.SystemRandom().randrange(2**31) if args.seed is None else args.seed
    groups = [group for group in CHECKS if args.only is None or group in args.only]
    print(f"python -m starfast.check (seed {seed}; replay with --seed {seed}): {', '.join(groups)}")
    started = time.perf_counter()
    lines = run_checks(groups, seed)
    counts = {status: sum(line.status == status for line in lines) for status in STATUSES}
    failed = [line.name for line in lines if line.status == "FAIL"]
    print(f"summary: {counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} not checked, {counts['info']} info "
          f"in {time.perf_counter() - started:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        print("a check failed: paste this whole output into the bug report", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_command(main, "python -m starfast.check " + " ".join(sys.argv[1:]))
