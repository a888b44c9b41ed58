"""The permutation finders, chosen by name: ``wm`` (weight matching, :mod:`starfast.matching`),
``sinkhorn`` (Sinkhorn re-basin, :mod:`starfast.sinkhorn`) and ``none`` (identity permutations).

- :func:`find_permutations` runs one of them on a target row and a bank of sources; every result
  has ``perms`` (group -> ``[N, size]``) and ``permuted`` (``[N, P]``), and can warm-start the
  same finder (``init=previous``, ``out=previous.permuted`` to update its rows in place);
- :class:`MatcherChoice` is the choice and its options as they appear in an options object
  (Starlight's :class:`~starfast.starlight.StarlightOptions` and the evaluation's
  ``EvaluationConfig`` derive from it), validated on construction with errors naming the flag.

``none`` permutes nothing: callers that can skip the gather entirely (Starlight's
``lerp_gather`` with no index, the evaluation's barrier on the raw rows) check
:attr:`MatcherChoice.permutes` and never call a finder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Union

import torch

from starfast.flat import ParamSpace
from starfast.matching import MatchResult, check_problem, match_weights
from starfast.sinkhorn import (
    DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TEMPERATURE, SinkhornResult, check_options, sinkhorn_match,
)
from starfast.spec import Perm, PermutationSpec

MATCHERS = ("wm", "none", "sinkhorn")
# The fields of MatcherChoice that only the sinkhorn matcher reads.
SINKHORN_FIELDS = ("sinkhorn_lr", "sinkhorn_steps", "sinkhorn_temperature", "sinkhorn_iterations")


@dataclass
class Unpermuted:
    """What ``none`` finds: identity ``perms`` and the sources as they are (``permuted``)."""

    perms: Perm
    permuted: torch.Tensor


Found = Union[MatchResult, SinkhornResult, Unpermuted]


def find_permutations(
    name: str,
    target: torch.Tensor,
    bank: torch.Tensor,
    spec: PermutationSpec,
    *,
    space: ParamSpace,
    init: Any = None,
    seed: int = 0,
    out: Optional[torch.Tensor] = None,
    **options: Any,
) -> Found:
    """The permutations finder ``name`` (one of :data:`MATCHERS`) gives for aligning every row of
    ``bank`` ``[N, P]`` with ``target`` ``[P]``. ``init``: a previous result of the same finder for
    the same sources, or permutations (group -> ``[N, size]``); ``seed``: the finder's randomness;
    ``out``: where the permuted rows go (see the finders); ``options``: the finder's own keywords
    (``max_iter`` for ``wm``; ``lr``, ``steps``, ``temperature``, ``iterations`` for ``sinkhorn``)."""
    if name == "wm":
        return match_weights(target, bank, spec, space=space, init=init, seed=seed, out=out, **options)
    if name == "sinkhorn":
        return sinkhorn_match(target, bank, spec, space=space, init=init, seed=seed, out=out, **options)
    if name == "none":
        if options:
            raise ValueError(f"find_permutations: matcher 'none' takes no options, got {sorted(options)}")
        check_problem(spec, space, bank if bank.dim() == 2 else bank.unsqueeze(0), "find_permutations")
        count = bank.shape[0] if bank.dim() == 2 else None
        identity = spec.identity(device=bank.device)
        perms = identity if count is None else {key: index.expand(count, -1).clone() for key, index in identity.items()}
        rows = bank if out is None else out.copy_(bank)
        return Unpermuted(perms, rows)
    raise ValueError(f"find_permutations: unknown matcher {name!r}; use one of {', '.join(MATCHERS)}")


@dataclass(frozen=True)
class MatcherChoice:
    """A permutation finder and its options, as fields of an options object (see the module
    docstring). ``MATCHER_FLAG`` is the command-line flag that sets ``matcher`` (a subclass names
    its own); the Sinkhorn options (``--sinkhorn-*``) only apply to ``sinkhorn``."""

    MATCHER_FLAG: ClassVar[str] = "--matcher"

    matcher: str = "wm"
    sinkhorn_lr: float = DEFAULT_LR
    sinkhorn_steps: int = DEFAULT_STEPS
    sinkhorn_temperature: float = DEFAULT_TEMPERATURE
    sinkhorn_iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ValueError(f"{self.MATCHER_FLAG} must be one of {', '.join(MATCHERS)}, got {self.matcher!r}")
        check_options(self.sinkhorn_lr, self.sinkhorn_steps, self.sinkhorn_temperature, self.sinkhorn_iterations)
        object.__setattr__(self, "sinkhorn_lr", float(self.sinkhorn_lr))
        object.__setattr__(self, "sinkhorn_temperature", float(self.sinkhorn_temperature))

    @property
    def permutes(self) -> bool:
        """False for ``none``: nothing to find, nothing to gather."""
        return self.matcher != "none"

    def matcher_options(self) -> Dict[str, Any]:
        """The chosen finder's keywords for :func:`find_permutations`."""
        if self.matcher != "sinkhorn":
            return {}
        return {"lr": self.sinkhorn_lr, "steps": self.sinkhorn_steps, "temperature": self.sinkhorn_temperature,
                "iterations": self.sinkhorn_iterations}
