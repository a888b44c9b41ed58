"""The default job's models stage (15 digits MLPs × 30 epochs) under the workload starfast chooses
(one thread, 8 seeds at once) against torch's default threads and one seed at a time, each on an
idle machine and with one core kept busy by another process (issue 23's target: the chosen
workload with one core busy at most 1.5× its idle time).

Run with ``pytest benchmarks/test_workload.py``; ``benchmarks/report.py`` turns the JSON into the
ratios. Each case is a fresh ``python -m starfast.train --stage models`` process (imports included,
as a user meets it) in its own run directory.
"""
import os
import subprocess
import sys

import pytest

WORKLOADS = {"chosen": [], "torch-default": ["--threads", str(os.cpu_count()), "--parallel-seeds", "1"]}


@pytest.fixture(params=["idle", "one-core-busy"])
def load(request):
    if request.param == "idle":
        yield request.param
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield request.param
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_default_models_stage(bench, tmp_path, workload, load):
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    counter = iter(range(100))

    def models_stage():
        run_dir = tmp_path / f"run-{next(counter)}"
        subprocess.run([sys.executable, "-m", "starfast.train", "--stage", "models", "--run-dir", str(run_dir), "--quiet",
                        *WORKLOADS[workload]], check=True, env=environment)

    bench(f"default models stage, {load}", "ours" if workload == "chosen" else "baseline", models_stage, rounds=2,
          warmup_rounds=0)
