"""Trained two-layer networks on 2-D Gaussians: the star-model tables (Appendix A.2.2-A.2.3).

This module owns the toy task of Tables 3 and 4 of the paper, written functionally on stacked
weights so that many models run as a few batched matrix products:

- data: ``gaussian_data`` draws a balanced 2-D binary task ``x ~ N(mu_y, Sigma)``. The paper
  gives only this form; the parameters here are ours: ``mu_1 = -mu_0 = (3, 3)``,
  ``Sigma = I``, 512 points per class, one fixed data seed (``GaussianTask``). The networks have
  no bias, so the class means are symmetric about the origin. The classes are (almost surely)
  linearly separable, so training drives the loss to ~1e-6: the paper's solutions are models
  with ``L ~ 0`` (Section 3.1, Theorem 1). With overlapping classes (e.g. means ``(1, 1)``)
  the solutions sit at a loss of ~0.18 and every barrier is far larger (see ``star_table``).
- models: ``f(x) = W2 act(W1 x)`` with ``W1 [m, 2]``, ``W2 [1, m]`` (the layouts of
  ``nn.Linear(2, m, bias=False)`` and ``nn.Linear(m, 1, bias=False)``); ``act`` is the identity
  (``"linear"``, Table 3) or ELU (``"elu"``, Table 4). ``K`` models are ``[K, m, 2]`` and
  ``[K, 1, m]`` tensors; the loss is the mean binary cross-entropy on the logits.
- training (the paper's appendix is silent for this task; ``TrainRecipe`` is our choice, after
  its standard recipe in Appendix B.1): ``nn.Linear``'s default initialisation, SGD with
  momentum 0.9, learning rate 0.1 with cosine decay to 0, batch size 128, no weight decay (it
  would change the solution set the theorem is about), float64. Model ``k`` of width ``m``
  draws its initialisation and batch order from its own seed ``(seed, m, k)``; all ``K``
  models train together as one batched computation.
- weight matching: the permutation ``pi`` of ``b``'s hidden units that maximises
  ``<W1a, W1b[pi]> + <W2a, W2b[:, pi]>``, i.e. one linear assignment with
  ``cost[j, k] = <W1a_j, W1b_k> + <W2a_:j, W2b_:k>`` per ordered pair, all pairs in one batched
  ``linear_assignment`` call.
- barriers per eq. (1): ``L((1-t) a + t pi(b)) - (1-t) L(a) - t L(pi(b))`` on 11 equi-spaced
  ``t`` (``L`` on the training data), maximised over ``t``; the endpoint terms are exactly 0 by
  the definition and are not recomputed.
- ``star_table``: ``K`` models per width, the barriers of every ordered pair after matching,
  and the proportion of empirical star models, i.e. of models whose ``K - 1`` barriers are all
  ``< eps``. Matching is symmetric (the cost of ``(b, a)`` is the transpose of that of
  ``(a, b)``), and when ``pi_ba`` is the inverse of ``pi_ab`` the path from ``b`` to
  ``pi_ba(a)`` is the path from ``a`` to ``pi_ab(b)`` permuted and reversed, so
  ``B(b, pi_ba(a)) = B(a, pi_ab(b))``: such ordered pairs reuse their partner's barrier, and
  only pairs ``a < b`` and pairs whose matchings are not mutually inverse are evaluated.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from starfast.data import gaussians
from starfast.lap import linear_assignment
from starfast.theory.lemma2 import CHUNK_ELEMENTS, seeded_generator

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"linear": lambda h: h, "elu": F.elu}
PAPER_EPSILONS = (1e-6, 1e-5, 1e-3, 1e-1)


@dataclass(frozen=True)
class GaussianTask:
    """The class-conditional Gaussian task: ``x ~ N(y_sign * mean, cov)``, ``y_sign = 2y - 1``."""

    n_per_class: int = 512
    mean: Tuple[float, float] = gaussians.DEFAULT_MEAN
    cov: Tuple[Tuple[float, float], Tuple[float, float]] = gaussians.IDENTITY
    seed: int = 0


@dataclass(frozen=True)
class TrainRecipe:
    """SGD recipe used for every model of the tables (see the module docstring)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9


