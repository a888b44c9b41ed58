"""``python -m starfast.check``: it passes on this machine from the installed tree (saying what it
could not check), and a deliberately broken op or solver makes it fail, naming the check."""
import subprocess
import sys

import pytest
import torch

from starfast import check, ops


@pytest.mark.slow
def test_check_passes_here_and_says_what_it_did_not_check():
    done = subprocess.run([sys.executable, "-m", "starfast.check"], capture_output=True, text=True, timeout=600)
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output}\n{done.stderr}"
    lines = output.splitlines()
    assert lines[0].startswith("python -m starfast.check (seed "), lines[0]
    assert lines[-1].startswith("summary: ") and " 0 failed" in lines[-1], lines[-1]
    for expected in ("info  torch: ", "ok    compiled core: loaded from ", "ok    permute cpu float16 (int32 index): ",
                     "ok    lerp_gather cpu bfloat16: ", "ok    opcheck cpu: ", "ok    gradcheck cpu lerp_gather: ",
                     "info  bandwidth cpu: lerp_gather ", "ok    linear_assignment cpu wm 4 x 64x64: ", "ok    end-to-end "):
        assert any(line.startswith(expected) for line in lines), f"no line starting {expected!r} in\n{output}"
    if not torch.cuda.is_available():
        for name in ("permute cuda", "lerp_gather cuda", "opcheck cuda", "gradcheck cuda", "bandwidth cuda"):
            assert f"skip  {name}: {check.NO_CUDA}" in lines, f"no skip line for {name} in\n{output}"
    # Every line after the header is one check in the documented form, until the summary.
    assert all(line.split("  ")[0].strip() in check.STATUSES for line in lines[1:-1]), output


def test_a_wrong_op_fails_naming_the_check(monkeypatch, capsys):
    real = ops.lerp_gather

    def off_by_a_little(theta, bank, n, index, t):
        out = real(theta, bank, n, index, t)
        return out + (out.abs().max() * 1e-3 if theta.dtype == torch.float32 else 0)

    monkeypatch.setattr(ops, "lerp_gather", off_by_a_little)
    assert check.main(["--only", "ops", "--seed", "1"]) == 1
    output = capsys.readouterr().out
    failed = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert failed and all(line.startswith("FAIL  lerp_gather cpu float32") for line in failed), output
    assert "elements differ" in failed[0] and "FAILED: lerp_gather cpu float32" in output, output
    assert "ok    lerp_gather cpu float64" in output and "ok    permute cpu float32 (int64 index)" in output, output


def test_a_crashing_solver_is_one_failed_line_and_the_other_checks_run(monkeypatch, capsys):
    def broken(cost, maximize=False):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(check, "linear_assignment", broken)
    assert check.main(["--only", "lap", "--only", "extension", "--seed", "2"]) == 1
    output = capsys.readouterr().out
    assert "FAIL  lap: RuntimeError: solver exploded (at test_check.py:" in output, output
    assert "compiled core" in output and "FAILED: lap" in output, output
