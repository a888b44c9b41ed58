"""The first GPU session, prepared: ``make bench-gpu`` (``python benchmarks/gpu.py``).

On a machine with a CUDA device it runs, in about 10 minutes in all, one step after another:

1. the CUDA tests (the device-parametrised tests of the ops, the data and the LAP, ``-k cuda``);
2. ``python -m starfast.check``;
3. ``lerp_gather`` and ``permute`` bandwidth against a plain device copy of the same row, for
   P = 11M (ResNet-18) and 50M;
4. one Starlight epoch of a ResNet-18 star against 50 ResNet-18 sources (its re-matching
   included) against one plain training epoch of the same model and data;
5. a warm re-match of the 50 sources after a 1% move of the target against a cold match;
6. an 11-point barrier curve (``barrier_curve``, BatchNorm recomputed) against the naive loop
   (per t: deep copy, ``update_bn``, evaluate) of ``benchmarks/test_barrier.py``;
7. regular training throughput: images per second of plain ResNet-18 training steps, in float32
   and (on CUDA) under bf16 autocast, the precision training picks there;

and appends a dated section with the device's name, the command and every figure to
``benchmarks/RESULTS.md`` (``--results`` elsewhere). Data are synthetic CIFAR-shaped images
(``data.load("synthetic")``): the timings do not depend on what the pixels show.

On a machine without a CUDA device it says that it needs one and exits with status 0, doing
nothing. ``--device cpu`` is the rehearsal: every step on the CPU at small sizes (ResNet-18 at
width 1/8, 3 sources, rows of 100k and 400k), so that nothing but the sizes is new on the GPU.
A failed step is reported and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))  # the naive barrier loop of test_barrier.py is the baseline

from test_barrier import naive_curve  # noqa: E402
from test_starlight import plain_step  # noqa: E402

import starfast  # noqa: E402
from starfast import data, models  # noqa: E402
from starfast.barrier import barrier_curve  # noqa: E402
from starfast.check import median_seconds  # noqa: E402
from starfast.flat import ParamSpace  # noqa: E402
from starfast.matching import match_weights  # noqa: E402
from starfast.models import ModelSpec  # noqa: E402
from starfast.ops import lerp_gather, permute  # noqa: E402
from starfast.testing.op_inputs import block_index  # noqa: E402
from starfast.recipes import resolve  # noqa: E402
from starfast.starlight import train_star  # noqa: E402
from starfast.training import init_model, make_optimizer, train_model  # noqa: E402

CUDA_TEST_FILES = ("tests/test_ops.py", "tests/test_data.py", "tests/test_lap.py")
NEEDS_GPU = ("benchmarks/gpu.py needs a CUDA device and torch sees none here (torch {torch}, built for CUDA {cuda}); "
             "nothing was run. Rehearse it on the CPU with: python benchmarks/gpu.py --device cpu --results /tmp/RESULTS.md")


@dataclass(frozen=True)
class Sizes:
    """How big each step is on a device kind: rows of the bandwidth step, the model, the number of
    sources, the synthetic train split, the barrier's images and the batch size."""

    rows: Tuple[int, ...]
    arch_kw: Dict[str, float]
    sources: int
    train_images: int
    barrier_images: int
    batch_size: int


SIZES = {
    "cuda": Sizes(rows=(11_000_000, 50_000_000), arch_kw={}, sources=50, train_images=10_000, barrier_images=5_000,
                  batch_size=128),
    "cpu": Sizes(rows=(100_000, 400_000), arch_kw={"width": 0.125}, sources=3, train_images=64, barrier_images=32,
                 batch_size=32),
}


@dataclass
class Step:
    """One step's outcome: its name, seconds, figures (label -> text) and its error, if any."""

    name: str
    seconds: float = 0.0
    figures: Dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device) -> Tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - start, result


def run_command(command: Sequence[str], figures: Dict[str, str], timeout: int) -> None:
    """Run ``command`` from the repository root; its last line becomes a figure; a non-zero exit
    raises with its last lines."""
    done = subprocess.run(list(command), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = (done.stdout + done.stderr).strip().splitlines()
    figures[" ".join(command[1:])] = lines[-1] if lines else "(no output)"
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: " + " | ".join(lines[-8:]))


# -- the steps ----------------------------------------------------------------------------------------


def step_tests(device: torch.device, sizes: Sizes, figures: Dict[str, str], select: Optional[str]) -> None:
    run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TEST_FILES, "-k", select or device.type],
                figures, timeout=300)


def step_check(device: torch.device, sizes: Sizes, figures: Dict[str, str], groups: Sequence[str]) -> None:
    run_command([sys.executable, "-m", "starfast.check", *(arg for group in groups for arg in ("--only", group))], figures,
                timeout=300)


