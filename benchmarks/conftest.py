"""Benchmark conventions: every benchmark names its comparison ``group`` and its ``role``
(``ours``, ``baseline`` — the obvious alternative — or another label), so ``benchmarks/report.py``
can turn a ``--benchmark-json`` file into median ratios against the baseline of each group."""
import pytest


@pytest.fixture
def bench(benchmark):
    """``bench(group, role, fn, *args, rounds=None)``: time fn under pytest-benchmark, tagged."""

    def run(group: str, role: str, fn, *args, rounds: int = None, warmup_rounds: int = 1):
        benchmark.group = group
        benchmark.extra_info["role"] = role
        if rounds is None:
            return benchmark(fn, *args)
        return benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)

    return run
