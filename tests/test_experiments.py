"""The experiments' sweep logic on tiny runs (digits, an MLP of 8 units, one-epoch recipes): run
directories and star sets shared between points and experiments, a second run that trains and
measures nothing, an interrupted cell that resumes, the launcher interface (a fake executor that
pickles what it is given, as a process pool or cluster does; submitit absent or faked), and the
summaries against brute-force recomputations."""
import itertools
import json
import pickle
import sys
import types

import pytest
import torch

from starfast import pipeline
from starfast.evaluation import EvaluationConfig, LoadedModel
from starfast.experiments import __main__ as cli
from starfast.experiments.catalog import EXPERIMENTS, Settings
from starfast.experiments.cells import cell_tasks
from starfast.experiments.launch import InProcess, LauncherError, make_executor, run_cells
from starfast.experiments.measure import StoredCurves, perturbed, summarise_pairs
from starfast.experiments.output import verdict
from starfast.experiments.plan import Perturbation, StarSet
from starfast.files import TEMP_PREFIX, TEMP_SUFFIX
from starfast.recipes import Recipe
from starfast.rundir import LOCK_NAME, RunDir
from starfast.starlight import StarlightOptions

SIZES = {"sources": 3, "heldout": 2, "star_seeds": 1}
# One epoch of 45 steps: enough for the models to learn something (a model that does not is refused).
RECIPE = Recipe(lr=0.05, weight_decay=0.0, epochs=1, batch_size=32)
SETTINGS = Settings("quick", "digits", "mlp", (("width", 8),), RECIPE, RECIPE)


@pytest.fixture
def counted(monkeypatch):
    """How many models and stars the pipeline trains."""
    calls = {"models": 0, "stars": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pipeline, "train_model", counting("models", pipeline.train_model))
    monkeypatch.setattr(pipeline, "train_star", counting("stars", pipeline.train_star))
    return calls


def sweep(name, values, root, sizes=SIZES, executor=None):
    cells = EXPERIMENTS[name].cells(SETTINGS, values, sizes)
    return run_cells(cell_tasks(name, cells, RunDir(root), progress=False), executor or InProcess())


def test_points_share_models_and_star_sets_and_a_second_run_trains_and_measures_nothing(tmp_path, counted):
    points, errors = sweep("sources", [2, 3], tmp_path)
    assert not errors and [point["star_set"] for point in points[""]] == ["stars/z0002-e1", "stars/z0003-e1"]
    assert counted == {"models": 5, "stars": 2}  # 3 sources and 2 held-out models, once for both points
    first = points[""]
    assert [point["measured_now"] for point in first] == [2 + 5, 2]  # the reference pairs are shared
    # Another experiment asking for the same star set (3 sources, default options) and pairs reuses them.
    shared, _ = sweep("t-sampling", ["uniform"], tmp_path)
    assert counted == {"models": 5, "stars": 2} and shared[""][0]["measured_now"] == 0
    again, errors = sweep("sources", [2, 3], tmp_path)
    assert not errors and counted == {"models": 5, "stars": 2}
    assert [point["measured_now"] for point in again[""]] == [0, 0]
    assert [point["barriers"] for point in again[""]] == [point["barriers"] for point in first]


def test_an_interrupted_cell_resumes_at_its_next_pair(tmp_path, counted, monkeypatch):
    store = StoredCurves.add
    calls = []

    def killed_at_the_third(*args, **kwargs):  # the third pair is measured, but killed before it is stored
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return store(*args, **kwargs)

    monkeypatch.setattr(StoredCurves, "add", killed_at_the_third)
    points, errors = sweep("grid", [11], tmp_path)
    assert points == {} and "killed" in errors[""]
    monkeypatch.setattr(StoredCurves, "add", store)
    points, errors = sweep("grid", [11], tmp_path)
    total = 1 * 2 + (1 + 2 * 2)  # star × held-out, held-out pairs and held-out × source pairs
    assert not errors and points[""][0]["measured_now"] == total - 2
    assert counted == {"models": 5, "stars": 1}
    curves = points[""][0]["curves"]
    assert len(curves["star_heldout"]) == 2 and len(curves["regular_regular"]) == 5


