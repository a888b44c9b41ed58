"""trace_spec against its floor, ``torch.export.export`` alone (the graph it analyses), on one
thread: the zoo's CIFAR ResNet-18 and a ResNet-50-sized Hugging Face ResNet (25.6M parameters,
random weights, needs transformers). The ratio is the cost of the analysis on top of export;
``extra_info["cpu_s"]`` records the CPU time of one call, the "on one core" figure on a shared
machine."""
import time

import pytest
import torch

from starfast import models, trace_spec
from starfast.tracing import export_graph


def resnet18():
    return models.build("resnet18", num_classes=10, in_channels=3, input_shape=(3, 32, 32)), torch.randn(1, 3, 32, 32)


def resnet50():
    transformers = pytest.importorskip("transformers")
    return transformers.ResNetForImageClassification(transformers.ResNetConfig()), torch.randn(1, 3, 224, 224)


@pytest.mark.parametrize("role", ["ours", "baseline"])
@pytest.mark.parametrize("model_name, make", [("resnet18 (zoo)", resnet18), ("resnet50 (transformers)", resnet50)])
def test_trace(bench, benchmark, model_name, make, role):
    torch.set_num_threads(1)
    model, x = make()
    model.eval()
    fn = (lambda: trace_spec(model, x)) if role == "ours" else (lambda: export_graph(model, x))
    fn()  # the first export in a process pays torch.export's one-time set-up
    start = time.process_time()
    fn()
    benchmark.extra_info["cpu_s"] = time.process_time() - start
    bench(f"trace {model_name}", role, fn, rounds=5)
