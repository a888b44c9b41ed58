"""The workload a run asks of the machine (``--threads``, ``--parallel-seeds``): one thread and
stacked seeds for small MLP-family models on a CPU, torch's threads and one seed otherwise, the
user's choices (flags, ``OMP_NUM_THREADS``) kept, bad values refused, the choice printed once."""
import pytest
import torch

from starfast import models
from starfast.train import main
from starfast.workload import AUTO_PARALLEL_SEEDS, SMALL_MODEL_PARAMETERS, choose_workload

CPU = torch.device("cpu")


def build(name, **kwargs):
    return models.build(name, num_classes=10, in_channels=3 if name != "mlp" else 1,
                        input_shape=(3, 32, 32) if name != "mlp" else (1, 8, 8), **kwargs)


def test_small_mlps_run_one_thread_and_stacked_seeds_on_a_cpu():
    workload = choose_workload(build("mlp", width=24, depth=3), CPU, environment={})
    assert (workload.threads, workload.parallel_seeds) == (1, AUTO_PARALLEL_SEEDS)
    assert "3 intra-op" not in workload.describe() and "1 intra-op thread, 8 seeds trained at once" in workload.describe()


def test_models_without_a_stacked_path_train_one_seed_at_a_time():
    small_conv = build("resnet20", width=0.25)
    assert sum(p.numel() for p in small_conv.parameters()) < SMALL_MODEL_PARAMETERS
    workload = choose_workload(small_conv, CPU, environment={})
    assert (workload.threads, workload.parallel_seeds) == (1, 1)


def test_large_models_keep_torchs_threads():
    large = build("resnet18")
    assert sum(p.numel() for p in large.parameters()) >= SMALL_MODEL_PARAMETERS
    workload = choose_workload(large, CPU, environment={})
    assert (workload.threads, workload.parallel_seeds) == (torch.get_num_threads(), 1)


def test_the_users_choices_are_kept():
    mlp = build("mlp", width=24, depth=3)
    chosen = choose_workload(mlp, CPU, threads=3, parallel_seeds=2, environment={})
    assert (chosen.threads, chosen.parallel_seeds) == (3, 2) and "--threads" in chosen.reason
    from_environment = choose_workload(mlp, CPU, environment={"OMP_NUM_THREADS": "2"})
    assert from_environment.threads == torch.get_num_threads() and "OMP_NUM_THREADS=2" in from_environment.reason
    for flags in (dict(threads=0), dict(parallel_seeds=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            choose_workload(mlp, CPU, **flags, environment={})


def test_the_cli_prints_the_choice_once_and_refuses_bad_values(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        argv = ["--run-dir", str(tmp_path / "run"), "--sources", "2", "--heldout", "2", "--epochs", "1", "--stage", "models"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.count("workload: 1 intra-op thread, 8 seeds trained at once") == 1, out
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit):
            main([*argv, "--threads", "none"])
        assert "expected a whole number or auto" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main([*argv, "--parallel-seeds", "0"])
        assert "--parallel-seeds must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
