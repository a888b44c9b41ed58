"""Starlight (Algorithm 1 of Sonthalia et al., ICLR 2025): training a star model on flat rows.

This module owns

- :func:`train_star` — the training loop: θ is ONE flat leaf ``[P]``; every step samples a source
  ``n`` and a point ``t`` on the segment from θ to the permuted source, evaluates the loss at
  ``ops.lerp_gather(θ, bank, n, index_maps[n], t)`` through ``functional_call`` on views of that
  row, and steps the recipe's optimizer on θ. Per-epoch checkpoints resume bit-identically;
  under ``torch.distributed`` the ranks average θ's gradient (data parallel);
- :class:`StarObjective` — the loss for given draws ``(n, t)``: ``samples_per_step`` draws split the
  batch into chunks that run together under ``torch.func.vmap``; ``ce_weight`` adds the loss at θ
  itself (Section 4.2's objective for model fusion);
- :class:`SourceMatcher` — the permutations aligning every source with θ and their ``[N, P]``
  index maps, re-matched with one batched, warm-started call of the chosen permutation finder
  (:mod:`starfast.matchers`: weight matching by default) and updated in place, synchronously or
  in a background thread; with the ``none`` finder there are neither permutations nor maps;
- :func:`sample_t` — the point on the segment: ``uniform`` (the paper), ``beta`` (Beta(2, 2), the
  ablation of Appendix D.4) or ``constant`` (0.5);

BatchNorm. The interpolated model normalises with the batch's statistics (train mode). The
forward runs on a private copy of the skeleton whose BatchNorm layers keep no running statistics
(``torch.func.replace_all_batch_norm_modules_``), so nothing is written into any buffer during
training; θ's own statistics are recomputed exactly at the end (``starfast.bn.recompute_bn`` over
the un-augmented train set). The ``ce_weight`` forward at θ uses batch statistics too.

Weight decay is the optimizer's (as in regular training): it acts on θ, never on the interpolated
point. The learning rate is ``recipe.lr_at(progress)``, set every step.

Randomness. Three streams are re-seeded at the start of every epoch from ``(seed, stream, epoch,
rank)``: the draws of ``n`` and ``t`` (one per rank), the batch order and augmentation (shared by
the ranks, each taking every W-th batch: a disjoint shard), and the global RNG (dropout). The
epoch counter is therefore the whole generator and scheduler state, and a checkpoint holds θ, the
optimizer state, the permutations and the history.

Speed note: the parameter views come from ``ParamSpace.views``, which uses ``split`` rather than
slicing, so θ's gradient is assembled with one concatenation.
"""
from __future__ import annotations

import functools
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, vmap

from starfast.barrier import evaluate_rows
from starfast.bn import has_batchnorm, recompute_bn
from starfast.flat import ParamSpace
from starfast.activation_matching import ActivationProbe
from starfast.matchers import MatcherChoice, find_permutations
from starfast.ops import lerp_gather, trusted_index_maps
from starfast.progress import progress_bar
from starfast.sites import batch_statistics_copy
from starfast.recipes import Recipe
from starfast.files import save_checkpoint
from starfast.spec import Perm, PermutationSpec
from starfast.training import make_optimizer
from starfast.training_common import (
    StarStream,
    forked_global_rng,
    per_example_loss,
    resume_checkpoint,
    seed_global_rng,
    steps_per_epoch,
    stream_seed,
)

T_SAMPLINGS = ("uniform", "beta", "constant")
CONSTANT_T = 0.5
# A loss above this (or non-finite) stops training: Starlight has diverged.
DIVERGENCE_LIMIT = 1e6
# Losses stay on the device and are checked every this many steps (and at the end of an epoch), so
# the check costs no device synchronisation per step.
DIVERGENCE_CHECK_INTERVAL = 32
EVAL_BATCH_SIZE = 1000
CHECKPOINT_FORMAT = 1

class StarlightDiverged(RuntimeError):
    """The Starlight loss became non-finite or exceeded :data:`DIVERGENCE_LIMIT`."""


class Draw(NamedTuple):
    """One Monte-Carlo sample of the objective: source ``n`` and segment position ``t``."""

    n: int
    t: float


