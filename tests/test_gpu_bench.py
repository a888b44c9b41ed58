"""``make bench-gpu`` (benchmarks/gpu.py): its CPU rehearsal runs every step and writes a dated
section with the device's name; without a CUDA device the real run refuses cleanly."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
STEPS = ("1 tests", "2 self-check", "3 bandwidth", "4 Starlight epoch", "5 warm re-match", "6 barrier", "7 training throughput")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_step(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    done = run_script("--device", "cpu", "--results", str(results), "--tests", "test_permute_into_a_bank_row and cpu",
                      "--check-only", "versions")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    text = results.read_text()
    assert text.startswith("# earlier results\n"), "the section must be appended, not replace the file"
    assert "## GPU benchmark (`make bench-gpu`), " in text and "- **Device:** CPU" in text and "FAILED" not in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for step in STEPS:
        assert any(row.startswith(f"| {step} | (step) | ") for row in rows), f"no row for {step} in\n{text}"
    for figure in ("lerp_gather P = 100,000", "permute P = 400,000", "Starlight epoch, 3 sources", "re-match 3 sources",
                   "11-point barrier, 32 images", "regular training, fp32", "1 passed"):
        assert figure in text, f"no {figure!r} in\n{text}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the real run would start")
def test_without_a_gpu_the_real_run_says_so_and_does_nothing(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = run_script("--results", str(results))
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA device" in done.stdout and "--device cpu" in done.stdout, done.stdout
    assert not results.exists()
