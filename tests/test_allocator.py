"""Tests of starfast.allocator: after keep_freed_memory(), freeing and re-allocating a large
tensor reuses the same pages instead of faulting in fresh ones (page faults counted with
getrusage, in a subprocess so the setting does not leak into the test process), with base pages
and with transparent huge pages."""
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

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


def largest_page_size() -> int:
    """The largest page a fault can bring in: a transparent huge page where the kernel has them
    (2 MiB on x86-64), else the base page (4 KiB, 16 KiB or 64 KiB)."""
    huge = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    return int(huge.read_text()) if huge.exists() else resource.getpagesize()


# The block's pages come as base pages, or as transparent huge pages where the kernel uses them
# (THP "always", or "madvise" and glibc's hugetlb tunable, which makes malloc ask for them): one
# fault then brings in 2 MiB, so the counts below are bounded by the largest page, not 4 KiB.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings exist in glibc only")
@pytest.mark.parametrize("pages", ["default", "huge"])
def test_freed_large_blocks_are_reused_without_page_faults(pages):
    environment = dict(os.environ)
    if pages == "huge":
        environment["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"  # glibc >= 2.35; ignored before
    output = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True,
                            env=environment).stdout
    default, accepted, tuned = output.split()
    assert accepted == "True"
    fewest_faults = 64 * 1024 * 1024 // largest_page_size()  # the block in the largest pages
    # Medians over rounds, so that a page the kernel reclaims now and then does not count.
    assert int(default) > fewest_faults // 2, output  # by default every round faults its block in again
    assert int(tuned) < int(default) // 10, output  # after the switch the heap's pages are reused


def test_only_glibc_accepts_the_setting():
    output = subprocess.run(
        [sys.executable, "-c", "from starfast.allocator import keep_freed_memory; print(keep_freed_memory())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert output == str(platform.libc_ver()[0] == "glibc" and sys.platform.startswith("linux"))