def step_bandwidth(device: torch.device, sizes: Sizes, figures: Dict[str, str]) -> None:
    generator = torch.Generator().manual_seed(0)
    repeats = 20 if device.type == "cuda" else 5
    for length in sizes.rows:
        theta = torch.randn(length, generator=generator).to(device)
        bank = torch.randn(1, length, generator=generator).to(device)
        index = block_index(length, generator).to(device)
        out = torch.empty_like(theta)
        copy_seconds = median_seconds(lambda: out.copy_(theta), device, repeats)
        copy_rate = length * 8 / copy_seconds / 1e9
        for name, call, moved in (("lerp_gather", lambda: lerp_gather(theta, bank, 0, index, 0.3), length * 20),
                                  ("permute", lambda: permute(theta, index, out=out), length * 16)):
            seconds = median_seconds(call, device, repeats)
            rate = moved / seconds / 1e9
            figures[f"{name} P = {length:,}"] = (f"{seconds * 1e3:.3f} ms, {rate:.1f} GB/s; plain copy {copy_rate:.1f} GB/s: "
                                                 f"**{rate / copy_rate:.2f}×** the copy's bandwidth")


@dataclass
class Zoo:
    """The model, its synthetic data and the bank of sources shared by steps 4, 5 and 7."""

    spec: ModelSpec
    dataset: object
    space: ParamSpace
    bank: torch.Tensor


def make_zoo(device: torch.device, sizes: Sizes) -> Zoo:
    dataset = data.load("synthetic", device=device, shape=(3, 32, 32), num_train=sizes.train_images,
                        num_test=sizes.batch_size)
    spec = ModelSpec.for_dataset("resnet18", dataset, sizes.arch_kw)
    space = ParamSpace(init_model(spec, 0))
    bank = torch.stack([space.flatten(init_model(spec, seed)) for seed in range(1, sizes.sources + 1)]).to(device)
    return Zoo(spec, dataset, space, bank)


def epoch_recipe(sizes: Sizes):
    return replace(resolve("resnet18", "cifar10", {"epochs": 1}), batch_size=sizes.batch_size)


def step_starlight(device: torch.device, sizes: Sizes, figures: Dict[str, str], zoo: Zoo) -> None:
    recipe = epoch_recipe(sizes)
    # One untimed step first: the first training in a process pays for lazy initialisation (cuDNN).
    train_model(zoo.spec, zoo.dataset.subset(sizes.batch_size, sizes.batch_size), recipe, 0, device=device, progress=False)
    plain_seconds, _ = timed(lambda: train_model(zoo.spec, zoo.dataset, recipe, 0, device=device, progress=False), device)
    skeleton = init_model(zoo.spec, 0)
    star_seconds, result = timed(lambda: train_star(skeleton, zoo.bank, models.permutation_spec(skeleton), zoo.dataset, recipe,
                                                    space=zoo.space, device=device, quiet=True), device)
    figures["plain epoch"] = f"{plain_seconds:.2f} s ({sizes.train_images:,} images, batch {sizes.batch_size}, final evaluation included)"
    figures[f"Starlight epoch, {sizes.sources} sources"] = (
        f"{star_seconds:.2f} s: **{star_seconds / plain_seconds:.2f}×** the plain epoch's time "
        f"(re-matching {result.metrics['rematch_seconds']:.2f} s of it)")


def step_rematch(device: torch.device, sizes: Sizes, figures: Dict[str, str], zoo: Zoo) -> None:
    spec = models.permutation_spec(init_model(zoo.spec, 0))
    target = zoo.space.flatten(init_model(zoo.spec, 0)).to(device)
    first = match_weights(target, zoo.bank, spec, space=zoo.space)
    settled = match_weights(target, zoo.bank, spec, space=zoo.space, init=first)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)).to(device)
    moved = target + 0.01 * target.abs().mean() * noise
    cold, _ = timed(lambda: match_weights(moved, zoo.bank, spec, space=zoo.space), device)
    warm, result = timed(lambda: match_weights(moved, zoo.bank, spec, space=zoo.space, init=settled), device)
    figures[f"re-match {sizes.sources} sources after a 1% move"] = (
        f"warm {warm:.3f} s ({int(result.sweeps.sum())} sweeps in all), cold {cold:.3f} s: **{cold / warm:.2f}×** faster warm")


def step_barrier(device: torch.device, sizes: Sizes, figures: Dict[str, str]) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(sizes.barrier_images, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (sizes.barrier_images,), generator=generator).to(device)
    batches = [(inputs[i: i + 500], labels[i: i + 500]) for i in range(0, sizes.barrier_images, 500)]
    pair = [models.build("resnet18", 10, 3, (3, 32, 32), **sizes.arch_kw).to(device) for _ in range(2)]
    space = ParamSpace(pair[0])
    naive_seconds, naive = timed(lambda: naive_curve(pair[0], pair[1], space, batches), device)
    ours_seconds, curve = timed(lambda: barrier_curve(pair[0], space.flatten(pair[0]), space.flatten(pair[1]), batches, ts=11,
                                                      buffers_a=pair[0].state_dict(), buffers_b=pair[1].state_dict(),
                                                      space=space), device)
    gap = float((curve.train_loss.cpu().double() - naive).abs().max())
    figures[f"11-point barrier, {sizes.barrier_images:,} images"] = (
        f"barrier_curve {ours_seconds:.2f} s, naive loop {naive_seconds:.2f} s: **{naive_seconds / ours_seconds:.2f}×** faster "
        f"(largest loss difference {gap:.2g})")
    if gap > 1e-3:
        raise RuntimeError(f"barrier_curve's losses differ from the naive loop's by up to {gap:.3g}")