def gaussian_data(task: GaussianTask = GaussianTask()) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x [2n, 2], y [2n])`` float64, classes 0 then 1, drawn with ``task.seed``."""
    if task.n_per_class < 1:
        raise ValueError(f"GaussianTask.n_per_class must be >= 1, got {task.n_per_class}")
    y = torch.cat([torch.zeros(task.n_per_class), torch.ones(task.n_per_class)]).double()
    try:
        x = gaussians.sample_inputs(y, seeded_generator(task.seed), task.mean, task.cov)
    except ValueError as error:
        raise ValueError(f"GaussianTask: {error}") from None
    return x, y


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def _check_weights(w1: torch.Tensor, w2: torch.Tensor, x: Optional[torch.Tensor] = None) -> None:
    if w1.dim() != 3 or w2.dim() != 3 or w2.shape[1] != 1 or w1.shape[0] != w2.shape[0] or w1.shape[1] != w2.shape[2]:
        raise ValueError(f"expected w1 [K, m, d] and w2 [K, 1, m], got {tuple(w1.shape)} and {tuple(w2.shape)}")
    if x is not None and (x.dim() != 2 or x.shape[1] != w1.shape[2]):
        raise ValueError(f"inputs must be [n, {w1.shape[2]}], got {tuple(x.shape)}")


def two_layer_logits(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits ``[K, n]`` of the ``K`` networks ``W2 act(W1 x)`` on inputs ``x [n, d]`` (or ``[K, n, d]``).

    With the identity activation the product ``W2 W1`` is formed first (the same function, without
    the ``[K, n, m]`` hidden layer).
    """
    _check_weights(w1, w2)
    if x.dim() not in (2, 3) or x.shape[-1] != w1.shape[2] or (x.dim() == 3 and x.shape[0] != w1.shape[0]):
        raise ValueError(f"inputs must be [n, {w1.shape[2]}] or [{w1.shape[0]}, n, {w1.shape[2]}], got {tuple(x.shape)}")
    if activation == "linear":
        return (x @ (w2 @ w1).transpose(1, 2)).squeeze(-1)
    return (_activation(activation)(x @ w1.transpose(1, 2)) * w2).sum(-1)