class FakeJob:
    def __init__(self, call):
        self.call = call

    def result(self):
        return self.call()


class FakeExecutor:
    """Takes a copy of each call through pickle, as a process pool or submitit does, and runs it
    when its result is asked for."""

    def __init__(self, fail=()):
        self.submitted = []
        self.fail = fail

    def submit(self, call):
        self.submitted.append(call)
        copy = pickle.loads(pickle.dumps(call))
        if call.cell.key in self.fail:
            return FakeJob(lambda: (_ for _ in ()).throw(RuntimeError("node lost")))
        return FakeJob(copy)


def test_launcher_interface_one_task_per_run_directory(tmp_path, counted):
    executor = FakeExecutor(fail=("depth=1",))
    values = [("width", 8), ("width", 12), ("depth", 1)]
    ticks = []
    cells = EXPERIMENTS["width-depth"].cells(SETTINGS, values, {"sources": 2, "heldout": 2, "star_seeds": 1})
    points, errors = run_cells(cell_tasks("width-depth", cells, RunDir(tmp_path), progress=False), executor,
                               on_point=lambda: ticks.append(1))
    assert [task.cell.key for task in executor.submitted] == ["", "width=12", "depth=1"]
    assert [task.folder for task in executor.submitted] == [str(tmp_path), str(tmp_path / "variants" / "width=12"),
                                                             str(tmp_path / "variants" / "depth=1")]
    assert all(task.on_point is None for task in executor.submitted)  # nothing unpicklable travels
    assert set(points) == {"", "width=12"} and errors == {"depth=1": "RuntimeError: node lost"}
    assert len(ticks) == 2  # one per finished point
    assert json.loads((tmp_path / "variants" / "width=12" / "config.json").read_text())["model"]["kwargs"] == {"width": 12}


