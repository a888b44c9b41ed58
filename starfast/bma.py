"""Bayesian model averaging over the star domain (Section 4.1 and Figure 4 of the paper).

The posterior is the union of the segments between the star θ* and its sources Z, each source
weight-matched onto the star: a sample is ``(1 - t) θ* + t π_n(θ_n)`` with ``n ~ Unif(Z)`` and
``t ~ Unif[0, 1]``. This module owns

- :class:`StarDomain`: θ*, the sources as bank rows and the permutations matching them onto θ*
  (one batched :func:`~starfast.matching.match_weights`); :meth:`StarDomain.draw` draws ``(n, t)``
  from a seeded generator (:func:`starfast.starlight.sample_draws`), :meth:`StarDomain.rows` builds
  the samples with :func:`~starfast.ops.lerp_gather` as one ``[K, P]`` bank;
- :func:`nested_predictions`: the averaged softmax outputs of the first ``S`` rows of a bank, for
  every ``S = 1..K`` at once (one pass of :func:`starfast.bank.run_bank` over the data), summarised
  per example (:mod:`starfast.calibration`); the same rows serve every ``S``, so the curves are
  nested;
- :func:`bayesian_model_averaging`: Figure 4 for a run directory: ``K`` star-domain samples, their
  BatchNorm statistics recomputed exactly and together (:func:`starfast.bn.recompute_bn`, as the
  barrier code does), against the deep ensembles of the star's sources and of the held-out models
  (which the star never saw; each with its own statistics), with accuracy, NLL, ECE and the two
  AUROCs on the test set for every ``S``; :func:`write_bma` stores ``RUN/results/bma.json``,
  ``bma.md`` and ``bma.png``.

The ensembles take the models in seed order (source seeds 0, 1, ...), so ensemble ``S`` holds the
first ``S``; they stop at the number of models the run has.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from starfast import calibration, models
from starfast.bank import Data, check_bank, run_bank
from starfast.barrier import _check_buffers
from starfast.bn import batchnorm_buffer_names, recompute_bn
from starfast.calibration import PerExample
from starfast.evaluation import LoadedModel, counted_seeds, load_models, load_stars, own_sources
from starfast.flat import ParamSpace
from starfast.matching import match_weights
from starfast.ops import lerp_gather
from starfast.progress import progress_bar
from starfast.files import write_json
from starfast.rundir import RunDir, RunDirError
from starfast.spec import PermutationSpec
from starfast.starlight import Draw, sample_draws

METHODS = ("star_domain", "source_ensemble", "heldout_ensemble")
METRICS = ("accuracy", "nll", "ece", "auroc_max_prob", "auroc_entropy")


@dataclass
class StarDomain:
    """The star ``theta`` ``[P]``, its sources ``bank`` ``[N, P]`` (as trained, unpermuted) with
    their ``seeds``, and the matches onto the star: ``perms`` (group -> ``[N, size]``) and
    ``index_maps`` ``[N, P]`` (``permute(bank[n], index_maps[n])`` is source ``n`` aligned)."""

    theta: torch.Tensor
    bank: torch.Tensor
    seeds: List[int]
    perms: Dict[str, torch.Tensor]
    index_maps: torch.Tensor

    @classmethod
    def matched(
        cls,
        theta: torch.Tensor,
        bank: torch.Tensor,
        spec: PermutationSpec,
        space: ParamSpace,
        seeds: Sequence[int],
        *,
        max_iter: int = 100,
        init: Optional[str] = None,
    ) -> "StarDomain":
        """Weight-match every source in ``bank`` onto ``theta`` (all at once)."""
        if bank.dim() != 2 or bank.shape[0] != len(seeds):
            raise ValueError(f"bank must be [N, P] with one row per seed; got {list(bank.shape)} and {len(seeds)} seeds")
        result = match_weights(theta, bank, spec, space=space, max_iter=max_iter, init=init)
        return cls(theta, bank, list(seeds), result.perms, result.index_maps)

    def draw(self, count: int, seed: int) -> List[Draw]:
        """``count`` posterior draws ``(n, t)``: ``n ~ Unif{0..N-1}``, ``t ~ Unif[0, 1]``, from a CPU
        generator seeded with ``seed`` (the same seed gives the same draws)."""
        if count < 1:
            raise ValueError(f"the number of posterior samples must be >= 1, got {count}")
        return sample_draws(self.bank.shape[0], count, "uniform", torch.Generator().manual_seed(seed))

    def rows(self, draws: Sequence[Draw]) -> torch.Tensor:
        """The samples ``(1 - t) θ* + t π_n(θ_n)`` of ``draws`` as a ``[K, P]`` bank."""
        rows = torch.empty(len(draws), self.theta.shape[0], dtype=self.theta.dtype, device=self.theta.device)
        for k, (n, t) in enumerate(draws):
            rows[k] = lerp_gather(self.theta, self.bank, n, self.index_maps[n], t)
        return rows


@torch.no_grad()
def nested_predictions(
    skeleton: nn.Module,
    rows: torch.Tensor,
    buffers: Optional[Mapping[str, torch.Tensor]],
    data: Data,
    *,
    space: Optional[ParamSpace] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    argument: str = "data",
) -> PerExample:
    """For every ``S = 1..K``: the average of the first ``S`` rows' class probabilities on
    ``data``, summarised per example; a :class:`~starfast.calibration.PerExample` ``[K, N]``.

    ``rows`` ``[K, P]`` run in eval mode with ``buffers`` (per-row BatchNorm statistics
    ``{name: [K, ...]}``, e.g. from :func:`~starfast.bn.recompute_bn` or
    :func:`own_statistics`; ``None`` only for models without them). ``space``, ``chunk_size``,
    ``memory_budget_bytes``: as in :func:`starfast.bn.recompute_bn`.
    """
    space, bank, _ = check_bank(skeleton, rows, space, "rows")
    per_model = _check_buffers(skeleton, buffers, bank, False)
    sizes = torch.arange(1, bank.shape[0] + 1, dtype=torch.float64, device=bank.device).view(-1, 1, 1)
    parts: List[PerExample] = []

    def accumulate(outputs: torch.Tensor, y: torch.Tensor) -> None:
        probabilities = calibration.class_probabilities(outputs)  # [K, B, C]
        parts.append(calibration.summarise(probabilities.cumsum(0) / sizes, y))

    run_bank(
        skeleton, space, bank, per_model, data,
        on_outputs=accumulate, argument=argument, chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
    )
    return PerExample.cat(parts)


def own_statistics(skeleton: nn.Module, states: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The BatchNorm running statistics stored in each state dict, stacked ``{name: [K, ...]}``."""
    statistics = {}
    for name in batchnorm_buffer_names(skeleton):
        missing = [k for k, state in enumerate(states) if name not in state]
        if missing:
            raise RunDirError(f"model {missing[0]} has no BatchNorm statistic {name!r}; retrain it")
        statistics[name] = torch.stack([state[name] for state in states])
    return statistics


