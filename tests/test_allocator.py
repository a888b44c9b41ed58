"""Tests of starfast.allocator: after keep_freed_memory(), freeing and re-allocating a large
tensor reuses the same pages instead of faulting in fresh ones (page faults counted with
getrusage, in a subprocess so the setting does not leak into the test process)."""
import platform
import subprocess
import sys

import pytest

PROGRAM = """
import resource, statistics, torch
from starfast.allocator import keep_freed_memory

def faults_per_round(rounds):
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(16 * 1024 * 1024)  # 64 MB: above glibc's largest mmap threshold
        block.fill_(1.0)
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = statistics.median(faults_per_round(7))
accepted = keep_freed_memory()
settled = statistics.median(faults_per_round(20)[-10:])  # the heap takes a few rounds to settle
print(int(default), accepted, int(settled))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings exist in glibc only")
def test_freed_large_blocks_are_reused_without_page_faults():
    output = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True).stdout
    default, accepted, tuned = output.split()
    assert accepted == "True"
    pages = 64 * 1024 * 1024 // 4096
    # Medians over rounds, so that a page the kernel reclaims now and then does not count.
    assert int(default) > pages // 2  # by default every round faults its block in again
    assert int(tuned) < pages // 10  # after the switch the heap's pages are reused


def test_only_glibc_accepts_the_setting():
    output = subprocess.run(
        [sys.executable, "-c", "from starfast.allocator import keep_freed_memory; print(keep_freed_memory())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert output == str(platform.libc_ver()[0] == "glibc" and sys.platform.startswith("linux"))
