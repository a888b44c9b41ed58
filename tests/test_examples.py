"""The two workflows of the README's "Your own models" (issue 21 part 8), with tiny epochs: the
example network trained by starfast (``--arch examples/digits_net.py:make_net``), and checkpoints
written by the example's plain PyTorch script imported with ``--sources-from``/``--heldout-from``."""
import json
import runpy
import sys
from pathlib import Path

import torch

from starfast.rundir import RunDir
from starfast.train import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
QUICK = ["--star-seeds", "1", "--star-epochs", "1", "--ts", "3", "--heldout-source-pairs", "0", "--quiet"]


def test_starfast_trains_the_example_network(tmp_path, capsys):
    argv = ["--arch", f"{EXAMPLES / 'digits_net.py'}:make_net", "--arch-kw", "channels=8", "--sources", "2",
            "--heldout", "2", "--epochs", "2", "--run-dir", str(tmp_path / "run"), *QUICK]
    assert main(argv) == 0, capsys.readouterr().err
    assert "\nverdict: star–held-out barrier " in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    assert results["counts"]["stars"] == 1 and results["model"]["arch"].endswith("digits_net.py:make_net")


def test_checkpoints_of_the_plain_script_are_imported(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/train_plain.py` puts its folder first
    monkeypatch.setattr(sys, "argv", ["train_plain.py", "--out", str(tmp_path / "checkpoints"), "--sources", "2",
                                      "--heldout", "2", "--epochs", "2", "--channels", "8"])
    runpy.run_path(str(EXAMPLES / "train_plain.py"), run_name="__main__")
    assert "checkpoints/heldout/net-100.pt: test accuracy" in capsys.readouterr().out
    written = torch.load(tmp_path / "checkpoints" / "sources" / "net-0.pt", weights_only=True)
    assert written["epoch"] == 2 and all(name.startswith("module.") for name in written["state_dict"])  # users' way

    argv = ["--arch", f"{EXAMPLES / 'digits_net.py'}:make_net", "--arch-kw", "channels=8",
            "--sources-from", str(tmp_path / "checkpoints" / "sources" / "*.pt"),
            "--heldout-from", str(tmp_path / "checkpoints" / "heldout"), "--run-dir", str(tmp_path / "run"), *QUICK]
    assert main(argv) == 0, capsys.readouterr().err
    assert "\nverdict: star–held-out barrier " in capsys.readouterr().out
    run = RunDir(tmp_path / "run")
    assert run.read_metadata("heldout", 1000)["imported_from"]["path"] == str(tmp_path / "checkpoints" / "heldout" / "net-100.pt")
    model = run.build_model("sources", 1)
    stored = {name[len("module."):]: tensor for name, tensor in
              torch.load(tmp_path / "checkpoints" / "sources" / "net-1.pt", weights_only=True)["state_dict"].items()}
    assert all(torch.equal(tensor, stored[name]) for name, tensor in model.state_dict().items())