def bce_losses(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, y: torch.Tensor, activation: str) -> torch.Tensor:
    """Mean binary cross-entropy ``[K]`` of each network on ``(x, y)``, in chunks of models."""
    _check_weights(w1, w2, x)
    step = max(1, CHUNK_ELEMENTS // (x.shape[0] * w1.shape[1]))
    out = []
    for start in range(0, w1.shape[0], step):
        z = two_layer_logits(w1[start:start + step], w2[start:start + step], x, activation)
        out.append((F.softplus(z) - y * z).mean(-1))
    return torch.cat(out)


def init_two_layer(width: int, n_models: int, seed: int, d: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default init (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), model ``k`` from seed ``(seed, width, k)``."""
    if width < 1 or n_models < 1:
        raise ValueError(f"width and n_models must be >= 1, got {width} and {n_models}")
    w1 = torch.empty(n_models, width, d, dtype=torch.float64)
    w2 = torch.empty(n_models, 1, width, dtype=torch.float64)
    for k in range(n_models):
        gen = seeded_generator(seed, width, k)
        w1[k].uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=gen)
        w2[k].uniform_(-1 / math.sqrt(width), 1 / math.sqrt(width), generator=gen)
    return w1, w2


def train_two_layer(
    width: int, activation: str, n_models: int, x: torch.Tensor, y: torch.Tensor, seed: int = 0,
    recipe: TrainRecipe = TrainRecipe(), progress: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Train ``n_models`` networks of one width together; returns ``(w1 [K, m, 2], w2 [K, 1, m])``."""
    from starfast.progress import progress_bar

    _activation(activation)
    if recipe.epochs < 1 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise ValueError(f"invalid training recipe {recipe}")
    w1, w2 = init_two_layer(width, n_models, seed, x.shape[1])
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    n = x.shape[0]
    batch = min(recipe.batch_size, n)
    steps_per_epoch = n // batch
    optimizer = torch.optim.SGD([w1, w2], lr=recipe.lr, momentum=recipe.momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    orders = [seeded_generator(seed, width, k, 1) for k in range(n_models)]
    for _ in progress_bar(range(recipe.epochs), desc=f"train {activation} m={width}", enabled=progress, nested=True):
        order = torch.stack([torch.randperm(n, generator=g) for g in orders])
        for step in range(steps_per_epoch):
            idx = order[:, step * batch:(step + 1) * batch]
            xb, yb = x[idx], y[idx]
            z = two_layer_logits(w1, w2, xb, activation)
            loss = (F.softplus(z) - yb * z).mean(-1).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training {activation} networks of width {width} diverged (loss {loss.item()}); lower TrainRecipe.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return w1.detach(), w2.detach()


def ordered_pairs(n_models: int) -> torch.Tensor:
    """All ordered pairs ``(a, b)``, ``a != b``, as ``[K (K - 1), 2]`` (row-major in ``a``)."""
    grid = torch.cartesian_prod(torch.arange(n_models), torch.arange(n_models))
    return grid[grid[:, 0] != grid[:, 1]]


def match_two_layer(w1: torch.Tensor, w2: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Weight matching of ``b`` onto ``a`` for every pair: ``perm [P, m]``, ``b``'s unit ``perm[j]`` goes to ``j``.

    All pairs are solved in one batched ``linear_assignment`` call.
    """
    _check_weights(w1, w2)
    a, b = pairs[:, 0], pairs[:, 1]
    cost = w1[a] @ w1[b].transpose(1, 2) + w2[a].transpose(1, 2) @ w2[b]
    return linear_assignment(cost, maximize=True)


def permute_hidden(w1: torch.Tensor, w2: torch.Tensor, perm: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W1[perm], W2[:, perm])`` for each model: the same functions with hidden units reordered."""
    _check_weights(w1, w2)
    if perm.shape != w1.shape[:2]:
        raise ValueError(f"perm must be [K, m] = {list(w1.shape[:2])}, got {list(perm.shape)}")
    return w1.gather(1, perm[:, :, None].expand_as(w1)), w2.gather(2, perm[:, None, :])


def barrier_curves(
    w1: torch.Tensor, w2: torch.Tensor, pairs: torch.Tensor, perms: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    activation: str, n_points: int = 11,
) -> torch.Tensor:
    """``[P, n_points]`` values of eq. (1) between ``a`` and ``pi(b)`` at ``t = linspace(0, 1, n_points)``."""
    _check_weights(w1, w2, x)
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    ts = torch.linspace(0, 1, n_points, dtype=torch.float64)
    end_losses = bce_losses(w1, w2, x, y, activation)
    a, b = pairs[:, 0], pairs[:, 1]
    b1, b2 = permute_hidden(w1[b], w2[b], perms)
    curves = torch.zeros(pairs.shape[0], n_points, dtype=torch.float64)
    inner = ts[1:-1]
    step = max(1, CHUNK_ELEMENTS // (x.shape[0] * w1.shape[1] * max(1, inner.numel())))
    for start in range(0, pairs.shape[0], step):
        sl = slice(start, start + step)
        t = inner[None, :, None, None]
        i1 = ((1 - t) * w1[a[sl]][:, None] + t * b1[sl][:, None]).flatten(0, 1)
        i2 = ((1 - t) * w2[a[sl]][:, None] + t * b2[sl][:, None]).flatten(0, 1)
        losses = bce_losses(i1, i2, x, y, activation).view(-1, inner.numel())
        linear = (1 - inner) * end_losses[a[sl], None] + inner * end_losses[b[sl], None]
        curves[sl, 1:-1] = losses - linear
    return curves


def barrier_matrix(
    w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, y: torch.Tensor, activation: str, n_points: int = 11,
) -> Tuple[torch.Tensor, int]:
    """``[K, K]`` barriers ``B(a, pi_ab(b))`` after weight matching (zero diagonal), and how many were evaluated.

    All ``K (K - 1)`` ordered pairs are matched in one batched call; the barrier of ``(b, a)`` is
    reused from ``(a, b)`` when the two matchings are mutually inverse (module docstring).
    """
    n_models = w1.shape[0]
    if n_models < 2:
        raise ValueError(f"barrier_matrix needs at least 2 models, got {n_models}")
    pairs = ordered_pairs(n_models)
    a, b = pairs[:, 0], pairs[:, 1]
    partner = b * (n_models - 1) + a - (a > b).long()  # row of (b, a) in ordered_pairs
    perms = match_two_layer(w1, w2, pairs)
    inverse = (perms[partner].gather(1, perms) == torch.arange(w1.shape[1])).all(1)
    needed = ((a < b) | ~inverse).nonzero().squeeze(1)
    curves = barrier_curves(w1, w2, pairs[needed], perms[needed], x, y, activation, n_points)
    matrix = torch.full((n_models, n_models), math.nan, dtype=torch.float64)
    matrix[a[needed], b[needed]] = curves.max(1).values
    reuse = matrix[a, b].isnan()
    matrix[a[reuse], b[reuse]] = matrix[b[reuse], a[reuse]]
    matrix.fill_diagonal_(0.0)
    return matrix, int(needed.numel())


def star_proportions(barriers: torch.Tensor, epsilons: Sequence[float]) -> Dict[float, float]:
    """Fraction of models whose barriers to all others are ``< eps`` (``barriers [K, K]``, diagonal ignored)."""
    if barriers.dim() != 2 or barriers.shape[0] != barriers.shape[1] or barriers.shape[0] < 2:
        raise ValueError(f"barriers must be a [K, K] matrix with K >= 2, got {tuple(barriers.shape)}")
    off = barriers.clone()
    off.fill_diagonal_(-math.inf)
    worst = off.max(1).values
    return {float(e): float((worst < e).double().mean()) for e in epsilons}


def star_table(
    activation: str, widths: Sequence[int] = (2, 4, 8, 32), n_models: int = 100,
    epsilons: Sequence[float] = PAPER_EPSILONS, task: GaussianTask = GaussianTask(), recipe: TrainRecipe = TrainRecipe(),
    seed: int = 0, progress: bool = False,
) -> Dict[str, object]:
    """Proportion of empirical star models per width and tolerance, with the evidence behind it.

    Returns ``{"table": {m: {eps: proportion}}, "train_loss": {m: {"mean", "max"}},
    "barrier_quantiles": {m: {q: value}}, "pairs_evaluated": {m: ordered pairs whose barrier was
    computed (the rest reuse their partner's)}, "config"}``.
    """
    from starfast.progress import progress_bar

    if n_models < 2:
        raise ValueError(f"star_table needs at least 2 models per width, got {n_models}")
    x, y = gaussian_data(task)
    table, train_loss, quantiles, evaluated = {}, {}, {}, {}
    for m in progress_bar(list(widths), desc=f"{activation} widths", enabled=progress):
        w1, w2 = train_two_layer(m, activation, n_models, x, y, seed, recipe, progress)
        losses = bce_losses(w1, w2, x, y, activation)
        matrix, evaluated[m] = barrier_matrix(w1, w2, x, y, activation)
        table[m] = star_proportions(matrix, epsilons)
        train_loss[m] = {"mean": float(losses.mean()), "max": float(losses.max())}
        values = matrix[~torch.eye(n_models, dtype=torch.bool)]
        quantiles[m] = {q: float(values.quantile(q)) for q in (0.0, 0.5, 0.9, 1.0)}
    return {
        "table": table, "train_loss": train_loss, "barrier_quantiles": quantiles, "pairs_evaluated": evaluated,
        "config": {"activation": activation, "widths": list(widths), "n_models": n_models,
                   "epsilons": list(epsilons), "task": asdict(task), "recipe": asdict(recipe), "seed": seed},
    }