@dataclass(frozen=True)
class StarlightOptions(MatcherChoice):
    """How Starlight trains a star beyond its recipe; validated on construction (errors name the
    CLI flag), JSON-ready with :meth:`to_dict` (what a star's metadata records).

    ``matcher``, ``match_restarts`` and the ``sinkhorn_*`` options
    (:class:`~starfast.matchers.MatcherChoice`): the permutation finder of the re-matches (``wm``,
    ``sinkhorn``, or ``none``: no permutation, no index maps, ``lerp_gather`` without an index) and
    its restarts per source (restart 0 warm-starts from the previous match, the others start cold);
    ``t_sampling``: ``uniform``, ``beta`` or ``constant`` (see :func:`sample_t`); ``rematch_every``:
    re-match all sources every this many steps (``None``: at every epoch start); ``ce_weight``: λ of
    the added loss λ·L(θ) on the same batch (Section 4.2; 0 is the paper's Starlight);
    ``samples_per_step``: S draws per step, each on 1/S of the batch, run under one ``vmap``;
    ``rematch_async``: re-match in a background thread (see :class:`SourceMatcher`; not
    bit-reproducible, not available under ``torch.distributed``).
    """

    RESTARTS_FLAG = "--star-match-restarts"

    t_sampling: str = "uniform"
    rematch_every: Optional[int] = None
    ce_weight: float = 0.0
    samples_per_step: int = 1
    rematch_async: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"--t-sampling must be one of {', '.join(T_SAMPLINGS)}, got {self.t_sampling!r}")
        every = self.rematch_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"--rematch-every must be a positive number of steps (or omitted: every epoch), got {every!r}")
        if not (isinstance(self.ce_weight, (int, float)) and math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise ValueError(f"--ce-weight must be a finite number >= 0, got {self.ce_weight}")
        object.__setattr__(self, "ce_weight", float(self.ce_weight))
        if isinstance(self.samples_per_step, bool) or not isinstance(self.samples_per_step, int) or self.samples_per_step < 1:
            raise ValueError(f"--samples-per-step must be a positive int, got {self.samples_per_step!r}")
        object.__setattr__(self, "rematch_async", bool(self.rematch_async))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# -- sampling ------------------------------------------------------------------------------------


def sample_t(kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` segment positions ``t`` (float64, on the generator's device).

    ``uniform``: Unif[0, 1]; ``beta``: Beta(2, 2), drawn as the median of three uniforms (the second
    order statistic of three Unif[0, 1] is Beta(2, 2)), so it needs only ``generator``;
    ``constant``: always 0.5 (draws nothing).
    """
    if kind == "uniform":
        return torch.rand(count, generator=generator, dtype=torch.float64, device=generator.device)
    if kind == "beta":
        uniforms = torch.rand(count, 3, generator=generator, dtype=torch.float64, device=generator.device)
        return uniforms.median(dim=1).values
    if kind == "constant":
        return torch.full((count,), CONSTANT_T, dtype=torch.float64, device=generator.device)
    raise ValueError(f"--t-sampling must be one of {', '.join(T_SAMPLINGS)}, got {kind!r}")


def sample_draws(num_sources: int, count: int, t_sampling: str, generator: torch.Generator) -> List[Draw]:
    """``count`` independent draws: ``n ~ Unif{0..N-1}``, ``t`` from :func:`sample_t`."""
    sources = torch.randint(num_sources, (count,), generator=generator, device=generator.device)
    positions = sample_t(t_sampling, count, generator)
    return [Draw(int(n), float(t)) for n, t in zip(sources.tolist(), positions.tolist())]


# -- the objective ---------------------------------------------------------------------------------


class StarLosses(NamedTuple):
    """What one evaluation of the objective gives: ``total`` (differentiable), and, detached,
    ``interpolated`` ``[S]`` (each draw's chunk loss) and ``at_theta`` (``None`` without ce_weight)."""

    total: torch.Tensor
    interpolated: torch.Tensor
    at_theta: Optional[torch.Tensor]


class StarObjective:
    """Starlight's loss for given draws (see the module docstring).

    ``total = mean_s L(lerp_gather(θ, bank, n_s, index_maps[n_s], t_s); chunk_s) + ce_weight · L(θ; batch)``
    where chunk ``s`` is the ``s``-th of ``S = len(draws)`` equal consecutive slices of the batch;
    ``index_maps`` ``None`` means the sources as they are (the ``none`` matcher: a plain lerp).
    ``L`` is cross-entropy, or BCE-with-logits when ``binary``, with ``label_smoothing``.
    """

    def __init__(
        self,
        skeleton: nn.Module,
        bank: torch.Tensor,
        *,
        space: Optional[ParamSpace] = None,
        binary: bool = False,
        label_smoothing: float = 0.0,
        ce_weight: float = 0.0,
    ):
        self.space = space if space is not None else ParamSpace(skeleton)
        self.bank = bank
        self.binary, self.label_smoothing, self.ce_weight = binary, label_smoothing, ce_weight
        self.model = batch_statistics_copy(skeleton).train().to(bank.device)
        self._batched_forward = vmap(self._forward, randomness="different")

    def _forward(self, params: Dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (inputs,))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_example_loss(logits, labels, self.binary, self.label_smoothing).mean(-1)

    def __call__(
        self, theta: torch.Tensor, index_maps: Optional[torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor, draws: Sequence[Draw]
    ) -> StarLosses:
        count = len(draws)
        if count < 1 or inputs.shape[0] % count:
            raise ValueError(f"a batch of {inputs.shape[0]} examples cannot be split into {count} equal chunks")
        rows = [lerp_gather(theta, self.bank, n, None if index_maps is None else index_maps[n], t) for n, t in draws]
        if count == 1:  # no vmap overhead for the paper's one draw per step
            logits = self._forward(self.space.views(rows[0]), inputs).unsqueeze(0)
        else:
            chunks = inputs.reshape(count, inputs.shape[0] // count, *inputs.shape[1:])
            logits = self._batched_forward(self.space.views(torch.stack(rows)), chunks)
        interpolated = self._loss(logits, labels.reshape(count, -1))
        total = interpolated.mean()
        at_theta = None
        if self.ce_weight:
            at_theta = self._loss(self._forward(self.space.views(theta), inputs), labels)
            total = total + self.ce_weight * at_theta
            at_theta = at_theta.detach()
        return StarLosses(total, interpolated.detach(), at_theta)


# -- matching the sources to θ -------------------------------------------------------------------


class SourceMatcher:
    """The permutations ``perms`` (group -> ``[N, size]``) aligning each source with θ, and their
    index maps ``index_maps`` ``[N, P]`` (int32 when P < 2^31), which are only ever updated in place.

    :meth:`rematch` runs the chosen finder (``choice``, :func:`~starfast.matchers.find_permutations`;
    ``probe``: the data of a data-based finder, see :attr:`~starfast.matchers.MatcherChoice.needs_data`)
    batched against θ, warm-started from the previous match's result (cold, i.e. from the
    identity, the first time; from the permutations after a resume): for weight matching, groups
    whose assignment provably survived θ's move since then are not re-solved. Keeping that result
    costs one more permuted copy of the bank, which each re-match updates in place (so a re-match
    allocates no second copy). With
    ``background=True`` it matches a snapshot of θ in a worker thread and returns at once; training
    goes on with the old maps, which :meth:`poll` swaps for the new ones at the first call after
    the match finished (so the maps lag θ by the steps the match took, and where the swap lands
    depends on timing). :meth:`finish` waits for a pending match and swaps it in.

    Under ``torch.distributed`` rank 0 matches and broadcasts the permutations; every rank builds
    the same index maps from them (synchronous matching only: ranks must swap at the same step).
    ``seconds`` is the matching compute time, ``wait_seconds`` the time training was blocked by it.
    With the ``none`` finder, :meth:`rematch` does nothing and ``perms`` and ``index_maps`` stay
    ``None`` (Starlight then interpolates with the sources as they are).
    """

    def __init__(
        self,
        bank: torch.Tensor,
        spec: PermutationSpec,
        space: ParamSpace,
        *,
        perms: Optional[Mapping[str, torch.Tensor]] = None,
        rematches: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        choice: MatcherChoice = MatcherChoice(),
        probe: Optional[ActivationProbe] = None,
    ):
        self.bank, self.spec, self.space, self.choice, self.probe = bank, spec, space, choice, probe
        self.seed, self.rank, self.world_size = seed, rank, world_size
        index_dtype = torch.int32 if space.size < 2**31 else torch.int64
        self.index_maps: Optional[torch.Tensor] = None
        if choice.permutes:
            self.index_maps = torch.empty(bank.shape[0], space.size, dtype=index_dtype, device=bank.device)
        self.perms: Optional[Perm] = None
        self._last = None  # the previous result of the finder: the next match's warm start
        self.rematches = rematches  # numbers the matches: match k's group order is seeded by (seed, k)
        self.seconds = self.wait_seconds = 0.0
        self._pending: Optional[Future] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        if perms is not None and choice.permutes:
            self._install({name: index.to(bank.device) for name, index in perms.items()})

    @property
    def matched(self) -> bool:
        return self.perms is not None

    def rematch(self, theta: torch.Tensor, background: bool = False) -> None:
        """Match every source to ``theta`` (see the class docstring); a pending match is finished first."""
        if not self.choice.permutes:
            return
        self.finish()
        started = time.perf_counter()
        seed = stream_seed(self.seed, StarStream.MATCH, self.rematches)
        self.rematches += 1
        if background and self.matched:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="starlight-rematch")
            # A snapshot: the optimizer keeps updating θ in place while the worker matches.
            self._pending = self._executor.submit(self._match, theta.detach().clone(), seed)
        else:
            perms = self._match(theta.detach(), seed) if self.rank == 0 else None
            self._install(self._broadcast(perms))
        self.wait_seconds += time.perf_counter() - started

    def poll(self) -> None:
        """Swap in a finished background match, if any."""
        if self._pending is not None and self._pending.done():
            self._install(self._pending.result())
            self._pending = None

    def finish(self) -> None:
        """Wait for a pending background match and swap it in."""
        if self._pending is not None:
            started = time.perf_counter()
            perms = self._pending.result()
            self._pending = None
            self._install(perms)
            self.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Finish any pending match and stop the worker thread."""
        try:
            self.finish()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _match(self, target: torch.Tensor, seed: int) -> Perm:
        started = time.perf_counter()
        init = self._last if self._last is not None else self.perms
        # The last result's rows are updated in place (one bank copy less); until the new result
        # exists, a failed match leaves nothing stale behind: the next one starts from the perms.
        self._last = None
        out = getattr(init, "permuted", None)  # a previous result (not bare permutations): update its rows
        result = find_permutations(
            self.choice.matcher, target, self.bank, self.spec, space=self.space, init=init, seed=seed, out=out,
            probe=self.probe, **self.choice.matcher_options(),
        )
        self._last = result
        self.seconds += time.perf_counter() - started
        return result.perms

    def _broadcast(self, perms: Optional[Perm]) -> Perm:
        if self.world_size == 1:
            return perms
        if perms is None:
            count = self.bank.shape[0]
            device = self.bank.device
            perms = {group.name: torch.empty(count, group.size, dtype=torch.long, device=device) for group in self.spec.groups}
        for group in self.spec.groups:  # the spec's order: the same sequence of collectives on every rank
            dist.broadcast(perms[group.name], src=0)
        return perms

    def _install(self, perms: Perm) -> None:
        self.spec.check_perm(perms, "matched permutations")
        self.spec.index_map(self.space, perms, out=self.index_maps)
        self.perms = perms


# -- training --------------------------------------------------------------------------------------


@dataclass
class StarResult:
    """What :func:`train_star` returns.

    ``theta``: the star model's row ``[P]``; ``buffers``: its recomputed BatchNorm statistics;
    ``state_dict``: parameters and all buffers, loadable into the skeleton's architecture;
    ``perms`` / ``index_maps``: the last matches of the sources (as used in the last steps;
    ``None`` with the ``none`` matcher);
    ``metrics``: epochs, seconds, train/test loss and accuracy at θ, mean interpolated loss of the
    last epoch, rematch seconds and time share, per-epoch ``history``; ``settings``: the Starlight
    options (JSON-ready).
    """

    theta: torch.Tensor
    buffers: Dict[str, torch.Tensor]
    state_dict: Dict[str, torch.Tensor]
    perms: Optional[Perm]
    index_maps: Optional[torch.Tensor]
    metrics: Dict[str, Any]
    settings: Dict[str, Any] = field(default_factory=dict)


def train_star(
    skeleton: nn.Module,
    bank: torch.Tensor,
    spec: PermutationSpec,
    dataset,
    recipe: Recipe,
    options: StarlightOptions = StarlightOptions(),
    *,
    space: Optional[ParamSpace] = None,
    init_row: Optional[torch.Tensor] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    checkpoint_path=None,
    quiet: bool = False,
    on_epoch_end: Optional[Callable[[int], None]] = None,
) -> StarResult:
    """Train a star model with Starlight (Algorithm 1) against the sources in ``bank``.

    Args:
        skeleton: a module of the architecture (not changed; its parameters are not used).
        bank: ``[N, P]`` source models as rows of ``space`` (moved to ``device``).
        spec: the architecture's permutation spec.
        dataset: a :class:`starfast.data.Dataset` (``train_batches``, ``eval_batches``, ``binary``).
        recipe: optimizer, learning-rate schedule, epochs, batch size (per rank), label smoothing.
        options: matcher, t-sampling, re-matching, ce-weight, samples per step (:class:`StarlightOptions`).
        init_row: θ₀ ``[P]``; default: the skeleton's own parameters (initialise the skeleton, or
            pass a row, e.g. ``space.flatten(training.init_model(spec, seed))`` as the pipeline does).
        seed: drives every random stream (see the module docstring).
        checkpoint_path: written atomically after every epoch; an existing one is resumed.
        quiet: no progress bar.
        on_epoch_end: called with the number of finished epochs after each epoch's checkpoint.

    Raises :class:`StarlightDiverged` naming the epoch, step, ``n`` and ``t`` when the loss becomes
    non-finite or exceeds :data:`DIVERGENCE_LIMIT`.
    """
    device = torch.device(device)
    space = space if space is not None else ParamSpace(skeleton)
    space.check_compatible(skeleton, "skeleton")
    rank, world_size = _distributed_place()
    settings = _check_settings(options, recipe, world_size, seed)
    bank = _checked_bank(bank, space, device)
    theta = _checked_init_row(init_row, skeleton, space).to(device).requires_grad_()
    if world_size > 1:
        dist.broadcast(theta.data, src=0)  # every rank starts from rank 0's θ₀
    steps = steps_per_epoch(dataset, recipe.batch_size, world_size)
    period = options.rematch_every or steps

    objective = StarObjective(
        skeleton, bank, space=space, binary=dataset.binary, label_smoothing=recipe.label_smoothing,
        ce_weight=options.ce_weight,
    )
    optimizer = make_optimizer(recipe, [theta])
    identity = {"format": CHECKPOINT_FORMAT, **settings, "num_sources": bank.shape[0], "P": space.size, "world_size": world_size}
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    resumed = resume_checkpoint(checkpoint_path, identity, lambda state: state.get("identity", {}), "star checkpoint")
    start_epoch, seconds, history, perms, rematches = 0, 0.0, [], None, 0
    if resumed is not None:
        with torch.no_grad():
            theta.copy_(resumed["theta"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        start_epoch, seconds, history = resumed["epoch"], resumed["seconds"], resumed["history"]
        perms, rematches = resumed["perms"], resumed["rematches"]
    matcher = SourceMatcher(
        bank, spec, space, perms=perms, rematches=rematches, seed=seed, rank=rank, world_size=world_size, choice=options,
        probe=options.probe(skeleton, dataset) if rank == 0 else None,
    )

    bar = progress_bar(total=recipe.epochs, initial=start_epoch, desc="starlight", unit="epoch", enabled=not quiet and rank == 0, nested=True)
    try:
        with forked_global_rng(device) as devices:
            for epoch in range(start_epoch, recipe.epochs):
                started = time.perf_counter()
                rematch_before = (matcher.seconds, matcher.wait_seconds)
                seed_global_rng(stream_seed(seed, StarStream.DROPOUT, epoch, rank), devices)
                samples = torch.Generator().manual_seed(stream_seed(seed, StarStream.SAMPLE, epoch, rank))
                order = torch.Generator().manual_seed(stream_seed(seed, StarStream.DATA, epoch))
                batches = islice(dataset.train_batches(recipe.batch_size, generator=order), rank, steps * world_size, world_size)
                step_losses = torch.zeros(steps, 2, device=device)  # interpolated, at θ
                draws_of_steps: List[List[Draw]] = []
                checked = 0
                for step, (inputs, labels) in enumerate(batches):
                    global_step = epoch * steps + step
                    if global_step % period == 0:
                        matcher.rematch(theta, background=options.rematch_async)
                    else:
                        matcher.poll()
                    for group in optimizer.param_groups:
                        group["lr"] = recipe.lr_at(epoch + step / steps)
                    draws = sample_draws(bank.shape[0], options.samples_per_step, options.t_sampling, samples)
                    draws_of_steps.append(draws)
                    with trusted_index_maps():  # the matcher's maps come from spec.index_map (SourceMatcher._install)
                        result = objective(theta, matcher.index_maps, inputs.to(device), labels.to(device), draws)
                    optimizer.zero_grad(set_to_none=True)
                    result.total.backward()
                    if world_size > 1:
                        dist.all_reduce(theta.grad)
                        theta.grad.div_(world_size)
                    optimizer.step()
                    step_losses[step, 0] = result.interpolated.mean()
                    if result.at_theta is not None:
                        step_losses[step, 1] = result.at_theta
                    if (step + 1) % DIVERGENCE_CHECK_INTERVAL == 0 or step + 1 == steps:
                        _check_divergence(step_losses, checked, step + 1, draws_of_steps, epoch, recipe.epochs, steps, world_size)
                        checked = step + 1
                matcher.finish()
                elapsed = time.perf_counter() - started
                seconds += elapsed
                history.append(_epoch_record(epoch, step_losses, options.ce_weight, world_size, recipe, elapsed, matcher, rematch_before))
                if checkpoint_path is not None and rank == 0:
                    save_checkpoint(
                        checkpoint_path,
                        {
                            "identity": identity,
                            "epoch": epoch + 1,
                            "seconds": seconds,
                            "history": history,
                            "theta": theta.detach().cpu(),
                            "optimizer_state": optimizer.state_dict(),
                            "perms": None if matcher.perms is None else {name: index.cpu() for name, index in matcher.perms.items()},
                            "rematches": matcher.rematches,
                        },
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1)
    finally:
        bar.close()
        matcher.close()

    return _finish(skeleton, space, dataset, theta.detach(), matcher, history, seconds, settings)


def _finish(skeleton, space, dataset, theta, matcher: SourceMatcher, history, seconds, settings) -> StarResult:
    """θ's BatchNorm statistics, its train/test metrics and the result."""
    started = time.perf_counter()
    train_data = functools.partial(dataset.eval_batches, "train", EVAL_BATCH_SIZE)
    buffers = recompute_bn(skeleton, theta, train_data, space=space) if has_batchnorm(skeleton) else {}
    loss = "binary" if dataset.binary else "cross_entropy"
    evaluated = {}
    for split in ("train", "test"):
        data = functools.partial(dataset.eval_batches, split, EVAL_BATCH_SIZE)
        split_loss, accuracy = evaluate_rows(skeleton, theta, buffers or None, data, space=space, loss=loss)
        evaluated[f"{split}_loss"], evaluated[f"{split}_accuracy"] = float(split_loss), float(accuracy)
    seconds += time.perf_counter() - started

    params = space.unflatten(theta)
    own_buffers = dict(skeleton.named_buffers())
    state_dict = {
        name: params[name] if name in params else buffers.get(name, own_buffers.get(name)).detach().clone().to(theta.device)
        for name in skeleton.state_dict()
    }
    last = history[-1] if history else {}
    metrics = {
        "epochs": len(history),
        "seconds": seconds,
        "final_loss": evaluated["train_loss"],
        **evaluated,
        "mean_interpolated_loss": last.get("interpolated_loss"),
        "rematch_seconds": matcher.seconds,
        "rematch_wait_seconds": matcher.wait_seconds,
        "rematch_share": matcher.wait_seconds / seconds if seconds > 0 else 0.0,
        "rematches": matcher.rematches,
        "history": history,
    }
    return StarResult(theta, buffers, state_dict, matcher.perms, matcher.index_maps, metrics, settings)


def _epoch_record(epoch, step_losses, ce_weight, world_size, recipe, seconds, matcher, rematch_before) -> Dict[str, Any]:
    """One history entry; losses are averaged over the steps and the ranks."""
    means = step_losses.mean(0).double()
    if world_size > 1:
        dist.all_reduce(means)
        means /= world_size
    interpolated_loss, theta_loss = means.tolist()
    record = {
        "epoch": epoch + 1,
        "loss": interpolated_loss + ce_weight * theta_loss,
        "interpolated_loss": interpolated_loss,
        "lr_end": recipe.lr_at(epoch + 1),
        "seconds": seconds,
        "rematch_seconds": matcher.seconds - rematch_before[0],
        "rematch_wait_seconds": matcher.wait_seconds - rematch_before[1],
    }
    if ce_weight:
        record["theta_loss"] = theta_loss
    return record


def _check_divergence(step_losses, start, stop, draws_of_steps, epoch, epochs, steps, world_size) -> None:
    """Raise :class:`StarlightDiverged` at the first bad loss of steps ``[start, stop)`` (any rank)."""
    window = step_losses[start:stop]
    bad = (~torch.isfinite(window) | (window > DIVERGENCE_LIMIT)).any(dim=1)
    flag = bad.any().to(torch.int32)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag):
        return
    local = bad.nonzero()
    if len(local) == 0:
        raise StarlightDiverged(f"Starlight diverged on another rank in epoch {epoch + 1} of {epochs}, steps {start + 1}-{stop}")
    step = start + int(local[0])
    draws = draws_of_steps[step]
    where = ", ".join(f"n = {draw.n}, t = {draw.t:.4f}" for draw in draws)
    raise StarlightDiverged(
        f"Starlight diverged in epoch {epoch + 1} of {epochs}, step {step + 1} of {steps}: the loss became "
        f"{float(window[step - start].max()):.4g} at source {where}; lower --lr or check the source models"
    )


# -- checks ----------------------------------------------------------------------------------------


def _distributed_place() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_settings(options: StarlightOptions, recipe: Recipe, world_size: int, seed: int) -> Dict[str, Any]:
    """Check the options against the recipe and the process group; returns the star's settings
    JSON-ready (options, seed and recipe)."""
    if recipe.batch_size % options.samples_per_step:
        raise ValueError(
            f"--samples-per-step {options.samples_per_step} must divide --batch-size {recipe.batch_size} "
            "(each draw gets an equal chunk)"
        )
    if options.rematch_async and world_size > 1:
        raise ValueError(
            "--rematch-async is not supported under torchrun: ranks would swap the index maps at different steps; "
            "drop it (re-matching then runs on rank 0 and is broadcast)"
        )
    return {**options.to_dict(), "seed": seed, "recipe": recipe.to_dict()}


def _checked_bank(bank: torch.Tensor, space: ParamSpace, device: torch.device) -> torch.Tensor:
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or bank.shape[1] != space.size or bank.shape[0] < 1:
        shape = list(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise ValueError(f"bank must be the sources as rows [N, {space.size}] (ParamSpace(skeleton).stack), got {shape}")
    bank = bank.detach().to(device=device, dtype=space.dtype)
    finite = torch.isfinite(bank).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"source {int((~finite).nonzero()[0])} of the bank has NaN or infinite weights; retrain or drop it")
    return bank


def _checked_init_row(init_row, skeleton, space: ParamSpace) -> torch.Tensor:
    if init_row is None:
        init_row = space.flatten(skeleton)
    if not isinstance(init_row, torch.Tensor) or tuple(init_row.shape) != (space.size,):
        shape = list(init_row.shape) if isinstance(init_row, torch.Tensor) else type(init_row).__name__
        raise ValueError(f"init_row must be one row [{space.size}], got {shape}")
    if not bool(torch.isfinite(init_row).all()):
        raise ValueError("init_row has NaN or infinite entries")
    return init_row.detach().to(space.dtype).clone()
