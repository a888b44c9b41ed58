"""The default job (``python -m starfast.train``) against a plain PyTorch loop of the same
optimisation steps, in one process (issue 23's target: no slower than the plain loop).

The plain loop is what a researcher writes by hand: 15 MLPs (3 × 24) trained one after another
for 30 epochs (SGD, lr 0.05 cosine, momentum and weight decay of the digits recipe, batch 32),
then 3 stars trained 90 epochs each by the same steps Starlight takes — per batch a random source
and t, the loss at the interpolation of the star and that source — with the sources aligned once
up front (no re-matching, no evaluation: a floor for the star stage, not a copy of it). The
default job additionally re-matches every epoch and measures the barriers; both sides run on one
thread, as starfast's chosen workload does on this machine.

Run with ``pytest benchmarks/test_default_job.py``.
"""
import math
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call

from starfast import data, models

WIDTH, DEPTH, MODELS, STARS, EPOCHS, STAR_EPOCHS, BATCH = 24, 3, 15, 3, 30, 90, 32
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def _batches(inputs, labels, generator):
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order) - BATCH + 1, BATCH):
        chosen = order[start : start + BATCH]
        yield inputs[chosen], labels[chosen]


def _cosine(optimizer, epoch, step, steps, epochs):
    for group in optimizer.param_groups:
        group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * (epoch + step / steps) / epochs))


def plain_loop():
    torch.set_num_threads(1)
    dataset = data.load("digits")
    inputs, labels = dataset.tensors("train")
    steps = len(labels) // BATCH
    build = lambda: models.build("mlp", num_classes=10, in_channels=1, input_shape=(1, 8, 8), width=WIDTH, depth=DEPTH)  # noqa: E731
    sources = []
    for seed in range(MODELS):
        torch.manual_seed(seed)
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(EPOCHS):
            for step, (x, y) in enumerate(_batches(inputs, labels, generator)):
                _cosine(optimizer, epoch, step, steps, EPOCHS)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        sources.append({name: value.detach() for name, value in model.named_parameters()})
    for seed in range(STARS):
        torch.manual_seed(2000 + seed)
        star = build()
        theta = dict(star.named_parameters())
        optimizer = torch.optim.SGD(theta.values(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        generator = torch.Generator().manual_seed(2000 + seed)
        for epoch in range(STAR_EPOCHS):
            for step, (x, y) in enumerate(_batches(inputs, labels, generator)):
                _cosine(optimizer, epoch, step, steps, STAR_EPOCHS)
                source = sources[int(torch.randint(10, (1,), generator=generator))]
                t = float(torch.rand((), generator=generator))
                point = {name: (1 - t) * theta[name] + t * source[name] for name in theta}
                loss = torch.nn.functional.cross_entropy(functional_call(star, point, (x,)), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()


def default_job(run_dir):
    subprocess.run([sys.executable, "-m", "starfast.train", "--run-dir", str(run_dir), "--quiet"], check=True)


def test_plain_loop(bench):
    bench("default job", "baseline", plain_loop, rounds=2, warmup_rounds=0)


def test_starfast_default_job(bench, tmp_path):
    counter = iter(range(100))
    bench("default job", "ours", lambda: default_job(tmp_path / f"run-{next(counter)}"), rounds=2, warmup_rounds=0)
