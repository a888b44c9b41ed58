"""Training throughput: images/s of one training step per architecture, and K seeds at once vs K runs.

Run with ``pytest benchmarks/test_training.py``. Images/s and the parallel-seeds speed-up are
printed and stored in each benchmark's ``extra_info`` (see ``--benchmark-json``). Architectures
that cannot be built here (e.g. ``resnet18-imagenet`` without torchvision) are skipped.
"""
import time

import pytest
import torch

from starfast import data, models
from starfast.recipes import resolve
from starfast.models import ModelSpec
from starfast.training import SpeedOptions, init_model, make_optimizer, train_model, train_models_parallel
from starfast.training_common import per_example_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEP_BATCH = 16


@pytest.fixture(scope="module")
def cifar_shaped():
    return data.load("synthetic", device=DEVICE, shape=(3, 32, 32), num_train=STEP_BATCH, num_test=STEP_BATCH)


@pytest.mark.parametrize("arch", models.names())
def test_training_step_images_per_second(benchmark, arch, cifar_shaped):
    try:
        model = init_model(ModelSpec.for_dataset(arch, cifar_shaped), seed=0).to(DEVICE)
    except (ImportError, ValueError, TypeError) as error:
        pytest.skip(f"{arch} does not build here: {error}")  # resnet18-imagenet without torchvision
    convolutional = DEVICE.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    memory_format = torch.channels_last if convolutional else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = make_optimizer(resolve(arch, "cifar10"), model.parameters())
    inputs, labels = cifar_shaped.tensors("train")
    inputs = inputs.contiguous(memory_format=memory_format)
    autocast_dtype = SpeedOptions().autocast_dtype(DEVICE)

    def step():
        with torch.autocast(DEVICE.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(inputs)
        loss = per_example_loss(logits, labels, binary=False).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    images_per_second = STEP_BATCH / benchmark.stats.stats.median
    benchmark.extra_info.update(images_per_second=images_per_second, device=str(DEVICE), batch=STEP_BATCH)
    print(f"\n{arch}: {images_per_second:.1f} images/s ({DEVICE}, batch {STEP_BATCH})")


@pytest.fixture(params=[1, None], ids=["1-thread", "default-threads"])
def threads(request):
    """Both sides on one thread, and both on torch's default (all cores): the stacked step is
    compute-bound and gains from more cores, the sequential steps are overhead-bound."""
    default = torch.get_num_threads()
    torch.set_num_threads(request.param or default)
    yield torch.get_num_threads()
    torch.set_num_threads(default)


@pytest.mark.parametrize("count", [8, 16])
@pytest.mark.parametrize("width", [32, 128])
def test_parallel_seeds_vs_sequential_runs(benchmark, width, count, threads):
    """K seeds of mlp on digits at once vs the same K seeds one after another (3 epochs)."""
    digits = data.load("digits")
    spec = ModelSpec.for_dataset("mlp", digits, {"width": width})
    recipe = resolve("mlp", "digits", {"epochs": 3})
    seeds = list(range(count))

    def sequential():
        for seed in seeds:
            train_model(spec, digits, recipe, seed, progress=False)

    def parallel():
        train_models_parallel(spec, digits, recipe, seeds, progress=False)

    sequential()  # warm-up (lazy imports, allocator)
    sequential_times = []
    for _ in range(3):
        started = time.perf_counter()
        sequential()
        sequential_times.append(time.perf_counter() - started)
    benchmark.pedantic(parallel, rounds=3, warmup_rounds=1)
    speedup = sorted(sequential_times)[1] / benchmark.stats.stats.median
    benchmark.extra_info.update(sequential_median_s=sorted(sequential_times)[1], speedup=speedup, width=width, seeds=count, threads=threads)
    print(f"\nmlp width {width} on digits, {threads} thread(s): {count} seeds in parallel are {speedup:.2f}x faster than sequential")