def step_throughput(device: torch.device, sizes: Sizes, figures: Dict[str, str], zoo: Zoo) -> None:
    """Plain training steps (``plain_step`` of benchmarks/test_starlight.py) on one batch of the
    synthetic data, in float32 and, on CUDA, under bf16 autocast as training runs there."""
    inputs, labels = next(iter(zoo.dataset.train_batches(sizes.batch_size, generator=torch.Generator().manual_seed(0))))
    steps = 20 if device.type == "cuda" else 3
    for precision in ("fp32", "bf16 autocast") if device.type == "cuda" else ("fp32",):
        model = init_model(zoo.spec, 0).to(device).train()
        optimizer = make_optimizer(epoch_recipe(sizes), model.parameters())
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=precision != "fp32") if device.type == "cuda" else nullcontext()
        with autocast:
            plain_step(model, optimizer, inputs, labels)  # warm-up
            seconds, _ = timed(lambda: [plain_step(model, optimizer, inputs, labels) for _ in range(steps)], device)
        figures[f"regular training, {precision}"] = (f"{steps * sizes.batch_size / seconds:,.0f} images/s (ResNet-18 "
                                                     f"{sizes.arch_kw or ''}, batch {sizes.batch_size}, {steps} steps)")


# -- the report --------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (rehearsal)"


def section(steps: List[Step], device: torch.device, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"\n## GPU benchmark (`make bench-gpu`), {now:%Y-%m-%d %H:%M} UTC", "",
             f"- **Device:** {device_name(device)}; torch {torch.__version__}, starfast {starfast.__version__}, "
             f"Python {platform.python_version()}",
             f"- **Date:** {now:%Y-%m-%d}", f"- **Command:** `{command}` ({sum(step.seconds for step in steps):.0f} s in all)", "",
             "| step | what | result |", "|---|---|---|"]
    for step in steps:
        outcome = f"FAILED: {step.error}" if step.error else f"{step.seconds:.1f} s"
        lines.append(f"| {step.name} | (step) | {outcome} |")
        lines += [f"| {step.name} | {label} | {text.replace('|', '/')} |" for label, text in step.figures.items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(SIZES), default="cuda",
                        help="cuda (default): the real run; cpu: the rehearsal at small sizes")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "RESULTS.md", help="the file the section is appended to")
    parser.add_argument("--tests", metavar="EXPR", help="pytest -k expression of step 1 (default: the device, cuda or cpu)")
    parser.add_argument("--check-only", action="append", default=[], metavar="GROUP",
                        help="pass --only GROUP to python -m starfast.check, repeatable (default: every check)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NEEDS_GPU.format(torch=torch.__version__, cuda=torch.version.cuda or "none"))
        return 0
    device, sizes = torch.device(args.device), SIZES[args.device]
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}: on {device_name(device)}")
    zoo: List[Zoo] = []

    def shared_zoo() -> Zoo:
        if not zoo:
            zoo.append(make_zoo(device, sizes))
        return zoo[0]

    plan: List[Tuple[str, Callable[[Dict[str, str]], None]]] = [
        ("1 tests", lambda figures: step_tests(device, sizes, figures, args.tests)),
        ("2 self-check", lambda figures: step_check(device, sizes, figures, args.check_only)),
        ("3 bandwidth", lambda figures: step_bandwidth(device, sizes, figures)),
        ("4 Starlight epoch", lambda figures: step_starlight(device, sizes, figures, shared_zoo())),
        ("5 warm re-match", lambda figures: step_rematch(device, sizes, figures, shared_zoo())),
        ("6 barrier", lambda figures: step_barrier(device, sizes, figures)),
        ("7 training throughput", lambda figures: step_throughput(device, sizes, figures, shared_zoo())),
    ]
    steps = []
    for name, run in plan:
        step = Step(name)
        started = time.perf_counter()
        try:
            run(step.figures)
        except Exception as error:  # reported in its row; the next steps still run
            step.error = f"{type(error).__name__}: {error}".replace("\n", " ")
            traceback.print_exc()
        step.seconds = time.perf_counter() - started
        steps.append(step)
        print(f"{'FAIL' if step.error else 'ok  '}  {name} ({step.seconds:.1f} s)"
              + "".join(f"\n      {label}: {text}" for label, text in step.figures.items())
              + (f"\n      {step.error}" if step.error else ""), flush=True)
    with open(args.results, "a") as handle:
        handle.write(section(steps, device, command))
    failed = [step.name for step in steps if step.error]
    print(f"written to {args.results}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
