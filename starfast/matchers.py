"""The permutation finders, chosen by name: ``wm`` (weight matching, :mod:`starfast.matching`),
``sinkhorn`` (Sinkhorn re-basin, :mod:`starfast.sinkhorn`), ``am`` (activation matching,
:mod:`starfast.activation_matching`), ``ste`` (straight-through matching,
:mod:`starfast.ste_matching`) and ``none`` (identity permutations).

- :func:`find_permutations` runs one of them on a target row and a bank of sources; every result
  has ``perms`` (group -> ``[N, size]``) and ``permuted`` (``[N, P]``), and can warm-start the
  same finder (``init=previous``, ``out=previous.permuted`` to update its rows in place);
- :class:`MatcherChoice` is the choice and its options as they appear in an options object
  (Starlight's :class:`~starfast.starlight.StarlightOptions` and the evaluation's
  ``EvaluationConfig`` derive from it), validated on construction with errors naming the flag.

``am`` and ``ste`` are data-based (:data:`DATA_MATCHERS`): they need ``probe=``, an
:class:`~starfast.activation_matching.ActivationProbe` of ``match_examples`` training inputs, which
callers build when :attr:`MatcherChoice.needs_data` (the other finders ignore ``probe``).

``none`` permutes nothing: callers that can skip the gather entirely (Starlight's
``lerp_gather`` with no index, the evaluation's barrier on the raw rows) check
:attr:`MatcherChoice.permutes` and never call a finder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Union

import torch

from starfast.activation_matching import (
    DEFAULT_MATCH_EXAMPLES, ActivationMatchResult, ActivationProbe, activation_match, check_match_examples,
)
from starfast.flat import ParamSpace
from starfast.matching import MatchResult, check_problem, match_weights
from starfast.sinkhorn import (
    DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TEMPERATURE, SinkhornResult, check_options, sinkhorn_match,
)
from starfast.spec import Perm, PermutationSpec
from starfast.ste_matching import SteResult, ste_match
from starfast.ste_matching import DEFAULT_LR as STE_LR, DEFAULT_STEPS as STE_STEPS, check_options as check_ste_options

MATCHERS = ("wm", "none", "sinkhorn", "am", "ste")
# The finders that observe the models on data (they need a probe).
DATA_MATCHERS = ("am", "ste")
RESTARTING_MATCHERS = ("wm", "sinkhorn")  # the finders that take ``restarts``
# The fields of MatcherChoice that only the sinkhorn matcher reads.
SINKHORN_FIELDS = ("sinkhorn_lr", "sinkhorn_steps", "sinkhorn_temperature", "sinkhorn_iterations")
# The fields of MatcherChoice that only the ste matcher reads.
STE_FIELDS = ("ste_lr", "ste_steps")


@dataclass
class Unpermuted:
    """What ``none`` finds: identity ``perms`` and the sources as they are (``permuted``)."""

    perms: Perm
    permuted: torch.Tensor


Found = Union[MatchResult, SinkhornResult, ActivationMatchResult, SteResult, Unpermuted]


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
    probe: Optional[ActivationProbe] = None,
    **options: Any,
) -> Found:
    """The permutations finder ``name`` (one of :data:`MATCHERS`) gives for aligning every row of
    ``bank`` ``[N, P]`` with ``target`` ``[P]``. ``init``: a previous result of the same finder for
    the same sources, or permutations (group -> ``[N, size]``); ``seed``: the finder's randomness;
    ``out``: where the permuted rows go (see the finders); ``probe``: the data of a data-based finder
    (``am``, ``ste``; ignored by the others); ``options``: the finder's own keywords (``max_iter`` for ``wm``;
    ``lr``, ``steps``, ``temperature``, ``iterations`` for ``sinkhorn``; ``models_per_call`` for ``am``;
    ``lr``, ``steps``, ``max_iter`` for ``ste``; ``restarts`` for ``wm`` and ``sinkhorn``: starts batched
    per source, the best kept). ``am`` is one-shot: it ignores ``init`` and ``seed``."""
    if name == "wm":
        return match_weights(target, bank, spec, space=space, init=init, seed=seed, out=out, **options)
    if name == "sinkhorn":
        return sinkhorn_match(target, bank, spec, space=space, init=init, seed=seed, out=out, **options)
    if name in DATA_MATCHERS and probe is None:
        raise ValueError(f"find_permutations: matcher {name!r} observes the models on data; pass probe="
                         "ActivationProbe.from_dataset(skeleton, dataset, examples)")
    if name == "am":
        return activation_match(target, bank, spec, space=space, probe=probe, out=out, **options)
    if name == "ste":
        return ste_match(target, bank, spec, space=space, probe=probe, init=init, seed=seed, out=out, **options)
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
    its own); the Sinkhorn options (``--sinkhorn-*``) only apply to ``sinkhorn``, ``match_examples``
    (``--match-examples``: training examples a data-based finder observes) only to ``am`` and
    ``ste``, the straight-through options (``--ste-*``) only to ``ste``. ``match_restarts``: the
    finder's restarts per source (weight matching's starts and group orders, Sinkhorn's noise
    draws), batched, the best kept (``wm`` and ``sinkhorn``; the data-based finders start from one
    answer); ``RESTARTS_FLAG`` names its flag."""

    MATCHER_FLAG: ClassVar[str] = "--matcher"
    RESTARTS_FLAG: ClassVar[str] = "match_restarts"

    matcher: str = "wm"
    sinkhorn_lr: float = DEFAULT_LR
    sinkhorn_steps: int = DEFAULT_STEPS
    sinkhorn_temperature: float = DEFAULT_TEMPERATURE
    sinkhorn_iterations: int = DEFAULT_ITERATIONS
    match_examples: int = DEFAULT_MATCH_EXAMPLES
    ste_lr: float = STE_LR
    ste_steps: int = STE_STEPS
    match_restarts: int = 1

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ValueError(f"{self.MATCHER_FLAG} must be one of {', '.join(MATCHERS)}, got {self.matcher!r}")
        restarts = self.match_restarts
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"{self.RESTARTS_FLAG} must be a positive int, got {restarts!r}")
        check_options(self.sinkhorn_lr, self.sinkhorn_steps, self.sinkhorn_temperature, self.sinkhorn_iterations)
        check_match_examples(self.match_examples)
        check_ste_options(self.ste_lr, self.ste_steps)
        object.__setattr__(self, "ste_lr", float(self.ste_lr))
        object.__setattr__(self, "sinkhorn_lr", float(self.sinkhorn_lr))
        object.__setattr__(self, "sinkhorn_temperature", float(self.sinkhorn_temperature))

    @property
    def permutes(self) -> bool:
        """False for ``none``: nothing to find, nothing to gather."""
        return self.matcher != "none"

    @property
    def needs_data(self) -> bool:
        """True for a data-based finder (:data:`DATA_MATCHERS`): callers pass it a probe."""
        return self.matcher in DATA_MATCHERS

    def probe(self, skeleton: torch.nn.Module, dataset: Any) -> Optional[ActivationProbe]:
        """The data a data-based finder observes (``match_examples`` training inputs); ``None`` for the others."""
        return ActivationProbe.from_dataset(skeleton, dataset, self.match_examples) if self.needs_data else None

    def matcher_options(self) -> Dict[str, Any]:
        """The chosen finder's keywords for :func:`find_permutations` (``restarts`` only when not 1,
        for the finders that restart)."""
        options: Dict[str, Any] = {}
        if self.matcher == "ste":
            options = {"lr": self.ste_lr, "steps": self.ste_steps}
        if self.matcher == "sinkhorn":
            options = {"lr": self.sinkhorn_lr, "steps": self.sinkhorn_steps, "temperature": self.sinkhorn_temperature,
                       "iterations": self.sinkhorn_iterations}
        if self.matcher in RESTARTING_MATCHERS and self.match_restarts != 1:
            options["restarts"] = self.match_restarts
        return options
