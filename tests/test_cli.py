"""First contact with the command lines: family names, suggestions, --help anywhere, and a
default dataset that needs nothing beyond the base install."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from starfast import models
from starfast.train import build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family, member", [("densenet", "densenet40"), ("resnet", "resnet18"), ("vgg", "vgg19"),
                                            ("wideresnet", "wrn"), ("WRN", "wrn"), ("vit", "vit"), ("mlp", "mlp"),
                                            ("DenseNet", "densenet40")])
def test_family_names_resolve_in_the_api_and_the_cli(family, member):
    assert models.canonical_name(family) == member
    assert build_parser().parse_args(["--arch", family]).arch == member


def test_an_alias_builds_the_same_model_as_its_member():
    alias, member = models.build("vgg", width=0.125), models.build("vgg19", width=0.125)
    assert [p.shape for p in alias.parameters()] == [p.shape for p in member.parameters()]


@pytest.mark.parametrize("flag, typo, suggestion", [("--arch", "desnet", "densenet"), ("--arch", "resnt20", "resnet20"),
                                                    ("--dataset", "digit", "digits"), ("--dataset", "cifar", "cifar10")])
def test_a_typo_gets_the_closest_name(capsys, flag, typo, suggestion):
    with pytest.raises(SystemExit) as exit_:
        main([flag, typo])
    assert exit_.value.code == 2
    assert f"did you mean '{suggestion}'?" in capsys.readouterr().err


def test_a_name_nothing_resembles_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown architecture 'transformer-xl'; choose one of: mlp, .*densenet40") as error:
        models.canonical_name("transformer-xl")
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize("argv", [["--arch", "densenet", "--help"], ["--arch", "nonsense", "-h"],
                                  ["--lr", "not-a-number", "--help"], ["--help", "--stage", "nowhere"]])
def test_help_is_printed_whatever_else_is_on_the_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "usage: python -m starfast.train" in capsys.readouterr().out


def test_evaluate_prints_help_before_checking_its_run_directory(tmp_path):
    done = subprocess.run([sys.executable, "-m", "starfast.evaluate", str(tmp_path / "absent"), "--ts", "x", "--help"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "usage: python -m starfast.evaluate" in done.stdout, done.stderr


BASE_INSTALL_PROBE = """
import json, re, sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

def name_of(requirement):
    return re.split(r"[ ;<>=!~\\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

allowed, todo = {"starfast"}, [name_of(r) for r in json.loads(sys.argv[1])]
while todo:  # the base dependencies and, transitively, their own non-extra requirements
    name = todo.pop()
    if name in allowed:
        continue
    allowed.add(name)
    try:
        todo += [name_of(r) for r in requires(name) or [] if "extra ==" not in r]
    except PackageNotFoundError:
        pass
owners = packages_distributions()

class BaseInstallOnly:
    # Imports of installed packages outside the base install fail, as they would without them.
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in owners and not {d.lower().replace("_", "-") for d in owners[top]} & allowed:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not in the base install)")
        return None

sys.meta_path.insert(0, BaseInstallOnly())
from starfast import data
dataset = data.load("digits")
print(dataset.name, dataset.num_train, dataset.num_test)
"""


def test_the_default_dataset_loads_with_only_the_base_dependencies():
    """In a fresh interpreter where every installed package outside the declared dependencies
    (and their own requirements) refuses to import, the default dataset still loads."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    done = subprocess.run([sys.executable, "-c", BASE_INSTALL_PROBE, json.dumps(dependencies)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:1] == ["digits"]


def test_the_probe_refuses_an_optional_package():
    dependencies = ["torch", "numpy", "scipy", "safetensors", "tqdm"]  # no scikit-learn
    done = subprocess.run([sys.executable, "-c", BASE_INSTALL_PROBE, json.dumps(dependencies)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "scikit-learn" in done.stderr


def test_a_failed_download_is_one_line_naming_what_to_do(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(url):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "data").mkdir()
    assert main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: cannot download https://") and "save it as" in error, error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_arch_kw_values_parse_as_bools_numbers_or_names():
    args = build_parser().parse_args(["--arch", "vgg11", "--arch-kw", "batchnorm=false", "--arch-kw", "activation=silu",
                                      "--arch-kw", "width=0.5", "--arch-kw", "depth=3", "--arch-kw", "bias=True"])
    assert dict(args.arch_kw) == {"batchnorm": False, "activation": "silu", "width": 0.5, "depth": 3, "bias": True}
    assert type(dict(args.arch_kw)["depth"]) is int