def curve(summary: PerExample, backend: Optional[str] = None) -> Dict[str, List[Optional[float]]]:
    """The metrics of each row of a nested ``[S, N]`` summary: ``{"models": [1..S], metric: [...]}``."""
    per_size = [calibration.classification_metrics(summary[s], backend=backend) for s in range(summary.confidence.shape[0])]
    return {"models": list(range(1, len(per_size) + 1)), **{name: [m[name] for m in per_size] for name in METRICS}}


# -- a run directory --------------------------------------------------------------------------------


@dataclass
class BMAConfig:
    """``samples``: K (the largest number of models averaged); ``seed``: of the posterior draws;
    the rest as in :class:`starfast.evaluation.EvaluationConfig`."""

    samples: int = 19
    seed: int = 0
    batch_size: int = 500
    bn_batches: Optional[int] = None
    match_max_iter: int = 100
    match_init: Optional[str] = None


def bayesian_model_averaging(
    run: RunDir,
    dataset: Any,
    *,
    config: BMAConfig = BMAConfig(),
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> Dict[str, Any]:
    """Figure 4 for the run's first star (see the module docstring); a JSON-ready dict."""
    started = time.perf_counter()
    if config.samples < 1:
        raise ValueError(f"--bma-samples must be >= 1, got {config.samples}")
    model_spec = run.model_spec()
    skeleton = model_spec.build().to(device)
    space, spec = ParamSpace(skeleton), models.permutation_spec(skeleton)
    seeds = counted_seeds(run)
    stars = load_stars(run, space, device, seeds=seeds["star"])
    if not stars:
        raise RunDirError(f"{run.star_path(0).parent} holds no finished star; train one with python -m starfast.train --stage star")
    star = stars[0]
    sources = own_sources(star, load_models(run, "sources", space, device, seeds["sources"]))
    if not sources:
        raise RunDirError(f"the sources of {star.label} ({star.sources}) are not in {run.path / 'sources'}")
    heldout = load_models(run, "heldout", space, device, seeds["heldout"])
    train_data = lambda: dataset.eval_batches("train", config.batch_size)  # noqa: E731
    test_data = lambda: dataset.eval_batches("test", config.batch_size)  # noqa: E731
    ensembles = {"source_ensemble": sources[: config.samples], "heldout_ensemble": heldout[: config.samples]}
    bar = progress_bar(total=2 + sum(1 for members in ensembles.values() if members), desc="bma", unit="step", enabled=progress)

    domain = StarDomain.matched(
        star.row, torch.stack([source.row for source in sources]), spec, space, [source.seed for source in sources],
        max_iter=config.match_max_iter, init=config.match_init,
    )
    draws = domain.draw(config.samples, config.seed)
    rows = domain.rows(draws)
    buffers = recompute_bn(skeleton, rows, train_data, space=space, max_batches=config.bn_batches, argument="train_data")
    bar.update(1)
    predictions = {"star_domain": nested_predictions(skeleton, rows, buffers, test_data, space=space, argument="test_data")}
    bar.update(1)
    for method, members in ensembles.items():
        if members:
            predictions[method] = _ensemble_predictions(skeleton, space, members, test_data)
            bar.update(1)
    bar.close()

    backend = calibration.default_backend()
    return {
        "dataset": dataset.name,
        "arch": model_spec.arch,
        "model": model_spec.to_dict(),
        "star": star.label,
        "star_sources": domain.seeds,
        "draws": [{"source_seed": domain.seeds[n], "t": t} for n, t in draws],
        "methods": {method: curve(summary, backend) for method, summary in predictions.items()},
        "counts": {
            "samples": config.samples, "sources": len(sources), "heldout": len(heldout),
            "test_examples": int(predictions["star_domain"].confidence.shape[1]),
        },
        "metrics_backend": calibration.backend_version(backend),
        "ece_bins": calibration.ECE_BINS,
        "config": asdict(config),
        "seconds": time.perf_counter() - started,
    }


def write_bma(run: RunDir, results: Mapping[str, Any]) -> Path:
    """``RUN/results/{bma.json, bma.md, bma.png}``, published as a unit."""
    from starfast import report

    def write(folder: Path) -> List[str]:
        write_json(folder / "bma.json", dict(results))
        report.write_text(folder / "bma.md", report.format_bma_table(results) + "\n")
        drawn = report.plot_bma(folder / "bma.png", results)
        return ["bma.json", "bma.md"] + (["bma.png"] if drawn else [])

    return run.publish(run.results_folder, write, owned=["bma.png"])


def _ensemble_predictions(skeleton: nn.Module, space: ParamSpace, members: List[LoadedModel], data: Data) -> PerExample:
    rows = torch.stack([member.row for member in members])
    return nested_predictions(
        skeleton, rows, own_statistics(skeleton, [member.buffers for member in members]), data, space=space, argument="test_data"
    )
