"""User architectures in the CLI (issue 21 part 5): ``--arch file.py:factory`` and
``--arch package.module:factory``, the factory's arguments, the run directory's record of the
file and the spec, and the change that stops a later run."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from starfast import models, permute_model
from starfast.files import StoredFileError
from starfast.models import ModelSpec
from starfast.models.factory import (
    build_user_model, load_factory, normalised_reference, spec_for_user_model, spec_fingerprint,
)
from starfast.rundir import RunDir
from starfast.train import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_net.py"

RECORDING_FACTORY = '''
from torch import nn
from starfast import models
received = []

def record(num_classes, width, **options):
    received.append({"num_classes": num_classes, "width": width, **options})
    return models.build("mlp", num_classes, input_shape=(64,), width=width)

def strict(input_shape, width=3):
    received.append({"input_shape": input_shape, "width": width})
    return nn.Linear(input_shape[-1], 2)

def not_a_model():
    return 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(RECORDING_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_factories.py"


def test_the_factory_gets_the_options_and_only_the_shapes_it_names(factories):
    module = load_factory("my_factories:record")[0].__globals__
    model = build_user_model("my_factories:record", 10, 1, (1, 8, 8), {"width": 5, "depth": 2})
    assert module["received"] == [{"num_classes": 10, "width": 5, "depth": 2}]
    assert [group.size for group in models.permutation_spec(model).groups] == [5, 5]  # the spec recorded for it
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['depth'\]; it takes: width"):
        build_user_model("my_factories:strict", 10, 1, (6,), {"depth": 2})
    with pytest.raises(ValueError, match="returned a int, not a torch.nn.Module"):
        build_user_model("my_factories:not_a_model", 10, 1, (6,), {})


def test_a_file_reference_is_made_absolute_and_loaded_from_the_file(factories, monkeypatch):
    monkeypatch.chdir(factories.parent)
    reference = normalised_reference("my_factories.py:record")
    assert reference == f"{factories}:record"
    factory, path = load_factory(reference)
    assert path == factories and factory.__name__ == "record"


@pytest.mark.parametrize("reference, message", [
    ("{folder}/my_factories.py:nope", "defines no function 'nope'; it defines not_a_model, record, strict"),
    ("{folder}/absent.py:make", "absent.py is not a file"),
    ("no_such_package.module:make", "cannot import module 'no_such_package.module'"),
    ("{folder}/my_factories.py:", "neither an architecture name nor a factory"),
])
def test_a_factory_that_does_not_exist_is_one_line(factories, capsys, reference, message):
    argv = ["--arch", reference.format(folder=factories.parent), "--run-dir", str(factories.parent / "run")]
    with pytest.raises(SystemExit):
        main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "--arch" in error, error


def test_the_example_spec_is_recorded_and_preserves_the_function(rng):
    spec = ModelSpec("%s:make_net" % EXAMPLE, 10, 1, (1, 8, 8), {"channels": 6, "hidden": 7})
    model = spec.build().double().eval()
    permutation_spec = models.permutation_spec(model)
    assert [group.size for group in permutation_spec.groups] == [6, 6, 7]
    for module in (model.bn1, model.bn2):  # non-trivial statistics, so BatchNorm's axes matter
        module.running_mean.normal_(generator=rng)
        module.running_var.uniform_(0.5, 2.0, generator=rng)
    permuted = permute_model(model, permutation_spec, permutation_spec.random(rng))
    inputs = torch.randn(5, 1, 8, 8, generator=rng, dtype=torch.float64)
    difference = (model(inputs) - permuted(inputs)).abs().max().item()
    assert difference < 1e-12, f"the example's spec changes the function by {difference}"
    assert not torch.equal(model.conv1.weight, permuted.conv1.weight)


def test_the_run_directory_records_the_factory_and_stops_when_it_changes(tmp_path, capsys):
    network = tmp_path / "net.py"
    shutil.copy(EXAMPLE, network)
    argv = ["--arch", f"{network}:make_net", "--arch-kw", "channels=8", "--run-dir", str(tmp_path / "run"),
            "--stage", "models", "--sources", "1", "--heldout", "1", "--epochs", "2", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    run = RunDir(tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    model = run.build_model("sources", 0)
    assert recorded["arch"] == f"{network}:make_net" and recorded["kwargs"] == {"channels": 8}
    assert recorded["source"] == {
        "file": str(network), "sha256": hashlib.sha256(network.read_bytes()).hexdigest(),
        "spec": spec_fingerprint(model.permutation_spec()), "groups": {"conv1": 8, "conv2": 8, "fc": 32},
    }
    assert main(argv) == 0  # unchanged: reused

    network.write_text(network.read_text().replace("hidden: int = 32", "hidden: int = 40"))
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"its file {network} changed" in error and "spec changed (fc 32 -> 40)" in error
    with pytest.raises(StoredFileError, match=r"spec changed \(fc 32 -> 40\) since the models were made"):
        run.build_model("sources", 0)


def test_a_model_without_a_spec_is_refused_until_the_tracer_is_merged():
    # When trace_spec lands, spec_for_user_model traces such a model instead: this test then goes.
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with pytest.raises(ValueError, match="no permutation spec is known for Sequential"):
        spec_for_user_model(bare, torch.zeros(2, 1, 8, 8))
