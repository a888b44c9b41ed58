"""Benchmark conventions: every benchmark names its comparison ``group`` and its ``role``
(``ours``, ``baseline`` — the obvious alternative — or another label), so ``benchmarks/report.py``
can turn a ``--benchmark-json`` file into median ratios against the baseline of each group.

The benchmarks run with ``starfast.allocator.keep_freed_memory()``, as the command-line tools do
(both sides of every ratio share the process); ``--system-malloc`` leaves glibc's defaults."""
import pytest

from starfast.allocator import keep_freed_memory


def pytest_addoption(parser):
    parser.addoption("--system-malloc", action="store_true", help="do not call keep_freed_memory() (glibc's defaults)")


def pytest_configure(config):
    if not config.getoption("--system-malloc"):
        keep_freed_memory()


@pytest.fixture
def bench(benchmark):
    """``bench(group, role, fn, *args, rounds=None, setup=None)``: time fn under pytest-benchmark,
    tagged. ``setup`` (untimed, before every round) returns fn's ``(args, kwargs)``; ``iterations``
    calls per round for calls of tens of µs, whose single-call wall times are mostly jitter."""

    def run(group: str, role: str, fn, *args, rounds: int = None, warmup_rounds: int = 1, setup=None, iterations: int = 1):
        benchmark.group = group
        benchmark.extra_info["role"] = role
        if rounds is None:
            return benchmark(fn, *args)
        if setup is not None:
            return benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        return benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)

    return run