def test_submitit_is_optional_and_resubmits_a_preempted_cell(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(LauncherError, match="pip install submitit"):
        make_executor("submitit", folder=tmp_path)
    with pytest.raises(LauncherError, match="submitit only"):
        make_executor("local", options={"timeout_min": 5})

    class AutoExecutor:
        def __init__(self, folder):
            self.folder, self.parameters = folder, {}

        def update_parameters(self, **parameters):
            self.parameters.update(parameters)

    class DelayedSubmission:
        def __init__(self, function, *args, **kwargs):
            self.function, self.args = function, args

    fake = types.ModuleType("submitit")
    fake.AutoExecutor, fake.helpers = AutoExecutor, types.SimpleNamespace(DelayedSubmission=DelayedSubmission)
    monkeypatch.setitem(sys.modules, "submitit", fake)
    executor = make_executor("submitit", folder=tmp_path, options={"timeout_min": 5})
    assert executor.folder == str(tmp_path) and executor.parameters == {"timeout_min": 5}
    cells = EXPERIMENTS["sources"].cells(SETTINGS, [2], SIZES)
    task = cell_tasks("sources", cells, RunDir(tmp_path))[0]
    resubmitted = task.checkpoint()
    assert resubmitted.function == task and resubmitted.args == ()


def test_cli_writes_three_files_and_a_second_invocation_trains_nothing(tmp_path, counted, capsys):
    argv = ["sources", "--run-dir", str(tmp_path), "--epochs", "1", "--star-epochs", "1", "--arch-kw", "width=8",
            "--values", "2,3", "--sources", "3", "--heldout", "2", "--star-seeds", "1", "--quiet"]
    assert cli.main(argv) == 0
    folder = tmp_path / "experiments" / "sources-epochs=1-star_epochs=1"  # beside the preset's results
    assert {path.name for path in folder.iterdir()} >= {"results.json", "table.md", "figure.png"}
    assert counted == {"models": 5, "stars": 2}
    assert cli.main(argv) == 0
    assert counted == {"models": 5, "stars": 2}
    results = json.loads((folder / "results.json").read_text())
    assert results["curves_measured_now"] == 0 and results["verdict"] in (folder / "table.md").read_text()
    assert results["verdict"] in capsys.readouterr().out


def test_summaries_against_a_brute_force_recount(rng):
    heldout = [f"heldout seed {1000 + k}" for k in range(4)]
    others = heldout + ["sources seed 0", "sources seed 1"]
    curves = []
    for a, b in itertools.combinations(others, 2):
        barriers = torch.rand(4, generator=rng, dtype=torch.float64).tolist()
        curves.append({"a": a, "b": b, "loss_barrier": {"train": barriers[0], "test": barriers[1]},
                       "acc_barrier": {"train": barriers[2], "test": barriers[3]}})
    summary = summarise_pairs(curves, heldout)
    for split in ("train", "test"):
        expected = {label: [c["loss_barrier"][split] for c in curves if label in (c["a"], c["b"])] for label in heldout}
        means = {label: sum(values) / len(values) for label, values in expected.items()}
        got = summary[split]["per_heldout"]
        mismatch = max(abs(got[label] - means[label]) for label in heldout)
        print(f"{split}: largest per-model mismatch {mismatch:.2e}")
        assert mismatch <= 1e-12
        over = torch.tensor(list(means.values()), dtype=torch.float64)
        assert abs(summary[split]["over_heldout"]["std"] - over.std(unbiased=False).item()) <= 1e-12
        assert summary[split]["pairs"]["min"] == min(c["loss_barrier"][split] for c in curves)


def test_perturbed_stars_lie_on_the_sphere(rng):
    star = LoadedModel("star star-0000", torch.randn(500, generator=rng), {}, "digest", seed=0)
    for radius in (2.0, 16.0):
        points = perturbed(star, Perturbation(radius, samples=3))
        distances = [float((point.row.double() - star.row.double()).norm()) for point in points]
        # float32 rounding of each element of star + ε·r: at most half an ulp of the larger magnitude
        tolerance = 2 ** -23 * float(star.row.double().abs().max() + radius) * 500 ** 0.5
        print(f"radius {radius}: distances {distances}, tolerance {tolerance:.2e}")
        assert all(abs(distance - radius) <= tolerance for distance in distances)
        assert len({point.digest for point in points}) == 3


def test_names_spell_the_settings_and_defaults_share_the_base_run():
    recipe = Recipe(epochs=30)
    assert StarSet(10, 3).name(recipe) == "z0010-e30"
    assert StarSet(10, 3, StarlightOptions(t_sampling="beta", ce_weight=1.0)).name(recipe) == "z0010-e30-t_sampling=beta-ce_weight=1"
    base = SETTINGS.run(sources=3, heldout=2)
    assert SETTINGS.run(sources=5, heldout=2, arch_kw={"activation": "relu"}).slug(base) == ""  # mlp's default
    assert SETTINGS.run(sources=3, heldout=2, arch_kw={"activation": "elu"}).slug(base) == "activation=elu"
    assert SETTINGS.run(sources=3, heldout=2, recipe={"optimizer": "adam", "lr": 1e-3}).slug(base) == "optimizer=adam_lr=0.001"


def test_cleanup_removes_only_starfasts_own_temporary_files_and_not_a_nested_runs(tmp_path):
    base = RunDir(tmp_path)
    variant = base.variant("width=12")
    variant.path.mkdir(parents=True)
    (variant.path / LOCK_NAME).write_text("pid 1\n")
    ours, theirs = tmp_path / f"{TEMP_PREFIX}a{TEMP_SUFFIX}", variant.path / f"{TEMP_PREFIX}b{TEMP_SUFFIX}"
    users = [tmp_path / f".notes{TEMP_SUFFIX}", tmp_path / "sources" / f".draft{TEMP_SUFFIX}"]  # not starfast's names
    for path, text in ((ours, "x"), (theirs, "y"), *((user, "mine") for user in users)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with base.locked("test"):
        pass
    assert not ours.exists() and theirs.exists()
    assert all(user.read_text() == "mine" for user in users), "cleanup removed a user's own .tmp file"


def test_every_experiment_builds_its_cells_for_both_presets():
    for experiment in EXPERIMENTS.values():
        for preset in ("quick", "paper"):
            settings = experiment.settings(preset)
            cells = experiment.cells(settings, experiment.values[preset], experiment.sizes[preset])
            assert sum(len(cell.points) for cell in cells) == len(experiment.values[preset])
            assert len({cell.key for cell in cells}) == len(cells)
            assert all(cell.run.dataset == ("digits" if preset == "quick" else "cifar10") for cell in cells)
    paper_widths = EXPERIMENTS["width-depth"].settings("paper")
    assert (paper_widths.arch, paper_widths.recipe.epochs, paper_widths.star_recipe.epochs) == ("wrn", 200, 200)
    quick = EXPERIMENTS["grid"].settings("quick")
    assert (quick.arch, dict(quick.arch_kw), quick.recipe.epochs, quick.star_recipe.epochs) == ("mlp", {"depth": 3, "width": 24}, 30, 90)
    assert EXPERIMENTS["sources"].settings("quick").star_recipe.epochs == 180
    assert EXPERIMENTS["sources"].settings("quick", star_epochs=90).star_recipe.epochs == 90


def test_optimizer_experiment_measures_the_star_against_an_extra_set_of_its_own_recipe():
    cells = EXPERIMENTS["optimizer"].cells(SETTINGS, ["sgd", "adam"], {"sources": 3, "heldout": 2, "star_seeds": 1})
    (cell,) = cells
    (extra,) = cell.run.extra_sets
    assert (extra.name, extra.count, extra.recipe.optimizer, extra.recipe.lr) == ("adam", 2, "adam", 1e-3)
    assert extra.recipe.epochs == RECIPE.epochs and cell.run.recipe == RECIPE
    sgd, adam = cell.points
    assert sgd.heldout_set is None and adam.heldout_set == "adam" and adam.reference_sources == 0
    assert sgd.stars == adam.stars  # one star set, measured against both


def test_stored_curves_are_keyed_by_the_models_and_the_settings_that_differ_from_the_defaults(tmp_path):
    run = RunDir(tmp_path)
    a, b = (LoadedModel(label, torch.zeros(1), {}, digest) for label, digest in (("a", "1"), ("b", "2")))
    default = StoredCurves(run, EvaluationConfig())
    default.add(a, b, {"a": "a", "b": "b"})
    assert StoredCurves(run, EvaluationConfig(ts=11, batch_size=500)).get(a, b) == {"a": "a", "b": "b"}
    assert StoredCurves(run, EvaluationConfig(ts=21)).get(a, b) is None
    assert default.get(b, a) is None  # the direction matters: b is matched onto a


def test_the_verdict_reads_the_trend_step_by_step():
    def point(label, star, regular=0.1, star_loss=0.01):
        summary = lambda mean: {"train": {"over_heldout": {"mean": mean, "std": 0.0}}}  # noqa: E731
        return {"label": label, "value": label, "barriers": {"star_heldout": summary(star), "regular_regular": summary(regular)},
                "star_loss": {"train": {"mean": star_loss}}, "regular_loss": {"train": {"mean": 0.01}}}

    sources = EXPERIMENTS["sources"]
    assert verdict(sources, [point("2", 0.05), point("5", 0.04), point("10", 0.03)]).endswith("the paper's trend holds here")
    assert "only in part" in verdict(sources, [point("2", 0.05), point("5", 0.03), point("10", 0.04)])
    assert "(1 of 2 steps down)" in verdict(sources, [point("2", 0.05), point("5", 0.03), point("10", 0.04)])
    assert verdict(sources, [point("2", 0.05), point("5", 0.12)]).endswith("does not hold here")
    assert "below regular–regular at 1 of 2 points" in verdict(EXPERIMENTS["grid"], [point("11", 0.05), point("21", 0.2)])
    broken = verdict(EXPERIMENTS["perturbation"], [point("ε = 2", 0.05), point("ε = 16", 0.0, star_loss=0.03)])
    assert "above 2× the regular models' at ε = 16" in broken and broken.endswith("does not hold here")
    with_control = [point("wm", 0.05), point("none", 0.2)]
    with_control[1]["value"], with_control[0]["value"] = "none", "wm"
    line = verdict(EXPERIMENTS["matcher"], with_control)
    assert "at 1 of 1 points" in line and "control none (not the paper's claim): star–held-out 2.00× regular–regular, " \
                                          "star loss 1× the regular models'" in line
    assert line.endswith("the paper's trend holds here")


def test_a_rerun_with_a_failed_cell_leaves_the_complete_results_as_they_were(tmp_path, capsys):
    """A variant directory held by another process makes its cell fail: the rerun exits 1 and
    writes its partial outputs to NAME/incomplete/, never over the complete ones; a complete rerun
    then supersedes the incomplete folder."""
    import fcntl

    argv = ["activation", "--run-dir", str(tmp_path), "--epochs", "1", "--star-epochs", "1", "--arch-kw", "width=8",
            "--values", "relu,elu", "--sources", "2", "--heldout", "2", "--star-seeds", "1", "--quiet"]
    assert cli.main(argv) == 0
    folder = tmp_path / "experiments" / "activation-epochs=1-star_epochs=1"
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    assert set(before) >= {"results.json", "table.md"}
    variant = RunDir(tmp_path).variant("activation=elu")
    with open(variant.path / LOCK_NAME, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process at work there
        assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert "is in use by another starfast process" in error and f"partial results are in {folder / 'incomplete'}" in error
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    partial = json.loads((folder / "incomplete" / "results.json").read_text())
    assert [point["label"] for point in partial["points"]] == ["relu"] and list(partial["failed"]) == ["activation=elu"]
    assert cli.main(argv) == 0
    assert not (folder / "incomplete").exists()
    assert len(json.loads((folder / "results.json").read_text())["points"]) == 2


def test_an_interrupted_publication_of_an_experiment_is_finished_or_dropped_as_a_unit(tmp_path):
    """Killed after its mark: the next process moves the new files in and removes the old figure the
    new run did not draw. Killed before it: the pending files are dropped, the old ones stay."""
    run, folder = RunDir(tmp_path), tmp_path / "experiments" / "grid"
    folder.mkdir(parents=True)
    for name, text in (("results.json", "{}"), ("table.md", "old"), ("figure.png", "old figure")):
        (folder / name).write_text(text)
    pending = folder / ".pending"
    pending.mkdir()
    (pending / "half.md").write_text("half")
    with run.locked("test"):
        pass
    assert not pending.exists() and (folder / "figure.png").read_text() == "old figure"
    pending.mkdir()
    (pending / "results.json").write_text('{"new": 1}')
    (pending / "table.md").write_text("new")
    (pending / "complete.json").write_text('{"files": ["results.json", "table.md"], "stale": ["figure.png"]}')
    with run.locked("test"):
        pass
    assert sorted(path.name for path in folder.iterdir()) == ["results.json", "table.md"]
    assert (folder / "table.md").read_text() == "new"


@pytest.mark.slow
def test_workers_end_with_a_launcher_killed_by_sigterm(tmp_path):
    """SIGTERM to ``--workers 2`` used to leave both workers and the resource tracker running."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    def children(pid):
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies have ended
        except OSError:
            return False

    launcher = subprocess.Popen([sys.executable, "-m", "starfast.experiments", "activation", "--run-dir", str(tmp_path),
                                 "--workers", "2", "--epochs", "400", "--arch-kw", "width=8", "--sources", "2",
                                 "--heldout", "2", "--star-seeds", "1", "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(children(launcher.pid)) < 3:  # two workers and the resource tracker
            assert time.monotonic() < deadline and launcher.poll() is None, "the workers never started"
            time.sleep(0.2)
        spawned = children(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
    finally:
        launcher.kill()
    # A worker still importing torch on a busy machine notices only once its initializer runs.
    deadline = time.monotonic() + 120
    while [pid for pid in spawned if alive(pid)]:
        assert time.monotonic() < deadline, f"still running 120 s after the launcher ended: {[pid for pid in spawned if alive(pid)]}"
        time.sleep(0.2)
